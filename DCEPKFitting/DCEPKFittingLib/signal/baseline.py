"""The project's one baseline detector: the pre-contrast frames before the bolus arrives, from the most
enhancing voxels' mean curve (robust to flicker and noise)."""

import numpy as np

from ..core.errors import DCEPKInputError


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
