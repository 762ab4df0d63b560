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
    """Raise a clear error when two volumes are not on the same voxel grid."""
    if tuple(shape_a)[:3] != tuple(shape_b)[:3]:
        raise DCEPKInputError(
            f"the {what_b} has {tuple(shape_b)[:3]} voxels (k, j, i) but the {what_a} has {tuple(shape_a)[:3]}: "
            f"resample the {what_b} onto the {what_a}'s grid first")
    if geometry_a is not None and geometry_b is not None and not geometry_a.is_close(geometry_b):
        raise DCEPKInputError(
            f"the {what_b} does not lie on the {what_a}'s voxel grid (origin, spacing or orientation differ): "
            f"resample the {what_b} onto the {what_a}'s grid first")
