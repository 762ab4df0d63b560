"""What a fit or a network returns: ``PKFit`` (maps with OSIPI names and units, their uncertainty, status,
the selected model, ``predict()``, and what the run reports), the per-voxel ``FitStatus`` codes and the
names and units of the maps. numpy only: reading a result, or checking output names before a fit, never
imports torch.

One result type for both, after dipy's model / fit split (``TracerKineticModel.fit`` returns it, so do
``pipeline.fit.run_fit`` and the inference pipeline): the Slicer bridge, the command line, statistics and
benchmarks read a fit and a network's inference alike. The difference is named by ``uncertainty``: a fit's
standard errors are ``<name>_se``, a network's predicted 1-SD uncertainty ``<name>_sd`` (same units).
"""

import enum
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry
from . import tk_models as tk


class FitStatus(enum.IntEnum):
    """Per-voxel fit status, the ``status`` map (uint8). Values 0-4 are those of earlier releases."""
    MASKED = 0          # outside the mask: not fitted
    FITTED = 1          # the selected model fitted inside its bounds (Ktrans = 0 of a plasma-only voxel included)
    AT_BOUND = 2        # fitted, but a parameter sits at a bound: a limit, not an estimate
    NOT_CONVERGED = 3   # the optimiser stopped at its iteration limit
    INVALID_INPUT = 4   # NaN / inf in the curve, or its signal could not be converted (baseline, T10)
    NOT_ENHANCING = 5   # no enhancement: Ktrans = vp = 0, ve and kep undefined
    # earlier names of the same values
    CONVERGED = 1
    HIT_BOUND = 2
    FAILED = 3


# statuses whose parameters are estimates (statistics are computed over these only)
FITTED_STATUSES = (FitStatus.FITTED,)

UNCERTAINTY_KINDS = {"se": "standard error of the fit", "sd": "network's predicted 1-SD uncertainty"}


@dataclass
class PKFit:
    """Parameter maps of N curves or of a volume [k, j, i] (``shape``), by a fit or a network.

    ``maps``: the model's parameters and derived ones (Ktrans, kep) in OSIPI units, each with its
    uncertainty ``<name>_<uncertainty>``, then R2 and rmse (fits), ``status`` (uint8 ``FitStatus``),
    ``selected_model`` (uint8 ``nested_models.SelectedModel``, fits), and whatever the pipeline adds
    (``T10_s``, ``delay_s``). Outside the fitted voxels a fit's maps are NaN, a network's 0.
    """
    model: str                                   # tracer-kinetic model of the parameters ('etofts' for networks)
    method: str                                  # 'nlls', 'linear', or the network's name
    maps: Dict[str, np.ndarray]
    units: Dict[str, str]
    times_s: np.ndarray                          # frame times (s)
    aif_plasma_mM: Optional[np.ndarray] = None   # plasma input function on times_s; None: no AIF (networks)
    uncertainty: str = "se"                      # 'se' (fit) or 'sd' (network): the suffix of uncertainty maps
    geometry: Optional[Geometry] = None
    baseline_frames: Optional[int] = None        # pre-contrast frames used (given or detected)
    noise_sigma: Optional[float] = None          # noise SD per quadrature channel (signal units), if estimated
    messages: List[str] = field(default_factory=list)   # warnings and notes for the user
    device: str = "cpu"                          # where it ran
    concentration: Optional[np.ndarray] = None   # the curves fitted (mM, [..., t]) when the pipeline keeps them
    settings: Optional[object] = None            # a pipeline fit's FitSettings
    model_card: Optional[dict] = None            # a network's card

    @property
    def shape(self) -> tuple:
        return tuple(np.shape(self.status))

    @property
    def status(self) -> np.ndarray:
        return self.maps["status"]

    @property
    def selected_model(self) -> Optional[np.ndarray]:
        return self.maps.get("selected_model")

    @property
    def estimated(self) -> np.ndarray:
        """Voxels that were fitted or inferred (status other than MASKED)."""
        return self.status != FitStatus.MASKED

    @property
    def parameter_names(self) -> tuple:
        """The kinetic model's own parameters, in its order (OSIPI names)."""
        return tk.get_model(self.model).parameters

    def uncertainty_of(self, name: str) -> np.ndarray:
        """The uncertainty map of parameter ``name`` (standard error or network SD, same unit)."""
        return self.maps[f"{name}_{self.uncertainty}"]

    def parameter_array(self) -> np.ndarray:
        """The model's parameters as (..., P) in its order."""
        return np.stack([np.asarray(self.maps[name], dtype=np.float64) for name in self.parameter_names], axis=-1)

    def predict(self, index=None, *, times_s=None, aif_plasma_mM=None) -> np.ndarray:
        """Model concentration (mM) from the estimated parameters: of one voxel (``index``: a flat index
        or (k, j, i)), or of every voxel (..., T) with ``index`` None; NaN where there is no estimate.
        By default on this result's frame times and input function; a network's result has no input
        function, so give ``aif_plasma_mM`` (plasma, mM, on ``times_s``) to see its curves."""
        times = self.times_s if times_s is None else np.asarray(times_s, dtype=np.float64)
        aif = self.aif_plasma_mM if aif_plasma_mM is None else aif_plasma_mM
        if aif is None:
            raise DCEPKInputError("this result has no input function (a network's maps): give aif_plasma_mM, the "
                                  "plasma concentration (mM) on the frame times, to predict its curves")
        params = self.parameter_array()
        delay = np.asarray(self.maps["delay_s"], dtype=np.float64) if "delay_s" in self.maps else np.zeros(self.shape)
        if index is not None:
            if isinstance(index, tuple) and len(index) != len(self.shape) or np.ndim(params[index]) != 1:
                raise DCEPKInputError(f"index {index!r} does not name a single voxel of a {self.shape} result: "
                                      "give a flat voxel index or (k, j, i)")
            params, delay = params[index][None], np.reshape(delay[index], (1,))
        curves = model_curves(self.model, params.reshape(-1, params.shape[-1]), times, aif, delay.reshape(-1))
        return curves[0] if index is not None else curves.reshape(params.shape[:-1] + (times.size,))


