"""Arterial input functions: population models, blood to plasma, ROI AIFs, AIF files.

Time ``t_s`` is in seconds with t = 0 at bolus arrival (shifted by ``delay_s``); every curve is
0 before arrival. Concentrations are in mM. Parker and Georgiou describe whole blood, Weinmann
(Tofts & Kermode) plasma; ``population_aif`` returns either compartment.
"""

import csv
import io
import math
from pathlib import Path

import numpy as np
from scipy.special import gammaln

from ..core.errors import DCEPKInputError
from ..signal import signal_to_concentration

__all__ = [
    "parker_aif", "georgiou_aif", "weinmann_aif", "population_aif", "POPULATION_AIFS",
    "blood_to_plasma", "plasma_to_blood", "aif_from_roi", "aif_from_roi_signal", "load_aif_csv", "resample_aif",
]

POPULATION_AIFS = ("parker", "georgiou", "weinmann")
_NATIVE_COMPARTMENT = {"parker": "blood", "georgiou": "blood", "weinmann": "plasma"}
_REFERENCE_DOSE_MMOL_PER_KG = 0.1

# Arrival is compared with this slack so that times converted between units (e.g. minutes x 60)
# that land a rounding error before the arrival are still counted as arrived.
_ARRIVAL_SLACK_S = 1e-9


def _time_since_arrival(t_s, delay_s):
    t = np.asarray(t_s, dtype=np.float64)
    if not np.all(np.isfinite(t)):
        raise DCEPKInputError("AIF times contain NaN or inf: give finite times in seconds")
    try:
        delay = float(delay_s)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"delay_s must be one number of seconds; got {delay_s!r}") from None
    if not math.isfinite(delay):
        raise DCEPKInputError(f"delay_s must be finite seconds; got {delay_s!r}")
    tau = t - delay
    arrived = tau >= -_ARRIVAL_SLACK_S
    return np.where(arrived, np.maximum(tau, 0.0), 0.0), arrived


def parker_aif(t_s, delay_s=0.0):
    """Parker et al. population AIF, whole blood, mM, for a 0.1 mmol/kg bolus.

    Two Gaussians plus an exponential modulated by a sigmoid, parameters of Table 1 in
    Parker GJM et al., Magn Reson Med 2006;56:993-1000 (doi:10.1002/mrm.21066); the model is
    written in minutes, so times are converted from seconds.
    """
    tau_s, arrived = _time_since_arrival(t_s, delay_s)
    t = tau_s / 60.0
    a1, a2 = 0.809, 0.330          # mmol min
    t1, t2 = 0.17046, 0.365        # min
    sigma1, sigma2 = 0.0563, 0.132  # min
    alpha, beta = 1.050, 0.1685    # mM, 1/min
    s, tau = 38.078, 0.483         # 1/min, min
    gauss1 = a1 / (sigma1 * math.sqrt(2 * math.pi)) * np.exp(-((t - t1) ** 2) / (2 * sigma1 ** 2))
    gauss2 = a2 / (sigma2 * math.sqrt(2 * math.pi)) * np.exp(-((t - t2) ** 2) / (2 * sigma2 ** 2))
    washout = alpha * np.exp(-beta * t) / (1.0 + np.exp(-s * (t - tau)))
    return np.where(arrived, gauss1 + gauss2 + washout, 0.0)


# Georgiou et al., Magn Reson Med 2019;81:1955-1963 (doi:10.1002/mrm.27524): sum of three
# exponentials times a train of recirculating gamma variates (Horsfield et al. 2009 form), in
# minutes, whole blood, gadoterate at 0.1 mmol/kg. Table 3 of the paper prints these rounded to
# 2-3 digits, which misses the paper's own supplementary curve by up to 1.2 % at the peak;
# the values below are the same parameters to more digits, recovered by least squares from
# that published curve (supporting information, Figure S2 data; max deviation 2.5e-5 mM).
_GEORGIOU = dict(a=(0.37432171, 0.33118441, 10.0612258), m=(0.11270067, 1.17464623, 16.01996202),
                 alpha=5.26698902, beta=0.03207883, tau=0.128556)


