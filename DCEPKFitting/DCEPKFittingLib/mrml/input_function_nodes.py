"""The input function from scene nodes, for either module's Logic: an ``InputFunctionSpec`` from what
the panel chose (an ROI, label map or segmentation on a vessel, a CSV file, a population AIF, or
automatic detection), and automatic detection run on a series with its result put in the scene: the
voxels chosen as a segmentation (segments 'artery' and 'vein', editable in Segment Editor and usable
again as the AIF ROI) and the blood curve in a plot chart. Reads nodes only until it publishes."""

from typing import Dict, Optional, Tuple

import numpy as np

from ..core.errors import DCEPKInputError
from ..kinetics.aif_detection import ARTERY, VEIN
from .masks import mask_from_labelmap, mask_from_node, mask_from_segment, segment_ids
from .plots import plot_curves
from .sample_data import segmentation_from_labels
from .volumes import node_by_name

AIF_SOURCES = ("roi", "csv", "population", "auto")
DETECTED_NAME = "DCEPK AIF (detected)"
DETECTED_SEGMENTS = {ARTERY: "artery", VEIN: "vein"}


def roi_mask(roi, reference, label: int = 0) -> np.ndarray:
    """Bool [k, j, i] of an AIF ROI node on the series' grid: a markups ROI, a label map (``label`` > 0:
    only that value) or a segmentation (``label`` > 0: only its ``label``-th segment, e.g. 1 = 'artery'
    of the detected input function)."""
    if roi is None:
        raise DCEPKInputError("no AIF ROI chosen: choose a box, label map or segmentation on an artery or vein")
    label = int(label or 0)
    if label and roi.IsA("vtkMRMLLabelMapVolumeNode"):
        mask = mask_from_labelmap(roi, reference, label)
    elif label and roi.IsA("vtkMRMLSegmentationNode"):
        ids = segment_ids(roi)
        if label > len(ids):
            raise DCEPKInputError(f"segmentation '{roi.GetName()}' has {len(ids)} segment(s): no segment {label}")
        mask = mask_from_segment(roi, ids[label - 1], reference)
    else:
        return mask_from_node(roi, reference, "AIF ROI")
    if not mask.any():
        raise DCEPKInputError(f"label {label} of '{roi.GetName()}' holds no voxel of the DCE series")
    return mask


def input_function_from_nodes(reference, source: str, roi=None, roi_label: int = 0, csv_path: str = "",
                              population: str = "parker", auto_kind: str = "either", hct: float = 0.45,
                              blood_t10_s: Optional[float] = None):
    """The ``InputFunctionSpec`` of the panel's choice (``source``: one of ``AIF_SOURCES``), checked."""
    from ..pipeline.input_function import InputFunctionSpec

    if source not in AIF_SOURCES:
        raise DCEPKInputError(f"unknown input function source {source!r}: use one of {', '.join(AIF_SOURCES)}")
    if source == "csv":
        if not (csv_path or "").strip():
            raise DCEPKInputError("no AIF CSV file given: choose a file with time (s) and concentration (mM)")
        from ..kinetics.aif import load_aif_csv

        load_aif_csv(csv_path.strip())   # a missing or unreadable file is said now, not after a background start
    spec = InputFunctionSpec(
        aif_mask=roi_mask(roi, reference, roi_label) if source == "roi" else None,
        aif_csv=csv_path.strip() if source == "csv" else None, population_aif=population if source == "population"
        else None, auto_aif=auto_kind if source == "auto" else None, hct=hct,
        blood_t10_s=blood_t10_s or None)
    return spec.check()


def detect_input_function(series, t10_s, fa_deg, tr_s, r1_per_mM_s=None, kind: str = "either",
                          blood_t10_s: Optional[float] = None, baseline_frames: Optional[int] = None):
    """Automatic detection on ``series`` as ``dcepk fit --auto-aif`` runs it (the same baseline, noise
    level and blood T10 rules): ``pipeline.input_function.SignalInputFunction`` (label map, blood curve,
    notes). Pure: no scene access."""
    from ..pipeline.input_function import InputFunctionSpec, input_function_from_signal
    from ..signal import default_r1, detect_baseline_frames, rician

    spec = InputFunctionSpec(auto_aif=kind, blood_t10_s=blood_t10_s or None).check()
    fa_deg = fa_deg if fa_deg is not None else series.flip_angle_deg
    tr_s = tr_s if tr_s is not None else series.tr_s
    if fa_deg is None or tr_s is None or t10_s is None:
        raise DCEPKInputError("detecting the input function needs the flip angle, TR and T10 of the series")
    baseline = baseline_frames or detect_baseline_frames(series.signal, times_s=series.times_s)
    sigma = rician.estimate_noise_sigma(series.signal, baseline)
    return input_function_from_signal(series.signal, series.times_s, spec, t10_s=t10_s, fa_deg=fa_deg, tr_s=tr_s,
                                      r1_per_mM_s=r1_per_mM_s or default_r1(), baseline_frames=baseline,
                                      noise_sigma=sigma)


