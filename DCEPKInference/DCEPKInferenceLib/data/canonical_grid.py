"""Canonical network input: any DCE protocol (frame count, frame times, FA, TR) -> one fixed grid.

Design (why): the networks must accept any number of frames at any (non-uniform) times, and
must work without a subject-specific AIF. The sequence physics is not left to the networks to
learn: each voxel's signal becomes its tissue *concentration* (mM) by the core's exact SPGR
inversion (``signal.signal_to_concentration``) from the baseline, FA, TR, T10 and the
agent's r1, all of which a user knows (they are the same inputs the conventional fit needs).
What stays unknown, and what the networks learn to do without, is the AIF. The concentration
is then resampled onto a fixed time grid of ``GRID_POINTS`` points every ``GRID_STEP_S``
seconds, with time zero at the first frame:

* each grid value is the mean of the piecewise-linear curve over the grid cell
  ``[g - step/2, g + step/2]`` (evaluated at ``SUBSAMPLES`` points), so fast protocols
  (e.g. 0.5 s frames) are low-pass filtered rather than aliased and slow ones (15 s frames) are
  interpolated; for a curve linear over the cell the value is exactly the curve at ``g``;
* grid points outside the acquired time span get 0 and a *validity mask* of 0, so short series
  are handled; data after ``GRID_POINTS * GRID_STEP_S`` s (508 s) is not used.

The resampling is one matrix ``W (G, T)`` per protocol, so a whole volume is one matmul.
Frames where the SPGR inversion is undefined (noise or enhancement past the signal's ceiling)
read as ``CONC_CLIP_MM[1]``, the most a voxel can hold; voxels without a positive baseline or a
valid T10 read as 0 (they are masked out by the caller).

Two per-voxel scalars go with each curve (``PROTOCOL_FEATURES``): the log10 of the concentration
noise SD measured over the baseline frames (so the uncertainty can follow the noise) and the
median frame interval / 4 s (the temporal resolution, which sets how well the first pass is seen).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.signal import detect_baseline_frames, signal_to_concentration

GRID_STEP_S = 4.0
GRID_POINTS = 128
SUBSAMPLES = 8                       # points per grid cell for the cell mean (anti-aliasing)
CONC_CLIP_MM = (-5.0, 30.0)          # concentration limits: noise below 0, blood of a vessel at most ~15 mM
PROTOCOL_FEATURES = ("log10_baseline_noise_sd_mM", "median_frame_interval_over_4s")
# Written into every model card; a model whose card names another input cannot be used with this code.
INPUT_DESCRIPTION = ("tissue concentration (mM) by exact SPGR inversion (FA, TR, T10, r1 given), clipped to "
                     f"{list(CONC_CLIP_MM)} mM, cell-mean resampled, with validity mask")
N_PROTOCOL = len(PROTOCOL_FEATURES)
MIN_FRAMES = 8
BLOCK_VOXELS = 4096                  # voxels per conversion block in to_canonical


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


def require_conversion_inputs(fa_deg, tr_s, t10_s, r1_per_mM_s) -> None:
    """The signal-to-concentration conversion needs all four; say which is missing and how to give it."""
    for value, what in ((fa_deg, "flip angle (degrees)"), (tr_s, "TR (seconds)"),
                        (t10_s, "T10 (seconds: one value, e.g. 1.4, or a T1 map on the series grid)"),
                        (r1_per_mM_s, "relaxivity r1 (1/(mM s))")):
        if value is None:
            raise DCEPKInputError(f"the {what} is not known: the networks convert the signal to concentration "
                                  "and need it; give it (FA and TR may also come from the series header)")


def tissue_concentration(signal, baseline_frames: int, fa_deg, tr_s, t10_s, r1_per_mM_s, dtype=np.float64):
    """Concentration (N, T) mM by the core's exact SPGR inversion, clipped to ``CONC_CLIP_MM``, the
    per-voxel noise SD (N,) mM over the baseline frames, and the baseline signal S0 (N,).

    Frames past the SPGR ceiling (undefined inversion) read as the upper clip; voxels with no
    positive baseline signal or no valid T10 read as 0. ``dtype``: the precision of the
    concentration (float32 for the networks' input: < 1e-4 mM off, ~2x faster).
    """
    require_conversion_inputs(fa_deg, tr_s, t10_s, r1_per_mM_s)
    sig = np.asarray(signal)
    if sig.dtype.kind != "f":
        sig = sig.astype(np.float64)
    n_base = int(baseline_frames)
    s0 = sig[..., :n_base].mean(axis=-1).astype(np.float64)
    t10 = np.broadcast_to(np.asarray(t10_s, dtype=np.float64), s0.shape)
    convertible = np.isfinite(s0) & (s0 > 0) & np.isfinite(t10) & (t10 > 0)
    if not convertible.any():   # e.g. a chunk of background: nothing to convert, not an error
        return np.zeros(sig.shape, dtype=dtype), np.zeros(sig.shape[:-1]), s0
    conc, _ = signal_to_concentration(sig, t10_s, fa_deg, tr_s, r1_per_mM_s, n_base, dtype=dtype)
    conc[np.isnan(conc)] = CONC_CLIP_MM[1]
    np.clip(conc, *CONC_CLIP_MM, out=conc)
    conc[~convertible] = 0.0
    noise = (conc[..., :n_base].std(axis=-1, ddof=1, dtype=np.float64) if n_base >= 2
             else np.zeros(conc.shape[:-1]))
    return conc, noise, s0


def protocol_features(noise_sd_mM, times_s) -> np.ndarray:
    """(N, N_PROTOCOL) float32: log10 baseline noise SD (mM, floored at 1e-3) and the median frame
    interval / 4 s."""
    noise = np.asarray(noise_sd_mM, dtype=np.float64).ravel()
    out = np.empty((noise.size, N_PROTOCOL), dtype=np.float32)
    out[:, 0] = np.log10(np.maximum(noise, 1e-3))
    out[:, 1] = float(np.median(np.diff(np.asarray(times_s, dtype=np.float64)))) / GRID_STEP_S
    return out


@dataclass
class CanonicalInput:
    """Network input for N voxels: ``curves (N, G)`` (or (G, N)) float32 concentration (mM) on the grid,
    ``valid (G,)`` float32 grid mask, ``protocol (N, N_PROTOCOL)`` float32, and the baseline used."""

    curves: np.ndarray
    valid: np.ndarray
    protocol: np.ndarray
    baseline_frames: int
    s0: np.ndarray


NO_ARRIVAL_BASELINE_S = 20.0


def estimate_baseline_frames(signal, times_s=None) -> int:
    """Frames before bolus arrival by the project's one detector (``signal.detect_baseline_frames``),
    with what the networks need: at least 2 frames (for the baseline noise SD) and, where nothing
    enhances (e.g. a patch of non-enhancing tissue) and ``times_s`` is given, the frames of the
    first 20 s (any choice gives a concentration ~ 0 for a flat curve); without ``times_s`` that
    case raises ``DCEPKInputError``.
    """
    n_t = np.shape(signal)[-1]
    no_arrival_s = None if times_s is None else NO_ARRIVAL_BASELINE_S
    n_base = detect_baseline_frames(signal, min_frames=min(2, n_t - 1), times_s=times_s, no_arrival_s=no_arrival_s)
    return int(min(n_base, n_t - 1))


def to_canonical(signal, times_s, baseline_frames: Optional[int] = None, *, fa_deg, tr_s, t10_s, r1_per_mM_s,
                 weights=None) -> CanonicalInput:
    """Signal (N, T) -> ``CanonicalInput``. FA (deg), TR (s), T10 (s: scalar or (N,)) and r1
    (1/(mM s)) are required; ``weights`` = a precomputed ``resampling_matrix``."""
    sig = np.asarray(signal)
    if sig.ndim != 2:
        raise DCEPKInputError(f"to_canonical takes voxel curves (N, T); got shape {sig.shape}")
    w, valid = weights if weights is not None else resampling_matrix(times_s)
    if w.shape[1] != sig.shape[1]:
        raise DCEPKInputError(f"{sig.shape[1]} frames but {w.shape[1]} frame times")
    if baseline_frames is None:
        baseline_frames = estimate_baseline_frames(sig, times_s)
    n = sig.shape[0]
    t10 = np.asarray(t10_s) if np.ndim(t10_s) else t10_s   # a map (N,) is cut with the blocks
    # the valid grid points are a prefix (0 s to the last frame) and the other rows of w are 0:
    # only the prefix is multiplied, the rest of the curves stays 0
    n_valid = int(valid.sum())
    w_used = np.ascontiguousarray(w[:n_valid].T, dtype=np.float32)
    curves = np.zeros((n, w.shape[0]), dtype=np.float32)
    noise, s0 = np.empty(n), np.empty(n)
    for lo in range(0, n, BLOCK_VOXELS):   # cache-sized blocks: ~1.5x faster than one pass
        part = slice(lo, lo + BLOCK_VOXELS)
        conc, noise[part], s0[part] = tissue_concentration(sig[part], baseline_frames, fa_deg, tr_s,
                                                           t10[part] if np.ndim(t10) else t10, r1_per_mM_s,
                                                           dtype=np.float32)
        curves[part, :n_valid] = conc @ w_used   # (matmul into the strided rows would skip BLAS)
    return CanonicalInput(curves, valid.astype(np.float32), protocol_features(noise, times_s),
                          int(baseline_frames), s0)
