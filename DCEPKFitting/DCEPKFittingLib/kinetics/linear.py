"""Linear least squares, batched: box-constrained small normal equations solved exactly (all active
sets enumerated), the linearised Tofts / extended Tofts (Murase's integral form) and Patlak fits.
Fast, exact for Patlak, and the starting point of the nonlinear fits."""

import itertools

from . import tk_models as tk
from .array_backend import array_ops
from .nested_models import ChunkFit


def bounded_normal_solve(gram, rhs, yy, lower, upper):
    """Minimise |y - X theta|^2 subject to lower <= theta <= upper for each voxel.

    ``gram`` (n, P, P) = X^T X, ``rhs`` (n, P) = X^T y, ``yy`` (n,) = y^T y; bounds (P,) or (n, P).
    The problem is convex, so the constrained optimum is the best feasible solution among all
    3^P choices of each variable being free or fixed at a bound. Returns theta (n, P), SSR (n,).
    """
    ops = array_ops(gram)
    n, p = rhs.shape
    lower = ops.broadcast_to(lower, (n, p))
    upper = ops.broadcast_to(upper, (n, p))
    ridge = ops.clamp(ops.diagonal(gram).sum(-1), min=1e-30) * 1e-12
    eye = ops.eye(p, like=gram)
    # most voxels' unconstrained optimum is feasible: enumerate active sets only for the others
    theta, solved = ops.solve(gram + ridge[:, None, None] * eye, rhs)
    inside = ((theta >= lower) & (theta <= upper)).all(-1) & solved
    if bool(inside.all()):
        return theta, yy - (theta * rhs).sum(-1)
    if bool(inside.any()):
        outside = ~inside
        theta_out, ssr_out = bounded_normal_solve(gram[outside], rhs[outside], yy[outside], lower[outside],
                                                  upper[outside])
        theta = ops.copy(theta)
        ssr = yy - (theta * rhs).sum(-1)
        theta[outside], ssr[outside] = theta_out, ssr_out
        return theta, ssr
    best_theta = ops.zeros_like(rhs)
    best_ssr = ops.full_like(yy, float("inf"))
    for combo in itertools.product((0, 1, 2), repeat=p):  # 0 free, 1 at lower, 2 at upper
        free = ops.asarray([c == 0 for c in combo], like=gram, dtype="bool")
        at_lower = ops.asarray([c == 1 for c in combo], like=gram, dtype="bool")
        fixed_value = ops.where(free, ops.zeros_like(lower), ops.where(at_lower, lower, upper))
        both = free[:, None] & free[None, :]
        system = ops.where(both, gram, eye) + ridge[:, None, None] * ops.diag_embed(ops.asarray([float(c == 0) for c in combo], like=gram))
        b = ops.where(free, rhs - (gram @ fixed_value[..., None])[..., 0], fixed_value)
        theta, solved = ops.solve(system, b)
        ssr = yy - 2 * (theta * rhs).sum(-1) + (theta * (gram @ theta[..., None])[..., 0]).sum(-1)
        tolerance = ops.clamp(ops.abs(upper - lower), max=1e6) * 1e-9 + 1e-12
        feasible = ((theta >= lower - tolerance) & (theta <= upper + tolerance)).all(-1) & solved
        better = feasible & (ssr < best_ssr)
        best_theta = ops.where(better[:, None], ops.clamp(theta, lower, upper), best_theta)
        best_ssr = ops.where(better, ssr, best_ssr)
    return best_theta, best_ssr


def cumtrapz(values, t):
    ops = array_ops(values)
    increments = 0.5 * (values[..., 1:] + values[..., :-1]) * (t[1:] - t[:-1])
    return ops.concat([ops.zeros_like(values[..., :1]), ops.cumsum(increments, -1)])


def linear_fit(spec, y, t, cp, delay_s=0.0):
    """Linear least-squares fit; returns parameters (n, P) in OSIPI units and SSR of the linear model.

    Patlak is linear. Tofts / extended Tofts use Murase's integral form
    C = (Ktrans + kep vp) int cp - kep int C + vp cp (vp = 0 for Tofts); for the two-compartment
    models it returns the extended Tofts (2CXM) or Patlak (2CUM) estimates as starting values.
    """
    ops = array_ops(y)
    if not (isinstance(delay_s, float) and delay_s == 0.0):
        cp, _ = tk.shift_curve(t, cp, ops.asarray(delay_s, like=y))
    n = y.shape[0]
    int_cp = cumtrapz(cp, t)  # mM s
    yy = (y * y).sum(-1)
    if spec.name in ("patlak", "2cum"):
        design = ops.stack(ops.broadcast_arrays(int_cp / 60.0, cp), -1)  # Ktrans in 1/min
        if design.ndim == 2:
            gram = ops.broadcast_to(design.T @ design, (n, 2, 2))
            rhs = y @ design
        else:
            gram = ops.swap_last(design) @ design
            rhs = (design * y[..., None]).sum(-2)
        lower = ops.asarray([0.0, 0.0], like=y)
        upper = ops.asarray([5.0, 1.0], like=y)
        return bounded_normal_solve(gram, rhs, yy, lower, upper)
    with_vp = spec.name in ("etofts", "2cxm")
    int_y = cumtrapz(y, t)
    columns = [ops.broadcast_to(int_cp, y.shape) / 60.0, -int_y / 60.0]  # A and kep in 1/min
    if with_vp:
        columns.append(ops.broadcast_to(cp, y.shape))
    design = ops.stack(columns, -1)  # (n, T, P)
    gram = ops.swap_last(design) @ design
    rhs = (design * y[..., None]).sum(-2)
    lower = ops.asarray([0.0, 1e-3, 0.0][: design.shape[-1]], like=y)
    upper = ops.asarray([10.0, 100.0, 1.0][: design.shape[-1]], like=y)
    theta, ssr = bounded_normal_solve(gram, rhs, yy, lower, upper)
    a, kep = theta[:, 0], theta[:, 1]
    vp = theta[:, 2] if with_vp else ops.zeros_like(a)
    ktrans = ops.clamp(a - kep * vp, min=0.0)
    ve = ktrans / kep
    if spec.name == "tofts":
        return ops.stack([ktrans, ve], -1), ssr
    return ops.stack([ktrans, ve, vp], -1), ssr


def patlak_fit(y, t, cp, lower, upper):
    """Patlak by bounded linear least squares: the model is linear in (Ktrans, vp) and the trapezoid
    integral of a piecewise-linear AIF is exact, so this is its nonlinear least-squares solution.
    Everything comes from two dot products per voxel (no (n, T) model curves)."""
    ops = array_ops(y)
    design = ops.stack([cumtrapz(cp, t) / 60.0, cp], -1)          # (T, 2); Ktrans in 1/min
    n = y.shape[0]
    gram = ops.broadcast_to(design.T @ design, (n, 2, 2))
    x, ssr = bounded_normal_solve(gram, y @ design, (y * y).sum(-1), lower, upper)
    residual_sum = y.sum(-1) - x @ design.sum(0)
    return ChunkFit(x, ops.clamp(ssr, min=0.0), ops.copy(gram), ops.full((n,), True, like=y, dtype="bool"),
                    residual_sum)
