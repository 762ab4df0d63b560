"""Batched voxel-wise tracer-kinetic fitting: linear fast paths and bounded Levenberg-Marquardt.

All voxels of a chunk are fitted at once with torch (CPU or CUDA): one forward model and
analytic Jacobian evaluation (``tk_models``) per iteration serves the whole chunk, and voxels
that have converged drop out of the working set. Chunks keep memory bounded; progress is
reported and cancel checked between chunks.

- ``method='linear'``: Patlak (exactly linear), linearised Tofts / extended Tofts (Murase's
  integral form), solved as box-constrained least squares. Fast, and the NLLS starting point.
- ``method='nlls'``: bounded Levenberg-Marquardt on the exact (piecewise-linear AIF) model,
  optionally with the arterial delay as an extra parameter (initialised by a grid search).

Units as in ``tk_models``: time in s, Ktrans/PS/kep in 1/min, Fp in ml/100ml/min, ve/vp
fractions, concentration in mM. Standard errors come from sigma^2 (J^T J)^-1, sigma^2 = SSR/(T-P).

This module is the driver (checks, chunks on threads, progress, cancel, the result's layout); a chunk is
fitted by ``chunk_fit`` with ``linear``, ``varpro``, ``levenberg_marquardt`` and ``nested_models``;
``fit_result`` holds what comes back.
"""

import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch

from ..core import jobs
from ..core.device import resolve_fit_device
from ..core.errors import DCEPKInputError
from . import nested_models
from . import tk_models as tk
from .chunk_fit import fit_chunk
from .fit_result import FitResult, FitStatus, map_units
from .nested_models import SelectedModel

DEFAULT_DELAY_BOUNDS_S = (-10.0, 30.0)
LINEAR_MODELS = ("tofts", "etofts", "patlak")


# ---------------------------------------------------------------------------------------------
# Input checks
def _as_float_array(value, what):
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DCEPKInputError(f"{what} must be numeric: {exc}") from exc


def _check_inputs(conc, t_s, cp, spec, fit_delay):
    conc = np.asarray(conc)  # converted chunk by chunk: a whole-volume float64 copy could exhaust memory
    if not (np.issubdtype(conc.dtype, np.floating) or np.issubdtype(conc.dtype, np.integer)):
        raise DCEPKInputError(f"the concentration curves must be numeric (mM), got dtype {conc.dtype}")
    t_s = _as_float_array(t_s, "the frame times")
    cp = _as_float_array(cp, "the plasma input function")
    if t_s.ndim != 1:
        raise DCEPKInputError(f"frame times must be a 1-D array in seconds, got shape {t_s.shape}")
    n_frames = t_s.shape[0]
    needed = spec.n_params + 1 + (1 if fit_delay else 0)
    if n_frames < needed:
        raise DCEPKInputError(
            f"{n_frames} frames are too few to fit the {spec.name} model ({spec.n_params} parameters"
            f"{' + delay' if fit_delay else ''}): at least {needed} are needed; use a simpler model or more frames")
    if not np.all(np.isfinite(t_s)):
        raise DCEPKInputError("the frame times contain NaN or inf: check the series' timing information")
    if np.any(np.diff(t_s) <= 0):
        raise DCEPKInputError("frame times must increase strictly (seconds, one per frame): sort the frames "
                              "or fix the timing information")
    if cp.ndim != 1 or cp.shape[0] != n_frames:
        raise DCEPKInputError(f"the AIF has shape {cp.shape} but there are {n_frames} frame times: give one plasma "
                              "concentration (mM) per frame")
    if not np.all(np.isfinite(cp)):
        raise DCEPKInputError("the AIF contains NaN or inf: check the arterial ROI or the AIF file")
    if conc.ndim != 2 or conc.shape[1] != n_frames:
        raise DCEPKInputError(f"concentration curves must be (voxels, {n_frames}) to match the frame times, "
                              f"got shape {conc.shape}")
    return conc, t_s, cp



