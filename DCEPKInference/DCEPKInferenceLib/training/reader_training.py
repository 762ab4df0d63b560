"""Training the image-only input-function reader (``nn.aif_reader``) on simulated slices with vessels
(``data.vessel_slices``): a task for ``trainer.train`` (checkpoints, resume, time budget as every
network). Slices are 64 x 64 (the reader is convolutional: it reads larger slices and volumes at
inference); the loss compares its plasma curve with the slice's true one on the canonical grid.
Validation: slices of seed 900041 (training families); the card records the median relative error of
the curve's area and peak there."""

from typing import Dict, List

import numpy as np
import torch

from DCEPKFittingLib.core.jobs import raise_if_cancelled

from ..data import canonical_grid as cg
from ..data.vessel_slices import SLICE_RANGES, simulate_vessel_slice
from ..nn.aif_reader import READER_INPUT, pixel_descriptors, reader_loss
from .pools import RefreshedPool

READER_VALIDATION = {"seed": 900041, "slices": 32, "size": 64}
READER = "aif_reader"


def encode_slice(slice_) -> Dict[str, np.ndarray]:
    size = slice_.signal.shape[0]
    found = pixel_descriptors(slice_.signal.reshape(-1, slice_.times_s.size), slice_.times_s, slice_.baseline_frames,
                              slice_.fa_deg, slice_.tr_s, slice_.r1_per_mM_s)
    w, _ = cg.resampling_matrix(slice_.times_s)
    image = lambda a: np.ascontiguousarray(a.T.reshape(-1, size, size)).astype(np.float16)  # noqa: E731
    return {"descriptors": image(found["descriptors"]), "curves": image(found["curves"]),
            "valid": found["valid"].astype(np.float32), "truth": (w @ slice_.plasma_mM).astype(np.float32),
            "body": np.ones((1, size, size), np.float32)}


def build_slices(seed, count: int, size: int, first: int = 0, cancel=None, **kwargs) -> Dict[str, torch.Tensor]:
    parts: Dict[str, List[np.ndarray]] = {}
    for index in range(first, first + count):
        raise_if_cancelled(cancel)
        encoded = encode_slice(simulate_vessel_slice(np.random.default_rng(list(np.atleast_1d(seed)) + [index]),
                                                     size, **kwargs))
        for key, value in encoded.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.from_numpy(np.stack(values)) for key, values in parts.items()}


def _float(batch):
    return {k: v.to(torch.float32) for k, v in batch.items()}


@torch.no_grad()
def read_slices(model, data) -> np.ndarray:
    model.eval()
    batch = _float(data)
    predicted, _ = model(batch["descriptors"], batch["curves"], batch["body"])
    return predicted.numpy()


def curve_errors(predicted, data) -> Dict[str, float]:
    truth, valid = data["truth"].numpy(), data["valid"].numpy()
    area = (predicted * valid).sum(1) / (truth * valid).sum(1) - 1.0
    peak = predicted.max(1) / truth.max(1) - 1.0
    return {"median_abs_area_error": float(np.median(np.abs(area))), "median_area_bias": float(np.median(area)),
            "median_abs_peak_error": float(np.median(np.abs(peak)))}


class ReaderTask:
    mode = READER

    def __init__(self, model, training, device, cancel=None):
        self.model, self.training = model, training
        per_chunk, size = int(training["refresh_slices"]), int(training["slice_size"])
        self.pool = RefreshedPool(lambda chunk: build_slices([int(training["seed"]), 9], per_chunk, size,
                                                             first=chunk * per_chunk, cancel=cancel),
                                  int(training["pool_slices"]) // per_chunk, int(training["refresh_every"]))
        self.validation = build_slices(READER_VALIDATION["seed"], READER_VALIDATION["slices"],
                                       READER_VALIDATION["size"])

    def prepare(self, start_step: int, fresh: bool) -> None:
        data = self.pool.at_step(start_step)
        if fresh:
            d = data["descriptors"][:32].to(torch.float32)
            self.model.set_standardisation(d.permute(0, 2, 3, 1).reshape(-1, d.shape[1]))

    def batch(self, step: int, rng):
        self.pool.at_step(step)
        return _float(self.pool.batch(rng, int(self.training["slices_per_batch"])))

    def loss(self, batch, generator):
        predicted, log_sd = self.model(batch["descriptors"], batch["curves"], batch["body"])
        return reader_loss(predicted, log_sd, batch["truth"], batch["valid"])

    def validation_metrics(self):
        return curve_errors(read_slices(self.model, self.validation), self.validation)

    def calibrate(self):
        return None

    def card_entries(self):
        return {"mode": READER, "reader_input": READER_INPUT, "simulator_ranges": SLICE_RANGES,
                "validation": {"set": READER_VALIDATION}}

