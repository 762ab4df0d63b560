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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from DCEPKFittingLib.core.device import resolve_device
from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.jobs import raise_if_cancelled
from DCEPKFittingLib.core.output_files import OutputSet

from .. import __version__
from ..nn.conditioned import MODE as CONDITIONED
from ..nn.model_store import load_model, save_model
from ..nn.networks import PARAM_NAMES, PARAM_UNITS, PARAM_UPPER, build_network, count_parameters
from .config import BUDGET_PROBE_STEPS, description, load_config, uncertainty_method
from .tasks import task_for


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
    conditioned = model.config.get("mode") == CONDITIONED   # GROWABLE holds for the AIF-free layout only
    rule = {"grow": (), "fixed": ()} if conditioned else GROWABLE.get(model_name, {"grow": (), "fixed": ()})
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


@dataclass
class _Run:
    """One training run: its model, optimiser, schedule and progress."""

    model_name: str
    name: str
    training: Dict
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    plan: Dict                              # {"total": steps}; a time budget may lower it
    out_dir: Path
    log: object
    start_step: int = 0
    previous_wall: float = 0.0
    initialised_from: Optional[Dict] = None
    started: float = 0.0

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / f"{self.name}.checkpoint.pt"


def _new_run(model_name, config, steps, device, out_dir, overwrite, threads, log, name) -> _Run:
    """The model, optimiser and cosine schedule of a run (learning rate down to 10 %); refuses to
    overwrite trained weights without ``overwrite``."""
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
    torch.manual_seed(int(training["seed"]))
    model = build_network(model_name, config["network_config"]).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training["lr"], weight_decay=training["weight_decay"])
    plan = {"total": training["steps"]}  # read by the schedule, so a time budget can shorten the run
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, plan["total"]) / plan["total"])))
    return _Run(model_name, name, training, dev, model, optimizer, schedule, plan, out_dir, log)


def _resume(run: _Run, resume) -> None:
    state = torch.load(resume, map_location=run.device, weights_only=True)
    if state.get("network") != run.model_name:
        raise DCEPKInputError(f"checkpoint {resume} is for '{state.get('network')}', not '{run.model_name}'")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.start_step = int(state["step"])
    run.previous_wall = float(state.get("wall_s", 0.0))
    print(f"resumed {run.model_name} from {resume} at step {run.start_step}", file=run.log)


def _step(run: _Run, task, step: int) -> float:
    """One optimiser step on the batch of ``step`` (drawn from ``[seed, step]``: a resumed run
    continues exactly as an uninterrupted one); returns the loss."""
    seed = int(run.training["seed"])
    rng = np.random.default_rng([seed, step])
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    torch.manual_seed(seed * 1_000_003 + step)
    run.model.train()
    loss = task.loss(task.batch(step, rng), generator)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.training["grad_clip"])
    run.optimizer.step()
    run.schedule.step()
    return loss.item()


def _apply_time_budget(run: _Run, done: int, time_budget_min: float) -> None:
    """After the probe steps and then at every log step, cut the total steps to what the step time
    measured so far allows in the budget (a pool refresh or a busy machine changes the step time; the
    total only ever shrinks); the cosine schedule follows the new total."""
    if not time_budget_min or done < run.start_step + BUDGET_PROBE_STEPS:
        return
    if done != run.start_step + BUDGET_PROBE_STEPS and done % run.training["log_every"]:
        return
    per_step = (time.perf_counter() - run.started) / (done - run.start_step)
    affordable = run.start_step + int(time_budget_min * 60.0 / per_step)
    if affordable < run.plan["total"] * 0.99 or (done == run.start_step + BUDGET_PROBE_STEPS
                                                  and affordable < run.plan["total"]):
        run.plan["total"] = run.training["steps"] = max(affordable, done)
        print(f"[{run.model_name}] {per_step:.3f} s/step: {run.plan['total']} steps fit the {time_budget_min:g} min "
              "budget", file=run.log, flush=True)


def _save_checkpoint(run: _Run, done: int) -> None:
    checkpoint = {"network": run.model_name, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                  "schedule": run.schedule.state_dict(), "step": done,
                  "wall_s": run.previous_wall + time.perf_counter() - run.started}
    with OutputSet(overwrite=True) as outputs:  # a kill while saving leaves the last checkpoint whole
        outputs.add_stream(run.checkpoint_path, lambda handle: torch.save(checkpoint, handle))
        outputs.commit()


