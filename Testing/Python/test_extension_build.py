"""The extension's CMake build and catalog entry, as Slicer's build and the Extensions Index see them.

Build: no Slicer build tree exists here, and the ``slicer-core-sdk`` wheel (PyPI) ships a
SlicerConfig.cmake for its C++ MRML components only (no ``Slicer_USE_FILE``, no
``slicerMacroBuildScriptedModule``, no extension packaging), so a configure against it stops at
``include(${Slicer_USE_FILE})``. The extension is therefore configured by a real CMake and built by
a real Ninja against ``Testing/CMake/SlicerStandIn``, which generates the rules Slicer's scripted
module macro generates (one copy rule per script and resource into the one qt-scripted-modules
folder all modules share): Ninja itself refuses two rules for one output, as it did for the two
``Resources/requirements.txt`` (issue 16 item 2).

Catalog: the checks of the Extensions Index (Slicer/ExtensionsIndex scripts/check_description_files.py)
that can run offline, applied to DCEPK.json and to the metadata as CMake evaluated it: the rules of
Slicer's catalog-entry JSON schema v1.0.2, LF line endings, extension and repository names, URL
schemes, a project() name equal to the entry's name, icon and screenshot URLs that name PNG files
of this repository, a licence file, the repository size limit (issue 16 item 12).
"""

import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from conftest import ROOT, import_or_skip

STAND_IN = ROOT / "Testing" / "CMake" / "SlicerStandIn"
SCRIPTED_MODULES = "lib/Slicer-5.13/qt-scripted-modules"
MODULES = ("DCEPKFitting", "DCEPKInference")
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.2.json#")


def _tools():
    cmake = import_or_skip("cmake", "the cmake package (pip install -e '.[test]') is needed to configure the extension")
    ninja = import_or_skip("ninja", "the ninja package (pip install -e '.[test]') is needed to build the extension")
    return Path(cmake.CMAKE_BIN_DIR) / "cmake", Path(ninja.BIN_DIR) / "ninja"


def _configure_and_build(source, build, *options):
    cmake, ninja = _tools()
    configure = subprocess.run([str(cmake), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", "-S", str(source),
                                "-B", str(build), f"-DSlicer_DIR={STAND_IN}", *options],
                               capture_output=True, text=True, timeout=120)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    return subprocess.run([str(ninja), "-C", str(build)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    build = tmp_path_factory.mktemp("extension-build")
    result = _configure_and_build(ROOT, build, f"-DDCEPK_PYTEST_PYTHON={sys.executable}")
    return build, result


def _listed(module):
    """Scripts and resources as CMake listed them: the files the build copied for this module."""
    from slicer_module_source import cmake_list

    text = (ROOT / module / "CMakeLists.txt").read_text()
    files = cmake_list(text, "MODULE_PYTHON_SCRIPTS", module) + cmake_list(text, "MODULE_PYTHON_RESOURCES", module)
    return [f for f in files if not f.startswith("${")]


def test_ninja_builds_the_extension_with_one_rule_per_output(built):
    build, result = built
    assert result.returncode == 0, result.stdout + result.stderr
    installed = build / SCRIPTED_MODULES
    outputs = {}
    for module in MODULES:
        for relative in _listed(module):
            assert relative not in outputs, f"{relative} is written by {outputs[relative]} and {module}"
            outputs[relative] = module
            assert (installed / relative).read_bytes() == (ROOT / module / relative).read_bytes(), relative
    models = [p for p in (installed / "Resources" / "Models").glob("*.safetensors")]
    assert models, "the globbed network weights were not packaged"
    # One requirements file for both modules, where both widgets read it (requirementsFile()).
    assert (installed / "Resources" / "requirements.txt").read_bytes() == \
        (ROOT / "DCEPKFitting" / "Resources" / "requirements.txt").read_bytes()


def test_ninja_refuses_two_modules_writing_one_resource(tmp_path):
    """The check above can fail: two scripted modules listing the same resource path do not build."""
    for name in ("A", "B"):
        (tmp_path / name / "Resources").mkdir(parents=True)
        (tmp_path / name / f"{name}.py").write_text("")
        (tmp_path / name / "Resources" / "requirements.txt").write_text(name)
        (tmp_path / name / "CMakeLists.txt").write_text(
            f"slicerMacroBuildScriptedModule(NAME {name} SCRIPTS {name}.py RESOURCES Resources/requirements.txt)\n")
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.28.0...3.28.0 FATAL_ERROR)\nproject(Two NONE)\n"
        "find_package(Slicer REQUIRED)\ninclude(${Slicer_USE_FILE})\nadd_subdirectory(A)\nadd_subdirectory(B)\n")
    result = _configure_and_build(tmp_path, tmp_path / "build")
    assert result.returncode != 0
    assert re.search(r"multiple rules generate \S*qt-scripted-modules/Resources/requirements\.txt",
                     result.stdout + result.stderr)


