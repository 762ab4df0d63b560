"""MRML bridge: Slicer scene nodes <-> the pure core's arrays, series, masks and tables.

Imports ``slicer`` and VTK, never ``qt``: it runs in Slicer and under the headless ``slicer-core``
wheel (tests). No other core module imports it. Every function takes the nodes (and the scene
where it creates nodes) explicitly, so nothing here relies on ``slicer.mrmlScene`` or ``slicer.app``.

Conventions (see docs/ARCHITECTURE.md): arrays ``[k, j, i]``, series ``[k, j, i, t]``, geometry
through ``Geometry.from_ijk_to_ras`` / ``ijk_to_ras()``, times in seconds (Slicer's
``MultiVolume.FrameLabels`` are milliseconds and are converted here), TR in seconds, FA in degrees.
"""

import inspect
import itertools
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import slicer
import vtk
from vtkmodules.util import numpy_support

from ..io.dce_io import TIME_UNITS_TO_S, DCESeries
from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry, check_same_grid
from ..analysis.stats import label_statistics

FRAME_LABELS = "MultiVolume.FrameLabels"
FRAME_LABEL_UNITS = "MultiVolume.FrameIdentifyingDICOMTagUnits"
FLIP_ANGLE = "MultiVolume.DICOM.FlipAngle"  # degrees
REPETITION_TIME = "MultiVolume.DICOM.RepetitionTime"  # ms
OUTPUT_MAP_ATTRIBUTE = "DCEPK.Map"  # marks map volumes this extension wrote (value: map name)
UNITS_ATTRIBUTE = "DCEPK.Units"
KIND_ATTRIBUTE = "DCEPK.SeriesKind"  # "signal" (default) or "concentration" (mM)



# --------------------------------------------------------------------------- geometry / arrays
def volume_geometry(volume_node) -> Geometry:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return Geometry.from_ijk_to_ras(slicer.util.arrayFromVTKMatrix(matrix))


