"""Noise of magnitude MR images: the noise level, and the Rician bias of low signals.

A magnitude image is |A + n_re + i n_im| with Gaussian noise of SD sigma on each quadrature
channel, so its value M follows a Rician distribution: E[M^2] = A^2 + 2 sigma^2, and at low SNR
E[M] > A (pure noise reads sigma sqrt(pi / 2) ~ 1.25 sigma). Concentration from such a signal
is biased where the signal is low, above all a dark blood baseline: its floor-lifted S0 makes
every enhancement ratio, and so the input function, too small, and Ktrans too large.

What is done here, and why (the choice for ``signal_to_concentration``):

* sigma is estimated from the baseline frames of all voxels: each voxel's baseline mean and SD
  give sigma through Koay & Basser's correction factor xi(theta) (Koay CG, Basser PJ, J Magn
  Reson 2006;179:317-322), which holds from pure noise (background air, SD = 0.655 sigma) to
  tissue (SD = sigma); the median over voxels is robust to the few whose baseline is not flat.
* a baseline (several frames of the same A) is corrected by its second moment,
  A^2 = mean(M^2) - 2 sigma^2, which is unbiased for A^2 at any SNR (the power-image correction
  of Gudbjartsson & Patz, Magn Reson Med 1995;34:910-914; McGibney & Smith 1993);
* a single frame by A = sqrt(|M^2 - sigma^2|) (Gudbjartsson & Patz), unbiased to first order
  at SNR >= 2: the contrast-enhanced frames of blood and tissue are well above that.

Below an SNR of about 2 a single voxel carries too little to correct: an arterial ROI is
averaged first (its mean power, ``aif.aif_from_roi_signal``), then corrected and converted.
Fitting in the signal domain with a Rician likelihood would do the same with more machinery;
at the SNR of tissue (>= 5) the two agree, and the correction keeps the fast concentration fit.
"""

from typing import Optional

import numpy as np
from scipy.special import i0e, i1e
from scipy.stats import chi2

# mean / SD of pure Rician noise (A = 0): below it the voxel's SNR reads as zero
_NOISE_ONLY_MEAN_OVER_SD = np.sqrt(np.pi / (4.0 - np.pi))
_CLEAR_SNR = 5.0
_MIN_CLEAR_VOXELS = 20


def koay_basser_xi(theta):
    """Correction factor xi(theta) = Var(M) / sigma^2 of a Rician M at SNR theta = A / sigma."""
    theta = np.asarray(theta, dtype=np.float64)
    x = theta * theta / 4.0
    # exp(-theta^2 / 2) [I0, I1 (theta^2 / 4)]^2 written with the scaled Bessel functions
    bracket = (2.0 + theta * theta) * i0e(x) + theta * theta * i1e(x)
    return np.maximum(2.0 + theta * theta - np.pi / 8.0 * bracket * bracket, 1e-12)


def snr_from_mean_and_sd(mean, sd, iterations=40):
    """theta = A / sigma from the sample mean and SD of Rician values (Koay & Basser's fixed point)."""
    mean = np.asarray(mean, dtype=np.float64)
    sd = np.asarray(sd, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sd > 0, mean / sd, np.inf)
    finite = np.isfinite(ratio)
    theta = np.where(finite & (ratio > _NOISE_ONLY_MEAN_OVER_SD), np.where(finite, ratio, 0.0), 0.0)
    above = theta > 0
    r2 = np.where(above, ratio, 0.0) ** 2
    for _ in range(iterations):
        theta = np.where(above, np.sqrt(np.maximum(koay_basser_xi(theta) * (1.0 + r2) - 2.0, 0.0)), 0.0)
    return np.where(finite, theta, np.inf)


def estimate_noise_sigma(signal, baseline_frames: int, start: int = 0, max_voxels: int = 200_000) -> Optional[float]:
    """Noise SD per quadrature channel (signal units) from the baseline frames of a magnitude
    series (..., T); None when it cannot be told (fewer than 3 baseline frames or no voxel with a
    signal). 0.0 for a noise-free series (every baseline flat)."""
    n_base = int(baseline_frames) - int(start)
    if n_base < 3:
        return None
    flat = np.asarray(signal).reshape(-1, np.shape(signal)[-1])
    if flat.shape[0] > max_voxels:  # an evenly spaced sample is plenty for one number
        flat = flat[:: -(-flat.shape[0] // max_voxels)]
    base = np.asarray(flat[:, start:start + n_base], dtype=np.float64)
    base = base[np.all(np.isfinite(base), axis=1)]
    mean = base.mean(axis=1)
    sd = base.std(axis=1, ddof=1)
    informative = ~((mean == 0) & (sd == 0))   # zero padding carries no noise
    if not informative.any():
        return None
    mean, sd = mean[informative], sd[informative]
    if np.median(sd) == 0:
        return 0.0
    # median of a scaled chi-square(n - 1) / (n - 1) sample: divide by its median to get the mean
    chi2_median = chi2.median(n_base - 1) / (n_base - 1)

    def pooled(sd_, theta_):
        return float(np.sqrt(np.median(sd_ * sd_ / koay_basser_xi(theta_)) / chi2_median))

    theta = snr_from_mean_and_sd(mean, sd)
    sigma = pooled(sd, np.where(np.isfinite(theta), theta, 1e3))
    # Voxels well above the noise (xi > 0.95) give sigma almost directly, while a voxel's own
    # mean / SD ratio is too noisy to correct pure noise well (~15 % low). Choose them by their
    # mean against that first estimate (choosing by the ratio would pick small SDs).
    clear = mean >= _CLEAR_SNR * sigma
    if clear.sum() >= _MIN_CLEAR_VOXELS:
        sigma = pooled(sd[clear], np.sqrt(np.maximum((mean[clear] / sigma) ** 2 - 1.0, 0.0)))
    return sigma


def corrected_baseline(baseline_frames_signal, sigma, axis=-1):
    """A of a baseline from its frames: sqrt(mean(M^2) - 2 sigma^2), 0 where noise only."""
    m = np.asarray(baseline_frames_signal, dtype=np.float64)
    power = np.mean(m * m, axis=axis)
    return np.sqrt(np.maximum(power - 2.0 * float(sigma) ** 2, 0.0))


def corrected_frames(signal, sigma, out=None):
    """A of single frames: sqrt(|M^2 - sigma^2|) (Gudbjartsson & Patz, whose absolute value keeps
    a frame that noise took below sigma positive instead of zero), in place with ``out``."""
    m = np.asarray(signal)
    out = np.multiply(m, m, out=out)
    np.subtract(out, out.dtype.type(float(sigma) ** 2), out=out)
    np.abs(out, out=out)
    return np.sqrt(out, out=out)
