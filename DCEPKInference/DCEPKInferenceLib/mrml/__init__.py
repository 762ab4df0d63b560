"""MRML bridge of the inference module: scene nodes -> ``run_inference`` -> map and uncertainty volumes.

Imports ``slicer``, never ``qt`` (runs in Slicer and under the headless ``slicer-core`` wheel). Reading
series, masks and segments and writing volumes reuses ``DCEPKFittingLib.mrml``; only what is specific to
inference lives here: ``model_cards`` (the shipped networks for the panel), ``uncertainty`` (threshold,
excluded voxels, map beside its SD), ``scene_inference`` (the module Logic's prepare / compute /
publish), ``child_inference`` (where the compute runs: a worker thread or ``dcepk`` child processes).
Their public names are importable from ``DCEPKInferenceLib.mrml``.
"""

from .child_inference import scene_inference_place, start_scene_inference
from .model_cards import describe_model_card, model_cards, PARAMETERS, UNITS
from .scene_inference import (compute_scene_inference, derive_outputs, FIT_MODELS, FIT_PREFIX, MODEL_ATTRIBUTE,
                              prepare_scene_inference, publish_scene_inference, rethreshold, run_scene_inference,
                              SceneInferenceRequest, SceneInferenceResult, STATISTICS_COLUMNS, statistics_rows)
from .uncertainty import (excluded_by_uncertainty, normalize_threshold, show_map_with_uncertainty, Threshold,
                          UNCERTAINTY_ATTRIBUTE)

__all__ = ["compute_scene_inference", "derive_outputs", "describe_model_card", "excluded_by_uncertainty",
           "FIT_MODELS", "FIT_PREFIX", "MODEL_ATTRIBUTE", "model_cards", "normalize_threshold", "PARAMETERS",
           "prepare_scene_inference", "publish_scene_inference", "rethreshold", "run_scene_inference",
           "scene_inference_place", "SceneInferenceRequest", "SceneInferenceResult", "show_map_with_uncertainty",
           "start_scene_inference", "STATISTICS_COLUMNS", "statistics_rows", "Threshold", "UNCERTAINTY_ATTRIBUTE",
           "UNITS"]
