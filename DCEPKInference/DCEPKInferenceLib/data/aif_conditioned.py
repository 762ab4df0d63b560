"""Simulated subjects for the AIF-conditioned networks: tissue curves plus the input function the
method is given, on the subject's own frame times.

No inverse crime: the tissue is computed on a 0.25 s grid from the true input function
(``aif_families``), optionally delayed, and sampled at the frames; the methods get the
frame-sampled input function (sometimes measured-like: noisy, T2*-flattened). The signal goes through
the SPGR equation with Rician noise and back to concentration by the core's exact inversion, with
the baseline frames found by the project's detector on the noisy signal (as at inference) and, in
training, jittered by up to 2 frames so that the network meets a misplaced baseline.

Protocol families: ``uniform``, ``jittered`` (+-20 % per interval) and ``fine`` (0.5-1.5 s) are
drawn in training; ``two_rate`` (a fast first pass, then 2-4x slower) is held out for the
benchmark, like the Georgiou input-function family (``aif_families``).
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from DCEPKFittingLib.kinetics import tk_models
from DCEPKFittingLib.signal import spgr_signal

from . import aif_families as families
from .canonical_grid import estimate_baseline_frames, tissue_concentration
from .simulator import add_rician_noise, sample_parameter_maps, sample_tissue_params

PROTOCOL_FAMILIES = {"uniform": "training", "jittered": "training", "fine": "training", "two_rate": "held_out"}
TRAINING_PROTOCOLS = ("uniform", "jittered", "fine")
TRAINING_PROTOCOL_WEIGHTS = (0.70, 0.25, 0.05)
HELD_OUT_PROTOCOLS = ("two_rate",)
FAST_EXCHANGE = {"fraction": 0.10, "ve": (0.005, 0.03), "kep_max_per_min": 50.0}

CONDITIONED_RANGES = {
    "tk_model": "etofts on a 0.25 s grid from the true input function, sampled at the frames",
    "tissue": "the legacy simulator's prior (simulator.sample_tissue_params: Ktrans 0-1.5 /min, ve 0.02-0.8, "
              "vp 0-0.2, kep <= 8 /min; 12 % non-enhancing, 5 % vessel-like) with 10 % of the leaky voxels in "
              "fast exchange (ve 0.005-0.03, kep <= 50 /min)",
    "aif_families_trained": list(families.TRAINING_FAMILIES),
    "aif_families_held_out": list(families.HELD_OUT_FAMILIES),
    "aif_families_extra_test": list(families.EXTRA_TEST_FAMILIES),
    "aif_variations": {"population": families.POPULATION_TRANSFORMS, "gamma_variate": families.GAMMA_VARIATE,
                       "measured_like": families.MEASURED_LIKE, "hct": list(families.HCT_RANGE)},
    "protocol_families_trained": dict(zip(TRAINING_PROTOCOLS, TRAINING_PROTOCOL_WEIGHTS)),
    "protocol_families_held_out": list(HELD_OUT_PROTOCOLS),
    "n_frames": [30, 150],
    "frame_interval_s": {"range": [1.5, 15.0], "distribution": "log-uniform; 'fine' protocols 0.5-1.5 s"},
    "duration_s": [150.0, 660.0],
    "bolus_arrival_s": "2-6 frame intervals + uniform [0, 30] s after the first frame",
    "tissue_delay_s": {"probability": 0.5, "range": [0.0, 6.0]},
    "baseline_jitter_frames": {"probability": 0.5, "range": [-2, 2]},
    "fa_deg": [8.0, 35.0], "tr_s": [0.0025, 0.008], "t10_s": [0.6, 2.5], "r1_per_mM_s": [3.0, 6.0],
    "baseline_snr": {"range": [3.0, 100.0], "distribution": "log-uniform; 5 % of subjects at 300-1000",
                     "definition": "noise-free pre-contrast signal / SD of the Gaussian noise per quadrature "
                                   "channel (Rician magnitude)"},
    # curves handed over as concentration (a DRO, maps from other software): Gaussian noise in mM instead of
    # Rician noise on the signal; without these the network learns the signal route's noise-dependent bias
    # and applies it to concentration input too (+2-3 % Ktrans on a Gaussian-noise set)
    "concentration_noise": {"probability": 0.15, "sd_mM": [0.003, 0.1], "distribution": "log-uniform",
                            "training_only": True},
}


def _loguniform(rng, lo, hi, size=None):
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))


def sample_frame_times(rng, family: str) -> np.ndarray:
    """Frame times (s, first 0) of one protocol of ``family`` (``PROTOCOL_FAMILIES``)."""
    r = CONDITIONED_RANGES
    if family == "two_rate":
        fast = rng.uniform(1.5, 4.0)
        n_fast = int(rng.integers(20, 41))
        slow = fast * rng.uniform(2.0, 4.0)
        duration = rng.uniform(300.0, 600.0)
        n_slow = max(int((duration - fast * n_fast) / slow), 5)
        steps = np.concatenate([np.full(n_fast, fast), np.full(n_slow, slow)])
        return np.concatenate([[0.0], np.cumsum(steps)])
    lo, hi = (0.5, 1.5) if family == "fine" else r["frame_interval_s"]["range"]
    dt = float(_loguniform(rng, lo, hi))
    n_lo = int(max(r["n_frames"][0], np.ceil(r["duration_s"][0] / dt) + 1))
    n_hi = int(max(min(r["n_frames"][1], np.floor(r["duration_s"][1] / dt) + 1), n_lo))
    n = int(rng.integers(n_lo, n_hi + 1))
    steps = np.full(n - 1, dt)
    if family == "jittered":
        steps *= rng.uniform(0.8, 1.2, n - 1)
    return np.concatenate([[0.0], np.cumsum(steps)])


def sample_conditioned_tissue(rng, n: int) -> np.ndarray:
    """(n, 3) Ktrans (1/min), ve, vp: the legacy prior, with a fast-exchange share of the leaky voxels."""
    params = sample_tissue_params(rng, n)
    fast = (rng.uniform(size=n) < FAST_EXCHANGE["fraction"]) & (params[:, 0] > 0) & (params[:, 2] < 0.1)
    ve = np.maximum(rng.uniform(*FAST_EXCHANGE["ve"], n), params[:, 0] / FAST_EXCHANGE["kep_max_per_min"])
    params[fast, 1] = ve[fast]
    params[:, 1] = np.maximum(params[:, 1], params[:, 0] / FAST_EXCHANGE["kep_max_per_min"])
    return params


@dataclass
class ConditionedSubject:
    """One subject's voxels: concentration (N, T) mM from the noisy signal on ``times_s``, the plasma
    input function the method is given (T,), per-voxel baseline noise SD (N,) mM, the baseline frame
    count used, truth (N, 3) Ktrans/ve/vp, baseline SNR (N,), and how the subject was drawn."""

    times_s: np.ndarray
    given_plasma_mM: np.ndarray
    conc_mM: np.ndarray
    noise_sd_mM: np.ndarray
    baseline_frames: int
    params: np.ndarray
    snr: np.ndarray
    aif_family: str
    protocol_family: str
    true_baseline_frames: int
    delay_s: float = 0.0


def _sample_at(fine_t, curves, t):
    """Linear interpolation of (N, F) curves on the uniform ``fine_t`` at the times ``t`` (T,)."""
    position = np.clip((t - fine_t[0]) / (fine_t[1] - fine_t[0]), 0.0, fine_t.size - 1.000001)
    lo = position.astype(int)
    w = position - lo
    return curves[:, lo] * (1.0 - w) + curves[:, lo + 1] * w


def draw_snr(rng, n: int, snr_range=None) -> np.ndarray:
    """Baseline SNR per voxel: one value or a (lo, hi) log-uniform range; None: the training law."""
    if snr_range is None:
        if rng.uniform() < 0.05:
            return _loguniform(rng, 300.0, 1000.0, n)
        return _loguniform(rng, *CONDITIONED_RANGES["baseline_snr"]["range"], n)
    if np.ndim(snr_range) == 0:
        return np.full(n, float(snr_range))
    return _loguniform(rng, float(snr_range[0]), float(snr_range[1]), n)


def simulate_subject(rng, n_voxels: int, aif_family: Optional[str] = None, protocol_family: Optional[str] = None,
                     snr_range=None, delay: Optional[Sequence[float]] = None, training: bool = True,
                     measured_like_aif: Optional[bool] = None, times_s=None, params=None) -> ConditionedSubject:
    """One subject. ``aif_family`` / ``protocol_family``: None draws a training one. ``delay``: the
    tissue's delay range (s) behind the given input function (None: the training law in training,
    none otherwise). ``training`` adds the baseline jitter and, with ``measured_like_aif`` None, the
    training share of measured-like input functions. ``times_s``/``params`` fix the frames/truth."""
    r = CONDITIONED_RANGES
    protocol_family = protocol_family or str(rng.choice(TRAINING_PROTOCOLS, p=TRAINING_PROTOCOL_WEIGHTS))
    t = sample_frame_times(rng, protocol_family) if times_s is None else np.asarray(times_s, dtype=np.float64)
    arrival = (t[1] - t[0]) * rng.uniform(2.0, 6.0) + rng.uniform(0.0, 30.0) + t[0]
    aif_family = aif_family or families.draw_training_family(rng)
    draw = families.draw_input_function(rng, aif_family, t[-1], arrival)
    params = sample_conditioned_tissue(rng, n_voxels) if params is None else np.asarray(params, dtype=np.float64)
    if delay is None and training:
        delay = r["tissue_delay_s"]["range"] if rng.uniform() < r["tissue_delay_s"]["probability"] else (0.0, 0.0)
    delay_s = float(rng.uniform(*delay)) if delay is not None else 0.0
    tissue_plasma = np.interp(draw.fine_t_s - delay_s, draw.fine_t_s, draw.plasma_mM, left=0.0)
    fine_conc = tk_models.concentration("etofts", params, draw.fine_t_s, tissue_plasma)
    conc = _sample_at(draw.fine_t_s, fine_conc, t)
    given = draw.at(t)
    use_measured = (training and rng.uniform() < families.MEASURED_LIKE["probability"]
                    if measured_like_aif is None else measured_like_aif)
    if use_measured:
        given = families.measured_like(rng, given)
    n = params.shape[0]
    t10 = rng.uniform(*r["t10_s"], n)
    fa, tr, r1 = rng.uniform(*r["fa_deg"]), rng.uniform(*r["tr_s"]), rng.uniform(*r["r1_per_mM_s"])
    m0 = np.full(n, 1000.0 * rng.uniform(0.5, 2.0))
    clean = spgr_signal(m0[:, None], 1.0 / t10[:, None] + r1 * conc, fa, tr)
    snr = draw_snr(rng, n, snr_range)
    noisy = add_rician_noise(rng, clean, clean[:, 0] / snr)
    true_base = int(np.searchsorted(t, arrival + delay_s, side="left"))
    n_base = estimate_baseline_frames(noisy, t)
    if training and rng.uniform() < r["baseline_jitter_frames"]["probability"]:
        n_base += int(rng.integers(r["baseline_jitter_frames"]["range"][0], r["baseline_jitter_frames"]["range"][1] + 1))
    n_base = int(np.clip(n_base, 2, t.size - 4))
    measured, noise, _ = tissue_concentration(noisy, n_base, fa, tr, t10, r1)
    if training and rng.uniform() < r["concentration_noise"]["probability"]:
        measured, noise = _concentration_noise(rng, conc, n_base)
    return ConditionedSubject(t, given, measured, noise, n_base, params, snr, aif_family, protocol_family,
                              true_base, delay_s)


def _concentration_noise(rng, conc, baseline_frames: int):
    """Concentration curves (N, T) with Gaussian noise of one SD per subject (``concentration_noise``) and
    the per-voxel noise SD over the baseline frames, as the inference path estimates it."""
    sd = float(_loguniform(rng, *CONDITIONED_RANGES["concentration_noise"]["sd_mM"]))
    noisy = conc + sd * rng.standard_normal(conc.shape)
    return noisy, noisy[:, :baseline_frames].std(axis=1, ddof=1)


def sample_conditioned_maps(rng, size: int) -> np.ndarray:
    """(3, H, W) textured Ktrans / ve / vp (the AIF-free simulator's texture: regions, lesions with rim
    and core, vessel-like spots) with, in one patch of five, a disk of fast-exchange tissue."""
    maps = sample_parameter_maps(rng, size)
    if rng.uniform() < 2 * FAST_EXCHANGE["fraction"]:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.uniform(0, size, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(3.0, size / 3) ** 2
        ve = np.maximum(rng.uniform(*FAST_EXCHANGE["ve"]), maps[0] / FAST_EXCHANGE["kep_max_per_min"])
        maps[1] = np.where(disk & (maps[0] > 0), ve, maps[1])
    return maps


def simulate_patch(rng, size: int, **simulate_kwargs):
    """One textured patch of one subject: (ConditionedSubject of its H*W pixels, truth maps (3, H, W)).
    One baseline SNR for the patch (drawn by the training law unless ``snr_range`` says)."""
    maps = sample_conditioned_maps(rng, size)
    snr_range = simulate_kwargs.pop("snr_range", None)
    snr = float(draw_snr(rng, 1, snr_range)[0])
    subject = simulate_subject(rng, size * size, snr_range=snr, params=maps.reshape(3, -1).T, **simulate_kwargs)
    return subject, maps
