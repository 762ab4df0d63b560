"""Simulated subjects encoded for the AIF-conditioned networks: training pools and the fixed sets.

A set is built from ``data.aif_conditioned.simulate_subject`` (one input function and protocol per
subject) and ``nn.aif_encoding.encode``; every voxel keeps its subject's index, the unit that the
bootstrap intervals resample (the voxels of one subject share its input function).

The sets and their seeds (section "Uncertainty calibrated on data not used to calibrate it" of the
design): training pools from ``[seed, chunk]``; validation (model choice, anchor band, early stop)
``VALIDATION``; SD calibration ``CALIBRATION``; the benchmark's test sets use the held-out families
and seeds 95xxxx (``Testing/Benchmarks/bench_inference.py``), never anything here.
"""

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch

from ..data import aif_conditioned as sim
from ..nn import aif_encoding
from .pools import RefreshedPool

VALIDATION = {"seed": 900001, "subjects": 96, "voxels_per_subject": 64}
CALIBRATION = {"seed": 900002, "subjects": 128, "voxels_per_subject": 64}


@dataclass
class EncodedSet:
    """Encoded voxels of several subjects (float32 tensors on ``device``) with their truth."""

    features: torch.Tensor        # (N, F)
    anchor: torch.Tensor          # (N, 3)
    posterior_sd: torch.Tensor    # (N, 3)
    params: torch.Tensor          # (N, 3) truth: Ktrans (1/min), ve, vp
    snr: torch.Tensor             # (N,)
    subject: torch.Tensor         # (N,) int64
    info: List[Dict] = field(default_factory=list)   # per subject: families, frames, baseline

    def __len__(self) -> int:
        return int(self.params.shape[0])

    def take(self, index) -> "EncodedSet":
        return EncodedSet(self.features[index], self.anchor[index], self.posterior_sd[index], self.params[index],
                          self.snr[index], self.subject[index], self.info)


def encode_subject(subject: sim.ConditionedSubject) -> aif_encoding.ProfileEncoding:
    basis = aif_encoding.series_basis(subject.times_s, subject.given_plasma_mM, subject.baseline_frames)
    return aif_encoding.encode(subject.conc_mM, basis, subject.noise_sd_mM)


def build_set(seed, n_subjects: int, voxels_per_subject: int, device="cpu", first_subject: int = 0,
              cancel=None, **simulate_kwargs) -> EncodedSet:
    """Subjects ``first_subject..`` of the set drawn from ``seed`` (a number or a sequence), each from
    its own generator ``[*seed, index]`` so that any part of a set can be rebuilt alone."""
    from DCEPKFittingLib.core.jobs import raise_if_cancelled
    parts = {k: [] for k in ("features", "anchor", "posterior_sd", "params", "snr", "subject")}
    info = []
    base = list(np.atleast_1d(seed).astype(int))
    for index in range(first_subject, first_subject + n_subjects):
        raise_if_cancelled(cancel)
        rng = np.random.default_rng(base + [index])
        subject = sim.simulate_subject(rng, voxels_per_subject, **simulate_kwargs)
        encoded = encode_subject(subject)
        parts["features"].append(encoded.features)
        parts["anchor"].append(encoded.anchor)
        parts["posterior_sd"].append(encoded.posterior_sd)
        parts["params"].append(torch.as_tensor(subject.params, dtype=torch.float32))
        parts["snr"].append(torch.as_tensor(subject.snr, dtype=torch.float32))
        parts["subject"].append(torch.full((voxels_per_subject,), index, dtype=torch.int64))
        info.append({"aif_family": subject.aif_family, "protocol_family": subject.protocol_family,
                     "frames": int(subject.times_s.size), "baseline_frames": subject.baseline_frames,
                     "true_baseline_frames": subject.true_baseline_frames, "delay_s": subject.delay_s})
    out = {k: torch.cat(v).to(device) for k, v in parts.items()}
    return EncodedSet(**out, info=info)


def fixed_set(which: Dict, device="cpu") -> EncodedSet:
    """The validation or calibration set: training families and protocols, the training SNR law, no
    baseline jitter or measured-like input functions (those are training augmentations)."""
    return build_set(which["seed"], which["subjects"], which["voxels_per_subject"], device, training=False)


FIELDS = ("features", "anchor", "posterior_sd", "params", "snr", "subject")


def voxel_pool(seed: int, training: Dict, device="cpu", cancel=None) -> RefreshedPool:
    """Encoded training subjects, ``refresh_subjects`` new ones every ``refresh_every`` steps (``pools``)."""
    per_chunk, voxels = int(training["refresh_subjects"]), int(training["voxels_per_subject"])

    def chunk(index: int) -> Dict[str, torch.Tensor]:
        built = build_set([int(seed), 7], per_chunk, voxels, device, first_subject=index * per_chunk, cancel=cancel)
        return {name: getattr(built, name) for name in FIELDS}

    return RefreshedPool(chunk, int(training["pool_subjects"]) // per_chunk, int(training["refresh_every"]))


def as_set(data: Dict[str, torch.Tensor]) -> EncodedSet:
    return EncodedSet(**{name: data[name] for name in FIELDS})
