"""Static checks of the DCEPKInference Qt shell and its build files.

The module file needs a real Slicer (qt, ctk, parameterNodeWrapper) and cannot be imported here,
so what can be checked without running it is checked from its source: widget names against the
.ui, parameter-node bindings against the wrapper's fields (kind and range), the Logic's delegation
to the MRML bridge, the module's lists against the core's, the CMake file lists against the folders
and shipped models, and the requirements file the two modules share once installed.
"""

import ast
import fnmatch
import inspect
import py_compile
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from slicer_module_source import cmake_list, find_class, parameter_fields, read_ui_widgets, ui_names_used

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "DCEPKInference"
MODULE_FILE = MODULE_DIR / "DCEPKInference.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "DCEPKInference.ui"
LIB_DIR = MODULE_DIR / "DCEPKInferenceLib"
UNBOUND_FIELDS = {"modelName"}  # the network picker is filled from the model cards and synced by hand


@pytest.fixture(scope="module")
def tree():
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui_widgets():
    return read_ui_widgets(UI_FILE)



def _methods(tree, class_name):
    return {n.name: n for n in find_class(tree, class_name).body if isinstance(n, ast.FunctionDef)}


def _module_constants(tree):
    return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id.isupper()}



def test_module_file_compiles():
    py_compile.compile(str(MODULE_FILE), doraise=True)
    ET.parse(UI_FILE)  # well-formed XML


def test_module_metadata(tree):
    init = _methods(tree, "DCEPKInference")["__init__"]
    assigned = {ast.unparse(n.targets[0]): n.value for n in ast.walk(init) if isinstance(n, ast.Assign)}
    assert ast.unparse(assigned["self.parent.title"]) == "_('DCEPK Inference')"
    assert "'Quantification'" in ast.unparse(assigned["self.parent.categories"])
    assert ast.literal_eval(assigned["self.parent.dependencies"]) == ["DCEPKFitting"]
    help_text = ast.unparse(assigned["self.parent.helpText"])
    for needed in ("1/min", "fraction", "_sd", "standard deviation", "hetero_encoder", "ulas_cnn", "fcsa_net",
                   "tcn_punet"):
        assert needed in help_text, f"help text does not mention {needed}"
    assert len(ast.unparse(assigned["self.parent.acknowledgementText"])) > 100


def test_every_ui_widget_the_code_uses_exists(tree, ui_widgets):
    used = ui_names_used(tree)  # (the widgets the panel state enables are checked in test_panel_state.py)
    assert len(used) >= 8, "the widget uses few self.ui.<name>: the check would be nearly empty"
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"DCEPKInference.py uses widgets the .ui does not have: {missing}"


def test_every_parameter_binding_matches_a_field_of_the_right_kind_and_range(tree, ui_widgets):
    fields = parameter_fields(tree)
    bound = {}
    for name, (cls, props, node_types) in ui_widgets.items():
        if "SlicerParameterName" in props:
            assert props["SlicerParameterName"] not in bound, f"two widgets bind {props['SlicerParameterName']}"
            bound[props["SlicerParameterName"]] = (name, cls, props, node_types)
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f".ui binds parameters the wrapper does not define: {unknown}"
    assert set(fields) - set(bound) == UNBOUND_FIELDS, "every field but the network name has a widget"
    for parameter, (widget, cls, props, node_types) in bound.items():
        annotation, _ = fields[parameter]
        if cls == "qMRMLNodeComboBox":
            declared = set(re.findall(r"vtkMRML\w+", annotation))
            assert declared and set(node_types) == declared, (widget, node_types, annotation)
        elif cls == "QComboBox":
            assert "Choice(" in annotation, f"{widget} is a combo box but '{parameter}' has no Choice"
        elif cls == "QDoubleSpinBox":
            assert re.match(r"(Annotated\[)?float\b", annotation), (widget, annotation)
            bounds = re.search(r"WithinRange\(([-\d.]+), ([-\d.]+)\)", annotation)
            assert bounds, f"{parameter} has no WithinRange"
            assert (float(props["minimum"]), float(props["maximum"])) == \
                (float(bounds.group(1)), float(bounds.group(2))), f"{widget} range differs from {parameter}'s"
        elif cls == "QCheckBox":
            assert annotation == "bool", (widget, annotation)
        elif cls == "QLineEdit":
            assert annotation == "str", (widget, annotation)
        else:
            pytest.fail(f"{widget}: no parameterNodeWrapper connector for a {cls}")


