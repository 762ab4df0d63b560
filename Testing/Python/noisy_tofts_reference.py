"""A noisy standard-Tofts reference in the layout of the QIBA DCE-MRI DRO v6, built here from
its own physics (not the package's models), for tests and benchmarks of low-SNR fitting.

Layout (one slice, 80 x 50 voxels, like QIBA v6): rows 0-9 background air (no signal, noise
only); rows 10-69 tissue in 6 bands of 10 rows with Ktrans 0.01-0.35 /min and 5 bands of 10
columns with ve 0.01-0.5; rows 70-79 blood, whose curve is the input function.
Acquisition: spoiled gradient echo, FA 30 deg, TR 5 ms, r1 4.5 /(mM s), haematocrit 0.45;
T10 1.0 s in tissue and 1.44 s in blood. Frames every 6 s for 11 min, bolus arrival after 10
frames (Parker population AIF, whole blood). The tissue curves are integrated on a 0.1 s grid
and sampled at the frame times, as a scanner would see them.

Noise: Rician magnitude noise with SD ``NOISE_FRACTION`` (1 %) of the tissue baseline signal on
each quadrature channel. The blood's equilibrium signal is small (``BLOOD_S0_OVER_NOISE`` noise
SDs at baseline): the input function is measured at a baseline SNR of about 1.5, where the
magnitude's Rician floor biases the baseline signal, and so the input function, badly.
"""

from dataclasses import dataclass

import numpy as np

KTRANS_BANDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35)   # 1/min, 10 rows each from row 10
VE_BANDS = (0.01, 0.05, 0.1, 0.2, 0.5)               # 10 columns each
FA_DEG, TR_S, R1_PER_MM_S, HCT = 30.0, 0.005, 4.5, 0.45
T10_TISSUE_S, T10_BLOOD_S = 1.0, 1.44
FRAME_S, N_FRAMES, BASELINE_FRAMES = 6.0, 110, 10
TISSUE_BASELINE_SIGNAL = 1000.0
NOISE_FRACTION = 0.01
BLOOD_S0_OVER_NOISE = 1.5        # blood baseline signal / noise SD
FINE_STEP_S = 0.1


@dataclass
class NoisyToftsReference:
    signal: np.ndarray            # [1, 80, 50, t] magnitude, float32
    times_s: np.ndarray
    t10_s: np.ndarray             # [1, 80, 50]
    aif_mask: np.ndarray          # blood rows, away from the edges
    tissue_mask: np.ndarray
    air_mask: np.ndarray
    ktrans: np.ndarray            # [1, 80, 50] truth (NaN outside tissue)
    ve: np.ndarray
    noise_sd: float
    plasma_aif_mM: np.ndarray     # true plasma AIF at the frame times


def parker_blood_mM(t_min):
    """Parker et al. MRM 2006 population AIF (whole blood, mM), time in minutes from arrival."""
    t = np.maximum(t_min, 0.0)
    gaussians = sum(a / (s * np.sqrt(2 * np.pi)) * np.exp(-(t - c) ** 2 / (2 * s * s))
                    for a, c, s in ((0.809, 0.17046, 0.0563), (0.330, 0.365, 0.132)))
    return np.where(t_min > 0, gaussians + 1.050 * np.exp(-0.1685 * t) / (1 + np.exp(-38.078 * (t - 0.483))), 0.0)


def spgr(s0, r1_per_s):
    alpha = np.deg2rad(FA_DEG)
    e1 = np.exp(-TR_S * r1_per_s)
    return s0 * np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1)


def tofts_fine(ktrans_per_min, ve, cp_fine):
    """Ktrans int cp(u) exp(-kep (t - u)) du on the fine grid, by an exact recursion per step."""
    kep = ktrans_per_min / ve / 60.0
    decay = np.exp(-kep * FINE_STEP_S)
    out = np.zeros_like(cp_fine)
    for n in range(1, cp_fine.size):
        # trapezoid rule on the fine step: accurate to ~1e-4 relative at 0.1 s
        out[n] = out[n - 1] * decay + 0.5 * FINE_STEP_S * (cp_fine[n] + cp_fine[n - 1] * decay)
    return ktrans_per_min / 60.0 * out


