"""Training on simulated data: ``train(...)`` and the ``dcepk train`` entry point ``train_main``.

Deterministic: the batch of step ``s`` is drawn from ``numpy.random.default_rng([seed, s])``
and torch is seeded with ``(seed, s)`` before the step, so a resumed run continues exactly as
an uninterrupted one (up to floating-point non-determinism of the device). Checkpoints
(``checkpoint.pt``: weights, optimiser, step; read back with ``torch.load(weights_only=True)``,
which cannot run code) are written every ``checkpoint_every`` steps. Validation uses a fixed
simulated set (seed ``val_seed``, never a training seed). At the end the weights are written as
safetensors with a model card (``model_store.save_model``).

Retrain a shipped model longer on a GPU (one line)::

    dcepk train --model hetero_encoder --steps 20000 --device cuda --out DCEPKInference/Resources/Models --overwrite
"""

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from DCEPKFittingLib.kinetics import tk_models
from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.jobs import raise_if_cancelled
from DCEPKFittingLib.core.output_files import OutputSet

from .. import __version__
from ..data import canonical_grid, simulator
from ..analysis.metrics import Z90, summarize
from ..nn.model_store import load_model, models_dir, save_model
from ..nn.networks import NETWORKS, PARAM_NAMES, PARAM_UNITS, PARAM_UPPER, build_network, count_parameters

CONFIG_DIR = models_dir() / "configs"
DEFAULT_TRAINING = {"steps": 1000, "lr": 2e-3, "weight_decay": 1e-4, "seed": 1, "val_seed": 900001,
                    "val_subjects": 32, "val_voxels_per_subject": 128, "val_patches": 24,
                    "subjects_per_batch": 16, "voxels_per_subject": 256, "patches_per_batch": 8,
                    "patch_size": 32, "checkpoint_every": 200, "log_every": 25, "temporal_shift_max": 4,
                    "grad_clip": 5.0}
BUDGET_PROBE_STEPS = 20
CALIBRATION_SUBJECTS = 128        # patches or voxel groups (one AIF each) in the SD calibration set
# as many subjects as the card's calibration: subject-to-subject (AIF) spread makes 64 too few (coverage
# of one network on three 64-subject sets: 0.88-0.91)
PROTOCOL_CALIBRATION = {"seed": 900003, "subjects": CALIBRATION_SUBJECTS, "subjects_per_chunk": 8,
                        "voxels_per_subject": 64, "patch_size": 32}
CHECK_SET = {"seed": 424242, "subjects": 8, "voxels_per_subject": 64, "patches": 4}
DESCRIPTIONS = {
    "hetero_encoder": "voxel-wise temporal encoder (patch embedding + MLP), heteroscedastic Laplace/Gaussian NLL, "
                      "temporal-shift augmentation, small jointly trained ensemble (after Hess et al.)",
    "ulas_cnn": "2-D CNN, grid frames as channels, local (3x3) + dilated global pathway, parameter + tracer-kinetic "
                "loss (after Ulas et al. 2019)",
    "fcsa_net": "2-D CNN with frame attention and channel/spatial (CBAM) attention (after Zeng & Zhou, FCSA-net)",
    "tcn_punet": "per-voxel temporal convolutional network then a probabilistic U-Net over the slice; mean and SD "
                 "from latent samples, plus an aleatoric variance head when aleatoric_head is on (after Lyoo et "
                 "al. 2025)",
}
_CALIBRATED = ", times per-parameter factors fitted on a held-out simulated set (sd_calibration)"
UNCERTAINTY_METHOD = {
    "hetero_encoder": "heteroscedastic NLL head (aleatoric) per ensemble member; SD^2 = mean member variance "
                      "+ variance of member means (epistemic)" + _CALIBRATED,
    "ulas_cnn": "added Gaussian variance head trained by NLL (aleatoric only)" + _CALIBRATED,
    "fcsa_net": "added Gaussian variance head trained by NLL (aleatoric only)" + _CALIBRATED,
    "tcn_punet": "SD over latent draws from the prior net of the probabilistic U-Net (floor 1e-3 of the bound)"
                 + _CALIBRATED,
}
_OWN_HEAD = "added Gaussian variance head with a hidden layer of its own, trained by NLL (aleatoric only)"
UNCERTAINTY_METHOD_WITH_ALEATORIC_HEAD = {
    "ulas_cnn": _OWN_HEAD + _CALIBRATED,
    "fcsa_net": _OWN_HEAD + _CALIBRATED,
    "tcn_punet": "SD^2 = variance over latent draws from the prior net of the probabilistic U-Net + the variance "
                 "of an added Gaussian head trained by NLL (aleatoric)" + _CALIBRATED,
}


