"""Slicer's own Python (``../shared/slicer-src``) run on the ``slicer-core`` wheel: the conformance tier.

What is real here: the Slicer core libraries of the wheel (scene, nodes, storage, logics), and from
Slicer's source tree the ``parameterNodeWrapper`` (serializers, defaults, validators, GUI
connectors), the ``ScriptedLoadableModule`` base classes, ``slicer.packaging`` and the SampleData
module's logic; the DCEPK module files are imported as Slicer imports them. Stood in for (no Qt and
no application exist on these machines): ``qt``/``ctk`` and the qMRML widget classes
(``qt_standins``, ``mrml_standins``: inert, but each of the exact class the .ui names, as the GUI connectors test
``type(widget)``), ``slicer.i18n`` (identity), and a minimal ``slicer.app`` / ``slicer.modules``.

How Slicer's source is imported without shadowing the wheel: the wheel's ``slicer`` package is a
namespace that, at ``import slicer``, imports every module it finds in each ``slicer`` folder on
``sys.path``. Putting ``slicer-src/Base/Python`` on ``sys.path`` would therefore import Slicer's
``util.py`` and ``ScriptedLoadableModule.py`` (which need Qt) beside the wheel's. Instead, only the
modules the wheel lacks are loaded from their files under their package names
(``slicer.parameterNodeWrapper``, ``slicer.ScriptedLoadableModule``, ``slicer.packaging``) and set
as attributes of the wheel's ``slicer``; the wheel's compiled MRML classes and its ``slicer.util``
(the same functions as the application's) stay in charge. Nothing is copied from slicer-src.

``SlicerApplication`` (fixture ``slicer_app``) installs all of this around one test and removes
``slicer.app``, ``slicer.mrmlScene`` and ``slicer.modules`` afterwards; the grafted modules stay
loaded for the session (they have no state a test could leave behind).
"""

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

from conftest import ROOT
from slicer_scene import make_scene
import mrml_standins
import qt_standins

import slicer  # noqa: E402  (slicer_scene already required it)

from DCEPKFittingLib.core.reference_data import reference_data_required  # noqa: E402

SLICER_SOURCE_ENV = "DCEPK_SLICER_SOURCE"
_GRAFTED = {}


def slicer_source_dir() -> Path:
    env = os.environ.get(SLICER_SOURCE_ENV)
    return Path(env) if env else ROOT.parent / "shared" / "slicer-src"


def require_slicer_source() -> Path:
    """Slicer's source tree; skip (user machine) or fail (CI) when it is absent."""
    source = slicer_source_dir()
    if not (source / "Base" / "Python" / "slicer" / "parameterNodeWrapper" / "__init__.py").is_file():
        reason = (f"Slicer's Python source not found at {source}: put the shared slicer-src there or point "
                  f"{SLICER_SOURCE_ENV} at it")
        if reference_data_required():
            pytest.fail(reason + " (required because CI or DCEPK_REQUIRE_REFERENCE_DATA is set)", pytrace=False)
        pytest.skip(reason)
    return source


