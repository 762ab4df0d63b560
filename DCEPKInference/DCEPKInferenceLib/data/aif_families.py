"""Input-function families for the AIF-conditioned networks, each tagged for training or held out.

A family draws a plasma input function (mM) on a fine time grid (s, 0 = first frame), exactly 0
before the bolus arrives. Training draws only ``TRAINING_FAMILIES``; ``HELD_OUT_FAMILIES`` (the
Georgiou 2019 population family) and ``EXTRA_TEST_FAMILIES`` (the issue's gamma variate with
recirculation and bi-exponential washout) are never drawn by a training sampler, so the benchmark
measures the networks on input-function shapes they never saw (a unit test checks this).

Families (every draw also takes a haematocrit; blood curves are turned into plasma by the core's
``aif.blood_to_plasma``):

* ``parker``, ``weinmann`` (training) and ``georgiou`` (held out): the core's population curves
  (``aif.population_aif``) scaled in amplitude (0.5-1.6), stretched in time (width 0.7-1.5),
  dispersed by a unit-area exponential kernel (tau 0-10 s), with a small extra recirculation
  (0-15 % of the first-pass area, 8-25 s after arrival);
* ``gamma_variate`` (training): a flexible first pass (gamma variate s^p exp(-s/b), p 1.5-5, b 1-4 s,
  area 25-70 mM s), 0-2 recirculations, mono- or bi-exponential washout under a ramp;
* ``reporter`` (extra test): the issue's independent family (first pass + one recirculation +
  bi-exponential washout under a sigmoid, gated at arrival).

``measured_like`` turns a true curve into what an ROI would give: per-frame noise of 2-5 % of the
peak and, sometimes, a T2*-truncated peak. It never scales the amplitude: a partial-volume scale
the network cannot see would teach it to bias every map towards the mean scale.
"""

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np

from DCEPKFittingLib.kinetics import aif as aif_models
from DCEPKFittingLib.kinetics import tk_models

FINE_DT_S = 0.25
DOSE_MMOL_PER_KG = 0.1
HCT_RANGE = (0.30, 0.55)
POPULATION_TRANSFORMS = {"amplitude": (0.5, 1.6), "width": (0.7, 1.5), "dispersion_tau_s": (0.0, 10.0),
                         "recirculation_fraction": (0.0, 0.15), "recirculation_after_s": (8.0, 25.0)}
GAMMA_VARIATE = {"power": (1.5, 5.0), "scale_s": (1.0, 4.0), "first_pass_area_mM_s": (25.0, 70.0),
                 "recirculations": (0, 2), "washout_mM": (0.3, 2.0)}
MEASURED_LIKE = {"probability": 0.3, "noise_of_peak": (0.02, 0.05), "t2star_truncation_probability": 0.3,
                 "t2star_peak_kept": (0.7, 0.95)}


@dataclass
class InputFunctionDraw:
    """One drawn input function: plasma concentration (mM) on ``fine_t_s`` (s), arrival (s), hct."""

    family: str
    fine_t_s: np.ndarray
    plasma_mM: np.ndarray
    arrival_s: float
    hct: float

    def at(self, t_s) -> np.ndarray:
        """Plasma concentration at ``t_s`` (linear between fine samples; 0 before the first)."""
        return np.interp(np.asarray(t_s, dtype=np.float64), self.fine_t_s, self.plasma_mM, left=0.0)


def fine_grid(end_s: float) -> np.ndarray:
    return np.arange(0.0, float(end_s) + 2 * FINE_DT_S, FINE_DT_S)


