"""Masks on a series' grid from ROIs (boxes), label maps, segments and mask nodes, and the mean curve
inside a mask."""

from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import slicer
import vtk
from vtkmodules.util import numpy_support

from ..core.errors import DCEPKInputError
from ..core.geometry import check_same_grid
from ..io import DCESeries
from .volumes import volume_array, volume_geometry


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
