"""One call from a DCE series to parameter maps: T1 -> concentration -> input function -> fit.

The ``dcepk fit`` command, the Slicer module's Logic and the demo all call ``run_fit``, so the
three give the same maps for the same input. Pure core: no slicer/qt/vtk.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import numpy as np

from ..core import plausibility
from ..core.errors import DCEPKInputError
from ..core.jobs import raise_if_cancelled, report, sub_progress
from ..io import DCESeries, finite_voxels
from ..kinetics.fit_result import PKFit
from ..kinetics.model import TracerKineticModel
from ..kinetics.tk_models import MODELS
from ..signal import default_r1, detect_baseline_frames, fit_vfa_t1, rician, signal_to_concentration
from .input_function import (SPEC_FIELDS, InputFunctionSpec, SignalInputFunction, checked_input_function,
                             input_function_from_signal, plasma_input_function)

ArrayOrValue = Union[float, np.ndarray, None]
RICIAN_CORRECTIONS = ("none", "aif", "all")


@dataclass
class FitSettings:
    """Everything a fit needs beyond the series itself; units in each field's name or comment."""

    model: str = "etofts"
    method: str = "nlls"  # nlls | linear
    # Signal to concentration (ignored when the series already holds concentration).
    t10_s: ArrayOrValue = None  # fixed T10 (s) or a map [k, j, i]; None -> a VFA series is required
    vfa_signals: Optional[np.ndarray] = None  # [k, j, i, n_flip_angles]
    vfa_flip_angles_deg: Optional[Sequence[float]] = None
    vfa_tr_s: Optional[float] = None
    fa_deg: Optional[float] = None  # None -> from the series header
    tr_s: Optional[float] = None  # None -> from the series header
    r1_per_mM_s: Optional[float] = None  # None -> signal.default_r1()
    baseline_frames: Optional[int] = None  # None -> detected from the data
    # Input function (the fields of pipeline.input_function.InputFunctionSpec): exactly one of
    # aif_mask, population_aif, aif_csv, auto_aif.
    aif_mask: Optional[np.ndarray] = None  # bool [k, j, i] on an artery (or a vein: VIF)
    aif_top_fraction: Optional[float] = None
    population_aif: Optional[str] = None  # parker | georgiou | weinmann
    aif_csv: Optional[str] = None  # columns: time (s), concentration (mM)
    auto_aif: Optional[str] = None  # artery | vein | either: detected (kinetics.aif_detection)
    aif_is_plasma: bool = False  # ROI/CSV curve already plasma (no haematocrit correction)
    hct: float = 0.45
    aif_delay_s: float = 0.0
    blood_t10_s: Optional[float] = None  # ROI / automatic: T10 of blood (None: t10_s)
    # Fit.
    mask: Optional[np.ndarray] = None  # bool [k, j, i]; None -> every voxel with a signal above the noise
    fit_delay: bool = False
    device: str = "auto"
    # per voxel: no enhancement / plasma only / leakage model (kinetics.model, nested_models)
    model_selection: bool = True
    # Rician floor of magnitude signals (noise SD from the baseline frames, ``rician``): taken off
    # the arterial ROI's mean signal ("aif"), also off every voxel's curve ("all"), or not ("none").
    # Per voxel it removes a bias that is small at tissue SNR >= 5 and adds variance (see
    # Testing/Benchmarks/RESULTS.md, "Fitting trust"), so the default corrects the input function only.
    rician_correction: str = "aif"

    @property
    def input_function(self) -> InputFunctionSpec:
        return InputFunctionSpec(**{name: getattr(self, name) for name in SPEC_FIELDS})


def _check_settings(settings: FitSettings) -> None:
    if settings.model not in MODELS:
        raise DCEPKInputError(f"unknown model '{settings.model}': choose one of {', '.join(MODELS)}")
    if settings.method not in ("nlls", "linear"):
        raise DCEPKInputError(f"unknown fit method '{settings.method}': use 'nlls' or 'linear'")
    settings.input_function.check()
    if settings.rician_correction not in RICIAN_CORRECTIONS:
        raise DCEPKInputError(f"unknown Rician correction {settings.rician_correction!r}: use one of "
                              f"{', '.join(RICIAN_CORRECTIONS)}")


@dataclass
class _Conversion:
    """Concentration [k, j, i, t] (mM, float32) with what made it, and what had to be read from
    the signal before it (the signal's memory may hold the concentration afterwards)."""
    concentration: np.ndarray
    valid: np.ndarray                      # [k, j, i]: every frame converted
    baseline_frames: Optional[int]
    noise_sigma: Optional[float] = None    # signal units; None: not estimated
    t10_s: ArrayOrValue = None
    from_signal: Optional[SignalInputFunction] = None   # the ROI's or detected vessel's curve, from the signal
    above_noise: Optional[np.ndarray] = None    # [k, j, i]: baseline signal above the noise


