"""AIF-conditioned inference: the series' input function (``InputFunctionSpec``, resolved exactly as
``dcepk fit`` resolves it) and each voxel's concentration on the native frame times, encoded as the
extended-Tofts profile likelihood (``nn.aif_encoding``), into an AIF-conditioned network.

``run_inference`` hands over to ``run_conditioned`` when the model card's mode is 'aif_conditioned'.
The concentration uses the core's exact SPGR inversion with FA, TR, T10 and r1, frame by frame
on the acquired times (no canonical grid: an 11-minute series is used whole); frames where the
inversion is undefined are left out of that voxel's encoding (weight 0).
"""

from typing import Optional

import numpy as np
import torch

from DCEPKFittingLib.core.errors import DCEPKInputError, setting
from DCEPKFittingLib.core.jobs import raise_if_cancelled, report, sub_progress
from DCEPKFittingLib.pipeline.input_function import (InputFunctionSpec, input_function_from_signal,
                                                     plasma_input_function)
from DCEPKFittingLib.signal import detect_baseline_frames, rician, signal_to_concentration

from ..nn import aif_encoding
from ..nn.model_store import load_model

MIN_BASELINE_FRAMES = 2     # the baseline noise SD needs two


def check_mode(mode: str, input_function: Optional[InputFunctionSpec], model_name: str) -> None:
    """An AIF-conditioned model needs an input function; an AIF-free one takes none."""
    if mode == "aif_conditioned" and input_function is None:
        raise DCEPKInputError(
            f"model '{model_name}' is AIF-conditioned: give an input function: an ROI "
            f"({setting('--aif-roi', 'aif_mask')}), a CSV file ({setting('--aif-csv', 'aif_csv')}), a population AIF "
            f"({setting('--population-aif', 'population_aif')}) or automatic detection "
            f"({setting('--auto-aif', 'auto_aif')}); or choose an AIF-free model (dcepk infer --list)")
    if mode != "aif_conditioned" and input_function is not None:
        raise DCEPKInputError(
            f"model '{model_name}' reads no input function (mode {mode}): leave out the input function, or choose "
            "an AIF-conditioned model (dcepk infer --list)")


def series_baseline(series, baseline_frames: Optional[int]) -> int:
    """The pre-contrast frame count: given, or found by the fit's rule (the project's detector on the
    whole series), so that fit and infer resolve the same input function."""
    if baseline_frames is not None:
        return int(baseline_frames)
    found = detect_baseline_frames(series.signal, times_s=series.times_s)
    return int(min(max(found, MIN_BASELINE_FRAMES), series.n_frames - 3))


def resolve_series_input_function(series, spec: InputFunctionSpec, *, t10_s, fa_deg, tr_s, r1_per_mM_s,
                                  baseline_frames: int, notes: list):
    """(plasma input function (T,) mM, what the signal gave: ROI / detected mask and notes), as ``run_fit``
    with its default Rician correction of the input function."""
    spec.check()
    sigma = rician.estimate_noise_sigma(series.signal, baseline_frames)
    from_signal = input_function_from_signal(series.signal, series.times_s, spec, t10_s=t10_s, fa_deg=fa_deg,
                                             tr_s=tr_s, r1_per_mM_s=r1_per_mM_s, baseline_frames=baseline_frames,
                                             noise_sigma=sigma)
    plasma = plasma_input_function(spec, series.times_s, baseline_frames, from_signal)
    plasma = np.asarray(plasma, dtype=np.float64)
    if not np.all(np.isfinite(plasma)) or np.max(plasma) <= 0:
        raise DCEPKInputError("the input function has no positive finite enhancement: check the AIF ROI or source")
    notes += from_signal.notes + [f"input function: {spec.describe()}, peak {plasma.max():.2f} mM (plasma)"]
    return plasma, from_signal


