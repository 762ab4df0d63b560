"""Synthetic brain-like DCE-MRI phantom with ground truth.

Anatomy on a slab through an ellipsoidal brain (mm coordinates, LPS axes: i -> left,
j -> posterior, k -> superior): white matter, a cortical grey-matter band, CSF (outer rim and
two ventricles), a vessel standing for the superior sagittal sinus (posterior midline) whose
concentration is the blood input function itself, and enhancing tumours (rim around a
necrotic core). Each tissue has T10, S0, Ktrans, ve and vp with a smooth random texture.

Physics: a population AIF (``aif.population_aif``, whole blood) arrives at frame
``protocol.baseline_frames``; tissue concentration follows the extended Tofts model
(``tk_models.concentration('etofts', ...)``) with the plasma AIF; R1(t) = 1/T10 + r1 C(t) is
rendered through the SPGR equation (``signal.spgr_signal``) and Rician noise is added.

SNR is defined as the mean pre-contrast signal of white matter divided by the noise SD
``sigma`` of each of the real and imaginary channels (the magnitude is Rician; its SD is close
to sigma where SNR is high and ``sigma * sqrt(2 - pi/2)`` in signal-free background).
"""

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry
from ..core.output_files import OutputSet, check_targets
from ..core.random_fields import smooth_random_field
from ..io import DCESeries, stage_dce_series, stage_maps, stage_volume
from ..kinetics import aif as aif_lib
from ..kinetics import tk_models
from ..signal import check_flip_angle, check_tr, default_r1, spgr_signal

# Label values of the tissue map.
BACKGROUND, WHITE_MATTER, GREY_MATTER, CSF, TUMOUR_RIM, NECROTIC_CORE, VESSEL = range(7)
LABEL_NAMES = {
    BACKGROUND: "background",
    WHITE_MATTER: "white matter",
    GREY_MATTER: "grey matter",
    CSF: "CSF",
    TUMOUR_RIM: "enhancing tumour rim",
    NECROTIC_CORE: "necrotic core",
    VESSEL: "vessel (sagittal sinus)",
}

# Mean tissue properties. T10 (s) at 1.5 T / 3 T from typical brain relaxometry (e.g. Stanisz
# et al. MRM 2005; Wansapura et al. JMRI 1999; blood: Lu et al. MRM 2004); S0 relative proton
# density; Ktrans 1/min, ve, vp fractions typical of intact brain and high-grade glioma.
TISSUE_PROPERTIES = {
    WHITE_MATTER: dict(T10={1.5: 0.65, 3.0: 0.85}, S0=0.70, Ktrans=0.001, ve=0.02, vp=0.02),
    GREY_MATTER: dict(T10={1.5: 1.10, 3.0: 1.35}, S0=0.80, Ktrans=0.002, ve=0.03, vp=0.04),
    CSF: dict(T10={1.5: 3.50, 3.0: 4.00}, S0=1.00, Ktrans=0.0, ve=0.0, vp=0.0),
    TUMOUR_RIM: dict(T10={1.5: 1.20, 3.0: 1.50}, S0=0.85, Ktrans=0.12, ve=0.30, vp=0.06),
    NECROTIC_CORE: dict(T10={1.5: 1.80, 3.0: 2.10}, S0=0.90, Ktrans=0.01, ve=0.60, vp=0.005),
    VESSEL: dict(T10={1.5: 1.44, 3.0: 1.65}, S0=0.85, Ktrans=0.0, ve=0.0, vp=None),  # vp = 1 - hct
}
MAX_VOLUME_FRACTION = 0.99   # ve + vp: the cells take the rest
# Relative spatial variation (SD / mean) of the texture, per map; tumours vary more.
TEXTURE_CV = dict(T10=0.05, S0=0.05, Ktrans=0.15, ve=0.10, vp=0.15)
TUMOUR_TEXTURE_CV = dict(T10=0.08, S0=0.05, Ktrans=0.35, ve=0.20, vp=0.30)

S0_SCALE = 1000.0        # arbitrary signal units
BRAIN_SEMI_AXES_MM = (60.0, 85.0, 70.0)   # (z, y, x): superior, posterior, left


