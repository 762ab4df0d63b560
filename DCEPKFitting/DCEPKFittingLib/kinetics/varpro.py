"""Variable projection for Tofts / extended Tofts: C = a E(k) + b cp is linear in a = Ktrans/60 and
b = vp for a given k = kep/60, so only k is searched (Gauss-Newton in log k, Kaufman's step) and
a, b are solved exactly at every k. One convolution (with its k-derivative) per iteration."""

import numpy as np

from ..core import jobs
from . import tk_models as tk
from .array_backend import array_ops


KEP_RANGE_PER_MIN = (1e-3, 60.0)


def _bounded_ab(yy, y_e, y_c, ee, ec, cc, with_vp):
    """Best (a, b) with a >= 0 and 0 <= b <= 1 (b = 0 without vp) from the dot products; and SSR."""
    def ssr_of(a, b):
        return yy - 2 * a * y_e - 2 * b * y_c + a * a * ee + 2 * a * b * ec + b * b * cc

    ops = array_ops(yy)
    zero = ops.zeros_like(yy)
    candidates = [(ops.clamp(y_e / ee, min=0), zero)]
    if with_vp:
        det = ee * cc - ec * ec
        a_free = (y_e * cc - y_c * ec) / det
        b_free = (y_c * ee - y_e * ec) / det
        ok = (a_free >= 0) & (b_free >= 0) & (b_free <= 1) & (det > 0)
        nan = ops.full_like(yy, float("nan"))
        candidates.append((ops.where(ok, a_free, nan), ops.where(ok, b_free, nan)))
        candidates.append((zero, ops.clamp(y_c / cc, 0, 1)))
        candidates.append((ops.clamp((y_e - ec) / ee, min=0), zero + 1))
    best_a, best_b = candidates[0]
    best_ssr = ssr_of(best_a, best_b)
    for a, b in candidates[1:]:
        value = ssr_of(a, b)
        better = ops.isfinite(value) & (value < best_ssr)
        best_a, best_b, best_ssr = (ops.where(better, a, best_a), ops.where(better, b, best_b),
                                    ops.where(better, value, best_ssr))
    return best_a, best_b, best_ssr


def convolution_moments(t, cp, k, y_time_major):
    """Dot products over time of E = cp (*) exp(-k t), D = dE/dk, cp and y, without storing E or D.

    Same exact recursion as ``tk_models.exp_convolution`` (shared AIF, per-voxel k (n,)), run
    time-major with running sums: variable projection needs only these sums, and not writing the
    (n, T) curves saves most of the memory traffic. Returns ee, ed, dd, ec, dc, ye, yd and the sum
    of E over time (each (n,)).
    """
    ops = array_ops(k)
    dt = t[1:] - t[:-1]
    steps, which = tk._distinct_steps(ops, dt)
    if steps is None:
        steps, which = dt, ops.arange(ops.numel(dt), like=dt)
    # per distinct frame step (one for uniform sampling): weights (U, n) of the exact segment integral
    decay, phi1, psi, chi = tk._segment_weights(ops, steps[:, None] * k[None, :], True)
    second = phi1 - psi       # weight of the segment's end sample
    chi_minus_psi = chi - psi
    which = which.tolist()
    dt_list = dt.tolist()
    cp_list = cp.tolist()
    n = k.shape[0]
    state = ops.zeros((2, n), like=k)          # [E_n; D_n]
    spare, increment, product = ops.empty_like(state), ops.empty_like(state), ops.empty_like(state)
    square = ops.empty((2, 2, n), like=k)
    outer = ops.zeros((2, 2, n), like=k)       # sums of [E; D] [E; D]^T
    with_y = ops.zeros((2, n), like=k)         # sums of y [E; D]
    with_cp = ops.zeros((2, n), like=k)        # sums of cp [E; D]
    e_sum = ops.zeros((n,), like=k)            # sum of E (residual sums for the model choice)
    # every step in place on preallocated arrays: no (T, n) arrays and no allocation (memory traffic)
    for step in range(len(dt_list)):
        u, h = which[step], dt_list[step]
        c0, c1 = cp_list[step] * h, cp_list[step + 1] * h
        # the segment integral [0] and its k-derivative [1]
        ops.multiply(psi[u], c0, out=increment[0])
        ops.multiply(second[u], c1, out=product[0])
        ops.multiply(chi_minus_psi[u], c1 * h, out=increment[1])
        ops.multiply(chi[u], -c0 * h, out=product[1])
        ops.add(increment, product, out=increment)
        # D_n = e^{-k dt} (D_{n-1} - dt E_{n-1}) + dinc_n ;  E_n = e^{-k dt} E_{n-1} + inc_n
        ops.multiply(state[0], h, out=product[0])
        ops.subtract(state[1], product[0], out=state[1])
        ops.multiply(decay[u], state, out=spare)
        ops.add(spare, increment, out=spare)
        state, spare = spare, state
        ops.multiply(state[:, None, :], state[None, :, :], out=square)
        ops.add(outer, square, out=outer)
        ops.multiply(state, y_time_major[step + 1], out=product)
        ops.add(with_y, product, out=with_y)
        ops.multiply(state, cp_list[step + 1], out=product)
        ops.add(with_cp, product, out=with_cp)
        ops.add(e_sum, state[0], out=e_sum)
    ee, ed, dd = outer[0, 0], outer[0, 1], outer[1, 1]
    ec, dc = with_cp[0], with_cp[1]
    ye, yd = with_y[0], with_y[1]
    return ee, ed, dd, ec, dc, ye, yd, e_sum


