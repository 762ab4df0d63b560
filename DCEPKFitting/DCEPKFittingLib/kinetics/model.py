"""The tracer-kinetic model of one protocol, fitted voxel by voxel: ``TracerKineticModel`` (after dipy's
reconst models: the model holds what does not depend on the data, ``fit`` returns a ``PKFit``).

    model = TracerKineticModel(times_s, aif_plasma_mM, "etofts")
    fit = model.fit(concentration_mM, mask)      # (K, J, I, T) or (N, T); mask (K, J, I) or (N,)
    fit.maps["Ktrans"], fit.maps["Ktrans_se"], fit.status, fit.predict()

All voxels of a chunk are fitted at once: one forward model and analytic Jacobian evaluation
(``tk_models``) per iteration serves the whole chunk, and voxels that have converged drop out of the
working set. The chunks run on the cores through ``core.runner`` (sized to the cores and to a memory
budget), with progress and cancel. On the CPU the engine runs on numpy (torch is not imported); on a GPU
(or a torch.device given) on torch, the same code (``array_backend``).

- ``method='linear'``: Patlak (exactly linear), linearised Tofts / extended Tofts (Murase's integral
  form), solved as box-constrained least squares. Fast, and the NLLS starting point.
- ``method='nlls'``: the exact (piecewise-linear AIF) model: variable projection for Tofts / extended
  Tofts, the exact bounded linear solution for Patlak, bounded Levenberg-Marquardt otherwise and whenever
  the arterial delay is fitted (initialised by a grid search).

Units as in ``tk_models``: time in s, Ktrans/PS/kep in 1/min, Fp in ml/100ml/min, ve/vp fractions,
concentration in mM. Standard errors come from sigma^2 (J^T J)^-1, sigma^2 = SSR/(T-P). A chunk is fitted by
``chunk_fit`` with ``linear``, ``varpro``, ``levenberg_marquardt`` and ``nested_models``.
"""

from typing import Optional

import numpy as np

from ..core import jobs, runner
from ..core.device import resolve_device
from ..core.errors import DCEPKInputError
from . import nested_models
from . import tk_models as tk
from .array_backend import NUMPY_OPS, torch_ops
from .chunk_fit import N_STARTS, fit_chunk
from .fit_result import FitStatus, PKFit, map_units
from .nested_models import SelectedModel

DEFAULT_DELAY_BOUNDS_S = (-10.0, 30.0)
LINEAR_MODELS = ("tofts", "etofts", "patlak")
METHODS = ("nlls", "linear")
# A chunk costs a few ms of Python besides its voxels (the iterations' loops over the frames): below
# this many voxels that cost shows.
MIN_CHUNK_VOXELS = 2048
# Working set per voxel and frame, in float64 values: curve, Jacobian (P columns) and temporaries of the
# iterative fits, times the starting points of the multistart models.
VALUES_PER_VOXEL_FRAME = 24


def _as_float_array(value, what):
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DCEPKInputError(f"{what} must be numeric: {exc}") from exc


def _checked_protocol(times_s, aif_plasma_mM, spec, fit_delay):
    """Frame times (s) and plasma input function (mM) as float64, or an error naming the problem."""
    times = _as_float_array(times_s, "the frame times")
    cp = _as_float_array(aif_plasma_mM, "the plasma input function")
    if times.ndim != 1:
        raise DCEPKInputError(f"frame times must be a 1-D array in seconds, got shape {times.shape}")
    n_frames = times.shape[0]
    needed = spec.n_params + 1 + (1 if fit_delay else 0)
    if n_frames < needed:
        raise DCEPKInputError(
            f"{n_frames} frames are too few to fit the {spec.name} model ({spec.n_params} parameters"
            f"{' + delay' if fit_delay else ''}): at least {needed} are needed; use a simpler model or more frames")
    if not np.all(np.isfinite(times)):
        raise DCEPKInputError("the frame times contain NaN or inf: check the series' timing information")
    if np.any(np.diff(times) <= 0):
        raise DCEPKInputError("frame times must increase strictly (seconds, one per frame): sort the frames "
                              "or fix the timing information")
    if cp.ndim != 1 or cp.shape[0] != n_frames:
        raise DCEPKInputError(f"the AIF has shape {cp.shape} but there are {n_frames} frame times: give one plasma "
                              "concentration (mM) per frame")
    if not np.all(np.isfinite(cp)):
        raise DCEPKInputError("the AIF contains NaN or inf: check the arterial ROI or the AIF file")
    return times, cp


