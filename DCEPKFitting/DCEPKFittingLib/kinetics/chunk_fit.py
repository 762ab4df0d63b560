"""One chunk of curves fitted as ``TracerKineticModel.fit`` asks: the strategy per model (exact Patlak, variable
projection for Tofts / extended Tofts with a bounded refit where it must, multistart bounded
Levenberg-Marquardt for the two-compartment models), the arterial delay, the per-voxel model choice,
and the standard errors, R2, rmse and status of the result."""

import numpy as np

from ..core import jobs
from . import nested_models
from . import tk_models as tk
from .array_backend import array_ops
from .fit_result import FitStatus
from .levenberg_marquardt import clip_to_bounds, in_blocks, levenberg_marquardt
from .linear import linear_fit, patlak_fit
from .nested_models import ChunkFit, SelectedModel
from .varpro import outside_varpro, varpro_tofts


# ---------------------------------------------------------------------------------------------
# Starting values
def _initial_values(spec, y, t, cp, lower, upper, delay, n_starts=1, cancel=None):
    """Starting parameters (n, n_starts, P).

    Tofts / extended Tofts / Patlak: the linear fit. The two-compartment models have local
    minima, so their starts are the ``n_starts`` best (by SSR, one forward evaluation each) of a
    small grid of flows and plasma volumes combined with the extended Tofts / Patlak estimates.
    """
    ops = array_ops(y)
    linear, _ = linear_fit(spec, y, t, cp, delay)
    n = y.shape[0]
    lower, upper = lower[: spec.n_params], upper[: spec.n_params]
    if spec.name in ("tofts", "etofts", "patlak"):
        default = ops.asarray(spec.initial, like=y)
        # a degenerate linear estimate (ve at 0 or inf) is replaced by the typical value
        x0 = ops.where(ops.isfinite(linear) & (linear >= lower) & (linear <= upper), linear, default)
        return x0[:, None, :]
    ktrans = ops.clamp(linear[:, 0], 1e-4, 3.0)
    vp_linear = ops.clamp(linear[:, -1], 0.005, 0.5)
    candidates = []
    for flow in (3.0, 8.0, 20.0, 50.0, 120.0):
        flow_per_min = flow / 100.0
        # Ktrans = PS*F/(PS+F)  =>  PS = Ktrans*F/(F-Ktrans) when F > Ktrans
        ps = ops.where(flow_per_min > 1.2 * ktrans,
                       ktrans * flow_per_min / ops.clamp(flow_per_min - ktrans, min=1e-6), 5 * ktrans)
        fp = ops.full_like(ktrans, flow)
        for vp in (vp_linear, ops.full_like(ktrans, 0.03), ops.full_like(ktrans, 0.1)):
            if spec.name == "2cxm":
                ve = ops.clamp(linear[:, 1], 0.02, 0.9)
                candidates.append(ops.stack([fp, ps, ve, vp], -1))
            else:
                candidates.append(ops.stack([fp, ps, vp], -1))
    candidates.append(ops.broadcast_to(ops.asarray(spec.initial, like=y), (n, spec.n_params)))
    candidates = clip_to_bounds(ops.stack(candidates, 1), lower, upper)
    k = candidates.shape[1]
    delay_rep = delay if isinstance(delay, float) else ops.broadcast_to(delay[:, None], (n, k)).reshape(-1)
    flat = candidates.reshape(n * k, -1)
    f = in_blocks(lambda part: tk.concentration(spec.name, flat[part], t, cp,
                                                 delay_rep if isinstance(delay_rep, float) else delay_rep[part]),
                   n * k, t.shape[0], cancel).reshape(n, k, -1)
    ssr = ((y[:, None, :] - f) ** 2).sum(-1)
    best = ssr.argsort(1)[:, :n_starts]
    return ops.take_along(candidates, ops.broadcast_to(best[..., None], (n, best.shape[1], spec.n_params)), 1)


N_STARTS = {"2cxm": 3, "2cum": 2}


def _delay_grid_search(spec, y, t, cp, delay_bounds_s, cancel=None):
    """Per-voxel delay (n,) minimising the linear-model SSR over a grid of shared delays."""
    ops = array_ops(y)
    step = max(float((t[1:] - t[:-1]).min()), 0.5)
    grid = np.arange(delay_bounds_s[0], delay_bounds_s[1] + 1e-9, step)
    best_ssr = ops.full((y.shape[0],), float("inf"), like=y)
    best_delay = ops.zeros_like(best_ssr)
    for delay in grid:
        jobs.raise_if_cancelled(cancel)
        _, ssr = linear_fit(spec, y, t, cp, float(delay) if delay != 0 else 0.0)
        better = ssr < best_ssr
        best_ssr = ops.where(better, ssr, best_ssr)
        best_delay = ops.where(better, ops.full_like(best_delay, float(delay)), best_delay)
    return best_delay



