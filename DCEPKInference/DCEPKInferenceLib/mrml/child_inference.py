"""The inference Logic's compute in a child process: ``dcepk infer`` (and, to compare, ``dcepk fit``).

``start_scene_inference`` decides where a prepared request runs (``compute_place``, as the fitting
Logic): a worker thread, or a ``ChildProcessJob`` that writes the series (and mask, T10 map) into its
temporary folder, runs ``dcepk infer`` with ``--progress-format json``, then the comparison fit on the
voxels the network inferred, and reads both back into the ``SceneInferenceResult`` the thread would
have made (``scene_inference.inference_result``). Nothing here touches the scene.
"""

import json
from pathlib import Path
from typing import List, Optional

import numpy as np

from DCEPKFittingLib.core.child_process import ChildCommand, ChildProcessJob, compute_place, python_environment
from DCEPKFittingLib.core.jobs import BackgroundJob
from DCEPKFittingLib.io import read_volume, write_volume
from DCEPKFittingLib.mrml.child_fit import (AIF_MASK_FILE, LIB_ROOT as FITTING_LIB_ROOT, MASK_FILE, SERIES_FILE,
                                            T10_FILE, acquisition_options, child_python, dcepk_command, fit_command,
                                            detected_input_function_files, fit_voxels, number, read_fit_output,
                                            write_series_input)
from DCEPKFittingLib.pipeline.input_function import SignalInputFunction, command_line_arguments
from DCEPKFittingLib.mrml.scene_fit import SceneFitRequest

from ..nn.input_definitions import READ_MASK_FILE, ReadFromImage
from .scene_inference import (SceneInferenceRequest, comparison_fit_settings, compute_scene_inference,
                              inference_result)

INFER_MODULE = "DCEPKInferenceLib.workflows.infer_command"  # `dcepk infer`, run as `python -m`
LIB_ROOT = Path(__file__).resolve().parents[2]  # the folder holding DCEPKInferenceLib
INFERENCE_FOLDER, INFERENCE_MASK_FILE = "inference", "inference_mask.nrrd"
INFER_SUMMARY = "dcepk_infer.json"   # what `dcepk infer` writes beside its maps (`<name>.nii.gz`)
INFERENCE_SHARE = 0.95               # of the progress; the rest is thresholds and statistics


def scene_inference_place(request: SceneInferenceRequest, place: str = "auto") -> str:
    """'child' or 'thread': where a prepared inference runs (``compute_place``)."""
    series = request.series
    return compute_place(place, fit_voxels(request.mask, series.spatial_shape), series.n_frames)


def start_scene_inference(request: SceneInferenceRequest, place: str = "auto", python: Optional[str] = None,
                          temp_parent=None, keep_folder: bool = False, compute=compute_scene_inference):
    """Start a prepared inference where ``scene_inference_place`` says; returns the started job."""
    if scene_inference_place(request, place) == "thread":
        return BackgroundJob(compute, request, name="DCEPK inference").start()
    return inference_child_job(request, child_python(python), temp_parent, keep_folder).start()


def inference_child_job(request: SceneInferenceRequest, python: str, temp_parent=None, keep_folder: bool = False):
    """The ``ChildProcessJob`` of an inference (and its comparison fit)."""
    split = INFERENCE_SHARE * (0.5 if request.compare_with_fit else 1.0)
    commands = [ChildCommand(lambda folder: infer_command(python, request, folder), 0.0, split,
                             "the network inference")]
    if request.compare_with_fit:
        commands.append(ChildCommand(lambda folder: comparison_fit_command(python, request, folder), split,
                                     INFERENCE_SHARE, "the comparison fit"))
    return ChildProcessJob(commands, load=lambda folder: read_inference_result(request, folder),
                           prepare=lambda folder, progress, cancel: write_inference_inputs(request, folder),
                           env=python_environment([FITTING_LIB_ROOT, LIB_ROOT]), temp_parent=temp_parent,
                           keep_folder=keep_folder, name="DCEPK inference (child process)")


