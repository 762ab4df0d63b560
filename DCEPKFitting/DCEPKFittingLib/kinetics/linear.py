"""Linear least squares, batched: box-constrained small normal equations solved exactly (all active
sets enumerated), the linearised Tofts / extended Tofts (Murase's integral form) and Patlak fits.
Fast, exact for Patlak, and the starting point of the nonlinear fits."""

import itertools

import torch

from . import tk_models as tk
from .nested_models import ChunkFit


def bounded_normal_solve(gram, rhs, yy, lower, upper):
    """Minimise |y - X theta|^2 subject to lower <= theta <= upper for each voxel.

    ``gram`` (n, P, P) = X^T X, ``rhs`` (n, P) = X^T y, ``yy`` (n,) = y^T y; bounds (P,) or (n, P).
    The problem is convex, so the constrained optimum is the best feasible solution among all
    3^P choices of each variable being free or fixed at a bound. Returns theta (n, P), SSR (n,).
    """
    n, p = rhs.shape
    lower = torch.broadcast_to(lower, (n, p))
    upper = torch.broadcast_to(upper, (n, p))
    ridge = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)
    eye = torch.eye(p, dtype=gram.dtype, device=gram.device)
    # most voxels' unconstrained optimum is feasible: enumerate active sets only for the others
    theta, info = torch.linalg.solve_ex(gram + ridge[:, None, None] * eye, rhs[..., None])
    theta = theta[..., 0]
    inside = ((theta >= lower) & (theta <= upper)).all(-1) & (info == 0)
    if bool(inside.all()):
        return theta, yy - (theta * rhs).sum(-1)
    if bool(inside.any()):
        theta_out, ssr_out = bounded_normal_solve(gram[~inside], rhs[~inside], yy[~inside], lower[~inside],
                                                   upper[~inside])
        theta = theta.clone()
        ssr = yy - (theta * rhs).sum(-1)
        theta[~inside], ssr[~inside] = theta_out, ssr_out
        return theta, ssr
    best_theta = torch.zeros_like(rhs)
    best_ssr = torch.full_like(yy, float("inf"))
    for combo in itertools.product((0, 1, 2), repeat=p):  # 0 free, 1 at lower, 2 at upper
        free = torch.tensor([c == 0 for c in combo], device=gram.device)
        fixed_value = torch.where(torch.tensor([c == 1 for c in combo], device=gram.device), lower, upper)
        fixed_value = torch.where(free, torch.zeros_like(fixed_value), fixed_value)
        both = free[:, None] & free[None, :]
        system = torch.where(both, gram, eye) + ridge[:, None, None] * torch.diag(free.to(gram.dtype))
        b = torch.where(free, rhs - (gram @ fixed_value[..., None])[..., 0], fixed_value)
        theta, info = torch.linalg.solve_ex(system, b[..., None])
        theta = theta[..., 0]
        ssr = yy - 2 * (theta * rhs).sum(-1) + (theta * (gram @ theta[..., None])[..., 0]).sum(-1)
        tolerance = 1e-9 * (upper - lower).abs().clamp(max=1e6) + 1e-12
        feasible = ((theta >= lower - tolerance) & (theta <= upper + tolerance)).all(-1) & (info == 0)
        better = feasible & (ssr < best_ssr)
        best_theta = torch.where(better[:, None], theta.clamp(lower, upper), best_theta)
        best_ssr = torch.where(better, ssr, best_ssr)
    return best_theta, best_ssr


def cumtrapz(values, t):
    increments = 0.5 * (values[..., 1:] + values[..., :-1]) * (t[1:] - t[:-1])
    return torch.cat([torch.zeros_like(values[..., :1]), torch.cumsum(increments, -1)], -1)


def linear_fit(spec, y, t, cp, delay_s=0.0):
    """Linear least-squares fit; returns parameters (n, P) in OSIPI units and SSR of the linear model.

    Patlak is linear. Tofts / extended Tofts use Murase's integral form
    C = (Ktrans + kep vp) int cp - kep int C + vp cp (vp = 0 for Tofts); for the two-compartment
    models it returns the extended Tofts (2CXM) or Patlak (2CUM) estimates as starting values.
    """
    if not (isinstance(delay_s, float) and delay_s == 0.0):
        cp, _ = tk.shift_curve(t, cp, torch.as_tensor(delay_s, dtype=y.dtype, device=y.device))
    n = y.shape[0]
    int_cp = cumtrapz(cp, t)  # mM s
    yy = (y * y).sum(-1)
    if spec.name in ("patlak", "2cum"):
        design = torch.stack(torch.broadcast_tensors(int_cp / 60.0, cp), -1)  # Ktrans in 1/min
        if design.dim() == 2:
            gram = (design.T @ design).expand(n, 2, 2)
            rhs = y @ design
        else:
            gram = design.transpose(-1, -2) @ design
            rhs = (design * y[..., None]).sum(-2)
        lower = torch.tensor([0.0, 0.0], dtype=y.dtype, device=y.device)
        upper = torch.tensor([5.0, 1.0], dtype=y.dtype, device=y.device)
        theta, ssr = bounded_normal_solve(gram, rhs, yy, lower, upper)
        return theta, ssr
    with_vp = spec.name in ("etofts", "2cxm")
    int_y = cumtrapz(y, t)
    columns = [torch.broadcast_to(int_cp, y.shape) / 60.0, -int_y / 60.0]  # A and kep in 1/min
    if with_vp:
        columns.append(torch.broadcast_to(cp, y.shape))
    design = torch.stack(columns, -1)  # (n, T, P)
    gram = design.transpose(-1, -2) @ design
    rhs = (design * y[..., None]).sum(-2)
    lower = torch.tensor([0.0, 1e-3, 0.0][: design.shape[-1]], dtype=y.dtype, device=y.device)
    upper = torch.tensor([10.0, 100.0, 1.0][: design.shape[-1]], dtype=y.dtype, device=y.device)
    theta, ssr = bounded_normal_solve(gram, rhs, yy, lower, upper)
    a, kep = theta[:, 0], theta[:, 1]
    vp = theta[:, 2] if with_vp else torch.zeros_like(a)
    ktrans = (a - kep * vp).clamp_min(0.0)
    ve = ktrans / kep
    if spec.name == "tofts":
        return torch.stack([ktrans, ve], -1), ssr
    return torch.stack([ktrans, ve, vp], -1), ssr



def patlak_fit(y, t, cp, lower, upper):
    """Patlak by bounded linear least squares: the model is linear in (Ktrans, vp) and the trapezoid
    integral of a piecewise-linear AIF is exact, so this is its nonlinear least-squares solution.
    Everything comes from two dot products per voxel (no (n, T) model curves)."""
    design = torch.stack([cumtrapz(cp, t) / 60.0, cp], -1)          # (T, 2); Ktrans in 1/min
    n = y.shape[0]
    gram = (design.T @ design).expand(n, 2, 2)
    x, ssr = bounded_normal_solve(gram, y @ design, (y * y).sum(-1), lower, upper)
    residual_sum = y.sum(-1) - x @ design.sum(0)
    return ChunkFit(x, ssr.clamp_min(0.0), gram.clone(), torch.ones(n, dtype=torch.bool, device=y.device),
                    residual_sum)
