"""What a training run learns from, per network mode: batches, loss, validation, SD calibration and the
mode's entries of the model card. ``trainer.train`` runs the same loop for every task.

* ``AifFreeTask``: the canonical-grid networks that see no input function (the legacy models):
  batches simulated on the fly at every step (``batches.make_batch``).
* ``ConditionedVoxelTask``: the AIF-conditioned voxel network: batches of encoded voxels drawn from a
  refreshed pool of simulated subjects (``encoded_sets.voxel_pool``), validated on the fixed
  validation set and SD-calibrated on the separate calibration set (``encoded_sets``).
* ``ConditionedSliceTask``: the AIF-conditioned 2-D networks, the same on encoded textured patches
  (``encoded_patches``).
* ``reader_training.ReaderTask``: image-only mode's input-function reader on slices with vessels.
"""

import numpy as np
import torch

from ..analysis import metrics
from ..data import aif_conditioned, canonical_grid, simulator
from ..nn import aif_encoding
from ..nn.conditioned import MODE as CONDITIONED
from ..nn.networks import PARAM_NAMES, PARAM_UPPER
from . import encoded_patches, encoded_sets
from .batches import compute_loss, make_batch, to_torch, tracer_kinetic_loss
from .reader_training import READER, ReaderTask
from .calibration import check_metric, coverage_factors, evaluate, fit_sd_calibration, validation_batch
from .config import CHECK_SET

AIF_FREE = "aif_free"


def task_for(model, training, device, log=None, cancel=None):
    if model.config.get("mode") == READER:
        return ReaderTask(model, training, device, cancel)
    if model.config.get("mode") == CONDITIONED:
        if model.kind == "slice":
            return ConditionedSliceTask(model, training, device, cancel)
        return ConditionedVoxelTask(model, training, device, log, cancel)
    return AifFreeTask(model, training, device)