@dataclass
class Protocol:
    """Acquisition and contrast-injection settings (OSIPI units)."""

    n_frames: int = 60
    frame_time_s: float = 5.0
    times_s: Optional[Sequence[float]] = None   # explicit frame times (s); overrides the two above
    fa_deg: float = 15.0
    tr_s: float = 0.005
    field_T: float = 3.0
    agent: str = "gadoterate"
    r1_per_mM_s: Optional[float] = None        # None: default_r1(agent, field_T)
    baseline_frames: int = 6                    # frames before bolus arrival
    hct: float = 0.45
    aif: str = "parker"
    dose_mmol_per_kg: float = 0.1
    vfa_tr_s: float = 0.005

    def __post_init__(self):
        check_flip_angle(self.fa_deg)
        check_tr(self.tr_s)
        check_tr(self.vfa_tr_s)
        if self.r1_per_mM_s is None:
            self.r1_per_mM_s = default_r1(self.agent, self.field_T)
        if self.aif not in aif_lib.POPULATION_AIFS:
            raise DCEPKInputError(f"unknown AIF '{self.aif}': use one of {aif_lib.POPULATION_AIFS}")
        times = self.times()
        if not 1 <= self.baseline_frames < times.size:
            raise DCEPKInputError(
                f"the protocol's {self.baseline_frames} pre-contrast (baseline) frames need at least one frame after "
                f"them, and at least 1 of them, in a series of {times.size} frames: give more frames")
        if not 0 <= self.hct < 1:
            raise DCEPKInputError(f"the haematocrit {self.hct:g} must be a fraction in [0, 1)")

    def times(self) -> np.ndarray:
        if self.times_s is not None:
            t = np.asarray(self.times_s, dtype=np.float64).ravel()
            if t.size < 2 or not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
                raise DCEPKInputError("times_s must be at least 2 finite, strictly increasing times in seconds")
            return t
        if int(self.n_frames) < 2 or not self.frame_time_s > 0:
            raise DCEPKInputError("need n_frames >= 2 and a positive frame_time_s (seconds)")
        return np.arange(int(self.n_frames)) * float(self.frame_time_s)

    @property
    def arrival_s(self) -> float:
        """Bolus arrival time: the time of the first post-baseline frame."""
        return float(self.times()[self.baseline_frames])

    def t10_of(self, label: int) -> float:
        table = TISSUE_PROPERTIES[label]["T10"]
        field = min(table, key=lambda f: abs(f - self.field_T))
        return table[field]


@dataclass
class VFASeries:
    signals: np.ndarray            # [k, j, i, nFA]
    flip_angles_deg: np.ndarray
    tr_s: float


@dataclass
class Phantom:
    series: DCESeries
    truth: Dict[str, np.ndarray]   # Ktrans (1/min), ve, vp, kep (1/min), T10 (s), S0
    labels: np.ndarray             # uint8 [k, j, i]
    label_names: Dict[int, str]
    aif_mask: np.ndarray           # bool [k, j, i]: vessel voxels
    tissue_masks: Dict[str, np.ndarray]
    protocol: Protocol
    aif_blood_mM: np.ndarray       # (T,)
    aif_plasma_mM: np.ndarray      # (T,)
    concentration_mM: np.ndarray   # noise-free tissue concentration [k, j, i, t]
    noise_sigma: float             # 0 when noise-free
    snr: Optional[float]
    vfa: Optional[VFASeries] = None
    lesions: list = field(default_factory=list)


