"""Evaluation and SD calibration of a trained network: predictions on a simulated set, the metrics of
its model card, the per-parameter SD factors (on the card's held-out set, or for one protocol at
inference time) and the fixed check set every card records."""

import sys
from typing import Dict

import numpy as np
import torch

from DCEPKFittingLib.core.jobs import raise_if_cancelled

from ..analysis.metrics import Z90, agreement
from ..data import simulator
from ..nn.model_store import load_model, save_model
from ..nn.networks import PARAM_NAMES
from .batches import make_batch, to_torch
from .config import CALIBRATION_SUBJECTS, CHECK_SET, DEFAULT_TRAINING, PROTOCOL_CALIBRATION, uncertainty_method


@torch.no_grad()
def predict_batch(model, batch: Dict[str, torch.Tensor], seed: int = 0):
    """(mean, sd) numpy arrays (N, 3) in physical units for a voxel or patch batch."""
    torch.manual_seed(seed)  # latent draws of tcn_punet: reproducible metrics
    model.eval()
    if model.kind == "voxel":
        mean, sd = model.predict(batch["curves"], batch["valid"], batch["protocol"])
        truth = batch["params"]
        snr = batch["snr"]
    else:
        mean, sd = model.predict(batch["curves"], batch["valid"], batch["protocol"], batch["tissue"])
        mean, sd = (x.permute(0, 2, 3, 1).reshape(-1, 3) for x in (mean, sd))
        truth = batch["params"].permute(0, 2, 3, 1).reshape(-1, 3)
        snr = batch["snr"].reshape(-1)
    return mean.cpu().numpy(), sd.cpu().numpy(), truth.cpu().numpy(), snr.cpu().numpy()


def evaluate(model, batch: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    mean, sd, truth, _ = predict_batch(model, batch)
    return {name: agreement(mean[:, i], truth[:, i], sd[:, i]) for i, name in enumerate(PARAM_NAMES)}


def _error_to_sd(model, batch: Dict[str, torch.Tensor]) -> np.ndarray:
    mean, sd, truth, _ = predict_batch(model, batch)
    return np.abs(mean - truth) / np.maximum(sd, 1e-12)


def _coverage_factors(error_to_sd: np.ndarray) -> list:
    """Per-parameter factors on the present SD so that mean +- 1.645 SD covers 90 % of the voxels."""
    return [float(np.quantile(error_to_sd[:, i], 0.9) / Z90) for i in range(3)]


def calibrate_sd(model, batch: Dict[str, torch.Tensor]) -> list:
    """Per-parameter SD factors so that mean +- 1.645 SD covers 90 % of this (held-out) set.

    Post-hoc variance scaling of every network's SD (a likelihood head trained on few steps, or
    tcn_punet's latent spread, is not calibrated by itself); stored in
    ``network_config['sd_scale']`` and applied by ``networks.calibrated_sd``."""
    model.config["sd_scale"] = [1.0, 1.0, 1.0]
    factors = _coverage_factors(_error_to_sd(model, batch))
    model.config["sd_scale"] = factors
    return factors


def calibrate_to_protocol(model, times_s, device="cpu", cancel=None) -> list:
    """Rescale ``model``'s SD for one protocol (frame times, s), in place; returns the factors applied
    on top of the card's.

    The card's factors hold over the training ranges; on a protocol outside them (too few frames,
    too long an interval) the SD was too small (the card's factors covered 74-86 % at 20 x 16 s in the
    benchmark of 2026-12-01). The simulator can draw subjects with exactly these frame times (all else over
    ``SIMULATOR_RANGES``), so the coverage is fitted on those: ``PROTOCOL_CALIBRATION`` subjects,
    one AIF each, from a seed no training, validation or benchmark set uses. They are simulated a
    few at a time (memory stays bounded for long series; ``cancel`` is checked in between)."""
    settings = PROTOCOL_CALIBRATION
    rng = np.random.default_rng(settings["seed"])
    times = np.asarray(times_s, dtype=np.float64)
    ratios = []
    for start in range(0, settings["subjects"], settings["subjects_per_chunk"]):
        raise_if_cancelled(cancel)
        n = min(settings["subjects_per_chunk"], settings["subjects"] - start)
        sized = {"val_subjects": n, "val_patches": n, "val_voxels_per_subject": settings["voxels_per_subject"],
                 "patch_size": settings["patch_size"]}
        batch = make_batch(model.kind, rng, sized, validation=True, times_s=times)
        ratios.append(_error_to_sd(model, to_torch(batch, device)))
    factors = _coverage_factors(np.concatenate(ratios))
    present = model.config.get("sd_scale", [1.0, 1.0, 1.0])
    model.config["sd_scale"] = [a * b for a, b in zip(present, factors)]
    return factors


def validation_batch(kind: str, training: Dict, device) -> Dict[str, torch.Tensor]:
    """The fixed validation set of a model card (seed ``val_seed``)."""
    return to_torch(make_batch(kind, np.random.default_rng(training["val_seed"]), training, True), device)


def fit_sd_calibration(model, training: Dict, device) -> Dict:
    """Calibrate ``model``'s SD on the held-out calibration set (seed ``val_seed + 1``, never a
    training or validation seed); returns the card's ``sd_calibration`` entry."""
    seed = training["val_seed"] + 1
    # voxels of one patch (or subject) share an AIF, so the set needs many subjects, not many voxels
    sized = {**training, "val_patches": CALIBRATION_SUBJECTS, "val_subjects": CALIBRATION_SUBJECTS}
    batch = to_torch(make_batch(model.kind, np.random.default_rng(seed), sized, True), device)
    return {"seed": seed, "subjects": CALIBRATION_SUBJECTS, "factors": calibrate_sd(model, batch)}


def recalibrate(model_name: str, models_dir, device="cpu", log=sys.stderr) -> Dict:
    """Fit the SD factors of the trained model ``model_name`` anew and rewrite its card (weights unchanged)."""
    model, card = load_model(model_name, device, models_dir)
    training = {**DEFAULT_TRAINING, **card["training"]}
    calibration = fit_sd_calibration(model, training, device)
    val_batch = validation_batch(model.kind, training, device)
    validation = evaluate(model, val_batch)
    print(f"[{model_name}] SD factors {np.round(calibration['factors'], 3).tolist()}; validation coverage90 "
          + ", ".join(f"{k} {v['coverage90']:.3f}" for k, v in validation.items()), file=log, flush=True)
    card = {**card, "network_config": model.config, "sd_calibration": calibration,
            "uncertainty": uncertainty_method(card["network"], model.config),
            "validation": {**card["validation"], "metrics": validation}}
    return save_model(model.cpu(), card, models_dir, model_name, overwrite=True)


def check_batch(kind: str, device="cpu") -> Dict[str, torch.Tensor]:
    """The small fixed set whose Ktrans RMSE every model card records (tests reproduce it)."""
    rng = np.random.default_rng(CHECK_SET["seed"])
    if kind == "voxel":
        batch = simulator.sample_voxels(rng, CHECK_SET["subjects"], CHECK_SET["voxels_per_subject"])
    else:
        batch = simulator.sample_patches(rng, CHECK_SET["patches"], 32)
    return to_torch(batch, device)


def check_metric(model, device="cpu") -> float:
    return evaluate(model, check_batch(model.kind, device))["Ktrans"]["rmse"]
