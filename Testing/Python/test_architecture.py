"""Static checks of the layering rules and of the CI/README contract."""

import ast
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
FITTING_LIB = ROOT / "DCEPKFitting" / "DCEPKFittingLib"
INFERENCE_LIB = ROOT / "DCEPKInference" / "DCEPKInferenceLib"
GUI_OR_SCENE = {"slicer", "qt", "vtk", "ctk", "mrml"}


def _imported_roots(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _core_files():
    for lib in (FITTING_LIB, INFERENCE_LIB):
        yield from sorted(p for p in lib.rglob("*.py") if p.parent.name != "mrml")


@pytest.mark.parametrize("path", list(_core_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_never_imports_slicer_qt_or_vtk(path):
    bad = set(_imported_roots(path)) & GUI_OR_SCENE
    assert not bad, f"{path.name} imports {bad}: only mrml_bridge.py may import slicer"


def test_fitting_core_never_imports_inference():
    for path in FITTING_LIB.rglob("*.py"):
        assert "DCEPKInferenceLib" not in set(_imported_roots(path)), path
        assert "DCEPKInferenceLib" not in path.read_text(), f"{path.name} names the inference package"


def test_mrml_bridges_never_import_qt():
    for path in (FITTING_LIB / "mrml" / "bridge.py", INFERENCE_LIB / "mrml" / "bridge.py"):
        if path.exists():
            assert not set(_imported_roots(path)) & {"qt", "ctk"}, path


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
        source = {"DCEPKFittingLib": FITTING_LIB, "DCEPKInferenceLib": INFERENCE_LIB}[package] / f"{rest.replace('.', '/')}.py"
        tree = ast.parse(source.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert attribute in defined, f"{target}: no function {attribute} in {source.name}"
