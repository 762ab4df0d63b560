"""MR signal physics: spoiled gradient echo (SPGR) signal, variable-flip-angle T1 mapping,
signal to concentration by exact SPGR inversion, bolus-arrival (baseline) detection and
contrast-agent relaxivities.

Units (OSIPI lexicon): T1 in s, R1 in 1/s, flip angle in degrees (``fa_deg``), TR in s
(``tr_s``), concentration in mM, relaxivity r1 in 1/(mM s). ``b1`` is the ratio of actual to
nominal flip angle. Everything is vectorised over whole volumes; time / flip angle is the last
axis (``[k, j, i, t]``, ``[..., nFA]``).
"""

import enum

import numpy as np

from ..core import jobs
from . import rician
from ..core.errors import DCEPKInputError, setting
from ..core.plausibility import check_r1

__all__ = [
    "spgr_signal", "fit_vfa_t1", "T1FitStatus", "signal_to_concentration",
    "detect_baseline_frames", "RELAXIVITY_R1", "default_r1", "check_flip_angle", "check_tr",
]


# --------------------------------------------------------------------------- input checks
def check_flip_angle(fa_deg, name="fa_deg"):
    """Flip angle(s) in degrees as a float array; catches radians and nonsense early."""
    fa = np.asarray(fa_deg, dtype=np.float64)
    shown = ", ".join(f"{v:g}" for v in fa.ravel()[:8])
    if fa.size == 0 or not np.all(np.isfinite(fa)):
        raise DCEPKInputError(f"{name} must be finite flip angle(s) in degrees; got {shown or 'none'}")
    if np.any(fa <= 0) or np.any(fa >= 180):
        raise DCEPKInputError(f"{name} must be between 0 and 180 degrees; got {shown}")
    if np.any(fa < 1.0):
        # Every DCE / VFA protocol uses >= 1 degree; values below 1 are almost surely radians.
        raise DCEPKInputError(
            f"{name} = {shown} looks like radians: pass flip angles in degrees "
            "(e.g. 15, not 0.26)")
    return fa


def check_tr(tr_s):
    """Repetition time in seconds as a float; catches milliseconds given by mistake."""
    name = setting("--tr", "tr_s")
    try:
        tr = float(tr_s)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"{name} must be one number (repetition time in seconds); got {tr_s}") from None
    if not np.isfinite(tr) or tr <= 0:
        raise DCEPKInputError(f"{name} must be a positive repetition time in seconds; got {tr:g}")
    if tr > 1.0:
        raise DCEPKInputError(
            f"{name} = {tr:g} s is longer than 1 s, which no SPGR protocol uses: TR looks like "
            "milliseconds; pass it in seconds (e.g. 0.005 for 5 ms)")
    return tr


def _check_b1(b1, name="b1"):
    b = np.asarray(b1, dtype=np.float64)
    finite = b[np.isfinite(b)]
    if finite.size and (np.any(finite <= 0) or np.any(finite > 5)):
        raise DCEPKInputError(
            f"{name} is the ratio of actual to nominal flip angle (about 0.5-1.5); got values "
            f"from {finite.min():g} to {finite.max():g}. If the map is in percent, divide by 100")
    return b


# --------------------------------------------------------------------------- forward model
def spgr_signal(s0, r1_per_s, fa_deg, tr_s, b1=1.0):
    """Steady-state SPGR signal S0 sin(a) (1 - E1) / (1 - cos(a) E1), E1 = exp(-TR R1).

    T2* decay is ignored (TE << T2*). ``s0`` is the equilibrium magnetisation scaled by the
    receive gain (the signal at 90 degrees with TR >> T1). Arguments broadcast with numpy rules.
    """
    fa = check_flip_angle(fa_deg)
    tr = check_tr(tr_s)
    alpha = np.deg2rad(fa * _check_b1(b1))
    e1 = np.exp(-tr * np.asarray(r1_per_s, dtype=np.float64))
    return np.asarray(s0, dtype=np.float64) * np.sin(alpha) * (1.0 - e1) / (1.0 - np.cos(alpha) * e1)


# --------------------------------------------------------------------------- VFA T1 mapping
class T1FitStatus(enum.IntEnum):
    OK = 0
    NONPOSITIVE_SIGNAL = 1   # a signal <= 0: the SPGR model cannot produce it
    NONPHYSICAL = 2          # fitted E1 = exp(-TR/T1) outside (0, 1): no positive finite T1
    NOT_CONVERGED = 3        # nonlinear fit stopped at the iteration limit (result kept)
    NAN_INPUT = 4            # NaN / inf signal or B1