def volume_array(volume_node) -> np.ndarray:
    """Copy of the voxels as ``[k, j, i]`` (or ``[k, j, i, c]`` for multi-component images)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "None"
        raise DCEPKInputError(f"volume '{name}' has no voxel data: load the image first")
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    shape = tuple(reversed(image.GetDimensions()))
    components = image.GetNumberOfScalarComponents()
    return np.array(scalars.reshape(shape + ((components,) if components > 1 else ())))


def _set_image(volume_node, array: np.ndarray, geometry: Geometry) -> None:
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    # Deep copy: the node must not alias a numpy buffer that the caller may change or free.
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    volume_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(geometry.ijk_to_ras()))
    volume_node.SetAndObserveImageData(image)


# --------------------------------------------------------------------------- series
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
        _set_image(frame, np.asarray(series.signal[..., t], dtype=np.float32), series.geometry)
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


# --------------------------------------------------------------------------- output maps
_INFERNO = ((0.001, 0.0, 0.014), (0.129, 0.047, 0.291), (0.342, 0.062, 0.429), (0.541, 0.135, 0.415),
            (0.736, 0.216, 0.33), (0.894, 0.353, 0.194), (0.978, 0.558, 0.035), (0.975, 0.798, 0.206),
            (0.988, 0.998, 0.645))
_VIRIDIS = ((0.267, 0.005, 0.329), (0.279, 0.175, 0.483), (0.23, 0.322, 0.546), (0.173, 0.449, 0.558),
            (0.128, 0.567, 0.551), (0.158, 0.684, 0.502), (0.369, 0.789, 0.383), (0.678, 0.864, 0.19),
            (0.993, 0.906, 0.144))
_PERCEPTUAL = {"Inferno": _INFERNO, "Viridis": _VIRIDIS}


def default_colour_for_map(map_name: str) -> str:
    """Colour table name per map: perceptual tables for parameters, discrete for status, grey for R2."""
    if map_name == "status":
        return "status"
    if map_name == "R2":
        return "Grey"
    if map_name.endswith("_se") or map_name.endswith("_sd") or map_name == "rmse":
        return "Viridis"
    return "Inferno"


def _node_by_name(scene, class_name: str, name: str):
    collection = scene.GetNodesByClassByName(class_name, name)
    return collection.GetItemAsObject(0) if collection.GetNumberOfItems() else None


def colour_node(scene, colour: str):
    """Colour node for ``colour``: Slicer's own table of that name if the scene has it, else one made here.

    Slicer's full build has Inferno/Viridis tables (from colour files); the headless core has not,
    so an equivalent 256-entry table is built once and reused. ``"status"`` gives the fit status table.
    """
    if colour == "status":
        return status_colour_table(scene)
    existing = _node_by_name(scene, "vtkMRMLColorNode", colour)
    if existing is not None:
        return existing
    if colour not in _PERCEPTUAL:
        raise DCEPKInputError(f"unknown colour table '{colour}': use one of Inferno, Viridis, Grey or status")
    own_name = f"DCEPK {colour}"
    table = _node_by_name(scene, "vtkMRMLColorTableNode", own_name)
    if table is None:
        anchors = np.array(_PERCEPTUAL[colour])
        table = slicer.vtkMRMLColorTableNode()
        table.SetName(own_name)
        table.SetTypeToUser()
        table.SetHideFromEditors(False)
        table.SetNumberOfColors(256)
        position = np.linspace(0.0, 1.0, anchors.shape[0])
        for n, x in enumerate(np.linspace(0.0, 1.0, 256)):
            rgb = [float(np.interp(x, position, anchors[:, c])) for c in range(3)]
            table.SetColor(n, f"{n}", rgb[0], rgb[1], rgb[2], 1.0)
        scene.AddNode(table)
    return table


STATUS_TABLE = "DCEPK fit status"
# Colours of the fit statuses the module knows by name (masked voxels are transparent over the
# anatomy); a status the core adds later takes the next spare colour, so it shows without a change here.
_STATUS_RGBA = {"MASKED": (0.0, 0.0, 0.0, 0.0), "CONVERGED": (0.2, 0.7, 0.3, 1.0),
                "HIT_BOUND": (0.95, 0.6, 0.1, 1.0), "FAILED": (0.85, 0.15, 0.15, 1.0),
                "INVALID_INPUT": (0.6, 0.3, 0.7, 1.0)}
_SPARE_RGBA = ((0.3, 0.55, 0.95, 1.0), (0.9, 0.9, 0.2, 1.0), (0.3, 0.8, 0.9, 1.0), (0.95, 0.45, 0.7, 1.0),
               (0.55, 0.55, 0.55, 1.0), (0.55, 0.35, 0.2, 1.0))


def status_entries(status_enum=None) -> list:
    """``[(code, name, rgba)]``, one per member of ``fitting.FitStatus`` (or ``status_enum``), in code order."""
    if status_enum is None:
        from ..kinetics.fitting import FitStatus as status_enum
    spare = itertools.cycle(_SPARE_RGBA)
    return [(int(member), member.name.lower().replace("_", " "), _STATUS_RGBA.get(member.name) or next(spare))
            for member in sorted(status_enum, key=int)]


def status_colour_table(scene, status_enum=None):
    """The fit status colour table (names and codes from the enum; a code the enum lacks is transparent)."""
    table = _node_by_name(scene, "vtkMRMLColorTableNode", STATUS_TABLE)
    if table is None:
        table = slicer.vtkMRMLColorTableNode()
        table.SetName(STATUS_TABLE)
        table.SetTypeToUser()
        scene.AddNode(table)
    entries = status_entries(status_enum)
    table.SetNumberOfColors(max(code for code, _, _ in entries) + 1)
    for code in range(table.GetNumberOfColors()):
        table.SetColor(code, "unused", 0.0, 0.0, 0.0, 0.0)
    for code, name, rgba in entries:
        table.SetColor(code, name, *rgba)
    return table


def hide_nan_voxels(display, array) -> None:
    """Voxels without a value (NaN: masked, failed, excluded) are drawn transparent over the anatomy.

    Display thresholding keeps voxels within [lower, upper]; NaN compares false, so its alpha is 0.
    """
    if display is None or not hasattr(display, "SetApplyThreshold"):
        return
    has_nan = bool(np.isnan(array).any())
    display.SetAutoThreshold(False)
    if has_nan:
        display.SetLowerThreshold(-1e30)
        display.SetUpperThreshold(1e30)
    display.SetApplyThreshold(has_nan)


def robust_window(array: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.0) -> Tuple[float, float]:
    """(lower, upper) display range from percentiles of the finite voxels, so outliers do not wash it out."""
    finite = np.asarray(array, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lower, upper = np.percentile(finite, [low_percentile, high_percentile])
    if upper <= lower:
        upper = lower + max(abs(lower) * 1e-3, 1e-6)
    return float(lower), float(upper)


def update_volume_from_array(scene, array: np.ndarray, geometry: Geometry, name: str, existing_node=None,
                             colour: Optional[str] = None, window_level: Optional[Tuple[float, float]] = None,
                             units: str = "", map_name: Optional[str] = None):
    """Write a ``[k, j, i]`` map into ``existing_node`` (updated in place) or a new volume node.

    The node gets the source ``geometry``, a display node with the colour table ``colour``
    (default per map name, see ``default_colour_for_map``) and ``window_level`` = (lower, upper)
    (default: 1st-99th percentile of the finite voxels); NaN voxels are transparent. The status map
    becomes a label map (uint8) with the fit status colour table, so each voxel shows its status name.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise DCEPKInputError(f"map '{name}' must be a 3-D array [k, j, i]; got shape {array.shape}")
    map_name = map_name or name
    colour = colour or default_colour_for_map(map_name)
    if colour == "status":
        array = array.astype(np.uint8, copy=False)
    elif array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float32)
    node = existing_node
    if node is None or node.GetScene() is not scene:
        node_class = "vtkMRMLLabelMapVolumeNode" if colour == "status" else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(node_class, name)
    else:
        node.SetName(name)
    _set_image(node, array, geometry)
    node.SetAttribute(OUTPUT_MAP_ATTRIBUTE, map_name)
    node.SetAttribute(UNITS_ATTRIBUTE, units or "")
    display = node.GetDisplayNode()
    if display is None:
        display_class = "vtkMRMLLabelMapVolumeDisplayNode" if node.IsA("vtkMRMLLabelMapVolumeNode") \
            else "vtkMRMLScalarVolumeDisplayNode"
        display = scene.AddNewNodeByClass(display_class)
        node.SetAndObserveDisplayNodeID(display.GetID())
    display.SetAndObserveColorNodeID(colour_node(scene, colour).GetID())
    if not display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        return node  # a label map display shows each code in its table colour: no window
    display.AutoWindowLevelOff()
    if colour == "status":
        # Half a code beyond each end puts every integer code at the centre of its own colour bin.
        lower, upper = -0.5, display.GetColorNode().GetNumberOfColors() - 0.5
        display.SetInterpolate(False)
    else:
        lower, upper = window_level if window_level is not None else robust_window(array)
        hide_nan_voxels(display, array)
    display.SetWindowLevelMinMax(lower, upper)
    return node