def test_choices_defaults_and_lists_agree_with_the_core(tree):
    from DCEPKFittingLib.kinetics.aif import POPULATION_AIFS
    from DCEPKInferenceLib import mrml as mrml_bridge
    from DCEPKInferenceLib.pipeline.inference import DEFAULT_MODEL

    constants = _module_constants(tree)
    assert constants["DEFAULT_MODEL"] == DEFAULT_MODEL
    assert constants["PARAMETERS"] == list(mrml_bridge.PARAMETERS)
    assert constants["FIT_MODELS"] == list(mrml_bridge.FIT_MODELS)
    assert constants["POPULATION_AIFS"] == list(POPULATION_AIFS)
    for name, (annotation, default) in parameter_fields(tree).items():
        if default is None:
            continue
        value = ast.literal_eval(default) if not isinstance(default, ast.Name) else constants[default.id]
        choice = re.search(r"Choice\((.*)\)\]", annotation)
        if choice:
            allowed = eval(choice.group(1), {}, dict(constants))  # a literal list or one of the module's lists
            assert value in allowed, (name, value, allowed)
        bounds = re.search(r"WithinRange\(([-\d.]+), ([-\d.]+)\)", annotation)
        if bounds:
            assert float(bounds.group(1)) <= value <= float(bounds.group(2)), (name, value)


def test_ui_connects_the_scene_to_every_mrml_widget(ui_widgets):
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {name for name, (cls, _, _) in ui_widgets.items() if cls.startswith("qMRML") and name != "DCEPKInference"}
    assert mrml and mrml <= receivers
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert {cls for cls, _, _ in ui_widgets.values() if cls.startswith(("qMRML", "ctk"))} <= declared


def test_logic_passes_every_option_through_to_the_bridge(tree):
    from DCEPKInferenceLib import mrml as mrml_bridge

    methods = _methods(tree, "DCEPKInferenceLogic")
    bridge_call = next(n for n in ast.walk(methods["prepare"]) if isinstance(n, ast.Call)
                       and ast.unparse(n.func) == "mrml_bridge.prepare_scene_inference")
    bridge_parameters = inspect.signature(mrml_bridge.prepare_scene_inference).parameters
    passed = {k.arg for k in bridge_call.keywords}
    assert passed | {"sequence_node"} == set(bridge_parameters), set(bridge_parameters) ^ (passed | {"sequence_node"})
    run_arguments = [a.arg for a in methods["run"].args.args if a.arg not in ("self", "progress", "cancel")]
    prepare_arguments = [a.arg for a in methods["prepare"].args.args if a.arg != "self"]
    assert run_arguments == prepare_arguments
    prepare_call = next(n for n in ast.walk(methods["run"]) if isinstance(n, ast.Call)
                        and ast.unparse(n.func) == "self.prepare")
    assert {k.arg for k in prepare_call.keywords} == set(prepare_arguments[1:])
    # The console API promised in the README.
    assert run_arguments[:4] == ["sequenceNode", "modelName", "maskNode", "device"]
    assert {"uncertaintyThreshold", "compareWithFit", "segmentationNode", "outputPrefix",
            "updateExisting"} <= set(run_arguments)
    # The GUI produces only options run() knows, and all of them.
    options_call = next(n for n in ast.walk(methods["optionsFromParameterNode"]) if isinstance(n, ast.Call)
                        and ast.unparse(n.func) == "dict")
    options = {k.arg for k in options_call.keywords}
    assert options == set(prepare_arguments[1:]) - {"r1_per_mM_s"}, options
    # Each step is the bridge function of the same name, with the same arguments.
    calls = {name: {ast.unparse(n.func) for n in ast.walk(method) if isinstance(n, ast.Call)}
             for name, method in methods.items()}
    assert "mrml_bridge.compute_scene_inference" in calls["compute"]
    assert "mrml_bridge.publish_scene_inference" in calls["publish"]
    assert "mrml_bridge.rethreshold" in calls["applyUncertaintyThreshold"]
    assert "mrml_bridge.show_map_with_uncertainty" in calls["showMapWithUncertainty"]
    assert "describe_device" in calls["describeDevice"]
    for function in ("compute_scene_inference", "publish_scene_inference", "rethreshold",
                     "show_map_with_uncertainty", "model_cards", "describe_model_card"):
        assert callable(getattr(mrml_bridge, function))


