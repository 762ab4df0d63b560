"""What a fit returns: the per-voxel ``FitStatus`` codes, ``FitResult`` (maps, standard errors, R2,
rmse, status, selected model) and the names and units of its maps. numpy only: reading a result, or
checking output names before a fit, never imports torch.
"""

import enum
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from ..core.errors import DCEPKInputError
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



@dataclass
class FitResult:
    """Fitted maps for N voxels (``shape`` is (N,) or the (K, J, I) grid of ``fit_volume``)."""
    model: str
    params: Dict[str, np.ndarray]
    stderr: Dict[str, np.ndarray]
    r2: np.ndarray
    rmse: np.ndarray
    status: np.ndarray
    units: Dict[str, str]
    t_s: np.ndarray
    cp: np.ndarray
    delay_s: Optional[np.ndarray] = None
    delay_stderr: Optional[np.ndarray] = None
    method: str = "nlls"
    shape: tuple = field(default=())
    selected_model: Optional[np.ndarray] = None   # nested_models.SelectedModel code per voxel (uint8)

    def maps(self) -> Dict[str, np.ndarray]:
        """Flat dict of maps named after ARCHITECTURE.md: parameters, derived kep / Ktrans,
        ``<name>_se``, ``R2``, ``rmse``, ``status`` (and ``delay_s``, ``delay_s_se`` if fitted)."""
        spec = tk.get_model(self.model)
        out = {name: self.params[name] for name in spec.parameters}
        for name in spec.parameters:
            out[name + "_se"] = self.stderr[name]
        if spec.name in ("2cxm", "2cum"):
            # Ktrans = E * Fp with extraction E = PS / (PS + Fp), Fp converted to 1/min
            flow = self.params["Fp"] / 100.0
            ps = self.params["PS"]
            with np.errstate(invalid="ignore", divide="ignore"):
                out["Ktrans"] = flow * ps / (flow + ps)
        if spec.has_ve:
            with np.errstate(invalid="ignore", divide="ignore"):
                out["kep"] = out["Ktrans"] / self.params["ve"]
        if self.delay_s is not None:
            out["delay_s"] = self.delay_s
            out["delay_s_se"] = self.delay_stderr
        out["R2"] = self.r2
        out["rmse"] = self.rmse
        out["status"] = self.status
        if self.selected_model is not None:
            out["selected_model"] = self.selected_model
        return out

    def parameter_array(self) -> np.ndarray:
        """Parameters as (..., P) in the model's order."""
        spec = tk.get_model(self.model)
        return np.stack([self.params[name] for name in spec.parameters], axis=-1)

    def fitted_curve(self, index) -> np.ndarray:
        """Model concentration (mM) at the frame times for one voxel (flat index or (k, j, i))."""
        params = self.parameter_array()[index]
        delay = 0.0 if self.delay_s is None else float(self.delay_s[index])
        if params.ndim != 1:
            raise DCEPKInputError(f"index {index!r} does not name a single voxel of a {self.status.shape} result: "
                                  "give a flat voxel index or (k, j, i)")
        return model_curve(self.model, params, self.t_s, self.cp, delay_s=delay)


def model_curve(model, params, t_s, cp, delay_s=0.0) -> np.ndarray:
    """Concentration (mM) of one voxel's reported parameters (P,); NaN if it was not fitted.

    Where the model choice found no leakage (Ktrans = 0) ve is undefined (NaN) and has no effect:
    the curve is vp cp (0 without vp). A plasma-only voxel of a Tofts fit reads as 0 (Tofts has no vp).
    """
    spec = tk.get_model(model)
    params = np.array(params, dtype=np.float64)
    if spec.has_ve and params[0] == 0 and np.isnan(params[spec.index("ve")]):
        params[spec.index("ve")] = 1.0
    if not np.all(np.isfinite(params)):
        return np.full(np.shape(t_s), np.nan)
    return tk.concentration(spec.name, params, t_s, cp, delay_s=delay_s)


def map_names(model: str, fit_delay: bool = False) -> list:
    """Names of the maps ``FitResult.maps()`` gives for ``model`` (to check output files before a fit)."""
    return list(map_units(tk.get_model(model), fit_delay))


def map_units(spec, fit_delay):
    """Units of every map ``FitResult.maps()`` returns ('' for dimensionless)."""
    units = dict(zip(spec.parameters, spec.units))
    units.update({name + "_se": unit for name, unit in zip(spec.parameters, spec.units)})
    if spec.name in ("2cxm", "2cum"):
        units["Ktrans"] = "1/min"
    if spec.has_ve:
        units["kep"] = "1/min"
    if fit_delay:
        units.update(delay_s="s", delay_s_se="s")
    units.update(R2="", rmse="mM", status="", selected_model="")
    return units

