"""Volume nodes <-> arrays: a node's geometry and voxels ([k, j, i]), a grid-only reference volume, nodes
found by name."""

import numpy as np
import slicer
import vtk
from vtkmodules.util import numpy_support

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry


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


def set_image(volume_node, array: np.ndarray, geometry: Geometry) -> None:
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    # Deep copy: the node must not alias a numpy buffer that the caller may change or free.
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    volume_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(geometry.ijk_to_ras()))
    volume_node.SetAndObserveImageData(image)


def node_by_name(scene, class_name: str, name: str):
    collection = scene.GetNodesByClassByName(class_name, name)
    return collection.GetItemAsObject(0) if collection.GetNumberOfItems() else None


def reference_volume(shape, geometry: Geometry):
    """A volume node (kept out of the scene) describing the series' voxel grid, for mask helpers."""
    node = slicer.vtkMRMLScalarVolumeNode()
    set_image(node, np.zeros(tuple(shape)[:3], dtype=np.uint8), geometry)
    return node
