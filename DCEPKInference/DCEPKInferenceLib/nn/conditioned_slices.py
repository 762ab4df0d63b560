"""The 2-D architectures in AIF-conditioned mode: the profile-likelihood encoding (``aif_encoding``) of
every pixel as input channels, the published trunk, and the anchored head of ``conditioned``.

* ``ulas_cnn`` (after Ulas et al. 2019): a 1x1 stem from the encoding, then the local (3x3) and dilated
  global (dilation 2/4/8) pathways, fused by 1x1 convolutions; trained with the Laplace NLL plus the
  tracer-kinetic loss on concentration with the given input function (``training``).
* ``fcsa_net`` (after Zeng & Zhou): a temporal stream [tissue, input function, fit residual] per pixel
  on the canonical 4 s grid (the "input function as a second input" route), weighted by a frame
  attention computed from the slice's mean tissue curve, the input function and the grid mask,
  joined to the encoding in the stem; then conv blocks with channel and spatial attention (CBAM).
* ``tcn_punet`` (after Lyoo et al. 2025): a per-pixel temporal convolutional network over the same
  stream, concatenated with the encoding's stem, then a small U-Net with a probabilistic latent
  (prior net from the image, posterior from image + truth in training); SD^2 = variance over
  latent draws + the Laplace head's variance.

Inputs (batch of slices): ``encoding`` (B, F, H, W) float, ``anchor`` and ``posterior_sd`` (B, 3, H, W)
in physical units, ``tissue`` (B, 1, H, W) mask and, for the stream networks, ``stream`` (B, 3, G, H, W)
with ``valid`` (B, G). Outputs as the AIF-free 2-D networks: ``mean_n`` / ``scale_n`` (normalised).
"""

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.canonical_grid import GRID_POINTS
from .aif_encoding import FEATURE_COUNT
from .conditioned import MIN_SCALE_N, MODE, anchored_outputs, upper_like
from .networks import (SD_CALIBRATION, _CBAM, _LatentNet, _masked_mean, _spread, _TCN, calibrated_sd,
                       local_and_global_pathways, nll, two_level_unet)

STREAM_CHANNELS = 3     # tissue, input function, residual of the anchor's curve; asinh(x / 0.5 mM)


class _EncodingStem(nn.Module):
    """Standardised encoding (and optional extra channels) -> ``channels`` features by a 1x1 conv."""

    def __init__(self, channels: int, extra: int = 0):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(FEATURE_COUNT))
        self.register_buffer("feature_scale", torch.ones(FEATURE_COUNT))
        self.conv = nn.Conv2d(FEATURE_COUNT + extra, channels, 1)

    def forward(self, encoding, extra=None):
        x = (encoding - self.feature_mean[None, :, None, None]) / self.feature_scale[None, :, None, None]
        if extra is not None:
            x = torch.cat([x, extra], dim=1)
        return F.gelu(self.conv(x))


class _ConditionedSlices(nn.Module):
    """Shared parts: config, standardisation, anchored outputs, loss and prediction."""

    kind = "slice"
    mode = MODE
    uses_stream = False

    def set_standardisation(self, features: torch.Tensor) -> None:
        """From encoded pixels (N, F) of the first training pool."""
        self.stem.feature_mean.copy_(features.mean(0))
        self.stem.feature_scale.copy_(features.std(0).clamp_min(1e-3))

    def _outputs(self, raw, batch) -> Dict:
        location, scale = anchored_outputs(raw, batch["anchor"], batch["posterior_sd"],
                                           float(self.config["anchor_band"]))
        return {"mean_n": location, "scale_n": scale}

    def loss(self, out, target_n, batch) -> torch.Tensor:
        tissue = batch["tissue"]
        loss = nll(target_n * tissue, out["mean_n"] * tissue, out["scale_n"], "laplace", weight=tissue)
        return loss + self.config.get("beta_kl", 0.0) * out.get("kl", 0.0)

    @torch.no_grad()
    def predict(self, batch, n_samples: int = 0):
        """Mean and calibrated 1-SD (B, 3, H, W) in physical units."""
        out = self.forward(batch)
        up = upper_like(out["mean_n"], 1)
        return out["mean_n"] * up, calibrated_sd(2.0 ** 0.5 * out["scale_n"] * up, self.config)   # Laplace SD


class ConditionedUlasCNN(_ConditionedSlices):
    default_config = {"mode": MODE, "channels": 32, "fuse": 64, "anchor_band": 3.0, "tk_weight": 0.1,
                      **SD_CALIBRATION}

    def __init__(self, config: Dict):
        super().__init__()
        self.config = {**self.default_config, **config}
        c = self.config["channels"]
        self.stem = _EncodingStem(c)
        self.local_path, self.global_path, self.fuse = local_and_global_pathways(c, self.config["fuse"])

    def forward(self, batch, truth_n=None):
        h = self.stem(batch["encoding"])
        h = torch.cat([self.local_path(h), self.global_path(h)], dim=1)
        return self._outputs(self.fuse(h), batch)


def _stream_input(stream, valid):
    """(B, 3, G, H, W) concentrations -> (B, 3G, H, W) compressed channels, invalid grid points zeroed."""
    x = torch.asinh(stream / 0.5) * valid[:, None, :, None, None]
    return x.flatten(1, 2)


