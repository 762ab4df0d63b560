"""Reading and writing DCE series, masks and maps (DICOM, NIfTI, NRRD, Slicer MultiVolume NRRD)."""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import DCEPKInputError
from .geometry import Geometry


@dataclass
class DCESeries:
    """A dynamic series: ``signal[k, j, i, t]`` with explicit frame times in seconds.

    ``flip_angle_deg`` and ``tr_s`` come from the file header when it has them, else None
    (the caller must then supply them for signal-to-concentration conversion).
    ``kind`` is ``"signal"`` (arbitrary units) or ``"concentration"`` (mM).
    """

    signal: np.ndarray
    times_s: np.ndarray
    geometry: Geometry = field(default_factory=Geometry)
    flip_angle_deg: Optional[float] = None
    tr_s: Optional[float] = None
    kind: str = "signal"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.signal = np.asarray(self.signal)
        if self.signal.ndim != 4:
            raise DCEPKInputError(
                f"a DCE series must be 4-D [k, j, i, t]; got an array of shape {self.signal.shape}. "
                "A single 3-D volume has no time course: load the whole dynamic series")
        if self.times_s is None:
            raise DCEPKInputError("the DCE series has no frame times: give them (--times or --dt in seconds)")
        self.times_s = np.asarray(self.times_s, dtype=np.float64).ravel()
        if self.times_s.size != self.signal.shape[-1]:
            raise DCEPKInputError(
                f"{self.times_s.size} frame times for {self.signal.shape[-1]} frames: give one time per frame")
        if not np.all(np.isfinite(self.times_s)) or np.any(np.diff(self.times_s) <= 0):
            raise DCEPKInputError("frame times must be finite and strictly increasing (seconds)")
        if self.kind not in ("signal", "concentration"):
            raise DCEPKInputError(f"unknown series kind '{self.kind}': use 'signal' or 'concentration'")

    @property
    def spatial_shape(self):
        return self.signal.shape[:3]

    @property
    def n_frames(self) -> int:
        return self.signal.shape[-1]
