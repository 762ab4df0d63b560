"""Run a shipped network on a DCE series: ``run_inference`` (``dcepk infer`` is its command line).

No AIF is needed: the series is converted to tissue concentration (exact SPGR inversion with
the FA, TR, T10 and r1 that the conventional fit needs too) on the canonical grid
(``canonical_grid``). Memory stays bounded: voxel-wise networks run on chunks of
``batch_voxels`` voxels (on CPU in cache-sized blocks within a chunk, ``networks.in_cache_blocks``);
2-D networks run slice by slice on the bounding box of the mask.
Maps outside the mask are 0; voxels whose curve holds NaN or inf are left out of it and get NaN
(never a number). kep = Ktrans / ve with ve floored at ``KEP_VE_FLOOR`` (kep is
undefined where ve -> 0), and its SD by first-order error propagation from the Ktrans and ve SDs
(assumed independent).
"""

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch

from DCEPKFittingLib.core import runner
from DCEPKFittingLib.core.device import resolve_device
from DCEPKFittingLib.core.errors import DCEPKInputError, setting
from DCEPKFittingLib.core.geometry import check_same_grid
from DCEPKFittingLib.core.jobs import raise_if_cancelled, report
from DCEPKFittingLib.core.plausibility import check_frame_times
from DCEPKFittingLib.io import DCESeries, finite_voxels
from DCEPKFittingLib.kinetics.fit_result import FitStatus, PKFit, map_units
from DCEPKFittingLib.signal import check_t10, default_r1

from ..analysis.metrics import KEP_VE_FLOOR, kep_with_sd  # noqa: F401  (KEP_VE_FLOOR: named in the doc)
from ..data import canonical_grid as cg
from ..data.simulator import TWO_RATE_SWITCH_FRACTION
from ..nn.input_definitions import ReadFromImage
from ..nn.model_store import load_model, model_mode, read_card
from ..nn.networks import PARAM_NAMES
from ..training.calibration import calibrate_to_protocol
from ..training.config import PROTOCOL_CALIBRATION
from .conditioned_inference import check_mode, run_conditioned, series_baseline

DEFAULT_MODEL = "hetero_encoder"                  # without an input function (AIF-free)
DEFAULT_CONDITIONED_MODEL = "hetero_encoder_aif"   # with one: the best on the validation set (its card)
AUTO_MASK_FRACTION = 0.1       # auto mask: baseline signal above 10 % of its 99th percentile
BASELINE_SAMPLE_VOXELS = 50_000  # voxels sampled for bolus-arrival detection
SLICE_MARGIN = 8               # pixels of context around the mask's bounding box for 2-D networks
NETWORK_MODEL = "etofts"        # the networks estimate the extended Tofts parameters (and kep)
MAP_UNITS = map_units(NETWORK_MODEL, uncertainty="sd")   # Ktrans, ve, vp, kep, their _sd, status
MAP_ORDER = tuple(MAP_UNITS)
INFER_SUMMARY = "dcepk_infer.json"


def auto_mask(signal: np.ndarray, baseline_frames: int) -> np.ndarray:
    s0 = signal[..., :baseline_frames].mean(axis=-1)
    finite = np.isfinite(s0)
    if not finite.any() or np.nanmax(s0) <= 0:
        raise DCEPKInputError("the baseline signal is zero or negative everywhere: is the input a magnitude "
                              "signal series (not concentration or subtracted images)?")
    level = np.percentile(s0[finite], 99)
    return finite & (s0 > AUTO_MASK_FRACTION * level)


def _check_series(series: DCESeries) -> np.ndarray:
    """The series checked; returns its voxels with a finite curve (bool [k, j, i])."""
    if not isinstance(series, DCESeries):
        raise DCEPKInputError("run_inference takes a DCESeries (dce_io.read_dce or DCESeries(signal, times_s, ...))")
    if series.kind != "signal":
        raise DCEPKInputError("the networks take the raw signal series (they convert it to concentration "
                              "themselves); this series holds concentration: load the signal series instead")
    cg.check_times(series.times_s)
    check_frame_times(series.times_s, "the series' frame times")
    finite = finite_voxels(series.signal)
    if not finite.any():
        raise DCEPKInputError("every voxel of the series holds NaN or inf values: check the loaded series")
    return finite