class AifFreeTask:
    mode = AIF_FREE

    def __init__(self, model, training, device):
        self.model, self.training, self.device = model, training, device
        self.validation = validation_batch(model.kind, training, device)

    def prepare(self, start_step: int, fresh: bool) -> None:
        pass

    def batch(self, step: int, rng):
        return to_torch(make_batch(self.model.kind, rng, self.training), self.device)

    def loss(self, batch, generator):
        return compute_loss(self.model, batch, self.training, generator)

    def validation_metrics(self):
        return evaluate(self.model, self.validation)

    def calibrate(self):
        return fit_sd_calibration(self.model, self.training, self.device)

    def card_entries(self):
        return {"mode": AIF_FREE,
                "canonical_grid": {"step_s": canonical_grid.GRID_STEP_S, "points": canonical_grid.GRID_POINTS,
                                   "input": canonical_grid.INPUT_DESCRIPTION,
                                   "protocol_features": list(canonical_grid.PROTOCOL_FEATURES)},
                "simulator_ranges": simulator.SIMULATOR_RANGES,
                "validation": {"set": {"seed": self.training["val_seed"], "kind": self.model.kind,
                                       "size": int(self.validation["params"].numel() // 3)}},
                "check": {**CHECK_SET, "metric": "Ktrans_rmse_per_min", "value": check_metric(self.model, self.device)}}


@torch.no_grad()
def predict_encoded(model, data: encoded_sets.EncodedSet):
    """(mean, sd) numpy (N, 3) in physical units of a conditioned voxel network on an encoded set."""
    model.eval()
    mean, sd = model.predict(data.features, data.anchor, data.posterior_sd)
    return mean.cpu().numpy(), sd.cpu().numpy()


def conditioned_metrics(model, data: encoded_sets.EncodedSet):
    """Per parameter (Ktrans, ve, vp): median absolute error, gross-error fraction, bias, RMSE, CCC,
    90 % coverage and Spearman |error| vs SD on an encoded set."""
    mean, sd = predict_encoded(model, data)
    return parameter_metrics(mean, sd, data.params.cpu().numpy())


class ConditionedVoxelTask:
    mode = CONDITIONED

    def __init__(self, model, training, device, log=None, cancel=None):
        self.model, self.training, self.device, self.log = model, training, device, log
        self.pool = encoded_sets.voxel_pool(int(training["seed"]), training, device, cancel)
        self.validation = encoded_sets.fixed_set(encoded_sets.VALIDATION, device)
        self.upper = torch.tensor(PARAM_UPPER, dtype=torch.float32, device=device)

    def prepare(self, start_step: int, fresh: bool) -> None:
        data = self.pool.at_step(start_step)
        if fresh:   # the encoding's standardisation comes from the first pool (a resumed model has its own)
            self.model.set_standardisation(data["features"])

    def batch(self, step: int, rng):
        self.pool.at_step(step)
        return encoded_sets.as_set(self.pool.batch(rng, int(self.training["batch_voxels"])))

    def loss(self, batch, generator):
        outputs = self.model(batch.features, batch.anchor, batch.posterior_sd)
        return self.model.loss(outputs, batch.params / self.upper)

    def validation_metrics(self):
        return conditioned_metrics(self.model, self.validation)

    def calibrate(self):
        """Per-parameter SD factors on the calibration set (never the training or validation set)."""
        which = encoded_sets.CALIBRATION
        data = encoded_sets.fixed_set(which, self.device)
        self.model.config["sd_scale"] = [1.0, 1.0, 1.0]
        mean, sd = predict_encoded(self.model, data)
        factors = coverage_factors(np.abs(mean - data.params.cpu().numpy()) / np.maximum(sd, 1e-12))
        self.model.config["sd_scale"] = factors
        return {"seed": which["seed"], "subjects": which["subjects"],
                "voxels_per_subject": which["voxels_per_subject"], "factors": factors}

    def card_entries(self):
        which = encoded_sets.VALIDATION
        return {"mode": CONDITIONED, "input_encoding": aif_encoding.ENCODING,
                "simulator_ranges": aif_conditioned.CONDITIONED_RANGES,
                "validation": {"set": {"seed": which["seed"], "subjects": which["subjects"],
                                       "voxels_per_subject": which["voxels_per_subject"],
                                       "families": "training AIF and protocol families"}}}


def parameter_metrics(mean, sd, truth):
    """Per parameter (Ktrans, ve, vp) of (N, 3) arrays: the card's validation metrics."""
    out = {}
    for i, name in enumerate(PARAM_NAMES):
        row = metrics.agreement(mean[:, i], truth[:, i], sd[:, i])
        row["median_abs_error"] = metrics.median_abs_error(mean[:, i], truth[:, i])
        row["gross_error_fraction"] = metrics.gross_error_fraction(mean[:, i], truth[:, i], name)
        out[name] = row
    return out


@torch.no_grad()
def predict_patches(model, patches, device, block: int = 8):
    """(mean, sd, truth) numpy (N, 3) over every pixel of a patch set."""
    model.eval()
    torch.manual_seed(0)   # latent draws
    means, sds = [], []
    for start in range(0, len(patches["params"]), block):
        batch = encoded_patches.as_float({k: v[start:start + block] for k, v in patches.items()}, device)
        mean, sd = model.predict(batch)
        means.append(mean.permute(0, 2, 3, 1).reshape(-1, 3).cpu())
        sds.append(sd.permute(0, 2, 3, 1).reshape(-1, 3).cpu())
    truth = patches["params"].permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    return torch.cat(means).numpy(), torch.cat(sds).numpy(), truth


class ConditionedSliceTask:
    mode = CONDITIONED

    def __init__(self, model, training, device, cancel=None):
        self.model, self.training, self.device = model, training, device
        self.pool = encoded_patches.patch_pool(int(training["seed"]), training, model.uses_stream, cancel)
        self.validation = encoded_patches.fixed_patches(encoded_patches.PATCH_VALIDATION, model.uses_stream)
        self.upper = torch.tensor(PARAM_UPPER, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def prepare(self, start_step: int, fresh: bool) -> None:
        data = self.pool.at_step(start_step)
        if fresh:
            pixels = data["encoding"][:64].to(torch.float32).permute(0, 2, 3, 1).reshape(-1, data["encoding"].shape[1])
            self.model.set_standardisation(pixels)

    def batch(self, step: int, rng):
        self.pool.at_step(step)
        return encoded_patches.as_float(self.pool.batch(rng, int(self.training["patches_per_batch"])), self.device)

    def loss(self, batch, generator):
        target_n = batch["params"] / self.upper
        out = self.model(batch, truth_n=target_n)
        loss = self.model.loss(out, target_n, batch)
        if self.model.config.get("tk_weight", 0) > 0:
            loss = loss + self.model.config["tk_weight"] * tracer_kinetic_loss(
                out["mean_n"] * self.upper, batch["params"], batch["cp_grid"], batch["valid"])
        return loss

    def validation_metrics(self):
        return parameter_metrics(*predict_patches(self.model, self.validation, self.device))

    def calibrate(self):
        which = encoded_patches.PATCH_CALIBRATION
        data = encoded_patches.fixed_patches(which, self.model.uses_stream)
        self.model.config["sd_scale"] = [1.0, 1.0, 1.0]
        mean, sd, truth = predict_patches(self.model, data, self.device)
        factors = coverage_factors(np.abs(mean - truth) / np.maximum(sd, 1e-12))
        self.model.config["sd_scale"] = factors
        return {"seed": which["seed"], "patches": which["patches"], "patch_size": which["size"], "factors": factors}

    def card_entries(self):
        which = encoded_patches.PATCH_VALIDATION
        entries = {"mode": CONDITIONED, "input_encoding": aif_encoding.ENCODING,
                   "simulator_ranges": aif_conditioned.CONDITIONED_RANGES,
                   "validation": {"set": {**which, "families": "training AIF and protocol families"}}}
        if self.model.uses_stream:
            entries["canonical_grid"] = {"step_s": canonical_grid.GRID_STEP_S, "points": canonical_grid.GRID_POINTS,
                                         "input": canonical_grid.INPUT_DESCRIPTION,
                                         "protocol_features": list(canonical_grid.PROTOCOL_FEATURES),
                                         "stream": "tissue, input function, residual of the anchor's curve (mM)"}
        return entries
