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
"""

import enum
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch

from ..core import jobs
from . import nested_models
from . import tk_models as tk
from ..core.errors import DCEPKInputError
from .nested_models import ChunkFit, SelectedModel


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


DEFAULT_DELAY_BOUNDS_S = (-10.0, 30.0)
LINEAR_MODELS = ("tofts", "etofts", "patlak")


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


def _resolve_device(device):
    if isinstance(device, torch.device):
        return device
    name = str(device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DCEPKInputError("device 'cuda' was asked for but no CUDA GPU is available: use device='cpu' or 'auto'")
    if name != "cpu" and not name.startswith("cuda"):
        raise DCEPKInputError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Box-constrained small least squares, exact, batched (all active sets enumerated).
def _bounded_normal_solve(gram, rhs, yy, lower, upper):
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
        theta_out, ssr_out = _bounded_normal_solve(gram[~inside], rhs[~inside], yy[~inside], lower[~inside],
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


def _cumtrapz(values, t):
    increments = 0.5 * (values[..., 1:] + values[..., :-1]) * (t[1:] - t[:-1])
    return torch.cat([torch.zeros_like(values[..., :1]), torch.cumsum(increments, -1)], -1)


def _linear_fit(spec, y, t, cp, delay_s=0.0):
    """Linear least-squares fit; returns parameters (n, P) in OSIPI units and SSR of the linear model.

    Patlak is linear. Tofts / extended Tofts use Murase's integral form
    C = (Ktrans + kep vp) int cp - kep int C + vp cp (vp = 0 for Tofts); for the two-compartment
    models it returns the extended Tofts (2CXM) or Patlak (2CUM) estimates as starting values.
    """
    if not (isinstance(delay_s, float) and delay_s == 0.0):
        cp, _ = tk.shift_curve(t, cp, torch.as_tensor(delay_s, dtype=y.dtype, device=y.device))
    n = y.shape[0]
    int_cp = _cumtrapz(cp, t)  # mM s
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
        theta, ssr = _bounded_normal_solve(gram, rhs, yy, lower, upper)
        return theta, ssr
    with_vp = spec.name in ("etofts", "2cxm")
    int_y = _cumtrapz(y, t)
    columns = [torch.broadcast_to(int_cp, y.shape) / 60.0, -int_y / 60.0]  # A and kep in 1/min
    if with_vp:
        columns.append(torch.broadcast_to(cp, y.shape))
    design = torch.stack(columns, -1)  # (n, T, P)
    gram = design.transpose(-1, -2) @ design
    rhs = (design * y[..., None]).sum(-2)
    lower = torch.tensor([0.0, 1e-3, 0.0][: design.shape[-1]], dtype=y.dtype, device=y.device)
    upper = torch.tensor([10.0, 100.0, 1.0][: design.shape[-1]], dtype=y.dtype, device=y.device)
    theta, ssr = _bounded_normal_solve(gram, rhs, yy, lower, upper)
    a, kep = theta[:, 0], theta[:, 1]
    vp = theta[:, 2] if with_vp else torch.zeros_like(a)
    ktrans = (a - kep * vp).clamp_min(0.0)
    ve = ktrans / kep
    if spec.name == "tofts":
        return torch.stack([ktrans, ve], -1), ssr
    return torch.stack([ktrans, ve, vp], -1), ssr


# Curves per forward-model call in the iterative fits: between blocks the cancel flag is checked, so
# a cancel reaches a chunk's iteration within one block's time (~0.3 s for 2CXM on a busy core).
_EVALUATION_BLOCK = 8192


def _in_blocks(evaluate, n, n_frames, cancel):
    """``evaluate(rows)`` for blocks of rows (slices), the outputs (tensors or tuples) concatenated.

    No block is smaller than the batch above which ``tk_models`` scans the curves step by step (its
    method, and so its rounding, depends on the batch size), so the results are those of one call."""
    size = max(_EVALUATION_BLOCK, tk._SCAN_BUDGET // (8 * max(n_frames - 1, 1)) + 1)
    if n < 2 * size:
        return evaluate(slice(0, n))
    bounds = np.linspace(0, n, n // size + 1).astype(int)
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        jobs.raise_if_cancelled(cancel)
        parts.append(evaluate(slice(int(start), int(stop))))
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(outputs) for outputs in zip(*parts))
    return torch.cat(parts)


def _clip_to_bounds(x, lower, upper):
    return torch.maximum(torch.minimum(x, upper), lower)


# ---------------------------------------------------------------------------------------------
# Bounded Levenberg-Marquardt, batched.
def _levenberg_marquardt(spec, y, t, cp, x0, lower, upper, fit_delay, max_iterations, cancel=None,
                         fixed_delay=None):
    """Minimise |y - f(x)|^2 per voxel within [lower, upper]. x (n, P[+1]); the delay, if fitted, is last.

    Marquardt's scaling (damping proportional to diag(J^T J)) makes the step independent of the
    parameters' units. Variables sitting on a bound with the gradient pushing outward are frozen
    for that step (a projected, active-set LM). Returns x, SSR, J^T J at x, converged flag.
    """
    n, p = x0.shape
    n_model = spec.n_params
    x = _clip_to_bounds(x0.clone(), lower, upper)

    def evaluate(xs, ys_index):
        delay = xs[:, n_model] if fit_delay else (0.0 if fixed_delay is None else fixed_delay[ys_index])

        def rows(part):
            part_delay = delay if isinstance(delay, float) else delay[part]
            return tk.concentration_and_jacobian(spec.name, xs[part, :n_model], t, cp, part_delay,
                                                 with_delay=fit_delay)
        f, jac = _in_blocks(rows, xs.shape[0], t.shape[0], cancel)
        r = y[ys_index] - f
        return r, jac

    all_index = torch.arange(n, device=y.device)
    r, jac = evaluate(x, all_index)
    ssr = (r * r).sum(-1)
    hess = jac.transpose(-1, -2) @ jac
    grad = (jac * r[..., None]).sum(-2)
    damping = torch.full((n,), 1e-3, dtype=y.dtype, device=y.device)
    converged = torch.zeros(n, dtype=torch.bool, device=y.device)
    active = all_index.clone()
    eye = torch.eye(p, dtype=y.dtype, device=y.device)
    span = (upper - lower).clamp(max=1e3)
    for _ in range(max_iterations):
        if active.numel() == 0:
            break
        jobs.raise_if_cancelled(cancel)
        xa, ga, ha, lam = x[active], grad[active], hess[active], damping[active]
        at_lower = (xa <= lower) & (ga <= 0)
        at_upper = (xa >= upper) & (ga >= 0)
        free = ~(at_lower | at_upper)
        both = free[:, :, None] & free[:, None, :]
        diag = ha.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30)
        system = torch.where(both, ha, eye) + torch.diag_embed(torch.where(free, lam[:, None] * diag, 0 * diag))
        step, _ = torch.linalg.solve_ex(system, torch.where(free, ga, 0 * ga)[..., None])
        step = torch.nan_to_num(step[..., 0])
        trial = _clip_to_bounds(xa + step, lower, upper)
        r_t, jac_t = evaluate(trial, active)
        ssr_t = (r_t * r_t).sum(-1)
        ssr_a = ssr[active]
        accept = ssr_t < ssr_a
        idx = active[accept]
        x[idx] = trial[accept]
        ssr[idx] = ssr_t[accept]
        grad[idx] = (jac_t[accept] * r_t[accept][..., None]).sum(-2)
        hess[idx] = jac_t[accept].transpose(-1, -2) @ jac_t[accept]
        moved = (trial - xa).abs() / (xa.abs() + 1e-6 * span)
        small_gain = (ssr_a - ssr_t) <= 1e-10 * ssr_a + 1e-30
        done = (accept & (small_gain | (moved.max(-1).values < 1e-9))) | (~accept & (lam > 1e8))
        # Marquardt's damping update: relax after success, stiffen after failure
        damping[active] = torch.where(accept, (lam / 5).clamp_min(1e-9), lam * 8)
        converged[active[done]] = True
        active = active[~done]
    return x, ssr, hess, converged


# ---------------------------------------------------------------------------------------------
# Variable projection for Tofts / extended Tofts: C = a E(k) + b cp is linear in a = Ktrans/60 and
# b = vp for a given k = kep/60, so only k is searched (Gauss-Newton in log k, Kaufman's step) and
# a, b are solved exactly at every k. One convolution (with its k-derivative) per iteration.
_KEP_RANGE_PER_MIN = (1e-3, 60.0)


def _bounded_ab(yy, y_e, y_c, ee, ec, cc, with_vp):
    """Best (a, b) with a >= 0 and 0 <= b <= 1 (b = 0 without vp) from the dot products; and SSR."""
    def ssr_of(a, b):
        return yy - 2 * a * y_e - 2 * b * y_c + a * a * ee + 2 * a * b * ec + b * b * cc

    zero = torch.zeros_like(yy)
    candidates = [((y_e / ee).clamp_min(0), zero)]
    if with_vp:
        det = ee * cc - ec * ec
        a_free = (y_e * cc - y_c * ec) / det
        b_free = (y_c * ee - y_e * ec) / det
        ok = (a_free >= 0) & (b_free >= 0) & (b_free <= 1) & (det > 0)
        nan = torch.full_like(yy, float("nan"))
        candidates.append((torch.where(ok, a_free, nan), torch.where(ok, b_free, nan)))
        candidates.append((zero, (y_c / cc).clamp(0, 1)))
        candidates.append((((y_e - ec) / ee).clamp_min(0), zero + 1))
    best_a, best_b = candidates[0]
    best_ssr = ssr_of(best_a, best_b)
    for a, b in candidates[1:]:
        value = ssr_of(a, b)
        better = torch.isfinite(value) & (value < best_ssr)
        best_a, best_b, best_ssr = (torch.where(better, a, best_a), torch.where(better, b, best_b),
                                    torch.where(better, value, best_ssr))
    return best_a, best_b, best_ssr


def _convolution_moments(t, cp, k, y_time_major):
    """Dot products over time of E = cp (*) exp(-k t), D = dE/dk, cp and y, without storing E or D.

    Same exact recursion as ``tk_models.exp_convolution`` (shared AIF, per-voxel k (n,)), run
    time-major with running sums: variable projection needs only these sums, and not writing the
    (n, T) curves saves most of the memory traffic. Returns ee, ed, dd, ec, dc, ye, yd and the sum
    of E over time (each (n,)).
    """
    dt = t[1:] - t[:-1]
    steps, which = tk._distinct_steps(tk._TorchOps, dt)
    if steps is None:
        steps, which = dt, torch.arange(dt.numel(), device=dt.device)
    # per distinct frame step (one for uniform sampling): weights (U, n) of the exact segment integral
    decay, phi1, psi, chi = tk._segment_weights(tk._TorchOps, steps[:, None] * k[None, :], True)
    second = phi1 - psi       # weight of the segment's end sample
    chi_minus_psi = chi - psi
    which = which.tolist()
    dt_list = dt.tolist()
    cp_list = cp.tolist()
    n = k.shape[0]
    state = torch.zeros(2, n, dtype=k.dtype, device=k.device)     # [E_n; D_n]
    spare = torch.empty_like(state)
    increment = torch.empty_like(state)
    outer = torch.zeros(2, 2, n, dtype=k.dtype, device=k.device)  # sums of [E; D] [E; D]^T
    with_y = torch.zeros(2, n, dtype=k.dtype, device=k.device)    # sums of y [E; D]
    with_cp = torch.zeros(2, n, dtype=k.dtype, device=k.device)   # sums of cp [E; D]
    e_sum = torch.zeros(n, dtype=k.dtype, device=k.device)        # sum of E (residual sums for the model choice)
    for step in range(len(dt_list)):
        u, h = which[step], dt_list[step]
        c0, c1 = cp_list[step] * h, cp_list[step + 1] * h
        # segment integral and its k-derivative, built in place (no (T, n) arrays: memory traffic)
        torch.mul(psi[u], c0, out=increment[0])
        increment[0].add_(second[u], alpha=c1)
        torch.mul(chi_minus_psi[u], c1 * h, out=increment[1])
        increment[1].add_(chi[u], alpha=-c0 * h)
        # D_n = e^{-k dt} (D_{n-1} - dt E_{n-1}) + dinc_n ;  E_n = e^{-k dt} E_{n-1} + inc_n
        state[1].sub_(state[0], alpha=h)
        torch.addcmul(increment, decay[u], state, out=spare)
        state, spare = spare, state
        outer.addcmul_(state[:, None, :], state[None, :, :])
        with_y.addcmul_(state, y_time_major[step + 1])
        with_cp.add_(state, alpha=cp_list[step + 1])
        e_sum.add_(state[0])
    ee, ed, dd = outer[0, 0], outer[0, 1], outer[1, 1]
    ec, dc = with_cp[0], with_cp[1]
    ye, yd = with_y[0], with_y[1]
    return ee, ed, dd, ec, dc, ye, yd, e_sum


def _varpro_tofts(spec, y, t, cp, max_iterations, cancel=None):
    """Returns x (n, P) in OSIPI units, SSR, J^T J (n, P, P), converged, sum of the residuals over time."""
    with_vp = spec.name == "etofts"
    n = y.shape[0]
    dtype, device = y.dtype, y.device
    yy = (y * y).sum(-1)
    y_c = y @ cp
    cc = (cp * cp).sum()
    k_lo, k_hi = (v / 60.0 for v in _KEP_RANGE_PER_MIN)
    # start: the best of a log-spaced grid of k (the grid's convolutions are shared by all voxels)
    k_grid = torch.logspace(np.log10(k_lo), np.log10(k_hi), 24, dtype=dtype, device=device)
    e_grid = tk.exp_convolution(t, cp, k_grid)                    # (G, T)
    # unconstrained SSR at each grid k (closed form): only the starting point depends on it
    y_e = y @ e_grid.T                                            # (n, G)
    ee, ec = (e_grid * e_grid).sum(-1), e_grid @ cp               # (G,)
    if with_vp:
        det = (ee * cc - ec * ec).clamp_min(1e-300)
        grid_ssr = yy[:, None] - (y_e * y_e * cc - 2 * y_e * y_c[:, None] * ec + (y_c * y_c)[:, None] * ee) / det
    else:
        grid_ssr = yy[:, None] - y_e * y_e / ee
    best = grid_ssr.argmin(1).clamp(1, k_grid.numel() - 2)
    # parabola through the best grid point and its neighbours (in log k) starts Newton close by
    s_minus, s_0, s_plus = (torch.gather(grid_ssr, 1, (best + o)[:, None])[:, 0] for o in (-1, 0, 1))
    spacing = float(np.log(k_hi / k_lo) / (k_grid.numel() - 1))
    curvature = s_minus - 2 * s_0 + s_plus
    offset = torch.where(curvature > 0, 0.5 * (s_minus - s_plus) / curvature.clamp_min(1e-300), 0 * s_0)
    log_k = torch.log(k_grid[best]) + spacing * offset.clamp(-1.0, 1.0)
    best_log_k = log_k.clone()
    best_ssr = torch.full_like(yy, float("inf"))
    x = torch.zeros(n, spec.n_params, dtype=dtype, device=device)
    hess = torch.zeros(n, spec.n_params, spec.n_params, dtype=dtype, device=device)
    ssr_out = torch.zeros_like(yy)
    residual_sum = torch.zeros_like(yy)
    y_sum, cp_sum = y.sum(-1), cp.sum()
    converged = torch.zeros(n, dtype=torch.bool, device=device)
    active = torch.arange(n, device=device)
    y_time_major = y.T.contiguous()
    prev_gradient = torch.zeros_like(yy)
    prev_log_k = torch.zeros_like(yy)
    has_prev = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(max_iterations):
        if active.numel() == 0:
            break
        jobs.raise_if_cancelled(cancel)
        ka = torch.exp(log_k[active])
        ee, ed, dd, ec, dc, y_e, y_d, e_sum = _convolution_moments(t, cp, ka, y_time_major[:, active])
        a, b, ssr = _bounded_ab(yy[active], y_e, y_c[active], ee, ec, cc, with_vp)
        improved = ssr <= best_ssr[active] * (1 + 1e-12)
        # residual . D and the curvature of the reduced problem in k (D projected off E and cp)
        r_d = y_d - a * ed - b * dc
        if with_vp:
            det = (ee * cc - ec * ec).clamp_min(1e-300)
            proj = (ed * ed * cc - 2 * ed * dc * ec + dc * dc * ee) / det
            proj = torch.where(b > 0, proj, ed * ed / ee)
        else:
            proj = ed * ed / ee
        curvature = (a * a * (dd - proj)).clamp_min(1e-300)
        step = (a * r_d / curvature) / ka                          # Gauss-Newton step in log k
        la = log_k[active]
        # Gauss-Newton drops the residual's curvature and so converges only linearly on noisy
        # curves; a secant on the exact gradient dS/dlog k between successive accepted points
        # converges superlinearly at no extra cost, used where its curvature is positive.
        gradient = -2.0 * a * r_d * ka
        secant = (gradient - prev_gradient[active]) / (la - prev_log_k[active])
        use_secant = improved & has_prev[active] & torch.isfinite(secant) & (secant > 0)
        step = torch.where(use_secant, -gradient / torch.where(use_secant, secant, 1.0 + 0 * secant), step)
        step = torch.nan_to_num(step).clamp(-1.0, 1.0)
        idx_prev = active[improved]
        prev_gradient[idx_prev] = gradient[improved]
        prev_log_k[idx_prev] = la[improved]
        has_prev[idx_prev] = True
        new_log_k = torch.where(improved, la + step, 0.5 * (la + best_log_k[active]))
        new_log_k = new_log_k.clamp(np.log(k_lo), np.log(k_hi))
        # record the evaluated point when it is the best so far
        idx = active[improved]
        best_ssr[idx] = ssr[improved]
        best_log_k[idx] = la[improved]
        ka_i, a_i, b_i = ka[improved], a[improved], b[improved]
        ktrans = a_i * 60.0
        ve = a_i / ka_i
        columns = [ktrans, ve, b_i] if with_vp else [ktrans, ve]
        x[idx] = torch.stack(columns, -1)
        ssr_out[idx] = ssr[improved]
        residual_sum[idx] = y_sum[idx] - a_i * e_sum[improved] - b_i * cp_sum
        # J = [E/60 + a D/(60 ve), -a k D / ve, cp]: J^T J from the dot products already at hand
        alpha = 1.0 / 60.0
        beta = a_i / (60.0 * ve)
        gamma = -a_i * ka_i / ve
        ee_i, ed_i, dd_i, ec_i, dc_i = ee[improved], ed[improved], dd[improved], ec[improved], dc[improved]
        h00 = alpha * alpha * ee_i + 2 * alpha * beta * ed_i + beta * beta * dd_i
        h01 = gamma * (alpha * ed_i + beta * dd_i)
        h11 = gamma * gamma * dd_i
        h = [[h00, h01], [h01, h11]]
        if with_vp:
            h02 = alpha * ec_i + beta * dc_i
            h12 = gamma * dc_i
            h = [[h00, h01, h02], [h01, h11, h12], [h02, h12, cc.expand_as(h00)]]
        hess[idx] = torch.stack([torch.stack(row, -1) for row in h], -2)
        moved = (new_log_k - la).abs()
        done = (improved & ((moved < 1e-6) | (a <= 0))) | (~improved & (moved < 1e-6))
        converged[active[done]] = True
        log_k[active] = new_log_k
        active = active[~done]
    return x, ssr_out, hess, converged, residual_sum


# ---------------------------------------------------------------------------------------------
# Starting values
def _initial_values(spec, y, t, cp, lower, upper, delay, n_starts=1, cancel=None):
    """Starting parameters (n, n_starts, P).

    Tofts / extended Tofts / Patlak: the linear fit. The two-compartment models have local
    minima, so their starts are the ``n_starts`` best (by SSR, one forward evaluation each) of a
    small grid of flows and plasma volumes combined with the extended Tofts / Patlak estimates.
    """
    linear, _ = _linear_fit(spec, y, t, cp, delay)
    n = y.shape[0]
    lower, upper = lower[: spec.n_params], upper[: spec.n_params]
    if spec.name in ("tofts", "etofts", "patlak"):
        default = torch.tensor(spec.initial, dtype=y.dtype, device=y.device)
        # a degenerate linear estimate (ve at 0 or inf) is replaced by the typical value
        x0 = torch.where(torch.isfinite(linear) & (linear >= lower) & (linear <= upper), linear, default)
        return x0[:, None, :]
    ktrans = linear[:, 0].clamp(1e-4, 3.0)
    vp_linear = linear[:, -1].clamp(0.005, 0.5)
    candidates = []
    for flow in (3.0, 8.0, 20.0, 50.0, 120.0):
        flow_per_min = flow / 100.0
        # Ktrans = PS*F/(PS+F)  =>  PS = Ktrans*F/(F-Ktrans) when F > Ktrans
        ps = torch.where(flow_per_min > 1.2 * ktrans, ktrans * flow_per_min / (flow_per_min - ktrans).clamp_min(1e-6),
                         5 * ktrans)
        fp = torch.full_like(ktrans, flow)
        for vp in (vp_linear, torch.full_like(ktrans, 0.03), torch.full_like(ktrans, 0.1)):
            if spec.name == "2cxm":
                ve = linear[:, 1].clamp(0.02, 0.9)
                candidates.append(torch.stack([fp, ps, ve, vp], -1))
            else:
                candidates.append(torch.stack([fp, ps, vp], -1))
    candidates.append(torch.tensor(spec.initial, dtype=y.dtype, device=y.device).expand(n, spec.n_params))
    candidates = _clip_to_bounds(torch.stack(candidates, 1), lower, upper)
    k = candidates.shape[1]
    delay_rep = delay if isinstance(delay, float) else delay[:, None].expand(n, k).reshape(-1)
    flat = candidates.reshape(n * k, -1)
    f = _in_blocks(lambda part: tk.concentration(spec.name, flat[part], t, cp,
                                                 delay_rep if isinstance(delay_rep, float) else delay_rep[part]),
                   n * k, t.shape[0], cancel).reshape(n, k, -1)
    ssr = ((y[:, None, :] - f) ** 2).sum(-1)
    best = ssr.argsort(1)[:, :n_starts]
    return torch.gather(candidates, 1, best[..., None].expand(n, best.shape[1], spec.n_params))


N_STARTS = {"2cxm": 3, "2cum": 2}


def _delay_grid_search(spec, y, t, cp, delay_bounds_s, cancel=None):
    """Per-voxel delay (n,) minimising the linear-model SSR over a grid of shared delays."""
    step = max(float((t[1:] - t[:-1]).min()), 0.5)
    grid = np.arange(delay_bounds_s[0], delay_bounds_s[1] + 1e-9, step)
    best_ssr = torch.full((y.shape[0],), float("inf"), dtype=y.dtype, device=y.device)
    best_delay = torch.zeros_like(best_ssr)
    for delay in grid:
        jobs.raise_if_cancelled(cancel)
        _, ssr = _linear_fit(spec, y, t, cp, float(delay) if delay != 0 else 0.0)
        better = ssr < best_ssr
        best_ssr = torch.where(better, ssr, best_ssr)
        best_delay = torch.where(better, torch.full_like(best_delay, float(delay)), best_delay)
    return best_delay


# ---------------------------------------------------------------------------------------------
def _patlak_fit(y, t, cp, lower, upper):
    """Patlak by bounded linear least squares: the model is linear in (Ktrans, vp) and the trapezoid
    integral of a piecewise-linear AIF is exact, so this is its nonlinear least-squares solution.
    Everything comes from two dot products per voxel (no (n, T) model curves)."""
    design = torch.stack([_cumtrapz(cp, t) / 60.0, cp], -1)          # (T, 2); Ktrans in 1/min
    n = y.shape[0]
    gram = (design.T @ design).expand(n, 2, 2)
    x, ssr = _bounded_normal_solve(gram, y @ design, (y * y).sum(-1), lower, upper)
    residual_sum = y.sum(-1) - x @ design.sum(0)
    return ChunkFit(x, ssr.clamp_min(0.0), gram.clone(), torch.ones(n, dtype=torch.bool, device=y.device),
                    residual_sum)


def _exact_model_fit(spec, y, t, cp, x):
    """SSR, J^T J and residual sum of the exact model at x (for estimates from a linear solve)."""
    f, jac = tk.concentration_and_jacobian(spec.name, x, t, cp)
    residual = y - f
    converged = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    return ChunkFit(x, (residual * residual).sum(-1), jac.transpose(-1, -2) @ jac, converged, residual.sum(-1))


def _outside_varpro(x, converged, lower, upper):
    """Voxels whose variable-projection optimum needs the bounded LM: outside the model's bounds
    (e.g. ve > 1), not converged, or pinned at the edge of the searched kep range."""
    outside = ((x < lower) | (x > upper)).any(-1) | ~converged | ~torch.isfinite(x).all(-1)
    kep_per_min = x[:, 0] / x[:, 1]
    kep_low, kep_high = _KEP_RANGE_PER_MIN
    return outside | (kep_per_min >= kep_high * (1 - 1e-9)) | (kep_per_min <= kep_low * (1 + 1e-9))


def _refit_bounded(spec, y, t, cp, index, fit, lower, upper, max_iterations, cancel):
    """The bounded LM from where ``fit`` left the voxels ``index``; a ``ChunkFit`` of those voxels."""
    x0 = fit.x[index]
    x0 = torch.where(torch.isfinite(x0), x0, torch.tensor(spec.initial, dtype=y.dtype, device=y.device))
    x, ssr, hess, converged = _levenberg_marquardt(spec, y[index], t, cp, x0, lower, upper, False, max_iterations,
                                                   cancel)
    return ChunkFit(x, ssr, hess, converged, nested_models.residual_sums(spec, y[index], t, cp, x))


def _fit_model(spec, y, t, cp, method, lower, upper, max_iterations, cancel, default_bounds, defer_refit=False):
    """The model fitted to every curve (no delay) as a ``ChunkFit``. With ``defer_refit`` the
    variable-projection voxels that need the bounded LM are only marked (``refit``), not refitted."""
    if spec.name == "patlak":
        return _patlak_fit(y, t, cp, lower, upper)
    if method == "linear":   # the exact model at the linear estimate gives SSR and errors
        x, _ = _linear_fit(spec, y, t, cp)
        return _exact_model_fit(spec, y, t, cp, _clip_to_bounds(x, lower, upper))
    if spec.name in ("tofts", "etofts") and default_bounds:
        fit = ChunkFit(*_varpro_tofts(spec, y, t, cp, max_iterations, cancel))
        outside = _outside_varpro(fit.x, fit.converged, lower, upper)
        if defer_refit:
            fit.refit = outside
        elif bool(outside.any()):
            redo = torch.nonzero(outside)[:, 0]
            fit.assign(redo, _refit_bounded(spec, y, t, cp, redo, fit, lower, upper, max_iterations, cancel))
        return fit
    return ChunkFit(*_fit_multistart(spec, y, t, cp, lower, upper, False, 0.0, max_iterations, cancel))


def _fit_multistart(spec, y, t, cp, lower, upper, fit_delay, delay, max_iterations, cancel):
    """Bounded LM from ``N_STARTS`` starting points per curve; the lowest SSR wins."""
    starts = N_STARTS.get(spec.name, 1)
    n, n_frames = y.shape
    x0 = _initial_values(spec, y, t, cp, lower, upper, delay, starts, cancel)  # (n, starts, P)
    if fit_delay:
        x0 = torch.cat([x0, delay[:, None, None].expand(n, starts, 1)], -1)
    # every start is fitted as its own curve
    y_rep = y[:, None, :].expand(n, starts, n_frames).reshape(n * starts, n_frames)
    x, ssr, hess, converged = _levenberg_marquardt(spec, y_rep, t, cp, x0.reshape(n * starts, -1), lower,
                                                   upper, fit_delay, max_iterations, cancel)
    if starts > 1:
        best = ssr.reshape(n, starts).argmin(1) + torch.arange(n, device=y.device) * starts
        x, ssr, hess, converged = x[best], ssr[best], hess[best], converged[best]
    return x, ssr, hess, converged


def _fit_with_delay(spec, y, t, cp, method, lower, upper, max_iterations, delay_bounds_s, delay_step_s, cancel):
    """The model and the arterial delay (last parameter), as a ``ChunkFit``."""
    delay = _delay_grid_search(spec, y, t, cp, delay_bounds_s, cancel)
    if method == "linear":
        x, _ = _linear_fit(spec, y, t, cp, delay)
        x = torch.cat([_clip_to_bounds(x, lower[: spec.n_params], upper[: spec.n_params]), delay[:, None]], -1)
        # residuals and Jacobian of the exact model at the linear estimate give SSR and errors
        f, jac = tk.concentration_and_jacobian(spec.name, x[:, : spec.n_params], t, cp, x[:, spec.n_params],
                                               with_delay=True)
        converged = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
        return ChunkFit(x, ((y - f) ** 2).sum(-1), jac.transpose(-1, -2) @ jac, converged)
    x, ssr, hess, converged = _fit_multistart(spec, y, t, cp, lower, upper, True, delay, max_iterations, cancel)
    if delay_step_s:
        # Resolve the delay to a grid step: below ~0.5 s the delay trades off against vp / PS
        # within the noise, and a snapped delay with the other parameters refitted is steadier.
        delay = torch.round(x[:, -1] / delay_step_s) * delay_step_s
        delay = delay.clamp(float(lower[-1]), float(upper[-1]))
        x_fixed, ssr, hess_fixed, converged = _levenberg_marquardt(
            spec, y, t, cp, x[:, :-1].contiguous(), lower[:-1], upper[:-1], False, max_iterations, cancel,
            fixed_delay=delay)
        x = torch.cat([x_fixed, delay[:, None]], -1)
        # the delay keeps the curvature from the free fit so its standard error stays defined
        hess[:, :-1, :-1] = hess_fixed
    return ChunkFit(x, ssr, hess, converged)


def _fit_chunk(spec, y, t, cp, method, fit_delay, lower, upper, max_iterations, delay_bounds_s, delay_step_s,
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
        fit.free = torch.ones_like(fit.x, dtype=torch.bool)
        fit.selected = torch.full_like(fit.ssr, int(nested_models.MODEL_CODES[spec.name]), dtype=torch.uint8)
    return _summarise(y, fit, lower, upper)


def _summarise(y, fit, lower, upper):
    """Standard errors sigma^2 (J^T J)^-1 over the free parameters, R2, rmse and status."""
    n_frames = y.shape[1]
    free = fit.free
    n_free = free.sum(-1)
    sigma2 = fit.ssr / (n_frames - n_free).clamp_min(1)
    eye = torch.eye(free.shape[1], dtype=fit.hess.dtype, device=fit.hess.device)
    cov, info = torch.linalg.inv_ex(torch.where(free[:, :, None] & free[:, None, :], fit.hess, eye))
    variance = cov.diagonal(dim1=-2, dim2=-1)
    stderr = torch.sqrt(sigma2[:, None] * variance.clamp_min(0))
    stderr = torch.where((info == 0)[:, None] & (variance >= 0) & free, stderr, torch.full_like(stderr, float("nan")))
    sst = ((y - y.mean(-1, keepdim=True)) ** 2).sum(-1)
    # R2 of a flat curve, or of the flat (zero) model of no enhancement, is undefined
    explained = (sst > 0) & (fit.selected != int(SelectedModel.NO_ENHANCEMENT))
    r2 = torch.where(explained, 1.0 - fit.ssr / sst.clamp_min(1e-300), torch.full_like(sst, float("nan")))
    rmse = torch.sqrt(fit.ssr / n_frames)
    tolerance = 1e-9 * (upper - lower).abs().clamp(max=1e3)
    on_bound = (free & ((fit.x <= lower + tolerance) | (fit.x >= upper - tolerance))).any(-1)
    ok = fit.converged & torch.where(free, torch.isfinite(fit.x), True).all(-1) & torch.isfinite(fit.ssr)
    status = torch.where(ok, torch.where(on_bound, int(FitStatus.AT_BOUND), int(FitStatus.FITTED)),
                         int(FitStatus.NOT_CONVERGED))
    status = torch.where(fit.selected == int(nested_models.SelectedModel.NO_ENHANCEMENT),
                         int(FitStatus.NOT_ENHANCING), status)
    return fit.x, stderr, r2, rmse, status, fit.selected


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
    torch_device = _resolve_device(device)
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
            x, se, r2_c, rmse_c, status_c, selected_c = _fit_chunk(
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
        units=_map_units(spec, fit_delay),
        t_s=t_np, cp=cp_np, method=method, shape=(n_voxels,), selected_model=selected)
    if fit_delay:
        result.delay_s = params[:, -1]
        result.delay_stderr = stderr[:, -1]
    return result


def map_names(model: str, fit_delay: bool = False) -> list:
    """Names of the maps ``FitResult.maps()`` gives for ``model`` (to check output files before a fit)."""
    return list(_map_units(tk.get_model(model), fit_delay))


def _map_units(spec, fit_delay):
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
