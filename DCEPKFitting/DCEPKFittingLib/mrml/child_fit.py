"""The fitting Logic's compute in a child process: ``dcepk`` run by the interpreter Slicer ships.

``start_scene_fit`` is the one place that decides where a prepared fit runs (``core.child_process.
compute_place``): a worker thread (``jobs.BackgroundJob``) or a ``ChildProcessJob`` that writes the
request's arrays into its temporary folder (series, masks, T10 map, VFA images), runs ``dcepk t1map``
(a VFA series) and ``dcepk fit`` with ``--progress-format json``, and reads the maps, the concentration
and the summary back into a ``PKFit``: the publish step and the voxel plot take it as
they take the thread's. The numbers are the thread's (the same ``run_fit`` on the same values; maps
are float32 in files, and a VFA T10 map passes through one as float32 too).

Nothing here touches the scene; ``child_python`` finds the interpreter (``PythonSlicer`` in Slicer).
The inference Logic builds its child job from the same pieces.
"""

import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..core.child_process import ChildCommand, ChildProcessJob, compute_place, python_environment
from ..core.errors import DCEPKInputError
from ..core.jobs import BackgroundJob, raise_if_cancelled
from ..io import read_dce, read_volume, write_dce_series, write_volume
from ..pipeline.input_function import AUTO_CURVE_FILE, AUTO_MASK_FILE, SignalInputFunction, command_line_arguments
from .scene_fit import SceneFitRequest, compute_scene_fit

FIT_MODULE = "DCEPKFittingLib.workflows.cli"  # `dcepk`, run as `python -m` (Slicer installs no entry-point script)
LIB_ROOT = Path(__file__).resolve().parents[2]  # the folder holding DCEPKFittingLib (a module folder in Slicer)
SERIES_FILE, MASK_FILE, AIF_MASK_FILE, T10_FILE = "series.seq.nrrd", "mask.nrrd", "aif_mask.nrrd", "t10.nrrd"
MAPS_FOLDER = "maps"
FIT_SUMMARY, CONCENTRATION_FILE = "dcepk_fit.json", "concentration.seq.nrrd"  # what `dcepk fit` writes
CHILD_DEFAULTS = {"rician_correction": "aif"}  # FitSettings fields `dcepk fit` has no option for: their values