def test_logic_and_module_load_use_no_qt_and_no_heavy_import_at_load_time(tree):
    logic = find_class(tree, "DCEPKInferenceLogic")
    names = {n.id for n in ast.walk(logic) if isinstance(n, ast.Name)}
    assert not names & {"qt", "ctk"}, "the Logic must not use Qt"
    top_level = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(re.search(r"\b(numpy|scipy|torch|SimpleITK|safetensors|DCEPKInferenceLib)\b", s)
                   for s in top_level), top_level
    test_class = _methods(tree, "DCEPKInferenceTest")
    assert {"runTest", "test_PhantomWorkflow", "test_CancelAndErrorLeaveSceneUnchanged"} <= set(test_class)
    run_test_calls = {ast.unparse(n.func) for n in ast.walk(test_class["runTest"]) if isinstance(n, ast.Call)}
    assert {"self.test_PhantomWorkflow", "self.test_CancelAndErrorLeaveSceneUnchanged"} <= run_test_calls


def test_dependency_check_is_dcepk_fittings_own(tree):
    """Both widgets install through the shared mixin, which reads the one requirements file
    (DCEPK Fitting's resource), so the two modules can never ask for different packages."""
    assert "ensureDependencies" not in _methods(tree, "DCEPKInferenceWidget")
    calls = {ast.unparse(n) for n in ast.walk(find_class(tree, "DCEPKInferenceWidget")) if isinstance(n, ast.Call)}
    assert "self.ensureDependencies('DCEPK Inference')" in calls
    widgets = ast.parse((ROOT / "DCEPKFitting" / "DCEPKFittingLib" / "widgets" / "module_widget.py").read_text())
    function = next(n for n in widgets.body if isinstance(n, ast.FunctionDef) and n.name == "requirementsFile")
    assert "slicer.util.modulePath('DCEPKFitting')" in ast.unparse(function)


# --------------------------------------------------------------------------- build files

def _cmake_globbed(text):
    patterns = re.search(r"file\(GLOB _model_files RELATIVE \$\{CMAKE_CURRENT_SOURCE_DIR\}\s+(.*?)\)", text, re.S)
    patterns = [p.strip() for p in patterns.group(1).split()]
    files = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*") if p.is_file()}
    return {f for f in files if any(fnmatch.fnmatch(f, pattern) and f.count("/") == pattern.count("/")
                                    for pattern in patterns)}


def test_cmake_lists_every_lib_file_and_resource():
    from DCEPKInferenceLib.nn.model_store import DEFAULT_MODELS_DIR, list_models

    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", "DCEPKInference")
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in LIB_DIR.rglob("*.py")}
    assert "DCEPKInference.py" in scripts
    assert not on_disk - set(scripts), f"Lib files missing from MODULE_PYTHON_SCRIPTS: {sorted(on_disk - set(scripts))}"
    assert all((MODULE_DIR / s).is_file() for s in scripts), [s for s in scripts if not (MODULE_DIR / s).is_file()]
    resources = set(cmake_list(text, "MODULE_PYTHON_RESOURCES", "DCEPKInference")) | _cmake_globbed(text)
    assert "list(APPEND MODULE_PYTHON_RESOURCES ${_model_files})" in text
    assert all((MODULE_DIR / r).is_file() for r in resources), [r for r in resources if not (MODULE_DIR / r).is_file()]
    shipped = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    checkpoints = {f for f in shipped if f.endswith(".pt")}
    assert not resources & checkpoints, "training checkpoints (pickles) must not be packaged"
    assert shipped - checkpoints == resources, (shipped - checkpoints) ^ resources
    assert DEFAULT_MODELS_DIR == MODULE_DIR / "Resources" / "Models"
    cards = list_models()
    assert cards, "no shipped network"
    for card in cards:
        for suffix in (".safetensors", ".json"):
            assert f"Resources/Models/{card['name']}{suffix}" in resources
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)
    assert "add_subdirectory(DCEPKInference)" in (ROOT / "CMakeLists.txt").read_text()


def test_this_module_lists_no_requirements_file_of_its_own():
    """Both modules' resources install into one qt-scripted-modules/Resources folder: a second
    Resources/requirements.txt would be a second build rule for the same output (Ninja refuses)."""
    assert not (MODULE_DIR / "Resources" / "requirements.txt").exists()
    assert "requirements.txt" not in (MODULE_DIR / "CMakeLists.txt").read_text().split("set(MODULE_PYTHON_RESOURCES")[1]


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "DCEPKInference.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)
