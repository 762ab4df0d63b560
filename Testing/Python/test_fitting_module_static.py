"""Static checks of the DCEPKFitting Qt shell and the extension's build files.

The module file needs a real Slicer (qt, ctk, parameterNodeWrapper) and cannot be imported here,
so what can be checked without running it is checked from its source: widget names against the
.ui, parameter-node bindings against the wrapper's fields (and the widget kind against the field
type), the Logic's delegation to the MRML bridge, the CMake file lists against the folders, and
the install-on-first-use helper with an injected question and installer.
"""

import ast
import inspect
import json
import py_compile
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from slicer_module_source import cmake_list, find_class, parameter_fields, read_ui_widgets, ui_names_used

from DCEPKFittingLib.panels import slicer_dependencies
from DCEPKFittingLib.panels.panel_state import FITTING_AIF_SOURCES

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "DCEPKFitting"
MODULE_FILE = MODULE_DIR / "DCEPKFitting.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "DCEPKFitting.ui"
LIB_DIR = MODULE_DIR / "DCEPKFittingLib"


@pytest.fixture(scope="module")
def tree():
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui_widgets():
    return read_ui_widgets(UI_FILE)




def test_module_file_compiles():
    py_compile.compile(str(MODULE_FILE), doraise=True)


def test_every_ui_widget_the_code_uses_exists(tree, ui_widgets):
    used = ui_names_used(tree)
    assert used, "the widget uses no self.ui.<name>: the check would be empty"
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"DCEPKFitting.py uses widgets the .ui does not have: {missing}"


def test_every_parameter_binding_matches_a_field_of_the_right_kind(tree, ui_widgets):
    fields = parameter_fields(tree)
    bound = {props["SlicerParameterName"]: (name, cls, node_types)
             for name, (cls, props, node_types) in ui_widgets.items() if "SlicerParameterName" in props}
    assert len(bound) >= 20
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f".ui binds parameters the wrapper does not define: {unknown}"
    for parameter, (widget, cls, node_types) in bound.items():
        annotation, _ = fields[parameter]
        if cls == "qMRMLNodeComboBox":
            declared = set(re.findall(r"vtkMRML\w+", annotation))
            assert declared and set(node_types) == declared, (widget, node_types, annotation)
        elif cls == "QComboBox":
            assert "Choice(" in annotation, f"{widget} is a combo box but '{parameter}' has no Choice"
        elif cls in ("QDoubleSpinBox", "ctkSliderWidget"):
            assert re.match(r"(Annotated\[)?float\b", annotation), (widget, annotation)
        elif cls == "QCheckBox":
            assert annotation == "bool", (widget, annotation)
        elif cls == "QLineEdit":
            assert annotation == "str", (widget, annotation)
        else:
            pytest.fail(f"{widget}: no parameterNodeWrapper connector for a {cls}")


def test_choice_and_range_defaults_are_allowed_values(tree, ui_widgets):
    namespace = {"MODELS": ["etofts", "tofts", "patlak", "2cxm", "2cum"],
                 "POPULATION_AIFS": ["parker", "georgiou", "weinmann"],
                 "AIF_SOURCES": list(FITTING_AIF_SOURCES), "AUTO_AIF_KINDS": ["either", "artery", "vein"]}
    source = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
              if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id in namespace}
    assert source == namespace  # the module's lists are the ones checked below
    for name, (annotation, default) in parameter_fields(tree).items():
        if default is None:
            continue
        value = ast.literal_eval(default)
        choice = re.search(r"Choice\((.*)\)\]", annotation)
        if choice:
            allowed = eval(choice.group(1), {}, dict(namespace))  # a literal list or one of the names above
            assert value in allowed, (name, value, allowed)
        bounds = re.search(r"WithinRange\(([-\d.]+), ([-\d.]+)\)", annotation)
        if bounds:
            assert float(bounds.group(1)) <= value <= float(bounds.group(2)), (name, value)
    for name, (cls, props, _) in ui_widgets.items():
        if cls == "QDoubleSpinBox":
            assert float(props["minimum"]) < float(props["maximum"]), name