def _vfa_linear(sig, alpha):
    """DESPOT1: S/sin(a) = E1 * S/tan(a) + M(1 - E1), a straight line per voxel."""
    y = sig / np.sin(alpha)
    x = sig / np.tan(alpha)
    xm = x.mean(axis=-1, keepdims=True)
    ym = y.mean(axis=-1, keepdims=True)
    sxx = np.sum((x - xm) ** 2, axis=-1)
    sxy = np.sum((x - xm) * (y - ym), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = sxy / sxx
        m = (ym[..., 0] - e1 * xm[..., 0]) / (1.0 - e1)
    return e1, m


def _vfa_lm(sig, alpha, e1, m, max_iter=100, tol=1e-10):
    """Levenberg-Marquardt on (M, E1) for all voxels at once (2x2 normal equations each).

    Each iteration works only on the voxels still moving, so converged voxels cost nothing.
    """
    sin_a, cos_a = np.sin(alpha), np.cos(alpha)
    eps = 1e-12
    e1 = np.clip(np.asarray(e1, dtype=np.float64).copy(), eps, 1 - eps)
    m = np.asarray(m, dtype=np.float64).copy()
    lam = np.full(e1.shape, 1e-3)
    converged = np.zeros(e1.shape, bool)

    def model(m_, e_, sa, ca):
        g = sa * (1.0 - e_[:, None]) / (1.0 - ca * e_[:, None])
        return g, m_[:, None] * g

    _, f = model(m, e1, sin_a, cos_a)
    cost = np.sum((sig - f) ** 2, axis=-1)
    active = np.arange(e1.size)
    for _ in range(max_iter):
        if active.size == 0:
            break
        y, sa, ca = sig[active], sin_a[active], cos_a[active]
        ea, ma, la, ca_cost = e1[active], m[active], lam[active], cost[active]
        g, f = model(ma, ea, sa, ca)
        r = y - f
        dg = sa * (ca - 1.0) / (1.0 - ca * ea[:, None]) ** 2
        j0, j1 = g, ma[:, None] * dg
        a00, a01, a11 = np.sum(j0 * j0, -1), np.sum(j0 * j1, -1), np.sum(j1 * j1, -1)
        b0, b1_ = np.sum(j0 * r, -1), np.sum(j1 * r, -1)
        d00, d11 = a00 * (1 + la), a11 * (1 + la)
        det = d00 * d11 - a01 * a01
        with np.errstate(divide="ignore", invalid="ignore"):
            dm = (d11 * b0 - a01 * b1_) / det
            de = (d00 * b1_ - a01 * b0) / det
        dm = np.where(np.isfinite(dm), dm, 0.0)
        de = np.where(np.isfinite(de), de, 0.0)
        m_new = ma + dm
        e_new = np.clip(ea + de, eps, 1 - eps)
        _, f_new = model(m_new, e_new, sa, ca)
        cost_new = np.sum((y - f_new) ** 2, axis=-1)
        better = cost_new < ca_cost
        small_step = np.abs(e_new - ea) <= tol * np.maximum(ea, 1e-6)
        small_gain = (ca_cost - cost_new) <= tol * np.maximum(ca_cost, 1e-300)
        m[active] = np.where(better, m_new, ma)
        e1[active] = np.where(better, e_new, ea)
        cost[active] = np.where(better, cost_new, ca_cost)
        lam[active] = np.where(better, la / 3.0, la * 4.0)
        done = (better & (small_step | small_gain)) | (lam[active] > 1e12)
        converged[active[done]] = True
        active = active[~done]
    return e1, m, converged


def fit_vfa_t1(signals, fa_deg, tr_s, method="linear", b1=None, progress=None, cancel=None):
    """Variable-flip-angle T1 from SPGR signals.

    signals: (..., nFA) magnitudes; fa_deg: (nFA,) nominal flip angles in degrees; tr_s: TR (s);
    method: 'linear' (DESPOT1 regression) or 'nonlinear' (least squares on the signals,
    Levenberg-Marquardt started from the linear fit); b1: None, scalar or (...) map of actual /
    nominal flip angle. Returns (t1_s, s0, status) with shapes (...); t1_s and s0 are NaN where
    status is NONPOSITIVE_SIGNAL, NONPHYSICAL or NAN_INPUT (see ``T1FitStatus``).
    ``progress(fraction, message)`` and ``cancel`` (``is_set()``) follow ``jobs``.
    """
    if method not in ("linear", "nonlinear"):
        raise DCEPKInputError(f"unknown VFA fit method '{method}': use 'linear' or 'nonlinear'")
    sig = np.asarray(signals, dtype=np.float64)
    fa = check_flip_angle(fa_deg).ravel()
    tr = check_tr(tr_s)
    if sig.ndim == 0 or sig.shape[-1] != fa.size:
        raise DCEPKInputError(
            f"signals have shape {sig.shape} but {fa.size} flip angles were given: the last axis "
            "must hold one signal per flip angle")
    if fa.size < 2 or np.unique(fa).size < 2:
        raise DCEPKInputError("VFA T1 mapping needs at least two different flip angles")
    spatial = sig.shape[:-1]
    if b1 is not None and np.asarray(b1).ndim > 0 and np.asarray(b1).shape != spatial:
        raise DCEPKInputError(f"B1 map of shape {np.asarray(b1).shape} does not match the signals' grid {spatial}")
    b1_map = np.ones(spatial) if b1 is None else np.broadcast_to(_check_b1(b1), spatial)

    flat = sig.reshape(-1, fa.size)
    b1_flat = b1_map.reshape(-1)
    alpha = np.deg2rad(fa[None, :] * b1_flat[:, None])
    n = flat.shape[0]
    status = np.full(n, T1FitStatus.OK, dtype=np.uint8)
    nan_in = ~np.all(np.isfinite(flat), axis=-1) | ~np.isfinite(b1_flat)
    nonpos = ~nan_in & np.any(flat <= 0, axis=-1)
    status[nan_in] = T1FitStatus.NAN_INPUT
    status[nonpos] = T1FitStatus.NONPOSITIVE_SIGNAL
    good = status == T1FitStatus.OK

    e1 = np.full(n, np.nan)
    m = np.full(n, np.nan)
    good_idx = np.flatnonzero(good)
    chunk = 500_000
    for lo in range(0, good_idx.size, chunk):
        jobs.raise_if_cancelled(cancel)
        idx = good_idx[lo:lo + chunk]
        y, a = flat[idx], alpha[idx]
        e1_lin, m_lin = _vfa_linear(y, a)
        if method == "nonlinear":
            # Start the few voxels whose linear fit is non-physical from a neutral guess
            # (T1 = 1 s, M scaled to the data) so noise in the line does not doom them.
            bad0 = ~((e1_lin > 0) & (e1_lin < 1) & np.isfinite(m_lin) & (m_lin > 0))
            e_init = np.where(bad0, np.exp(-tr / 1.0), e1_lin)
            g0 = np.sin(a) * (1 - e_init[:, None]) / (1 - np.cos(a) * e_init[:, None])
            m_init = np.where(bad0, np.sum(y * g0, -1) / np.sum(g0 * g0, -1), m_lin)
            e_fit, m_fit, conv = _vfa_lm(y, a, e_init, m_init)
            status[idx[~conv]] = T1FitStatus.NOT_CONVERGED
            e1[idx], m[idx] = e_fit, m_fit
            # E1 pinned at the clip limits means the optimum lies outside (0, 1).
            pinned = (e_fit <= 1e-11) | (e_fit >= 1 - 1e-11)
            status[idx[pinned]] = T1FitStatus.NONPHYSICAL
        else:
            e1[idx], m[idx] = e1_lin, m_lin
        jobs.report(progress, min(1.0, (lo + idx.size) / good_idx.size), f"VFA T1 ({method})")
    physical = (e1 > 0) & (e1 < 1) & np.isfinite(m) & (m > 0)
    status[good & ~physical] = T1FitStatus.NONPHYSICAL
    keep = (status == T1FitStatus.OK) | (status == T1FitStatus.NOT_CONVERGED)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(keep, -tr / np.log(e1), np.nan)
    s0 = np.where(keep, m, np.nan)
    return t1.reshape(spatial), s0.reshape(spatial), status.reshape(spatial)


# --------------------------------------------------------------------------- baseline
def detect_baseline_frames(signal_or_curve, min_frames=1, times_s=None, no_arrival_s=None):
    """Number of pre-contrast (baseline) frames: those before the bolus reaches the most enhancing
    voxels. The project's one detector (fitting, inference, the modules and the command line).

    Accepts one curve (T,) or a series (..., T) of signal or concentration; ``times_s`` (T,) the
    frame times (default: evenly spaced). For a series the curve is the mean of the most
    enhancing 10 % of the voxels (arteries and enhancing tissue), whose noise is small even when
    each voxel's is large or its values are small integers. Then:

    1. the onset is the breakpoint of a constant baseline followed by a quadratic rise, fitted by
       least squares to the frames up to half the peak rise (piecewise-continuous regression,
       Cheong et al., Phys Med Biol 2003;48:N83-N88): it follows the foot of the upslope instead
       of a threshold crossing, which lags by a frame or two where the signal is low or noisy;
    2. stepping back, no baseline frame may stand out: while the last one rises above the mean of
       those before it by more than 2.5 noise SD (the noise SD from the median absolute
       frame-to-frame difference, which the enhancement barely affects) and 0.5 % of the peak
       rise, it is given up.

    Returns at least ``min_frames`` (and at least 1). With no clear arrival (the rise is under 5
    noise SD) raises ``DCEPKInputError``, or, given ``no_arrival_s``, returns the frames of the
    first ``no_arrival_s`` seconds (at least 2 where the series allows).
    """
    curve = _enhancing_population_curve(signal_or_curve)
    n_t = curve.size
    t = np.arange(n_t, dtype=np.float64) if times_s is None else np.asarray(times_s, dtype=np.float64).ravel()
    if t.size != n_t:
        raise DCEPKInputError(f"{t.size} frame times for a series of {n_t} frames: give one time (s) per frame")
    floor = max(1e-9 * float(np.max(np.abs(curve))), 1e-300)
    sigma = max(_noise_sd(curve), floor)
    level = float(np.median(curve[: max(2, min(5, n_t // 4))]))
    peak = int(np.argmax(curve))
    rise = curve[peak] - level
    if peak == 0 or rise <= 5.0 * sigma:
        if no_arrival_s is None:
            raise DCEPKInputError(
                "no contrast arrival found in the time course (no frame rises clearly above the noise): "
                "give the number of pre-contrast frames (baseline_frames, --baseline-frames) yourself")
        count = int(np.searchsorted(t - t[0], float(no_arrival_s)))
        return int(min(max(count, min(2, n_t - 1), int(min_frames), 1), n_t - 1))
    end = max(int(np.argmax(curve - level >= 0.5 * rise)), 1)
    count = _onset_frames(t[: end + 1], curve[: end + 1])
    if count >= 6:   # the frames before the onset are (nearly) all noise: a closer measure of it
        sigma = max(_noise_sd(curve[:count]), floor)
    # risen: above 2.5 noise SD, and above 0.5 % of the peak rise (systematic effects of the voxel
    # choice are far above the population curve's own tiny noise)
    threshold = max(2.5 * sigma, 0.005 * rise)
    while count > 1 and curve[count - 1] - curve[: count - 1].mean() > threshold * np.sqrt(1 + 1 / (count - 1)):
        count -= 1
    return max(int(count), int(min_frames), 1)


_FLICKER_RATIO = 8.0   # rise / mean absolute frame-to-frame change below which a voxel flickers


def _noise_sd(curve):
    """Noise SD of a curve from the median absolute frame-to-frame difference."""
    return 1.4826 * float(np.median(np.abs(np.diff(curve)))) / np.sqrt(2.0)


def _enhancing_population_curve(signal_or_curve):
    """The curve (T,) itself, or the mean of the most enhancing 10 % of a series' voxels."""
    data = np.asarray(signal_or_curve)
    if data.dtype.kind not in "fiu":
        data = data.astype(np.float64)
    if data.ndim == 0 or data.shape[-1] < 3:
        raise DCEPKInputError(
            f"baseline detection needs a time course of at least 3 frames; got shape {data.shape}")
    if data.ndim == 1:
        curve = data.astype(np.float64)
        if not np.all(np.isfinite(curve)):
            raise DCEPKInputError("the curve contains NaN or inf values: remove or mask them first")
        return curve
    return _most_enhancing_mean(data.reshape(-1, data.shape[-1]))


def _onset_frames(t, curve, steps_per_frame=20):
    """Frames before the breakpoint b of y = c0 for t < b, c0 + c1 (t - b)^2 after (c1 >= 0),
    the least-squares fit over b on a grid inside each frame interval (ties: the earliest b)."""
    offsets = (np.arange(steps_per_frame) + 0.5) / steps_per_frame
    b = (t[:-1, None] + offsets[None, :] * np.diff(t)[:, None]).ravel()          # (G,)
    x = np.clip(t[None, :] - b[:, None], 0.0, None) ** 2                          # (G, T)
    xm = x.mean(-1, keepdims=True)
    ym = curve.mean()
    sxx = ((x - xm) ** 2).sum(-1)
    sxy = ((x - xm) * (curve - ym)).sum(-1)
    slope = np.where(sxx > 0, np.maximum(sxy, 0.0) / np.maximum(sxx, 1e-300), 0.0)
    ssr = ((curve - ym) ** 2).sum() - 2 * slope * sxy + slope * slope * sxx
    best = float(b[int(np.argmin(ssr))])
    return int(np.searchsorted(t, best, side="left"))


def _most_enhancing_mean(flat: np.ndarray, block: int = 65536) -> np.ndarray:
    """Mean curve (float64) of the 10 % most enhancing voxels with a finite curve, by blocks of
    voxels (no float64 copy of a whole series in memory).

    The reference level spans several frames: choosing voxels by their rise above it favours
    those whose noise happened to be low there, and a short reference made the next frame look
    risen. A bolus rises once, so its mean absolute frame-to-frame change is a small fraction of
    its rise; flicker (burnt-in text such as a frame counter) jumps by its full range every few
    frames, and is left out unless nearly every voxel looks so (a very noisy series)."""
    n_t = flat.shape[1]
    head = max(2, min(10, n_t // 4))
    enhancement = np.full(flat.shape[0], np.nan)
    roughness = np.full(flat.shape[0], np.nan)
    for start in range(0, flat.shape[0], block):
        part = np.asarray(flat[start:start + block], dtype=np.float64)
        finite = np.all(np.isfinite(part), axis=-1)
        enhancement[start:start + block][finite] = part[finite].max(-1) - np.median(part[finite, :head], axis=-1)
        roughness[start:start + block][finite] = np.abs(np.diff(part[finite], axis=-1)).mean(-1)
    finite = np.isfinite(enhancement)
    if not finite.any():
        raise DCEPKInputError("no voxel of the series has a finite time course (all NaN / inf)")
    steady = finite & (enhancement > _FLICKER_RATIO * roughness)
    usable = steady if steady.sum() >= 0.1 * finite.sum() else finite
    top = usable & (enhancement >= np.quantile(enhancement[usable], 0.9))
    total, count = np.zeros(n_t), 0
    for start in range(0, flat.shape[0], block):
        chosen = top[start:start + block]
        if chosen.any():
            total += np.asarray(flat[start:start + block][chosen], dtype=np.float64).sum(axis=0)
            count += int(chosen.sum())
    return total / count


# --------------------------------------------------------------------------- concentration
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
    fa = check_flip_angle(fa_deg)
    if fa.size != 1:
        raise DCEPKInputError("signal_to_concentration takes one flip angle (the dynamic series')")
    tr = check_tr(tr_s)
    r1 = check_r1(r1_per_mM_s)
    if sig.ndim == 0 or sig.shape[-1] < 2:
        raise DCEPKInputError(f"signal needs a time axis (last) with at least 2 frames; got shape {sig.shape}")
    n_t = sig.shape[-1]
    if not np.any(np.isfinite(sig)):
        raise DCEPKInputError("the signal is NaN / inf everywhere: check the loaded series")
    spatial = sig.shape[:-1]
    t10 = check_t10(t10_s, spatial)
    b1v = _check_b1(b1)
    if b1v.ndim > 0 and b1v.shape != spatial:
        raise DCEPKInputError(f"B1 map of shape {b1v.shape} does not match the series' grid {spatial}")

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
    start = int(baseline_start)

    sigma = float(noise_sigma) if noise_sigma is not None else 0.0
    if not (np.isfinite(sigma) and sigma >= 0):
        raise DCEPKInputError(f"noise_sigma must be a noise SD >= 0 in signal units; got {noise_sigma!r}")
    with np.errstate(invalid="ignore"):
        if sigma > 0:
            s_base = rician.corrected_baseline(sig[..., start:n_base], sigma)
        else:
            s_base = sig[..., start:n_base].mean(axis=-1, dtype=np.float64)
    finite_base = np.isfinite(s_base)
    if finite_base.any() and not np.any(s_base[finite_base] > 0):
        raise DCEPKInputError(
            "the baseline (pre-contrast) signal is zero or negative in every voxel: the input "
            "is not a magnitude signal series (is it already concentration or subtracted?)")

    # Work on voxel chunks of ~2 MB per float64 temporary: they stay in the CPU cache, which on
    # 2 cores made the conversion ~1.8x faster than 16 MB chunks; memory stays small too.
    flat = sig.reshape(-1, n_t)
    n_vox = flat.shape[0]
    base_flat = s_base.reshape(-1)
    t10_flat = np.broadcast_to(t10, spatial).reshape(-1)
    cos_flat = np.cos(np.deg2rad(fa.item() * np.broadcast_to(b1v, spatial).reshape(-1)))
    if out is not None and (np.shape(out) != sig.shape or out.dtype.kind != "f" or not out.flags.c_contiguous):
        raise DCEPKInputError(f"out must be a contiguous float array of the signal's shape {sig.shape}")
    conc = np.empty((n_vox, n_t), dtype=work) if out is None else out.reshape(n_vox, n_t)
    valid = np.empty(n_vox, bool)
    chunk = max(1, 262_144 // n_t)
    for lo in range(0, n_vox, chunk):
        jobs.raise_if_cancelled(cancel)
        hi = min(lo + chunk, n_vox)
        s_b, t1b, cos_a = base_flat[lo:hi], t10_flat[lo:hi], cos_flat[lo:hi]
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
        jobs.report(progress, hi / n_vox, "signal to concentration")
    return conc.reshape(sig.shape), valid.reshape(spatial)


# --------------------------------------------------------------------------- relaxivity
# Longitudinal relaxivity r1 in 1/(mM s) in human plasma at 37 C, from
# Rohrer M, Bauer H, Mintorovitch J, Requardt M, Weinmann H-J. Comparison of magnetic properties
# of MRI contrast media solutions at different magnetic field strengths. Invest Radiol
# 2005;40(11):715-724 (Table 3, plasma). Keys are generic names; brand names are aliases.
RELAXIVITY_R1 = {
    "gadoterate": {1.5: 3.6, 3.0: 3.5},     # Dotarem, Clariscan
    "gadobutrol": {1.5: 5.2, 3.0: 5.0},     # Gadovist, Gadavist
    "gadopentetate": {1.5: 4.1, 3.0: 3.7},  # Magnevist
    "gadoteridol": {1.5: 4.1, 3.0: 3.7},    # ProHance
    "gadobenate": {1.5: 6.3, 3.0: 5.5},     # MultiHance
}
_AGENT_ALIASES = {
    "dotarem": "gadoterate", "clariscan": "gadoterate", "gd-dota": "gadoterate",
    "gadovist": "gadobutrol", "gadavist": "gadobutrol", "gd-bt-do3a": "gadobutrol",
    "magnevist": "gadopentetate", "gd-dtpa": "gadopentetate",
    "prohance": "gadoteridol", "gd-hp-do3a": "gadoteridol",
    "multihance": "gadobenate", "gd-bopta": "gadobenate",
}


def default_r1(agent="gadoterate", field_T=3.0):
    """Plasma r1 (1/(mM s)) of a Gd agent at 1.5 T or 3 T (Rohrer et al. 2005)."""
    key = str(agent).strip().lower()
    key = _AGENT_ALIASES.get(key, key)
    if key not in RELAXIVITY_R1:
        raise DCEPKInputError(
            f"unknown contrast agent '{agent}': use one of {sorted(RELAXIVITY_R1)} (or a brand "
            "name such as Dotarem, Gadovist) or give r1 in 1/(mM s) yourself")
    try:
        field = float(field_T)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"field_T must be a field strength in tesla; got {field_T!r}") from None
    for tabulated, r1 in RELAXIVITY_R1[key].items():
        if abs(field - tabulated) <= 0.1:
            return r1
    raise DCEPKInputError(
        f"no tabulated r1 for {key} at {field_T} T (only 1.5 T and 3 T): give r1 in 1/(mM s) yourself")
