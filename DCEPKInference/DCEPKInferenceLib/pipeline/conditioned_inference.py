"""AIF-conditioned inference: the series' input function (``InputFunctionSpec``, resolved exactly as
``dcepk fit`` resolves it) and each voxel's concentration on the native frame times, encoded as the
extended-Tofts profile likelihood (``nn.aif_encoding``), into an AIF-conditioned network.

``run_inference`` hands over to ``run_conditioned`` when the model card's mode is 'aif_conditioned'.
The concentration uses the core's exact SPGR inversion with FA, TR, T10 and r1, frame by frame
on the acquired times (no canonical grid: an 11-minute series is used whole); frames where the
inversion is undefined are left out of that voxel's encoding (weight 0).
"""

from dataclasses import fields
from typing import Optional

import numpy as np
import torch

from DCEPKFittingLib.core import runner
from DCEPKFittingLib.core.device import resolve_device
from DCEPKFittingLib.core.errors import DCEPKInputError, setting
from DCEPKFittingLib.core.jobs import raise_if_cancelled, report, sub_progress
from DCEPKFittingLib.pipeline.input_function import (InputFunctionSpec, checked_input_function,
                                                     input_function_from_signal, plasma_input_function)
from DCEPKFittingLib.kinetics import tk_models
from DCEPKFittingLib.signal import detect_baseline_frames, rician, signal_to_concentration

from ..data import canonical_grid as cg
from ..nn import aif_encoding
from ..nn.input_definitions import ReadFromImage
from ..nn.model_store import load_model, reader_installed
from .image_input_function import read_input_function

MIN_BASELINE_FRAMES = 2     # the baseline noise SD needs two


def check_mode(mode: str, input_function, model_name: str) -> None:
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
    plasma, described = checked_input_function(plasma_input_function(spec, series.times_s, baseline_frames,
                                                                     from_signal), spec, from_signal)
    notes += described
    return plasma, from_signal


def _concentration(signal_2d, baseline_frames, t10, fa_deg, tr_s, r1_per_mM_s):
    """(concentration (N, T) mM with 0 where undefined, frames usable (N, T), baseline noise SD (N,))."""
    conc, _ = signal_to_concentration(signal_2d, t10, fa_deg, tr_s, r1_per_mM_s, baseline_frames)
    usable = np.isfinite(conc)
    with np.errstate(invalid="ignore"):
        noise = np.nanstd(np.where(usable[:, :baseline_frames], conc[:, :baseline_frames], np.nan), axis=1, ddof=1)
    return np.where(usable, conc, 0.0), usable, np.where(np.isfinite(noise), noise, aif_encoding.SIGMA_FLOOR_MM)


def _encode(conc, usable, noise, basis):
    """Encoding of a chunk: voxels with every frame defined in one pass, the others frame-weighted."""
    complete = usable.all(1)
    parts = {}
    if complete.any():
        parts["complete"] = aif_encoding.encode(conc[complete], basis, noise[complete])
    if (~complete).any():
        parts["partial"] = aif_encoding.encode(conc[~complete], basis, noise[~complete],
                                               weights=usable[~complete].astype(np.float64))
    out = {}
    for field in fields(aif_encoding.ProfileEncoding):
        sample = getattr(next(iter(parts.values())), field.name)
        joined = torch.zeros((conc.shape[0],) + tuple(sample.shape[1:]), dtype=sample.dtype)
        for key, rows in (("complete", complete), ("partial", ~complete)):
            if key in parts:
                joined[torch.from_numpy(rows)] = getattr(parts[key], field.name)
        out[field.name] = joined
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

    def predict(start, stop, _):
        part = index[start:stop]
        t10_part = t10_flat[part] if isinstance(t10_flat, np.ndarray) else t10_flat
        conc, usable, noise = _concentration(np.asarray(flat[part], dtype=np.float64), baseline_frames, t10_part,
                                             fa_deg, tr_s, r1_per_mM_s)
        encoded = _encode(conc, usable, noise, basis)
        with torch.no_grad():
            m, s = model.predict(*(encoded[k].to(device) for k in ("features", "anchor", "posterior_sd")))
        mean_flat[part] = aif_encoding.with_plasma_only_choice(m.cpu().numpy(), encoded["no_leakage"].numpy(),
                                                               encoded["plasma_vp"].numpy())
        sd_flat[part] = s.cpu().numpy()

    plan = runner.plan_chunks(index.size, 8 * n_t * (aif_encoding.N_BANK + 4), threads=1, min_chunk=batch_voxels,
                              max_chunk=batch_voxels)
    runner.run_chunks(predict, plan, progress=progress, cancel=cancel, message="{done} of {total} voxels")
    return mean, sd


def _slice_batch(conc, usable, noise, inside, shape_hw, basis, with_stream, device):
    """(the 2-D networks' input for one slice box, its pixels' encoding): the tissue pixels' curves, the
    others flat (no contrast, the slice's median noise), as the training patches' pixels are all tissue."""
    n = inside.size
    full = np.zeros((n, conc.shape[1]))
    full[inside] = conc
    full_usable = np.ones(full.shape, dtype=bool)
    full_usable[inside] = usable
    full_noise = np.full(n, float(np.median(noise)) if noise.size else aif_encoding.SIGMA_FLOOR_MM)
    full_noise[inside] = noise
    encoded = _encode(full, full_usable, full_noise, basis)
    h, w = shape_hw
    image = lambda a: torch.as_tensor(np.asarray(a, np.float32).T.reshape(1, -1, h, w)).to(device)  # noqa: E731
    batch = {"encoding": image(encoded["features"].numpy()), "anchor": image(encoded["anchor"].numpy()),
             "posterior_sd": image(encoded["posterior_sd"].numpy()),
             "tissue": torch.as_tensor(inside.reshape(1, 1, h, w), dtype=torch.float32, device=device)}
    if with_stream:
        weights, valid = cg.resampling_matrix(basis.times_s.cpu().numpy())
        plasma = basis.plasma_mM.cpu().numpy()
        fitted = tk_models.concentration("etofts", encoded["anchor"].numpy().astype(np.float64),
                                         basis.times_s.cpu().numpy(), plasma)
        curves = np.stack([full, np.broadcast_to(plasma, full.shape), full - fitted]) @ weights.T   # (3, N, G)
        batch["stream"] = torch.as_tensor(curves.transpose(0, 2, 1).reshape(1, 3, -1, h, w), dtype=torch.float32,
                                          device=device)
        batch["valid"] = torch.as_tensor(valid[None], dtype=torch.float32, device=device)
    return batch, encoded


