"""Training the networks on simulated data (``dcepk train``).

``config`` (defaults, fixed seeds, the texts of model cards, ``load_config``), ``batches`` (simulated
batches as tensors, augmentation, losses), ``calibration`` (evaluation and SD calibration, also for one
protocol at inference time), ``trainer`` (``train``: checkpoints, resume, fine-tuning, model card).
"""

from .batches import compute_loss, make_batch, temporal_shift, to_torch, tracer_kinetic_loss
from .calibration import (calibrate_sd, calibrate_to_protocol, check_batch, check_metric, evaluate, fit_sd_calibration,
                          predict_batch, recalibrate, validation_batch)
from .config import CONFIG_DIR, DEFAULT_TRAINING, PROTOCOL_CALIBRATION, load_config, uncertainty_method
from .trainer import train

__all__ = ["calibrate_sd", "calibrate_to_protocol", "check_batch", "check_metric", "compute_loss", "CONFIG_DIR",
           "DEFAULT_TRAINING", "evaluate", "fit_sd_calibration", "load_config", "make_batch", "predict_batch",
           "PROTOCOL_CALIBRATION", "recalibrate", "temporal_shift", "to_torch", "tracer_kinetic_loss", "train",
           "uncertainty_method", "validation_batch"]
