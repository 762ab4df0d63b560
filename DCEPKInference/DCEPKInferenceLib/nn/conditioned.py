"""AIF-conditioned networks: the input function's profile-likelihood encoding (``aif_encoding``) in,
Ktrans / ve / vp with a calibrated SD out, through one anchored head shared by every architecture.

Anchored head: location = clip(anchor + k sigma_post tanh(raw), [lower, PARAM_UPPER]) with the encoder's
least-squares anchor and grid-posterior SD sigma_post, so the network moves the fit by at most k
posterior SDs: as the noise goes to 0 the band closes and the output is the least-squares solution
(a noise-free phantom is reproduced by construction); at low SNR the network shrinks towards the
training prior within the band. ``k`` (``anchor_band``) is chosen on the validation set. The scale
is a separate softplus output trained with the Laplace NLL, whose location is the posterior median
(the median-error criterion); Laplace SD = sqrt(2) b. ``lower`` is 0 but for ve, which stays at the
anchor's floor (``aif_encoding.VE_FLOOR``): a ve of 0 would give kep = Ktrans / ve no value.

This module holds the voxel-wise ``hetero_encoder`` (an ensemble of MLPs on the standardised
encoding); the 2-D architectures' conditioned forms are in ``conditioned_slices``.
"""

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .aif_encoding import FEATURE_COUNT, VE_FLOOR
from .networks import PARAM_UPPER, SD_CALIBRATION, _spread, calibrated_sd, in_cache_blocks, nll

MODE = "aif_conditioned"
MIN_SCALE_N = 1e-4


def _per_parameter(values, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[channel_dim] = 3
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)


def upper_like(like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return _per_parameter(PARAM_UPPER, like, channel_dim)


def anchored_outputs(raw, anchor, posterior_sd, band: float, channel_dim: int = 1):
    """(location, scale) in normalised units (/ PARAM_UPPER) from 6 raw channels, the anchor and the
    posterior SD (physical units, 3 channels on ``channel_dim``)."""
    loc_raw, scale_raw = torch.split(raw, 3, dim=channel_dim)
    upper = upper_like(anchor, channel_dim)
    location = anchor + band * posterior_sd * torch.tanh(loc_raw)
    location = torch.minimum(torch.maximum(location, _per_parameter((0.0, VE_FLOOR, 0.0), location, channel_dim)),
                             upper)
    return location / upper, F.softplus(scale_raw) + MIN_SCALE_N


def combine_members(outputs, channel_dim: int = 1):
    """Ensemble of (location, Laplace scale) -> mean location and SD (normalised units): the members'
    mean Laplace variance (2 b^2) plus the variance of their locations."""
    locations = torch.stack([loc for loc, _ in outputs])
    aleatoric = torch.stack([2.0 * scale ** 2 for _, scale in outputs]).mean(0)
    return locations.mean(0), torch.sqrt(aleatoric + _spread(locations))


class _MemberMLP(nn.Sequential):
    def __init__(self, hidden, dropout: float):
        layers, width = [], FEATURE_COUNT
        for size in hidden:
            layers += [nn.Linear(width, size), nn.GELU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = size
        super().__init__(*layers, nn.Linear(width, 6))


class ConditionedHeteroEncoder(nn.Module):
    """Voxel-wise: an ensemble of MLPs on the standardised profile encoding, anchored head each."""

    kind = "voxel"
    mode = MODE
    default_config = {"mode": MODE, "hidden": [128, 128, 64], "members": 3, "anchor_band": 3.0, "dropout": 0.0,
                      "likelihood": "laplace", **SD_CALIBRATION}

    def __init__(self, config: Dict):
        super().__init__()
        self.config = {**self.default_config, **config}
        # standardisation of the encoding, set from the first training pool (saved with the weights)
        self.register_buffer("feature_mean", torch.zeros(FEATURE_COUNT))
        self.register_buffer("feature_scale", torch.ones(FEATURE_COUNT))
        self.members = nn.ModuleList(_MemberMLP(self.config["hidden"], float(self.config["dropout"]))
                                     for _ in range(int(self.config["members"])))

    def set_standardisation(self, features: torch.Tensor) -> None:
        self.feature_mean.copy_(features.mean(0))
        self.feature_scale.copy_(features.std(0).clamp_min(1e-3))

    def forward(self, features, anchor, posterior_sd):
        """(N, F), (N, 3), (N, 3) -> list of (location_n, scale_n) (N, 3), one per member."""
        x = (features - self.feature_mean) / self.feature_scale
        band = float(self.config["anchor_band"])
        return [anchored_outputs(member(x), anchor, posterior_sd, band) for member in self.members]

    def loss(self, outputs, target_n, batch=None):
        return sum(nll(target_n, loc, scale, "laplace") for loc, scale in outputs) / len(outputs)

    CPU_BLOCK_VOXELS = 8192

    @torch.no_grad()
    def predict(self, features, anchor, posterior_sd, n_samples: int = 0):
        """Mean and calibrated 1-SD (N, 3) in physical units (Ktrans 1/min, ve, vp)."""
        def block(f, a, s):
            location, sd = combine_members(self.forward(f, a, s))
            up = upper_like(location, 1)
            return location * up, calibrated_sd(sd * up, self.config)
        return in_cache_blocks(block, self.CPU_BLOCK_VOXELS, features, anchor, posterior_sd)


CONDITIONED_NETWORKS = {"hetero_encoder": ConditionedHeteroEncoder}