class ConditionedFCSANet(_ConditionedSlices):
    default_config = {"mode": MODE, "channels": 32, "blocks": 3, "anchor_band": 3.0, "tk_weight": 0.0,
                      **SD_CALIBRATION}
    uses_stream = True

    def __init__(self, config: Dict):
        super().__init__()
        self.config = {**self.default_config, **config}
        c = self.config["channels"]
        # frame attention over the grid from the slice's mean tissue curve, the input function, the mask
        self.frame_attention = nn.Sequential(nn.Linear(3 * GRID_POINTS, 64), nn.GELU(),
                                             nn.Linear(64, GRID_POINTS))
        self.stem = _EncodingStem(c, extra=STREAM_CHANNELS * GRID_POINTS)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(self.config["blocks"]))
        self.attn = nn.ModuleList(_CBAM(c) for _ in range(self.config["blocks"]))
        self.head = nn.Sequential(nn.Conv2d(c, c, 1), nn.GELU(), nn.Conv2d(c, 6, 1))

    def forward(self, batch, truth_n=None):
        stream, valid, tissue = batch["stream"], batch["valid"], batch["tissue"]
        mean_curve = _masked_mean(torch.asinh(stream[:, 0] / 0.5), tissue)           # (B, G)
        aif = torch.asinh(stream[:, 1].mean((2, 3)) / 0.5)
        weights = 2 * torch.sigmoid(self.frame_attention(torch.cat([mean_curve, aif, valid], dim=1)))
        h = self.stem(batch["encoding"], _stream_input(stream * weights[:, None, :, None, None], valid))
        for conv, attn in zip(self.convs, self.attn):
            h = h + attn(F.gelu(conv(h)), tissue)
        return self._outputs(self.head(h), batch)


def _conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1), nn.GELU())


class ConditionedTCNProbUNet(_ConditionedSlices):
    default_config = {"mode": MODE, "tcn_channels": 12, "tcn_levels": 3, "features": 16, "unet": 24, "latent": 6,
                      "beta_kl": 0.05, "n_samples": 8, "anchor_band": 3.0, "tk_weight": 0.0, **SD_CALIBRATION}
    uses_stream = True

    def __init__(self, config: Dict):
        super().__init__()
        self.config = {**self.default_config, **config}
        cfg = self.config
        f, u, z = cfg["features"], cfg["unet"], cfg["latent"]
        # the AIF-free TCN's patch embedding takes [curve, valid]: here [tissue, AIF, residual] enter as
        # three curves through one embedding each, summed (linear, so the same as one wider embedding)
        self.tcns = nn.ModuleList(_TCN(cfg["tcn_channels"], f, cfg["tcn_levels"]) for _ in range(STREAM_CHANNELS))
        self.stem = _EncodingStem(f)
        self.enc1 = _conv_block(2 * f, u)
        self.enc2 = _conv_block(u, 2 * u)
        self.dec1 = _conv_block(3 * u, u)
        self.prior = _LatentNet(2 * f, u, z)
        self.posterior = _LatentNet(2 * f + 3, u, z)
        self.head = nn.Sequential(nn.Conv2d(u + z, u, 1), nn.GELU(), nn.Conv2d(u, 6, 1))

    def _features(self, batch):
        stream, valid, tissue = batch["stream"], batch["valid"], batch["tissue"]
        b, _, g, h, w = stream.shape
        pixels = stream.permute(0, 3, 4, 1, 2).reshape(b * h * w, STREAM_CHANNELS, g)
        vv = valid[:, None, None, :].expand(b, h, w, g).reshape(-1, g)
        protocol = pixels.new_zeros(pixels.shape[0], 2)
        temporal = sum(tcn(pixels[:, i], vv, protocol) for i, tcn in enumerate(self.tcns))
        temporal = temporal.view(b, h, w, -1).permute(0, 3, 1, 2)
        return torch.cat([temporal, self.stem(batch["encoding"])], dim=1)

    def _unet(self, feat):
        return two_level_unet(self.enc1, self.enc2, self.dec1, feat)

    def _raw(self, d1, z):
        return self.head(torch.cat([d1, z[:, :, None, None].expand(-1, -1, *d1.shape[2:])], dim=1))

    def forward(self, batch, truth_n=None):
        feat = self._features(batch)
        tissue = batch["tissue"]
        mu_p, ls_p = self.prior(feat, tissue)
        kl = torch.zeros((), device=feat.device)
        if truth_n is not None:
            mu_q, ls_q = self.posterior(torch.cat([feat, truth_n * tissue], dim=1), tissue)
            z = mu_q + torch.exp(ls_q) * torch.randn_like(mu_q)
            kl = (ls_p - ls_q + (torch.exp(2 * ls_q) + (mu_q - mu_p) ** 2) / (2 * torch.exp(2 * ls_p)) - 0.5
                  ).sum(1).mean()
        else:
            z = mu_p + torch.exp(ls_p) * torch.randn_like(mu_p)
        out = self._outputs(self._raw(self._unet(feat), z), batch)
        out["kl"] = kl
        return out

    @torch.no_grad()
    def predict(self, batch, n_samples: int = 0):
        """Mean over latent draws; SD^2 = variance over the draws + the mean Laplace variance (2 b^2)."""
        n = int(n_samples or self.config["n_samples"])
        feat = self._features(batch)
        mu_p, ls_p = self.prior(feat, batch["tissue"])
        d1 = self._unet(feat)
        draws = [self._outputs(self._raw(d1, mu_p + torch.exp(ls_p) * torch.randn_like(mu_p)), batch)
                 for _ in range(n)]
        locations = torch.stack([d["mean_n"] for d in draws])
        variance = _spread(locations) + torch.stack([2.0 * d["scale_n"] ** 2 for d in draws]).mean(0)
        up = upper_like(locations[0], 1)
        return locations.mean(0) * up, calibrated_sd(variance.sqrt().clamp_min(MIN_SCALE_N) * up, self.config)


SLICE_NETWORKS = {"ulas_cnn": ConditionedUlasCNN, "fcsa_net": ConditionedFCSANet, "tcn_punet": ConditionedTCNProbUNet}