def fit_curves(conc, t_s, cp, model, *, method="nlls", fit_delay=False, device="auto", dtype=torch.float64,
               chunk_voxels=20000, max_iterations=100, delay_bounds_s=DEFAULT_DELAY_BOUNDS_S, delay_step_s=0.5,
               lower=None, upper=None, progress=None, cancel=None, rows=None, model_selection=True,
               signal_baseline=False) -> FitResult:
    """Fit a tracer-kinetic model to each of N concentration curves.

    ``conc`` (N, T) mM; ``t_s`` (T,) s, strictly increasing (any spacing); ``cp`` (T,) plasma
    concentration in mM (one AIF for all curves). ``model``: a name in ``tk_models.MODELS``.
    ``method``: 'nlls' (exact model; variable projection for Tofts / extended Tofts, exact
    bounded linear solution for Patlak, bounded Levenberg-Marquardt otherwise and whenever the
    delay is fitted) or 'linear' (Patlak, Murase-linearised Tofts / extended Tofts).
    ``fit_delay`` adds the arterial delay (s, within ``delay_bounds_s``), resolved to
    ``delay_step_s`` (None: continuous). ``lower`` / ``upper`` override the model's bounds
    (P values each, OSIPI units). ``device`` 'auto' (CUDA if available), 'cpu' or 'cuda'; on CPU
    chunks are fitted in parallel, one per torch thread. Curves with NaN/inf get status
    INVALID_INPUT and NaN maps. ``rows`` (index array) fits only those rows of ``conc``, read chunk
    by chunk without copying the input.

    ``model_selection`` (Tofts, extended Tofts, Patlak without a fitted delay): each voxel gets the
    simplest of the nested models its data support (``nested_models``): no enhancement, plasma
    only, or a leakage model; where there is no leakage Ktrans is 0 and ve, kep are NaN. The
    choice is in ``selected_model``. ``signal_baseline``: the curves were converted from signal
    with each voxel's own pre-contrast baseline, whose noise the choice then allows for.
    """
    spec = tk.get_model(model)
    if method not in ("nlls", "linear"):
        raise DCEPKInputError(f"unknown fitting method {method!r}: use 'nlls' or 'linear'")
    if method == "linear" and spec.name not in LINEAR_MODELS:
        raise DCEPKInputError(f"the {spec.name} model has no linear form: use method='nlls', or a linear model "
                              f"({', '.join(LINEAR_MODELS)})")
    conc, t_np, cp_np = _check_inputs(conc, t_s, cp, spec, fit_delay)
    if chunk_voxels is None or int(chunk_voxels) < 1:
        raise DCEPKInputError(f"chunk_voxels must be a positive number of voxels, got {chunk_voxels!r}")
    if not (delay_bounds_s[0] < delay_bounds_s[1]):
        raise DCEPKInputError(f"delay_bounds_s must be (low, high) seconds with low < high, got {delay_bounds_s}")
    torch_device = resolve_fit_device(device)
    rows = np.arange(conc.shape[0]) if rows is None else np.asarray(rows)
    n_voxels = rows.size
    lower_np = np.array(spec.lower if lower is None else lower, dtype=np.float64)
    upper_np = np.array(spec.upper if upper is None else upper, dtype=np.float64)
    if lower_np.shape != (spec.n_params,) or upper_np.shape != (spec.n_params,) or np.any(lower_np >= upper_np):
        raise DCEPKInputError(f"bounds for {spec.name} must be {spec.n_params} values each with lower < upper "
                              f"(order {list(spec.parameters)})")
    if fit_delay:
        lower_np = np.append(lower_np, delay_bounds_s[0])
        upper_np = np.append(upper_np, delay_bounds_s[1])
    n_out = lower_np.size
    params = np.full((n_voxels, n_out), np.nan)
    stderr = np.full((n_voxels, n_out), np.nan)
    r2 = np.full(n_voxels, np.nan)
    rmse = np.full(n_voxels, np.nan)
    status = np.full(n_voxels, int(FitStatus.INVALID_INPUT), dtype=np.uint8)
    selected = np.full(n_voxels, int(SelectedModel.NOT_FITTED), dtype=np.uint8)
    choose = bool(model_selection) and spec.name in nested_models.NESTED_MODELS and not fit_delay

    t = torch.as_tensor(t_np, dtype=dtype, device=torch_device)
    cp_t = torch.as_tensor(cp_np, dtype=dtype, device=torch_device)
    lo = torch.as_tensor(lower_np, dtype=dtype, device=torch_device)
    hi = torch.as_tensor(upper_np, dtype=dtype, device=torch_device)
    chunk = int(chunk_voxels)
    default_bounds = lower is None and upper is None
    # Set by the user's cancel or when this call stops (an error, Ctrl-C): the chunks still running
    # on worker threads see it at their next iteration and stop too, instead of running to the end.
    stop = jobs.CancelScope(cancel)

    def fit_one(start):
        jobs.raise_if_cancelled(stop)
        block = np.asarray(conc[rows[start:start + chunk]], dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)  # NaN/inf curves keep status INVALID_INPUT
        index = start + np.flatnonzero(finite)
        if index.size:
            y = torch.as_tensor(block[finite], dtype=dtype, device=torch_device)
            x, se, r2_c, rmse_c, status_c, selected_c = fit_chunk(
                spec, y, t, cp_t, method, fit_delay, lo, hi, int(max_iterations), delay_bounds_s, delay_step_s,
                stop, default_bounds=default_bounds, model_selection=choose, baseline_aware=bool(signal_baseline))
            params[index] = x.double().cpu().numpy()
            stderr[index] = se.double().cpu().numpy()
            r2[index] = r2_c.double().cpu().numpy()
            rmse[index] = rmse_c.double().cpu().numpy()
            status[index] = status_c.cpu().numpy().astype(np.uint8)
            selected[index] = selected_c.cpu().numpy().astype(np.uint8)
        return min(start + chunk, n_voxels) - start

    jobs.report(progress, 0.0, f"fitting {spec.name} to {n_voxels} voxels")
    starts = list(range(0, n_voxels, chunk))
    done = 0
    if torch_device.type == "cpu" and threading.current_thread() is threading.main_thread():
        # The work is many small element-wise ops on (voxels,) vectors: torch's intra-op threads
        # gain little on them and lose much to synchronisation (10x slower on a busy machine), so
        # each core fits its own chunks instead (torch releases the GIL inside its kernels).
        # torch's thread count is process-wide: only the main thread changes it, for the fit's
        # duration; in a worker (Slicer's background job) chunks run in turn on torch's own threads.
        workers = max(1, min(torch.get_num_threads(), len(starts)))
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(fit_one, start) for start in starts]
                try:
                    for future in as_completed(futures):
                        done += future.result()
                        jobs.report(progress, done / max(n_voxels, 1), f"fitted {done} of {n_voxels} voxels")
                except BaseException:
                    stop.set()
                    for future in futures:
                        future.cancel()
                    raise
        finally:
            torch.set_num_threads(previous_threads)
    else:
        for start in starts:
            done += fit_one(start)
            jobs.report(progress, done / max(n_voxels, 1), f"fitted {done} of {n_voxels} voxels")
    jobs.raise_if_cancelled(cancel)
    names = list(spec.parameters)
    result = FitResult(
        model=spec.name,
        params={name: params[:, i] for i, name in enumerate(names)},
        stderr={name: stderr[:, i] for i, name in enumerate(names)},
        r2=r2, rmse=rmse, status=status,
        units=map_units(spec, fit_delay),
        t_s=t_np, cp=cp_np, method=method, shape=(n_voxels,), selected_model=selected)
    if fit_delay:
        result.delay_s = params[:, -1]
        result.delay_stderr = stderr[:, -1]
    return result



