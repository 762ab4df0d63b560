"""Simulated DCE slices with arteries and veins, for image-only mode (the input function read from the
image) and its reliability benchmark.

A slice is textured tissue (``simulator.sample_parameter_maps``) crossed by through-plane vessels:

* arteries (2-6, radius 1-4 mm) carry the subject's blood input function; veins (0-2, radius 2-6 mm)
  carry it 3-8 s later, dispersed by an exponential kernel (tau 2-6 s; the area, the same blood, is
  kept, which is what makes venous scaling possible);
* partial volume in the signal domain: each pixel's blood fraction f comes from 8 x 8 sub-pixel
  sampling of the vessel's disk, and S = f S_blood + (1 - f) S_tissue, so a partial-volume pixel's
  converted concentration under-reads the blood's, as in real ROIs;
* inflow (arteries a_in ~ U(0, 0.03), veins U(0, 0.01)): S_blood = S_ss + a_in (M0 sin(FA) - S_ss), a
  brighter baseline and a smaller relative enhancement, so the usual SPGR conversion under-reads;
* optional T2* loss of the blood signal at high concentration: S exp(-TE r2* C_b).

The tissue is simulated on the 0.25 s grid from the true plasma curve (``aif_conditioned``'s no
inverse crime), with Rician noise at the slice's baseline SNR. ``operator_roi`` draws what a person
would place: a vessel among the arteries (one time in five a vein), the centre off by N(0, 0.7)
pixels, a radius of 1-2 pixels, sometimes only the top quarter of its voxels kept.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from DCEPKFittingLib.kinetics import aif as aif_lib
from DCEPKFittingLib.kinetics import tk_models
from DCEPKFittingLib.signal import spgr_signal

from . import aif_families
from .aif_conditioned import CONDITIONED_RANGES, TRAINING_PROTOCOLS, sample_frame_times
from .canonical_grid import estimate_baseline_frames
from .simulator import add_rician_noise, sample_parameter_maps

SLICE_RANGES = {
    "pixel_mm": (2.0, 2.5), "arteries": (2, 6), "artery_radius_mm": (1.0, 4.0), "veins": (0, 2),
    "vein_radius_mm": (2.0, 6.0), "vein_delay_s": (3.0, 8.0), "vein_dispersion_s": (2.0, 6.0),
    "artery_inflow": (0.0, 0.03), "vein_inflow": (0.0, 0.01), "blood_t10_s": (1.4, 1.8), "te_s": (0.001, 0.0025),
    "r2star_per_mM_s": (0.0, 30.0), "t2star_probability": 0.5, "supersampling": 8,
}


@dataclass
class VesselSlice:
    """One simulated slice: signal [H, W, T], frame times (s), acquisition, truth and vessels."""

    signal: np.ndarray
    times_s: np.ndarray
    fa_deg: float
    tr_s: float
    r1_per_mM_s: float
    t10_s: np.ndarray          # [H, W] tissue T10; blood pixels' own T10 in ``blood_t10_s``
    blood_t10_s: float
    params: np.ndarray         # [3, H, W] Ktrans (1/min), ve, vp of the tissue
    blood_fraction: np.ndarray  # [H, W] partial volume f
    vessel_label: np.ndarray   # [H, W] 0 tissue, 1 artery, 2 vein (where f > 0)
    vessel_id: np.ndarray      # [H, W] index of the vessel (0 none)
    plasma_mM: np.ndarray      # true plasma input function on the frames
    venous_plasma_mM: np.ndarray
    hct: float
    baseline_frames: int
    aif_family: str
    protocol_family: str


def _disks(rng, size, pixel_mm, count, radius_mm, taken):
    """Sub-pixel blood fraction of ``count`` non-overlapping disks (list of [H, W] arrays)."""
    n = SLICE_RANGES["supersampling"]
    offsets = (np.arange(n) + 0.5) / n - 0.5
    yy, xx = np.mgrid[:size, :size]
    fractions = []
    for _ in range(count):
        for _attempt in range(50):
            radius = rng.uniform(*radius_mm) / pixel_mm
            cy, cx = rng.uniform(radius + 4, size - radius - 4, 2)
            if not taken[int(cy), int(cx)]:
                break
        sub_y = yy[..., None, None] + offsets[:, None]
        sub_x = xx[..., None, None] + offsets[None, :]
        inside = (sub_y - cy) ** 2 + (sub_x - cx) ** 2 <= radius ** 2
        fraction = inside.mean((-2, -1))
        taken |= fraction > 0
        fractions.append(fraction)
    return fractions


def _blood_signal(rng, blood_mM, fa, tr, r1, t10_blood, inflow, te, r2star):
    """Blood's magnitude signal per frame (M0 = 1): SPGR, then inflow and T2*."""
    steady = spgr_signal(1.0, 1.0 / t10_blood + r1 * blood_mM, fa, tr)
    full = np.sin(np.deg2rad(fa))
    return (steady + inflow * (full - steady)) * np.exp(-te * r2star * blood_mM)


