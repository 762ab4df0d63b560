"""Agreement and calibration metrics shared by training validation, tests and the benchmark."""

import numpy as np
from scipy import stats

Z90 = 1.6448536269514722  # two-sided 90 % interval of a Gaussian: mean +- Z90 * SD


def rmse(estimate, truth) -> float:
    e, t = np.asarray(estimate, float).ravel(), np.asarray(truth, float).ravel()
    return float(np.sqrt(np.mean((e - t) ** 2)))


def bias(estimate, truth) -> float:
    return float(np.mean(np.asarray(estimate, float) - np.asarray(truth, float)))


def ccc(estimate, truth) -> float:
    """Lin's concordance correlation coefficient."""
    x, y = np.asarray(estimate, float).ravel(), np.asarray(truth, float).ravel()
    mx, my = x.mean(), y.mean()
    cov = np.mean((x - mx) * (y - my))
    denominator = x.var() + y.var() + (mx - my) ** 2
    return float(2 * cov / denominator) if denominator > 0 else float("nan")


def inside90(estimate, sd, truth):
    """Elementwise: is the truth inside the Gaussian 90 % interval estimate +- 1.645 SD?"""
    e, s, t = (np.asarray(a, float) for a in (estimate, sd, truth))
    return np.abs(e - t) <= Z90 * s


def coverage90(estimate, sd, truth) -> float:
    """Fraction of truths inside the Gaussian 90 % interval estimate +- 1.645 SD."""
    return float(np.mean(inside90(estimate, sd, truth)))


def error_sd_spearman(estimate, sd, truth) -> float:
    """Spearman rank correlation of |error| with the predicted SD (does the SD rank the errors?)."""
    e, s, t = (np.asarray(a, float).ravel() for a in (estimate, sd, truth))
    return float(stats.spearmanr(np.abs(e - t), s).statistic)


# Gross error: |estimate - truth| > max(floor, half the truth). Ktrans's floor is the 0.05 /min;
# ve and vp take the OSIPI absolute tolerances (0.05, 0.025), kep 0.5 /min (0.05 /min over a ve of 0.1).
GROSS_ERROR_FLOOR = {"Ktrans": 0.05, "ve": 0.05, "vp": 0.025, "kep": 0.5}
GROSS_ERROR_RELATIVE = 0.5


def median_abs_error(estimate, truth) -> float:
    e, t = np.asarray(estimate, float).ravel(), np.asarray(truth, float).ravel()
    return float(np.median(np.abs(e - t)))


def is_gross_error(estimate, truth, parameter: str):
    """Elementwise: |error| > max(GROSS_ERROR_FLOOR[parameter], half the truth); NaN estimates count."""
    e, t = np.asarray(estimate, float), np.asarray(truth, float)
    with np.errstate(invalid="ignore"):
        return ~(np.abs(e - t) <= np.maximum(GROSS_ERROR_FLOOR[parameter], GROSS_ERROR_RELATIVE * np.abs(t)))


def gross_error_fraction(estimate, truth, parameter: str) -> float:
    return float(np.mean(is_gross_error(estimate, truth, parameter)))


def icc_a1(ratings) -> float:
    """ICC(A,1), two-way model, absolute agreement, single rater (McGraw & Wong 1996, case A,1):
    ``ratings`` (n subjects, k raters). (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n)."""
    x = np.asarray(ratings, dtype=np.float64)
    n, k = x.shape
    grand = x.mean()
    msr = k * np.sum((x.mean(1) - grand) ** 2) / (n - 1)
    msc = n * np.sum((x.mean(0) - grand) ** 2) / (k - 1)
    resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + grand
    mse = np.sum(resid ** 2) / ((n - 1) * (k - 1))
    return float((msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n))


KEP_VE_FLOOR = 0.01   # kep = Ktrans / ve is undefined as ve -> 0


def kep_with_sd(ktrans, ve, ktrans_sd, ve_sd):
    """kep = Ktrans / max(ve, KEP_VE_FLOOR) (1/min) and its SD by first-order propagation (Ktrans and ve
    errors taken as independent); where Ktrans ~ 0 the relative form is unstable: SD(Ktrans) / ve."""
    ktrans, ktrans_sd, ve_sd = (np.asarray(a, dtype=np.float32) for a in (ktrans, ktrans_sd, ve_sd))
    ve = np.maximum(np.asarray(ve, dtype=np.float32), KEP_VE_FLOOR)
    kep = ktrans / ve
    relative = np.sqrt((ktrans_sd / np.maximum(ktrans, 1e-6)) ** 2 + (ve_sd / ve) ** 2)
    return kep, np.where(ktrans > 1e-6, kep * relative, ktrans_sd / ve)


def agreement(estimate, truth, sd=None) -> dict:
    """RMSE, bias and CCC of an estimate against the truth (and, with its SD, 90 % coverage and the SD's rank
    correlation with the error). (``analysis.stats.summarize`` of the fitting core describes one sample.)"""
    out = {"rmse": rmse(estimate, truth), "bias": bias(estimate, truth), "ccc": ccc(estimate, truth)}
    if sd is not None:
        out["coverage90"] = coverage90(estimate, sd, truth)
        out["spearman_abs_err_sd"] = error_sd_spearman(estimate, sd, truth)
    return out


def group_bootstrap_interval(statistic, n_groups: int, level: float = 0.9, draws: int = 2000, seed: int = 0):
    """Percentile interval of ``statistic(group_indices)`` over resamples of whole groups.

    Voxels of one simulated subject share its AIF, so their errors are not independent: the
    subject, not the voxel, is the unit to resample. Returns (low, high)."""
    picks = np.random.default_rng(seed).integers(0, n_groups, size=(draws, n_groups))
    values = np.array([statistic(p) for p in picks])
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