def child_python(explicit: Optional[str] = None) -> str:
    """The Python interpreter for a child process: ``explicit``, else Slicer's ``PythonSlicer`` (on the
    PATH in Slicer, or in its ``bin`` folder), else this interpreter when it is a Python (outside Slicer,
    where ``sys.executable`` is the Slicer application itself)."""
    if explicit:
        return str(explicit)
    found = shutil.which("PythonSlicer")
    if found:
        return found
    import slicer

    home = getattr(getattr(slicer, "app", None), "slicerHome", None)
    if home:
        candidate = Path(home, "bin", "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
        if candidate.is_file():
            return str(candidate)
    if Path(sys.executable).name.lower().startswith("python"):
        return sys.executable
    raise DCEPKInputError(f"no Python interpreter found for the child process ({sys.executable} is not one and "
                          "PythonSlicer is not on the PATH): set the Logic's pythonExecutable, or computeIn = "
                          "'thread'")


def number(value) -> str:
    """A number as a command-line value that reads back exactly."""
    return repr(float(value))


def dcepk_command(python: str, module: str, *args) -> List[str]:
    return [python, "-m", module, *[str(a) for a in args]]


def acquisition_options(series, fa_deg, tr_s) -> List[str]:
    """``--fa`` / ``--tr``: the given values, else the series header's (so none is read back from a file)."""
    options = []
    for option, given, header in (("--fa", fa_deg, series.flip_angle_deg), ("--tr", tr_s, series.tr_s)):
        value = given if given is not None else header
        if value is not None:
            options.append(f"{option}={number(value)}")
    return options


def fit_voxels(mask, spatial_shape) -> int:
    return int(np.count_nonzero(mask)) if mask is not None else int(np.prod(spatial_shape))


def scene_fit_place(request: SceneFitRequest, place: str = "auto") -> str:
    """'child' or 'thread': where the fit of a prepared request runs (``compute_place``; 'auto' keeps in a
    thread what ``dcepk fit`` has no option for)."""
    series, settings = request.series, request.settings
    unsupported = child_unsupported(settings)
    chosen = compute_place(place, fit_voxels(settings.mask, series.spatial_shape), series.n_frames)
    if chosen == "child" and unsupported:
        if place == "auto":
            return "thread"
        raise DCEPKInputError(f"{unsupported}: run this fit in a thread (the Logic's computeIn = 'thread')")
    return chosen


def start_scene_fit(request: SceneFitRequest, place: str = "auto", python: Optional[str] = None,
                    temp_parent=None, keep_folder: bool = False, compute=compute_scene_fit):
    """Start the fit of a prepared request where ``scene_fit_place`` says; returns the started job (poll it
    or ``core.child_process.wait_for_job``). ``python``: the child's interpreter (None: ``child_python``)."""
    if scene_fit_place(request, place) == "thread":
        return BackgroundJob(compute, request, name="DCEPK fit").start()
    return fit_child_job(request, child_python(python), temp_parent, keep_folder).start()


def child_unsupported(settings) -> Optional[str]:
    """Why ``dcepk fit`` cannot run these settings, or None."""
    for name, value in CHILD_DEFAULTS.items():
        if getattr(settings, name) != value:
            return f"dcepk fit has no option for {name}={getattr(settings, name)!r}"
    return None


def fit_child_job(request: SceneFitRequest, python: str, temp_parent=None, keep_folder: bool = False):
    """The ``ChildProcessJob`` of a fit: inputs written, ``dcepk t1map`` (VFA) and ``dcepk fit`` run, the
    outputs read into a ``PKFit``."""
    settings = request.settings
    vfa = settings.vfa_signals is not None
    commands = []
    if vfa:
        commands.append(ChildCommand(lambda folder: t1map_command(python, settings, folder), 0.0, 0.05,
                                     "the T1 map of the VFA series"))
    commands.append(ChildCommand(lambda folder: fit_command(python, request.series, settings, folder),
                                 0.05 if vfa else 0.0, 1.0, "the fit"))
    return ChildProcessJob(commands, load=lambda folder: read_fit_output(request, folder),
                           prepare=lambda folder, progress, cancel: write_fit_inputs(request, folder, cancel),
                           env=python_environment([LIB_ROOT]), temp_parent=temp_parent, keep_folder=keep_folder,
                           name="DCEPK fit (child process)")


def write_series_input(folder: Path, series) -> Path:
    return write_dce_series(folder / SERIES_FILE, series)


def write_fit_inputs(request: SceneFitRequest, folder: Path, cancel=None) -> None:
    """The request's arrays as the files ``fit_command`` names."""
    settings, geometry = request.settings, request.series.geometry
    write_series_input(folder, request.series)
    raise_if_cancelled(cancel)
    for array, name in ((settings.mask, MASK_FILE), (settings.aif_mask, AIF_MASK_FILE)):
        if array is not None:
            write_volume(folder / name, np.asarray(array, dtype=bool), geometry)
    if np.ndim(settings.t10_s) == 3 and settings.vfa_signals is None:
        write_volume(folder / T10_FILE, np.asarray(settings.t10_s, dtype=np.float32), geometry)
    if settings.vfa_signals is not None:
        for n in range(settings.vfa_signals.shape[-1]):
            raise_if_cancelled(cancel)
            write_volume(folder / f"vfa_{n}.nrrd", settings.vfa_signals[..., n], geometry)


def t1map_command(python: str, settings, folder: Path) -> List[str]:
    angles = list(settings.vfa_flip_angles_deg)
    return dcepk_command(python, FIT_MODULE, "t1map", *[folder / f"vfa_{n}.nrrd" for n in range(len(angles))],
                         "--fa", *[number(a) for a in angles], f"--tr={number(settings.vfa_tr_s)}",
                         "--method", "nonlinear", "--out", folder / T10_FILE)


def fit_command(python: str, series, settings, folder: Path, save_concentration: bool = True) -> List[str]:
    """``dcepk fit`` for ``settings`` on the files in ``folder``; every value given, none left to defaults
    that could differ from ``FitSettings``'s (flip angle and TR: the settings', else the series header's)."""
    args = [folder / SERIES_FILE, "--out", folder / MAPS_FOLDER, "--format", ".nrrd", "--progress-format", "json",
            "--model", settings.model, "--method", settings.method,
            "--input-kind", series.kind, "--device", settings.device]
    args += command_line_arguments(settings.input_function, folder / AIF_MASK_FILE)
    if series.kind == "signal":
        if settings.vfa_signals is not None or np.ndim(settings.t10_s) == 3:
            args += ["--t10", folder / T10_FILE, "--t10-unit", "s"]
        elif settings.t10_s is not None:
            args += [f"--t10={number(settings.t10_s)}", "--t10-unit", "s"]
        args += acquisition_options(series, settings.fa_deg, settings.tr_s)
    if settings.r1_per_mM_s is not None:
        args.append(f"--r1={number(settings.r1_per_mM_s)}")
    if settings.baseline_frames is not None:
        args.append(f"--baseline-frames={int(settings.baseline_frames)}")
    if settings.mask is not None:
        args += ["--mask", folder / MASK_FILE]
    if settings.fit_delay:
        args.append("--fit-delay")
    if not settings.model_selection:
        args.append("--no-model-choice")
    if save_concentration:
        args.append("--save-concentration")
    return dcepk_command(python, FIT_MODULE, "fit", *args)


def read_fit_output(request: SceneFitRequest, folder: Path):
    """The ``PKFit`` of ``dcepk fit`` (maps, summary, and the concentration if it was saved) on the
    request's series: its geometry and frame times, and the T10 map of ``dcepk t1map`` when there was one."""
    from ..kinetics.fit_result import PKFit, map_names

    settings, series = request.settings, request.series
    out = folder / MAPS_FOLDER
    summary = json.loads((out / FIT_SUMMARY).read_text(encoding="utf-8"))
    maps, units = {}, dict(summary["units"])
    if settings.vfa_signals is not None:
        maps["T10_s"], units["T10_s"] = read_volume(folder / T10_FILE)[0], "s"
    for name in map_names(settings.model, settings.fit_delay):
        if (out / f"{name}.nrrd").is_file():
            maps[name] = read_volume(out / f"{name}.nrrd")[0]
    concentration = read_dce(out / CONCENTRATION_FILE, kind="concentration", nonfinite="keep").signal \
        if (out / CONCENTRATION_FILE).is_file() else None
    return PKFit(model=settings.model, method=settings.method, maps=maps, units=units, times_s=series.times_s,
                 aif_plasma_mM=np.asarray(summary["aif_plasma_mM"], dtype=np.float64), geometry=series.geometry,
                 baseline_frames=summary.get("baseline_frames"), noise_sigma=summary.get("noise_sd_signal_units"),
                 messages=list(summary.get("warnings", [])), concentration=concentration, settings=settings,
                 input_function=detected_input_function_files(out))


def detected_input_function_files(out: Path) -> Optional[SignalInputFunction]:
    """The voxels (1 artery, 2 vein) and blood curve (mM) automatic detection chose, from the files a
    ``dcepk fit`` / ``dcepk infer`` run with ``--auto-aif`` writes into ``out``; None without them."""
    if not (out / AUTO_MASK_FILE).is_file():
        return None
    curve = np.loadtxt(out / AUTO_CURVE_FILE, delimiter=",", skiprows=1, ndmin=2)
    return SignalInputFunction(blood_mM=curve[:, 1], label_map=read_volume(out / AUTO_MASK_FILE)[0].astype(np.uint8))