def _starting_log_k(y, t, cp, yy, y_c, cc, with_vp):
    """log k (k = kep in 1/s) to start from: the best of a log-spaced grid of k (its convolutions shared by
    all voxels; the unconstrained SSR in closed form), refined by a parabola through its neighbours."""
    ops = array_ops(y)
    k_lo, k_hi = (v / 60.0 for v in KEP_RANGE_PER_MIN)
    k_grid = ops.logspace(np.log10(k_lo), np.log10(k_hi), 24, like=y)
    e_grid = tk.exp_convolution(t, cp, k_grid)                    # (G, T)
    y_e = y @ e_grid.T                                            # (n, G)
    ee, ec = (e_grid * e_grid).sum(-1), e_grid @ cp               # (G,)
    if with_vp:
        det = ops.clamp(ee * cc - ec * ec, min=1e-300)
        grid_ssr = yy[:, None] - (y_e * y_e * cc - 2 * y_e * y_c[:, None] * ec + (y_c * y_c)[:, None] * ee) / det
    else:
        grid_ssr = yy[:, None] - y_e * y_e / ee
    n_grid = ops.numel(k_grid)
    best = ops.clamp(grid_ssr.argmin(1), 1, n_grid - 2)
    s_minus, s_0, s_plus = (ops.take_along(grid_ssr, (best + o)[:, None], 1)[:, 0] for o in (-1, 0, 1))
    spacing = float(np.log(k_hi / k_lo) / (n_grid - 1))
    curvature = s_minus - 2 * s_0 + s_plus
    offset = ops.where(curvature > 0, 0.5 * (s_minus - s_plus) / ops.clamp(curvature, min=1e-300), 0 * s_0)
    return ops.log(k_grid[best]) + spacing * ops.clamp(offset, -1.0, 1.0)


class _Search:
    """The per-voxel state of the search in log k: the best point so far and what it gives."""

    def __init__(self, y, cp, n_params, log_k):
        ops = self.ops = array_ops(y)
        n = y.shape[0]
        self.log_k, self.best_log_k = log_k, ops.copy(log_k)
        self.best_ssr = ops.full((n,), float("inf"), like=y)
        self.x = ops.zeros((n, n_params), like=y)
        self.hess = ops.zeros((n, n_params, n_params), like=y)
        self.ssr = ops.zeros((n,), like=y)
        self.residual_sum = ops.zeros((n,), like=y)
        self.converged = ops.zeros(n, like=y, dtype="bool")
        self.prev_gradient, self.prev_log_k = ops.zeros((n,), like=y), ops.zeros((n,), like=y)
        self.has_prev = ops.zeros(n, like=y, dtype="bool")
        self.y_sum, self.cp_sum = y.sum(-1), cp.sum()

    def step(self, active, improved, ka, a, r_d, curvature):
        """The next log k of the active voxels: Gauss-Newton, or a secant on the exact gradient dS/dlog k
        between successive accepted points where its curvature is positive (Gauss-Newton drops the
        residual's curvature and so converges only linearly on noisy curves; the secant superlinearly)."""
        ops = self.ops
        step = (a * r_d / curvature) / ka
        la = self.log_k[active]
        gradient = -2.0 * a * r_d * ka
        secant = (gradient - self.prev_gradient[active]) / (la - self.prev_log_k[active])
        use_secant = improved & self.has_prev[active] & ops.isfinite(secant) & (secant > 0)
        step = ops.where(use_secant, -gradient / ops.where(use_secant, secant, 1.0 + 0 * secant), step)
        step = ops.clamp(ops.nan_to_num(step), -1.0, 1.0)
        accepted = active[improved]
        self.prev_gradient[accepted] = gradient[improved]
        self.prev_log_k[accepted] = la[improved]
        self.has_prev[accepted] = True
        new_log_k = ops.where(improved, la + step, 0.5 * (la + self.best_log_k[active]))
        return ops.clamp(new_log_k, float(np.log(KEP_RANGE_PER_MIN[0] / 60.0)),
                         float(np.log(KEP_RANGE_PER_MIN[1] / 60.0)))

    def record(self, index, improved, ka, a, b, ssr, moments, cc, with_vp):
        """Keep the evaluated points that are the best so far: parameters (OSIPI units), SSR, residual sum,
        and J^T J from the dot products at hand, J = [E/60 + a D/(60 ve), -a k D / ve, cp]."""
        ops = self.ops
        ee, ed, dd, ec, dc, e_sum = (m[improved] for m in moments)
        ka_i, a_i, b_i = ka[improved], a[improved], b[improved]
        self.best_ssr[index] = ssr[improved]
        self.best_log_k[index] = self.log_k[index]
        ve = a_i / ka_i
        self.x[index] = ops.stack([a_i * 60.0, ve, b_i] if with_vp else [a_i * 60.0, ve], -1)
        self.ssr[index] = ssr[improved]
        self.residual_sum[index] = self.y_sum[index] - a_i * e_sum - b_i * self.cp_sum
        alpha, beta, gamma = 1.0 / 60.0, a_i / (60.0 * ve), -a_i * ka_i / ve
        h00 = alpha * alpha * ee + 2 * alpha * beta * ed + beta * beta * dd
        h01 = gamma * (alpha * ed + beta * dd)
        h11 = gamma * gamma * dd
        h = [[h00, h01], [h01, h11]]
        if with_vp:
            h02 = alpha * ec + beta * dc
            h12 = gamma * dc
            h = [[h00, h01, h02], [h01, h11, h12], [h02, h12, ops.broadcast_to(cc, h00.shape)]]
        self.hess[index] = ops.stack([ops.stack(row, -1) for row in h], -2)