def georgiou_aif(t_s, delay_s=0.0):
    """Georgiou et al. 2019 population AIF, whole blood, mM, for a 0.1 mmol/kg bolus."""
    tau_s, arrived = _time_since_arrival(t_s, delay_s)
    t = tau_s / 60.0
    p = _GEORGIOU
    envelope = sum(a * np.exp(-m * t) for a, m in zip(p["a"], p["m"]))
    passes = np.zeros_like(t)
    n_circ = int(np.max(t, initial=0.0) // p["tau"]) + 1
    for k in range(n_circ + 1):
        # k-th circulation: gamma variate of shape (k+1)alpha + k, starting k*tau later.
        shape = (k + 1) * p["alpha"] + k
        tk = t - k * p["tau"]
        pos = tk > 0
        if not pos.any():
            break
        log_g = shape * np.log(tk[pos]) - tk[pos] / p["beta"] - (shape + 1) * math.log(p["beta"]) - gammaln(shape + 1)
        passes[pos] += np.exp(log_g)
    return np.where(arrived, envelope * passes, 0.0)


def weinmann_aif(t_s, dose_mmol_per_kg=0.1, delay_s=0.0):
    """Bi-exponential plasma AIF (mM): Cp = D (a1 exp(-m1 t) + a2 exp(-m2 t)).

    Parameters from Tofts PS, Kermode AG, Magn Reson Med 1991;17:357-367 (fit to Weinmann et
    al. 1984 Gd-DTPA plasma data): a1 = 3.99, a2 = 4.78 kg/l, m1 = 0.144, m2 = 0.0111 1/min.
    An instantaneous bolus: the curve jumps to its maximum at arrival.
    """
    dose = _check_dose(dose_mmol_per_kg)
    tau_s, arrived = _time_since_arrival(t_s, delay_s)
    t = tau_s / 60.0
    cp = dose * (3.99 * np.exp(-0.144 * t) + 4.78 * np.exp(-0.0111 * t))
    return np.where(arrived, cp, 0.0)


def _check_dose(dose_mmol_per_kg):
    try:
        dose = float(dose_mmol_per_kg)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"dose_mmol_per_kg must be one number; got {dose_mmol_per_kg!r}") from None
    if not (math.isfinite(dose) and 0 < dose <= 1.0):
        raise DCEPKInputError(
            f"dose {dose_mmol_per_kg!r} mmol/kg is not plausible (standard Gd dose: 0.1 mmol/kg; "
            "a volume in ml or a mass in mg is not a dose per kg)")
    return dose


def _check_hct(hct):
    try:
        h = float(hct)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"hct must be a haematocrit fraction; got {hct!r}") from None
    if not 0 <= h < 1:
        raise DCEPKInputError(
            f"hct={hct!r} must be a fraction in [0, 1) (e.g. 0.45); if it is in percent, divide by 100")
    return h


def blood_to_plasma(cb, hct=0.45):
    """Plasma concentration from whole-blood concentration: the agent stays outside red cells."""
    return np.asarray(cb, dtype=np.float64) / (1.0 - _check_hct(hct))


def plasma_to_blood(cp, hct=0.45):
    return np.asarray(cp, dtype=np.float64) * (1.0 - _check_hct(hct))


def population_aif(name, t_s, delay_s=0.0, dose_mmol_per_kg=0.1, compartment="blood", hct=0.45):
    """A population AIF by name (``POPULATION_AIFS``), scaled linearly to the dose, in mM.

    compartment: 'blood' or 'plasma'; each model is converted from its native compartment with
    ``hct`` when needed.
    """
    key = str(name).strip().lower()
    if key not in POPULATION_AIFS:
        raise DCEPKInputError(f"unknown population AIF '{name}': use one of {', '.join(POPULATION_AIFS)}")
    if compartment not in ("blood", "plasma"):
        raise DCEPKInputError(f"compartment must be 'blood' or 'plasma'; got {compartment!r}")
    dose = _check_dose(dose_mmol_per_kg)
    if key == "weinmann":
        c = weinmann_aif(t_s, dose, delay_s)
    else:
        fn = parker_aif if key == "parker" else georgiou_aif
        c = fn(t_s, delay_s) * (dose / _REFERENCE_DOSE_MMOL_PER_KG)
    native = _NATIVE_COMPARTMENT[key]
    if native == compartment:
        return c
    return blood_to_plasma(c, hct) if compartment == "plasma" else plasma_to_blood(c, hct)