def write_inference_inputs(request: SceneInferenceRequest, folder: Path) -> None:
    geometry = request.series.geometry
    write_series_input(folder, request.series)
    if request.mask is not None:
        write_volume(folder / INFERENCE_MASK_FILE, np.asarray(request.mask, dtype=bool), geometry)
    if np.ndim(request.t10_s) == 3:
        write_volume(folder / T10_FILE, np.asarray(request.t10_s, dtype=np.float32), geometry)
    spec = request.input_function
    if getattr(spec, "aif_mask", None) is not None:
        write_volume(folder / AIF_MASK_FILE, np.asarray(spec.aif_mask, dtype=bool), geometry)


def infer_command(python: str, request: SceneInferenceRequest, folder: Path) -> List[str]:
    """``dcepk infer`` for the request; flip angle and TR: the request's, else the series header's."""
    series = request.series
    args = [folder / SERIES_FILE, "--model", request.model_name, "--out", folder / INFERENCE_FOLDER,
            "--device", request.device, "--progress-format", "json", "--t10-unit", "s"]
    args += ["--t10", folder / T10_FILE] if np.ndim(request.t10_s) == 3 else [f"--t10={number(request.t10_s)}"]
    if request.mask is not None:
        args += ["--mask", folder / INFERENCE_MASK_FILE]
    args += acquisition_options(series, request.fa_deg, request.tr_s)
    if request.r1_per_mM_s is not None:
        args.append(f"--r1={number(request.r1_per_mM_s)}")
    if isinstance(request.input_function, ReadFromImage):   # image-only mode: the reader network reads it
        spec = request.input_function
        args += ["--mode", "image", f"--hct={number(spec.hct)}"]
        args += [f"--blood-t10={number(spec.blood_t10_s)}"] if spec.blood_t10_s else []
    elif request.input_function is not None:   # an AIF-conditioned model: its input function, as the thread's
        args += ["--mode", "aif", *command_line_arguments(request.input_function, folder / AIF_MASK_FILE)]
    return dcepk_command(python, INFER_MODULE, *args)


def comparison_fit_command(python: str, request: SceneInferenceRequest, folder: Path) -> List[str]:
    """``dcepk fit`` on the voxels ``dcepk infer`` inferred (its mask written first)."""
    inferred = read_inference(request, folder).estimated
    write_volume(folder / MASK_FILE, inferred, request.series.geometry)
    settings = comparison_fit_settings(request, inferred)
    return fit_command(python, request.series, settings, folder, save_concentration=False)


def read_inference(request: SceneInferenceRequest, folder: Path):
    """The ``PKFit`` of ``dcepk infer`` (its maps, status map included, and its summary)."""
    from DCEPKFittingLib.kinetics.fit_result import PKFit

    from ..nn.model_store import read_card
    from ..pipeline.inference import MAP_ORDER, NETWORK_MODEL

    out = folder / INFERENCE_FOLDER
    summary = json.loads((out / INFER_SUMMARY).read_text(encoding="utf-8"))
    maps = {name: read_volume(out / f"{name}.nii.gz")[0] for name in MAP_ORDER}
    maps["status"] = maps["status"].astype(np.uint8)
    aif = summary.get("aif_plasma_mM")
    return PKFit(model=NETWORK_MODEL, method=request.model_name, maps=maps, units=dict(summary["units"]),
                 times_s=request.series.times_s, aif_plasma_mM=None if aif is None else np.asarray(aif, np.float64),
                 uncertainty="sd", geometry=request.series.geometry, baseline_frames=summary["baseline_frames"],
                 messages=list(summary.get("notes", [])), device=summary["device"],
                 model_card=read_card(request.model_name), input_function=_detected_input_function(out))


def _detected_input_function(out: Path) -> Optional[SignalInputFunction]:
    """The voxels and blood curve automatic detection chose (``--auto-aif``), or the voxels the reader
    network looked at most (``--mode image``; its curve is the summary's plasma)."""
    if (out / READ_MASK_FILE).is_file():
        return SignalInputFunction(label_map=read_volume(out / READ_MASK_FILE)[0].astype(np.uint8))
    return detected_input_function_files(out)


def read_inference_result(request: SceneInferenceRequest, folder: Path):
    inference = read_inference(request, folder)
    fit = None
    if request.compare_with_fit:
        settings = comparison_fit_settings(request, inference.estimated)
        fit = read_fit_output(SceneFitRequest(series=request.series, settings=settings, source_id=""), folder)
    return inference_result(request, inference, fit)
