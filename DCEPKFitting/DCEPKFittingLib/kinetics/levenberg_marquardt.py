"""Bounded Levenberg-Marquardt, batched over voxels, and the block evaluation of the forward model
that lets a cancel reach a running iteration."""

import numpy as np

from ..core import jobs
from . import tk_models as tk
from .array_backend import array_ops


# Curves per forward-model call in the iterative fits: between blocks the cancel flag is checked, so
# a cancel reaches a chunk's iteration within one block's time (~0.3 s for 2CXM on a busy core).
EVALUATION_BLOCK = 8192


def in_blocks(evaluate, n, n_frames, cancel):
    """``evaluate(rows)`` for blocks of rows (slices), the outputs (tensors or tuples) concatenated.

    No block is smaller than the batch above which ``tk_models`` scans the curves step by step (its
    method, and so its rounding, depends on the batch size), so the results are those of one call."""
    size = max(EVALUATION_BLOCK, tk._SCAN_BUDGET // (8 * max(n_frames - 1, 1)) + 1)
    if n < 2 * size:
        return evaluate(slice(0, n))
    bounds = np.linspace(0, n, n // size + 1).astype(int)
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        jobs.raise_if_cancelled(cancel)
        parts.append(evaluate(slice(int(start), int(stop))))
    ops = array_ops(parts[0][0] if isinstance(parts[0], tuple) else parts[0])
    if isinstance(parts[0], tuple):
        return tuple(ops.concat(list(outputs), 0) for outputs in zip(*parts))
    return ops.concat(parts, 0)


def clip_to_bounds(x, lower, upper):
    ops = array_ops(x)
    return ops.maximum(ops.minimum(x, upper), lower)


def levenberg_marquardt(spec, y, t, cp, x0, lower, upper, fit_delay, max_iterations, cancel=None,
                         fixed_delay=None):
    """Minimise |y - f(x)|^2 per voxel within [lower, upper]. x (n, P[+1]); the delay, if fitted, is last.

    Marquardt's scaling (damping proportional to diag(J^T J)) makes the step independent of the
    parameters' units. Variables sitting on a bound with the gradient pushing outward are frozen
    for that step (a projected, active-set LM). Returns x, SSR, J^T J at x, converged flag.
    """
    ops = array_ops(y)
    n, p = x0.shape
    n_model = spec.n_params
    x = clip_to_bounds(ops.copy(x0), lower, upper)

    def evaluate(xs, ys_index):
        delay = xs[:, n_model] if fit_delay else (0.0 if fixed_delay is None else fixed_delay[ys_index])

        def rows(part):
            part_delay = delay if isinstance(delay, float) else delay[part]
            return tk.concentration_and_jacobian(spec.name, xs[part, :n_model], t, cp, part_delay,
                                                 with_delay=fit_delay)
        f, jac = in_blocks(rows, xs.shape[0], t.shape[0], cancel)
        r = y[ys_index] - f
        return r, jac

    all_index = ops.arange(n, like=y)
    r, jac = evaluate(x, all_index)
    ssr = (r * r).sum(-1)
    hess = ops.swap_last(jac) @ jac
    grad = (jac * r[..., None]).sum(-2)
    damping = ops.full((n,), 1e-3, like=y)
    converged = ops.zeros(n, like=y, dtype="bool")
    active = ops.copy(all_index)
    eye = ops.eye(p, like=y)
    span = ops.clamp(upper - lower, max=1e3)
    for _ in range(max_iterations):
        if ops.numel(active) == 0:
            break
        jobs.raise_if_cancelled(cancel)
        xa, ga, ha, lam = x[active], grad[active], hess[active], damping[active]
        at_lower = (xa <= lower) & (ga <= 0)
        at_upper = (xa >= upper) & (ga >= 0)
        free = ~(at_lower | at_upper)
        both = free[:, :, None] & free[:, None, :]
        diag = ops.clamp(ops.diagonal(ha), min=1e-30)
        system = ops.where(both, ha, eye) + ops.diag_embed(ops.where(free, lam[:, None] * diag, 0 * diag))
        step, _ = ops.solve(system, ops.where(free, ga, 0 * ga))
        step = ops.nan_to_num(step)
        trial = clip_to_bounds(xa + step, lower, upper)
        r_t, jac_t = evaluate(trial, active)
        ssr_t = (r_t * r_t).sum(-1)
        ssr_a = ssr[active]
        accept = ssr_t < ssr_a
        idx = active[accept]
        x[idx] = trial[accept]
        ssr[idx] = ssr_t[accept]
        grad[idx] = (jac_t[accept] * r_t[accept][..., None]).sum(-2)
        hess[idx] = ops.swap_last(jac_t[accept]) @ jac_t[accept]
        moved = ops.abs(trial - xa) / (ops.abs(xa) + 1e-6 * span)
        small_gain = (ssr_a - ssr_t) <= 1e-10 * ssr_a + 1e-30
        done = (accept & (small_gain | (ops.amax(moved, -1) < 1e-9))) | (~accept & (lam > 1e8))
        # Marquardt's damping update: relax after success, stiffen after failure
        damping[active] = ops.where(accept, ops.clamp(lam / 5, min=1e-9), lam * 8)
        converged[active[done]] = True
        active = active[~done]
    return x, ssr, hess, converged