def test_ui_connects_the_scene_to_every_mrml_widget(ui_widgets):
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {name for name, (cls, _, _) in ui_widgets.items() if cls.startswith("qMRML") and name != "DCEPKFitting"}
    assert mrml and mrml <= receivers


def test_logic_passes_every_option_through_to_the_bridge(tree):
    from DCEPKFittingLib import mrml as mrml_bridge

    logic = find_class(tree, "DCEPKFittingLogic")
    methods = {n.name: n for n in logic.body if isinstance(n, ast.FunctionDef)}
    bridge_call = next(n for n in ast.walk(methods["prepare"]) if isinstance(n, ast.Call)
                       and ast.unparse(n.func) == "mrml_bridge.prepare_scene_fit")
    bridge_parameters = inspect.signature(mrml_bridge.prepare_scene_fit).parameters
    passed = {k.arg for k in bridge_call.keywords}
    assert passed <= set(bridge_parameters), passed - set(bridge_parameters)
    assert passed | {"sequence_node"} == set(bridge_parameters), set(bridge_parameters) - passed
    # Every console option of run() reaches prepare(), by the same name.
    run_arguments = [a.arg for a in methods["run"].args.args if a.arg not in ("self", "progress", "cancel")]
    prepare_arguments = [a.arg for a in methods["prepare"].args.args if a.arg != "self"]
    assert run_arguments == prepare_arguments
    prepare_call = next(n for n in ast.walk(methods["run"]) if isinstance(n, ast.Call)
                        and ast.unparse(n.func) == "self.prepare")
    assert {k.arg for k in prepare_call.keywords} == set(prepare_arguments[1:])
    # and the GUI produces only options run() knows.
    options_keys = set()
    for node in ast.walk(methods["optionsFromParameterNode"]):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("dict", "options.update"):
            options_keys |= {k.arg for k in node.keywords}
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "options":
            options_keys.add(ast.literal_eval(node.slice))
    assert options_keys and options_keys <= set(prepare_arguments), options_keys - set(prepare_arguments)
    assert {"compute", "publish", "loadPhantomSample"} <= set(methods)


def test_logic_and_module_load_use_no_qt_and_no_heavy_import_at_load_time(tree):
    logic = find_class(tree, "DCEPKFittingLogic")
    names = {n.id for n in ast.walk(logic) if isinstance(n, ast.Name)}
    assert not names & {"qt", "ctk"}, "the Logic must not use Qt"
    top_level = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    lib_imports = [s for s in top_level if "DCEPKFittingLib" in s]
    # Only the dependency-free helpers (no numpy, no torch): the module loads before packages are installed.
    widgets = "CONTRIBUTORS, DCEPKBackgroundJobWidgetMixin, missingComputePackages"
    assert lib_imports == ["from DCEPKFittingLib.panels import panel_state",
                           f"from DCEPKFittingLib.widgets.module_widget import {widgets}"], lib_imports
    for helper in ("panels/panel_state.py", "panels/slicer_dependencies.py", "widgets/module_widget.py"):
        nodes = list(ast.walk(ast.parse((LIB_DIR / helper).read_text())))
        imported = [n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module] + \
            [alias.name for n in nodes if isinstance(n, ast.Import) for alias in n.names]
        heavy = {"numpy", "scipy", "torch", "SimpleITK"} | ({"slicer"} if helper.startswith("panels") else set())
        assert not {m.split(".")[0] for m in imported} & heavy, helper
    assert not any(re.search(r"\b(numpy|scipy|torch|SimpleITK)\b", s) for s in top_level)
    test_class = find_class(tree, "DCEPKFittingTest")
    assert {"runTest", "test_PhantomWorkflow"} <= {n.name for n in test_class.body if isinstance(n, ast.FunctionDef)}