def _concentration(series: DCESeries, settings: FitSettings, maps: Dict[str, np.ndarray], progress, cancel,
                   in_place: bool = False) -> _Conversion:
    """Concentration from the series (signal: T10, baseline, noise level, SPGR inversion).
    ``in_place``: a float32 signal's own memory receives the concentration."""
    if series.kind == "concentration":
        conc = np.asarray(series.signal, dtype=np.float32)
        return _Conversion(conc, finite_voxels(conc), settings.baseline_frames)
    fa_deg = settings.fa_deg if settings.fa_deg is not None else series.flip_angle_deg
    tr_s = settings.tr_s if settings.tr_s is not None else series.tr_s
    if fa_deg is None or tr_s is None:
        raise DCEPKInputError(
            "the flip angle and TR of the DCE series are unknown (not in the file header): "
            "give them (--fa in degrees, --tr in seconds)")
    t10 = settings.t10_s
    if settings.vfa_signals is not None:
        if settings.vfa_flip_angles_deg is None or settings.vfa_tr_s is None:
            raise DCEPKInputError("a VFA series needs its flip angles (degrees) and TR (seconds)")
        report(progress, 0.0, "T1 map from variable flip angles")
        t10, _, _ = fit_vfa_t1(settings.vfa_signals, settings.vfa_flip_angles_deg,
                               settings.vfa_tr_s, method="nonlinear")
        maps["T10_s"] = np.asarray(t10, dtype=np.float32)
    if t10 is None:
        raise DCEPKInputError("signal input needs T10: give a value or map in seconds (--t10) or a VFA series")
    raise_if_cancelled(cancel)
    r1 = settings.r1_per_mM_s if settings.r1_per_mM_s is not None else default_r1()
    baseline = settings.baseline_frames
    if baseline is None:
        baseline = detect_baseline_frames(series.signal, times_s=series.times_s)
    signal = series.signal
    sigma = rician.estimate_noise_sigma(signal, baseline) if settings.rician_correction != "none" else None
    # from the signal, before its memory may hold concentration
    from_signal = input_function_from_signal(signal, series.times_s, settings.input_function, t10_s=t10, fa_deg=fa_deg,
                                             tr_s=tr_s, r1_per_mM_s=r1, baseline_frames=baseline, noise_sigma=sigma)
    with np.errstate(invalid="ignore"):
        above_noise = np.mean(signal[..., :baseline], axis=-1) > 2.0 * (sigma or 0.0)  # air: ~1.25 sigma
    report(progress, 0.5, "signal to concentration")
    in_place = in_place and signal.dtype == np.float32 and signal.flags.c_contiguous
    out = signal if in_place else np.empty(signal.shape, dtype=np.float32)
    conc, valid = signal_to_concentration(
        signal, t10, fa_deg, tr_s, r1, baseline_frames=baseline, out=out,
        noise_sigma=sigma if settings.rician_correction == "all" else None)
    if in_place:
        series.kind = "concentration"  # the series' memory holds concentration (mM) from here on
    return _Conversion(conc, np.asarray(valid, dtype=bool), baseline, sigma, t10, from_signal, above_noise)


