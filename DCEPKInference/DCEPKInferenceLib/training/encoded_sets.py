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
from typing import Dict, List, Optional

import numpy as np
import torch

from ..data import aif_conditioned as sim
from ..nn import aif_encoding

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


class TrainingPool:
    """A pool of encoded training subjects from which batches of voxels are drawn, refreshed by
    ``refresh_subjects`` new subjects every ``refresh_every`` steps (fresh data through a long run).

    Deterministic: the pool's contents at step s depend only on (seed, s), so a resumed run rebuilds
    exactly the pool it stopped with (``at_step``)."""

    def __init__(self, seed: int, training: Dict, device="cpu", log=None, cancel=None):
        self.seed, self.device, self.log, self.cancel = int(seed), device, log, cancel
        self.subjects = int(training["pool_subjects"])
        self.voxels = int(training["voxels_per_subject"])
        self.refresh_every = int(training["refresh_every"])
        self.refresh_subjects = int(training["refresh_subjects"])
        self.chunks = self.subjects // self.refresh_subjects
        self.data: Optional[EncodedSet] = None
        self.built_chunk = -1

    def _chunk(self, chunk: int) -> EncodedSet:
        return build_set([self.seed, 7], self.refresh_subjects, self.voxels, self.device,
                         first_subject=chunk * self.refresh_subjects, cancel=self.cancel)

    def at_step(self, step: int) -> EncodedSet:
        """The pool as of ``step``: chunks 0..chunks-1 to start, then chunk c >= chunks replaces the
        slot c % chunks at step (c - chunks + 1) * refresh_every."""
        latest = self.chunks - 1 + step // self.refresh_every
        if self.data is None or latest < self.built_chunk:
            slots = [None] * self.chunks
            for chunk in range(max(latest - self.chunks + 1, 0), latest + 1):
                slots[chunk % self.chunks] = self._chunk(chunk)
            self._assemble(slots)
        else:
            for chunk in range(self.built_chunk + 1, latest + 1):
                self._replace(chunk % self.chunks, self._chunk(chunk))
        self.built_chunk = latest
        return self.data

    def _assemble(self, slots: List[EncodedSet]) -> None:
        self.data = EncodedSet(*(torch.cat([getattr(s, name) for s in slots]) for name in
                                 ("features", "anchor", "posterior_sd", "params", "snr", "subject")))

    def _replace(self, slot: int, chunk: EncodedSet) -> None:
        rows = slice(slot * len(chunk), (slot + 1) * len(chunk))
        for name in ("features", "anchor", "posterior_sd", "params", "snr", "subject"):
            getattr(self.data, name)[rows] = getattr(chunk, name)
        if self.log:
            print(f"pool: slot {slot} refreshed", file=self.log, flush=True)

    def batch(self, rng, size: int) -> EncodedSet:
        return self.data.take(torch.as_tensor(rng.integers(0, len(self.data), size)))