def _checked_bounds(spec, lower, upper, fit_delay, delay_bounds_s):
    lower = np.array(spec.lower if lower is None else lower, dtype=np.float64)
    upper = np.array(spec.upper if upper is None else upper, dtype=np.float64)
    if lower.shape != (spec.n_params,) or upper.shape != (spec.n_params,) or np.any(lower >= upper):
        raise DCEPKInputError(f"bounds for {spec.name} must be {spec.n_params} values each with lower < upper "
                              f"(order {list(spec.parameters)})")
    if not (delay_bounds_s[0] < delay_bounds_s[1]):
        raise DCEPKInputError(f"delay_bounds_s must be (low, high) seconds with low < high, got {delay_bounds_s}")
    if fit_delay:
        lower, upper = np.append(lower, delay_bounds_s[0]), np.append(upper, delay_bounds_s[1])
    return lower, upper


class TracerKineticModel:
    """A tracer-kinetic model for one protocol: frame times ``times_s`` (s, strictly increasing, any
    spacing) and the plasma input function ``aif_plasma_mM`` (mM, one per frame, shared by all voxels).

    ``model``: a name in ``tk_models.MODELS``; ``method``: 'nlls' or 'linear' (see the module).
    ``fit_delay`` adds the arterial delay (s, within ``delay_bounds_s``), resolved to ``delay_step_s``
    (None: continuous). ``lower`` / ``upper`` override the model's bounds (P values each, OSIPI units).
    ``model_selection`` (Tofts, extended Tofts, Patlak without a fitted delay): each voxel gets the
    simplest of the nested models its data support (``nested_models``): no enhancement, plasma only, or
    a leakage model; where there is no leakage Ktrans is 0 and ve, kep are NaN (``selected_model``).
    ``signal_baseline``: the curves were converted from signal with each voxel's own pre-contrast
    baseline, whose noise the choice then allows for. ``device``: 'auto', 'cpu', 'cuda[:N]' (the rule of
    ``core.device``) or a torch.device (the torch engine, also on the CPU). ``threads`` and
    ``working_set_bytes`` size the chunks (``core.runner``; default: every core, 512 MiB).
    """

    def __init__(self, times_s, aif_plasma_mM, model: str = "etofts", *, method: str = "nlls",
                 fit_delay: bool = False, model_selection: bool = True, signal_baseline: bool = False,
                 lower=None, upper=None, delay_bounds_s=DEFAULT_DELAY_BOUNDS_S, delay_step_s: Optional[float] = 0.5,
                 max_iterations: int = 100, device="auto", threads: Optional[int] = None,
                 working_set_bytes: Optional[int] = None):
        self.spec = tk.get_model(model)
        if method not in METHODS:
            raise DCEPKInputError(f"unknown fitting method {method!r}: use 'nlls' or 'linear'")
        if method == "linear" and self.spec.name not in LINEAR_MODELS:
            raise DCEPKInputError(f"the {self.spec.name} model has no linear form: use method='nlls', or a linear "
                                  f"model ({', '.join(LINEAR_MODELS)})")
        self.method, self.fit_delay = method, bool(fit_delay)
        self.times_s, self.aif_plasma_mM = _checked_protocol(times_s, aif_plasma_mM, self.spec, self.fit_delay)
        self.lower, self.upper = _checked_bounds(self.spec, lower, upper, self.fit_delay, delay_bounds_s)
        self.default_bounds = lower is None and upper is None
        self.delay_bounds_s, self.delay_step_s = tuple(delay_bounds_s), delay_step_s
        self.max_iterations = int(max_iterations)
        self.model_selection = bool(model_selection) and self.spec.name in nested_models.NESTED_MODELS \
            and not self.fit_delay
        self.signal_baseline = bool(signal_baseline)
        self.device = device
        self.threads, self.working_set_bytes = threads, working_set_bytes

    @property
    def name(self) -> str:
        return self.spec.name

    def predict(self, params, delay_s=0.0) -> np.ndarray:
        """Concentration (mM) (..., T) of parameters (..., P) in OSIPI units on this protocol."""
        return tk.concentration(self.spec.name, params, self.times_s, self.aif_plasma_mM, delay_s=delay_s)

    def fit(self, data, mask=None, *, progress=None, cancel=None) -> PKFit:
        """Fit every curve of ``data`` (..., T) in mM, e.g. (K, J, I, T) or (N, T), inside ``mask`` (bool,
        ``data.shape[:-1]``; None: all). Returns a ``PKFit`` with maps of ``data.shape[:-1]``: outside the
        mask status MASKED and NaN; curves with NaN/inf status INVALID_INPUT and NaN. ``data`` is read
        chunk by chunk (no whole-volume float64 copy). ``progress(fraction, message)``, ``cancel`` as in
        ``core.jobs``."""
        data, grid, rows = self._checked_data(data, mask)
        engine = _Engine(self)
        out = _Outputs(rows.size, self.lower.size)
        curves = data.reshape(-1, data.shape[-1])  # a view where it can be: rows are read chunk by chunk
        bytes_per_voxel = 8.0 * VALUES_PER_VOXEL_FRAME * self.times_s.size * N_STARTS.get(self.spec.name, 1)
        plan = runner.plan_chunks(rows.size, bytes_per_voxel, threads=engine.threads,
                                  working_set_bytes=self.working_set_bytes, min_chunk=MIN_CHUNK_VOXELS)
        jobs.report(progress, 0.0, f"fitting {self.spec.name} to {rows.size} voxels")
        runner.run_chunks(lambda start, stop, scope: engine.fit_rows(curves, rows, start, stop, out, scope), plan,
                          progress=progress, cancel=cancel, message="fitted {done} of {total} voxels")
        return self._result(out, grid, rows, engine.device_name)

    def _checked_data(self, data, mask):
        data = np.asarray(data)
        if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
            raise DCEPKInputError(f"the concentration curves must be numeric (mM), got dtype {data.dtype}")
        if data.ndim < 1 or data.shape[-1] != self.times_s.size:
            raise DCEPKInputError(f"concentration curves must have the {self.times_s.size} frames of the frame times "
                                  f"in their last axis, got shape {data.shape}")
        grid = data.shape[:-1]
        if mask is None:
            return data, grid, np.arange(int(np.prod(grid)))
        selected = np.asarray(mask).astype(bool)
        if selected.shape != grid:
            raise DCEPKInputError(f"the mask has {selected.shape} voxels but the data have {grid}: resample the "
                                  "mask onto the data's grid first")
        return data, grid, np.flatnonzero(selected.ravel())

    def _result(self, out, grid, rows, device_name) -> PKFit:
        names = list(self.spec.parameters)
        maps = {name: out.params[:, i] for i, name in enumerate(names)}
        maps.update({f"{name}_se": out.stderr[:, i] for i, name in enumerate(names)})
        if self.spec.name in ("2cxm", "2cum"):
            # Ktrans = E * Fp with extraction E = PS / (PS + Fp), Fp converted to 1/min
            flow, ps = maps["Fp"] / 100.0, maps["PS"]
            with np.errstate(invalid="ignore", divide="ignore"):
                maps["Ktrans"] = flow * ps / (flow + ps)
        if self.spec.has_ve:
            with np.errstate(invalid="ignore", divide="ignore"):
                maps["kep"] = maps["Ktrans"] / maps["ve"]
        if self.fit_delay:
            maps["delay_s"], maps["delay_s_se"] = out.params[:, -1], out.stderr[:, -1]
        maps.update(R2=out.r2, rmse=out.rmse, status=out.status, selected_model=out.selected)
        fills = {"status": int(FitStatus.MASKED), "selected_model": int(SelectedModel.NOT_FITTED)}
        maps = {name: _on_grid(values, rows, grid, fills.get(name, np.nan)) for name, values in maps.items()}
        return PKFit(model=self.spec.name, method=self.method, maps=maps, units=map_units(self.spec, self.fit_delay),
                     times_s=self.times_s, aif_plasma_mM=self.aif_plasma_mM, device=device_name)