def _input_function(series: DCESeries, converted: _Conversion, settings: FitSettings, warnings: list,
                    tissue: np.ndarray) -> np.ndarray:
    """Plasma input function (mM) sampled at the series' frame times; an ROI or detected curve that
    does not look like a vessel's adds to ``warnings`` (``tissue``: the voxels to be fitted)."""
    vessel = settings.aif_mask
    if converted.from_signal is not None and converted.from_signal.detection is not None:
        vessel = converted.from_signal.detection.chosen
    tissue_rows = None
    if vessel is not None:
        tissue_rows = np.flatnonzero(tissue & ~np.asarray(vessel, dtype=bool))
        tissue_rows = tissue_rows[::max(1, tissue_rows.size // plausibility.SAMPLE_VOXELS)]
    return plasma_input_function(settings.input_function, series.times_s, converted.baseline_frames,
                                 converted.from_signal, converted.concentration, tissue_rows, warnings)


def _fit_region(series: DCESeries, settings: FitSettings, converted: _Conversion, messages: list) -> np.ndarray:
    """The voxels to fit: the mask, or every voxel whose baseline signal stands above the noise
    (background air, a Rician floor of ~1.25 noise SD, is left out). Voxels in it that could not
    be converted are fitted as invalid input (status INVALID_INPUT), and a message says how many."""
    grid = converted.concentration.shape[:3]
    if settings.mask is not None:
        region = np.asarray(settings.mask, dtype=bool)
        if region.shape != grid:
            raise DCEPKInputError(f"the mask has shape {region.shape} but the series has {grid} voxels")
    elif converted.above_noise is not None:
        region = converted.above_noise
    else:
        region = np.ones(grid, dtype=bool)
    if not (region & converted.valid).any():
        raise DCEPKInputError("no voxel to fit: the mask is empty or no voxel has a valid concentration curve")
    invalid = region & ~converted.valid
    if invalid.any():
        messages.append(f"{int(invalid.sum())} of the {int(region.sum())} voxels to fit have no valid concentration "
                        f"curve ({_invalid_reasons(series, converted, invalid)}): their status is invalid input and "
                        "their maps are NaN")
    return region


def _invalid_reasons(series: DCESeries, converted: _Conversion, invalid: np.ndarray) -> str:
    if converted.above_noise is None:   # concentration input
        return "NaN or inf values"
    reasons = []
    if converted.t10_s is not None and np.ndim(converted.t10_s) == 3:
        t10 = np.asarray(converted.t10_s)
        bad_t10 = invalid & ~(np.isfinite(t10) & (t10 > 0))
        if bad_t10.any():
            reasons.append(f"{int(bad_t10.sum())} with a T10 that is not a positive number")
        invalid = invalid & ~bad_t10
    if invalid.any():
        reasons.append(f"{int(invalid.sum())} with NaN or a non-positive baseline, or a frame beyond the SPGR "
                       "signal range for this T10 and flip angle")
    return "; ".join(reasons)


def run_fit(series: DCESeries, settings: FitSettings, progress=None, cancel=None, *,
            reuse_series_memory: bool = False) -> PKFit:
    """Fit a tracer-kinetic model to every voxel of ``series``; see ``FitSettings``. Returns a ``PKFit``
    whose maps are those of ``TracerKineticModel.fit`` (and ``T10_s`` from a VFA series), with the series'
    geometry, the input function, the concentration, the settings and what the run found.

    ``reuse_series_memory``: convert a float32 signal series to concentration in its own memory
    (one copy of the series instead of two; ``series`` then holds concentration, kind
    'concentration'), for callers that need the signal no more, such as ``dcepk fit``.
    Warnings (an input function that does not look like a vessel's, a fit worse than a flat
    line, voxels that could not be converted) are in ``messages``; the baseline frames used (given or
    detected) in ``baseline_frames``."""
    _check_settings(settings)
    plausibility.check_frame_times(series.times_s, "the series' frame times")
    plausibility.check_series_kind(series.signal, series.kind, settings.baseline_frames)
    extra_maps: Dict[str, np.ndarray] = {}
    messages: list = []
    signal_input = series.kind == "signal"
    converted = _concentration(series, settings, extra_maps, sub_progress(progress, 0.0, 0.1), cancel,
                               in_place=reuse_series_memory)
    conc = converted.concentration
    if converted.baseline_frames is None and settings.population_aif is not None:
        # a population AIF starts at bolus arrival: the one thing it needs from the data
        converted.baseline_frames = detect_baseline_frames(conc, times_s=series.times_s)
    raise_if_cancelled(cancel)
    mask = _fit_region(series, settings, converted, messages)
    report(progress, 0.1, "input function")
    cp, described = checked_input_function(_input_function(series, converted, settings, messages,
                                                           mask & converted.valid),
                                           settings.input_function, converted.from_signal)
    messages += described
    model = TracerKineticModel(series.times_s, cp, settings.model, method=settings.method,
                               fit_delay=settings.fit_delay, model_selection=settings.model_selection,
                               signal_baseline=signal_input, device=settings.device)
    result = model.fit(conc, mask, progress=sub_progress(progress, 0.15, 1.0), cancel=cancel)
    messages += plausibility.fit_warnings(result.maps["R2"], result.estimated)
    if extra_maps:
        result.maps = {**extra_maps, **result.maps}
        result.units = {**{name: "s" for name in extra_maps}, **result.units}
    result.geometry, result.concentration, result.settings = series.geometry, conc, settings
    result.baseline_frames, result.noise_sigma, result.messages = converted.baseline_frames, \
        converted.noise_sigma, messages
    result.input_function = converted.from_signal
    report(progress, 1.0, "done")
    return result