def unit_gamma_variate(t_s, start_s, power, scale_s):
    """Gamma variate s^power exp(-s / scale), s = t - start, as a density (1/s, unit area on ``t_s``):
    exactly 0 before ``start_s``."""
    s = np.clip(np.asarray(t_s, dtype=np.float64) - start_s, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_g = power * np.log(s) - s / scale_s
    g = np.where(s > 0, np.exp(log_g - np.nanmax(np.where(s > 0, log_g, -np.inf))), 0.0)
    area = np.trapezoid(g, t_s)
    return g / area if area > 0 else g


def _disperse(t, curve, tau_s):
    """Convolution with a unit-area exponential kernel of time constant ``tau_s`` (the core's exact
    piecewise-linear ``exp_convolution``); causal, so a curve 0 before arrival stays 0."""
    if tau_s <= 0.5:
        return curve
    return tk_models.exp_convolution(t, curve, 1.0 / tau_s) / tau_s


def _population(name: str):
    def draw(rng, fine_t, arrival_s, hct):
        r = POPULATION_TRANSFORMS
        amplitude, width = rng.uniform(*r["amplitude"]), rng.uniform(*r["width"])
        since = np.maximum(fine_t - arrival_s, 0.0) / width
        cp = amplitude * aif_models.population_aif(name, since, 0.0, DOSE_MMOL_PER_KG, "plasma", hct)
        first_pass_area = np.trapezoid(np.where(since * width < 40.0, cp, 0.0), fine_t)
        extra = rng.uniform(*r["recirculation_fraction"]) * first_pass_area
        cp = cp + extra * unit_gamma_variate(fine_t, arrival_s + rng.uniform(*r["recirculation_after_s"]),
                                             rng.uniform(3.0, 6.0), rng.uniform(2.0, 5.0))
        return _disperse(fine_t, np.where(fine_t >= arrival_s, cp, 0.0), rng.uniform(*r["dispersion_tau_s"]))
    return draw


def _gamma_variate(rng, fine_t, arrival_s, hct):
    r = GAMMA_VARIATE
    power, scale = rng.uniform(*r["power"]), rng.uniform(*r["scale_s"])
    blood = rng.uniform(*r["first_pass_area_mM_s"]) * unit_gamma_variate(fine_t, arrival_s, power, scale)
    start = arrival_s
    for _ in range(int(rng.integers(r["recirculations"][0], r["recirculations"][1] + 1))):
        start += rng.uniform(8.0, 25.0)
        blood += rng.uniform(5.0, 25.0) * unit_gamma_variate(fine_t, start, rng.uniform(2.0, 6.0),
                                                             rng.uniform(3.0, 8.0))
    since_min = np.maximum(fine_t - arrival_s, 0.0) / 60.0
    washout = rng.uniform(*r["washout_mM"]) * np.exp(-rng.uniform(0.005, 0.2) * since_min)
    if rng.uniform() < 0.5:   # bi-exponential: a faster early component
        washout += rng.uniform(0.2, 1.5) * np.exp(-rng.uniform(0.3, 2.0) * since_min)
    ramp = np.clip(60.0 * since_min / rng.uniform(10.0, 40.0), 0.0, 1.0)
    blood = blood + washout * ramp
    return aif_models.blood_to_plasma(np.where(fine_t >= arrival_s, blood, 0.0), hct)


def _reporter(rng, fine_t, arrival_s, hct):
    """The issue's independent check: gamma-variate first pass, one recirculation, bi-exponential
    washout under a sigmoid ramp; the ramp is gated at arrival (an ungated sigmoid is > 0 before it)."""
    amplitude = rng.uniform(0.6, 1.5)
    power, scale = rng.uniform(2.0, 4.0), rng.uniform(1.5, 3.0)
    first = unit_gamma_variate(fine_t, arrival_s, power, scale)
    recirculation = unit_gamma_variate(fine_t, arrival_s + rng.uniform(12.0, 20.0), power + 1.0, 2.0 * scale)
    since_min = np.maximum(fine_t - arrival_s, 0.0) / 60.0
    washout = (rng.uniform(2.0, 3.5) * np.exp(-rng.uniform(0.1, 0.3) * since_min)
               + rng.uniform(0.8, 1.5) * np.exp(-rng.uniform(0.01, 0.05) * since_min))
    ramp = (fine_t >= arrival_s) / (1.0 + np.exp(-(fine_t - arrival_s - 10.0) / 3.0))
    blood = amplitude * (rng.uniform(35.0, 60.0) * first + rng.uniform(10.0, 20.0) * recirculation
                         + 0.3 * ramp * washout)
    return aif_models.blood_to_plasma(np.where(fine_t >= arrival_s, blood, 0.0), hct)


@dataclass(frozen=True)
class Family:
    name: str
    use: str            # "training" | "held_out" | "extra_test"
    draw: Callable      # (rng, fine_t, arrival_s, hct) -> plasma (mM) on fine_t
    description: str


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("parker", "training", _population("parker"),
           "Parker 2006 population curve, amplitude/width/dispersion/recirculation varied"),
    Family("weinmann", "training", _population("weinmann"),
           "Weinmann (Tofts-Kermode) bi-exponential, amplitude/width/dispersion/recirculation varied"),
    Family("gamma_variate", "training", _gamma_variate,
           "flexible gamma-variate first pass, 0-2 recirculations, mono- or bi-exponential washout under a ramp"),
    Family("georgiou", "held_out", _population("georgiou"),
           "Georgiou 2019 population curve (recirculation train x tri-exponential), the same variations"),
    Family("reporter", "extra_test", _reporter,
           "the issue's gamma variate + recirculation + bi-exponential washout (independent check)"),
)}
TRAINING_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.use == "training")
HELD_OUT_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.use == "held_out")
EXTRA_TEST_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.use == "extra_test")


def draw_input_function(rng, family: str, end_s: float, arrival_s: float) -> InputFunctionDraw:
    """A plasma input function of ``family`` on the fine grid up to ``end_s``, arriving at ``arrival_s``."""
    fine_t = fine_grid(end_s)
    hct = float(rng.uniform(*HCT_RANGE))
    plasma = FAMILIES[family].draw(rng, fine_t, float(arrival_s), hct)
    plasma = np.where(fine_t >= arrival_s, plasma, 0.0)   # every family: exactly 0 before arrival
    return InputFunctionDraw(family, fine_t, plasma, float(arrival_s), hct)


def draw_training_family(rng) -> str:
    return TRAINING_FAMILIES[int(rng.integers(len(TRAINING_FAMILIES)))]


def measured_like(rng, curve_mM: np.ndarray) -> np.ndarray:
    """An ROI-like version of a frame-sampled curve: noise of 2-5 % of the peak on every frame and,
    sometimes, a T2*-flattened peak."""
    r = MEASURED_LIKE
    peak = float(np.max(curve_mM))
    out = np.array(curve_mM, dtype=np.float64)
    if rng.uniform() < r["t2star_truncation_probability"]:
        out = np.minimum(out, rng.uniform(*r["t2star_peak_kept"]) * peak)
    return out + rng.uniform(*r["noise_of_peak"]) * peak * rng.standard_normal(out.shape)
