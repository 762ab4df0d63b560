"""Simulated textured patches encoded for the AIF-conditioned 2-D networks, and the batches they train on.

Each patch is one subject (``data.aif_conditioned.simulate_patch``); its pixels are encoded as the
voxel network's are (``nn.aif_encoding``), and, for the networks with a temporal stream, their
[tissue, input function, residual of the anchor's fit] curves are put on the canonical 4 s grid
(``data.canonical_grid``). Stored as float16 (memory: a 32x32 patch with its stream is ~1 MB).
Seeds: training pools ``[seed, 8, index]``; validation 900011 and calibration 900012 (training families).
"""

from typing import Dict, List

import numpy as np
import torch

from DCEPKFittingLib.core.jobs import raise_if_cancelled
from DCEPKFittingLib.kinetics import tk_models

from ..data import aif_conditioned as sim
from ..data import canonical_grid as cg
from ..nn import aif_encoding
from .pools import RefreshedPool

PATCH_VALIDATION = {"seed": 900011, "patches": 48, "size": 32}
PATCH_CALIBRATION = {"seed": 900012, "patches": 64, "size": 32}
FIELDS = ("encoding", "anchor", "posterior_sd", "params", "stream", "valid", "cp_grid", "tissue", "snr")


def encode_patch(subject: sim.ConditionedSubject, size: int, with_stream: bool) -> Dict[str, np.ndarray]:
    """One patch's network inputs (channels first, H = W = ``size``)."""
    basis = aif_encoding.series_basis(subject.times_s, subject.given_plasma_mM, subject.baseline_frames)
    encoded = aif_encoding.encode(subject.conc_mM, basis, subject.noise_sd_mM)
    image = lambda a: np.ascontiguousarray(np.asarray(a).T.reshape(-1, size, size))  # noqa: E731  (N, C)
    w, valid = cg.resampling_matrix(subject.times_s)
    out = {"encoding": image(encoded.features.numpy()).astype(np.float16), "anchor": image(encoded.anchor.numpy()),
           "posterior_sd": image(encoded.posterior_sd.numpy()), "valid": valid.astype(np.float32),
           "cp_grid": (w @ subject.given_plasma_mM).astype(np.float32),
           "tissue": np.ones((1, size, size), np.float32), "snr": image(subject.snr[:, None])[0]}
    if with_stream:
        fitted = tk_models.concentration("etofts", encoded.anchor.numpy().astype(np.float64), subject.times_s,
                                         subject.given_plasma_mM)
        curves = np.stack([subject.conc_mM, np.broadcast_to(subject.given_plasma_mM, subject.conc_mM.shape),
                           subject.conc_mM - fitted])                                   # (3, N, T)
        grid = curves @ w.T                                                             # (3, N, G)
        out["stream"] = np.ascontiguousarray(grid.transpose(0, 2, 1).reshape(3, -1, size, size)).astype(np.float16)
    return out


def build_patches(seed, n_patches: int, size: int, with_stream: bool, first: int = 0, cancel=None,
                  **simulate_kwargs) -> Dict[str, torch.Tensor]:
    """Patches ``first..`` of the set drawn from ``seed`` (a number or sequence), stacked on a batch axis."""
    parts: Dict[str, List[np.ndarray]] = {}
    base = list(np.atleast_1d(seed).astype(int))
    for index in range(first, first + n_patches):
        raise_if_cancelled(cancel)
        subject, maps = sim.simulate_patch(np.random.default_rng(base + [index]), size, **simulate_kwargs)
        patch = encode_patch(subject, size, with_stream)
        patch["params"] = maps.astype(np.float32)
        for key, value in patch.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.from_numpy(np.stack(values)) for key, values in parts.items()}


def fixed_patches(which: Dict, with_stream: bool) -> Dict[str, torch.Tensor]:
    return build_patches(which["seed"], which["patches"], which["size"], with_stream, training=False)


def as_float(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=torch.float32) for k, v in batch.items()}


def patch_pool(seed: int, training: Dict, with_stream: bool, cancel=None) -> RefreshedPool:
    """Training patches, ``refresh_patches`` new ones every ``refresh_every`` steps (``pools``)."""
    per_chunk, size = int(training["refresh_patches"]), int(training["patch_size"])
    return RefreshedPool(lambda chunk: build_patches([int(seed), 8], per_chunk, size, with_stream, first=chunk * per_chunk,
                                                     cancel=cancel),
                         int(training["pool_patches"]) // per_chunk, int(training["refresh_every"]))