def _exact_model_fit(spec, y, t, cp, x):
    """SSR, J^T J and residual sum of the exact model at x (for estimates from a linear solve)."""
    ops = array_ops(y)
    f, jac = tk.concentration_and_jacobian(spec.name, x, t, cp)
    residual = y - f
    converged = ops.full((y.shape[0],), True, like=y, dtype="bool")
    return ChunkFit(x, (residual * residual).sum(-1), ops.swap_last(jac) @ jac, converged, residual.sum(-1))


def _refit_bounded(spec, y, t, cp, index, fit, lower, upper, max_iterations, cancel):
    """The bounded LM from where ``fit`` left the voxels ``index``; a ``ChunkFit`` of those voxels."""
    ops = array_ops(y)
    x0 = fit.x[index]
    x0 = ops.where(ops.isfinite(x0), x0, ops.asarray(spec.initial, like=y))
    x, ssr, hess, converged = levenberg_marquardt(spec, y[index], t, cp, x0, lower, upper, False, max_iterations,
                                                   cancel)
    return ChunkFit(x, ssr, hess, converged, nested_models.residual_sums(spec, y[index], t, cp, x))


def _fit_model(spec, y, t, cp, method, lower, upper, max_iterations, cancel, default_bounds, defer_refit=False):
    """The model fitted to every curve (no delay) as a ``ChunkFit``. With ``defer_refit`` the
    variable-projection voxels that need the bounded LM are only marked (``refit``), not refitted."""
    if spec.name == "patlak":
        return patlak_fit(y, t, cp, lower, upper)
    if method == "linear":   # the exact model at the linear estimate gives SSR and errors
        x, _ = linear_fit(spec, y, t, cp)
        return _exact_model_fit(spec, y, t, cp, clip_to_bounds(x, lower, upper))
    if spec.name in ("tofts", "etofts") and default_bounds:
        fit = ChunkFit(*varpro_tofts(spec, y, t, cp, max_iterations, cancel))
        outside = outside_varpro(fit.x, fit.converged, lower, upper)
        if defer_refit:
            fit.refit = outside
        elif bool(outside.any()):
            redo = array_ops(y).nonzero(outside)
            fit.assign(redo, _refit_bounded(spec, y, t, cp, redo, fit, lower, upper, max_iterations, cancel))
        return fit
    return ChunkFit(*_fit_multistart(spec, y, t, cp, lower, upper, False, 0.0, max_iterations, cancel))


def _fit_multistart(spec, y, t, cp, lower, upper, fit_delay, delay, max_iterations, cancel):
    """Bounded LM from ``N_STARTS`` starting points per curve; the lowest SSR wins."""
    ops = array_ops(y)
    starts = N_STARTS.get(spec.name, 1)
    n, n_frames = y.shape
    x0 = _initial_values(spec, y, t, cp, lower, upper, delay, starts, cancel)  # (n, starts, P)
    if fit_delay:
        x0 = ops.concat([x0, ops.broadcast_to(delay[:, None, None], (n, starts, 1))])
    # every start is fitted as its own curve
    y_rep = ops.broadcast_to(y[:, None, :], (n, starts, n_frames)).reshape(n * starts, n_frames)
    x, ssr, hess, converged = levenberg_marquardt(spec, y_rep, t, cp, x0.reshape(n * starts, -1), lower,
                                                   upper, fit_delay, max_iterations, cancel)
    if starts > 1:
        best = ssr.reshape(n, starts).argmin(1) + ops.arange(n, like=y) * starts
        x, ssr, hess, converged = x[best], ssr[best], hess[best], converged[best]
    return x, ssr, hess, converged


def _fit_with_delay(spec, y, t, cp, method, lower, upper, max_iterations, delay_bounds_s, delay_step_s, cancel):
    """The model and the arterial delay (last parameter), as a ``ChunkFit``."""
    ops = array_ops(y)
    delay = _delay_grid_search(spec, y, t, cp, delay_bounds_s, cancel)
    if method == "linear":
        x, _ = linear_fit(spec, y, t, cp, delay)
        x = ops.concat([clip_to_bounds(x, lower[: spec.n_params], upper[: spec.n_params]), delay[:, None]])
        # residuals and Jacobian of the exact model at the linear estimate give SSR and errors
        f, jac = tk.concentration_and_jacobian(spec.name, x[:, : spec.n_params], t, cp, x[:, spec.n_params],
                                               with_delay=True)
        converged = ops.full((y.shape[0],), True, like=y, dtype="bool")
        return ChunkFit(x, ((y - f) ** 2).sum(-1), ops.swap_last(jac) @ jac, converged)
    x, ssr, hess, converged = _fit_multistart(spec, y, t, cp, lower, upper, True, delay, max_iterations, cancel)
    if delay_step_s:
        # Resolve the delay to a grid step: below ~0.5 s the delay trades off against vp / PS
        # within the noise, and a snapped delay with the other parameters refitted is steadier.
        delay = ops.round(x[:, -1] / delay_step_s) * delay_step_s
        delay = ops.clamp(delay, float(lower[-1]), float(upper[-1]))
        x_fixed, ssr, hess_fixed, converged = levenberg_marquardt(
            spec, y, t, cp, ops.contiguous(x[:, :-1]), lower[:-1], upper[:-1], False, max_iterations, cancel,
            fixed_delay=delay)
        x = ops.concat([x_fixed, delay[:, None]])
        # the delay keeps the curvature from the free fit so its standard error stays defined
        hess[:, :-1, :-1] = hess_fixed
    return ChunkFit(x, ssr, hess, converged)