def varpro_tofts(spec, y, t, cp, max_iterations, cancel=None):
    """Returns x (n, P) in OSIPI units, SSR, J^T J (n, P, P), converged, sum of the residuals over time."""
    ops = array_ops(y)
    with_vp = spec.name == "etofts"
    yy = (y * y).sum(-1)
    y_c = y @ cp
    cc = (cp * cp).sum()
    search = _Search(y, cp, spec.n_params, _starting_log_k(y, t, cp, yy, y_c, cc, with_vp))
    active = ops.arange(y.shape[0], like=y)
    y_time_major = ops.contiguous(y.T)
    for _ in range(max_iterations):
        if ops.numel(active) == 0:
            break
        jobs.raise_if_cancelled(cancel)
        ka = ops.exp(search.log_k[active])
        ee, ed, dd, ec, dc, y_e, y_d, e_sum = convolution_moments(t, cp, ka, y_time_major[:, active])
        a, b, ssr = _bounded_ab(yy[active], y_e, y_c[active], ee, ec, cc, with_vp)
        improved = ssr <= search.best_ssr[active] * (1 + 1e-12)
        # residual . D and the curvature of the reduced problem in k (D projected off E and cp)
        r_d = y_d - a * ed - b * dc
        if with_vp:
            det = ops.clamp(ee * cc - ec * ec, min=1e-300)
            proj = (ed * ed * cc - 2 * ed * dc * ec + dc * dc * ee) / det
            proj = ops.where(b > 0, proj, ed * ed / ee)
        else:
            proj = ed * ed / ee
        curvature = ops.clamp(a * a * (dd - proj), min=1e-300)
        new_log_k = search.step(active, improved, ka, a, r_d, curvature)
        search.record(active[improved], improved, ka, a, b, ssr, (ee, ed, dd, ec, dc, e_sum), cc, with_vp)
        moved = ops.abs(new_log_k - search.log_k[active])
        done = (improved & ((moved < 1e-6) | (a <= 0))) | (~improved & (moved < 1e-6))
        search.converged[active[done]] = True
        search.log_k[active] = new_log_k
        active = active[~done]
    return search.x, search.ssr, search.hess, search.converged, search.residual_sum


def outside_varpro(x, converged, lower, upper):
    """Voxels whose variable-projection optimum needs the bounded LM: outside the model's bounds
    (e.g. ve > 1), not converged, or pinned at the edge of the searched kep range."""
    outside = ((x < lower) | (x > upper)).any(-1) | ~converged | ~array_ops(x).isfinite(x).all(-1)
    kep_per_min = x[:, 0] / x[:, 1]
    kep_low, kep_high = KEP_RANGE_PER_MIN
    return outside | (kep_per_min >= kep_high * (1 - 1e-9)) | (kep_per_min <= kep_low * (1 + 1e-9))
