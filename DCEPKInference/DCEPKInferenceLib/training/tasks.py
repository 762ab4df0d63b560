"""What a training run learns from, per network mode: batches, loss, validation, SD calibration and the
mode's entries of the model card. ``trainer.train`` runs the same loop for every task.

* ``AifFreeTask``: the canonical-grid networks that see no input function (the legacy models):
  batches simulated on the fly at every step (``batches.make_batch``).
* ``ConditionedVoxelTask``: the AIF-conditioned voxel network: batches of encoded voxels drawn from a
  refreshed pool of simulated subjects (``encoded_sets.TrainingPool``), validated on the fixed
  validation set and SD-calibrated on the separate calibration set (``encoded_sets``).
"""

import numpy as np
import torch

from ..analysis import metrics
from ..data import aif_conditioned, canonical_grid, simulator
from ..nn import aif_encoding
from ..nn.conditioned import MODE as CONDITIONED
from ..nn.networks import PARAM_NAMES, PARAM_UPPER
from . import encoded_sets
from .batches import compute_loss, make_batch, to_torch
from .calibration import check_metric, coverage_factors, evaluate, fit_sd_calibration, validation_batch
from .config import CHECK_SET

AIF_FREE = "aif_free"


def task_for(model, training, device, log=None, cancel=None):
    if model.config.get("mode") == CONDITIONED:
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
    truth = data.params.cpu().numpy()
    out = {}
    for i, name in enumerate(PARAM_NAMES):
        row = metrics.summarize(mean[:, i], truth[:, i], sd[:, i])
        row["median_abs_error"] = metrics.median_abs_error(mean[:, i], truth[:, i])
        row["gross_error_fraction"] = metrics.gross_error_fraction(mean[:, i], truth[:, i], name)
        out[name] = row
    return out


class ConditionedVoxelTask:
    mode = CONDITIONED

    def __init__(self, model, training, device, log=None, cancel=None):
        self.model, self.training, self.device, self.log = model, training, device, log
        self.pool = encoded_sets.TrainingPool(int(training["seed"]), training, device, log, cancel)
        self.validation = encoded_sets.fixed_set(encoded_sets.VALIDATION, device)
        self.upper = torch.tensor(PARAM_UPPER, dtype=torch.float32, device=device)

    def prepare(self, start_step: int, fresh: bool) -> None:
        data = self.pool.at_step(start_step)
        if fresh:   # the encoding's standardisation comes from the first pool (a resumed model has its own)
            self.model.set_standardisation(data.features)

    def batch(self, step: int, rng):
        self.pool.at_step(step)
        return self.pool.batch(rng, int(self.training["batch_voxels"]))

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