def predict_conditioned_slices(model, series, mask, basis, baseline_frames, t10, fa_deg, tr_s, r1_per_mM_s, device,
                               progress=None, cancel=None, margin: int = 8):
    """Mean and SD [k, j, i, 3] of a 2-D network, slice by slice on the mask's bounding box (+ margin)."""
    shape, n_t = series.spatial_shape, series.n_frames
    mean = np.zeros(shape + (3,), dtype=np.float32)
    sd = np.zeros_like(mean)
    slices = [k for k in range(shape[0]) if mask[k].any()]

    def predict(start, stop, _):
        for k in slices[start:stop]:
            rows, cols = np.flatnonzero(mask[k].any(1)), np.flatnonzero(mask[k].any(0))
            j0, j1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, shape[1])
            i0, i1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, shape[2])
            tissue = mask[k, j0:j1, i0:i1]
            inside = tissue.ravel()
            t10_part = t10[k, j0:j1, i0:i1].ravel()[inside] if isinstance(t10, np.ndarray) else t10
            signal = np.asarray(series.signal[k, j0:j1, i0:i1].reshape(-1, n_t)[inside], dtype=np.float64)
            conc, usable, noise = _concentration(signal, baseline_frames, t10_part, fa_deg, tr_s, r1_per_mM_s)
            batch, encoded = _slice_batch(conc, usable, noise, inside, tissue.shape, basis, model.uses_stream, device)
            with torch.no_grad():
                m, s = model.predict(batch)
            pixels = aif_encoding.with_plasma_only_choice(m[0].permute(1, 2, 0).reshape(-1, 3).cpu().numpy(),
                                                          encoded["no_leakage"].numpy(), encoded["plasma_vp"].numpy())
            mean[k, j0:j1, i0:i1][tissue] = pixels[inside]
            sd[k, j0:j1, i0:i1][tissue] = s[0].permute(1, 2, 0).cpu().numpy()[tissue]

    plan = runner.plan_chunks(len(slices), 0, threads=1, max_chunk=1)
    runner.run_chunks(predict, plan, progress=progress, cancel=cancel, message="slice {done} of {total}")
    return mean, sd


def _image_only_input_function(series, spec: ReadFromImage, body, conversion: dict, device, models_dir, notes: list,
                               cancel):
    """(plasma (T,) mM, what gave it) in image-only mode: automatic detection, else (or with
    ``reader_only``) the reader network on the voxels of ``body``; without the reader installed, detection
    alone."""
    if not spec.reader_only:
        try:
            return resolve_series_input_function(series, spec.detection(), notes=notes, **conversion)
        except DCEPKInputError as error:
            if not reader_installed(models_dir):
                raise
            notes.append(f"automatic detection gave no usable input function ({error}); the {spec.reader} network "
                         "read it from the image instead")
    plasma, found = read_input_function(series, body, conversion["baseline_frames"], fa_deg=conversion["fa_deg"],
                                        tr_s=conversion["tr_s"], r1_per_mM_s=conversion["r1_per_mM_s"], device=device,
                                        models_dir=models_dir, cancel=cancel, reader=spec.reader)
    plasma, described = checked_input_function(plasma, spec, found)
    notes += described
    return plasma, found


def run_conditioned(series, model_name, spec, *, mask, body, device, fa_deg, tr_s, t10, r1_per_mM_s,
                    baseline_frames, batch_voxels, models_dir, notes: list, progress=None, cancel=None):
    """(mean, sd, plasma input function, what the signal gave, model card, device) for ``run_inference``;
    ``spec``: an ``InputFunctionSpec``, or ``ReadFromImage`` (image-only mode: the reader network reads it
    from the voxels of ``body``)."""
    dev = torch.device(resolve_device(device, notes))
    model, card = load_model(model_name, dev, models_dir)
    report(progress, 0.0, "input function")
    conversion = dict(t10_s=t10, fa_deg=fa_deg, tr_s=tr_s, r1_per_mM_s=r1_per_mM_s, baseline_frames=baseline_frames)
    if isinstance(spec, ReadFromImage):
        plasma, from_signal = _image_only_input_function(series, spec, body, conversion, dev, models_dir, notes,
                                                         cancel)
    else:
        plasma, from_signal = resolve_series_input_function(series, spec, notes=notes, **conversion)
    raise_if_cancelled(cancel)
    basis = aif_encoding.series_basis(series.times_s, plasma, baseline_frames)
    step = sub_progress(progress, 0.05, 1.0)
    if model.kind == "slice":
        mean, sd = predict_conditioned_slices(model, series, mask, basis, baseline_frames, t10, fa_deg, tr_s,
                                              r1_per_mM_s, dev, step, cancel)
    else:
        mean, sd = predict_conditioned(model, series, mask, basis, baseline_frames, t10, fa_deg, tr_s, r1_per_mM_s,
                                       dev, int(batch_voxels), step, cancel)
    return mean, sd, plasma, from_signal, card, dev

