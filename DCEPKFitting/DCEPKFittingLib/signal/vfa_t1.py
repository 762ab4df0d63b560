"""T1 mapping by variable flip angle: the linearised fit and a bounded Levenberg-Marquardt refinement,
optionally B1-corrected, voxel-wise over a volume, with a status per voxel."""

import enum

import numpy as np

from ..core import jobs
from ..core.errors import DCEPKInputError
from .spgr import check_b1, check_flip_angle, check_tr


class T1FitStatus(enum.IntEnum):
    OK = 0
    NONPOSITIVE_SIGNAL = 1   # a signal <= 0: the SPGR model cannot produce it
    NONPHYSICAL = 2          # fitted E1 = exp(-TR/T1) outside (0, 1): no positive finite T1
    NOT_CONVERGED = 3        # nonlinear fit stopped at the iteration limit (result kept)
    NAN_INPUT = 4            # NaN / inf signal or B1


def _vfa_linear(sig, alpha):
    """DESPOT1: S/sin(a) = E1 * S/tan(a) + M(1 - E1), a straight line per voxel."""
    y = sig / np.sin(alpha)
    x = sig / np.tan(alpha)
    xm = x.mean(axis=-1, keepdims=True)
    ym = y.mean(axis=-1, keepdims=True)
    sxx = np.sum((x - xm) ** 2, axis=-1)
    sxy = np.sum((x - xm) * (y - ym), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = sxy / sxx
        m = (ym[..., 0] - e1 * xm[..., 0]) / (1.0 - e1)
    return e1, m


def _vfa_lm(sig, alpha, e1, m, max_iter=100, tol=1e-10):
    """Levenberg-Marquardt on (M, E1) for all voxels at once (2x2 normal equations each).

    Each iteration works only on the voxels still moving, so converged voxels cost nothing.
    """
    sin_a, cos_a = np.sin(alpha), np.cos(alpha)
    eps = 1e-12
    e1 = np.clip(np.asarray(e1, dtype=np.float64).copy(), eps, 1 - eps)
    m = np.asarray(m, dtype=np.float64).copy()
    lam = np.full(e1.shape, 1e-3)
    converged = np.zeros(e1.shape, bool)

    def model(m_, e_, sa, ca):
        g = sa * (1.0 - e_[:, None]) / (1.0 - ca * e_[:, None])
        return g, m_[:, None] * g

    _, f = model(m, e1, sin_a, cos_a)
    cost = np.sum((sig - f) ** 2, axis=-1)
    active = np.arange(e1.size)
    for _ in range(max_iter):
        if active.size == 0:
            break
        y, sa, ca = sig[active], sin_a[active], cos_a[active]
        ea, ma, la, ca_cost = e1[active], m[active], lam[active], cost[active]
        g, f = model(ma, ea, sa, ca)
        r = y - f
        dg = sa * (ca - 1.0) / (1.0 - ca * ea[:, None]) ** 2
        j0, j1 = g, ma[:, None] * dg
        a00, a01, a11 = np.sum(j0 * j0, -1), np.sum(j0 * j1, -1), np.sum(j1 * j1, -1)
        b0, b1_ = np.sum(j0 * r, -1), np.sum(j1 * r, -1)
        d00, d11 = a00 * (1 + la), a11 * (1 + la)
        det = d00 * d11 - a01 * a01
        with np.errstate(divide="ignore", invalid="ignore"):
            dm = (d11 * b0 - a01 * b1_) / det
            de = (d00 * b1_ - a01 * b0) / det
        dm = np.where(np.isfinite(dm), dm, 0.0)
        de = np.where(np.isfinite(de), de, 0.0)
        m_new = ma + dm
        e_new = np.clip(ea + de, eps, 1 - eps)
        _, f_new = model(m_new, e_new, sa, ca)
        cost_new = np.sum((y - f_new) ** 2, axis=-1)
        better = cost_new < ca_cost
        small_step = np.abs(e_new - ea) <= tol * np.maximum(ea, 1e-6)
        small_gain = (ca_cost - cost_new) <= tol * np.maximum(ca_cost, 1e-300)
        m[active] = np.where(better, m_new, ma)
        e1[active] = np.where(better, e_new, ea)
        cost[active] = np.where(better, cost_new, ca_cost)
        lam[active] = np.where(better, la / 3.0, la * 4.0)
        done = (better & (small_step | small_gain)) | (lam[active] > 1e12)
        converged[active[done]] = True
        active = active[~done]
    return e1, m, converged


def fit_vfa_t1(signals, fa_deg, tr_s, method="linear", b1=None, progress=None, cancel=None):
    """Variable-flip-angle T1 from SPGR signals.

    signals: (..., nFA) magnitudes; fa_deg: (nFA,) nominal flip angles in degrees; tr_s: TR (s);
    method: 'linear' (DESPOT1 regression) or 'nonlinear' (least squares on the signals,
    Levenberg-Marquardt started from the linear fit); b1: None, scalar or (...) map of actual /
    nominal flip angle. Returns (t1_s, s0, status) with shapes (...); t1_s and s0 are NaN where
    status is NONPOSITIVE_SIGNAL, NONPHYSICAL or NAN_INPUT (see ``T1FitStatus``).
    ``progress(fraction, message)`` and ``cancel`` (``is_set()``) follow ``jobs``.
    """
    if method not in ("linear", "nonlinear"):
        raise DCEPKInputError(f"unknown VFA fit method '{method}': use 'linear' or 'nonlinear'")
    sig = np.asarray(signals, dtype=np.float64)
    fa = check_flip_angle(fa_deg).ravel()
    tr = check_tr(tr_s)
    if sig.ndim == 0 or sig.shape[-1] != fa.size:
        raise DCEPKInputError(
            f"signals have shape {sig.shape} but {fa.size} flip angles were given: the last axis "
            "must hold one signal per flip angle")
    if fa.size < 2 or np.unique(fa).size < 2:
        raise DCEPKInputError("VFA T1 mapping needs at least two different flip angles")
    spatial = sig.shape[:-1]
    if b1 is not None and np.asarray(b1).ndim > 0 and np.asarray(b1).shape != spatial:
        raise DCEPKInputError(f"B1 map of shape {np.asarray(b1).shape} does not match the signals' grid {spatial}")
    b1_map = np.ones(spatial) if b1 is None else np.broadcast_to(check_b1(b1), spatial)

    flat = sig.reshape(-1, fa.size)
    b1_flat = b1_map.reshape(-1)
    alpha = np.deg2rad(fa[None, :] * b1_flat[:, None])
    n = flat.shape[0]
    status = np.full(n, T1FitStatus.OK, dtype=np.uint8)
    nan_in = ~np.all(np.isfinite(flat), axis=-1) | ~np.isfinite(b1_flat)
    nonpos = ~nan_in & np.any(flat <= 0, axis=-1)
    status[nan_in] = T1FitStatus.NAN_INPUT
    status[nonpos] = T1FitStatus.NONPOSITIVE_SIGNAL
    good = status == T1FitStatus.OK

    e1 = np.full(n, np.nan)
    m = np.full(n, np.nan)
    good_idx = np.flatnonzero(good)
    chunk = 500_000
    for lo in range(0, good_idx.size, chunk):
        jobs.raise_if_cancelled(cancel)
        idx = good_idx[lo:lo + chunk]
        y, a = flat[idx], alpha[idx]
        e1_lin, m_lin = _vfa_linear(y, a)
        if method == "nonlinear":
            # Start the few voxels whose linear fit is non-physical from a neutral guess
            # (T1 = 1 s, M scaled to the data) so noise in the line does not doom them.
            bad0 = ~((e1_lin > 0) & (e1_lin < 1) & np.isfinite(m_lin) & (m_lin > 0))
            e_init = np.where(bad0, np.exp(-tr / 1.0), e1_lin)
            g0 = np.sin(a) * (1 - e_init[:, None]) / (1 - np.cos(a) * e_init[:, None])
            m_init = np.where(bad0, np.sum(y * g0, -1) / np.sum(g0 * g0, -1), m_lin)
            e_fit, m_fit, conv = _vfa_lm(y, a, e_init, m_init)
            status[idx[~conv]] = T1FitStatus.NOT_CONVERGED
            e1[idx], m[idx] = e_fit, m_fit
            # E1 pinned at the clip limits means the optimum lies outside (0, 1).
            pinned = (e_fit <= 1e-11) | (e_fit >= 1 - 1e-11)
            status[idx[pinned]] = T1FitStatus.NONPHYSICAL
        else:
            e1[idx], m[idx] = e1_lin, m_lin
        jobs.report(progress, min(1.0, (lo + idx.size) / good_idx.size), f"VFA T1 ({method})")
    physical = (e1 > 0) & (e1 < 1) & np.isfinite(m) & (m > 0)
    status[good & ~physical] = T1FitStatus.NONPHYSICAL
    keep = (status == T1FitStatus.OK) | (status == T1FitStatus.NOT_CONVERGED)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(keep, -tr / np.log(e1), np.nan)
    s0 = np.where(keep, m, np.nan)
    return t1.reshape(spatial), s0.reshape(spatial), status.reshape(spatial)
