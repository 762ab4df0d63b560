"""Image-only mode's input-function reader: where in the slice (or volume) is blood, and how much.

Per-pixel descriptors are computed by code (``pixel_descriptors``: baseline signal over the slice's
median, the inflow flag; peak relative enhancement; time to peak and first moment after the slice's
earliest arrival; late / peak ratio; CNR; the relative-enhancement curve on 32 coarse points), and
each pixel's curve is converted with a nominal blood T10 onto the canonical 4 s grid. A small network
(1x1 convolutions, then three 3x3 convolutions of dilation 1, 2, 4 for context: the role of the
published networks' global pathway) gives one attention logit per pixel; a softmax over the body's
pixels gives the weights, and the input function's shape is the weighted mean of the pixels' blood
curves. An amplitude head corrects its scale (partial volume and inflow lower it) from the weighted
mean of the descriptors, with a log-amplitude SD. The reader's curve then feeds the AIF-conditioned
networks exactly as an input function given by the user.
"""

from typing import Dict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import canonical_grid as cg
from .input_definitions import COARSE_POINTS, DESCRIPTORS, NOMINAL_BLOOD_T10_S, READER_INPUT, SCALARS  # noqa: F401


def pixel_descriptors(signal, times_s, baseline_frames: int, fa_deg, tr_s, r1_per_mM_s) -> Dict[str, np.ndarray]:
    """For pixels (N, T) of one slice: descriptors (N, DESCRIPTORS) float32 and blood curves (N, G) on
    the canonical grid (mM, nominal blood T10), with the grid mask (G,)."""
    sig = np.asarray(signal, dtype=np.float64)
    t = np.asarray(times_s, dtype=np.float64) - times_s[0]
    s0 = np.maximum(sig[:, :baseline_frames].mean(1), 1e-9)
    re = sig / s0[:, None] - 1.0
    peak_at = baseline_frames + np.argmax(re[:, baseline_frames:], axis=1)
    peak = re[np.arange(len(re)), peak_at]
    noise = np.maximum(1.4826 * np.median(np.abs(np.diff(re, axis=1)), axis=1) / np.sqrt(2.0), 1e-6)
    positive = np.clip(re[:, baseline_frames:], 0.0, None)
    moment = (positive * t[baseline_frames:]).sum(1) / np.maximum(positive.sum(1), 1e-9)
    earliest = np.percentile(t[peak_at], 5)
    late = re[:, -max(1, re.shape[1] // 10):].mean(1) / np.maximum(peak, 1e-6)
    edges = np.linspace(0, re.shape[1], COARSE_POINTS + 1).astype(int)
    coarse = np.add.reduceat(re, edges[:-1], axis=1) / np.maximum(np.diff(edges), 1)[None]
    scalars = np.column_stack([np.log(s0 / np.median(s0)), np.arcsinh(peak), (t[peak_at] - earliest) / 60.0,
                               (moment - earliest) / 60.0, np.clip(late, -2, 2), np.log(np.maximum(peak, 1e-6) / noise)])
    canonical = cg.to_canonical(sig, times_s, baseline_frames, fa_deg=fa_deg, tr_s=tr_s, t10_s=NOMINAL_BLOOD_T10_S,
                                r1_per_mM_s=r1_per_mM_s)
    return {"descriptors": np.column_stack([scalars, np.arcsinh(coarse)]).astype(np.float32),
            "curves": canonical.curves, "valid": canonical.valid}


class AifReader(nn.Module):
    """descriptors (B, D, H, W), curves (B, G, H, W), body (B, 1, H, W) -> blood input function (B, G)
    and its log-amplitude SD (B,)."""

    kind = "slice"
    default_config = {"mode": "aif_reader", "channels": 32, "hidden": 32}

    def __init__(self, config: Dict = None):
        super().__init__()
        self.config = {**self.default_config, **(config or {})}
        c = self.config["channels"]
        self.register_buffer("descriptor_mean", torch.zeros(DESCRIPTORS))
        self.register_buffer("descriptor_scale", torch.ones(DESCRIPTORS))
        self.embed = nn.Sequential(nn.Conv2d(DESCRIPTORS, c, 1), nn.GELU(), nn.Conv2d(c, c, 1), nn.GELU())
        self.context = nn.ModuleList(nn.Conv2d(c, c, 3, padding=d, dilation=d) for d in (1, 2, 4))
        self.logit = nn.Conv2d(c, 1, 1)
        h = self.config["hidden"]
        self.amplitude = nn.Sequential(nn.Linear(DESCRIPTORS, h), nn.GELU(), nn.Linear(h, 2))

    def set_standardisation(self, descriptors: torch.Tensor) -> None:
        self.descriptor_mean.copy_(descriptors.mean(0))
        self.descriptor_scale.copy_(descriptors.std(0).clamp_min(1e-3))

    def logits(self, descriptors, body):
        """(attention logits (B, HW), -1e9 outside the body; standardised descriptors (B, D, H, W))."""
        x = (descriptors - self.descriptor_mean[None, :, None, None]) / self.descriptor_scale[None, :, None, None]
        h = self.embed(x)
        for conv in self.context:
            h = h + F.gelu(conv(h))
        return self.logit(h).flatten(1).masked_fill(body.flatten(1) <= 0, -1e9), x

    def amplitude_corrected(self, shape, pooled):
        """(the input function: ``shape`` (B, G) rescaled by the amplitude head, its log-amplitude SD (B,))
        from the attention-weighted mean of the standardised descriptors ``pooled`` (B, D)."""
        log_scale, log_sd = self.amplitude(pooled).unbind(1)
        return shape * torch.exp(log_scale)[:, None], F.softplus(log_sd) + 1e-3

    def forward(self, descriptors, curves, body):
        logits, x = self.logits(descriptors, body)
        weights = torch.softmax(logits, dim=1)                                   # (B, HW)
        shape = torch.einsum("bn,bgn->bg", weights, curves.flatten(2))
        pooled = torch.einsum("bn,bdn->bd", weights, x.flatten(2))
        return self.amplitude_corrected(shape, pooled)


def reader_loss(predicted, log_sd, truth, valid, first_pass_weight: float = 2.0):
    """Relative squared error of the curve on the valid grid points, the first pass (the points up to
    twice the true peak's time) weighted more, plus a Gaussian NLL of the log-amplitude error."""
    g = torch.arange(truth.shape[1], device=truth.device)[None]
    peak = truth.argmax(1, keepdim=True)
    weight = valid * (1.0 + first_pass_weight * (g <= 2 * peak + 2))
    scale = (truth ** 2 * weight).sum(1) / weight.sum(1).clamp_min(1)
    curve = ((predicted - truth) ** 2 * weight).sum(1) / weight.sum(1).clamp_min(1) / scale.clamp_min(1e-6)
    log_ratio = torch.log((predicted * weight).sum(1).clamp_min(1e-6) / (truth * weight).sum(1).clamp_min(1e-6))
    nll = torch.log(log_sd) + 0.5 * (log_ratio.detach() / log_sd) ** 2
    return (curve + 0.1 * nll).mean()
