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


def coverage90(estimate, sd, truth) -> float:
    """Fraction of truths inside the Gaussian 90 % interval estimate +- 1.645 SD."""
    e, s, t = (np.asarray(a, float).ravel() for a in (estimate, sd, truth))
    return float(np.mean(np.abs(e - t) <= Z90 * s))


def error_sd_spearman(estimate, sd, truth) -> float:
    """Spearman rank correlation of |error| with the predicted SD (does the SD rank the errors?)."""
    e, s, t = (np.asarray(a, float).ravel() for a in (estimate, sd, truth))
    return float(stats.spearmanr(np.abs(e - t), s).statistic)


def summarize(estimate, truth, sd=None) -> dict:
    out = {"rmse": rmse(estimate, truth), "bias": bias(estimate, truth), "ccc": ccc(estimate, truth)}
    if sd is not None:
        out["coverage90"] = coverage90(estimate, sd, truth)
        out["spearman_abs_err_sd"] = error_sd_spearman(estimate, sd, truth)
    return out
