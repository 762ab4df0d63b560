"""Canonical network input: any DCE protocol (frame count, frame times, FA, TR) -> one fixed grid.

Design (why): the networks must accept any number of frames at any (non-uniform) times, and
must work without a subject-specific AIF, so they never see absolute concentrations or the AIF.
Each voxel's signal becomes its *relative enhancement* ``RE(t) = S(t) / S0 - 1`` (S0 = mean of
the pre-contrast frames), which removes receive gain and M0 and is defined for every SPGR
series. ``RE`` is then resampled onto a fixed time grid of ``GRID_POINTS`` points every
``GRID_STEP_S`` seconds, with time zero at the first frame:

* each grid value is the mean of the piecewise-linear curve over the grid cell
  ``[g - step/2, g + step/2]`` (evaluated at ``SUBSAMPLES`` points), so fast protocols
  (e.g. 0.5 s frames) are low-pass filtered rather than aliased and slow ones (15 s frames) are
  interpolated; for a curve linear over the cell the value is exactly the curve at ``g``;
* grid points outside the acquired time span get 0 and a *validity mask* of 0, so short series
  are handled; data after ``GRID_POINTS * GRID_STEP_S`` s (508 s) is not used.

The resampling is one matrix ``W (G, T)`` per protocol, so a whole volume is one matmul.

Protocol scalars are optional extra inputs, each with a "known" flag (0 when not given, and the
value 0): flip angle / 30 deg, TR / 5 ms, T10 / 1.5 s. Training drops each at random, so the
networks work with any subset. The contrast relaxivity and the AIF are never inputs (they are
drawn over population ranges in training: see ``simulator.SIMULATOR_RANGES``).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from DCEPKFittingLib.errors import DCEPKInputError
from DCEPKFittingLib.signal_models import detect_baseline_frames

GRID_STEP_S = 4.0
GRID_POINTS = 128
SUBSAMPLES = 8                       # points per grid cell for the cell mean (anti-aliasing)
RE_CLIP = (-1.0, 15.0)               # relative enhancement limits (noise in near-zero S0 voxels)
PROTOCOL_FEATURES = ("fa_over_30deg", "tr_over_5ms", "t10_over_1p5s", "fa_known", "tr_known", "t10_known")
N_PROTOCOL = len(PROTOCOL_FEATURES)
MIN_FRAMES = 8


def grid_times_s() -> np.ndarray:
    """Canonical grid times (s) from the first frame: 0, 4, ..., 508."""
    return np.arange(GRID_POINTS, dtype=np.float64) * GRID_STEP_S


def check_times(times_s) -> np.ndarray:
    t = np.asarray(times_s, dtype=np.float64).ravel()
    if t.size < MIN_FRAMES:
        raise DCEPKInputError(f"the series has {t.size} frames; the networks need at least {MIN_FRAMES} "
                              "(a baseline and the enhancement): load the whole dynamic series")
    if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        raise DCEPKInputError("frame times must be finite and strictly increasing (seconds)")
    if t[-1] - t[0] > 36000:
        raise DCEPKInputError(f"the series spans {t[-1] - t[0]:g} s: frame times look like ms; give seconds")
    return t


def resampling_matrix(times_s):
    """``W (GRID_POINTS, T)`` float64 and ``valid (GRID_POINTS,)`` bool for these frame times.

    ``W @ curve`` is the cell mean of the piecewise-linear curve (see module doc); rows of
    invalid grid points (outside the acquired span) are zero.
    """
    t = check_times(times_s)
    tau = t - t[0]
    g = grid_times_s()
    offsets = ((np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES - 0.5) * GRID_STEP_S
    sub = g[:, None] + offsets[None, :]                       # (G, M)
    valid = g <= tau[-1] + 1e-9
    inside = (sub >= 0.0) & (sub <= tau[-1])
    # a cell that sticks out of the acquired span averages only its inside part
    hi = np.clip(np.searchsorted(tau, sub, side="right"), 1, tau.size - 1)
    lo = hi - 1
    frac = np.clip((sub - tau[lo]) / (tau[hi] - tau[lo]), 0.0, 1.0)
    w = np.zeros((GRID_POINTS, t.size))
    rows = np.broadcast_to(np.arange(GRID_POINTS)[:, None], sub.shape)
    weight = inside / np.maximum(inside.sum(axis=1, keepdims=True), 1)
    np.add.at(w, (rows, lo), weight * (1.0 - frac))
    np.add.at(w, (rows, hi), weight * frac)
    w[~valid] = 0.0
    return w, valid


def relative_enhancement(signal, baseline_frames: int):
    """``RE = S / S0 - 1`` (N, T) and ``S0`` (N,) from the first ``baseline_frames`` frames.

    Voxels with a non-positive or non-finite S0 get RE 0 (they are masked out by the caller).
    """
    sig = np.asarray(signal, dtype=np.float64)
    n_base = int(baseline_frames)
    if not 1 <= n_base < sig.shape[-1]:
        raise DCEPKInputError(f"baseline_frames={baseline_frames} must be between 1 and {sig.shape[-1] - 1}")
    s0 = sig[..., :n_base].mean(axis=-1)
    ok = np.isfinite(s0) & (s0 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        re = sig / np.where(ok, s0, 1.0)[..., None] - 1.0
    re = np.where(ok[..., None] & np.isfinite(re), re, 0.0)
    return np.clip(re, *RE_CLIP), s0


def protocol_features(n: int, fa_deg=None, tr_s=None, t10_s=None) -> np.ndarray:
    """(n, N_PROTOCOL) float32: scaled FA, TR, T10 and their known flags (0 where not given).

    ``t10_s`` may be a scalar or one value per voxel (n,).
    """
    out = np.zeros((n, N_PROTOCOL), dtype=np.float32)
    if fa_deg is not None:
        out[:, 0], out[:, 3] = float(fa_deg) / 30.0, 1.0
    if tr_s is not None:
        if float(tr_s) > 1.0:
            raise DCEPKInputError(f"tr_s={tr_s} looks like milliseconds: give TR in seconds (e.g. 0.005)")
        out[:, 1], out[:, 4] = float(tr_s) / 0.005, 1.0
    if t10_s is not None:
        t10 = np.broadcast_to(np.asarray(t10_s, dtype=np.float64), (n,))
        if np.nanmedian(t10) > 20:
            raise DCEPKInputError("T10 looks like milliseconds: give T10 in seconds")
        out[:, 2], out[:, 5] = np.nan_to_num(t10 / 1.5), 1.0
    return out


@dataclass
class CanonicalInput:
    """Network input for N voxels: ``curves (N, G)`` float32 RE on the grid, ``valid (G,)``
    float32 grid mask, ``protocol (N, N_PROTOCOL)`` float32, and the baseline used."""

    curves: np.ndarray
    valid: np.ndarray
    protocol: np.ndarray
    baseline_frames: int
    s0: np.ndarray


NO_ARRIVAL_BASELINE_S = 20.0


def estimate_baseline_frames(signal, times_s=None) -> int:
    """Frames before bolus arrival from the most enhancing voxels (core detector), >= 2 when possible.

    Where nothing enhances (e.g. a patch of non-enhancing tissue) the core finds no arrival; the
    baseline is then the frames of the first 20 s (any choice gives RE ~ 0 for a flat curve).
    """
    sig = np.asarray(signal, dtype=np.float64)
    n_t = sig.shape[-1]
    try:
        n_base = detect_baseline_frames(sig)
    except DCEPKInputError:
        if times_s is None:
            raise
        t = np.asarray(times_s, dtype=np.float64)
        n_base = int(np.searchsorted(t - t[0], NO_ARRIVAL_BASELINE_S))
    return int(min(max(n_base, min(2, n_t - 1)), n_t - 1))


def to_canonical(signal, times_s, baseline_frames: Optional[int] = None, fa_deg=None, tr_s=None,
                 t10_s=None, weights=None) -> CanonicalInput:
    """Signal (N, T) -> ``CanonicalInput``. ``weights`` = a precomputed ``resampling_matrix``."""
    sig = np.asarray(signal)
    if sig.ndim != 2:
        raise DCEPKInputError(f"to_canonical takes voxel curves (N, T); got shape {sig.shape}")
    w, valid = weights if weights is not None else resampling_matrix(times_s)
    if w.shape[1] != sig.shape[1]:
        raise DCEPKInputError(f"{sig.shape[1]} frames but {w.shape[1]} frame times")
    if baseline_frames is None:
        baseline_frames = estimate_baseline_frames(sig, times_s)
    re, s0 = relative_enhancement(sig, baseline_frames)
    curves = (re @ w.T).astype(np.float32)
    return CanonicalInput(curves, valid.astype(np.float32), protocol_features(sig.shape[0], fa_deg, tr_s, t10_s),
                          int(baseline_frames), s0)
