"""The four inference networks, selectable by name with a config dict (``build_network``).

All take the canonical input of ``canonical_grid`` (tissue concentration on a fixed 4 s grid,
a grid validity mask, per-voxel noise and temporal-resolution scalars), so any frame count /
frame times work and no AIF is needed. All output Ktrans, ve, vp through a sigmoid scaled to
``PARAM_UPPER`` (bounded activations; kep = Ktrans / ve is derived in ``inference``) and a 1-SD uncertainty in the same
units:

* ``hetero_encoder`` (after Hess et al.): voxel-wise strided 1-D conv encoder, heteroscedastic
  Laplace or Gaussian NLL head (optionally beta-NLL, ``nll_beta``) -> mean + aleatoric SD; a
  small ensemble (members trained jointly from different initialisations) adds epistemic
  spread: var = mean(aleatoric var) + var(member means). The shipped model: Gaussian, beta 1.
* ``ulas_cnn`` (after Ulas et al. 2019): 2-D CNN, grid frames as channels, a local pathway
  (3x3 convs) and a global pathway (dilated 3x3 convs, dilation 2/4/8) fused by 1x1 convs;
  trained with a parameter loss plus the tracer-kinetic loss on concentration (``training``).
  Uncertainty: an added Gaussian variance head trained by NLL (documented deviation: the
  paper gives no uncertainty); with ``aleatoric_head`` (the shipped model) it has a hidden layer
  of its own instead of sharing the output layer with the mean.
* ``fcsa_net`` (after Zeng & Zhou): frame attention (per-frame weights from the slice's mean
  curve), then conv blocks with channel (squeeze-excitation) and spatial attention (CBAM
  style). Uncertainty: added Gaussian variance head (NLL), as for ``ulas_cnn``.
* ``tcn_punet`` (after Lyoo et al. 2025): per-voxel temporal convolutional network (dilated
  residual 1-D convs) -> feature map -> small U-Net over the slice, with a probabilistic
  U-Net latent (prior net from the image, posterior net from image + truth in training, KL
  term). The mean comes from ``n_samples`` latent draws from the prior. With ``aleatoric_head``
  (the shipped model; a documented addition to the paper) a Gaussian variance head on the U-Net
  output, trained by NLL, adds the per-voxel noise: SD^2 = variance over the draws + aleatoric
  variance. The draws alone (one global latent per slice) under-disperse and do not rank the
  voxels' errors.

Every network's SD is finally multiplied by per-parameter factors fitted after training on a
separate held-out simulated set (``training.calibrate_sd``, recorded in the card).

Internally parameters are normalised by ``PARAM_UPPER`` (values in [0, 1]); the ``predict``
methods return physical units (Ktrans 1/min, ve and vp fractions).
"""

import math
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from DCEPKFittingLib.core.errors import DCEPKInputError

from ..data.canonical_grid import GRID_POINTS, N_PROTOCOL

PARAM_NAMES = ("Ktrans", "ve", "vp")
PARAM_UNITS = ("1/min", "fraction", "fraction")
# Output bounds: a little above the simulator's ranges so the sigmoid never saturates on truth.
PARAM_UPPER = (1.6, 1.0, 0.35)
MIN_SCALE = 1e-3   # normalised units; keeps the NLL finite


def compress(curves: torch.Tensor) -> torch.Tensor:
    """asinh of the concentration / 0.5 mM: linear over tissue values, logarithmic for
    vessel-like ones (up to ~30 mM), so no input dominates the first layer.

    Written as sign(x) log(a + sqrt(a^2 + 1)) with x = curves / 0.5 and a = |x|, in place on two
    buffers: asinh(x) within 5e-7 (absolute; the log of ~1 + a loses only relative precision for
    tiny a, which a network input does not need) and ~4x faster than torch.asinh on CPU, where
    a new slice-sized tensor costs more than the arithmetic."""
    if curves.requires_grad and torch.is_grad_enabled():   # training through frame attention
        return torch.asinh(curves / 0.5)
    a = torch.mul(curves, 2.0).abs_()
    return torch.mul(a, a).add_(1.0).sqrt_().add_(a).log_().copysign_(curves)