def fit_chunk(spec, y, t, cp, method, fit_delay, lower, upper, max_iterations, delay_bounds_s, delay_step_s,
               cancel, default_bounds=True, model_selection=False, baseline_aware=False):
    """Fit one chunk; returns x, standard errors, R2, rmse, status and the selected model per voxel.

    ``model_selection`` chooses each voxel's model among the nested ones (``nested_models``);
    ``baseline_aware``: the curves were converted from signal with a baseline of their own.
    """
    if fit_delay:
        fit = _fit_with_delay(spec, y, t, cp, method, lower, upper, max_iterations, delay_bounds_s, delay_step_s,
                              cancel)
    else:
        fit = _fit_model(spec, y, t, cp, method, lower, upper, max_iterations, cancel, default_bounds,
                         defer_refit=model_selection)
    if model_selection:
        def refit(index, subset_fit):
            return _refit_bounded(spec, y, t, cp, index, subset_fit, lower, upper, max_iterations, cancel)

        def fit_submodel(name, curves):
            sub = tk.get_model(name)
            where = [spec.parameters.index(p) for p in sub.parameters]
            sub_fit = _fit_model(sub, curves, t, cp, method, lower[where], upper[where], max_iterations, cancel,
                                 default_bounds)
            if sub_fit.residual_sum is None:
                sub_fit.residual_sum = nested_models.residual_sums(sub, curves, t, cp, sub_fit.x)
            return sub_fit

        fit = nested_models.choose(spec, y, t, cp, fit, baseline_aware, refit, fit_submodel, lower, upper)
    else:
        ops = array_ops(y)
        fit.free = ops.full(tuple(fit.x.shape), True, like=y, dtype="bool")
        fit.selected = ops.full(tuple(fit.ssr.shape), int(nested_models.MODEL_CODES[spec.name]), like=y,
                                dtype="uint8")
    return _summarise(y, fit, lower, upper)


def _summarise(y, fit, lower, upper):
    """Standard errors sigma^2 (J^T J)^-1 over the free parameters, R2, rmse and status."""
    ops = array_ops(y)
    n_frames = y.shape[1]
    free = fit.free
    n_free = free.sum(-1)
    sigma2 = fit.ssr / ops.clamp(n_frames - n_free, min=1)
    eye = ops.eye(free.shape[1], like=fit.hess)
    cov, inverted = ops.inv(ops.where(free[:, :, None] & free[:, None, :], fit.hess, eye))
    variance = ops.diagonal(cov)
    stderr = ops.sqrt(sigma2[:, None] * ops.clamp(variance, min=0))
    stderr = ops.where(inverted[:, None] & (variance >= 0) & free, stderr, ops.full_like(stderr, float("nan")))
    sst = ((y - y.mean(-1)[:, None]) ** 2).sum(-1)
    # R2 of a flat curve, or of the flat (zero) model of no enhancement, is undefined
    explained = (sst > 0) & (fit.selected != int(SelectedModel.NO_ENHANCEMENT))
    r2 = ops.where(explained, 1.0 - fit.ssr / ops.clamp(sst, min=1e-300), ops.full_like(sst, float("nan")))
    rmse = ops.sqrt(fit.ssr / n_frames)
    tolerance = ops.clamp(ops.abs(upper - lower), max=1e3) * 1e-9
    on_bound = (free & ((fit.x <= lower + tolerance) | (fit.x >= upper - tolerance))).any(-1)
    ok = fit.converged & ops.where(free, ops.isfinite(fit.x), True).all(-1) & ops.isfinite(fit.ssr)
    status = ops.where(ok, ops.where(on_bound, int(FitStatus.AT_BOUND), int(FitStatus.FITTED)),
                       int(FitStatus.NOT_CONVERGED))
    status = ops.where(fit.selected == int(nested_models.SelectedModel.NO_ENHANCEMENT),
                       int(FitStatus.NOT_ENHANCING), status)
    return fit.x, stderr, r2, rmse, status, fit.selected