def _anatomy(shape, spacing_kji_mm, lesions, rng):
    k, j, i = (np.arange(n) - (n - 1) / 2.0 for n in shape)
    z = k[:, None, None] * spacing_kji_mm[0]
    y = j[None, :, None] * spacing_kji_mm[1]
    x = i[None, None, :] * spacing_kji_mm[2]
    az, ay, ax = BRAIN_SEMI_AXES_MM
    # Scale the brain to the in-plane field of view so small test grids still hold all tissues.
    fov_y, fov_x = shape[1] * spacing_kji_mm[1], shape[2] * spacing_kji_mm[2]
    scale = min(1.0, 0.92 * fov_y / (2 * ay), 0.92 * fov_x / (2 * ax))
    ay, ax = ay * scale, ax * scale
    rho = np.sqrt((z / az) ** 2 + (y / ay) ** 2 + (x / ax) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[rho < 1.0] = CSF                      # outer CSF rim
    labels[rho < 0.94] = GREY_MATTER             # cortex
    labels[rho < 0.80] = WHITE_MATTER
    for side in (-1.0, 1.0):                     # lateral ventricles
        vent = ((x - side * 0.12 * ax) / (0.07 * ax)) ** 2 + ((y + 0.05 * ay) / (0.30 * ay)) ** 2 \
            + (z / (0.25 * az)) ** 2 < 1.0
        labels[vent] = CSF

    placed = []
    if isinstance(lesions, (int, np.integer)):
        specs = []
        for _ in range(int(lesions)):
            radius = rng.uniform(0.18, 0.28) * min(ax, ay)
            for _ in range(100):                 # random centre inside the white matter, off midline
                cx = rng.uniform(0.25, 0.55) * ax * rng.choice([-1.0, 1.0])
                cy = rng.uniform(-0.5, 0.4) * ay
                cz = rng.uniform(-0.3, 0.3) * min(az, abs(z).max() + 1e-9)
                if all(math.dist((cz, cy, cx), s["center_mm"]) > radius + s["radius_mm"] for s in specs):
                    break
            specs.append(dict(center_mm=(cz, cy, cx), radius_mm=radius))
    else:
        specs = list(lesions or [])
    for spec in specs:
        try:
            cz, cy, cx = (float(v) for v in spec["center_mm"])
            radius = float(spec["radius_mm"])
        except (KeyError, TypeError, ValueError):
            raise DCEPKInputError(
                "each lesion must be a dict with 'center_mm' (z, y, x from the brain centre, mm) and 'radius_mm'") from None
        core_fraction = float(spec.get("core_fraction", 0.55))
        r = np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2)
        labels[r < radius] = TUMOUR_RIM
        labels[r < core_fraction * radius] = NECROTIC_CORE
        placed.append(dict(center_mm=(cz, cy, cx), radius_mm=radius, core_fraction=core_fraction))

    # Superior sagittal sinus: a tube along k on the posterior midline, drawn last.
    sinus_r = max(3.0, 1.6 * max(spacing_kji_mm[1], spacing_kji_mm[2]))
    sinus = (y - 0.90 * ay) ** 2 + x ** 2 < sinus_r ** 2
    labels[np.broadcast_to(sinus, shape)] = VESSEL
    return labels, placed


@dataclass
class _Model:
    """Everything of a phantom but its 4-D arrays, which ``_slabs`` renders a few slices at a time."""
    protocol: Protocol
    times: np.ndarray
    labels: np.ndarray
    placed: list
    maps: Dict[str, np.ndarray]    # T10 (s), S0, Ktrans (1/min), ve, vp
    aif_blood: np.ndarray
    aif_plasma: np.ndarray
    sigma: float
    snr: Optional[float]
    geometry: Geometry
    rng: np.random.Generator       # positioned after the texture: the series' noise comes next
    seed: int
    dtype: type
    vfa_flip_angles_deg: Optional[np.ndarray]

    @property
    def shape(self):
        return self.labels.shape


