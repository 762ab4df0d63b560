"""On-the-fly physics training data for the inference networks.

Every curve comes from the fitting core's forward models, never from a copy of the physics:
population AIFs (``aif.population_aif``), extended Tofts tissue concentration
(``tk_models.concentration``), SPGR signal (``signal.spgr_signal``). The simulator only
draws their inputs (protocol, AIF shape, tissue parameters, noise) over the ranges in
``SIMULATOR_RANGES``, which every model card stores, and adds Rician noise.

SNR definition: baseline SNR = noise-free pre-contrast signal of the voxel / sigma, where sigma
is the SD of the Gaussian noise on each of the real and imaginary channels before the
magnitude is taken (Rician magnitude noise).

Two sample shapes:
* ``sample_voxels``: independent voxels grouped by "subject" (one protocol + AIF per group),
  for the voxel-wise network;
* ``sample_patches``: 2-D patches with a random texture (smooth regions, lesions with an
  enhancing rim and a necrotic core, vessel-like spots), one subject per patch, for the 2-D
  networks.
Both return the canonical network input (``canonical_grid``), computed exactly as at inference
(baseline detection on the noisy signal included), and the truth.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from DCEPKFittingLib.core.random_fields import smooth_random_field
from DCEPKFittingLib.kinetics import aif as aif_models
from DCEPKFittingLib.kinetics import tk_models
from DCEPKFittingLib.signal import spgr_signal

from . import canonical_grid as cg

# two-rate protocols (a fast first pass, then slower): the interval doubles after this fraction of the frames
TWO_RATE_SWITCH_FRACTION = 0.4

SIMULATOR_RANGES = {
    "tk_model": "etofts (extended Tofts), DCEPKFittingLib.kinetics.tk_models.concentration",
    "Ktrans_per_min": {"range": [0.0, 1.5], "distribution": "tissue: 50% log-uniform [0.002, 1.5], 50% uniform [0, 1.5]"},
    "ve": {"range": [0.02, 0.8], "distribution": "uniform, raised to Ktrans / kep_max so that kep <= 8 /min"},
    "kep_max_per_min": 8.0,
    "vp": {"range": [0.0, 0.2], "distribution": "tissue: 0 with p 0.2 else uniform [0, 0.2]"},
    "class_fractions": {"tissue": 0.83, "non_enhancing (Ktrans = vp = 0)": 0.12,
                        "vessel_like (vp 0.1-0.3, Ktrans 0-0.05)": 0.05},
    "aif_families": list(aif_models.POPULATION_AIFS),
    "aif_amplitude_factor": [0.5, 1.6],
    "aif_width_factor": [0.7, 1.5],
    "aif_dispersion_tau_s": [0.0, 10.0],
    "bolus_arrival_s": "2-6 frame intervals + uniform [0, 30] s after the first frame",
    "hct": [0.30, 0.55],
    "dose_mmol_per_kg": 0.1,
    "n_frames": [30, 150],
    "frame_interval_s": {"range": [1.5, 15.0], "distribution": "log-uniform; 25% jittered +-20%, "
                         f"20% two-rate (x2 after {TWO_RATE_SWITCH_FRACTION:.0%})"},
    "duration_s": [150.0, 660.0],
    "fa_deg": [8.0, 35.0],
    "tr_s": [0.0025, 0.008],
    "t10_s": [0.6, 2.5],
    "r1_per_mM_s": [3.0, 6.0],
    "baseline_snr": {"range": [4.0, 150.0], "distribution": "log-uniform", "definition":
                     "noise-free pre-contrast signal / SD of the Gaussian noise per quadrature channel (Rician magnitude)"},
    "protocol_inputs": "FA, TR, T10 and r1 are known (as for the conventional fit) and used for the exact SPGR "
                       "inversion to concentration; the AIF is never an input",
    "patch_size": 32,
}

KEP_MAX = SIMULATOR_RANGES["kep_max_per_min"]
_FINE_DT_S = 0.25


def _loguniform(rng, lo, hi, size=None):
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))


@dataclass
class Subject:
    """One acquisition: protocol, plasma AIF on the frame times, and a callable for other times."""

    times_s: np.ndarray
    cp_mM: np.ndarray
    fa_deg: float
    tr_s: float
    r1_per_mM_s: float
    fine_t_s: np.ndarray
    fine_cp_mM: np.ndarray

    def plasma_at(self, t_s):
        return np.interp(t_s, self.fine_t_s, self.fine_cp_mM, left=0.0)


def sample_times(rng) -> np.ndarray:
    r = SIMULATOR_RANGES
    dt = float(_loguniform(rng, *r["frame_interval_s"]["range"]))
    n_lo = int(max(r["n_frames"][0], np.ceil(r["duration_s"][0] / dt) + 1))
    n_hi = int(min(r["n_frames"][1], np.floor(r["duration_s"][1] / dt) + 1))
    n = int(rng.integers(min(n_lo, n_hi), max(n_lo, n_hi) + 1))
    steps = np.full(n - 1, dt)
    style = rng.uniform()
    if style < 0.25:
        steps *= rng.uniform(0.8, 1.2, n - 1)
    elif style < 0.45:
        steps[int(TWO_RATE_SWITCH_FRACTION * (n - 1)):] *= 2.0
    return np.concatenate([[0.0], np.cumsum(steps)])


def sample_subject(rng, times_s: Optional[np.ndarray] = None) -> Subject:
    r = SIMULATOR_RANGES
    t = sample_times(rng) if times_s is None else np.asarray(times_s, dtype=np.float64)
    dt0 = t[1] - t[0]
    arrival = dt0 * rng.uniform(2.0, 6.0) + rng.uniform(0.0, 30.0)
    family = aif_models.POPULATION_AIFS[rng.integers(len(aif_models.POPULATION_AIFS))]
    hct = rng.uniform(*r["hct"])
    amplitude = rng.uniform(*r["aif_amplitude_factor"])
    width = rng.uniform(*r["aif_width_factor"])
    tau = rng.uniform(*r["aif_dispersion_tau_s"])
    fine_t = np.arange(0.0, t[-1] + 2 * _FINE_DT_S, _FINE_DT_S)
    # width scaling stretches the population curve in time around arrival
    since = np.maximum(fine_t - arrival, 0.0) / width
    cp = amplitude * aif_models.population_aif(family, since, 0.0, r["dose_mmol_per_kg"], "plasma", hct)
    cp = np.where(fine_t >= arrival, cp, 0.0)
    if tau > 0.5:  # dispersion: convolution with a unit-area exponential kernel of time constant tau
        cp = tk_models.exp_convolution(fine_t, cp, 1.0 / tau) / tau
    return Subject(times_s=t, cp_mM=np.interp(t, fine_t, cp), fa_deg=float(rng.uniform(*r["fa_deg"])),
                   tr_s=float(rng.uniform(*r["tr_s"])), r1_per_mM_s=float(rng.uniform(*r["r1_per_mM_s"])),
                   fine_t_s=fine_t, fine_cp_mM=cp)


def sample_tissue_params(rng, n: int) -> np.ndarray:
    """(n, 3) Ktrans (1/min), ve, vp over SIMULATOR_RANGES, with non-enhancing and vessel-like voxels."""
    ktrans = np.where(rng.uniform(size=n) < 0.5, _loguniform(rng, 0.002, 1.5, n), rng.uniform(0.0, 1.5, n))
    ve = np.maximum(rng.uniform(0.02, 0.8, n), ktrans / KEP_MAX)
    vp = np.where(rng.uniform(size=n) < 0.2, 0.0, rng.uniform(0.0, 0.2, n))
    kind = rng.uniform(size=n)
    non_enhancing = kind < 0.12
    vessel = (kind >= 0.12) & (kind < 0.17)
    ktrans = np.where(non_enhancing, 0.0, np.where(vessel, rng.uniform(0.0, 0.05, n), ktrans))
    vp = np.where(non_enhancing, 0.0, np.where(vessel, rng.uniform(0.1, 0.3, n), vp))
    ve = np.maximum(ve, ktrans / KEP_MAX)
    return np.stack([ktrans, ve, vp], axis=-1)


def noise_free(subject: Subject, params: np.ndarray, t10_s: np.ndarray, m0: np.ndarray):
    """Noise-free concentration (mM) and SPGR signal (N, T) through the core forward models."""
    conc = tk_models.concentration("etofts", params, subject.times_s, subject.cp_mM)
    r1 = 1.0 / t10_s[:, None] + subject.r1_per_mM_s * conc
    signal = spgr_signal(m0[:, None], r1, subject.fa_deg, subject.tr_s)
    return conc, signal


def add_rician_noise(rng, signal: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    sigma = np.asarray(sigma, dtype=np.float64)[..., None]
    real = signal + sigma * rng.standard_normal(signal.shape)
    imag = sigma * rng.standard_normal(signal.shape)
    return np.hypot(real, imag)


@dataclass
class SimulatedBatch:
    """Canonical inputs and truth. Voxel batches: curves (N, G), valid (N, G), protocol (N, P),
    params (N, 3). Patch batches: curves (B, G, H, W), valid (B, G), protocol (B, P, H, W),
    params (B, 3, H, W), tissue (B, 1, H, W). ``cp_grid`` (B or N, G): plasma AIF (mM) on the
    canonical grid, for the tracer-kinetic loss. ``snr`` per voxel."""

    curves: np.ndarray
    valid: np.ndarray
    protocol: np.ndarray
    params: np.ndarray
    cp_grid: np.ndarray
    snr: np.ndarray
    tissue: Optional[np.ndarray] = None


def simulate_subject_voxels(rng, subject: Subject, params: np.ndarray, snr_range=None, t10_s=None):
    """Noisy signal + canonical input for voxels sharing one subject. Returns (CanonicalInput,
    conc (N, T), signal_noisy (N, T), snr (N,), t10 (N,))."""
    r = SIMULATOR_RANGES
    n = params.shape[0]
    t10 = rng.uniform(*r["t10_s"], n) if t10_s is None else np.broadcast_to(np.asarray(t10_s, float), (n,)).copy()
    m0 = np.full(n, 1000.0 * rng.uniform(0.5, 2.0))
    conc, signal = noise_free(subject, params, t10, m0)
    lo, hi = snr_range or r["baseline_snr"]["range"]
    snr = _loguniform(rng, lo, hi, n)
    noisy = add_rician_noise(rng, signal, signal[:, 0] / snr)
    canonical = cg.to_canonical(noisy, subject.times_s, fa_deg=subject.fa_deg, tr_s=subject.tr_s, t10_s=t10,
                                r1_per_mM_s=subject.r1_per_mM_s)
    return canonical, conc, noisy, snr, t10


def cp_on_grid(subject: Subject) -> np.ndarray:
    return subject.plasma_at(subject.times_s[0] + cg.grid_times_s())


def sample_voxels(rng, n_subjects: int = 16, voxels_per_subject: int = 256, snr_range=None,
                  times_s=None) -> SimulatedBatch:
    """Voxels of ``n_subjects`` subjects (one AIF and protocol each); ``times_s`` fixes the frame times."""
    out = {k: [] for k in ("curves", "valid", "protocol", "params", "cp", "snr")}
    for _ in range(n_subjects):
        subject = sample_subject(rng, times_s)
        params = sample_tissue_params(rng, voxels_per_subject)
        canonical, _, _, snr, _ = simulate_subject_voxels(rng, subject, params, snr_range)
        out["curves"].append(canonical.curves)
        out["valid"].append(np.broadcast_to(canonical.valid, canonical.curves.shape))
        out["protocol"].append(canonical.protocol)
        out["params"].append(params)
        out["cp"].append(np.broadcast_to(cp_on_grid(subject), canonical.curves.shape))
        out["snr"].append(snr)
    cat = {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}
    return SimulatedBatch(cat["curves"], cat["valid"], cat["protocol"], cat["params"], cat["cp"], cat["snr"])


# ------------------------------------------------------------------------------------ patches
def _patch_field(rng, size, sigma):
    """A zero-mean, unit-SD texture of a square patch that tiles (``core.random_fields``)."""
    return smooth_random_field(rng, (size, size), sigma, mode="wrap", zero_mean=True)


def sample_parameter_maps(rng, size: int):
    """(3, H, W) Ktrans, ve, vp with a texture: 2-3 smooth regions, lesions, vessel-like spots."""
    n_regions = int(rng.integers(2, 4))
    base = sample_tissue_params(rng, n_regions + 4)
    field = _patch_field(rng, size, rng.uniform(2.0, 6.0))
    edges = np.quantile(field, np.sort(rng.uniform(0.1, 0.9, n_regions - 1)))
    labels = np.digitize(field, edges)
    maps = base[labels].transpose(2, 0, 1).copy()                     # (3, H, W)
    yy, xx = np.mgrid[:size, :size]
    for lesion in range(int(rng.integers(0, 3))):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(2.5, size / 4, 2)
        radius = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        rim, core = base[n_regions + lesion], base[n_regions + 2 + lesion]
        rim[0] = rng.uniform(0.1, 1.5)
        rim[1] = max(rim[1], rim[0] / KEP_MAX)
        inside, in_core = radius < 1.0, radius < rng.uniform(0.0, 0.7)
        maps[:, inside] = rim[:, None]
        maps[:, in_core] = core[:, None]
    for _ in range(int(rng.integers(0, 4))):                             # vessel-like spots
        cy, cx = rng.integers(0, size, 2)
        maps[:, max(cy - 1, 0):cy + 1, max(cx - 1, 0):cx + 1] = np.array(
            [rng.uniform(0, 0.05), rng.uniform(0.02, 0.8), rng.uniform(0.1, 0.3)])[:, None, None]
    # smooth within-region variation (+-20 %), then back inside the ranges
    maps *= np.exp(0.1 * _patch_field(rng, size, 3.0))[None]
    maps[0] = np.clip(maps[0], 0.0, 1.5)
    maps[2] = np.clip(maps[2], 0.0, 0.3)
    maps[1] = np.clip(np.maximum(maps[1], maps[0] / KEP_MAX), 0.02, 0.8)
    return maps


def simulate_patch(rng, size: Optional[int] = None, snr_range=None, times_s=None) -> dict:
    """One textured patch: subject, truth maps (3, H, W), T10 (H*W,), noisy signal (H*W, T),
    canonical input and per-voxel SNR. ``times_s`` fixes the protocol's frame times."""
    size = int(size or SIMULATOR_RANGES["patch_size"])
    subject = sample_subject(rng, times_s)
    maps = sample_parameter_maps(rng, size)
    params = maps.reshape(3, -1).T
    t10_map = np.clip(rng.uniform(*SIMULATOR_RANGES["t10_s"]) * np.exp(0.15 * _patch_field(rng, size, 4.0)),
                      *SIMULATOR_RANGES["t10_s"]).ravel()
    lo, hi = snr_range or SIMULATOR_RANGES["baseline_snr"]["range"]
    snr = float(_loguniform(rng, lo, hi))
    canonical, conc, noisy, snr_v, t10 = simulate_subject_voxels(rng, subject, params, (snr, snr), t10_map)
    return {"subject": subject, "maps": maps, "params": params, "t10": t10, "signal": noisy, "conc": conc,
            "canonical": canonical, "snr": snr_v, "size": size}


def patches_to_batch(patches) -> SimulatedBatch:
    out = {k: [] for k in ("curves", "valid", "protocol", "params", "cp", "snr")}
    for p in patches:
        c, size = p["canonical"], p["size"]
        g = c.curves.shape[1]
        out["curves"].append(c.curves.T.reshape(g, size, size))
        out["valid"].append(c.valid)
        out["protocol"].append(c.protocol.T.reshape(-1, size, size))
        out["params"].append(p["maps"])
        out["cp"].append(cp_on_grid(p["subject"]))
        out["snr"].append(p["snr"].reshape(size, size))
    cat = {k: np.stack(v).astype(np.float32) for k, v in out.items()}
    size = patches[0]["size"]
    tissue = np.ones((len(patches), 1, size, size), dtype=np.float32)
    return SimulatedBatch(cat["curves"], cat["valid"], cat["protocol"], cat["params"], cat["cp"], cat["snr"], tissue)


def sample_patches(rng, n_patches: int = 8, size: Optional[int] = None, snr_range=None, times_s=None) -> SimulatedBatch:
    return patches_to_batch([simulate_patch(rng, size, snr_range, times_s) for _ in range(n_patches)])