def build(seed=0, noise=True, tissue_baseline=TISSUE_BASELINE_SIGNAL, blood_baseline=None, noise_sd=None,
          quantise=False, dispersion_s=0.0, frame_s=FRAME_S) -> NoisyToftsReference:
    """The reference; by default as the module says. ``tissue_baseline`` / ``blood_baseline``:
    pre-contrast signals (a.u.; blood default ``BLOOD_S0_OVER_NOISE`` noise SDs), ``noise_sd``
    (default ``NOISE_FRACTION`` of the tissue baseline), ``quantise``: stored as whole numbers,
    ``dispersion_s``: the bolus spread by an exponential of this time constant (a slow upslope),
    ``frame_s``: the frame interval (11 min in all). The bolus arrives half a frame before frame
    ``BASELINE_FRAMES``, so the pre-contrast frames are exactly the first ``BASELINE_FRAMES``."""
    rng = np.random.default_rng(seed)
    times = np.arange(int(round(N_FRAMES * FRAME_S / frame_s))) * frame_s
    arrival_s = times[BASELINE_FRAMES] - 0.5 * frame_s
    fine = np.arange(0.0, times[-1] + FINE_STEP_S / 2, FINE_STEP_S)
    blood_fine = parker_blood_mM((fine - arrival_s) / 60.0)
    if dispersion_s > 0:
        kernel = np.exp(-fine / dispersion_s)
        blood_fine = np.convolve(blood_fine, kernel / kernel.sum())[: fine.size]
    plasma_fine = blood_fine / (1 - HCT)
    frame_index = np.rint(times / FINE_STEP_S).astype(int)

    shape = (1, 80, 50)
    ktrans = np.full(shape, np.nan)
    ve = np.full(shape, np.nan)
    t10 = np.full(shape, T10_TISSUE_S)
    t10[:, 70:80] = T10_BLOOD_S
    conc = np.zeros(shape + (times.size,))
    for band, k in enumerate(KTRANS_BANDS):
        for column_band, v in enumerate(VE_BANDS):
            rows = slice(10 + 10 * band, 20 + 10 * band)
            columns = slice(10 * column_band, 10 * column_band + 10)
            ktrans[0, rows, columns] = k
            ve[0, rows, columns] = v
            conc[0, rows, columns] = tofts_fine(k, v, plasma_fine)[frame_index]
    conc[0, 70:80] = blood_fine[frame_index]
    noise_sd = NOISE_FRACTION * tissue_baseline if noise_sd is None else noise_sd
    blood_baseline = BLOOD_S0_OVER_NOISE * noise_sd if blood_baseline is None else blood_baseline
    s0 = np.zeros(shape)   # equilibrium signal: the baseline over the SPGR factor at T10
    s0[:, 10:70] = tissue_baseline / spgr(1.0, 1.0 / T10_TISSUE_S)
    s0[:, 70:80] = blood_baseline / spgr(1.0, 1.0 / T10_BLOOD_S)
    clean = spgr(s0[..., None], 1.0 / t10[..., None] + R1_PER_MM_S * conc)
    if noise:
        clean = np.hypot(clean + rng.normal(0, noise_sd, clean.shape), rng.normal(0, noise_sd, clean.shape))
    if quantise:
        clean = np.rint(clean)
    aif_mask = np.zeros(shape, bool)
    aif_mask[:, 72:78, 2:48] = True
    tissue_mask = np.zeros(shape, bool)
    tissue_mask[:, 10:70] = True
    air_mask = np.zeros(shape, bool)
    air_mask[:, :10] = True
    return NoisyToftsReference(signal=clean.astype(np.float32), times_s=times, t10_s=t10, aif_mask=aif_mask,
                               tissue_mask=tissue_mask, air_mask=air_mask, ktrans=ktrans, ve=ve,
                               noise_sd=noise_sd if noise else 0.0,
                               plasma_aif_mM=plasma_fine[frame_index])


def patch_medians(parameter_map):
    """Median of each 10x10 patch's inner 6x6 voxels (QIBA's way against partial-patch effects)."""
    rows = []
    for band in range(len(KTRANS_BANDS)):
        for column_band in range(len(VE_BANDS)):
            patch = parameter_map[0, 12 + 10 * band: 18 + 10 * band, 10 * column_band + 2: 10 * column_band + 8]
            rows.append(np.nanmedian(patch))
    return np.array(rows)


def qiba_layout(spatial_shape):
    """(T10 map in s, input-function ROI, tissue mask) on a series of this layout (QIBA v6 or ``build``):
    T10 1.0 s in tissue, 1.44 s in the blood rows; the ROI inside the blood rows, away from their edges."""
    t10 = np.full(spatial_shape, 1.0)
    t10[:, 70:80] = 1.44
    roi = np.zeros(spatial_shape, bool)
    roi[:, 72:78, 2:48] = True
    tissue = np.zeros(spatial_shape, bool)
    tissue[:, 10:70] = True
    return t10, roi, tissue


def true_patch_values():
    return np.repeat(KTRANS_BANDS, len(VE_BANDS)), np.tile(VE_BANDS, len(KTRANS_BANDS))


def concordance_correlation(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    covariance = np.mean((x - x.mean()) * (y - y.mean()))
    return 2 * covariance / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