def make_phantom(shape: Tuple[int, int, int] = (8, 96, 96), protocol: Optional[Protocol] = None,
                 snr: Optional[float] = 30.0, seed: int = 0, texture: bool = True, lesions=1,
                 vfa_flip_angles_deg: Optional[Sequence[float]] = None,
                 spacing_mm: Optional[Tuple[float, float, float]] = None,
                 tissue_properties: Optional[Dict[int, dict]] = None,
                 texture_correlation_mm: float = 8.0, dtype=np.float32) -> Phantom:
    """Build the phantom.

    shape: (k, j, i) voxels; protocol: ``Protocol``; snr: white-matter baseline signal / noise
    SD (None or inf: noise-free); seed: all randomness (texture, lesion placement, noise);
    texture: smooth random variation of every map inside tissues; lesions: number of randomly
    placed tumours or a list of dicts {'center_mm': (z, y, x) from the brain centre,
    'radius_mm', optional 'core_fraction'}; vfa_flip_angles_deg: also render a VFA series for
    T1 mapping; spacing_mm: (k, j, i) voxel size, default 5 mm slices and a 200 mm field of
    view; tissue_properties: overrides of ``TISSUE_PROPERTIES`` entries, e.g.
    {TUMOUR_RIM: {'Ktrans': 0.3}}; dtype of the signal arrays.

    The series is rendered a few slices at a time into its ``dtype`` arrays (memory: the series
    and the concentration at ``dtype``, plus one slab); ``stream_phantom`` writes the same phantom
    to files without ever holding the series.
    """
    model = _model(shape, protocol, snr, seed, texture, lesions, vfa_flip_angles_deg, spacing_mm,
                   tissue_properties, texture_correlation_mm, dtype)
    full = model.shape + (model.times.size,)
    signal, conc = np.empty(full, dtype=dtype), np.empty(full, dtype=dtype)
    for k0, k1, signal_slab, conc_slab in _slabs(model):
        signal[k0:k1], conc[k0:k1] = signal_slab, conc_slab
    protocol = model.protocol
    series = DCESeries(signal=signal, times_s=model.times, geometry=model.geometry,
                       flip_angle_deg=float(protocol.fa_deg), tr_s=float(protocol.tr_s), kind="signal",
                       metadata=dict(source="DCEPK synthetic brain phantom", seed=seed, snr=snr,
                                     noise_sigma=model.sigma, field_T=protocol.field_T, agent=protocol.agent,
                                     r1_per_mM_s=protocol.r1_per_mM_s, hct=protocol.hct, aif=protocol.aif,
                                     baseline_frames=protocol.baseline_frames))
    names = {v: n for v, n in LABEL_NAMES.items() if v != BACKGROUND}
    return Phantom(series=series, truth=_truth(model), labels=model.labels, label_names=names,
                   aif_mask=model.labels == VESSEL, tissue_masks={names[v]: model.labels == v for v in names},
                   protocol=protocol, aif_blood_mM=model.aif_blood, aif_plasma_mM=model.aif_plasma,
                   concentration_mM=conc, noise_sigma=model.sigma, snr=model.snr, vfa=_vfa(model),
                   lesions=model.placed)


def _model(shape, protocol, snr, seed, texture, lesions, vfa_flip_angles_deg, spacing_mm, tissue_properties,
           texture_correlation_mm, dtype) -> _Model:
    protocol = protocol or Protocol()
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1 or shape[1] < 16 or shape[2] < 16:
        raise DCEPKInputError(f"phantom shape must be (k, j, i) with at least 16 x 16 voxels in-plane; got {shape}")
    if snr is not None and not (snr > 0):
        raise DCEPKInputError(f"snr must be positive (or None / inf for no noise); got {snr}")
    fas = None if vfa_flip_angles_deg is None else check_flip_angle(vfa_flip_angles_deg).ravel()
    noise_free = snr is None or math.isinf(snr)
    spacing = tuple(float(s) for s in (spacing_mm or (5.0, 200.0 / shape[1], 200.0 / shape[2])))
    rng = np.random.default_rng(seed)
    props = {lab: dict(p) for lab, p in TISSUE_PROPERTIES.items()}
    for lab, override in (tissue_properties or {}).items():
        if lab not in props:
            raise DCEPKInputError(f"unknown tissue label {lab}: use one of {sorted(props)}")
        props[lab].update(override)
        volume = props[lab]["ve"] + (1.0 - protocol.hct if props[lab]["vp"] is None else props[lab]["vp"])
        if volume > MAX_VOLUME_FRACTION:
            raise DCEPKInputError(f"the {LABEL_NAMES[lab]}'s ve + vp = {volume:g} exceeds {MAX_VOLUME_FRACTION:g}: "
                                  "they are fractions of the tissue volume; give smaller values")

    labels, placed = _anatomy(shape, spacing, lesions, rng)
    times = protocol.times()
    maps = _parameter_maps(labels, props, protocol, rng, spacing, texture, texture_correlation_mm)

    # Input function: population AIF (whole blood) arriving at the first post-baseline frame.
    aif_blood = aif_lib.population_aif(protocol.aif, times - times[0], delay_s=protocol.arrival_s - times[0],
                                       dose_mmol_per_kg=protocol.dose_mmol_per_kg, compartment="blood",
                                       hct=protocol.hct)
    geometry = Geometry(spacing=(spacing[2], spacing[1], spacing[0]),
                        origin_lps=[-(shape[2] - 1) / 2 * spacing[2], -(shape[1] - 1) / 2 * spacing[1],
                                    -(shape[0] - 1) / 2 * spacing[0]])
    model = _Model(protocol=protocol, times=times, labels=labels, placed=placed, maps=maps, aif_blood=aif_blood,
                   aif_plasma=aif_lib.blood_to_plasma(aif_blood, protocol.hct), sigma=0.0,
                   snr=None if noise_free else float(snr), geometry=geometry, rng=rng, seed=seed, dtype=dtype,
                   vfa_flip_angles_deg=fas)
    if not noise_free:
        model.sigma = _white_matter_baseline(model) / float(snr)
    return model