def _baseline(series: DCESeries, mask: np.ndarray, baseline_frames: Optional[int], notes: list) -> int:
    if baseline_frames is not None:
        n = int(baseline_frames)
        if not 1 <= n < series.n_frames:
            raise DCEPKInputError(f"{setting('--baseline-frames', 'baseline_frames')} {baseline_frames} must be "
                                  f"between 1 and {series.n_frames - 1} (the series has {series.n_frames} frames)")
        return n
    # detection needs the most enhancing voxels, not all of them: an evenly spaced sample of the mask
    index = np.flatnonzero(mask) if mask is not None else np.arange(int(np.prod(series.spatial_shape)))
    index = index[::max(1, index.size // BASELINE_SAMPLE_VOXELS)]
    voxels = series.signal.reshape(-1, series.n_frames)[index]
    try:
        return cg.estimate_baseline_frames(voxels)
    except DCEPKInputError:
        notes.append(f"no contrast arrival detected: baseline = frames of the first {cg.NO_ARRIVAL_BASELINE_S:g} s "
                     "(give baseline_frames if that is wrong)")
        return cg.estimate_baseline_frames(voxels, series.times_s)


def training_protocol_ranges(card):
    """([min, max] frame count, [min, max] base frame interval in s) of a card's training data; None
    for what an older card does not record."""
    ranges = card.get("simulator_ranges", {})
    return ranges.get("n_frames"), ranges.get("frame_interval_s", {}).get("range")


def protocol_outside_training(times_s, card) -> Optional[str]:
    """A note when the frame count or the starting frame interval lies outside the ranges the network
    was trained on (its card's ``simulator_ranges``): its maps are then less sure, and its SD too
    small unless recalibrated for the protocol (``training.calibrate_to_protocol``).

    The interval range is that of the base interval; two-rate training series doubled it after the
    first ``TWO_RATE_SWITCH_FRACTION`` of the frames, so the median is taken over those frames only."""
    t = np.asarray(times_s, dtype=np.float64)
    found = []
    frames, interval = training_protocol_ranges(card)
    if frames and not frames[0] <= t.size <= frames[1]:
        found.append(f"{t.size} frames (trained on {frames[0]}-{frames[1]})")
    steps = np.diff(t)
    starting = float(np.median(steps[:max(1, int(TWO_RATE_SWITCH_FRACTION * steps.size))]))
    if interval and not interval[0] <= starting <= interval[1]:
        found.append(f"a frame interval of {starting:.3g} s over the first {TWO_RATE_SWITCH_FRACTION:.0%} of the "
                     f"frames (trained on {interval[0]:g}-{interval[1]:g} s)")
    if not found:
        return None
    return (f"the series has {' and '.join(found)}: outside the training ranges of {card.get('name', 'this network')},"
            " so its maps are less reliable")


@contextlib.contextmanager
def cancel_reaches_layers(model: torch.nn.Module, cancel):
    """Within this block every layer of ``model`` checks ``cancel`` before it runs, so a cancel
    stops a batch or a slice within one layer's time (a slice of a 2-D network takes seconds)."""
    handles = [] if cancel is None else [module.register_forward_pre_hook(lambda *_: raise_if_cancelled(cancel))
                                         for module in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _t10_values(t10_s, shape):
    """The whole map is checked here, so a chunk of background (no T10: NaN or 0) is not an error."""
    t10 = check_t10(t10_s, shape)
    return float(t10) if t10.ndim == 0 else t10


def run_inference(series: DCESeries, model_name: Optional[str] = None, mask=None, device="auto", fa_deg=None,
                  tr_s=None, t10_s=None, r1_per_mM_s=None, batch_voxels: int = 65536, progress=None, cancel=None,
                  baseline_frames: Optional[int] = None, n_samples: Optional[int] = None,
                  models_dir=None, protocol_calibration: bool = True, input_function=None) -> PKFit:
    """Ktrans, ve, vp, kep maps and their 1-SD uncertainty from a DCE signal series by a network: a
    ``PKFit`` (the fit's result type) with ``<name>_sd`` maps, ``status`` (fitted: inferred; masked; invalid
    input: NaN or inf in the curve), the notes in ``messages``, the network's card in ``model_card``.

    ``input_function`` (``DCEPKFittingLib.pipeline.input_function.InputFunctionSpec``): for the
    AIF-conditioned models (card mode 'aif_conditioned'; ROI, CSV, population or automatic detection,
    resolved as ``run_fit`` does), or ``ReadFromImage()`` (image-only mode: automatic detection, and where it
    finds no usable vessel the reader network); the result then has ``aif_plasma_mM`` and ``input_function``
    (the ROI's, detected or read mask and notes). AIF-free models take none. ``model_name`` None: the default of each
    (``DEFAULT_CONDITIONED_MODEL`` with an input function, else ``DEFAULT_MODEL``).

    mask: bool [k, j, i] (None: voxels whose baseline signal exceeds 10 % of its 99th percentile);
    fa_deg (degrees) / tr_s (s): default to the series header; t10_s (required): T10 in s, one
    value or a map [k, j, i]; r1_per_mM_s: the agent's relaxivity in 1/(mM s) (None: the core's
    default, ``signal.default_r1()``, said in the notes); baseline_frames: None detects
    bolus arrival; protocol_calibration: for frame times outside the network's training ranges,
    refit its SD factors on simulated subjects with these frame times (2-30 s on 2 cores).
    Voxels whose curve holds NaN or inf are left out of the mask and get NaN in every map.
    """
    finite = _check_series(series)
    if isinstance(batch_voxels, bool) or int(batch_voxels) != batch_voxels or batch_voxels < 1:
        raise DCEPKInputError(f"batch_voxels must be a whole number of voxels, at least 1; got {batch_voxels}")
    notes = []
    shape = series.spatial_shape
    report(progress, 0.0, "preparing")
    fa_deg = series.flip_angle_deg if fa_deg is None else fa_deg
    tr_s = series.tr_s if tr_s is None else tr_s
    if r1_per_mM_s is None:
        r1_per_mM_s = default_r1()
        notes.append(f"relaxivity r1 = {r1_per_mM_s} 1/(mM s) (default agent and field; give r1 if yours differs)")
    cg.require_conversion_inputs(fa_deg, tr_s, t10_s, r1_per_mM_s)
    t10 = _t10_values(t10_s, shape)
    model_name = model_name or (DEFAULT_CONDITIONED_MODEL if input_function is not None else DEFAULT_MODEL)
    mode = model_mode(read_card(model_name, models_dir))
    check_mode(mode, input_function, model_name)
    if mode == "aif_conditioned":   # the fit's baseline rule: fit and infer resolve the same input function
        baseline_frames = series_baseline(series, baseline_frames)
    mask, n_base = _voxels_to_infer(series, mask, finite, baseline_frames, notes)
    if mode == "aif_conditioned":
        return _run_conditioned_result(series, model_name, input_function, mask, finite, n_base, notes,
                                       dict(device=device, fa_deg=fa_deg, tr_s=tr_s, t10=t10, r1_per_mM_s=r1_per_mM_s,
                                            batch_voxels=batch_voxels, models_dir=models_dir),
                                       progress, cancel)
    dev = torch.device(resolve_device(device, notes))
    model, card = load_model(model_name, dev, models_dir)
    outside = protocol_outside_training(series.times_s, card)
    if outside and protocol_calibration:
        report(progress, 0.0, "calibrating the uncertainty for this protocol")
        factors = calibrate_to_protocol(model, series.times_s, dev, cancel)
        notes.append(f"{outside}; its SD was recalibrated for these frame times on "
                     f"{PROTOCOL_CALIBRATION['subjects']} simulated subjects (x "
                     + ", ".join(f"{name} {f:.2f}" for name, f in zip(PARAM_NAMES, factors)) + ")")
    elif outside:
        notes.append(f"{outside}, and its uncertainty may be too small (protocol calibration is off)")
    weights = cg.resampling_matrix(series.times_s)
    if series.times_s[-1] - series.times_s[0] > cg.GRID_STEP_S * cg.GRID_POINTS:
        notes.append(f"frames after {cg.GRID_STEP_S * cg.GRID_POINTS:.0f} s are not used by the networks")

    def canonical(signal_2d, t10_part):
        return cg.to_canonical(signal_2d, series.times_s, n_base, fa_deg=fa_deg, tr_s=tr_s, t10_s=t10_part,
                               r1_per_mM_s=r1_per_mM_s, weights=weights)

    run = _Run(model=model, device=dev, canonical=canonical, sample_kwargs={"n_samples": n_samples} if n_samples
               else {}, mean=np.zeros(shape + (3,), dtype=np.float32), sd=np.zeros(shape + (3,), dtype=np.float32))
    torch.manual_seed(0)  # latent draws (tcn_punet) reproducible run to run
    with cancel_reaches_layers(model, cancel):
        if model.kind == "voxel":
            _predict_voxels(run, series, mask, t10, int(batch_voxels), progress, cancel)
        else:
            _predict_slices(run, series, mask, t10, progress, cancel)
    raise_if_cancelled(cancel)
    report(progress, 1.0, "done")
    return PKFit(model=NETWORK_MODEL, method=card.get("name", model_name), maps=_maps(run.mean, run.sd, mask, ~finite),
                 units=dict(MAP_UNITS), times_s=series.times_s, uncertainty="sd", geometry=series.geometry,
                 baseline_frames=n_base, messages=notes, device=str(dev), model_card=card)


def _run_conditioned_result(series, model_name, spec, mask, finite, n_base, notes, settings, progress,
                            cancel) -> PKFit:
    """An AIF-conditioned network's maps (``conditioned_inference.run_conditioned``) as a ``PKFit``."""
    # where image-only mode's reader looks for vessels: the body, not the tissue mask
    body = auto_mask(series.signal, n_base) & finite if isinstance(spec, ReadFromImage) else None
    mean, sd, plasma, found, card, dev = run_conditioned(series, model_name, spec, mask=mask, body=body,
                                                         baseline_frames=n_base, notes=notes, progress=progress,
                                                         cancel=cancel, **settings)
    outside = protocol_outside_training(series.times_s, card)
    if outside:
        notes.append(outside)
    report(progress, 1.0, "done")
    return PKFit(model=NETWORK_MODEL, method=card.get("name", model_name), maps=_maps(mean, sd, mask, ~finite),
                 units=dict(MAP_UNITS), times_s=series.times_s, aif_plasma_mM=plasma, uncertainty="sd",
                 geometry=series.geometry, baseline_frames=n_base, messages=notes, device=str(dev),
                 model_card=card, input_function=found)


def _voxels_to_infer(series: DCESeries, mask, finite: np.ndarray, baseline_frames, notes: list):
    """(mask of the voxels to infer, baseline frame count): the given or automatic mask, less the
    voxels whose curve holds NaN or inf."""
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        check_same_grid(series.spatial_shape, None, mask.shape, None, "DCE series", "mask")
        if not mask.any():
            raise DCEPKInputError("the mask is empty: draw the region or pass no mask")
    n_base = _baseline(series, mask if mask is not None else finite, baseline_frames, notes)
    if mask is None:
        mask = auto_mask(series.signal, n_base) & finite
        notes.append(f"auto mask: {int(mask.sum())} voxels with baseline signal above "
                     f"{AUTO_MASK_FRACTION:.0%} of its 99th percentile")
    if not finite.all():
        notes.append(f"{int((~finite).sum())} voxels hold NaN or inf values: they are left out (NaN in every map)")
        mask = mask & finite
        if not mask.any():
            raise DCEPKInputError("every voxel of the mask holds NaN or inf values: check the series and the mask")
    return mask, n_base


@dataclass
class _Run:
    """A network and where its predictions go (mean and SD, [k, j, i, 3])."""
    model: torch.nn.Module
    device: torch.device
    canonical: Callable
    sample_kwargs: dict
    mean: np.ndarray
    sd: np.ndarray


def _predict_voxels(run: _Run, series: DCESeries, mask, t10, batch_voxels: int, progress, cancel) -> None:
    """The voxel-wise network on batches of ``batch_voxels`` voxels, one after another: torch spreads each
    batch over the cores itself."""
    n_t, dev = series.n_frames, run.device
    index = np.flatnonzero(mask.ravel())
    flat = series.signal.reshape(-1, n_t)
    t10_flat = t10.ravel() if isinstance(t10, np.ndarray) else t10
    mean_flat, sd_flat = run.mean.reshape(-1, 3), run.sd.reshape(-1, 3)

    def predict(start, stop, _):
        part = index[start:stop]
        c = run.canonical(flat[part], t10_flat[part] if isinstance(t10_flat, np.ndarray) else t10_flat)
        with torch.no_grad():
            m, s = run.model.predict(torch.from_numpy(c.curves).to(dev), torch.from_numpy(c.valid).to(dev),
                                     torch.from_numpy(c.protocol).to(dev), **run.sample_kwargs)
        mean_flat[part], sd_flat[part] = m.cpu().numpy(), s.cpu().numpy()

    plan = runner.plan_chunks(index.size, 4 * (n_t + 4 * cg.GRID_POINTS), threads=1, min_chunk=batch_voxels,
                              max_chunk=batch_voxels)
    runner.run_chunks(predict, plan, progress=progress, cancel=cancel, message="{done} of {total} voxels")


def _predict_slices(run: _Run, series: DCESeries, mask, t10, progress, cancel) -> None:
    """The 2-D network slice by slice, on each slice's bounding box of the mask with a margin."""
    # pixels as the fastest axis of the image channels (channels_last): the layout of the
    # conversion's (voxels, grid) output, and 1.2-2x faster 3x3 convolutions on CPU
    run.model.to(memory_format=torch.channels_last)
    slices = [k for k in range(series.spatial_shape[0]) if mask[k].any()]

    def predict(start, stop, _):
        for k in slices[start:stop]:
            _predict_slice(run, series, mask, t10, k)

    plan = runner.plan_chunks(len(slices), 0, threads=1, max_chunk=1)
    runner.run_chunks(predict, plan, progress=progress, cancel=cancel, message="slice {done} of {total}")


def _predict_slice(run: _Run, series: DCESeries, mask, t10, k: int) -> None:
    shape, n_t, dev = series.spatial_shape, series.n_frames, run.device
    rows, cols = np.flatnonzero(mask[k].any(1)), np.flatnonzero(mask[k].any(0))
    j0, j1 = max(rows[0] - SLICE_MARGIN, 0), min(rows[-1] + SLICE_MARGIN + 1, shape[1])
    i0, i1 = max(cols[0] - SLICE_MARGIN, 0), min(cols[-1] + SLICE_MARGIN + 1, shape[2])
    tissue = mask[k, j0:j1, i0:i1]
    h, w = tissue.shape
    inside = tissue.ravel()
    t10_part = t10[k, j0:j1, i0:i1].ravel()[inside] if isinstance(t10, np.ndarray) else t10
    c = run.canonical(series.signal[k, j0:j1, i0:i1].reshape(-1, n_t)[inside], t10_part)
    # only the tissue is converted; the margin reads as flat tissue (no contrast) at the
    # slice's median noise level, like the non-enhancing tissue of the training patches
    curves = np.zeros((h * w, c.curves.shape[1]), dtype=np.float32)
    curves[inside] = c.curves
    protocol = np.repeat(np.median(c.protocol, axis=0, keepdims=True), h * w, axis=0)
    protocol[inside] = c.protocol
    image = lambda a: torch.from_numpy(a).view(1, h, w, -1).permute(0, 3, 1, 2).to(dev)  # noqa: E731
    with torch.no_grad():
        m, s = run.model.predict(image(curves), torch.from_numpy(c.valid[None]).to(dev), image(protocol),
                                 torch.from_numpy(tissue[None, None].astype(np.float32)).to(dev),
                                 **run.sample_kwargs)
    m = m[0].permute(1, 2, 0).cpu().numpy()
    s = s[0].permute(1, 2, 0).cpu().numpy()
    run.mean[k, j0:j1, i0:i1][tissue], run.sd[k, j0:j1, i0:i1][tissue] = m[tissue], s[tissue]


def _maps(mean: np.ndarray, sd: np.ndarray, mask: np.ndarray, invalid: np.ndarray) -> Dict[str, np.ndarray]:
    """The output maps (float32, ``MAP_ORDER``): 0 outside the mask, NaN for invalid input; the status map."""
    maps = {}
    outside = np.where(invalid, np.float32(np.nan), np.float32(0.0))  # invalid input: NaN, never a number
    for i, name in enumerate(PARAM_NAMES):
        maps[name] = np.where(mask, mean[..., i], outside).astype(np.float32)
        maps[f"{name}_sd"] = np.where(mask, sd[..., i], outside).astype(np.float32)
    kep, kep_sd = kep_with_sd(maps["Ktrans"], maps["ve"], maps["Ktrans_sd"], maps["ve_sd"])
    maps["kep"] = np.where(mask, kep, outside).astype(np.float32)
    maps["kep_sd"] = np.where(mask, kep_sd, outside).astype(np.float32)
    maps["status"] = np.where(mask, np.uint8(FitStatus.FITTED), np.where(invalid, np.uint8(FitStatus.INVALID_INPUT),
                                                                         np.uint8(FitStatus.MASKED)))
    return {k: maps[k] for k in MAP_ORDER}
