"""Plausibility of unit-bearing inputs: each check names the likely unit mistake.

Flip angle, TR and T10 are checked where they are used (``signal.check_flip_angle``,
``check_tr``, ``check_t10``); this module holds the rest:

- relaxivity r1 in 1/(mM s): gadolinium agents lie at about 3-7 (Rohrer et al. 2005), iron oxides
  up to ~20; accepted: ``R1_RANGE_PER_MM_S``. 0.0035 is 3.5 converted the wrong way between M and mM.
- frame times in s: a median frame interval over ``MAX_FRAME_INTERVAL_S`` or a series longer than
  ``MAX_SERIES_SPAN_S`` is milliseconds; an interval under ``MIN_FRAME_INTERVAL_S``, minutes.
- signal vs concentration, from the values themselves (a sample of voxels): concentration is about
  0 mM before the bolus, magnitude signal is never negative.
- the input function from an ROI: an artery or vein peaks at several mM after a standard dose and
  above every tissue curve; and the fit's R^2. These give warnings, not errors (the data may be
  unusual), carried in the fit's ``PKFit.messages`` and printed by ``dcepk fit``.
"""

import math
from typing import List, Optional

import numpy as np

from .errors import DCEPKInputError, setting

R1_RANGE_PER_MM_S = (1.0, 50.0)
MAX_FRAME_INTERVAL_S = 300.0
MAX_SERIES_SPAN_S = 3 * 3600.0
MIN_FRAME_INTERVAL_S = 0.05
MAX_BASELINE_CONCENTRATION_MM = 20.0   # 90th percentile of voxels' pre-contrast level
MAX_NEGATIVE_SIGNAL_FRACTION = 0.05
MIN_VESSEL_PEAK_MM = 1.0               # blood; a standard dose peaks at ~3-10 mM
SAMPLE_VOXELS = 20000


def check_r1(r1_per_mM_s) -> float:
    """Relaxivity in 1/(mM s) as a float; values 1000x off name the M / mM mix-up."""
    try:
        r1 = float(r1_per_mM_s)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"the relaxivity r1 must be one number in 1/(mM s); got {r1_per_mM_s}") from None
    name = setting("--r1", "r1_per_mM_s")
    low, high = R1_RANGE_PER_MM_S
    if not math.isfinite(r1) or r1 <= 0:
        raise DCEPKInputError(f"{name} = {r1:g} is not plausible: give a positive relaxivity in 1/(mM s) "
                              "(gadolinium agents: about 3-7)")
    if r1 < low:
        hint = (f"it looks converted the wrong way between M and mM: in 1/(mM s) it is {r1 * 1000:g}"
                if low <= r1 * 1000 <= high else "give it in 1/(mM s)")
        raise DCEPKInputError(f"{name} = {r1:g} 1/(mM s) is not plausible, far below any contrast agent's "
                              f"relaxivity (gadolinium: about 3-7 1/(mM s)): {hint}")
    if r1 > high:
        hint = (f"it looks like 1/(M s); in 1/(mM s) it is {r1 / 1000:g}" if low <= r1 / 1000 <= high
                else "give it in 1/(mM s)")
        raise DCEPKInputError(f"{name} = {r1:g} 1/(mM s) is not plausible, far above any contrast agent's "
                              f"relaxivity (gadolinium: about 3-7 1/(mM s)): {hint}")
    return r1


def check_frame_times(times_s, what: str = "the frame times") -> None:
    """Refuse frame times that cannot be seconds (``what`` names where they came from)."""
    times = np.asarray(times_s, dtype=np.float64)
    if times.size < 2:
        return
    interval = float(np.median(np.diff(times)))
    span = float(times[-1] - times[0])
    fix = (f"give seconds ({setting('--dt', 'dt_s')} / {setting('--times', 'times_s')}; a file's own timing is "
           f"replaced with {setting('--override-timing', 'override_file_timing=True')})")
    if interval > MAX_FRAME_INTERVAL_S or span > MAX_SERIES_SPAN_S:
        raise DCEPKInputError(
            f"{what} put the frames {interval:g} s apart ({span / 3600:.1f} h in all), slower than any DCE "
            f"acquisition: they look like milliseconds (an interval of {interval / 1000:g} s); {fix}")
    if interval < MIN_FRAME_INTERVAL_S:
        raise DCEPKInputError(
            f"{what} put the frames {interval:g} s apart, faster than any DCE acquisition: they look like minutes "
            f"(an interval of {interval * 60:g} s); {fix}")