def _parameter_maps(labels, props, protocol, rng, spacing, texture, texture_correlation_mm) -> Dict[str, np.ndarray]:
    """Tissue means times (1 + cv * smooth field), clipped to physical ranges."""
    shape = labels.shape
    maps = {name: np.zeros(shape) for name in ("T10", "S0", "Ktrans", "ve", "vp")}
    sigma_voxels = [texture_correlation_mm / s for s in spacing]
    fields = {name: smooth_random_field(rng, shape, sigma_voxels) if texture else np.zeros(shape) for name in maps}
    for lab, p in props.items():
        inside = labels == lab
        if not inside.any():
            continue
        means = dict(T10=p["T10"] if np.isscalar(p["T10"]) else protocol.t10_of(lab), S0=p["S0"],
                     Ktrans=p["Ktrans"], ve=p["ve"], vp=(1.0 - protocol.hct) if p["vp"] is None else p["vp"])
        cv = TUMOUR_TEXTURE_CV if lab in (TUMOUR_RIM, NECROTIC_CORE) else TEXTURE_CV
        for name, mean in means.items():
            # The vessel is blood: no texture on its kinetics (its curve is the AIF itself).
            variation = 0.0 if (lab == VESSEL and name in ("Ktrans", "ve", "vp")) else cv[name]
            local = fields[name][inside]
            # Re-standardise within the tissue so its mean and spread are the set ones, however
            # small the tissue is compared with the texture's correlation length.
            sd = local.std()
            local = (local - local.mean()) / sd if sd > 1e-6 else np.zeros_like(local)
            maps[name][inside] = mean * (1.0 + variation * local)
    maps["T10"] = np.clip(maps["T10"], 0.2, 6.0)
    maps["S0"] = np.clip(maps["S0"], 0.05, None) * S0_SCALE
    maps["Ktrans"] = np.clip(maps["Ktrans"], 0.0, 5.0)
    maps["ve"] = np.clip(maps["ve"], 0.0, 0.95)
    maps["vp"] = np.clip(maps["vp"], 0.0, 1.0)
    # keep the volumes physical: where the texture takes ve + vp above MAX_VOLUME_FRACTION, both shrink by
    # one factor (each by its own, taken after the other, left ve + vp above 1)
    total = maps["ve"] + maps["vp"]
    scale = np.where(total > MAX_VOLUME_FRACTION, MAX_VOLUME_FRACTION / np.maximum(total, MAX_VOLUME_FRACTION), 1.0)
    maps["ve"] *= scale
    maps["vp"] *= scale
    background = labels == BACKGROUND
    maps["T10"][background] = np.nan              # no tissue, no T1
    maps["S0"][background] = 0.0
    return maps


