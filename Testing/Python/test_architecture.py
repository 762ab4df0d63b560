"""Static checks of the layering rules (per folder of the Lib packages) and of the CI/README contract.

The rules (docs/ARCHITECTURE.md): each folder of a Lib belongs to a layer; a module imports only its own
folder and folders of lower layers (the inference Lib also the fitting Lib's, never the reverse, and the
fitting Lib's folder of its own layer where both have one: mrml -> mrml, workflows -> workflows). So
``core`` imports nothing else of the Lib and nothing imports ``workflows``. Only ``mrml`` and ``widgets``
import slicer / VTK; only ``widgets`` imports qt / ctk.
"""

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
FITTING_LIB = ROOT / "DCEPKFitting" / "DCEPKFittingLib"
INFERENCE_LIB = ROOT / "DCEPKInference" / "DCEPKInferenceLib"
LIBS = {"DCEPKFittingLib": FITTING_LIB, "DCEPKInferenceLib": INFERENCE_LIB}
FITTING, INFERENCE = "DCEPKFittingLib", "DCEPKInferenceLib"

# Layers, lowest first. Both Libs share one scale, so that an inference folder may use the fitting Lib's
# folders below it (data -> kinetics, pipeline -> io ...), and mrml / workflows their namesakes.
LAYERS = {
    (FITTING, "core"): 0, (FITTING, "panels"): 0,
    (FITTING, "io"): 1, (FITTING, "signal"): 1,
    (FITTING, "kinetics"): 2,
    (FITTING, "sims"): 3, (FITTING, "analysis"): 3, (INFERENCE, "data"): 3, (INFERENCE, "analysis"): 3,
    (FITTING, "pipeline"): 4, (INFERENCE, "nn"): 4,
    (INFERENCE, "training"): 5,
    (INFERENCE, "pipeline"): 6,
    (FITTING, "mrml"): 7, (INFERENCE, "mrml"): 7,
    (FITTING, "widgets"): 8,
    (FITTING, "workflows"): 9, (INFERENCE, "workflows"): 9,
}
SCENE = {"slicer", "vtk", "vtkmodules", "mrml"}
QT = {"qt", "ctk"}
MAY_IMPORT_SCENE = {"mrml", "widgets"}
MAY_IMPORT_QT = {"widgets"}
MAX_LINES = 600


def _lib_files():
    for lib in LIBS.values():
        yield from sorted(lib.rglob("*.py"))


def _place(path: Path):
    """(Lib, folder) of a Lib file; folder '' for the Lib's own __init__."""
    for name, lib in LIBS.items():
        if lib in path.parents:
            parts = path.relative_to(lib).parts
            return name, parts[0] if len(parts) > 1 else ""
    raise AssertionError(path)


def _module_name(path: Path) -> str:
    lib, _ = _place(path)
    parts = list(path.relative_to(LIBS[lib]).with_suffix("").parts)
    return ".".join([lib] + [p for p in parts if p != "__init__"])