def chosen_segment(found) -> int:
    """The segment number (1-based) of the detected segmentation whose voxels make the curve (the
    ``roi_label`` that gives the same input function back from the segmentation)."""
    values = [int(v) for v in np.unique(found.label_map) if v]
    kind = VEIN if found.detection is not None and found.detection.kind == "vein" else ARTERY
    return values.index(kind) + 1 if kind in values else 0


def publish_detected_input_function(scene, found, times_s, geometry, previous=None, chart=None,
                                    name: str = DETECTED_NAME, segments=None, curves=None) -> Tuple:
    """(segmentation, chart): the detected voxels as a segmentation named ``name`` (segment names by label:
    ``segments``, default artery / vein; replacing ``previous``, the one an earlier run made) and the
    curves (mM) against time (s): ``curves`` {label: curve}, default the blood curve."""
    if found is None or found.label_map is None or not np.any(found.label_map):
        raise DCEPKInputError("no input function was detected: place an ROI on an artery or vein instead")
    segmentation = segmentation_from_labels(scene, found.label_map, geometry, segments or DETECTED_SEGMENTS, name)
    if previous is not None and previous.GetScene() is scene:
        scene.RemoveNode(previous)
    voxels = int(np.count_nonzero(found.label_map))
    chart = plot_curves(scene, name, np.asarray(times_s), curves or {f"blood, {voxels} voxels": found.blood_mM},
                        "time (s)", "concentration (mM)", chart=chart)
    return segmentation, chart


def publish_run_detection(scene, found, times_s, geometry, update_existing: bool = True, name: str = DETECTED_NAME,
                          segments=None, curves=None) -> Dict[str, object]:
    """After a run with automatic detection (``found``: the result's ``SignalInputFunction``, from a thread
    or read back from a child's files): ``{'input_function': segmentation, 'input_function_chart': chart}``
    (an earlier run's nodes, found by ``name``, replaced with ``update_existing``); {} when nothing was
    detected (another source). ``name``, ``segments``, ``curves``: as ``publish_detected_input_function``
    (image-only mode publishes the reader network's voxels and curve so)."""
    if found is None or found.label_map is None or not np.any(found.label_map):
        return {}
    previous = node_by_name(scene, "vtkMRMLSegmentationNode", name) if update_existing else None
    chart = node_by_name(scene, "vtkMRMLPlotChartNode", name) if update_existing else None
    segmentation, chart = publish_detected_input_function(scene, found, times_s, geometry, previous, chart, name,
                                                          segments, curves)
    return {"input_function": segmentation, "input_function_chart": chart}


def detect_scene_input_function(scene, sequence_node, fa_deg=None, tr_s=None, t10_s=None, t10_map=None,
                                t10_map_unit: str = "ms", kind: str = "either", blood_t10_s=None,
                                r1_per_mM_s=None) -> Tuple:
    """The Logics' Detect: ``detect_input_function`` on the sequence's series, published (an earlier
    detection's segmentation and chart reused by name); ``(segmentation, chart, chosen segment number)``."""
    from .scene_fit import require_acquisition, t10_map_seconds
    from .sequences import series_from_sequence
    from .volumes import reference_volume

    series = series_from_sequence(sequence_node)
    if series.kind == "concentration":
        raise DCEPKInputError("automatic detection reads a signal series (relative enhancement, noise): this series "
                              "is concentration")
    require_acquisition(fa_deg, series.flip_angle_deg, "flip angle", "flipAngle_deg (degrees)", "Flip angle")
    require_acquisition(tr_s, series.tr_s, "TR", "tr_s (seconds)", "TR")
    if t10_map is not None:
        t10_s = t10_map_seconds(t10_map, reference_volume(series.spatial_shape, series.geometry), t10_map_unit)
    found = detect_input_function(series, t10_s, fa_deg, tr_s, r1_per_mM_s, kind, blood_t10_s)
    segmentation, chart = publish_detected_input_function(
        scene, found, series.times_s, series.geometry, node_by_name(scene, "vtkMRMLSegmentationNode", DETECTED_NAME),
        node_by_name(scene, "vtkMRMLPlotChartNode", DETECTED_NAME))
    return segmentation, chart, chosen_segment(found)
