"""A DCE series in memory: ``DCESeries`` (signal [k, j, i, t], frame times in seconds, geometry, FA, TR),
the seconds per time unit every timing reader uses, and the voxels with a finite curve."""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry


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


# Seconds per time unit, for every reader of frame times (files and the Slicer scene).
TIME_UNITS_TO_S = {"s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
                   "ms": 1e-3, "msec": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
                   "us": 1e-6, "usec": 1e-6, "microsecond": 1e-6, "microseconds": 1e-6,
                   "min": 60.0, "minute": 60.0, "minutes": 60.0}


def finite_voxels(signal: np.ndarray, block: int = 65536) -> np.ndarray:
    """bool ``[k, j, i]``: voxels whose whole curve is finite (by blocks of voxels: no 4-D boolean
    copy of the series)."""
    flat = signal.reshape(-1, signal.shape[-1])
    finite = np.empty(flat.shape[0], dtype=bool)
    for start in range(0, flat.shape[0], block):
        finite[start:start + block] = np.isfinite(flat[start:start + block]).all(axis=-1)
    return finite.reshape(signal.shape[:-1])
