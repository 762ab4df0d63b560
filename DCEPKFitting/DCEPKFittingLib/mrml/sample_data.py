"""The synthetic phantom in the scene (the Sample Data entry): series, tissue segments and AIF box."""

from typing import Dict, Mapping

import numpy as np
import slicer

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry
from .aif_roi import roi_around_mask
from .masks import segment_ids
from .sequences import REPETITION_TIME, sequence_from_series
from .volumes import set_image


def segmentation_from_labels(scene, labels: np.ndarray, geometry: Geometry, names: Mapping[int, str], name: str):
    """Segmentation node with one segment per label value (0 is background), named from ``names``."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels")
    try:
        set_image(labelmap, np.asarray(labels).astype(np.int16), geometry)
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation.CreateDefaultDisplayNodes()
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
            scene.RemoveNode(segmentation)
            raise DCEPKInputError(f"could not make segments from the label map '{name}'")
    finally:
        scene.RemoveNode(labelmap)  # only a vehicle for the import
    values = [int(v) for v in np.unique(labels) if v != 0]
    for segment_id, value in zip(segment_ids(segmentation), values):
        segmentation.GetSegmentation().GetSegment(segment_id).SetName(names.get(value, f"label {value}"))
    return segmentation


def phantom_to_scene(scene, phantom, name: str = "DCEPK phantom", sequences_logic=None) -> Dict[str, object]:
    """Put a ``phantom.Phantom`` into the scene: DCE sequence, VFA sequence, tissue and AIF segments, AIF ROI."""
    geometry = phantom.series.geometry
    nodes = {"sequence": sequence_from_series(scene, phantom.series, name, sequences_logic)}
    if phantom.vfa is not None:
        vfa = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{name} VFA")
        vfa.SetIndexName("flip angle")
        vfa.SetIndexUnit("deg")
        vfa.SetIndexType(vfa.NumericIndex)
        for n, angle in enumerate(phantom.vfa.flip_angles_deg):
            frame = slicer.vtkMRMLScalarVolumeNode()
            set_image(frame, np.asarray(phantom.vfa.signals[..., n], dtype=np.float32), geometry)
            vfa.SetDataNodeAtValue(frame, f"{float(angle):g}")
        vfa.SetAttribute(REPETITION_TIME, f"{1000.0 * phantom.vfa.tr_s:g}")
        nodes["vfa"] = vfa
    nodes["tissues"] = segmentation_from_labels(scene, phantom.labels, geometry, phantom.label_names,
                                                f"{name} tissues")
    nodes["aifSegmentation"] = segmentation_from_labels(scene, phantom.aif_mask.astype(np.int16), geometry,
                                                        {1: "AIF vessel"}, f"{name} AIF")
    nodes["aifRoi"] = roi_around_mask(scene, phantom.aif_mask, geometry, f"{name} AIF box")
    return nodes