def _graft(name: str, path: Path, package: bool = False):
    """Load ``path`` as module ``name`` (``slicer.X``) and hang it on its parent package."""
    if name in _GRAFTED:
        sys.modules[name] = _GRAFTED[name]
        return _GRAFTED[name]
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py" if package else path,
        submodule_search_locations=[str(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)
    _GRAFTED[name] = module
    return module


def install_slicer_python(source: Path):
    """qt/ctk stand-ins, the qMRML widget names on ``slicer``, and Slicer's Python modules grafted on."""
    if "qt" not in sys.modules or not hasattr(sys.modules["qt"], "QDoubleSpinBox") \
            or sys.modules["qt"].QDoubleSpinBox is not qt_standins.QDoubleSpinBox:
        qt, ctk = mrml_standins.make_modules()
        sys.modules["qt"], sys.modules["ctk"] = qt, ctk
    for cls in mrml_standins.SLICER_WIDGET_CLASSES:
        setattr(slicer, cls.__name__, cls)
    if "slicer.i18n" not in sys.modules:
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        sys.modules["slicer.i18n"] = i18n
        slicer.i18n = i18n
    base = source / "Base" / "Python" / "slicer"
    _graft("slicer.parameterNodeWrapper", base / "parameterNodeWrapper", package=True)
    _graft("slicer.ScriptedLoadableModule", base / "ScriptedLoadableModule.py")
    _graft("slicer.packaging", base / "packaging.py")
    return slicer


def graft_sample_data(source: Path):
    """Slicer's SampleData module, importable as ``SampleData`` (as in the application)."""
    if "SampleData" not in _GRAFTED:
        spec = importlib.util.spec_from_file_location(
            "SampleData", source / "Modules" / "Scripted" / "SampleData" / "SampleData.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["SampleData"] = module
        spec.loader.exec_module(module)
        _GRAFTED["SampleData"] = module
    sys.modules["SampleData"] = _GRAFTED["SampleData"]
    return _GRAFTED["SampleData"]


# ----------------------------------------------------------------------------- a minimal application
class RecordingLogic:
    """Stands in for a module logic that draws (plots in the layout): records what it was asked."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


class ModuleEntry(types.SimpleNamespace):
    def logic(self):
        return self._logic

    def widgetRepresentation(self):
        return self._panel


class ModulePanel(mrml_standins.qMRMLWidget):
    """A module's panel (the application's qSlicerScriptedLoadableModuleWidget): ``reload()`` makes the
    module's Python widget again from its module as it now is and sets it up, as the application does at
    the end of ``slicer.util.reloadScriptedModule``."""

    def __init__(self, application, name):
        super().__init__()
        self.setLayout(qt_standins.QVBoxLayout())
        self.isEntered = True
        self.application, self.moduleName = application, name

    def reload(self):
        widget = getattr(sys.modules[self.moduleName], f"{self.moduleName}Widget")(self)
        widget.setup()
        self.application.register_widget(self.moduleName, widget, self)


class IOManager:
    """``slicer.app.coreIOManager()`` for the file types the tests load, through slicer-core's storage nodes."""

    def __init__(self, scene):
        self.scene = scene

    def fileType(self, path):
        return "SequenceFile" if ".seq." in os.path.basename(path) else "VolumeFile"

    def loadNodes(self, file_type, properties, loaded):
        if file_type != "SequenceFile":
            return False
        from DCEPKFittingLib import mrml as mrml_bridge

        node = mrml_bridge.load_sequence(self.scene, properties["fileName"], properties.get("name"))
        loaded.AddItem(node)
        return True


class FakeApplication:
    applicationName = "Slicer"
    documentationBaseUrl = "https://slicer.readthedocs.io/en/latest/"
    majorVersion, minorVersion = 5, 13

    def __init__(self, wired, cache_path, testing=False):
        self.wired = wired
        self.cachePath = str(cache_path)
        self.testing = testing
        self.connections = {}
        self.layout = None
        self._modules = {}
        self._io = IOManager(wired.scene)

    def testingEnabled(self):
        return self.testing

    def commandOptions(self):
        return types.SimpleNamespace(noMainWindow=True)

    def connect(self, signal, slot):
        self.connections.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal, slot):
        return True

    def emit(self, signal):
        for slot in self.connections.get(signal, []):
            slot()

    def moduleManager(self):
        return self

    def module(self, name):
        return self._modules.get(name)

    def moduleDocumentationUrl(self, name):
        return self.documentationBaseUrl + name

    def layoutManager(self):
        return self.layout

    def applicationLogic(self):
        return self.wired.app_logic

    def mainWindow(self):
        return None

    def coreIOManager(self):
        return self._io

    def setOverrideCursor(self, *args):
        pass

    def restoreOverrideCursor(self):
        pass

    def processEvents(self):
        pass

    def settings(self):
        return qt_standins.QSettings()

    userSettings = settings