def _sample_curves(series: np.ndarray) -> np.ndarray:
    """Up to ``SAMPLE_VOXELS`` evenly spaced voxels' curves (N, T) as float64, finite ones only."""
    flat = series.reshape(-1, series.shape[-1])
    step = max(1, flat.shape[0] // SAMPLE_VOXELS)
    curves = np.asarray(flat[::step], dtype=np.float64)
    return curves[np.all(np.isfinite(curves), axis=-1)]


def check_series_kind(series: np.ndarray, kind: str, baseline_frames: Optional[int] = None) -> None:
    """Refuse a signal series read as concentration, or concentration (or subtracted images) read as
    signal, from the values: concentration is ~0 mM before the bolus; magnitude signal is never negative."""
    curves = _sample_curves(series)
    if curves.size == 0:
        return
    option = setting("--input-kind", "kind")
    if kind == "concentration":
        n_base = max(1, min(int(baseline_frames or 3), curves.shape[1] - 1))
        level = float(np.percentile(curves[:, :n_base].mean(axis=1), 90))
        if level > MAX_BASELINE_CONCENTRATION_MM:
            raise DCEPKInputError(
                f"the series read as concentration has pre-contrast values of {level:.4g} (90th percentile of "
                f"voxels), but concentration is about 0 mM before the bolus: it looks like a signal series; use "
                f"{option} signal with the T10, flip angle and TR")
    elif kind == "signal":
        negative = float(np.mean(curves < 0))
        if negative > MAX_NEGATIVE_SIGNAL_FRACTION:
            raise DCEPKInputError(
                f"{100 * negative:.0f}% of the series' values are negative, but a magnitude signal never is: it "
                f"looks like concentration or subtracted images; for concentration in mM use {option} "
                "concentration")


def input_function_warnings(blood_curve_mM: np.ndarray, tissue_curves_mM: np.ndarray) -> List[str]:
    """Warnings for an ROI input function (whole blood, mM) that does not look like a vessel's."""
    peak = float(np.nanmax(blood_curve_mM)) if np.any(np.isfinite(blood_curve_mM)) else float("nan")
    warnings = []
    advice = "move the ROI onto an artery (or a large vein) or use a population AIF"
    if not peak >= MIN_VESSEL_PEAK_MM:
        warnings.append(
            f"the AIF ROI peaks at {peak:.3g} mM, but blood in an artery or vein peaks at several mM (3-10 after a "
            f"standard dose): the ROI may lie on tissue, which scales Ktrans up many fold; {advice}")
    tissue = _sample_curves(tissue_curves_mM)
    if tissue.size and math.isfinite(peak):
        tissue_peak = float(np.percentile(tissue.max(axis=1), 95))
        if tissue_peak > peak:
            warnings.append(
                f"the AIF ROI peaks at {peak:.3g} mM, below 5% of the tissue voxels (they reach {tissue_peak:.3g} "
                f"mM), but no tissue enhances more than the blood that feeds it; {advice}")
    return warnings


def fit_warnings(r2: np.ndarray, fitted: np.ndarray) -> List[str]:
    """A warning when the model explains the fitted voxels' curves worse than a flat line would."""
    values = np.asarray(r2)[np.asarray(fitted, dtype=bool)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return []
    median = float(np.median(values))
    if median < 0:
        return [f"the median R^2 of the fit is {median:.2f} (below 0: worse than a flat line): the input function, "
                "the timing or the units do not match the data; check the AIF ROI, r1, T10 and the frame times"]
    return []