def _train_steps(run: _Run, task, time_budget_min, progress, cancel) -> None:
    running = None
    step = run.start_step
    while step < run.plan["total"]:
        raise_if_cancelled(cancel)
        loss = _step(run, task, step)
        running = loss if running is None else 0.95 * running + 0.05 * loss
        done = step = step + 1
        _apply_time_budget(run, done, time_budget_min)
        total = run.plan["total"]
        if done % run.training["log_every"] == 0 or done == total:
            elapsed = time.perf_counter() - run.started
            eta = elapsed / (done - run.start_step) * (total - done)
            print(f"[{run.model_name}] step {done}/{total} loss {running:.4f} ({elapsed:.0f} s, ETA {eta:.0f} s)",
                  file=run.log, flush=True)
            if progress:
                progress(done / total, f"step {done}/{total}")
        if done % run.training["checkpoint_every"] == 0 or done == total:
            _save_checkpoint(run, done)


def _model_card(run: _Run, task, calibration, validation, wall: float) -> Dict:
    model, training, total = run.model, run.training, run.plan["total"]
    entries = task.card_entries()
    entries["validation"] = {**entries.get("validation", {}), "metrics": validation}
    retrain = (f"dcepk train --model {run.model_name} "
               + (f"--name {run.name} --config DCEPKInference/Resources/Models/configs/{run.name}.json "
                  if run.name != run.model_name else "")
               + f"--steps {max(total, 20000)} --device cuda --out DCEPKInference/Resources/Models --overwrite")
    return {
        "network": run.model_name, "architecture": type(model).__name__,
        "description": description(run.model_name, model.config), "input_kind": model.kind,
        "network_config": model.config, "n_parameters": count_parameters(model),
        "outputs": {n: u for n, u in zip(PARAM_NAMES, PARAM_UNITS)},
        "output_upper_bounds": dict(zip(PARAM_NAMES, PARAM_UPPER)),
        "uncertainty": uncertainty_method(run.model_name, model.config), "sd_calibration": calibration,
        **entries,
        "training": {**training, "steps_run_this_session": total - run.start_step,
                     "resumed_from_step": run.start_step, "wall_s": round(run.previous_wall + wall, 1),
                     "wall_s_this_session": round(wall, 1), "device": str(run.device),
                     "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                     "platform": platform.platform(),
                     **({"initialised_from": run.initialised_from} if run.initialised_from else {})},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": f"DCEPKInferenceLib {__version__}", "retrain_command": retrain,
    }


def train(model_name: str, config: Optional[Dict] = None, steps: Optional[int] = None, device="auto",
          out_dir=None, resume=None, overwrite: bool = False, threads: Optional[int] = None,
          time_budget_min: Optional[float] = None, init_from=None, progress=None, cancel=None,
          log=sys.stderr, name: Optional[str] = None) -> Dict:
    """Train network ``model_name`` and write ``<out_dir>/<name>.safetensors`` + ``.json`` (``name``:
    the model's name, default the network's; another name ships a variant, e.g. a smaller config or
    the AIF-conditioned mode, beside the network's own model). Returns the card.

    ``time_budget_min``: on a slow machine, fit the run into this many minutes of wall clock (the
    step time is measured after ``BUDGET_PROBE_STEPS`` steps and at every log step; the cosine
    schedule follows the new total, so the run still ends at the low learning rate).
    ``init_from``: a folder with a trained ``<model_name>`` (weights checked against its card):
    fine-tune from those weights with a fresh optimiser and schedule, e.g. under another loss.
    """
    config = config or load_config(model_name)
    if init_from and resume:
        raise DCEPKInputError("--init-from and --resume exclude each other: resume continues a run, "
                              "init-from starts a new one from trained weights")
    run = _new_run(model_name, config, steps, device, out_dir, overwrite, threads, log, name)
    if init_from:
        run.initialised_from = _initialise_from(run.model, model_name, init_from, log, run.name)
    if resume:
        _resume(run, resume)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    task = task_for(run.model, run.training, run.device, log, cancel)
    task.prepare(run.start_step, fresh=not (resume or init_from))
    run.started = time.perf_counter()
    _train_steps(run, task, time_budget_min, progress, cancel)
    wall = time.perf_counter() - run.started
    run.model.eval()
    calibration = task.calibrate() if run.model.config.get("calibrate_sd") else None
    validation = task.validation_metrics()
    print(f"[{model_name}] validation: " + ", ".join(
        f"{k} RMSE {v['rmse']:.4f} CCC {v['ccc']:.3f}" if isinstance(v, dict) else f"{k} {v:.4f}"
        for k, v in validation.items()), file=log, flush=True)
    card = save_model(run.model.cpu(), _model_card(run, task, calibration, validation, wall), run.out_dir, run.name,
                      overwrite=overwrite)
    print(f"[{model_name}] wrote {run.out_dir / (run.name + '.safetensors')} ({card['weights_bytes'] / 1e6:.2f} MB, "
          f"sha256 {card['sha256'][:12]}...)", file=log, flush=True)
    return card