def fit_volume(conc, t_s, cp, model, mask=None, **kwargs) -> FitResult:
    """Fit every voxel of a DCE series ``conc`` (K, J, I, T) in mM (inside ``mask`` (K, J, I) if given).

    Keyword arguments as ``fit_curves``. Maps come back as (K, J, I) arrays; voxels outside the
    mask have status MASKED and NaN parameters.
    """
    conc = np.asarray(conc)
    if conc.ndim != 4:
        raise DCEPKInputError(f"a DCE series must be 4-D (k, j, i, t), got shape {conc.shape}: "
                              "use fit_curves for (voxels, t) arrays")
    grid = conc.shape[:3]
    if mask is None:
        selected = np.ones(grid, dtype=bool)
    else:
        selected = np.asarray(mask).astype(bool)
        if selected.shape != grid:
            raise DCEPKInputError(f"the mask has {selected.shape} voxels (k, j, i) but the series has {grid}: "
                                  "resample the mask onto the series' grid first")
    flat_index = np.flatnonzero(selected.ravel())
    curves = conc.reshape(-1, conc.shape[3])  # a view: rows are read chunk by chunk
    result = fit_curves(curves, t_s, cp, model, rows=flat_index, **kwargs)

    def expand(values, fill, dtype=np.float64):
        full = np.full(int(np.prod(grid)), fill, dtype=dtype)
        full[flat_index] = values
        return full.reshape(grid)

    result.params = {k: expand(v, np.nan) for k, v in result.params.items()}
    result.stderr = {k: expand(v, np.nan) for k, v in result.stderr.items()}
    result.r2 = expand(result.r2, np.nan)
    result.rmse = expand(result.rmse, np.nan)
    result.status = expand(result.status, int(FitStatus.MASKED), np.uint8)
    result.selected_model = expand(result.selected_model, int(SelectedModel.NOT_FITTED), np.uint8)
    if result.delay_s is not None:
        result.delay_s = expand(result.delay_s, np.nan)
        result.delay_stderr = expand(result.delay_stderr, np.nan)
    result.shape = grid
    return result
