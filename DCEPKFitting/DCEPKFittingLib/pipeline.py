"""One call from a DCE series to parameter maps: T1 -> concentration -> input function -> fit.

The ``dcepk fit`` command, the Slicer module's Logic and the demo all call ``run_fit``, so the
three give the same maps for the same input. Pure core: no slicer/qt/vtk.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

import numpy as np

from . import aif as aif_lib
from . import plausibility
from . import signal_models
from .dce_io import DCESeries, finite_voxels
from .errors import DCEPKInputError
from .fitting import FitResult, FitStatus, fit_volume
from .geometry import Geometry
from .jobs import raise_if_cancelled, report, sub_progress
from .tk_models import MODELS, concentration as model_concentration

ArrayOrValue = Union[float, np.ndarray, None]


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
    r1_per_mM_s: Optional[float] = None  # None -> signal_models.default_r1()
    baseline_frames: Optional[int] = None  # None -> detected from the data
    # Input function: exactly one of aif_mask, population_aif, aif_csv.
    aif_mask: Optional[np.ndarray] = None  # bool [k, j, i] on an artery (or a vein: VIF)
    aif_top_fraction: Optional[float] = None
    population_aif: Optional[str] = None  # parker | georgiou | weinmann
    aif_csv: Optional[str] = None  # columns: time (s), concentration (mM)
    aif_is_plasma: bool = False  # ROI/CSV curve already plasma (no haematocrit correction)
    hct: float = 0.45
    aif_delay_s: float = 0.0
    # Fit.
    mask: Optional[np.ndarray] = None  # bool [k, j, i]; None -> every voxel with a valid curve
    fit_delay: bool = False
    device: str = "auto"


@dataclass
class FitOutput:
    maps: Dict[str, np.ndarray]
    units: Dict[str, str]
    geometry: Geometry
    times_s: np.ndarray
    aif_plasma_mM: np.ndarray
    concentration: np.ndarray
    fit: FitResult
    settings: FitSettings
    baseline_frames: Optional[int] = None
    messages: list = field(default_factory=list)

    def model_curve(self, k: int, j: int, i: int) -> np.ndarray:
        """Fitted concentration (mM) of one voxel on ``times_s``; NaN where the voxel was not fitted."""
        names = MODELS[self.fit.model].parameters
        params = np.array([self.fit.params[name][k, j, i] for name in names], dtype=np.float64)
        if not np.all(np.isfinite(params)):
            return np.full(self.times_s.shape, np.nan)
        delay = float(self.fit.delay_s[k, j, i]) if getattr(self.fit, "delay_s", None) is not None else 0.0
        return np.asarray(model_concentration(self.fit.model, params, self.times_s, self.aif_plasma_mM,
                                              delay_s=delay))


def _check_settings(settings: FitSettings) -> None:
    if settings.model not in MODELS:
        raise DCEPKInputError(f"unknown model '{settings.model}': choose one of {', '.join(MODELS)}")
    if settings.method not in ("nlls", "linear"):
        raise DCEPKInputError(f"unknown fit method '{settings.method}': use 'nlls' or 'linear'")
    sources = [name for name, value in (("an AIF ROI", settings.aif_mask), ("a population AIF", settings.population_aif),
                                        ("an AIF CSV file", settings.aif_csv)) if value is not None]
    if len(sources) != 1:
        raise DCEPKInputError(
            "give exactly one input function: an ROI mask on an artery or vein (--aif-roi), a population "
            f"AIF (--population-aif parker|georgiou|weinmann) or a CSV file (--aif-csv); got {sources or 'none'}")
    if not 0.0 <= settings.hct < 1.0:
        raise DCEPKInputError(f"haematocrit must be a fraction in [0, 1), got {settings.hct}")


def _concentration(series: DCESeries, settings: FitSettings, maps: Dict[str, np.ndarray], progress, cancel,
                   in_place: bool = False):
    """Concentration [k, j, i, t] in mM (float32), its validity mask and the baseline frame count used.
    ``in_place``: a float32 signal's own memory receives the concentration."""
    if series.kind == "concentration":
        conc = np.asarray(series.signal, dtype=np.float32)
        return conc, finite_voxels(conc), settings.baseline_frames
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
        t10, _, _ = signal_models.fit_vfa_t1(settings.vfa_signals, settings.vfa_flip_angles_deg,
                                             settings.vfa_tr_s, method="nonlinear")
        maps["T10_s"] = np.asarray(t10, dtype=np.float32)
    if t10 is None:
        raise DCEPKInputError("signal input needs T10: give a value or map in seconds (--t10) or a VFA series")
    raise_if_cancelled(cancel)
    r1 = settings.r1_per_mM_s if settings.r1_per_mM_s is not None else signal_models.default_r1()
    baseline = settings.baseline_frames
    if baseline is None:
        baseline = signal_models.detect_baseline_frames(series.signal)
    report(progress, 0.5, "signal to concentration")
    signal = series.signal
    in_place = in_place and signal.dtype == np.float32 and signal.flags.c_contiguous
    out = signal if in_place else np.empty(signal.shape, dtype=np.float32)
    conc, valid = signal_models.signal_to_concentration(signal, t10, fa_deg, tr_s, r1, baseline_frames=baseline,
                                                         out=out)
    if in_place:
        series.kind = "concentration"  # the series' memory holds concentration (mM) from here on
    return conc, np.asarray(valid, dtype=bool), baseline