def _upper(like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[channel_dim] = 3
    return torch.tensor(PARAM_UPPER, dtype=like.dtype, device=like.device).view(shape)


def _heads(raw: torch.Tensor, dim: int):
    """Split 6 raw channels into bounded mean (0..1) and positive scale (normalised units)."""
    mean_logit, scale_raw = torch.split(raw, 3, dim=dim)
    return torch.sigmoid(mean_logit), F.softplus(scale_raw) + MIN_SCALE


def nll(target_n, mean_n, scale_n, kind: str = "laplace", weight=None, beta: float = 0.0):
    """Mean negative log-likelihood of normalised targets under Laplace(b) or Gaussian(sigma).

    ``beta`` > 0 (Gaussian only): beta-NLL of Seitzer et al. 2022, each term weighted by the
    detached sigma^(2 beta). Plain NLL lets the mean ignore the voxels it finds uncertain (large
    Ktrans, where the unknown AIF amplitude dominates) although they carry most of the RMSE;
    beta = 1 gives the mean the gradient of a squared error, the mean of the predictive
    distribution rather than its median, while sigma still learns the spread."""
    if kind == "laplace":
        if beta:
            raise DCEPKInputError("nll_beta applies to the gaussian likelihood only")
        value = torch.log(2 * scale_n) + (target_n - mean_n).abs() / scale_n
    elif kind == "gaussian":
        value = torch.log(scale_n) + 0.5 * ((target_n - mean_n) / scale_n) ** 2 + 0.5 * math.log(2 * math.pi)
        if beta:
            value = value * scale_n.detach() ** (2.0 * beta)
    else:
        raise DCEPKInputError(f"unknown likelihood {kind!r}: use 'laplace' or 'gaussian'")
    if weight is not None:
        return (value * weight).sum() / (weight.sum() * value.shape[1] / weight.shape[1]).clamp_min(1)
    return value.mean()


# Every network's SD is multiplied by per-parameter factors fitted after training on a held-out
# simulated set (``training.calibrate_sd``, recorded in the card): variance scaling, so the 90 %
# interval covers 90 % of that set whatever the network's raw spread.
SD_CALIBRATION = {"calibrate_sd": True, "sd_scale": [1.0, 1.0, 1.0]}


def calibrated_sd(sd, config: Dict, channel_dim: int = 1):
    shape = [1] * sd.dim()
    shape[channel_dim] = 3
    factors = config.get("sd_scale", SD_CALIBRATION["sd_scale"])
    return sd * torch.tensor(factors, dtype=sd.dtype, device=sd.device).view(shape)


def scale_to_sd(scale_n, kind: str):
    """1-SD of the likelihood from its scale: Laplace SD = sqrt(2) b, Gaussian SD = sigma."""
    return scale_n * math.sqrt(2.0) if kind == "laplace" else scale_n


def _spread(x):
    """Population variance over the first axis (ensemble members, latent draws), written out:
    ``Tensor.var(0)`` over a short first axis is ~100x slower on CPU."""
    return (x - x.mean(0)).square().mean(0)


def in_cache_blocks(fn, block_voxels: int, *tensors):
    """``fn`` over blocks of ``block_voxels`` rows of the tensors, outputs concatenated: the same
    maths. On CPU a block's intermediates stay in the cache, which made the voxel networks 1.5-3x
    faster than one pass over a slice's 65 k voxels (memory-bound small layers); a GPU gets one pass."""
    n = tensors[0].shape[0]
    if tensors[0].device.type != "cpu" or n <= block_voxels:
        return fn(*tensors)
    outs = [fn(*(t[s:s + block_voxels] for t in tensors)) for s in range(0, n, block_voxels)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


# ------------------------------------------------------------------------------- voxel-wise
class _PatchEmbed(nn.Module):
    """Stride-``p`` temporal patches -> channels, i.e. a Conv1d(2, c, p, stride=p) written as a
    Linear on (N, T/p, 2p): the same maths, several times faster on CPU for millions of voxels."""

    PATCH = 4

    def __init__(self, c: int):
        super().__init__()
        self.linear = nn.Linear(2 * self.PATCH, c)

    @classmethod
    def inputs(cls, curves, valid):
        """(N, G), (N, G) -> (N, G/p, 2p): computed once and shared by every ensemble member."""
        n, g = curves.shape
        return torch.stack([compress(curves) * valid, valid], dim=-1).view(n, g // cls.PATCH, 2 * cls.PATCH)

    @classmethod
    def used_patches(cls, valid):
        """For one grid mask shared by all voxels (G,): bool (G/p,) of the patches with a valid point,
        else None. The other patches' input is all zeros, so their embedding is a constant."""
        if valid.dim() != 1:
            return None
        used = valid.view(-1, cls.PATCH).amax(1) > 0
        return None if bool(used.all()) else used

    def forward(self, x):
        return F.gelu(self.linear(x))                                      # (N, G/p, c)


class _VoxelEncoder(nn.Module):
    """One ensemble member: temporal patch embedding (4 grid points = 16 s) then an MLP over the
    whole embedded curve with the protocol scalars (~80 k multiply-adds per voxel)."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.embed = _PatchEmbed(width)
        flat = width * (GRID_POINTS // 4)
        self.mlp = nn.Sequential(nn.Linear(flat + N_PROTOCOL, 2 * hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 6))

    def first_layer(self, used_patches=None):
        """The MLP's first layer split for [embedded curve, protocol] inputs: (w_curve, w_protocol,
        bias), applied as two products (the same maths without copying millions of rows). With
        ``used_patches`` w_curve keeps only their columns: the embedding of an unused patch (no valid
        point) is gelu(bias) for every voxel, so its share of the layer joins the bias."""
        first = self.mlp[0]
        width = self.embed.linear.out_features
        w_curve = first.weight[:, :width * (GRID_POINTS // _PatchEmbed.PATCH)]
        w_protocol, bias = first.weight[:, w_curve.shape[1]:], first.bias
        if used_patches is not None:
            w_curve = w_curve.view(first.out_features, -1, width)
            bias = bias + w_curve[:, ~used_patches].flatten(1) @ F.gelu(self.embed.linear.bias).repeat(
                int((~used_patches).sum()))
            w_curve = w_curve[:, used_patches].flatten(1)
        return w_curve, w_protocol, bias

    def forward(self, x, protocol, used_patches=None, first_layer=None):
        """x (N, G/p, 2p), or only the ``used_patches`` of it; ``first_layer``: this member's
        ``first_layer(used_patches)``, computed once for all blocks of a volume."""
        w_curve, w_protocol, bias = first_layer or self.first_layer(used_patches)
        z = F.linear(self.embed(x).flatten(1), w_curve) + F.linear(protocol, w_protocol, bias)
        return _heads(self.mlp[1:](z), dim=1)


class HeteroEncoder(nn.Module):
    kind = "voxel"
    default_config = {"width": 16, "hidden": 64, "members": 3, "likelihood": "laplace", "nll_beta": 0.0,
                      "dropout": 0.0, **SD_CALIBRATION}

    def __init__(self, config: Dict):
        super().__init__()
        self.config = {**self.default_config, **config}
        self.likelihood = self.config["likelihood"]
        self.members = nn.ModuleList(_VoxelEncoder(self.config["width"], self.config["hidden"],
                                                   self.config["dropout"])
                                     for _ in range(int(self.config["members"])))

    def forward(self, curves, valid, protocol, first_layers=None):
        """curves (N, G), valid (N, G) or (G,), protocol (N, P) -> list of (mean_n, scale_n) (N, 3).
        ``first_layers``: the members' ``first_layer`` for this ``valid``, if already computed."""
        used = _PatchEmbed.used_patches(valid)
        if used is not None:   # inference on one protocol: skip the grid beyond the acquired span
            points = used.repeat_interleave(_PatchEmbed.PATCH)
            curves, valid = curves[:, points], valid[points]
        x = _PatchEmbed.inputs(curves, valid.expand_as(curves))
        first_layers = first_layers or [None] * len(self.members)
        return [member(x, protocol, used, first) for member, first in zip(self.members, first_layers)]

    def loss(self, outputs, target_n, batch=None):
        beta = float(self.config["nll_beta"])
        return sum(nll(target_n, m, s, self.likelihood, beta=beta) for m, s in outputs) / len(outputs)

    CPU_BLOCK_VOXELS = 4096     # ~5 MB of embedded curves per block (fastest on 2 cores)

    @torch.no_grad()
    def predict(self, curves, valid, protocol, n_samples: int = 0):
        if valid.dim() == 1:    # one grid mask for all voxels: the folded first layers serve every block
            used = _PatchEmbed.used_patches(valid)
            first_layers = [member.first_layer(used) for member in self.members]
            return in_cache_blocks(lambda c, p: self._predict(c, valid, p, first_layers), self.CPU_BLOCK_VOXELS,
                                   curves, protocol)
        return in_cache_blocks(self._predict, self.CPU_BLOCK_VOXELS, curves, valid, protocol)

    def _predict(self, curves, valid, protocol, first_layers=None):
        outputs = self.forward(curves, valid, protocol, first_layers)
        means = torch.stack([m for m, _ in outputs])                      # (M, N, 3)
        var_alea = torch.stack([scale_to_sd(s, self.likelihood) ** 2 for _, s in outputs]).mean(0)
        var_epi = _spread(means)
        up = _upper(means[0], 1)
        return means.mean(0) * up, calibrated_sd(torch.sqrt(var_alea + var_epi) * up, self.config)


# ------------------------------------------------------------------------------- 2-D helpers
class _ScaleHead(nn.Sequential):
    """Per-pixel Gaussian scale (normalised units, > 0) with a hidden layer of its own, trained by
    the NLL (``aleatoric_head``): the scale does not have to be read off features shaped by the
    mean's loss."""

    def __init__(self, c: int):
        super().__init__(nn.Conv2d(c, c, 1), nn.GELU(), nn.Conv2d(c, 3, 1))

    def forward(self, x):
        return F.softplus(super().forward(x)) + MIN_SCALE


def _used_prefix(used):
    """Number of grid points in ``used`` (G,) bool, the points valid in some slice of the batch, when
    they are a prefix (always for one series: 0 s to its last frame), else None."""
    n_used = int(used.sum())
    return n_used if bool(used[:n_used].all()) else None


class _Stem(nn.Module):
    """Grid frames (+ per-voxel scalars) as channels -> features; the grid validity mask (one per slice)
    enters as a learned per-channel bias, which costs nothing per pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(GRID_POINTS + N_PROTOCOL, channels, 1)
        self.valid_bias = nn.Linear(GRID_POINTS, channels, bias=False)

    def forward(self, curves, valid, protocol):
        # grid points invalid in every slice of the batch (beyond the acquired span) have input 0:
        # leaving them out of the 1x1 conv is the same maths and saves their asinh and products
        used = valid.amax(0) > 0
        weight = self.conv.weight
        n_used = _used_prefix(used)
        if n_used is not None and n_used < GRID_POINTS:
            # a view, not a copy (``curves`` may hold only these points already, see FCSANet)
            curves, weight = curves[:, :n_used], torch.cat([weight[:, :n_used], weight[:, GRID_POINTS:]], 1)
        elif n_used is None:
            curves, weight = curves[:, used], weight[:, torch.cat([used, used.new_ones(N_PROTOCOL)])]
        x = compress(curves)
        if not bool(valid[:, used].all()):   # else the mask multiplies by 1
            x = x * valid[:, used, None, None]
        x = torch.cat([x, protocol], dim=1)
        return F.gelu(F.conv2d(x, weight, self.conv.bias) + self.valid_bias(valid)[:, :, None, None])


def _slice_outputs(model, head, h):
    """Mean and scale maps of a 2-D network from its features ``h``; with ``aleatoric_head`` the scale
    comes from the dedicated ``model.scale_head`` (only the mean channels of ``head`` are computed)."""
    if not model.config["aleatoric_head"]:
        mean_n, scale_n = _heads(head(h), dim=1)
        return {"mean_n": mean_n, "scale_n": scale_n}
    last = head[-1]
    mean_logit = F.conv2d(head[:-1](h), last.weight[:3], last.bias[:3])
    return {"mean_n": torch.sigmoid(mean_logit), "scale_n": model.scale_head(h)}


def _masked_mean(x, tissue):
    """Spatial mean over tissue pixels: (B, C, H, W), (B, 1, H, W) -> (B, C). A batched
    matrix-vector product in either memory layout: no image-sized temporary."""
    b, c = x.shape[:2]
    weights = tissue.reshape(b, 1, -1)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        total = torch.bmm(weights, x.permute(0, 2, 3, 1).reshape(b, -1, c))[:, 0]
    else:
        total = torch.bmm(x.reshape(b, c, -1), weights.transpose(1, 2))[..., 0]
    return total / tissue.sum((2, 3)).clamp_min(1.0)


def local_and_global_pathways(channels: int, fuse: int):
    """ulas_cnn's local pathway (three 3x3 convolutions), global pathway (dilations 2, 4, 8) and the 1x1
    fusion of both into 6 channels (3 means, 3 scales)."""
    c = channels
    local = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(c, c, 3, padding=1), nn.GELU())])
    dilated = nn.Sequential(*[m for d in (2, 4, 8) for m in (nn.Conv2d(c, c, 3, padding=d, dilation=d), nn.GELU())])
    return local, dilated, nn.Sequential(nn.Conv2d(2 * c, fuse, 1), nn.GELU(), nn.Conv2d(fuse, 6, 1))


class UlasCNN(nn.Module):
    kind = "slice"
    default_config = {"channels": 32, "fuse": 64, "tk_weight": 1.0, "param_weight": 1.0, "nll_weight": 0.5,
                      "aleatoric_head": False, **SD_CALIBRATION}

    def __init__(self, config: Dict):
        super().__init__()
        self.config = {**self.default_config, **config}
        c = self.config["channels"]
        self.stem = _Stem(c)
        self.local_path, self.global_path, self.fuse = local_and_global_pathways(c, self.config["fuse"])
        if self.config["aleatoric_head"]:   # replaces the fused scale channels (left unused: fine-tuned from them)
            self.scale_head = _ScaleHead(2 * c)

    def forward(self, curves, valid, protocol, tissue, truth_n=None):
        h = self.stem(curves, valid, protocol)
        h = torch.cat([self.local_path(h), self.global_path(h)], dim=1)
        return _slice_outputs(self, self.fuse, h)

    @torch.no_grad()
    def predict(self, curves, valid, protocol, tissue, n_samples: int = 0):
        out = self.forward(curves, valid, protocol, tissue)
        up = _upper(out["mean_n"], 1)
        return out["mean_n"] * up, calibrated_sd(out["scale_n"] * up, self.config)


class _CBAM(nn.Module):
    """Channel attention (squeeze-excitation on avg + max pool) then spatial attention."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, c // reduction), nn.GELU(), nn.Linear(c // reduction, c))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x, tissue):
        avg = _masked_mean(x, tissue)
        mx = (x - 1e4 * (1 - tissue)).amax((2, 3))
        x = x * torch.sigmoid(self.mlp(avg) + self.mlp(mx))[:, :, None, None]
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(s))


class FCSANet(nn.Module):
    kind = "slice"
    default_config = {"channels": 32, "blocks": 3, "param_weight": 1.0, "nll_weight": 0.5, "tk_weight": 0.0,
                      "aleatoric_head": False, **SD_CALIBRATION}

    def __init__(self, config: Dict):
        super().__init__()
        self.config = {**self.default_config, **config}
        c = self.config["channels"]
        # frame attention: weights per grid frame from the slice's mean tissue curve + validity
        self.frame_attention = nn.Sequential(nn.Linear(2 * GRID_POINTS, 64), nn.GELU(), nn.Linear(64, GRID_POINTS))
        self.stem = _Stem(c)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(self.config["blocks"]))
        self.attn = nn.ModuleList(_CBAM(c) for _ in range(self.config["blocks"]))
        self.head = nn.Sequential(nn.Conv2d(c, c, 1), nn.GELU(), nn.Conv2d(c, 6, 1))
        if self.config["aleatoric_head"]:   # replaces the head's scale channels (left unused: fine-tuned from them)
            self.scale_head = _ScaleHead(c)

    def forward(self, curves, valid, protocol, tissue, truth_n=None):
        mean_curve = _masked_mean(curves, tissue)
        weights = 2 * torch.sigmoid(self.frame_attention(torch.cat([mean_curve, valid], dim=1)))
        n_used = _used_prefix(valid.amax(0) > 0) or GRID_POINTS   # weighting the points beyond would give zeros
        h = self.stem(curves[:, :n_used] * weights[:, :n_used, None, None], valid, protocol)
        for conv, attn in zip(self.convs, self.attn):
            h = h + attn(F.gelu(conv(h)), tissue)
        return _slice_outputs(self, self.head, h)

    predict = UlasCNN.predict


