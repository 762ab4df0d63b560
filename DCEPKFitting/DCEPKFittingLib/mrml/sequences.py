"""DCE series in the scene: a volume sequence (or MultiVolume) <-> ``DCESeries``, frame times in seconds
(Slicer's ``MultiVolume.FrameLabels`` are milliseconds), FA and TR from the header, the series' grid."""

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import slicer

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry, check_same_grid
from ..io import TIME_UNITS_TO_S, DCESeries
from .masks import segment_ids
from .volumes import set_image, volume_array, volume_geometry


FRAME_LABELS = "MultiVolume.FrameLabels"
FRAME_LABEL_UNITS = "MultiVolume.FrameIdentifyingDICOMTagUnits"
FLIP_ANGLE = "MultiVolume.DICOM.FlipAngle"  # degrees
REPETITION_TIME = "MultiVolume.DICOM.RepetitionTime"  # ms


KIND_ATTRIBUTE = "DCEPK.SeriesKind"  # "signal" (default) or "concentration" (mM)


def _attribute(nodes, name: str) -> Optional[str]:
    for node in nodes:
        if node is not None and node.GetAttribute(name):
            return node.GetAttribute(name)
    return None


def _parse_numbers(text: str, what: str) -> np.ndarray:
    try:
        return np.array([float(value) for value in text.replace(";", ",").split(",") if value.strip()])
    except ValueError:
        raise DCEPKInputError(f"cannot read the {what} '{text[:60]}...' as numbers: fix the attribute or "
                              "set the sequence's index values to the frame times") from None


def _unit_seconds(unit: str, where: str) -> float:
    """Seconds per ``unit`` (Slicer writes "ms" for DICOM trigger times; users type any unit DCEPK knows)."""
    key = (unit or "").strip().lower()
    if key not in TIME_UNITS_TO_S:
        raise DCEPKInputError(
            f"the {where} has time unit '{unit}', which is not a time unit DCEPK knows: "
            "set it to ms, s or min (Sequences module: index unit)")
    return TIME_UNITS_TO_S[key]


def _frame_times_s(sequence_node, first_frame, n_frames: int) -> Tuple[np.ndarray, str]:
    """Frame times in seconds and where they came from."""
    labels = _attribute((sequence_node, first_frame), FRAME_LABELS)
    if labels:
        times = _parse_numbers(labels, FRAME_LABELS)
        if times.size != n_frames:
            raise DCEPKInputError(
                f"{FRAME_LABELS} has {times.size} values for {n_frames} frames: fix the attribute "
                "so it has one time (ms) per frame")
        unit = _attribute((sequence_node, first_frame), FRAME_LABEL_UNITS) or "ms"
        return times * _unit_seconds(unit, f"{FRAME_LABELS} attribute"), FRAME_LABELS
    unit = sequence_node.GetIndexUnit()
    if not unit:
        raise DCEPKInputError(
            f"sequence '{sequence_node.GetName()}' has no frame times: its index '{sequence_node.GetIndexName()}' "
            f"has no unit and there is no {FRAME_LABELS} attribute. Set the index unit (ms, s or min) and "
            "numeric index values in the Sequences module, or load the series from DICOM/MultiVolume NRRD")
    values = _parse_numbers(",".join(sequence_node.GetNthIndexValue(n) for n in range(n_frames)),
                            "sequence index values")
    return values * _unit_seconds(unit, f"sequence '{sequence_node.GetName()}' index"), "index values"


def _resolve_sequence(node):
    if node is None:
        raise DCEPKInputError("no DCE series selected: choose the volume sequence (or its sequence browser)")
    if node.IsA("vtkMRMLSequenceBrowserNode"):
        sequence = node.GetMasterSequenceNode()
        if sequence is None:
            raise DCEPKInputError(f"sequence browser '{node.GetName()}' has no sequence: choose a volume sequence")
        return sequence
    if node.IsA("vtkMRMLSequenceNode"):
        return node
    scene = node.GetScene()
    if scene is not None and node.IsA("vtkMRMLVolumeNode"):
        # The volume shown in the views is a sequence browser's proxy: use the sequence behind it.
        browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
        for n in range(browsers.GetNumberOfItems()):
            sequence = browsers.GetItemAsObject(n).GetSequenceNode(node)
            if sequence is not None:
                return sequence
    raise DCEPKInputError(
        f"'{node.GetName()}' is a {node.GetClassName()}, not a DCE series: choose the volume sequence "
        "(or its browser) that holds the dynamic frames")