def uncertainty_method(model_name: str, network_config: Dict) -> str:
    if model_name == "hetero_encoder" and int(network_config.get("members", 1)) == 1:
        return "heteroscedastic NLL head (aleatoric only: one member, no ensemble spread)" + _CALIBRATED
    if network_config.get("aleatoric_head"):
        return UNCERTAINTY_METHOD_WITH_ALEATORIC_HEAD[model_name]
    return UNCERTAINTY_METHOD[model_name]


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DCEPKInputError("--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto")
    if str(device) not in ("cpu",) and not str(device).startswith("cuda"):
        raise DCEPKInputError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def load_config(model_name: str, path=None) -> Dict:
    """Training config: the JSON file given, else the shipped ``configs/<model>.json``, else defaults."""
    if model_name not in NETWORKS:
        raise DCEPKInputError(f"unknown network {model_name!r}: choose one of {sorted(NETWORKS)}")
    path = Path(path) if path else CONFIG_DIR / f"{model_name}.json"
    config = {"network": model_name, "network_config": {}, "training": {}}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DCEPKInputError(f"config {path} is not valid JSON: {error}") from None
        if loaded.get("network", model_name) != model_name:
            raise DCEPKInputError(f"config {path} is for '{loaded['network']}', not '{model_name}'")
        config.update({k: v for k, v in loaded.items() if k in config})
    elif path.name != f"{model_name}.json" or path.parent != CONFIG_DIR:
        raise DCEPKInputError(f"config file {path} not found")
    config["training"] = {**DEFAULT_TRAINING, **config["training"]}
    config["network_config"] = {**NETWORKS[model_name].default_config, **config["network_config"]}
    return config


# ------------------------------------------------------------------------------------ batches
def _to_torch(batch: simulator.SimulatedBatch, device) -> Dict[str, torch.Tensor]:
    out = {k: torch.as_tensor(getattr(batch, k), device=device)
           for k in ("curves", "valid", "protocol", "params", "cp_grid", "snr")}
    if batch.tissue is not None:
        out["tissue"] = torch.as_tensor(batch.tissue, device=device)
    return out


def make_batch(kind: str, rng, training: Dict, validation=False, times_s=None):
    """A training (or, ``validation``, held-out) batch; ``times_s`` fixes every subject's frame times."""
    if kind == "voxel":
        subjects = training["val_subjects"] if validation else training["subjects_per_batch"]
        voxels = training["val_voxels_per_subject"] if validation else training["voxels_per_subject"]
        return simulator.sample_voxels(rng, subjects, voxels, times_s=times_s)
    patches = training["val_patches"] if validation else training["patches_per_batch"]
    return simulator.sample_patches(rng, patches, training["patch_size"], times_s=times_s)


def temporal_shift(curves, valid, max_shift: int, generator):
    """Delay each curve by 0..max_shift grid steps (Hess et al.-style augmentation): the bolus
    arrives later, the baseline is extended with its first value and the tail drops off."""
    n, g = curves.shape
    shift = torch.randint(0, max_shift + 1, (n, 1), generator=generator).to(curves.device)
    index = (torch.arange(g, device=curves.device)[None, :] - shift).clamp_min(0)
    return curves.gather(1, index), valid.gather(1, index)


def _upper_tensor(device, shape):
    return torch.tensor(PARAM_UPPER, dtype=torch.float32, device=device).view(shape)