def find_output_node(scene, name: str):
    """The map volume this extension wrote under ``name`` before, or None (re-runs update it)."""
    collection = scene.GetNodesByClassByName("vtkMRMLScalarVolumeNode", name)
    for n in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(n)
        if node.GetAttribute(OUTPUT_MAP_ATTRIBUTE):
            return node
    return None


# --------------------------------------------------------------------------- masks
def _voxel_centres_ras(reference_volume_node) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    shape = volume_array(reference_volume_node).shape[:3]
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)], axis=0)
    ras = volume_geometry(reference_volume_node).ijk_to_ras() @ ijk1
    world = _parent_to_world(reference_volume_node) @ ras
    return world[:3].T, shape


def _parent_to_world(node) -> np.ndarray:
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise DCEPKInputError(
            f"'{node.GetName()}' is under a non-linear transform: harden the transform first (Transforms module)")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def mask_from_roi(roi_node, reference_volume_node) -> np.ndarray:
    """Bool ``[k, j, i]``: voxels of the reference grid whose centres lie inside the (possibly rotated) ROI box."""
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise DCEPKInputError("no ROI selected: place a markups ROI (box) over the artery or region")
    centres, shape = _voxel_centres_ras(reference_volume_node)
    object_to_world = slicer.util.arrayFromVTKMatrix(roi_node.GetObjectToWorldMatrix())
    world_to_object = np.linalg.inv(object_to_world)
    points = (world_to_object @ np.c_[centres, np.ones(len(centres))].T)[:3].T
    bounds = [0.0] * 6
    roi_node.GetObjectBounds(bounds)
    lower, upper = np.array(bounds[0::2]), np.array(bounds[1::2])
    # A hair of tolerance: voxel centres exactly on a face count as inside, whatever the rounding.
    tolerance = 1e-6 * max(1.0, float(np.max(np.abs(upper - lower))))
    inside = np.all((points >= lower - tolerance) & (points <= upper + tolerance), axis=1)
    return inside.reshape(shape)


def mask_from_labelmap(labelmap_node, reference_volume_node, label: Optional[int] = None) -> np.ndarray:
    """Bool ``[k, j, i]`` of a labelmap on the reference grid: ``label`` or, by default, any label > 0."""
    if labelmap_node is None:
        raise DCEPKInputError("no label map selected")
    labels = volume_array(labelmap_node)
    reference_shape = volume_array(reference_volume_node).shape[:3]
    check_same_grid(reference_shape, volume_geometry(reference_volume_node), labels.shape,
                    volume_geometry(labelmap_node), f"volume '{reference_volume_node.GetName()}'",
                    f"label map '{labelmap_node.GetName()}'")
    return labels > 0 if label is None else labels == int(label)