def _frames_from_sequence(sequence) -> Tuple[np.ndarray, Geometry]:
    """All frames of a volume sequence as float32 ``[k, j, i, n]`` and their common geometry."""
    n_frames = sequence.GetNumberOfDataNodes()
    frames, geometry, shape = [], None, None
    for n in range(n_frames):
        frame = sequence.GetNthDataNode(n)
        if frame is None or not frame.IsA("vtkMRMLScalarVolumeNode") or frame.IsA("vtkMRMLLabelMapVolumeNode"):
            kind = frame.GetClassName() if frame is not None else "nothing"
            raise DCEPKInputError(
                f"frame {n} of sequence '{sequence.GetName()}' is {kind}, not a scalar volume: "
                "choose a sequence of scalar (grey-level) volumes")
        array = volume_array(frame)
        if array.ndim != 3:
            raise DCEPKInputError(
                f"frame {n} of sequence '{sequence.GetName()}' has {array.shape[-1]} components per voxel: "
                "DCEPK needs single-component (scalar) frames")
        frame_geometry = volume_geometry(frame)
        if geometry is None:
            geometry, shape = frame_geometry, array.shape
        else:
            check_same_grid(shape, geometry, array.shape, frame_geometry, "first frame", f"frame {n}")
        frames.append(array.astype(np.float32, copy=False))
    return np.stack(frames, axis=-1), geometry


def series_from_sequence(node) -> DCESeries:
    """A ``DCESeries`` from a volume sequence, its sequence browser, or a legacy MultiVolume node.

    Frame times come from ``MultiVolume.FrameLabels`` (ms) on the sequence or its first frame,
    else from the index values and index unit. FA and TR come from the MultiVolume DICOM attributes
    when present (TR converted from ms to s). Every frame must share one voxel grid.
    """
    if node is not None and node.IsA("vtkMRMLMultiVolumeNode"):
        return _series_from_multivolume(node)
    sequence = _resolve_sequence(node)
    n_frames = sequence.GetNumberOfDataNodes()
    if n_frames < 2:
        raise DCEPKInputError(
            f"sequence '{sequence.GetName()}' has {n_frames} frame(s): a DCE series needs the whole dynamic series")
    signal, geometry = _frames_from_sequence(sequence)
    first = sequence.GetNthDataNode(0)
    times_s, timing_source = _frame_times_s(sequence, first, n_frames)
    return DCESeries(
        signal=signal,
        times_s=times_s,
        geometry=geometry,
        flip_angle_deg=_optional_number((sequence, first), FLIP_ANGLE, 1.0),
        tr_s=_optional_number((sequence, first), REPETITION_TIME, 1e-3),
        kind=sequence.GetAttribute(KIND_ATTRIBUTE) or "signal",
        metadata={"source": sequence.GetName(), "sequence_id": sequence.GetID(), "timing": timing_source},
    )


def vfa_from_sequence(node, flip_angles_deg: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, list, Geometry]:
    """Variable-flip-angle signals ``[k, j, i, n]``, their flip angles (degrees) and geometry.

    Flip angles are given, or read from the sequence index when its unit is degrees.
    """
    sequence = _resolve_sequence(node)
    signals, geometry = _frames_from_sequence(sequence)
    n = signals.shape[-1]
    if flip_angles_deg is None or len(flip_angles_deg) == 0:
        if (sequence.GetIndexUnit() or "").strip().lower() not in ("deg", "degree", "degrees", "\u00b0"):
            raise DCEPKInputError(
                f"the flip angles of VFA sequence '{sequence.GetName()}' are unknown: type them (degrees, "
                "comma-separated) or set the sequence index unit to 'deg' with the angles as index values")
        flip_angles_deg = _parse_numbers(",".join(sequence.GetNthIndexValue(m) for m in range(n)), "flip angles")
    flip_angles_deg = [float(a) for a in flip_angles_deg]
    if len(flip_angles_deg) != n:
        raise DCEPKInputError(f"{len(flip_angles_deg)} flip angles for {n} VFA volumes: give one angle per volume")
    if n < 2:
        raise DCEPKInputError("a T1 map by variable flip angle needs at least two flip angles")
    return signals, flip_angles_deg, geometry


def _optional_number(nodes, name: str, scale: float) -> Optional[float]:
    text = _attribute(nodes, name)
    if not text:
        return None
    try:
        return float(text.split(",")[0]) * scale
    except ValueError:
        return None  # a malformed optional header value is the same as a missing one: the user types it


def _series_from_multivolume(node) -> DCESeries:
    """Legacy MultiVolumeExplorer node: one image whose components are the frames."""
    array = volume_array(node)
    if array.ndim != 4:
        raise DCEPKInputError(f"MultiVolume '{node.GetName()}' has a single frame: load the whole dynamic series")
    labels = node.GetAttribute(FRAME_LABELS)
    if not labels:
        raise DCEPKInputError(f"MultiVolume '{node.GetName()}' has no {FRAME_LABELS} attribute (frame times in ms)")
    times = _parse_numbers(labels, FRAME_LABELS) * _unit_seconds(node.GetAttribute(FRAME_LABEL_UNITS) or "ms",
                                                                 f"{FRAME_LABELS} attribute")
    return DCESeries(signal=array.astype(np.float32, copy=False), times_s=times, geometry=volume_geometry(node),
                     flip_angle_deg=_optional_number((node,), FLIP_ANGLE, 1.0),
                     tr_s=_optional_number((node,), REPETITION_TIME, 1e-3),
                     metadata={"source": node.GetName(), "timing": FRAME_LABELS})