def tracer_kinetic_loss(pred_params, true_params, cp_grid, valid):
    """Relative squared error of extended-Tofts concentration on the canonical grid (Ulas et al.):
    predicted vs true parameters through the core forward model with the patch's true AIF.
    pred/true (B, 3, H, W) physical units, cp_grid (B, G) mM, valid (B, G)."""
    t = torch.as_tensor(canonical_grid.grid_times_s(), dtype=pred_params.dtype, device=pred_params.device)
    cp = cp_grid[:, None, None, :]
    c_pred = tk_models.concentration("etofts", pred_params.permute(0, 2, 3, 1), t, cp)
    with torch.no_grad():
        c_true = tk_models.concentration("etofts", true_params.permute(0, 2, 3, 1), t, cp)
        scale = (c_true ** 2 * valid[:, None, None, :]).mean((1, 2, 3), keepdim=True) + 1e-3
    err = (c_pred - c_true) ** 2 / scale * valid[:, None, None, :]
    return err.sum() / (valid.sum() * pred_params.shape[2] * pred_params.shape[3]).clamp_min(1)


def compute_loss(model, batch: Dict[str, torch.Tensor], training: Dict, generator) -> torch.Tensor:
    target_n = batch["params"] / _upper_tensor(batch["params"].device, (1, 3) + (1,) * (batch["params"].dim() - 2))
    if model.kind == "voxel":
        curves, valid = batch["curves"], batch["valid"]
        if training.get("temporal_shift_max", 0) > 0:
            curves, valid = temporal_shift(curves, valid, int(training["temporal_shift_max"]), generator)
        return model.loss(model(curves, valid, batch["protocol"]), target_n)
    cfg = model.config
    out = model(batch["curves"], batch["valid"], batch["protocol"], batch["tissue"], truth_n=target_n)
    loss = cfg.get("param_weight", 1.0) * (out["mean_n"] - target_n).abs().mean()
    if "scale_n" in out and cfg.get("nll_weight", 0) > 0:
        # the variance head learns from the NLL only: the mean is driven by the parameter loss
        from ..nn.networks import nll
        loss = loss + cfg["nll_weight"] * nll(target_n, out["mean_n"].detach(), out["scale_n"], "gaussian")
    if "kl" in out:
        loss = loss + cfg.get("beta_kl", 0.05) * out["kl"]
    if cfg.get("tk_weight", 0) > 0:
        up = _upper_tensor(target_n.device, (1, 3, 1, 1))
        loss = loss + cfg["tk_weight"] * tracer_kinetic_loss(out["mean_n"] * up, batch["params"], batch["cp_grid"],
                                                             batch["valid"])
    return loss


# ------------------------------------------------------------------------------------ evaluation
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
    return {name: summarize(mean[:, i], truth[:, i], sd[:, i]) for i, name in enumerate(PARAM_NAMES)}


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
        ratios.append(_error_to_sd(model, _to_torch(batch, device)))
    factors = _coverage_factors(np.concatenate(ratios))
    present = model.config.get("sd_scale", [1.0, 1.0, 1.0])
    model.config["sd_scale"] = [a * b for a, b in zip(present, factors)]
    return factors


def validation_batch(kind: str, training: Dict, device) -> Dict[str, torch.Tensor]:
    """The fixed validation set of a model card (seed ``val_seed``)."""
    return _to_torch(make_batch(kind, np.random.default_rng(training["val_seed"]), training, True), device)


def fit_sd_calibration(model, training: Dict, device) -> Dict:
    """Calibrate ``model``'s SD on the held-out calibration set (seed ``val_seed + 1``, never a
    training or validation seed); returns the card's ``sd_calibration`` entry."""
    seed = training["val_seed"] + 1
    # voxels of one patch (or subject) share an AIF, so the set needs many subjects, not many voxels
    sized = {**training, "val_patches": CALIBRATION_SUBJECTS, "val_subjects": CALIBRATION_SUBJECTS}
    batch = _to_torch(make_batch(model.kind, np.random.default_rng(seed), sized, True), device)
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
    return _to_torch(batch, device)


def check_metric(model, device="cpu") -> float:
    return evaluate(model, check_batch(model.kind, device))["Ktrans"]["rmse"]