def population_aif_at_arrival(name, times_s, baseline_frames: int, hct=0.45, extra_delay_s=0.0):
    """Plasma population AIF (mM) on the frame times, starting at bolus arrival: the first frame
    after the ``baseline_frames`` pre-contrast frames (plus ``extra_delay_s``)."""
    t = np.asarray(times_s, dtype=np.float64) - float(np.asarray(times_s)[0])
    arrival_s = t[min(int(baseline_frames), t.size - 1)]
    return population_aif(name, t, delay_s=arrival_s + extra_delay_s, compartment="plasma", hct=hct)


def aif_from_roi(conc, roi_mask, top_fraction=None, rank_by="peak"):
    """Mean concentration-time curve (T,) of the ROI voxels of a (K, J, I, T) series.

    Voxels with any NaN / inf frame are left out. ``top_fraction`` in (0, 1] keeps only the
    most enhancing fraction of the valid ROI voxels, ranked by ``rank_by`` = 'peak' (maximum)
    or 'area' (sum over frames), which rejects partial-volume voxels at a vessel's edge.
    """
    c = np.asarray(conc)  # only the ROI's curves are taken to float64: not a copy of the whole series
    mask = _check_roi(c, roi_mask, "concentration")
    curves = np.asarray(c[mask], dtype=np.float64)
    curves = curves[np.all(np.isfinite(curves), axis=-1)]
    if curves.shape[0] == 0:
        raise DCEPKInputError(
            f"none of the {int(mask.sum())} AIF ROI voxels has a valid concentration curve (all "
            "have NaN frames, e.g. signal outside the invertible range): move the ROI or check T10 / flip angle")
    if top_fraction is not None:
        if rank_by == "peak":
            score = curves.max(axis=-1)
        elif rank_by == "area":
            score = curves.sum(axis=-1)
        else:
            raise DCEPKInputError(f"rank_by must be 'peak' or 'area'; got {rank_by!r}")
        curves = curves[_top_fraction(score, top_fraction)]
    return curves.mean(axis=0)


def _check_roi(series, roi_mask, what):
    """The ROI as a bool [k, j, i] mask on the grid of a 4-D ``series``; an error names what is wrong."""
    mask = np.asarray(roi_mask)
    if series.ndim != 4:
        raise DCEPKInputError(f"the {what} must be a 4-D series [k, j, i, t]; got shape {series.shape}")
    if mask.shape != series.shape[:3]:
        raise DCEPKInputError(
            f"the AIF ROI has shape {mask.shape} but the series grid is {series.shape[:3]}: draw or "
            "resample the ROI on the DCE series' grid")
    mask = mask.astype(bool) if mask.dtype != bool else mask
    if not mask.any():
        raise DCEPKInputError("the AIF ROI is empty: place it over an artery (or vein) in the series")
    return mask


def _top_fraction(score, top_fraction):
    """Indices of the highest-scoring ``top_fraction`` (in (0, 1]) of the voxels."""
    try:
        frac = float(top_fraction)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"top_fraction must be a number in (0, 1]; got {top_fraction!r}") from None
    if not 0 < frac <= 1:
        raise DCEPKInputError(f"top_fraction must be in (0, 1] (e.g. 0.1 for the top 10 %); got {top_fraction!r}")
    n_keep = max(1, int(math.ceil(frac * score.shape[0])))
    return np.argsort(score)[::-1][:n_keep]