def sequence_from_series(scene, series: DCESeries, name: str, sequences_logic=None):
    """Volume sequence node holding ``series`` (index: time in s; FrameLabels in ms, as Slicer writes).

    With ``sequences_logic`` a sequence browser and its proxy volume are made too, so the series
    shows in the views (in Slicer: ``slicer.modules.sequences.logic()``).
    """
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    sequence.SetIndexType(sequence.NumericIndex)
    for t, time_s in enumerate(series.times_s):
        frame = slicer.vtkMRMLScalarVolumeNode()
        frame.SetName(f"{name}_{t:03d}")
        set_image(frame, np.asarray(series.signal[..., t], dtype=np.float32), series.geometry)
        sequence.SetDataNodeAtValue(frame, f"{time_s:.6g}")
    sequence.SetAttribute(FRAME_LABELS, ",".join(f"{1000.0 * t:.6g}" for t in series.times_s))
    sequence.SetAttribute(FRAME_LABEL_UNITS, "ms")
    sequence.SetAttribute("MultiVolume.NumberOfFrames", str(series.n_frames))
    sequence.SetAttribute(KIND_ATTRIBUTE, series.kind)
    if series.flip_angle_deg is not None:
        sequence.SetAttribute(FLIP_ANGLE, f"{series.flip_angle_deg:g}")
    if series.tr_s is not None:
        sequence.SetAttribute(REPETITION_TIME, f"{1000.0 * series.tr_s:g}")
    if sequences_logic is not None:
        browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        sequences_logic.UpdateProxyNodesFromSequences(browser)
    return sequence


def load_sequence(scene, path: str, name: Optional[str] = None):
    """Read a 4-D NRRD (Slicer MultiVolume or volume sequence file) into a new volume sequence node."""
    if not os.path.isfile(path):
        raise DCEPKInputError(f"{path} does not exist: check the file name")
    name = name or os.path.basename(path).split(".")[0]
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeSequenceStorageNode")
    storage.SetFileName(path)
    sequence.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(sequence):
        scene.RemoveNode(sequence)
        scene.RemoveNode(storage)
        raise DCEPKInputError(f"{path} could not be read as a volume sequence: give a 4-D NRRD (MultiVolume) file")
    return sequence


def acquisition_from_sequence(node) -> Tuple[Optional[float], Optional[float]]:
    """(flip angle in degrees, TR in seconds) from the series' MultiVolume DICOM attributes, None where absent."""
    sequence = _resolve_sequence(node)
    first = sequence.GetNthDataNode(0) if sequence.GetNumberOfDataNodes() else None
    return (_optional_number((sequence, first), FLIP_ANGLE, 1.0),
            _optional_number((sequence, first), REPETITION_TIME, 1e-3))


def series_header(sequence_node, vfa_sequence=None, aif_segmentation=None):
    """``panel_state.SeriesHeader`` of the nodes a panel has selected: attributes only, no voxels read.

    A series that cannot be resolved gives a header whose ``error`` says why (shown in the panel).
    """
    from ..panels.panel_state import SeriesHeader

    segments = tuple(segment_ids(aif_segmentation)) if aif_segmentation is not None else ()
    if sequence_node is None:
        return SeriesHeader(aif_segment_ids=segments)
    try:
        fa_deg, tr_s = acquisition_from_sequence(sequence_node)
        kind = _resolve_sequence(sequence_node).GetAttribute(KIND_ATTRIBUTE) or "signal"
        vfa_tr_s = acquisition_from_sequence(vfa_sequence)[1] if vfa_sequence is not None else None
    except DCEPKInputError as error:
        return SeriesHeader(error=str(error), aif_segment_ids=segments)
    return SeriesHeader(flip_angle_deg=fa_deg, tr_s=tr_s, kind=kind, vfa_tr_s=vfa_tr_s, aif_segment_ids=segments)


def series_grid(node) -> Tuple[Tuple[int, int, int], Geometry]:
    """(shape [k, j, i], geometry) of a series' first frame, without reading the other frames."""
    sequence = _resolve_sequence(node)
    first = sequence.GetNthDataNode(0) if sequence.GetNumberOfDataNodes() else None
    if first is None or first.GetImageData() is None:
        raise DCEPKInputError(f"sequence '{sequence.GetName()}' has no image: load the DCE series first")
    return tuple(reversed(first.GetImageData().GetDimensions())), volume_geometry(first)


def voxel_index_at_ras(geometry: Geometry, shape, ras) -> Optional[Tuple[int, int, int]]:
    """(k, j, i) of the voxel containing RAS point ``ras``, or None outside the grid."""
    ijk = np.linalg.solve(geometry.ijk_to_ras(), np.r_[np.asarray(ras, float)[:3], 1.0])[:3]
    i, j, k = (int(v) for v in np.floor(ijk + 0.5))
    if not (0 <= k < shape[0] and 0 <= j < shape[1] and 0 <= i < shape[2]):
        return None
    return k, j, i