# ------------------------------------------------------------------------------------ training
# Config keys a fine-tune may enlarge (the MLP's hidden layers, whose units can be added without
# changing what the network computes: ``_grow_into``), and the architecture keys that must match then.
GROWABLE = {"hetero_encoder": {"grow": ("hidden",), "fixed": ("width", "members")}}
# Config switches a fine-tune may turn on: each adds a module (its parameters' name prefix), which
# starts from its random init; the trained weights of everything else are copied unchanged.
ADDABLE = {name: {"aleatoric_head": "scale_head."} for name in ("tcn_punet", "ulas_cnn", "fcsa_net")}


def _grow_into(model, trained) -> None:
    """Embed the trained weights of a narrower MLP into ``model`` (same layers, more hidden units)
    so that it computes the same function: each weight's old block is copied, the new units keep
    their random init, and the weights from new units into old ones (and into the outputs) are 0.
    Training then uses the new units from the first step (their outgoing weights get gradients)."""
    old_state, state = trained.state_dict(), model.state_dict()
    for key, new in state.items():
        old = old_state[key]
        if old.shape == new.shape:
            new.copy_(old)
            continue
        block = tuple(slice(0, n) for n in old.shape)
        if new.dim() == 2 and new.shape[1] > old.shape[1]:
            new[: old.shape[0], old.shape[1]:] = 0.0     # old units ignore the new ones
        new[block] = old
    model.load_state_dict(state)


def _initialise_from(model, model_name: str, directory, log, name: Optional[str] = None) -> Dict:
    """Copy the weights of the trained model ``name`` (default: the network's name) of network
    ``model_name`` in ``directory`` into ``model``, or grow them into it when the config only
    enlarges a ``GROWABLE`` key."""
    trained, card = load_model(name or model_name, "cpu", directory)
    rule = GROWABLE.get(model_name, {"grow": (), "fixed": ()})
    grown = [k for k in rule["grow"] if model.config[k] > trained.config[k]]
    added = {k: prefix for k, prefix in ADDABLE.get(model_name, {}).items()
             if model.config.get(k) and not trained.config.get(k)}
    try:
        if grown and any(model.config[k] != trained.config[k] for k in rule["fixed"]):
            raise RuntimeError(f"only {', '.join(rule['grow'])} may grow; {', '.join(rule['fixed'])} must match")
        if grown:
            _grow_into(model, trained)
        elif added:
            missing, unexpected = model.load_state_dict(trained.state_dict(), strict=False)
            stray = [k for k in missing if not k.startswith(tuple(added.values()))] + list(unexpected)
            if stray:
                raise RuntimeError(f"parameters that do not match: {', '.join(stray[:4])}")
        else:
            model.load_state_dict(trained.state_dict())
    except RuntimeError as error:
        raise DCEPKInputError(f"--init-from {directory}: its {model_name} has another architecture than the "
                              f"config (width, hidden, members...): {str(error).splitlines()[0]}") from None
    print(f"initialised {model_name} from {directory} (sha256 {card['sha256'][:12]}..., "
          f"{card['training']['steps']} steps{', grown: ' + ', '.join(grown) if grown else ''}"
          f"{', added: ' + ', '.join(added) if added else ''})", file=log)
    previous = card["training"]
    return {"sha256": card["sha256"], "steps": previous["steps"], "wall_s": previous.get("wall_s"),
            "likelihood": card["network_config"].get("likelihood"),
            **({"grown": {k: [trained.config[k], model.config[k]] for k in grown}} if grown else {}),
            **({"added": sorted(added)} if added else {}),
            **({"initialised_from": previous["initialised_from"]} if "initialised_from" in previous else {})}