def segment_ids(segmentation_node) -> list:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def mask_from_segment(segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """Bool ``[k, j, i]``: the segment resampled (nearest neighbour) onto the reference volume's grid."""
    if segmentation_node is None:
        raise DCEPKInputError("no segmentation selected")
    if segmentation_node.GetParentTransformNode() is not None:
        raise DCEPKInputError(f"segmentation '{segmentation_node.GetName()}' is under a transform: harden the "
                              "transform first (Transforms module)")
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSegment(segment_id) is None:
        raise DCEPKInputError(f"segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'")
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(binary):
        # Convert a copy: reading a mask must not change the user's segmentation.
        copy = slicer.vtkSegmentation()
        copy.DeepCopy(segmentation)
        if not copy.CreateRepresentation(binary):
            raise DCEPKInputError(f"segmentation '{segmentation_node.GetName()}' cannot be converted to a "
                                  "binary labelmap: check it in the Segmentations module")
        segmentation = copy
    segment = segmentation.GetSegment(segment_id)
    segment_image = segment.GetRepresentation(binary)
    if segment_image is None or segment_image.IsEmpty():
        raise DCEPKInputError(f"segment '{segment.GetName()}' is empty: paint it first")
    reference_image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
        reference_volume_node)
    resampled = slicer.vtkOrientedImageData()
    # Done in vtkOrientedImageData space (no temporary nodes), so the scene is never touched.
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        segment_image, reference_image, resampled, False, False)
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    values = values.reshape(tuple(reversed(resampled.GetDimensions())))
    # Segments share labelmap layers: this segment is the voxels holding its own label value.
    return np.array(values == segment.GetLabelValue())


def segment_masks(segmentation_node, reference_volume_node, ids: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """``{segment name: bool [k, j, i]}`` for the given (default: all) segments."""
    segmentation = segmentation_node.GetSegmentation()
    return {segmentation.GetSegment(sid).GetName(): mask_from_segment(segmentation_node, sid, reference_volume_node)
            for sid in (ids if ids is not None else segment_ids(segmentation_node))}


def mean_curve_in_mask(series: DCESeries, mask: np.ndarray) -> np.ndarray:
    """Mean time curve (T,) of the masked voxels (voxels with any non-finite frame left out), as ``aif.aif_from_roi``."""
    from ..kinetics.aif import aif_from_roi

    mask = np.asarray(mask, dtype=bool)
    check_same_grid(series.spatial_shape, None, mask.shape, None, "DCE series", "ROI")
    if not mask.any():
        raise DCEPKInputError("the ROI holds no voxel of the series: move it over the vessel")
    # Only the ROI's curves go to aif_from_roi (as an N x 1 x 1 grid): the live plot redraws this on
    # every ROI move and must not copy the whole series each time.
    curves = np.asarray(series.signal[mask])
    return np.asarray(aif_from_roi(curves[:, None, None, :], np.ones((curves.shape[0], 1, 1), bool)), dtype=np.float64)


# --------------------------------------------------------------------------- statistics table
Regions = Union[Mapping[str, np.ndarray], Tuple[np.ndarray, Mapping[int, str]]]


def _core_label_statistics(maps, labels, names, label_values=None, status=None) -> list:
    """``stats.label_statistics``; the fit status map goes along when the core takes one (it then adds
    voxel counts per status to each row). Whatever columns the core returns reach the table."""
    kwargs = {"label_values": label_values} if label_values is not None else {}
    if status is not None and "status" in inspect.signature(label_statistics).parameters:
        kwargs["status"] = status
    return label_statistics(maps, labels, names, **kwargs)


def statistics_rows(maps: Mapping[str, np.ndarray], regions: Regions, status=None) -> list:
    """Rows of ``stats.label_statistics`` for named masks ``{name: bool}`` or ``(labels, {value: name})``.

    Masks may overlap (segments often do), so each mask is summarised on its own.
    """
    if isinstance(regions, tuple):
        labels, names = regions
        return _core_label_statistics(maps, np.asarray(labels), names, status=status)
    rows = []
    for value, (name, mask) in enumerate(regions.items(), start=1):
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            raise DCEPKInputError(f"segment '{name}' is empty on the maps' grid: paint it or pick another")
        for row in _core_label_statistics(maps, mask.astype(np.int32), {1: name}, [1], status):
            row["label"] = value
            rows.append(row)
    return rows


def statistics_table(scene, maps: Mapping[str, np.ndarray], regions: Regions, name: str = "DCEPK statistics",
                     existing_table=None, units: Optional[Mapping[str, str]] = None, status=None):
    """Table node with one row per (segment, map): segment, label, map, unit, then every column the
    core's statistics give (count, NaN count, mean, SD, median, IQR, p05, p95, ...)."""
    rows = statistics_rows(maps, regions, status)
    if not rows:
        raise DCEPKInputError("no statistics: the segments or labels hold no voxels")
    rows = [dict(row, unit=(units or {}).get(row["map"], "")) for row in rows]
    leading = ["segment", "label", "map", "unit"]
    columns = leading + [c for c in dict.fromkeys(k for row in rows for k in row) if c not in leading]
    return table_from_rows(scene, rows, name, existing_table, columns)


def table_from_rows(scene, rows: list, name: str, existing_table=None, columns=None):
    """Table node (new, or ``existing_table`` updated in place) from a list of dicts: text columns for
    strings, integer columns for ints, double columns for everything else (a missing value is NaN)."""
    if not rows:
        raise DCEPKInputError("no statistics: the segments hold no voxel")
    columns = list(columns or rows[0].keys())
    vtk_table = vtk.vtkTable()
    for column in columns:
        present = [row[column] for row in rows if column in row]
        integers = len(present) == len(rows) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present)
        array = vtk.vtkStringArray() if isinstance(present[0], str) else \
            vtk.vtkIntArray() if integers else vtk.vtkDoubleArray()
        array.SetName(column)
        array.SetNumberOfValues(len(rows))
        for r, row in enumerate(rows):
            value = row.get(column, "" if isinstance(array, vtk.vtkStringArray) else float("nan"))
            array.SetValue(r, value if isinstance(array, vtk.vtkStringArray) else
                           int(value) if isinstance(array, vtk.vtkIntArray) else float(value))
        vtk_table.AddColumn(array)
    table = existing_table if existing_table is not None and existing_table.GetScene() is scene else None
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    else:
        table.SetName(name)
    table.SetAndObserveTable(vtk_table)
    table.SetUseColumnTitleAsColumnHeader(True)  # Slicer 5.8+: the minimum this extension supports
    return table


