"""Training batches (simulated on the fly) as tensors, temporal-shift augmentation and the losses."""

from typing import Dict

import torch

from DCEPKFittingLib.kinetics import tk_models

from ..data import canonical_grid, simulator
from ..nn.networks import PARAM_UPPER


def to_torch(batch: simulator.SimulatedBatch, device) -> Dict[str, torch.Tensor]:
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


# The forward model divides by ve (kep = Ktrans / ve): a ve of exactly 0 (a clamped prediction, a
# non-enhancing truth) would make the loss NaN. Below this floor the curve no longer changes visibly.
TK_LOSS_VE_FLOOR = 1e-3


def _with_ve_floor(params):
    """(B, 3, H, W) -> (B, H, W, 3) with ve >= TK_LOSS_VE_FLOOR."""
    floor = torch.tensor([0.0, TK_LOSS_VE_FLOOR, 0.0], dtype=params.dtype, device=params.device)
    return torch.maximum(params.permute(0, 2, 3, 1), floor)


def tracer_kinetic_loss(pred_params, true_params, cp_grid, valid):
    """Relative squared error of extended-Tofts concentration on the canonical grid (Ulas et al.):
    predicted vs true parameters through the core forward model with the patch's true AIF.
    pred/true (B, 3, H, W) physical units, cp_grid (B, G) mM, valid (B, G)."""
    t = torch.as_tensor(canonical_grid.grid_times_s(), dtype=pred_params.dtype, device=pred_params.device)
    cp = cp_grid[:, None, None, :]
    c_pred = tk_models.concentration("etofts", _with_ve_floor(pred_params), t, cp)
    with torch.no_grad():
        c_true = tk_models.concentration("etofts", _with_ve_floor(true_params), t, cp)
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