def aif_from_roi_signal(signal, roi_mask, t10_s, fa_deg, tr_s, r1_per_mM_s, baseline_frames, noise_sigma=None,
                        top_fraction=None):
    """Blood concentration (T,) of an ROI from its mean signal: the ROI's voxels are averaged
    first, then converted once (``signal.signal_to_concentration``) with the ROI's median T10.

    Why average the signal: a dark blood baseline can sit near the noise (SNR ~ 1-2), where one
    voxel's baseline is too noisy to convert and a mean of per-voxel concentrations is biased. With
    ``noise_sigma`` the mean is of the power (S^2), whose Rician excess 2 sigma^2 is then taken
    off exactly (``rician``); without, the plain mean. ``top_fraction`` keeps the most enhancing
    fraction of the ROI's voxels (peak over baseline signal), as ``aif_from_roi``.
    """
    s = np.asarray(signal)
    mask = _check_roi(s, roi_mask, "signal series")
    curves = np.asarray(s[mask], dtype=np.float64)
    t10 = np.broadcast_to(np.asarray(t10_s, dtype=np.float64), mask.shape)[mask]
    usable = np.all(np.isfinite(curves), axis=-1) & np.isfinite(t10) & (t10 > 0)
    curves, t10 = curves[usable], t10[usable]
    if curves.shape[0] == 0:
        raise DCEPKInputError(
            f"none of the {int(mask.sum())} AIF ROI voxels has a finite signal and a positive T10: move the ROI "
            "or check the T10 map")
    n_base = int(baseline_frames)
    if top_fraction is not None:
        baseline = np.maximum(curves[:, :n_base].mean(-1), 1e-12)
        keep = _top_fraction(curves.max(-1) / baseline, top_fraction)
        curves, t10 = curves[keep], t10[keep]
    sigma = float(noise_sigma or 0.0)
    if sigma > 0:   # E[S^2] = A^2 + 2 sigma^2 for every voxel and frame
        mean_signal = np.sqrt(np.maximum(np.mean(curves * curves, axis=0) - 2.0 * sigma * sigma, 0.0))
    else:
        mean_signal = curves.mean(axis=0)
    conc, valid = signal_to_concentration(mean_signal[None], float(np.median(t10)), fa_deg, tr_s,
                                          r1_per_mM_s, baseline_frames=n_base)
    if not valid[0]:
        raise DCEPKInputError(
            "the AIF ROI's mean signal cannot be converted to concentration (its baseline is at the noise "
            "floor, or a frame exceeds the SPGR range for this T10 and flip angle): move the ROI onto the "
            "artery's lumen, or check T10, flip angle and TR")
    return conc[0]


# --------------------------------------------------------------------------- files
_TIME_UNITS = (("ms", 1e-3), ("msec", 1e-3), ("millisecond", 1e-3), ("min", 60.0), ("minute", 60.0),
               ("s", 1.0), ("sec", 1.0), ("second", 1.0))
_CONC_UNITS = (("mm", 1.0), ("mmol/l", 1.0), ("um", 1e-3), ("µm", 1e-3), ("umol/l", 1e-3))


def _unit_in(header, table, path):
    """Unit named in a header cell as 'time (ms)', 'time [min]', 'time_s' or 'ms'; None if none."""
    text = header.strip().lower()
    candidates = []
    for open_, close in (("(", ")"), ("[", "]")):
        if open_ in text and close in text:
            bracketed = text[text.index(open_) + 1:text.index(close)].strip()
            if not any(bracketed == unit for unit, _ in table):
                raise DCEPKInputError(
                    f"AIF file {path}: unknown unit '{bracketed}' in column header '{header}': use "
                    f"one of {', '.join(sorted({u for u, _ in table}))}")
            candidates.append(bracketed)
    for sep in ("_", " "):
        if sep in text:
            candidates.append(text.rsplit(sep, 1)[-1].strip())
    candidates.append(text)
    for cand in candidates:
        for unit, factor in table:
            if cand == unit:
                return factor
    return None


