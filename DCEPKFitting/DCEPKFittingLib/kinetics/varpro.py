"""Variable projection for Tofts / extended Tofts: C = a E(k) + b cp is linear in a = Ktrans/60 and
b = vp for a given k = kep/60, so only k is searched (Gauss-Newton in log k, Kaufman's step) and
a, b are solved exactly at every k. One convolution (with its k-derivative) per iteration."""

import numpy as np
import torch

from ..core import jobs
from . import tk_models as tk


KEP_RANGE_PER_MIN = (1e-3, 60.0)


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


def convolution_moments(t, cp, k, y_time_major):
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


def varpro_tofts(spec, y, t, cp, max_iterations, cancel=None):
    """Returns x (n, P) in OSIPI units, SSR, J^T J (n, P, P), converged, sum of the residuals over time."""
    with_vp = spec.name == "etofts"
    n = y.shape[0]
    dtype, device = y.dtype, y.device
    yy = (y * y).sum(-1)
    y_c = y @ cp
    cc = (cp * cp).sum()
    k_lo, k_hi = (v / 60.0 for v in KEP_RANGE_PER_MIN)
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
        ee, ed, dd, ec, dc, y_e, y_d, e_sum = convolution_moments(t, cp, ka, y_time_major[:, active])
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


def outside_varpro(x, converged, lower, upper):
    """Voxels whose variable-projection optimum needs the bounded LM: outside the model's bounds
    (e.g. ve > 1), not converged, or pinned at the edge of the searched kep range."""
    outside = ((x < lower) | (x > upper)).any(-1) | ~converged | ~torch.isfinite(x).all(-1)
    kep_per_min = x[:, 0] / x[:, 1]
    kep_low, kep_high = KEP_RANGE_PER_MIN
    return outside | (kep_per_min >= kep_high * (1 - 1e-9)) | (kep_per_min <= kep_low * (1 + 1e-9))