def table_rows(table_node) -> list:
    """The table's rows as dicts (numbers as float): for tests and scripts."""
    table = table_node.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            value = column.GetValue(r)
            row[column.GetName()] = value if isinstance(column, vtk.vtkStringArray) else float(value)
        rows.append(row)
    return rows


def save_table_csv(scene, table_node, path: str, overwrite: bool = False) -> str:
    """Write the table as CSV through its storage node; never half-written, never overwritten unasked."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise DCEPKInputError(f"{path} exists: choose another file name or allow overwriting")
    partial = path + ".partial.csv"
    storage = slicer.vtkMRMLTableStorageNode()
    storage.SetScene(scene)
    storage.SetFileName(partial)
    if not storage.WriteData(table_node):
        raise DCEPKInputError(f"could not write {path}: check the folder exists and is writable")
    os.replace(partial, path)
    schema = partial[:-len(".csv")] + ".schema.csv"
    if os.path.exists(schema):  # the column-type sidecar Slicer writes; keep it beside the final name
        os.replace(schema, path[:-len(".csv")] + ".schema.csv" if path.endswith(".csv") else path + ".schema.csv")
    return path


# --------------------------------------------------------------------------- the fit, scene side
# The Slicer module's Logic is these three steps: ``prepare_scene_fit`` reads nodes into plain data
# (main thread), ``compute_scene_fit`` runs ``pipeline.run_fit`` (pure, thread-safe: the widget runs
# it in a BackgroundJob), ``publish_scene_fit`` writes the results into the scene (main thread).
# Nothing touches the scene before the computation has succeeded, so cancel or error leaves it as it was.

@dataclass
class SceneFitRequest:
    series: DCESeries
    settings: object  # pipeline.FitSettings
    source_id: str
    statistics_regions: Optional[Dict[str, np.ndarray]] = None
    output_prefix: str = "DCEPK"
    update_existing: bool = True


def reference_volume(shape, geometry: Geometry):
    """A volume node (kept out of the scene) describing the series' voxel grid, for mask helpers."""
    node = slicer.vtkMRMLScalarVolumeNode()
    _set_image(node, np.zeros(tuple(shape)[:3], dtype=np.uint8), geometry)
    return node


def mask_from_node(mask, reference, what: str) -> Optional[np.ndarray]:
    """Bool mask on the reference grid from an array, ROI, label map or segmentation (union of segments)."""
    if mask is None:
        return None
    if isinstance(mask, np.ndarray):
        shape = volume_array(reference).shape
        if mask.shape != shape:
            raise DCEPKInputError(f"the {what} has shape {mask.shape} but the series has {shape} voxels (k, j, i)")
        result = mask.astype(bool)
    elif mask.IsA("vtkMRMLMarkupsROINode"):
        result = mask_from_roi(mask, reference)
    elif mask.IsA("vtkMRMLLabelMapVolumeNode"):
        result = mask_from_labelmap(mask, reference)
    elif mask.IsA("vtkMRMLSegmentationNode"):
        masks = list(segment_masks(mask, reference).values())
        if not masks:
            raise DCEPKInputError(f"segmentation '{mask.GetName()}' has no segments: add one for the {what}")
        result = np.logical_or.reduce(masks)
    else:
        raise DCEPKInputError(f"the {what} must be a markups ROI, a label map or a segmentation, "
                              f"not a {mask.GetClassName()}")
    if not result.any():
        raise DCEPKInputError(f"the {what} contains no voxel centre of the DCE series: move or enlarge it "
                              "so it covers the intended voxels")
    return result


