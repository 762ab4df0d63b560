"""ROI boxes: the small box placed on an artery for the AIF, and a box around a mask."""

import numpy as np
import slicer

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry
from .sequences import series_grid, voxel_index_at_ras


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
