"""Signal to concentration (mM) by exact SPGR inversion with FA, TR, T10 and r1, optionally Rician-
corrected; T10 given as one value or a map."""

from dataclasses import dataclass

import numpy as np

from ..core import runner
from ..core.errors import DCEPKInputError
from ..core.plausibility import check_r1
from . import rician
from .baseline import detect_baseline_frames
from .spgr import check_b1, check_flip_angle, check_tr


def check_t10(t10_s, spatial_shape=None) -> np.ndarray:
    """T10 (s) as float64, scalar or a map of ``spatial_shape``; an error names a wrong shape, a
    map with no positive finite value, or values that look like milliseconds."""
    t10 = np.asarray(t10_s, dtype=np.float64)
    if t10.ndim > 0 and spatial_shape is not None and t10.shape != tuple(spatial_shape):
        raise DCEPKInputError(f"T10 map of shape {t10.shape} does not match the series' grid {tuple(spatial_shape)}")
    t10_finite = t10[np.isfinite(t10) & (t10 > 0)]
    if t10_finite.size == 0:
        raise DCEPKInputError("T10 has no positive finite value: give the pre-contrast T1 in seconds")
    if np.median(t10_finite) > 20:
        raise DCEPKInputError(
            f"T10 median {np.median(t10_finite):g} s is implausible: T10 looks like milliseconds; pass seconds "
            "(divide by 1000; on the command line add --t10-unit ms)")
    if np.median(t10_finite) < 0.1:
        # tissue and blood T1 lie at 0.2-5 s; 0.02 is 1.2 s written in minutes
        raise DCEPKInputError(
            f"T10 median {np.median(t10_finite):g} s is implausible (tissue T1 is 0.2-5 s): T10 looks like minutes; "
            "pass seconds (multiply by 60)")
    return t10


