"""Voxel grid geometry shared by file I/O, the phantom and the MRML bridge.

Arrays are indexed ``[k, j, i]`` (slice, row, column) as SimpleITK and ``slicer.util.arrayFromVolume``
return them; a DCE series adds time last: ``[k, j, i, t]``. Geometry is stored in the LPS
physical frame of ITK/DICOM/NIfTI-through-SimpleITK; ``ijk_to_ras`` gives Slicer's matrix.
"""

from dataclasses import dataclass, field

import numpy as np

from .errors import DCEPKInputError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Geometry:
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))  # (di, dj, dk) in mm
    origin_lps: np.ndarray = field(default_factory=lambda: np.zeros(3))  # position of voxel (0,0,0), mm
    direction_lps: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: unit i, j, k axes

    def __post_init__(self):
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin_lps = np.asarray(self.origin_lps, dtype=np.float64).reshape(3)
        self.direction_lps = np.asarray(self.direction_lps, dtype=np.float64).reshape(3, 3)
        if np.any(self.spacing <= 0) or not np.all(np.isfinite(self.spacing)):
            raise DCEPKInputError(f"voxel spacing must be positive and finite, got {self.spacing.tolist()}")

    def ijk_to_lps(self) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_lps * self.spacing[None, :]
        matrix[:3, 3] = self.origin_lps
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        matrix = self.ijk_to_lps()
        matrix[:3, :] = _LPS_TO_RAS @ matrix[:3, :]
        return matrix

    @classmethod
    def from_ijk_to_ras(cls, matrix) -> "Geometry":
        matrix = np.asarray(matrix, dtype=np.float64)
        lps = _LPS_TO_RAS @ matrix[:3, :]
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        return cls(spacing=spacing, origin_lps=lps[:3, 3], direction_lps=lps[:3, :3] / spacing[None, :])

    def is_close(self, other: "Geometry", tolerance_mm: float = 1e-3) -> bool:
        return bool(np.allclose(self.ijk_to_lps(), other.ijk_to_lps(), atol=tolerance_mm))


def check_same_grid(shape_a, geometry_a: Geometry, shape_b, geometry_b: Geometry,
                    what_a: str = "image", what_b: str = "mask") -> None:
    """Raise a clear error when two volumes are not on the same voxel grid.

    Same grid: the same shape and every voxel centre at the same place. A single-slice axis
    (size 1 in both) has no extent, so its spacing and direction do not matter: a one-slice mask
    whose slice spacing came from SliceThickness, or a 2-D mask read as one slice, is accepted on
    a one-slice series when its voxels sit on the series' voxels.
    """
    if tuple(shape_a)[:3] != tuple(shape_b)[:3]:
        raise DCEPKInputError(
            f"the {what_b} has {tuple(shape_b)[:3]} voxels (k, j, i) but the {what_a} has {tuple(shape_a)[:3]}: "
            f"resample the {what_b} onto the {what_a}'s grid first")
    if geometry_a is not None and geometry_b is not None:   # same shape: any offset would push b off a
        _slice_offset(tuple(shape_a)[:3], geometry_a, tuple(shape_b)[:3], geometry_b, what_a, what_b)


def align_to_grid(array_b, geometry_b: Geometry, shape_a, geometry_a: Geometry, what_a: str = "image",
                  what_b: str = "mask", fill=0) -> np.ndarray:
    """``array_b`` on grid a: as it is when the grids are the same (``check_same_grid``), or, when
    it is a single slice of grid a (size 1 on k, its voxels on one slice of a's), placed at that
    slice with ``fill`` elsewhere. Any other difference raises a clear error."""
    array_b = np.asarray(array_b)
    shape_a, shape_b = tuple(shape_a)[:3], array_b.shape[:3]
    if shape_b == shape_a:
        check_same_grid(shape_a, geometry_a, shape_b, geometry_b, what_a, what_b)
        return array_b
    if not (shape_b[0] == 1 and shape_b[1:] == shape_a[1:] and geometry_a is not None and geometry_b is not None):
        raise DCEPKInputError(
            f"the {what_b} has {shape_b} voxels (k, j, i) but the {what_a} has {shape_a}: "
            f"resample the {what_b} onto the {what_a}'s grid first")
    k = _slice_offset(shape_a, geometry_a, shape_b, geometry_b, what_a, what_b)[0]
    out = np.full(shape_a + array_b.shape[3:], fill, dtype=array_b.dtype)
    out[k] = array_b[0]
    return out


def _slice_offset(shape_a, geometry_a, shape_b, geometry_b, what_a, what_b, tolerance_mm: float = 1e-3):
    """Voxel offset (k, j, i) of grid b's voxels on grid a's, where b's voxel centres all are a's;
    else a clear error. Axes of size 1 in b take any spacing and direction."""
    axes_a = geometry_a.direction_lps * geometry_a.spacing[None, :]   # columns: i, j, k steps (mm)
    axes_b = geometry_b.direction_lps * geometry_b.spacing[None, :]
    sizes_a, sizes_b = shape_a[::-1], shape_b[::-1]                   # (i, j, k)
    for axis, name in enumerate("ijk"):
        if sizes_b[axis] > 1 and np.max(np.abs(axes_a[:, axis] - axes_b[:, axis])) * (sizes_b[axis] - 1) > tolerance_mm:
            raise DCEPKInputError(
                f"the {what_b} does not lie on the {what_a}'s voxel grid (spacing or orientation along {name} differ: "
                f"{np.round(axes_b[:, axis], 4).tolist()} vs {np.round(axes_a[:, axis], 4).tolist()} mm per voxel): "
                f"resample the {what_b} onto the {what_a}'s grid first")
    index = np.linalg.solve(axes_a, geometry_b.origin_lps - geometry_a.origin_lps)
    whole = np.round(index)
    miss = np.linalg.norm(axes_a @ (index - whole))
    if miss > tolerance_mm or np.any(whole < 0) or np.any(whole + np.array(sizes_b) > np.array(sizes_a)):
        raise DCEPKInputError(
            f"the {what_b} does not lie on the {what_a}'s voxel grid: its voxel centres are not the {what_a}'s "
            f"(its first voxel, at {np.round(geometry_b.origin_lps, 3).tolist()} mm LPS, falls at voxel index "
            f"{np.round(index, 2).tolist()} (i, j, k) of the {what_a}, {miss:.3g} mm off a voxel centre"
            f"{'' if miss > tolerance_mm else ', outside it'}): resample the {what_b} onto the {what_a}'s grid first")
    return tuple(int(v) for v in whole[::-1])