def _encoded_chunk(signal_2d, basis, baseline_frames, t10, fa_deg, tr_s, r1_per_mM_s):
    """Concentration of a chunk of voxels (float64; undefined frames weight 0) and its encoding."""
    conc, _ = signal_to_concentration(signal_2d, t10, fa_deg, tr_s, r1_per_mM_s, baseline_frames)
    usable = np.isfinite(conc)
    noise = np.nanstd(conc[:, :baseline_frames], axis=1, ddof=1)
    conc = np.where(usable, conc, 0.0)
    noise = np.where(np.isfinite(noise), noise, aif_encoding.SIGMA_FLOOR_MM)
    complete = usable.all(1)
    parts = {}
    if complete.any():
        parts["complete"] = aif_encoding.encode(conc[complete], basis, noise[complete])
    if (~complete).any():
        parts["partial"] = aif_encoding.encode(conc[~complete], basis, noise[~complete],
                                               weights=usable[~complete].astype(np.float64))
    out = {}
    for field in ("features", "anchor", "posterior_sd"):
        n_features = getattr(next(iter(parts.values())), field).shape[1]
        joined = torch.zeros((conc.shape[0], n_features), dtype=torch.float32)
        for key, rows in (("complete", complete), ("partial", ~complete)):
            if key in parts:
                joined[torch.from_numpy(rows)] = getattr(parts[key], field)
        out[field] = joined
    return out


def predict_conditioned(model, series, mask, basis, baseline_frames, t10, fa_deg, tr_s, r1_per_mM_s, device,
                        batch_voxels: int, progress=None, cancel=None):
    """Mean and SD [k, j, i, 3] (float32) of the voxels of ``mask``, chunk by chunk."""
    n_t = series.n_frames
    mean = np.zeros(series.spatial_shape + (3,), dtype=np.float32)
    sd = np.zeros_like(mean)
    index = np.flatnonzero(mask.ravel())
    flat = series.signal.reshape(-1, n_t)
    t10_flat = t10.ravel() if isinstance(t10, np.ndarray) else t10
    mean_flat, sd_flat = mean.reshape(-1, 3), sd.reshape(-1, 3)
    for start in range(0, index.size, batch_voxels):
        raise_if_cancelled(cancel)
        part = index[start:start + batch_voxels]
        t10_part = t10_flat[part] if isinstance(t10_flat, np.ndarray) else t10_flat
        encoded = _encoded_chunk(np.asarray(flat[part], dtype=np.float64), basis, baseline_frames, t10_part, fa_deg,
                                 tr_s, r1_per_mM_s)
        with torch.no_grad():
            m, s = model.predict(*(encoded[k].to(device) for k in ("features", "anchor", "posterior_sd")))
        mean_flat[part], sd_flat[part] = m.cpu().numpy(), s.cpu().numpy()
        done = min(start + part.size, index.size)
        report(progress, done / index.size, f"{done} of {index.size} voxels")
    return mean, sd


def run_conditioned(series, model_name, spec: InputFunctionSpec, *, mask, device, fa_deg, tr_s, t10, r1_per_mM_s,
                    baseline_frames, batch_voxels, models_dir, notes: list, progress=None, cancel=None):
    """(mean, sd, plasma input function, what the signal gave, model card, device) for ``run_inference``."""
    from DCEPKFittingLib.core.device import choose_inference_device
    dev = choose_inference_device(device, notes)
    model, card = load_model(model_name, dev, models_dir)
    report(progress, 0.0, "input function")
    plasma, from_signal = resolve_series_input_function(series, spec, t10_s=t10, fa_deg=fa_deg, tr_s=tr_s,
                                                        r1_per_mM_s=r1_per_mM_s, baseline_frames=baseline_frames,
                                                        notes=notes)
    raise_if_cancelled(cancel)
    basis = aif_encoding.series_basis(series.times_s, plasma, baseline_frames)
    mean, sd = predict_conditioned(model, series, mask, basis, baseline_frames, t10, fa_deg, tr_s, r1_per_mM_s, dev,
                                   int(batch_voxels), sub_progress(progress, 0.05, 1.0), cancel)
    return mean, sd, plasma, from_signal, card, dev