def model_curves(model, params, t_s, cp, delay_s=0.0) -> np.ndarray:
    """Concentration (mM) (N, T) of reported parameters (N, P); NaN for a voxel with no estimate.

    Where the model choice found no leakage (Ktrans = 0) ve is undefined (NaN) and has no effect: the
    curve is vp cp (0 without vp). A plasma-only voxel of a Tofts fit reads as 0 (Tofts has no vp)."""
    spec = tk.get_model(model)
    params = np.array(params, dtype=np.float64, ndmin=2)
    delay = np.broadcast_to(np.asarray(delay_s, dtype=np.float64), params.shape[:1])
    if spec.has_ve:
        no_leakage = (params[:, 0] == 0) & np.isnan(params[:, spec.index("ve")])
        params[no_leakage, spec.index("ve")] = 1.0
    defined = np.isfinite(params).all(axis=1) & np.isfinite(delay)
    curves = np.full((params.shape[0], np.size(t_s)), np.nan)
    if defined.any():
        curves[defined] = tk.concentration(spec.name, params[defined], t_s, cp, delay_s=delay[defined])
    return curves


def map_names(model: str, fit_delay: bool = False) -> list:
    """Names of the maps a fit of ``model`` gives (to check output files before a fit)."""
    return list(map_units(tk.get_model(model), fit_delay))


def map_units(spec, fit_delay: bool = False, uncertainty: str = "se") -> Dict[str, str]:
    """Units of every map of a fit of ``spec`` (or a network's, ``uncertainty='sd'``), '' when
    dimensionless; in the order of ``PKFit.maps``."""
    spec = tk.get_model(spec)
    units = dict(zip(spec.parameters, spec.units))
    derived = {}
    if spec.name in ("2cxm", "2cum"):
        derived["Ktrans"] = "1/min"
    if spec.has_ve:
        derived["kep"] = "1/min"
    if uncertainty == "sd":   # a network predicts the derived maps with their SD
        units.update(derived)
        units.update({f"{name}_sd": unit for name, unit in list(units.items())})
        units["status"] = ""
        return units
    units.update({f"{name}_se": unit for name, unit in zip(spec.parameters, spec.units)})
    units.update(derived)
    if fit_delay:
        units.update(delay_s="s", delay_s_se="s")
    units.update(R2="", rmse="mM", status="", selected_model="")
    return units