def statistics_regions(statistics_segmentation, mask, reference):
    """(segmentation node, {segment name: bool [k,j,i]}) for the statistics table, or (None, None).

    The explicit statistics segmentation wins; otherwise a mask given as a segmentation also
    defines the regions, so one segmentation can both restrict the run and group its statistics.
    """
    source = statistics_segmentation
    if source is None and mask is not None and not isinstance(mask, np.ndarray) \
            and mask.IsA("vtkMRMLSegmentationNode"):
        source = mask
    if source is None:
        return None, None
    return source, segment_masks(source, reference)


def prepare_scene_fit(sequence_node, model: str = "etofts", method: str = "nlls",
                      aif_roi=None, aif_segmentation=None, aif_segment_id: Optional[str] = None,
                      population_aif: Optional[str] = None, aif_top_fraction: Optional[float] = None,
                      aif_delay_s: float = 0.0, hct: float = 0.45,
                      t10_s: Optional[float] = 1.4, t10_map=None, t10_map_unit: str = "ms",
                      vfa_sequence=None, vfa_flip_angles_deg: Optional[Sequence[float]] = None,
                      vfa_tr_s: Optional[float] = None, fa_deg: Optional[float] = None, tr_s: Optional[float] = None,
                      r1_per_mM_s: Optional[float] = None, mask=None, fit_delay: bool = False, device: str = "auto",
                      statistics_segmentation=None, output_prefix: str = "DCEPK",
                      update_existing: bool = True) -> SceneFitRequest:
    """Read the nodes into a ``SceneFitRequest``; raises ``DCEPKInputError`` on bad input. Reads only."""
    from ..pipeline.fit import FitSettings  # imported here: the module loads before its dependencies are checked

    series = series_from_sequence(sequence_node)
    if series.kind != "concentration":
        require_acquisition(fa_deg, series.flip_angle_deg, "flip angle", "flipAngle_deg (degrees)", "Flip angle")
        require_acquisition(tr_s, series.tr_s, "TR", "tr_s (seconds)", "TR")
    reference = reference_volume(series.spatial_shape, series.geometry)
    aif_mask = None
    if aif_segmentation is not None and aif_segment_id:
        aif_mask = mask_from_segment(aif_segmentation, aif_segment_id, reference)
        if not aif_mask.any():
            raise DCEPKInputError("the AIF segment contains no voxel of the DCE series: paint it over the artery")
    elif aif_roi is not None:
        aif_mask = mask_from_node(aif_roi, reference, "AIF ROI")
    if aif_mask is None and not population_aif:
        raise DCEPKInputError("no input function: place an ROI (or segment) on an artery, or choose a population AIF")
    if aif_mask is not None and population_aif:
        raise DCEPKInputError("both an AIF ROI and a population AIF are given: choose one input function")
    if t10_map is not None and vfa_sequence is not None:
        raise DCEPKInputError("both a T10 map and a VFA series are given: choose one source of pre-contrast T1")
    t10 = t10_s
    if t10_map is not None:
        t10 = t10_map_seconds(t10_map, reference, t10_map_unit)
    vfa_signals = vfa_angles = None
    if vfa_sequence is not None:
        vfa_signals, vfa_angles, vfa_geometry = vfa_from_sequence(vfa_sequence, vfa_flip_angles_deg)
        check_same_grid(series.spatial_shape, series.geometry, vfa_signals.shape, vfa_geometry,
                        "DCE series", "VFA series")
        if vfa_tr_s is None:
            vfa_tr_s = acquisition_from_sequence(vfa_sequence)[1]
        require_acquisition(vfa_tr_s, None, "VFA TR", "vfaTr_s (seconds)", "VFA TR", "VFA series")
        t10 = None
    fit_mask = mask_from_node(mask, reference, "fit mask")
    statistics_source, regions = statistics_regions(statistics_segmentation, mask, reference)
    if regions is not None:
        empty = [name for name, region in regions.items() if not region.any()]
        if empty:  # found now, not after the fit: publishing must not stop half-way
            raise DCEPKInputError(f"segment(s) {', '.join(empty)} of '{statistics_source.GetName()}' hold no voxel of "
                                  "the DCE series: paint them on the series or remove them")
    settings = FitSettings(
        model=model, method=method, t10_s=t10, vfa_signals=vfa_signals, vfa_flip_angles_deg=vfa_angles,
        vfa_tr_s=vfa_tr_s, fa_deg=fa_deg, tr_s=tr_s, r1_per_mM_s=r1_per_mM_s, aif_mask=aif_mask,
        aif_top_fraction=aif_top_fraction, population_aif=population_aif or None, hct=hct,
        aif_delay_s=aif_delay_s, mask=fit_mask, fit_delay=fit_delay, device=device)
    return SceneFitRequest(series=series, settings=settings, source_id=series.metadata.get("sequence_id", ""),
                           statistics_regions=regions, output_prefix=output_prefix or "DCEPK",
                           update_existing=update_existing)