def test_ctest_runs_the_self_tests_and_the_pytest_suite(built):
    build, _ = built
    cmake, _ = _tools()
    listing = subprocess.run([str(Path(cmake).with_name("ctest")), "--test-dir", str(build), "-N"],
                             capture_output=True, text=True, timeout=60).stdout
    tests = set(re.findall(r"Test\s+#\d+: (\S+)", listing))
    assert {"py_DCEPKFitting", "py_DCEPKInference", "py_DCEPK_pytest"} <= tests, listing


# --------------------------------------------------------------------------- the Extensions Index's rules
def _metadata(built):
    return json.loads((built[0] / "extension-metadata.json").read_text())


def test_catalog_entry_follows_the_catalog_entry_schema():
    """The rules of Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (draft-07)."""
    path = ROOT / "DCEPK.json"
    assert b"\r" not in path.read_bytes(), "the index wants LF line endings"
    entry = json.loads(path.read_text())
    allowed = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
               "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool,
               "tier": int}
    assert {"$schema", "category", "scm_url"} <= set(entry), "required properties"
    assert set(entry) <= set(allowed), f"additional properties: {set(entry) - set(allowed)}"
    for key, value in entry.items():
        assert isinstance(value, allowed[key]) and not (allowed[key] is int and isinstance(value, bool)), key
    assert entry["$schema"] == SCHEMA_URL
    assert entry.get("scm_type", "git") in ("git", "local")
    assert all(isinstance(name, str) for name in entry.get("build_dependencies", []))
    assert 1 <= entry.get("tier", 1) <= 5


def test_catalog_entry_and_cmake_metadata_pass_the_index_checks(built):
    entry = json.loads((ROOT / "DCEPK.json").read_text())
    metadata = _metadata(built)
    name = "DCEPK"
    assert metadata["PROJECT_NAME"] == name and not name.lower().startswith("slicer")
    url = urllib.parse.urlsplit(entry["scm_url"])
    assert url.scheme in ("git", "https")
    owner, repository = url.path.strip("/").split("/")
    assert repository.endswith(".git") and repository.startswith("Slicer")
    repository = repository[:-len(".git")]
    assert entry["category"] == metadata["CATEGORY"] == "Quantification"  # one of the index's accepted categories
    assert entry["build_dependencies"] == metadata["DEPENDS"].split() == ["PyTorch"]  # an extension of the index
    assert metadata["HOMEPAGE"].startswith(f"https://github.com/{owner}/{repository}")
    for contributor in metadata["CONTRIBUTORS"].split(","):
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor.strip()), "contributors as 'Name (Organisation)'"
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    raw = f"https://raw.githubusercontent.com/{owner}/{repository}/{entry['scm_revision']}/"
    images = [metadata["ICONURL"]] + metadata["SCREENSHOTURLS"].split()
    assert len(images) >= 2
    for image in images:
        assert image.startswith(raw) and image.lower().endswith(".png"), image
        relative = image[len(raw):]
        assert relative in tracked, f"{relative} is not a file of the repository (the index downloads it)"
        data = (ROOT / relative).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", relative
    for screenshot in images[1:]:
        assert (ROOT / screenshot[len(raw):]).stat().st_size < 400_000, "keep screenshots small"
    assert (ROOT / "LICENSE").is_file()
    size = sum((ROOT / f).stat().st_size for f in tracked if (ROOT / f).is_file())
    assert size < 100 * 2**20, f"repository {size / 2**20:.1f} MB: the index's limit is 100 MB"


def test_cmake_minimum_is_slicers_template_and_slicer_minimum_is_declared_once():
    """cmake_minimum_required as Slicer's extension template of the 5.13 line (Utilities/Templates/
    Extensions/Default/CMakeLists.txt); Slicer 5.8 as the minimum (issue 16 item 10), without dead fallbacks."""
    assert (ROOT / "CMakeLists.txt").read_text().splitlines()[1] == \
        "cmake_minimum_required(VERSION 3.28.0...3.28.0 FATAL_ERROR)"
    fitting = (ROOT / "DCEPKFitting" / "DCEPKFitting.py").read_text()
    assert "MINIMUM_SLICER_VERSION = (5, 8)" in fitting
    assert "Slicer 5.8 or later" in (ROOT / "README.md").read_text()
    for module in MODULES:
        source = (ROOT / module / f"{module}.py").read_text()
        assert "4.13" not in source and "except AttributeError" not in source, module
    slicer = import_or_skip("slicer", "slicer-core (pip install slicer-core) is needed")
    assert hasattr(slicer.vtkMRMLTableNode, "SetUseColumnTitleAsColumnHeader")  # the 5.8 API that sets the floor
    assert hasattr(slicer.vtkSlicerColorLogic, "AddDefaultColorLegendDisplayNode")


def test_screenshots_folder_documents_how_its_figures_are_made():
    readme = (ROOT / "Resources" / "Screenshots" / "README.md").read_text()
    shipped = sorted(p.name for p in (ROOT / "Resources" / "Screenshots").glob("*.png"))
    assert shipped and all(name in readme for name in shipped)
    assert "dcepk demo" in readme and os.path.exists(ROOT / "Resources" / "Screenshots" / shipped[0])