def simulate_vessel_slice(rng, size: int = 96, aif_family: Optional[str] = None,
                          protocol_family: Optional[str] = None, snr: Optional[float] = None,
                          vessel_scale: float = 1.0, noise_rng=None) -> VesselSlice:
    """One slice (``vessel_scale`` shrinks every vessel, for the partial-volume shift stress row;
    ``noise_rng``: another noise realisation of the same slice)."""
    r, c = SLICE_RANGES, CONDITIONED_RANGES
    protocol_family = protocol_family or str(rng.choice(TRAINING_PROTOCOLS))
    t = sample_frame_times(rng, protocol_family)
    arrival = (t[1] - t[0]) * rng.uniform(2.0, 6.0) + rng.uniform(0.0, 30.0)
    draw = aif_families.draw_input_function(rng, aif_family or aif_families.draw_training_family(rng), t[-1],
                                            arrival)
    fine = draw.fine_t_s
    blood_fine = aif_lib.plasma_to_blood(draw.plasma_mM, draw.hct)
    tau = rng.uniform(*r["vein_dispersion_s"])
    venous_fine = tk_models.exp_convolution(fine, np.interp(fine - rng.uniform(*r["vein_delay_s"]), fine, blood_fine,
                                                            left=0.0), 1.0 / tau) / tau
    pixel_mm = rng.uniform(*r["pixel_mm"])
    taken = np.zeros((size, size), bool)
    arteries = _disks(rng, size, pixel_mm, int(rng.integers(r["arteries"][0], r["arteries"][1] + 1)),
                      tuple(vessel_scale * x for x in r["artery_radius_mm"]), taken)
    veins = _disks(rng, size, pixel_mm, int(rng.integers(r["veins"][0], r["veins"][1] + 1)),
                   tuple(vessel_scale * x for x in r["vein_radius_mm"]), taken)
    maps = sample_parameter_maps(rng, size)
    fa, tr, r1 = rng.uniform(*c["fa_deg"]), rng.uniform(*c["tr_s"]), rng.uniform(*c["r1_per_mM_s"])
    t10 = np.clip(rng.uniform(*c["t10_s"]) * np.exp(0.1 * rng.standard_normal((size, size))), *c["t10_s"])
    conc = _sample(fine, tk_models.concentration("etofts", maps.reshape(3, -1).T, fine, draw.plasma_mM), t)
    tissue_signal = spgr_signal(1.0, 1.0 / t10.reshape(-1, 1) + r1 * conc, fa, tr).reshape(size, size, -1)
    t10_blood = rng.uniform(*r["blood_t10_s"])
    te = rng.uniform(*r["te_s"])
    r2star = rng.uniform(*r["r2star_per_mM_s"]) if rng.uniform() < r["t2star_probability"] else 0.0
    signal, label, vessel_id = tissue_signal.copy(), np.zeros((size, size), np.uint8), np.zeros((size, size), int)
    fraction_map = np.zeros((size, size))
    for index, (fraction, kind) in enumerate([(f, 1) for f in arteries] + [(f, 2) for f in veins], start=1):
        curve = np.interp(t, fine, blood_fine if kind == 1 else venous_fine)
        inflow = rng.uniform(*(r["artery_inflow"] if kind == 1 else r["vein_inflow"]))
        blood = _blood_signal(rng, curve, fa, tr, r1, t10_blood, inflow, te, r2star)
        f = fraction[..., None]
        signal = np.where(f > 0, f * blood + (1 - f) * signal, signal)
        label[fraction > 0], vessel_id[fraction > 0] = kind, index
        fraction_map = np.maximum(fraction_map, fraction)
    m0 = 1000.0 * rng.uniform(0.5, 2.0)
    snr = float(snr if snr is not None else np.exp(rng.uniform(np.log(3.0), np.log(100.0))))
    noisy = add_rician_noise(noise_rng or rng, m0 * signal, np.full((size, size), m0 * float(np.median(tissue_signal[..., 0])) / snr))
    plasma = draw.at(t)
    return VesselSlice(noisy.astype(np.float32), t, fa, tr, r1, t10, t10_blood, maps, fraction_map, label, vessel_id,
                       plasma, aif_lib.blood_to_plasma(np.interp(t, fine, venous_fine), draw.hct), draw.hct,
                       estimate_baseline_frames(noisy.reshape(-1, t.size), t), draw.family, protocol_family)


def _sample(fine_t, curves, t):
    position = np.clip((t - fine_t[0]) / (fine_t[1] - fine_t[0]), 0.0, fine_t.size - 1.000001)
    lo = position.astype(int)
    w = position - lo
    return curves[:, lo] * (1.0 - w) + curves[:, lo + 1] * w


def operator_roi(rng, slice_: VesselSlice) -> np.ndarray:
    """A realistically placed ROI (bool [H, W]): a vessel among the arteries (one time in five a vein,
    where there is one), the centre off by N(0, 0.7) px, radius 1-2 px."""
    arteries = np.unique(slice_.vessel_id[slice_.vessel_label == 1])
    veins = np.unique(slice_.vessel_id[slice_.vessel_label == 2])
    pool = veins if (veins.size and rng.uniform() < 0.2) else arteries
    vessel = slice_.vessel_id == int(rng.choice(pool))
    weights = slice_.blood_fraction * vessel
    cy, cx = (np.array(np.nonzero(vessel)) * weights[vessel]).sum(1) / weights[vessel].sum()
    cy, cx = cy + rng.normal(0.0, 0.7), cx + rng.normal(0.0, 0.7)
    size = vessel.shape[0]
    yy, xx = np.mgrid[:size, :size]
    radius = rng.uniform(1.0, 2.0)
    roi = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    if not roi.any():
        roi[int(round(np.clip(cy, 0, size - 1))), int(round(np.clip(cx, 0, size - 1)))] = True
    return roi