def _on_grid(values, rows, grid, fill):
    """Values of the fitted rows placed on the whole grid, ``fill`` elsewhere."""
    full = np.full(int(np.prod(grid)), fill, dtype=values.dtype)
    full[rows] = values
    return full.reshape(grid)


class _Outputs:
    """The fitted rows' results (N,), filled chunk by chunk (chunks write disjoint rows)."""

    def __init__(self, n_rows, n_out):
        self.params = np.full((n_rows, n_out), np.nan)
        self.stderr = np.full((n_rows, n_out), np.nan)
        self.r2 = np.full(n_rows, np.nan)
        self.rmse = np.full(n_rows, np.nan)
        self.status = np.full(n_rows, int(FitStatus.INVALID_INPUT), dtype=np.uint8)
        self.selected = np.full(n_rows, int(SelectedModel.NOT_FITTED), dtype=np.uint8)


class _Engine:
    """The model's protocol and bounds as arrays of the engine's library (numpy, or torch on a device)."""

    def __init__(self, model: TracerKineticModel):
        self.model = model
        explicit_torch = type(model.device).__module__ == "torch"   # a torch.device: the torch engine
        self.device_name = str(model.device) if explicit_torch else resolve_device(model.device)
        self.ops = torch_ops() if explicit_torch or self.device_name != "cpu" else NUMPY_OPS
        # a GPU runs one chunk at a time; torch on the CPU parallelises inside its kernels
        self.threads = model.threads if not self.ops.is_torch else 1
        like = None
        if self.ops.is_torch:
            like = self.ops.xp.zeros(0, dtype=self.ops.xp.float64, device=self.device_name)
        self.t, self.cp, self.lower, self.upper = (
            self.ops.asarray(values, like=like) for values in (model.times_s, model.aif_plasma_mM, model.lower,
                                                               model.upper))

    def fit_rows(self, curves, rows, start, stop, out, cancel) -> None:
        model = self.model
        block = np.asarray(curves[rows[start:stop]], dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)  # NaN/inf curves keep status INVALID_INPUT
        index = start + np.flatnonzero(finite)
        if not index.size:
            return
        y = self.ops.asarray(block[finite], like=self.t)
        with np.errstate(all="ignore"):   # NaN and inf are handled (status), not warned about
            results = fit_chunk(model.spec, y, self.t, self.cp, model.method, model.fit_delay, self.lower,
                                self.upper, model.max_iterations, model.delay_bounds_s, model.delay_step_s, cancel,
                                default_bounds=model.default_bounds, model_selection=model.model_selection,
                                baseline_aware=model.signal_baseline)
        x, se, r2, rmse, status, selected = (self.ops.to_numpy(value) for value in results)
        out.params[index], out.stderr[index], out.r2[index], out.rmse[index] = x, se, r2, rmse
        out.status[index], out.selected[index] = status.astype(np.uint8), selected.astype(np.uint8)