def load_aif_csv(path):
    """Read an AIF from a two-column text file: time, concentration (mM).

    Comma, semicolon, tab or space separated; lines starting with '#' are comments; a header
    row is optional. The time unit is taken from the header ('time (ms)', 'time [min]',
    't_s', ...); without one, seconds are assumed. A concentration header may say mM or uM.
    Returns (t_s, c_mM) as float arrays.
    """
    p = Path(path)
    if not p.is_file():
        raise DCEPKInputError(f"AIF file {p} does not exist: give the path of a two-column CSV (time, concentration)")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DCEPKInputError(f"AIF file {p} is not a text file: save the AIF as CSV (time, concentration)") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise DCEPKInputError(f"AIF file {p} has no data rows")
    sample = lines[0]
    delimiter = next((d for d in (",", ";", "\t") if d in sample), None)
    if delimiter is None:
        rows = [ln.split() for ln in lines]
    else:
        rows = [[cell.strip() for cell in r] for r in csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter)]
    time_factor, conc_factor = 1.0, 1.0
    header = None
    try:
        [float(x) for x in rows[0][:2]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    if header is not None:
        if len(header) < 2:
            raise DCEPKInputError(f"AIF file {p}: the header needs two columns (time, concentration)")
        tf = _unit_in(header[0], _TIME_UNITS, p)
        time_factor = 1.0 if tf is None else tf
        cf = _unit_in(header[1], _CONC_UNITS, p)
        conc_factor = 1.0 if cf is None else cf
    data = []
    for n, row in enumerate(rows, start=2 if header else 1):
        row = [c for c in row if c != ""]
        if len(row) != 2:
            raise DCEPKInputError(
                f"AIF file {p}, data row {n}: expected 2 columns (time, concentration), got {len(row)}: {row}")
        try:
            data.append((float(row[0]), float(row[1])))
        except ValueError:
            raise DCEPKInputError(f"AIF file {p}, data row {n}: not numbers: {row}") from None
    if len(data) < 2:
        raise DCEPKInputError(f"AIF file {p} has {len(data)} data row(s): an AIF needs at least 2 time points")
    arr = np.asarray(data, dtype=np.float64)
    t_s, c = arr[:, 0] * time_factor, arr[:, 1] * conc_factor
    if not (np.all(np.isfinite(t_s)) and np.all(np.isfinite(c))):
        raise DCEPKInputError(f"AIF file {p} contains NaN or inf values")
    if np.any(np.diff(t_s) <= 0):
        raise DCEPKInputError(f"AIF file {p}: times must be strictly increasing")
    return t_s, c


def resample_aif(t_src, c_src, t_dst, max_gap_s=None):
    """AIF resampled onto the series' times by linear interpolation; 0 before its first point.

    Past its last point the AIF is held at its last value for at most ``max_gap_s`` seconds
    (default 1.5 x its median sampling interval); a series running longer than that raises an
    error rather than inventing the washout.
    """
    ts = np.asarray(t_src, dtype=np.float64).ravel()
    cs = np.asarray(c_src, dtype=np.float64).ravel()
    td = np.asarray(t_dst, dtype=np.float64)
    if ts.size != cs.size or ts.size < 2:
        raise DCEPKInputError(
            f"AIF needs matching time and concentration arrays with >= 2 points; got {ts.size} and {cs.size}")
    if not (np.all(np.isfinite(ts)) and np.all(np.isfinite(cs)) and np.all(np.isfinite(td))):
        raise DCEPKInputError("AIF or series times contain NaN / inf")
    if np.any(np.diff(ts) <= 0):
        raise DCEPKInputError("AIF times must be strictly increasing (seconds)")
    gap = 1.5 * float(np.median(np.diff(ts))) if max_gap_s is None else float(max_gap_s)
    if td.size and td.max() > ts[-1] + gap:
        raise DCEPKInputError(
            f"the AIF ends at {ts[-1]:g} s but the series runs to {td.max():g} s: give an AIF "
            "covering the whole acquisition (check that both time axes are in seconds)")
    return np.interp(td, ts, cs, left=0.0, right=cs[-1])