# --------------------------------------------------------------------------- build files

def test_cmake_lists_every_lib_file_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", "DCEPKFitting")
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in LIB_DIR.rglob("*.py")}
    assert "DCEPKFitting.py" in scripts
    assert not on_disk - set(scripts), f"Lib files missing from MODULE_PYTHON_SCRIPTS: {sorted(on_disk - set(scripts))}"
    assert all((MODULE_DIR / s).is_file() for s in scripts), [s for s in scripts if not (MODULE_DIR / s).is_file()]
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", "DCEPKFitting")
    assert all((MODULE_DIR / r).is_file() for r in resources), [r for r in resources if not (MODULE_DIR / r).is_file()]
    shipped = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert shipped == set(resources), shipped ^ set(resources)
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)


def test_top_level_cmake_and_catalog_entry():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"project\(DCEPK\)", text)
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_CATEGORY "Quantification")' in text
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(DCEPKFitting)",
             "add_subdirectory(DCEPKInference)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
             "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(line) for line in order]
    assert positions == sorted(positions)
    entry = json.loads((ROOT / "DCEPK.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["scm_type"] == "git" and entry["scm_url"].endswith(".git") and entry["scm_revision"]
    assert entry["category"] == "Quantification"
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]+)"\)', text).group(1).split()
    assert sorted(entry["build_dependencies"]) == sorted(d for d in depends if d != "NA")


@pytest.mark.parametrize("path", ["Resources/Icons/DCEPK.png", "DCEPKFitting/Resources/Icons/DCEPKFitting.png"])
def test_icons_are_128_pixel_pngs(path):
    data = (ROOT / path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


# --------------------------------------------------------------------------- install on first use, after asking
def test_requirements_file_lists_what_slicer_lacks_and_not_torch_or_vtk():
    names = [re.match(r"[A-Za-z0-9._-]+", r).group(0).lower()
             for r in slicer_dependencies.read_requirements(MODULE_DIR / "Resources" / "requirements.txt")]
    assert "safetensors" in names
    assert not {"torch", "vtk", "numpy", "slicer-core"} & set(names)


def test_nothing_is_installed_without_consent():
    installed, questions = [], []
    requirements = ["pytest>=1.0", "dcepk-package-that-does-not-exist>=1"]
    assert slicer_dependencies.missing_requirements(requirements) == ["dcepk-package-that-does-not-exist>=1"]
    assert slicer_dependencies.missing_requirements(["pytest>=999"]) == ["pytest>=999"]

    declined = slicer_dependencies.ensure_requirements(
        requirements, confirm=lambda q: questions.append(q) or False, install=installed.append)
    assert declined is False and installed == []
    assert "dcepk-package-that-does-not-exist" in questions[0] and "pytest" not in questions[0]

    with pytest.raises(RuntimeError, match="did not succeed"):  # an install that installs nothing is reported
        slicer_dependencies.ensure_requirements(requirements, confirm=lambda q: True, install=installed.append)
    assert installed == [["dcepk-package-that-does-not-exist>=1"]]
    assert slicer_dependencies.ensure_requirements(["pytest"], confirm=lambda q: pytest.fail("asked"),
                                                   install=lambda r: pytest.fail("installed")) is True


def test_installer_prefers_slicer_packaging_and_falls_back_to_pip_install():
    calls = []

    class Util:
        @staticmethod
        def pip_install(requirements):
            calls.append(("util", requirements))

    class Packaging:
        @staticmethod
        def pip_install(requirements):
            calls.append(("packaging", requirements))

    class OldSlicer:
        util = Util

    class NewSlicer:
        util = Util
        packaging = Packaging

    slicer_dependencies.installer_for_slicer(NewSlicer)(["safetensors>=0.4"])
    slicer_dependencies.installer_for_slicer(OldSlicer)(["safetensors>=0.4"])
    assert calls == [("packaging", ["safetensors>=0.4"]), ("util", ["safetensors>=0.4"])]
