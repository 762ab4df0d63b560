"""Training on simulated data: ``train(...)``.

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

import datetime
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from DCEPKFittingLib.core.device import resolve_device
from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.jobs import raise_if_cancelled
from DCEPKFittingLib.core.output_files import OutputSet

from .. import __version__
from ..data import canonical_grid, simulator
from ..nn.model_store import load_model, save_model
from ..nn.networks import PARAM_NAMES, PARAM_UNITS, PARAM_UPPER, build_network, count_parameters
from .batches import compute_loss, make_batch, to_torch
from .calibration import check_metric, evaluate, fit_sd_calibration, validation_batch
from .config import BUDGET_PROBE_STEPS, CHECK_SET, DESCRIPTIONS, load_config, uncertainty_method


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
    dev = torch.device(resolve_device(device))
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
        batch = to_torch(make_batch(model.kind, rng, training), dev)
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