class _TCN(nn.Module):
    """Per-voxel temporal conv net on (N, T, C): stride-4 patch embedding, dilated residual
    convolutions (kernel 3, dilation 1, 2, 4, ...), then a stride-4 merge and a projection to
    ``out`` features per voxel. Each dilated conv is one Linear c -> 3c (the three taps' products
    at once) whose parts are added shifted by -d, 0, +d with zero padding: the same maths as
    Conv1d, without copying millions of shifted rows, and fast on CPU."""

    def __init__(self, c: int, out: int, levels: int = 3):
        super().__init__()
        self.embed = _PatchEmbed(c)
        self.dilations = [2 ** i for i in range(levels)]
        self.blocks = nn.ModuleList(nn.Linear(3 * c, c) for _ in self.dilations)
        self.merge = nn.Linear(4 * c, c)
        self.out = nn.Linear(c * (GRID_POINTS // 16) + N_PROTOCOL, out)

    def forward(self, curves, valid, protocol):
        h = self.embed(_PatchEmbed.inputs(curves, valid))                 # (N, G/4, c)
        for d, block in zip(self.dilations, self.blocks):
            h = h + F.gelu(self._dilated(block, h, d))
        n, t, c = h.shape
        h = F.gelu(self.merge(h.reshape(n, t // 4, 4 * c))).flatten(1)
        return F.gelu(self.out(torch.cat([h, protocol], dim=1)))

    @staticmethod
    def _dilated(block: nn.Linear, h, d: int):
        """Kernel-3 conv of dilation d over the patch axis of h (N, T, c); ``block`` holds the taps
        as Linear(3c, c) on [h(t - d), h(t), h(t + d)] (its weight layout is kept for the shipped files)."""
        c = h.shape[-1]
        taps = F.linear(h, block.weight.view(c, 3, c).transpose(0, 1).reshape(3 * c, c))   # (N, T, 3c)
        out = taps[..., c:2 * c] + block.bias
        out[:, d:] += taps[:, :-d, :c]
        out[:, :-d] += taps[:, d:, 2 * c:]
        return out


def _conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1), nn.GELU())


class _LatentNet(nn.Module):
    """Conv encoder + tissue-masked global pooling -> Gaussian (mu, log sigma) of the latent."""

    def __init__(self, cin, c, latent):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1, stride=2),
                                  nn.GELU())
        self.out = nn.Linear(c, 2 * latent)

    def forward(self, x, tissue):
        h = self.conv(x)
        t = F.max_pool2d(tissue, 2, ceil_mode=True)[..., : h.shape[2], : h.shape[3]]
        mu, log_sigma = self.out(_masked_mean(h, t)).chunk(2, dim=1)
        return mu, log_sigma.clamp(-6, 3)


def two_level_unet(enc1, enc2, dec1, feat):
    """tcn_punet's U-Net: encode, pool by 2, encode, upsample (nearest) and decode the skip-joined pair."""
    e1 = enc1(feat)
    e2 = enc2(F.avg_pool2d(e1, 2, ceil_mode=True))
    up = F.interpolate(e2, size=e1.shape[2:], mode="nearest")
    return dec1(torch.cat([e1, up], dim=1))


class TCNProbUNet(nn.Module):
    kind = "slice"
    default_config = {"tcn_channels": 12, "tcn_levels": 3, "features": 16, "unet": 24, "latent": 6,
                      "beta_kl": 0.05, "n_samples": 8, "param_weight": 1.0, "tk_weight": 0.0,
                      "aleatoric_head": False, "nll_weight": 0.5, **SD_CALIBRATION}

    def __init__(self, config: Dict):
        super().__init__()
        self.config = {**self.default_config, **config}
        cfg = self.config
        f, u, z = cfg["features"], cfg["unet"], cfg["latent"]
        self.tcn = _TCN(cfg["tcn_channels"], f, cfg["tcn_levels"])
        self.enc1 = _conv_block(f, u)
        self.enc2 = _conv_block(u, 2 * u)
        self.dec1 = _conv_block(3 * u, u)
        self.prior = _LatentNet(f, u, z)
        self.posterior = _LatentNet(f + 3, u, z)
        self.head = nn.Sequential(nn.Conv2d(u + z, u, 1), nn.GELU(), nn.Conv2d(u, u, 1), nn.GELU(), nn.Conv2d(u, 3, 1))
        if cfg["aleatoric_head"]:   # per-voxel noise scale from the U-Net output
            self.scale_head = _ScaleHead(u)

    TCN_CPU_BLOCK_VOXELS = 1024   # ~5 MB of TCN activations per block (fastest on 2 cores)

    def features(self, curves, valid, protocol, tissue):
        b, g, h, w = curves.shape
        # the TCN runs on tissue voxels only (background is most of a volume), then scatters back
        inside = tissue[:, 0].reshape(-1) > 0
        xv = curves.permute(0, 2, 3, 1).reshape(-1, g)[inside]
        if b == 1:   # one grid mask for every voxel: a view, not a copied row per voxel
            vv = valid.expand(int(inside.sum()), g)
        else:
            vv = valid[:, None, None, :].expand(b, h, w, g).reshape(-1, g)[inside]
        pv = protocol.permute(0, 2, 3, 1).reshape(-1, protocol.shape[1])[inside]
        feat = curves.new_zeros(b * h * w, self.config["features"])
        if inside.any():
            feat[inside] = in_cache_blocks(self.tcn, self.TCN_CPU_BLOCK_VOXELS, xv, vv, pv)
        return feat.view(b, h, w, -1).permute(0, 3, 1, 2)

    def _unet(self, feat):
        return two_level_unet(self.enc1, self.enc2, self.dec1, feat)

    def _head(self, d1, z):
        """Bounded maps from the U-Net output and one latent draw per slice. The first 1x1 conv
        on [d1, z broadcast] is split into its d1 and z parts, so a new draw costs the 1x1 head
        only (the U-Net does not depend on z)."""
        first = self.head[0]
        u = d1.shape[1]
        h = F.conv2d(d1, first.weight[:, :u]) + (z @ first.weight[:, u:, 0, 0].T + first.bias)[:, :, None, None]
        return torch.sigmoid(self.head[1:](h))

    def forward(self, curves, valid, protocol, tissue, truth_n=None):
        feat = self.features(curves, valid, protocol, tissue)
        mu_p, ls_p = self.prior(feat, tissue)
        if truth_n is not None:  # training: sample from the posterior, KL to the prior
            mu_q, ls_q = self.posterior(torch.cat([feat, truth_n * tissue], dim=1), tissue)
            z = mu_q + torch.exp(ls_q) * torch.randn_like(mu_q)
            kl = (ls_p - ls_q + (torch.exp(2 * ls_q) + (mu_q - mu_p) ** 2) / (2 * torch.exp(2 * ls_p)) - 0.5).sum(1).mean()
        else:
            z = mu_p + torch.exp(ls_p) * torch.randn_like(mu_p)
            kl = torch.zeros((), device=curves.device)
        d1 = self._unet(feat)
        out = {"mean_n": self._head(d1, z), "kl": kl, "feat": feat, "prior": (mu_p, ls_p)}
        if self.config["aleatoric_head"]:
            out["scale_n"] = self.scale_head(d1)
        return out

    @torch.no_grad()
    def predict(self, curves, valid, protocol, tissue, n_samples: int = 0):
        n = int(n_samples or self.config["n_samples"])
        feat = self.features(curves, valid, protocol, tissue)
        mu_p, ls_p = self.prior(feat, tissue)
        d1 = self._unet(feat)
        samples = torch.stack([self._head(d1, mu_p + torch.exp(ls_p) * torch.randn_like(mu_p)) for _ in range(n)])
        up = _upper(samples[0], 1)
        # predictive variance = variance over the latent draws + the aleatoric variance (law of total
        # variance). The latent alone under-disperses (one global latent per slice) and does not rank
        # voxels; a floor keeps the SD > 0 where all draws agree and there is no aleatoric head
        var = _spread(samples)
        if self.config["aleatoric_head"]:
            var = var + self.scale_head(d1) ** 2
        sd = var.sqrt().clamp_min(MIN_SCALE) * up
        return samples.mean(0) * up, calibrated_sd(sd, self.config)


NETWORKS = {"hetero_encoder": HeteroEncoder, "ulas_cnn": UlasCNN, "fcsa_net": FCSANet, "tcn_punet": TCNProbUNet}


def network_class(name: str, config: Dict = None):
    """The class of network ``name`` in the config's ``mode`` (AIF-free by default, or "aif_conditioned");
    "aif_reader" is image-only mode's input-function reader."""
    if name == "aif_reader":
        from .aif_reader import AifReader
        return AifReader
    if name not in NETWORKS:
        raise DCEPKInputError(f"unknown network {name!r}: choose one of {sorted(NETWORKS)}")
    mode = (config or {}).get("mode")
    if mode in (None, "aif_free"):
        return NETWORKS[name]
    from .conditioned import CONDITIONED_NETWORKS, MODE   # those modules build on this one
    from .conditioned_slices import SLICE_NETWORKS
    classes = {**CONDITIONED_NETWORKS, **SLICE_NETWORKS}
    if mode != MODE or name not in classes:
        raise DCEPKInputError(f"network {name!r} has no mode {mode!r} (AIF-conditioned: {', '.join(sorted(classes))})")
    return classes[name]


def build_network(name: str, config: Dict = None) -> nn.Module:
    return network_class(name, config)(dict(config or {}))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