def _input_function(series: DCESeries, conc: np.ndarray, settings: FitSettings, baseline_frames,
                    warnings: list, tissue: np.ndarray) -> np.ndarray:
    """Plasma input function (mM) sampled at the series' frame times; an ROI curve that does not
    look like a vessel's adds to ``warnings`` (``tissue``: the voxels to be fitted)."""
    times = series.times_s
    if settings.aif_mask is not None:
        curve = aif_lib.aif_from_roi(conc, settings.aif_mask, top_fraction=settings.aif_top_fraction)
        tissue_rows = np.flatnonzero(tissue & ~np.asarray(settings.aif_mask, dtype=bool))
        tissue_rows = tissue_rows[::max(1, tissue_rows.size // plausibility.SAMPLE_VOXELS)]
        warnings += plausibility.input_function_warnings(curve, conc.reshape(-1, conc.shape[-1])[tissue_rows])
    elif settings.aif_csv is not None:
        t_csv, c_csv = aif_lib.load_aif_csv(settings.aif_csv)
        curve = aif_lib.resample_aif(t_csv, c_csv, times - times[0])
    else:
        if baseline_frames is None:
            baseline_frames = signal_models.detect_baseline_frames(conc)
        return aif_lib.population_aif_at_arrival(settings.population_aif, times, baseline_frames, settings.hct,
                                                 settings.aif_delay_s)
    if settings.aif_delay_s:
        curve = np.interp(times - settings.aif_delay_s, times, curve, left=0.0)
    return curve if settings.aif_is_plasma else aif_lib.blood_to_plasma(curve, settings.hct)


def run_fit(series: DCESeries, settings: FitSettings, progress=None, cancel=None, *,
            reuse_series_memory: bool = False) -> FitOutput:
    """Fit a tracer-kinetic model to every voxel of ``series``; see ``FitSettings``.

    ``reuse_series_memory``: convert a float32 signal series to concentration in its own memory
    (one copy of the series instead of two; ``series`` then holds concentration, kind
    'concentration'), for callers that need the signal no more, such as ``dcepk fit``.
    Warnings (an input function that does not look like a vessel's, a fit worse than a flat
    line) are in ``FitOutput.messages``."""
    _check_settings(settings)
    plausibility.check_frame_times(series.times_s, "the series' frame times")
    plausibility.check_series_kind(series.signal, series.kind, settings.baseline_frames)
    maps: Dict[str, np.ndarray] = {}
    conc, valid, baseline = _concentration(series, settings, maps, sub_progress(progress, 0.0, 0.1), cancel,
                                           in_place=reuse_series_memory)
    raise_if_cancelled(cancel)
    if settings.mask is not None and settings.mask.shape != conc.shape[:3]:
        raise DCEPKInputError(f"the mask has shape {settings.mask.shape} but the series has {conc.shape[:3]} voxels")
    mask = valid if settings.mask is None else (np.asarray(settings.mask, dtype=bool) & valid)
    report(progress, 0.1, "input function")
    messages: list = []
    cp = np.asarray(_input_function(series, conc, settings, baseline, messages, mask), dtype=np.float64)
    if not np.all(np.isfinite(cp)) or np.max(cp) <= 0:
        raise DCEPKInputError("the input function has no positive finite enhancement: check the AIF ROI or source")
    if not mask.any():
        raise DCEPKInputError("no voxel to fit: the mask is empty or no voxel has a valid concentration curve")
    fit = fit_volume(conc, series.times_s, cp, settings.model, mask=mask, method=settings.method,
                     fit_delay=settings.fit_delay, device=settings.device,
                     progress=sub_progress(progress, 0.15, 1.0), cancel=cancel)
    maps.update(fit.maps())
    messages += plausibility.fit_warnings(fit.r2, fit.status != FitStatus.MASKED)
    units = dict(fit.units)
    if "T10_s" in maps:
        units["T10_s"] = "s"
    report(progress, 1.0, "done")
    return FitOutput(maps=maps, units=units, geometry=series.geometry, times_s=series.times_s,
                     aif_plasma_mM=cp, concentration=conc, fit=fit, settings=settings,
                     baseline_frames=baseline, messages=messages)