def train(model_name: str, config: Optional[Dict] = None, steps: Optional[int] = None, device="auto",
          out_dir=None, resume=None, overwrite: bool = False, threads: Optional[int] = None,
          time_budget_min: Optional[float] = None, init_from=None, progress=None, cancel=None,
          log=sys.stderr, name: Optional[str] = None) -> Dict:
    """Train network ``model_name`` and write ``<out_dir>/<name>.safetensors`` + ``.json`` (``name``:
    the model's name, default the network's; another name ships a variant, e.g. a smaller config,
    beside the network's own model). Returns the card.

    ``time_budget_min``: on a slow machine, fit the run into this many minutes of wall clock: after
    ``BUDGET_PROBE_STEPS`` steps the total is cut to what the measured step time allows (the
    cosine schedule follows the new total, so the run still ends at the low learning rate).
    ``init_from``: a folder with a trained ``<model_name>`` (weights checked against its card):
    fine-tune from those weights with a fresh optimiser and schedule, e.g. under another loss.
    """
    config = config or load_config(model_name)
    training = dict(config["training"])
    if steps is not None:
        training["steps"] = int(steps)
    if training["steps"] < 1:
        raise DCEPKInputError("--steps must be at least 1")
    out_dir = Path(out_dir or ".")
    name = name or model_name
    target = out_dir / f"{name}.safetensors"
    if target.exists() and not overwrite:
        raise DCEPKInputError(f"{target} exists: choose another --out or pass --overwrite")
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    seed = int(training["seed"])
    torch.manual_seed(seed)
    model = build_network(model_name, config["network_config"]).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training["lr"], weight_decay=training["weight_decay"])
    total = training["steps"]
    plan = {"total": total}  # read by the schedule, so a time budget can shorten the run
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, plan["total"]) / plan["total"])))
    start_step = 0
    previous_wall = 0.0
    initialised_from = None
    if init_from and resume:
        raise DCEPKInputError("--init-from and --resume exclude each other: resume continues a run, "
                              "init-from starts a new one from trained weights")
    if init_from:
        initialised_from = _initialise_from(model, model_name, init_from, log, name)
    checkpoint_path = out_dir / f"{name}.checkpoint.pt"
    if resume:
        state = torch.load(resume, map_location=dev, weights_only=True)
        if state.get("network") != model_name:
            raise DCEPKInputError(f"checkpoint {resume} is for '{state.get('network')}', not '{model_name}'")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_step = int(state["step"])
        previous_wall = float(state.get("wall_s", 0.0))
        print(f"resumed {model_name} from {resume} at step {start_step}", file=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    val_batch = validation_batch(model.kind, training, dev)
    started = time.perf_counter()
    running = None
    step = start_step
    while step < total:
        raise_if_cancelled(cancel)
        rng = np.random.default_rng([seed, step])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        torch.manual_seed(seed * 1_000_003 + step)
        model.train()
        batch = _to_torch(make_batch(model.kind, rng, training), dev)
        loss = compute_loss(model, batch, training, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training["grad_clip"])
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        done = step = step + 1
        if time_budget_min and done == start_step + BUDGET_PROBE_STEPS:
            per_step = (time.perf_counter() - started) / BUDGET_PROBE_STEPS
            affordable = start_step + int(time_budget_min * 60.0 / per_step)
            if affordable < total:
                total = plan["total"] = max(affordable, done)
                training["steps"] = total
                print(f"[{model_name}] {per_step:.2f} s/step: {total} steps fit the {time_budget_min:g} min budget",
                      file=log, flush=True)
        if done % training["log_every"] == 0 or done == total:
            elapsed = time.perf_counter() - started
            eta = elapsed / (done - start_step) * (total - done)
            print(f"[{model_name}] step {done}/{total} loss {running:.4f} ({elapsed:.0f} s, ETA {eta:.0f} s)",
                  file=log, flush=True)
            if progress:
                progress(done / total, f"step {done}/{total}")
        if done % training["checkpoint_every"] == 0 or done == total:
            checkpoint = {"network": model_name, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "schedule": schedule.state_dict(), "step": done,
                          "wall_s": previous_wall + time.perf_counter() - started}
            with OutputSet(overwrite=True) as outputs:  # a kill while saving leaves the last checkpoint whole
                outputs.add_stream(checkpoint_path, lambda handle: torch.save(checkpoint, handle))
                outputs.commit()
    wall = time.perf_counter() - started
    model.eval()
    calibration = fit_sd_calibration(model, training, dev) if model.config.get("calibrate_sd") else None
    validation = evaluate(model, val_batch)
    print(f"[{model_name}] validation: " + ", ".join(f"{k} RMSE {v['rmse']:.4f} CCC {v['ccc']:.3f}"
                                                     for k, v in validation.items()), file=log, flush=True)
    card = {
        "network": model_name,
        "architecture": type(model).__name__,
        "description": DESCRIPTIONS[model_name],
        "input_kind": model.kind,
        "network_config": model.config,
        "n_parameters": count_parameters(model),
        "outputs": {n: u for n, u in zip(PARAM_NAMES, PARAM_UNITS)},
        "output_upper_bounds": dict(zip(PARAM_NAMES, PARAM_UPPER)),
        "uncertainty": uncertainty_method(model_name, model.config),
        "sd_calibration": calibration,
        "canonical_grid": {"step_s": canonical_grid.GRID_STEP_S, "points": canonical_grid.GRID_POINTS,
                           "input": canonical_grid.INPUT_DESCRIPTION,
                           "protocol_features": list(canonical_grid.PROTOCOL_FEATURES)},
        "simulator_ranges": simulator.SIMULATOR_RANGES,
        "training": {**training, "steps_run_this_session": total - start_step, "resumed_from_step": start_step,
                     "wall_s": round(previous_wall + wall, 1), "wall_s_this_session": round(wall, 1), "device": str(dev), "torch_threads": torch.get_num_threads(),
                     "torch_version": torch.__version__, "platform": platform.platform(),
                     **({"initialised_from": initialised_from} if initialised_from else {})},
        "validation": {"set": {"seed": training["val_seed"], "kind": model.kind,
                               "size": int(val_batch["params"].numel() // 3)}, "metrics": validation},
        "check": {**CHECK_SET, "metric": "Ktrans_rmse_per_min", "value": check_metric(model, dev)},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": f"DCEPKInferenceLib {__version__}",
        "retrain_command": f"dcepk train --model {model_name} "
                           + (f"--name {name} --config DCEPKInference/Resources/Models/configs/{name}.json "
                              if name != model_name else "")
                           + f"--steps {max(total, 20000)} --device cuda --out DCEPKInference/Resources/Models --overwrite",
    }
    card = save_model(model.cpu(), card, out_dir, name, overwrite=overwrite)
    print(f"[{model_name}] wrote {target} ({card['weights_bytes'] / 1e6:.2f} MB, sha256 {card['sha256'][:12]}...)",
          file=log, flush=True)
    return card


def build_train_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dcepk train",
                                               description="train an inference network on simulated DCE data")
    parser.add_argument("--model", required=True, choices=sorted(NETWORKS), help="network name")
    parser.add_argument("--name", help="model name of the files and card (default: the network name; "
                                       "another name trains a variant beside it)")
    parser.add_argument("--config", type=Path,
                        help="training config JSON (default: the shipped configs/<name>.json)")
    parser.add_argument("--steps", type=int, help="optimiser steps (overrides the config)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", type=Path, default=Path("dcepk_models"), help="output folder for weights + card")
    parser.add_argument("--resume", type=Path, help="checkpoint (.checkpoint.pt) to continue from")
    parser.add_argument("--init-from", type=Path,
                        help="folder with a trained model of this name: fine-tune from its weights")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--time-budget-min", type=float, help="cut the steps to fit this many minutes (slow machines)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="only refit the SD calibration of the trained model in --out and rewrite its card")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def train_main(argv=None) -> int:
    args = build_train_parser().parse_args(argv)
    name = args.name or args.model
    if args.recalibrate:
        recalibrate(name, args.out, resolve_device(args.device))
        return 0
    config_path = args.config or (CONFIG_DIR / f"{name}.json" if args.name else None)
    train(args.model, load_config(args.model, config_path), steps=args.steps, device=args.device, out_dir=args.out,
          resume=args.resume, overwrite=args.overwrite, threads=args.threads, time_budget_min=args.time_budget_min,
          init_from=args.init_from, name=name)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