def _imports(path: Path):
    """(line, absolute module name) of every import in the file, function-level ones included; a
    ``from package import name`` names the submodule when ``name`` is one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    here = _module_name(path) if any(lib in path.parents for lib in LIBS.values()) else ""
    package = here if is_package else here.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                yield node.lineno, _submodule(module, alias.name)


def _submodule(module: str, name: str) -> str:
    lib, _, rest = module.partition(".")
    if lib in LIBS:
        folder = LIBS[lib].joinpath(*rest.split(".")) if rest else LIBS[lib]
        if (folder / name).is_dir() or (folder / f"{name}.py").is_file():
            return f"{module}.{name}"
    return module


def _target(module: str):
    """(Lib, folder) an absolute module name points into, or None outside the Libs."""
    parts = module.split(".")
    if parts[0] not in LIBS:
        return None
    if len(parts) > 1 and (LIBS[parts[0]] / parts[1]).is_dir():
        return parts[0], parts[1]
    return parts[0], ""


LIB_FILES = list(_lib_files())
IDS = [str(p.relative_to(ROOT)) for p in LIB_FILES]


def test_every_lib_folder_has_a_layer():
    for lib, path in LIBS.items():
        folders = {p.parent.name for p in path.glob("*/__init__.py")}
        assert folders == {folder for name, folder in LAYERS if name == lib}, lib


@pytest.mark.parametrize("path", LIB_FILES, ids=IDS)
def test_a_folder_imports_only_itself_and_lower_layers(path):
    lib, folder = _place(path)
    for line, module in _imports(path):
        target = _target(module)
        if target is None or target == (lib, folder) or target[1] == "":
            continue  # outside the Libs, its own folder, or a Lib's root (__version__)
        assert not (lib == FITTING and target[0] == INFERENCE), f"{path.name}:{line} imports {module}"
        if folder == "":
            continue  # a Lib's __init__ names its public API (lazily)
        own, other = LAYERS[(lib, folder)], LAYERS[target]
        allowed = other < own or (other == own and target[0] != lib)
        assert allowed, (f"{path.relative_to(ROOT)}:{line} imports {module}: {folder}/ (layer {own}) may import "
                         f"only its own folder and lower layers ({target[1]}/ is layer {other})")


@pytest.mark.parametrize("path", LIB_FILES, ids=IDS)
def test_only_mrml_and_widgets_import_slicer_and_only_widgets_import_qt(path):
    _, folder = _place(path)
    roots = {module.split(".")[0] for _, module in _imports(path)}
    if folder not in MAY_IMPORT_SCENE:
        assert not roots & SCENE, f"{path.name} imports {roots & SCENE}: only mrml/ and widgets/ may"
    if folder not in MAY_IMPORT_QT:
        assert not roots & QT, f"{path.name} imports {roots & QT}: only widgets/ may"


def test_nothing_in_the_libs_imports_workflows():
    for path in LIB_FILES:
        if _place(path)[1] in ("workflows", ""):
            continue
        bad = [module for _, module in _imports(path) if (_target(module) or ("", ""))[1] == "workflows"]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_fitting_lib_never_names_the_inference_package():
    for path in FITTING_LIB.rglob("*.py"):
        assert "DCEPKInferenceLib" not in path.read_text(), f"{path.name} names the inference package"


def test_the_inference_module_file_does_not_import_the_fitting_module_file_at_load():
    """Shared Qt-shell code lives in DCEPKFittingLib/widgets, which both module files import."""
    tree = ast.parse((ROOT / "DCEPKInference" / "DCEPKInference.py").read_text())
    top_level = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [s for s in top_level if re.search(r"\bDCEPKFitting\b", s)], top_level


@pytest.mark.parametrize("path", LIB_FILES, ids=IDS)
def test_no_lib_file_is_longer_than_600_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines: split it along its topics"


def test_the_fitting_entry_points_load_without_torch(tmp_path):
    """A CPU workflow that needs no network and no fit (reading, T1, statistics, the phantom, the CLI
    parser with the plugins' commands) never imports torch; the fitting engine does, when a fit runs."""
    code = textwrap.dedent(f"""
        import sys
        import DCEPKFittingLib.workflows.cli as cli, DCEPKFittingLib.workflows.demo
        import DCEPKFittingLib.pipeline, DCEPKFittingLib.io, DCEPKFittingLib.signal, DCEPKFittingLib.sims.phantom
        import DCEPKFittingLib.kinetics.aif, DCEPKFittingLib.kinetics.fit_result, DCEPKFittingLib.analysis.stats
        import DCEPKFittingLib.mrml  # the Slicer Logic's bridge loads without torch too
        assert cli.main(["phantom", "--out", {str(tmp_path / "phantom")!r}, "--shape", "1", "16", "16",
                         "--frames", "12"]) == 0
        print("torch" in sys.modules)
        import DCEPKFittingLib.kinetics.fitting
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["False", "True"], result.stdout + result.stderr


def test_the_command_line_loads_without_dask():
    """Dask (the optional cohort extra) is imported when ``dcepk batch`` runs, not with the command line,
    its parser or the batch command's module."""
    code = textwrap.dedent("""
        import sys
        import DCEPKFittingLib.workflows.cli as cli, DCEPKFittingLib.workflows.batch_command
        cli._build_parser()
        print(sorted(name for name in ("dask", "distributed", "pyarrow") if name in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "[]", result.stdout


def test_pyproject_ships_every_subpackage():
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for lib, path in LIBS.items():
        on_disk = {".".join([lib] + list(p.parent.relative_to(path).parts)) for p in path.rglob("__init__.py")}
        assert not on_disk - packages, f"pyproject.toml does not package {sorted(on_disk - packages)}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```(?:bash|sh)\n(.*?)^```", readme, flags=re.S | re.M)
    test_commands = [line.strip() for block in blocks for line in block.splitlines() if "pytest" in line]
    assert len(test_commands) == 1, f"the README must show one test command, found {test_commands}"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "export "))]
    assert ci_lines == test_commands


def test_entry_points_resolve_to_functions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    targets = [project["scripts"]["dcepk"]]
    for group in project.get("entry-points", {}).values():
        targets += list(group.values())
    for target in targets:
        module_name, _, attribute = target.partition(":")
        package, _, rest = module_name.partition(".")
        source = LIBS[package].joinpath(*rest.split(".")).with_suffix(".py")
        tree = ast.parse(source.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert attribute in defined, f"{target}: no function {attribute} in {source.name}"