def require_acquisition(given, header, what: str, argument: str, checkbox: str, series: str = "DCE series"):
    """Refuse a run whose acquisition value is neither given nor in the header: no silent default."""
    if given is None and header is None:
        raise DCEPKInputError(f"the {series} has no {what} in its header: give {argument} (in the module panel: "
                              f"tick '{checkbox}' and type it)")


def t10_map_seconds(t10_map, reference, unit: str) -> np.ndarray:
    scale = {"ms": 1e-3, "s": 1.0}.get((unit or "").strip().lower())
    if scale is None:
        raise DCEPKInputError(f"unknown T10 map unit '{unit}': use 'ms' or 's'")
    values = volume_array(t10_map).astype(np.float32) * scale
    check_same_grid(volume_array(reference).shape, volume_geometry(reference), values.shape,
                    volume_geometry(t10_map), "DCE series", f"T10 map '{t10_map.GetName()}'")
    typical = float(np.nanmedian(values[values > 0])) if np.any(values > 0) else 0.0
    if not 0.05 <= typical <= 10.0:
        raise DCEPKInputError(
            f"the T10 map's typical value is {typical:g} s with unit '{unit}': T10 of tissue is 0.05-10 s, so "
            "the unit is probably wrong (choose ms or s to match the map)")
    return values


def compute_scene_fit(request: SceneFitRequest, progress=None, cancel=None):
    """``pipeline.run_fit`` on the prepared data: no scene access, safe in a worker thread."""
    from ..pipeline.fit import run_fit

    return run_fit(request.series, request.settings, progress=progress, cancel=cancel)


def output_name(prefix: str, map_name: str) -> str:
    return f"{prefix} {map_name}"


def publish_scene_fit(scene, request: SceneFitRequest, output) -> Dict[str, object]:
    """Write the maps (and per-segment statistics) into the scene; returns ``{map name: node}``.

    With ``update_existing`` the nodes of an earlier run with the same prefix are updated in place.
    """
    maps = {name: np.asarray(array) for name, array in output.maps.items() if np.ndim(array) == 3}
    for name, array in maps.items():  # check everything before the first write
        if array.shape != tuple(request.series.spatial_shape):
            raise DCEPKInputError(f"map {name} has shape {array.shape}, not the series' {request.series.spatial_shape}")
    nodes = {}
    for name, array in maps.items():
        node_name = output_name(request.output_prefix, name)
        existing = find_output_node(scene, node_name) if request.update_existing else None
        if existing is None and not request.update_existing:
            node_name = scene.GenerateUniqueName(node_name)
        node = update_volume_from_array(scene, array, output.geometry, node_name, existing_node=existing,
                                        units=output.units.get(name, ""), map_name=name)
        node.SetAttribute("DCEPK.Source", request.source_id)
        nodes[name] = node
    if request.statistics_regions:
        table_name = output_name(request.output_prefix, "statistics")
        existing_table = None
        if request.update_existing:
            existing_table = _node_by_name(scene, "vtkMRMLTableNode", table_name)
        else:
            table_name = scene.GenerateUniqueName(table_name)
        stat_maps = {name: array for name, array in maps.items() if name != "status"}
        nodes["statistics"] = statistics_table(scene, stat_maps, request.statistics_regions, table_name,
                                               existing_table, output.units, status=maps.get("status"))
    return nodes


def run_scene_fit(scene, sequence_node, progress=None, cancel=None, **options):
    """prepare -> compute -> publish in one synchronous call; returns ``(nodes, FitOutput)``."""
    request = prepare_scene_fit(sequence_node, **options)
    output = compute_scene_fit(request, progress=progress, cancel=cancel)
    return publish_scene_fit(scene, request, output), output


# --------------------------------------------------------------------------- plots
def plot_curves(scene, chart_name: str, x: np.ndarray, curves: Mapping[str, np.ndarray], x_title: str,
                y_title: str, chart=None):
    """Line chart of ``curves`` ({name: y}) against ``x``: one table, one plot series per curve, one chart.

    Given ``chart`` (from an earlier call) its table and series are updated in place, so a live
    plot (AIF under a moving ROI, the curve of the voxel under the mouse) adds no nodes.
    """
    x = np.asarray(x, dtype=np.float64)
    if chart is None or chart.GetScene() is not scene:
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", chart_name)
    table_id = chart.GetAttribute("DCEPK.Table")
    table = scene.GetNodeByID(table_id) if table_id else None
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{chart_name} data")
        chart.SetAttribute("DCEPK.Table", table.GetID())
    vtk_table = vtk.vtkTable()
    for name, values in [(x_title, x)] + [(n, np.asarray(v, dtype=np.float64)) for n, v in curves.items()]:
        if values.shape != x.shape:
            raise DCEPKInputError(f"curve '{name}' has {values.size} points for {x.size} times")
        column = numpy_support.numpy_to_vtk(values, deep=True)
        column.SetName(name)
        vtk_table.AddColumn(column)
    table.SetAndObserveTable(vtk_table)
    existing = {chart.GetNthPlotSeriesNode(n).GetName(): chart.GetNthPlotSeriesNode(n)
                for n in range(chart.GetNumberOfPlotSeriesNodes())}
    for n, name in enumerate(curves):
        series = existing.pop(name, None)
        if series is None:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName(x_title)
        series.SetYColumnName(name)
        series.SetPlotType(series.PlotTypeScatter)
        # The measured curve as markers, fitted or mean curves as lines.
        series.SetMarkerStyle(series.MarkerStyleCircle if "measured" in name else series.MarkerStyleNone)
        series.SetLineStyle(series.LineStyleNone if "measured" in name else series.LineStyleSolid)
        colour = _PLOT_COLOURS[n % len(_PLOT_COLOURS)]
        series.SetColor(*colour)
    for stale in existing.values():
        chart.RemovePlotSeriesNodeID(stale.GetID())
        scene.RemoveNode(stale)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    chart.SetTitle(chart_name)
    return chart


