"""Output map volumes: created or updated from arrays (marked with the map they hold and its unit) and shown
as a radiologist expects: a colour map per map, the fit-status colour table (one named colour per status),
NaN voxels transparent, a robust display window."""

import itertools
from typing import Optional, Tuple

import numpy as np
import slicer

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry
from .volumes import node_by_name, set_image


OUTPUT_MAP_ATTRIBUTE = "DCEPK.Map"  # marks map volumes this extension wrote (value: map name)
UNITS_ATTRIBUTE = "DCEPK.Units"


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


def colour_node(scene, colour: str):
    """Colour node for ``colour``: Slicer's own table of that name if the scene has it, else one made here.

    Slicer's full build has Inferno/Viridis tables (from colour files); the headless core has not,
    so an equivalent 256-entry table is built once and reused. ``"status"`` gives the fit status table.
    """
    if colour == "status":
        return status_colour_table(scene)
    existing = node_by_name(scene, "vtkMRMLColorNode", colour)
    if existing is not None:
        return existing
    if colour not in _PERCEPTUAL:
        raise DCEPKInputError(f"unknown colour table '{colour}': use one of Inferno, Viridis, Grey or status")
    own_name = f"DCEPK {colour}"
    table = node_by_name(scene, "vtkMRMLColorTableNode", own_name)
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
    """``[(code, name, rgba)]``, one per member of ``fit_result.FitStatus`` (or ``status_enum``), in code order."""
    if status_enum is None:
        from ..kinetics.fit_result import FitStatus as status_enum
    spare = itertools.cycle(_SPARE_RGBA)
    return [(int(member), member.name.lower().replace("_", " "), _STATUS_RGBA.get(member.name) or next(spare))
            for member in sorted(status_enum, key=int)]


def status_colour_table(scene, status_enum=None):
    """The fit status colour table (names and codes from the enum; a code the enum lacks is transparent)."""
    table = node_by_name(scene, "vtkMRMLColorTableNode", STATUS_TABLE)
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
    set_image(node, array, geometry)
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
