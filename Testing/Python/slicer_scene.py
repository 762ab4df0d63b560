"""A headless MRML scene wired like Slicer's application does it, for tests of the MRML bridges.

The PyPI wheel ``slicer-core`` has the real Slicer core libraries but no ``slicer.app`` and no
``slicer.mrmlScene``: module logics must be created and registered with the application logic by
hand (as ``qSlicerCoreApplication`` does at start-up). ``make_scene()`` does that for the logics the
DCEPK modules use; the ``slicer_scene`` fixture gives a fresh one per test. Reusable by the
DCEPKInference tests: ``from slicer_scene import slicer_scene  # noqa: F401`` in the test file.
"""

from dataclasses import dataclass

import pytest

from conftest import import_or_skip

slicer = import_or_skip("slicer", "slicer-core (pip install slicer-core) is needed for MRML bridge tests")


@dataclass
class SlicerScene:
    scene: object
    app_logic: object
    colour_logic: object
    volumes_logic: object
    sequences_logic: object
    segmentations_logic: object
    markups_logic: object
    tables_logic: object

    def node_ids(self) -> set:
        """IDs of every node in the scene: a cheap fingerprint to check a failed run added nothing."""
        return {self.scene.GetNthNode(n).GetID() for n in range(self.scene.GetNumberOfNodes())}

    def fingerprint(self) -> list:
        """Every node's ID, class, name and modification time: changes when anything is added or written."""
        nodes = [self.scene.GetNthNode(n) for n in range(self.scene.GetNumberOfNodes())]
        return sorted((node.GetID(), node.GetClassName(), node.GetName(), node.GetMTime()) for node in nodes)

    def nodes_by_class(self, class_name: str) -> list:
        collection = self.scene.GetNodesByClass(class_name)
        return [collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())]


def _register(app_logic, scene, name, logic):
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic(name, logic)
    return logic


def make_scene() -> SlicerScene:
    from vtkmodules.vtkCommonCore import vtkCollection

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    # The application logic owns a colour logic; it must see the scene before default tables exist.
    colour_logic = app_logic.GetColorLogic()
    colour_logic.SetMRMLScene(scene)
    colour_logic.AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    app_logic.SetModuleLogic("Colors", colour_logic)

    volumes_logic = _register(app_logic, scene, "Volumes", slicer.vtkSlicerVolumesLogic())
    sequences_logic = _register(app_logic, scene, "Sequences", slicer.vtkSlicerSequencesLogic())
    segmentations_logic = _register(app_logic, scene, "Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())
    markups_logic = _register(app_logic, scene, "Markups", slicer.vtkSlicerMarkupsLogic())
    tables_logic = _register(app_logic, scene, "Tables", slicer.vtkSlicerTablesLogic())
    return SlicerScene(scene, app_logic, colour_logic, volumes_logic, sequences_logic,
                       segmentations_logic, markups_logic, tables_logic)


@pytest.fixture
def slicer_scene():
    wired = make_scene()
    yield wired
    wired.scene.Clear(True)