class SlicerApplication:
    """Slicer's Python on a fresh slicer-core scene, with the DCEPK modules importable as in Slicer."""

    def __init__(self, monkeypatch, tmp_path, source: Path):
        self.source = source
        self.monkeypatch = monkeypatch
        install_slicer_python(source)
        self.wired = make_scene()
        self.scene = self.wired.scene
        self.crosshair = self._add_view_nodes()
        self.app = FakeApplication(self.wired, tmp_path / "cache")
        self.plots = RecordingLogic()
        self.errors = []
        self.widgets = []
        modules = types.SimpleNamespace()
        # The Colors module's logic is the Slicer-level colour logic (colour legends), as in the application.
        colours = slicer.vtkSlicerColorLogic()
        colours.SetMRMLApplicationLogic(self.wired.app_logic)
        colours.SetMRMLScene(self.scene)
        for name, logic in (("sequences", self.wired.sequences_logic), ("colors", colours),
                            ("markups", self.wired.markups_logic), ("segmentations", self.wired.segmentations_logic),
                            ("plots", self.plots)):
            setattr(modules, name, ModuleEntry(_logic=logic, path=""))
        for name in ("DCEPKFitting", "DCEPKInference"):
            entry = ModuleEntry(_logic=None, path=str(ROOT / name / f"{name}.py"))
            setattr(modules, name.lower(), entry)
            self.app._modules[name] = entry
        self.modules = modules
        monkeypatch.setattr(slicer, "app", self.app, raising=False)
        monkeypatch.setattr(slicer, "mrmlScene", self.scene, raising=False)
        monkeypatch.setattr(slicer, "modules", modules, raising=False)
        monkeypatch.setattr(slicer.util, "loadUI", mrml_standins.load_ui)
        monkeypatch.setattr(slicer.util, "errorDisplay",
                            lambda text, *args, **kwargs: self.errors.append(text))
        # Slicer's own loader for these names is the application's module path: imports come from the tree.
        for name in ("DCEPKFitting", "DCEPKInference"):
            monkeypatch.delitem(sys.modules, name, raising=False)

    def _add_view_nodes(self):
        """The singleton view nodes the application's layout keeps in every scene: the three slice views
        (slice and composite nodes), the layout and the crosshair."""
        def add(class_name, tag, **setters):
            node = self.scene.CreateNodeByClass(class_name)
            node.UnRegister(None)
            node.SetSingletonTag(tag)
            for setter, value in setters.items():
                getattr(node, setter)(value)
            return self.scene.AddNode(node)

        for view in ("Red", "Yellow", "Green"):
            add("vtkMRMLSliceNode", view, SetLayoutName=view)
            add("vtkMRMLSliceCompositeNode", view, SetLayoutName=view)
        add("vtkMRMLLayoutNode", "vtkMRMLLayoutNode")
        return add("vtkMRMLCrosshairNode", "default")

    def import_module(self, name: str):
        """The module file imported as Slicer imports it (fresh, under this application)."""
        self.monkeypatch.delitem(sys.modules, name, raising=False)
        module = importlib.import_module(name)
        self.monkeypatch.setitem(sys.modules, name, module)
        return module

    def module_parent(self, name: str):
        """What the application passes to a scripted module's ``__init__`` (its qSlicerScriptedLoadableModule)."""
        return types.SimpleNamespace(path=str(ROOT / name / f"{name}.py"))

    def create_widget(self, name: str, module=None):
        """The module's widget, set up as the application does when the module is first shown."""
        module = module or self.import_module(name)
        parent = ModulePanel(self, name)
        widget = getattr(module, f"{name}Widget")(parent)
        widget.setup()
        return self.register_widget(name, widget, parent)

    def register_widget(self, name, widget, parent):
        """As the application: ``slicer.modules.<name>Widget`` and the module's panel; cleaned up at ``close``."""
        setattr(self.modules, f"{name}Widget", widget)
        self.app._modules[name]._panel = parent
        self.widgets.append((widget, parent))
        return widget

    def close(self):
        """Unload the modules' widgets (cleanup, as when Slicer unloads them) and empty the scene."""
        for widget, parent in self.widgets:
            widget.cleanup()
            parent.setMRMLScene(None)
        self.scene.Clear(True)

    def save_and_reload(self, path: Path):
        """Save the scene to a .mrml file and load it into a new, equally wired scene (as File > Load Scene)."""
        self.scene.SetURL(str(path))
        assert self.scene.Commit(str(path)), f"saving the scene to {path} failed"
        reloaded = make_scene()
        reloaded.scene.SetURL(str(path))
        assert reloaded.scene.Import(), f"loading {path} failed"
        return reloaded


@pytest.fixture
def slicer_app(monkeypatch, tmp_path):
    application = SlicerApplication(monkeypatch, tmp_path, require_slicer_source())
    yield application
    application.close()