_PLOT_COLOURS = ((0.85, 0.33, 0.1), (0.0, 0.45, 0.74), (0.47, 0.67, 0.19), (0.49, 0.18, 0.56))


# --------------------------------------------------------------------------- phantom / sample data
def segmentation_from_labels(scene, labels: np.ndarray, geometry: Geometry, names: Mapping[int, str], name: str):
    """Segmentation node with one segment per label value (0 is background), named from ``names``."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels")
    try:
        _set_image(labelmap, np.asarray(labels).astype(np.int16), geometry)
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


def _fit_roi_to_voxels(roi, geometry: Geometry, low_ijk, high_ijk):
    """Align ``roi`` with the voxel grid so that it holds exactly the voxels ``low_ijk``..``high_ijk``."""
    low, high = np.asarray(low_ijk, float), np.asarray(high_ijk, float)
    ijk_to_ras = geometry.ijk_to_ras()
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = ijk_to_ras[:3, :3] / geometry.spacing[None, :]  # unit axes of the grid, in RAS
    object_to_node[:3, 3] = (ijk_to_ras @ np.r_[(low + high) / 2.0, 1.0])[:3]
    if roi.GetDisplayNode() is None:
        roi.CreateDefaultDisplayNodes()
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
    # Half a voxel beyond the outer centres on each side: the box holds exactly the bounding voxels.
    roi.SetSize(*((high - low + 1) * geometry.spacing))
    return roi


def roi_around_mask(scene, mask: np.ndarray, geometry: Geometry, name: str):
    """Markups ROI aligned with the voxel grid that encloses the centres of the mask's voxels."""
    indices = np.argwhere(mask)
    if indices.size == 0:
        raise DCEPKInputError(f"cannot place ROI '{name}': the mask is empty")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    return _fit_roi_to_voxels(roi, geometry, indices.min(axis=0)[::-1], indices.max(axis=0)[::-1])


AIF_BOX_VOXELS = (5, 5, 1)  # (i, j, k): a small box that fits on an artery


def place_roi_on_series(roi, sequence_node, centre_ras=None, size_voxels=AIF_BOX_VOXELS):
    """Give a new ROI (the node selector creates it empty, with no size) a box of ``size_voxels`` on the
    series' grid, centred on the voxel under ``centre_ras`` (the crosshair) when that lies in the
    series, else on the middle of the series; the user then drags it onto the artery."""
    shape, geometry = series_grid(sequence_node)
    centre = voxel_index_at_ras(geometry, shape, centre_ras) if centre_ras is not None else None
    centre_ijk = np.array((centre or tuple(n // 2 for n in shape))[::-1])
    last = np.array(shape[::-1]) - 1
    half = (np.asarray(size_voxels) - 1) // 2
    low = np.clip(centre_ijk - half, 0, last)
    high = np.clip(low + np.asarray(size_voxels) - 1, 0, last)
    return _fit_roi_to_voxels(roi, geometry, low, high)


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
            _set_image(frame, np.asarray(phantom.vfa.signals[..., n], dtype=np.float32), geometry)
            vfa.SetDataNodeAtValue(frame, f"{float(angle):g}")
        vfa.SetAttribute(REPETITION_TIME, f"{1000.0 * phantom.vfa.tr_s:g}")
        nodes["vfa"] = vfa
    nodes["tissues"] = segmentation_from_labels(scene, phantom.labels, geometry, phantom.label_names,
                                                f"{name} tissues")
    nodes["aifSegmentation"] = segmentation_from_labels(scene, phantom.aif_mask.astype(np.int16), geometry,
                                                        {1: "AIF vessel"}, f"{name} AIF")
    nodes["aifRoi"] = roi_around_mask(scene, phantom.aif_mask, geometry, f"{name} AIF box")
    return nodes
