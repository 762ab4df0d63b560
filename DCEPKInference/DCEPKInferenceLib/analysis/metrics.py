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