def _slab_slices(model: _Model) -> int:
    # ~32 MB per float64 slab array (a handful live at once while a slab is rendered)
    per_slice = int(np.prod(model.shape[1:])) * model.times.size * 8
    return max(1, min(model.shape[0], (32 << 20) // max(per_slice, 1)))


def _concentration_slab(model: _Model, k0: int, k1: int, frames: Optional[int] = None) -> np.ndarray:
    """Noise-free tissue concentration (mM, float64) of slices k0:k1 over the first ``frames`` frames
    (all by default; the convolution is causal, so fewer frames give the same first values)."""
    times = model.times if frames is None else model.times[:frames]
    labels, maps = model.labels[k0:k1], {name: m[k0:k1] for name, m in model.maps.items()}
    conc = np.zeros(labels.shape + (times.size,))
    kinetic = (labels != BACKGROUND) & (labels != VESSEL) & (maps["ve"] > 0)
    plasma, blood = model.aif_plasma[:times.size], model.aif_blood[:times.size]
    if kinetic.any():
        params = np.stack([maps["Ktrans"][kinetic], maps["ve"][kinetic], maps["vp"][kinetic]], axis=-1)
        conc[kinetic] = tk_models.concentration("etofts", params, times, plasma)
    vascular_only = (labels != BACKGROUND) & (labels != VESSEL) & ~kinetic & (maps["vp"] > 0)
    conc[vascular_only] = maps["vp"][vascular_only][:, None] * plasma
    conc[labels == VESSEL] = blood                 # the vessel voxel is whole blood
    return conc


def _clean_signal(model: _Model, conc: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """Noise-free SPGR signal (float64) of slices k0:k1 for their concentration."""
    background = model.labels[k0:k1] == BACKGROUND
    t10 = np.where(background, 1.0, model.maps["T10"][k0:k1])
    r1_t = 1.0 / t10[..., None] + model.protocol.r1_per_mM_s * conc
    clean = spgr_signal(model.maps["S0"][k0:k1][..., None], r1_t, model.protocol.fa_deg, model.protocol.tr_s)
    clean[background] = 0.0
    return clean


def _white_matter_baseline(model: _Model) -> float:
    """Mean pre-contrast signal of white matter (of all tissue when there is none): the SNR's reference."""
    wm = model.labels == WHITE_MATTER
    reference = wm if wm.any() else model.labels != BACKGROUND
    n_base, step, values = model.protocol.baseline_frames, _slab_slices(model), []
    for k0 in range(0, model.shape[0], step):
        k1 = min(k0 + step, model.shape[0])
        clean = _clean_signal(model, _concentration_slab(model, k0, k1, frames=n_base), k0, k1)
        values.append(clean[reference[k0:k1]])
    return float(np.concatenate(values).mean())


def _slabs(model: _Model):
    """(k0, k1, signal, concentration) of successive slabs of slices, in ``model.dtype``.

    Rician noise as if drawn for the whole series at once (the real parts of every voxel, then the
    imaginary parts: one generator follows each), so a seed gives the same phantom however it is
    rendered. Afterwards ``model.rng`` stands where the whole-series draw would have left it."""
    rng_real = rng_imag = None
    if model.sigma > 0.0:
        rng_real = copy.deepcopy(model.rng)
        for k0, k1 in _slab_bounds(model):  # move the imaginary parts' generator past the real parts
            model.rng.standard_normal((k1 - k0,) + model.shape[1:] + (model.times.size,))
        rng_imag = model.rng
    for k0, k1 in _slab_bounds(model):
        conc = _concentration_slab(model, k0, k1)
        signal = _clean_signal(model, conc, k0, k1)
        if rng_real is not None:
            signal = _rician(signal, model.sigma, rng_real, rng_imag)
        yield k0, k1, signal.astype(model.dtype), conc.astype(model.dtype)


def _slab_bounds(model: _Model):
    step = _slab_slices(model)
    return [(k0, min(k0 + step, model.shape[0])) for k0 in range(0, model.shape[0], step)]


def _rician(signal: np.ndarray, sigma: float, real_rng, imaginary_rng) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (the real parts drawn first)."""
    real = signal + real_rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imaginary_rng.normal(0.0, sigma, signal.shape))


def _vfa(model: _Model) -> Optional["VFASeries"]:
    """The VFA images (drawn after the series' noise: call once the slabs are rendered)."""
    if model.vfa_flip_angles_deg is None:
        return None
    background = model.labels == BACKGROUND
    t10 = np.where(background, 1.0, model.maps["T10"])
    clean = spgr_signal(model.maps["S0"][..., None], 1.0 / t10[..., None], model.vfa_flip_angles_deg,
                        model.protocol.vfa_tr_s)
    clean[background] = 0.0
    signals = clean if model.sigma == 0.0 else _rician(clean, model.sigma, model.rng, model.rng)
    return VFASeries(signals=signals.astype(model.dtype), flip_angles_deg=model.vfa_flip_angles_deg,
                     tr_s=model.protocol.vfa_tr_s)


def _truth(model: _Model) -> Dict[str, np.ndarray]:
    maps = model.maps
    truth = {name: maps[name] for name in ("Ktrans", "ve", "vp", "T10", "S0")}
    with np.errstate(divide="ignore", invalid="ignore"):
        truth["kep"] = np.where(maps["ve"] > 0, maps["Ktrans"] / maps["ve"], 0.0)
    return truth


# Files written by ``write_phantom``, relative to its output folder.
SERIES_FILE = "dce.seq.nrrd"
LABELS_FILE = "labels.nii.gz"
LABEL_NAMES_FILE = "labels.txt"          # "value name" per line
AIF_MASK_FILE = "aif_mask.nii.gz"
AIF_FILE = "aif_blood.csv"               # time (s), whole-blood concentration (mM)
PROTOCOL_FILE = "protocol.json"
TRUTH_DIR = "truth"                      # Ktrans, ve, vp, kep, T10, S0 (.nii.gz)
VFA_DIR = "vfa"                          # one volume per flip angle, fa<deg>.nii.gz


def _vfa_name(fa_deg: float) -> str:
    return f"fa{fa_deg:g}".replace(".", "p") + ".nii.gz"


def phantom_targets(out_dir, vfa_flip_angles_deg=None):
    """Every file ``write_phantom`` / ``stream_phantom`` write (to check them before any work)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DCEPKInputError(f"{out} exists and is not a folder: choose another output folder")
    targets = [out / SERIES_FILE, out / LABELS_FILE, out / LABEL_NAMES_FILE, out / AIF_MASK_FILE, out / AIF_FILE,
               out / PROTOCOL_FILE]
    targets += [out / TRUTH_DIR / f"{name}.nii.gz" for name in ("Ktrans", "ve", "vp", "kep", "T10", "S0")]
    targets += [out / VFA_DIR / _vfa_name(float(fa)) for fa in ([] if vfa_flip_angles_deg is None else vfa_flip_angles_deg)]
    return targets


def _description(protocol: Protocol, times, snr, sigma, seed, label_names, lesions, vfa_angles) -> str:
    p = protocol
    return json.dumps(dict(
        protocol=dict(times_s=[float(t) for t in times], fa_deg=p.fa_deg, tr_s=p.tr_s, field_T=p.field_T,
                      agent=p.agent, r1_per_mM_s=p.r1_per_mM_s, baseline_frames=p.baseline_frames,
                      arrival_s=p.arrival_s, hct=p.hct, aif=p.aif, dose_mmol_per_kg=p.dose_mmol_per_kg,
                      vfa_tr_s=p.vfa_tr_s),
        snr=snr, noise_sigma=sigma,
        snr_definition="mean pre-contrast white-matter signal / noise SD of each quadrature channel (Rician)",
        seed=seed, label_names={str(k): v for k, v in label_names.items()},
        lesions=[{k: (list(v) if isinstance(v, tuple) else v) for k, v in les.items()} for les in lesions],
        vfa_flip_angles_deg=None if vfa_angles is None else [float(f) for f in vfa_angles],
        units=dict(Ktrans="1/min", kep="1/min", ve="fraction", vp="fraction", T10="s", S0="a.u.",
                   time="s", concentration="mM")), indent=2)


def _stage_files(outputs: OutputSet, out: Path, geometry: Geometry, labels, truth, aif_blood, times,
                 description: str, vfa: Optional[VFASeries]) -> None:
    """Every file of the phantom but the series, staged into ``outputs``."""
    stage_volume(outputs, out / LABELS_FILE, labels.astype(np.uint8), geometry)
    stage_volume(outputs, out / AIF_MASK_FILE, (labels == VESSEL).astype(np.uint8), geometry)
    stage_maps(outputs, out / TRUTH_DIR, {name: truth[name] for name in ("Ktrans", "ve", "vp", "kep", "T10", "S0")},
               geometry)
    if vfa is not None:
        stage_maps(outputs, out / VFA_DIR, {_vfa_name(float(fa))[: -len(".nii.gz")]: vfa.signals[..., n]
                                            for n, fa in enumerate(vfa.flip_angles_deg)}, geometry)
    names = {v: n for v, n in LABEL_NAMES.items() if v != BACKGROUND}
    outputs.add_text(out / LABEL_NAMES_FILE, "".join(f"{value} {name}\n" for value, name in sorted(names.items())))
    outputs.add_text(out / AIF_FILE, "time (s),Cb (mM)\n" + "".join(f"{t:.6f},{c:.9g}\n"
                                                                      for t, c in zip(times, aif_blood)))
    outputs.add_text(out / PROTOCOL_FILE, description)


def write_phantom(phantom: Phantom, out_dir, overwrite: bool = False):
    """Write the phantom to ``out_dir``; returns the written paths.

    The series as a Slicer MultiVolume NRRD (``dce.seq.nrrd``), the label map and its names,
    the AIF (vessel) mask, the blood AIF as CSV, the ground-truth maps under ``truth/``, the
    VFA volumes under ``vfa/`` when rendered, and the protocol as JSON. Every target is checked
    first (unless ``overwrite`` is set, an existing file stops the call before anything is
    written) and all files are published together or none.
    """
    with OutputSet(overwrite) as outputs:
        stage_phantom(outputs, phantom, out_dir)
        return outputs.commit()


def stage_phantom(outputs: OutputSet, phantom: Phantom, out_dir) -> None:
    """Add the files of :func:`write_phantom` to ``outputs``."""
    out = Path(out_dir)
    vfa_angles = None if phantom.vfa is None else phantom.vfa.flip_angles_deg
    series = phantom.series
    check_targets(phantom_targets(out, vfa_angles), outputs.overwrite)
    stage_dce_series(outputs, out / SERIES_FILE, [series.signal], series.signal.shape, series.signal.dtype,
                     series.times_s, series.geometry, series.flip_angle_deg, series.tr_s, series.kind)
    description = _description(phantom.protocol, series.times_s, phantom.snr, phantom.noise_sigma,
                               series.metadata.get("seed"), phantom.label_names, phantom.lesions, vfa_angles)
    _stage_files(outputs, out, series.geometry, phantom.labels, phantom.truth, phantom.aif_blood_mM,
                 series.times_s, description, phantom.vfa)


def stream_phantom(out_dir, overwrite: bool = False, **make_kwargs):
    """Make the phantom of ``make_phantom(**make_kwargs)`` and write it as ``write_phantom`` does,
    rendering the series slab by slab straight into its file: memory stays at the size of the 3-D
    maps and one slab, whatever the number of frames. Returns the written paths."""
    out = Path(out_dir)
    make_kwargs.setdefault("shape", (8, 96, 96))
    model = _model(make_kwargs.pop("shape"), make_kwargs.pop("protocol", None), make_kwargs.pop("snr", 30.0),
                   make_kwargs.pop("seed", 0), make_kwargs.pop("texture", True), make_kwargs.pop("lesions", 1),
                   make_kwargs.pop("vfa_flip_angles_deg", None), make_kwargs.pop("spacing_mm", None),
                   make_kwargs.pop("tissue_properties", None), make_kwargs.pop("texture_correlation_mm", 8.0),
                   make_kwargs.pop("dtype", np.float32))
    if make_kwargs:
        raise DCEPKInputError(f"unknown phantom option(s): {', '.join(make_kwargs)}")
    protocol = model.protocol
    with OutputSet(overwrite) as outputs:
        check_targets(phantom_targets(out, model.vfa_flip_angles_deg), overwrite)
        stage_dce_series(outputs, out / SERIES_FILE, (signal for _, _, signal, _ in _slabs(model)),
                         model.shape + (model.times.size,), np.dtype(model.dtype), model.times, model.geometry,
                         float(protocol.fa_deg), float(protocol.tr_s), "signal")
        names = {v: n for v, n in LABEL_NAMES.items() if v != BACKGROUND}
        vfa = _vfa(model)
        description = _description(protocol, model.times, model.snr, model.sigma, model.seed, names, model.placed,
                                   model.vfa_flip_angles_deg)
        _stage_files(outputs, out, model.geometry, model.labels, _truth(model), model.aif_blood, model.times,
                     description, vfa)
        return outputs.commit()
