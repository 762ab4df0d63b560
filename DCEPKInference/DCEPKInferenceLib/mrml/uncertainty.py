"""The networks' uncertainty in the scene: the threshold (relative, or an SD limit per map), the voxels it
excludes, and a map shown beside its SD map."""

from typing import Dict, Mapping, Union

import numpy as np
import slicer

from DCEPKFittingLib.core.errors import DCEPKInputError

from .model_cards import PARAMETERS


UNCERTAINTY_ATTRIBUTE = "DCEPK.UncertaintyNodeID"  # on a map: ID of its uncertainty (SD) volume

Threshold = Union[None, float, Mapping[str, float]]


def normalize_threshold(threshold: Threshold) -> Threshold:
    """None; a float r (relative: exclude voxels with SD > r * |value|); or {map: SD limit in the map's unit}."""
    if threshold is None:
        return None
    if isinstance(threshold, Mapping):
        limits = {}
        for name, limit in threshold.items():
            if name not in PARAMETERS:
                raise DCEPKInputError(f"uncertainty threshold for unknown map '{name}': use {', '.join(PARAMETERS)}")
            if limit is None or float(limit) <= 0:
                continue  # 0 or None: that map is not thresholded
            limits[name] = float(limit)
        return limits or None
    try:
        relative = float(threshold)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"uncertainty threshold {threshold!r} must be a number (relative SD, e.g. 0.5) or "
                              "a dict of SD limits per map in the map's unit, e.g. {'Ktrans': 0.05}") from None
    if not np.isfinite(relative) or relative <= 0:
        raise DCEPKInputError(f"relative uncertainty threshold must be a positive number (0.5 = SD above 50 % "
                              f"of the value is excluded); got {threshold}")
    return relative


def excluded_by_uncertainty(maps: Mapping[str, np.ndarray], threshold: Threshold,
                            inferred: np.ndarray) -> Dict[str, np.ndarray]:
    """{parameter: bool [k, j, i]} of inferred voxels whose uncertainty exceeds the threshold."""
    threshold = normalize_threshold(threshold)
    excluded = {}
    for name in PARAMETERS:
        value, sd = np.asarray(maps[name], np.float64), np.asarray(maps[f"{name}_sd"], np.float64)
        if threshold is None:
            over = np.zeros(value.shape, dtype=bool)
        elif isinstance(threshold, dict):
            over = sd > threshold[name] if name in threshold else np.zeros(value.shape, dtype=bool)
        else:
            over = sd > threshold * np.abs(value)
        excluded[name] = over & inferred
    return excluded


def show_map_with_uncertainty(scene, map_node, uncertainty_node, background_node=None,
                              views=("Red", "Yellow"), opacity: float = 0.8) -> None:
    """Map and its uncertainty side by side: map over the anatomy in the first slice view, its
    uncertainty in the second, both in the first view's orientation, navigation linked."""
    if map_node is None or uncertainty_node is None:
        raise DCEPKInputError("no map and uncertainty to show: run the inference first")
    composites = {node.GetLayoutName(): node for node in _nodes(scene, "vtkMRMLSliceCompositeNode")}
    slices = {node.GetLayoutName(): node for node in _nodes(scene, "vtkMRMLSliceNode")}
    missing = [view for view in views if view not in composites or view not in slices]
    if missing:
        raise DCEPKInputError(f"the scene has no slice view {', '.join(missing)}: show the views first")
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    orientation = slices[views[0]].GetOrientationString()
    for view, foreground in zip(views, (map_node, uncertainty_node)):
        composite = composites[view]
        composite.SetBackgroundVolumeID(background_node.GetID() if background_node is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID())
        composite.SetForegroundOpacity(opacity if background_node is not None else 1.0)
        composite.SetLinkedControl(True)
        slices[view].SetOrientation(orientation)


def _nodes(scene, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())]