def signal_to_concentration(signal, t10_s, fa_deg, tr_s, r1_per_mM_s, baseline_frames=None, b1=1.0,
                            baseline_start=0, progress=None, cancel=None, dtype=np.float64, out=None,
                            noise_sigma=None):
    """Concentration (mM) from SPGR signal by exact inversion of the SPGR equation.

    signal: (..., T); t10_s: pre-contrast T1 in s, scalar or (...) map; fa_deg, tr_s: sequence;
    r1_per_mM_s: relaxivity; baseline_frames: number of pre-contrast frames (None: detect);
    b1: actual / nominal flip angle, scalar or (...) map; baseline_start: first frame of the
    baseline window (1 skips a first dynamic that is not yet at steady state, as the OSIPI
    reference does), so the baseline is frames [baseline_start, baseline_frames).

    M = S0 sin(a) is estimated from the baseline mean and T10; each frame's ratio
    q = S / M gives E1 = (1 - q) / (1 - q cos(a)) and R1 = -ln(E1) / TR, which exists only for
    0 < q < 1. Frames outside that range, or voxels with a non-positive / non-finite baseline or
    T10, get NaN; ``valid_mask`` (shape (...)) is True where every frame was converted.
    ``progress(fraction, message)`` and ``cancel`` (``is_set()``) follow ``jobs``. ``dtype``: the
    precision of the per-frame arithmetic and of the result; float32 (the networks' input) is ~2x
    faster and off by < 1e-4 mM. ``out``: an array of the signal's shape to hold the result (any
    float dtype; it may be the signal itself: each chunk is read before it is written).
    ``noise_sigma`` (signal units, per quadrature channel; ``rician.estimate_noise_sigma``): the
    magnitude's Rician floor is taken off first, the baseline by its second moment and each frame
    by sqrt(|S^2 - sigma^2|) (see ``rician``); None or 0: no correction.
    Returns (conc_mM (..., T), valid_mask (...)).
    """
    sig = np.asarray(signal)
    if sig.dtype.kind != "f":     # float32 series stay float32 in memory; chunks compute in ``dtype``
        sig = sig.astype(np.float64)
    work = np.dtype(dtype)
    if work not in (np.float32, np.float64):
        raise DCEPKInputError(f"dtype must be float32 or float64; got {work}")
    if sig.ndim == 0 or sig.shape[-1] < 2:
        raise DCEPKInputError(f"signal needs a time axis (last) with at least 2 frames; got shape {sig.shape}")
    if not np.any(np.isfinite(sig)):
        raise DCEPKInputError("the signal is NaN / inf everywhere: check the loaded series")
    spatial, n_t = sig.shape[:-1], sig.shape[-1]
    fa = check_flip_angle(fa_deg)
    if fa.size != 1:
        raise DCEPKInputError("signal_to_concentration takes one flip angle (the dynamic series')")
    sequence = _Sequence(tr_s=check_tr(tr_s), r1=check_r1(r1_per_mM_s),
                         sigma=_checked_noise_sigma(noise_sigma), work=work)
    t10 = check_t10(t10_s, spatial)
    b1v = check_b1(b1)
    if b1v.ndim > 0 and b1v.shape != spatial:
        raise DCEPKInputError(f"B1 map of shape {b1v.shape} does not match the series' grid {spatial}")
    start, n_base = _baseline_window(sig, baseline_frames, baseline_start)
    s_base = _baseline_level(sig[..., start:n_base], sequence.sigma)
    if out is not None and (np.shape(out) != sig.shape or out.dtype.kind != "f" or not out.flags.c_contiguous):
        raise DCEPKInputError(f"out must be a contiguous float array of the signal's shape {sig.shape}")
    flat = sig.reshape(-1, n_t)
    n_vox = flat.shape[0]
    conc = np.empty((n_vox, n_t), dtype=work) if out is None else out.reshape(n_vox, n_t)
    valid = np.empty(n_vox, bool)
    voxels = (s_base.reshape(-1), np.broadcast_to(t10, spatial).reshape(-1),
              np.cos(np.deg2rad(fa.item() * np.broadcast_to(b1v, spatial).reshape(-1))))
    # Chunks of ~2 MB per float64 temporary: they stay in the CPU cache, which on 2 cores made the
    # conversion ~1.8x faster than 16 MB chunks; memory stays small too.
    plan = runner.plan_chunks(n_vox, 8 * 4 * n_t, min_chunk=max(1, 32_768 // n_t), max_chunk=max(1, 262_144 // n_t))
    runner.run_chunks(lambda lo, hi, _: _convert_rows(flat, voxels, lo, hi, conc, valid, sequence), plan,
                      progress=progress, cancel=cancel, message="signal to concentration")
    return conc.reshape(sig.shape), valid.reshape(spatial)


@dataclass(frozen=True)
class _Sequence:
    tr_s: float
    r1: float            # 1/(mM s)
    sigma: float         # noise SD (signal units); 0: no Rician correction
    work: np.dtype       # the per-frame arithmetic's precision


def _checked_noise_sigma(noise_sigma) -> float:
    sigma = float(noise_sigma) if noise_sigma is not None else 0.0
    if not (np.isfinite(sigma) and sigma >= 0):
        raise DCEPKInputError(f"noise_sigma must be a noise SD >= 0 in signal units; got {noise_sigma!r}")
    return sigma


def _baseline_window(sig, baseline_frames, baseline_start):
    """(first, end) of the pre-contrast frames: [baseline_start, baseline_frames), detected if None."""
    n_t = sig.shape[-1]
    if baseline_frames is None:
        n_base = detect_baseline_frames(sig)
    else:
        if isinstance(baseline_frames, (bool, np.bool_)) or int(baseline_frames) != baseline_frames:
            raise DCEPKInputError(f"baseline_frames must be a whole number of frames; got {baseline_frames!r}")
        n_base = int(baseline_frames)
        if n_base < 1:
            raise DCEPKInputError("baseline_frames must be at least 1 (the pre-contrast frames)")
    if n_base >= n_t:
        raise DCEPKInputError(
            f"{n_base} baseline frames leave no post-contrast frame in a series of {n_t} frames: "
            "give fewer baseline frames or the whole series")
    if int(baseline_start) != baseline_start or not 0 <= int(baseline_start) < n_base:
        raise DCEPKInputError(
            f"baseline_start={baseline_start!r} must be a frame index below baseline_frames={n_base}")
    return int(baseline_start), n_base


def _baseline_level(baseline_frames_signal, sigma):
    """Mean pre-contrast signal per voxel (its Rician floor taken off when ``sigma`` > 0)."""
    with np.errstate(invalid="ignore"):
        if sigma > 0:
            s_base = rician.corrected_baseline(baseline_frames_signal, sigma)
        else:
            s_base = baseline_frames_signal.mean(axis=-1, dtype=np.float64)
    finite_base = np.isfinite(s_base)
    if finite_base.any() and not np.any(s_base[finite_base] > 0):
        raise DCEPKInputError(
            "the baseline (pre-contrast) signal is zero or negative in every voxel: the input "
            "is not a magnitude signal series (is it already concentration or subtracted?)")
    return s_base


def _convert_rows(flat, voxels, lo, hi, conc, valid, sequence) -> None:
    """Rows [lo, hi) of the signal to concentration, into ``conc`` and ``valid``."""
    work, tr, r1, sigma = sequence.work, sequence.tr_s, sequence.r1, sequence.sigma
    s_b, t1b, cos_a = (values[lo:hi] for values in voxels)
    n_t = flat.shape[1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # per-voxel terms in float64, per-frame arithmetic in ``work`` and in place (memory-bound)
        e10 = np.exp(-tr / t1b)
        m = s_b * (1.0 - cos_a * e10) / (1.0 - e10)       # M = S0 sin(a) from the baseline
        if sigma > 0:
            q = rician.corrected_frames(flat[lo:hi], sigma, out=np.empty((hi - lo, n_t), dtype=work))
            np.multiply(q, (1.0 / m).astype(work)[:, None], out=q)
        else:
            q = np.multiply(flat[lo:hi], (1.0 / m).astype(work)[:, None], dtype=work)
        # E1 = (1 - q) / (1 - q cos a); in float32 its rounding (~1e-7) moves the
        # concentration by ~1e-7 / (TR r1), i.e. < 1e-4 mM for TR >= 0.5 ms
        denom = np.multiply(q, cos_a.astype(work)[:, None])
        np.subtract(1.0, denom, out=denom)
        c = np.subtract(1.0, q)
        np.divide(c, denom, out=c)
        np.log(c, out=c)
        np.multiply(c, work.type(-1.0 / (tr * r1)), out=c)
        np.subtract(c, (1.0 / (t1b * r1)).astype(work)[:, None], out=c)
    voxel_ok = np.isfinite(s_b) & (s_b > 0) & np.isfinite(t1b) & (t1b > 0) & np.isfinite(cos_a)
    frame_ok = voxel_ok[:, None] & (q > 0) & (q < 1) & np.isfinite(c)
    c[~frame_ok] = np.nan
    conc[lo:hi] = c
    valid[lo:hi] = frame_ok.all(axis=-1)
