"""Tracer-kinetic forward models with analytic Jacobians, one implementation for numpy and torch.

Every model's tissue concentration is a sum of exponential convolutions of the plasma
concentration plus an intravascular term::

    C(t) = sum_i A_i * [cp (*) exp(-k_i t)](t) + B * cp(t)

so one exact convolution routine (``exp_convolution``) serves all of them. The plasma curve is
taken as piecewise linear between its samples (any, also non-uniform, frame times), and the
convolution of each linear segment with the exponential is integrated exactly by a recursion
(stable for k*dt -> 0 and for large k). The derivative with respect to k comes out of the
same recursion, which gives the analytic Jacobian the fitter needs.

Units at the API (OSIPI lexicon): time in s, Ktrans / PS / kep in 1/min, Fp in ml/100ml/min,
ve / vp fractions, concentration in mM. Internally rates are converted to 1/s.

Parameters are given as an array ``(..., P)`` in the order of ``MODELS[name].parameters``.
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from ..core.errors import DCEPKInputError
from .array_backend import _is_tensor, array_ops

PER_MIN = 1.0 / 60.0          # 1/min -> 1/s
FP_TO_PER_S = 1.0 / 6000.0    # ml/100ml/min -> 1/s (ml per ml of tissue per second)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    parameters: Tuple[str, ...]
    units: Tuple[str, ...]
    lower: Tuple[float, ...]
    upper: Tuple[float, ...]
    initial: Tuple[float, ...]
    description: str = ""

    @property
    def n_params(self) -> int:
        return len(self.parameters)

    @property
    def has_ve(self) -> bool:
        return "ve" in self.parameters

    def index(self, name: str) -> int:
        return self.parameters.index(canonical_parameter_name(self.name, name))


MODELS: Dict[str, ModelSpec] = {
    "tofts": ModelSpec("tofts", ("Ktrans", "ve"), ("1/min", "fraction"),
                       (0.0, 1e-4), (5.0, 1.0), (0.1, 0.3), "standard Tofts"),
    "etofts": ModelSpec("etofts", ("Ktrans", "ve", "vp"), ("1/min", "fraction", "fraction"),
                        (0.0, 1e-4, 0.0), (5.0, 1.0, 1.0), (0.1, 0.3, 0.02), "extended Tofts"),
    "patlak": ModelSpec("patlak", ("Ktrans", "vp"), ("1/min", "fraction"),
                        (0.0, 0.0), (5.0, 1.0), (0.01, 0.02), "Patlak (irreversible uptake)"),
    "2cxm": ModelSpec("2cxm", ("Fp", "PS", "ve", "vp"), ("ml/100ml/min", "1/min", "fraction", "fraction"),
                      (1e-3, 0.0, 1e-4, 1e-4), (500.0, 10.0, 1.0, 1.0), (50.0, 0.1, 0.2, 0.05),
                      "two-compartment exchange"),
    "2cum": ModelSpec("2cum", ("Fp", "PS", "vp"), ("ml/100ml/min", "1/min", "fraction"),
                      (1e-3, 0.0, 1e-4), (500.0, 10.0, 1.0), (50.0, 0.1, 0.05),
                      "two-compartment uptake"),
}

_MODEL_ALIASES = {"extended_tofts": "etofts", "extendedtofts": "etofts", "extended tofts": "etofts",
                  "etm": "etofts", "tm": "tofts", "2cx": "2cxm", "2cu": "2cum"}


def get_model(model) -> ModelSpec:
    """The ``ModelSpec`` for a name (case-insensitive, a few common aliases) or a spec."""
    if isinstance(model, ModelSpec):
        return model
    key = str(model).strip().lower()
    key = _MODEL_ALIASES.get(key, key)
    if key not in MODELS:
        raise DCEPKInputError(f"unknown tracer-kinetic model {model!r}: choose one of {sorted(MODELS)}")
    return MODELS[key]


def canonical_parameter_name(model, name: str) -> str:
    """Map OSIPI synonyms onto the spec's names (Patlak's uptake rate is often called PS)."""
    spec = get_model(model)
    if name in spec.parameters:
        return name
    lowered = {p.lower(): p for p in spec.parameters}
    if name.lower() in lowered:
        return lowered[name.lower()]
    if spec.name == "patlak" and name.lower() == "ps":
        return "Ktrans"
    raise DCEPKInputError(f"model {spec.name!r} has no parameter {name!r}: its parameters are "
                          f"{list(spec.parameters)}")


def kep(ktrans, ve):
    """Efflux rate constant kep = Ktrans / ve (1/min when Ktrans is in 1/min)."""
    return ktrans / ve


# ---------------------------------------------------------------------------------------------
# Exact convolution of a piecewise-linear curve with exp(-k t).
def _series_threshold(x):
    # Below this x = k*dt the closed forms lose digits to cancellation (relative error ~eps/x^2 for
    # chi) and a 4-term Taylor series is exact to rounding; float32 needs a larger switch point.
    double = str(x.dtype) in ("float64", "torch.float64")
    return 1e-3 if double else 0.05


def _segment_weights(ops, x, need_derivative):
    """For x = k*dt: exp(-x), phi1 = (1-e^-x)/x, psi = int_0^1 v e^{-xv} dv, chi = int_0^1 v^2 e^{-xv} dv.

    The segment integral is dt*[c0*psi + c1*(phi1 - psi)]; d/dx of phi1 is -psi, of psi is -chi.
    """
    small = x < _series_threshold(x)
    xs = ops.where(small, 1.0 + 0 * x, x)  # safe divisor; the closed forms are discarded where small
    e = ops.exp(-x)
    one_minus_e = -ops.expm1(-x)
    phi1 = ops.where(small, 1.0 - x * (0.5 - x * (1.0 / 6 - x / 24)), one_minus_e / xs)
    psi_closed = (one_minus_e - x * e) / (xs * xs)
    psi = ops.where(small, 0.5 - x * (1.0 / 3 - x * (1.0 / 8 - x / 30)), psi_closed)
    chi = None
    if need_derivative:
        chi = ops.where(small, 1.0 / 3 - x * (0.25 - x * (0.1 - x / 36)), (2.0 * psi_closed - e) / xs)
    return e, phi1, psi, chi


def exp_convolution(t_s, cp, k_per_s, need_derivative=False):
    """E(t_n) = int_{t_0}^{t_n} cp(tau) exp(-k (t_n - tau)) dtau, exact for piecewise-linear cp.

    ``t_s`` (T,), ``cp`` (T,) or (..., T), ``k_per_s`` scalar or (...,) in 1/s (k >= 0).
    Returns E (..., T) and, if asked, dE/dk (..., T). Before t_0 the input is taken as zero.
    """
    ops = array_ops(cp)
    k = ops.asarray(k_per_s, like=cp)
    dt = t_s[1:] - t_s[:-1]                                     # (T-1,)
    steps, which = _distinct_steps(ops, dt)
    if steps is not None:
        # few distinct frame steps (uniform sampling: one): the weights depend on k*dt only, so
        # compute them per distinct step and spread them over the frames
        e, phi1, psi, chi = _segment_weights(ops, k[..., None] * steps, need_derivative)
        if steps.shape[0] > 1:  # one step broadcasts as it is
            e, phi1, psi = e[..., which], phi1[..., which], psi[..., which]
            chi = chi[..., which] if need_derivative else None
    else:
        e, phi1, psi, chi = _segment_weights(ops, k[..., None] * dt, need_derivative)
    c0 = cp[..., :-1] * dt
    c1 = cp[..., 1:] * dt
    inc = c0 * psi + c1 * (phi1 - psi)                            # this segment's own integral
    batch = np.broadcast_shapes(tuple(psi.shape[:-1]), tuple(cp.shape[:-1]))
    inc = ops.broadcast_to(inc, batch + (dt.shape[0],))
    dinc = None
    if need_derivative:
        # d/dk of the segment integral: dt^2 * [c0 * (-chi) + c1 * (chi - psi)]
        dinc = ops.broadcast_to((c1 * dt) * (chi - psi) - (c0 * dt) * chi, inc.shape)
    n_curves = int(np.prod(batch)) if len(batch) else 1
    block = min(64, _SCAN_BUDGET // max(n_curves * inc.shape[-1], 1))
    if block >= 8 and inc.shape[-1] > 4 * block:  # short series: the plain loop is cheaper
        return _scan_blocked(ops, t_s, k, inc, dinc, block)
    return _scan_loop(ops, dt, ops.broadcast_to(e, inc.shape), inc, dinc)


def _distinct_steps(ops, dt):
    """(distinct steps, index of each frame's step) when there are few distinct steps, else (None, None)."""
    dt_host = ops.to_numpy(dt)
    steps, which = np.unique(dt_host, return_inverse=True)
    if steps.size * 4 > dt_host.size:
        return None, None
    return ops.asarray(steps, like=dt), ops.asarray(which.reshape(-1), like=dt, dtype="int64")


_SCAN_BUDGET = 1 << 22  # elements of the blocked scan's (curves, T, block) work array


def _scan_loop(ops, dt, decay, inc, dinc):
    """E_n = decay_n E_{n-1} + inc_n, step by step over time (best for many curves)."""
    batch = tuple(inc.shape[:-1])
    inc = ops.moveaxis(inc, -1, 0)
    decay = ops.moveaxis(decay, -1, 0)
    current = ops.zeros(batch, like=inc)
    out = [current]
    if dinc is not None:
        dinc = ops.moveaxis(dinc, -1, 0)
        dt_b = dt.reshape((-1,) + (1,) * len(batch)) if len(batch) else dt
        dcurrent = ops.zeros(batch, like=inc)
        dout = [dcurrent]
    for n in range(inc.shape[0]):
        if dinc is not None:
            # d/dk [e^{-k dt} E_prev] = e^{-k dt} (dE_prev - dt E_prev)
            dcurrent = decay[n] * (dcurrent - dt_b[n] * current) + dinc[n]
            dout.append(dcurrent)
        current = decay[n] * current + inc[n]
        out.append(current)
    # stacking time-major and moving the axis is much cheaper than a strided stack on the last axis
    conv = ops.moveaxis(ops.stack(out, 0), 0, -1)
    if dinc is not None:
        return conv, ops.moveaxis(ops.stack(dout, 0), 0, -1)
    return conv


def _scan_blocked(ops, t_s, k, inc, dinc, block):
    """Same recursion as ``_scan_loop`` in blocks: exp(-k (t_i - t_j)) weights within a block as a
    small matrix product, then a carry from block to block (few Python steps for long series)."""
    batch = tuple(inc.shape[:-1])
    m = inc.shape[-1]
    n_blocks = -(-m // block)
    pad = n_blocks * block - m
    ends = t_s[1:]                                                # time at which each increment ends
    if pad:
        ends = ops.concat([ends] + [ends[-1:]] * pad)
        zeros = ops.zeros(batch + (pad,), like=inc)
        inc = ops.concat([inc, zeros])
        if dinc is not None:
            dinc = ops.concat([dinc, zeros])
    ends = ends.reshape(n_blocks, block)
    lag = ends[:, :, None] - ends[:, None, :]                     # (nb, L, L), t_i - t_j
    lower = lag >= 0
    lag = ops.where(lower, lag, 0 * lag)
    kk = k.reshape(tuple(k.shape) + (1, 1, 1))
    weight = ops.exp(-kk * lag) * lower                           # (..., nb, L, L)
    inc_b = inc.reshape(batch + (n_blocks, block))
    local = (weight @ inc_b[..., None])[..., 0]
    if dinc is not None:
        dinc_b = dinc.reshape(batch + (n_blocks, block))
        dlocal = (weight @ dinc_b[..., None])[..., 0] - ((weight * lag) @ inc_b[..., None])[..., 0]
    starts = [t_s[0]] + [ends[b - 1, -1] for b in range(1, n_blocks)]
    carry = ops.zeros(batch, like=inc)
    dcarry = ops.zeros(batch, like=inc)
    out, dout = [], []
    kb = k[..., None]
    for b in range(n_blocks):
        since = ends[b] - starts[b]                               # (L,)
        decay = ops.exp(-kb * since)
        value = decay * carry[..., None] + local[..., b, :]
        out.append(value)
        if dinc is not None:
            dvalue = decay * (dcarry[..., None] - since * carry[..., None]) + dlocal[..., b, :]
            dout.append(dvalue)
            dcarry = dvalue[..., -1]
        carry = value[..., -1]
    zero = ops.zeros(batch + (1,), like=inc)
    conv = ops.concat([zero] + out)[..., : m + 1]
    if dinc is not None:
        return conv, ops.concat([zero] + dout)[..., : m + 1]
    return conv


def shift_curve(t_s, cp, delay_s):
    """cp(t - delay) by linear interpolation on the sample grid, 0 before the first sample.

    Returns the shifted curve and its derivative with respect to ``delay_s``. ``delay_s`` may be
    a scalar or per-curve (...,); the result is (..., T).
    """
    ops = array_ops(cp)
    delay = ops.asarray(delay_s, like=cp)
    tq = t_s - delay[..., None]                                  # (..., T)
    n = t_s.shape[0]
    hi = ops.clamp(ops.searchsorted(t_s, tq), 1, n - 1)
    lo = hi - 1
    t_lo, t_hi = t_s[lo], t_s[hi]
    c_lo, c_hi = ops.take_last(cp, lo), ops.take_last(cp, hi)
    slope = (c_hi - c_lo) / (t_hi - t_lo)
    value = c_lo + slope * (tq - t_lo)
    before = tq < t_s[0]
    after = tq > t_s[-1]
    # before the first sample the curve ramps from 0 (at t0 - (t1 - t0)) would be a guess: take 0
    zero = 0 * value
    value = ops.where(before, zero, ops.where(after, c_hi, value))
    dvalue = ops.where(before | after, zero, -slope)
    return value, dvalue


# ---------------------------------------------------------------------------------------------
# Each model as sum_i A_i * E(k_i) + B * cp, with d(A_i, k_i, B)/d(theta).
def _terms(spec: ModelSpec, p, ops):
    """Return list of (A, k, dA (list over params), dk (list)), B, dB (list). Rates in 1/s."""
    zero = 0 * p[..., 0]
    one = zero + 1.0
    if spec.name in ("tofts", "etofts"):
        ktrans, ve = p[..., 0], p[..., 1]
        a = ktrans * PER_MIN
        k = a / ve
        da = [one * PER_MIN, zero]
        dk = [one * PER_MIN / ve, -k / ve]
        if spec.name == "tofts":
            return [(a, k, da, dk)], zero, [zero, zero]
        da.append(zero)
        dk.append(zero)
        return [(a, k, da, dk)], p[..., 2], [zero, zero, one]
    if spec.name == "patlak":
        a = p[..., 0] * PER_MIN
        return [(a, zero, [one * PER_MIN, zero], [zero, zero])], p[..., 1], [zero, one]
    if spec.name == "2cum":
        f, ps, vp = p[..., 0] * FP_TO_PER_S, p[..., 1] * PER_MIN, p[..., 2]
        total = f + ps
        kp = total / vp
        a0 = f * ps / total        # irreversible uptake: F*E with E = PS/(F+PS)
        a1 = f - a0                # plasma washout
        da0 = [FP_TO_PER_S * ps * ps / total ** 2, PER_MIN * f * f / total ** 2, zero]
        da1 = [FP_TO_PER_S - da0[0], -da0[1], zero]
        dkp = [FP_TO_PER_S / vp, PER_MIN / vp, -kp / vp]
        return ([(a0, zero, da0, [zero, zero, zero]), (a1, kp, da1, dkp)], zero, [zero, zero, zero])
    if spec.name == "2cxm":
        f, ps, ve, vp = p[..., 0] * FP_TO_PER_S, p[..., 1] * PER_MIN, p[..., 2], p[..., 3]
        kp = (f + ps) / vp
        ke = ps / ve
        kb = f / vp
        s = kp + ke
        d = ops.sqrt(ops.clamp(s * s - 4.0 * ke * kb, min=1e-30))
        k_plus = 0.5 * (s + d)
        k_minus = 0.5 * (s - d)
        # impulse response h = A+ e^{-K+ t} + A- e^{-K- t} with h(0) = F, h'(0) = -F kb
        a_plus = f * (kb - k_minus) / d
        a_minus = f * (k_plus - kb) / d
        dkp = [FP_TO_PER_S / vp, PER_MIN / vp, zero, -kp / vp]
        dke = [zero, PER_MIN / ve, -ke / ve, zero]
        dkb = [FP_TO_PER_S / vp, zero, zero, -kb / vp]
        df = [one * FP_TO_PER_S, zero, zero, zero]
        dkplus, dkminus, daplus, daminus = [], [], [], []
        for j in range(4):
            ds = dkp[j] + dke[j]
            dd = (s * ds - 2.0 * (dke[j] * kb + ke * dkb[j])) / d
            dkpl = 0.5 * (ds + dd)
            dkmi = 0.5 * (ds - dd)
            dkplus.append(dkpl)
            dkminus.append(dkmi)
            daplus.append(df[j] * (kb - k_minus) / d + f * ((dkb[j] - dkmi) / d - (kb - k_minus) * dd / (d * d)))
            daminus.append(df[j] * (k_plus - kb) / d + f * ((dkpl - dkb[j]) / d - (k_plus - kb) * dd / (d * d)))
        return ([(a_plus, k_plus, daplus, dkplus), (a_minus, k_minus, daminus, dkminus)],
                zero, [zero, zero, zero, zero])
    raise DCEPKInputError(f"unknown tracer-kinetic model {spec.name!r}")  # pragma: no cover


def _prepare(model, params, t_s, cp):
    spec = get_model(model)
    like = params if _is_tensor(params) else cp if _is_tensor(cp) else None   # numpy: float64
    ops = array_ops(like)
    params, cp, t_s = (ops.asarray(values, like=like) for values in (params, cp, t_s))
    if params.ndim == 0 or params.shape[-1] != spec.n_params:
        raise DCEPKInputError(
            f"model {spec.name!r} needs {spec.n_params} parameters {list(spec.parameters)} in the last "
            f"axis, got an array of shape {tuple(params.shape)}: pass params as (..., {spec.n_params})")
    if t_s.ndim != 1 or t_s.shape[0] < 2:
        raise DCEPKInputError(f"frame times must be a 1-D array of at least 2 times in seconds, got shape "
                              f"{tuple(t_s.shape)}")
    if cp.ndim == 0 or cp.shape[-1] != t_s.shape[0]:
        raise DCEPKInputError(f"the plasma input function has {tuple(cp.shape)[-1:] or 'no'} samples but there are "
                              f"{t_s.shape[0]} frame times: give one AIF sample per frame")
    return spec, ops, params, t_s, cp


def concentration(model, params, t_s, cp, delay_s=0.0):
    """Tissue concentration (mM), shape (..., T), for parameters ``(..., P)`` in OSIPI units.

    ``t_s`` frame times (T,) in s (any spacing, increasing); ``cp`` plasma concentration (T,) or
    (..., T) in mM; ``delay_s`` arterial delay (scalar or (...,)), cp is shifted later by it.
    numpy in -> numpy out (float64); torch in -> torch out on the same dtype and device.
    """
    return _evaluate(model, params, t_s, cp, delay_s, jacobian=False)


def concentration_and_jacobian(model, params, t_s, cp, delay_s=0.0, with_delay=False):
    """Concentration (..., T) and its Jacobian (..., T, P) w.r.t. the parameters (OSIPI units).

    With ``with_delay`` the Jacobian has one more column, d/d(delay_s) (mM per s).
    """
    return _evaluate(model, params, t_s, cp, delay_s, jacobian=True, with_delay=with_delay)


def _evaluate(model, params, t_s, cp, delay_s, jacobian, with_delay=False):
    spec, ops, params, t_s, cp = _prepare(model, params, t_s, cp)
    delayed = with_delay or not (np.ndim(delay_s) == 0 and float(delay_s) == 0.0)
    dcp = None
    if delayed:
        cp, dcp = shift_curve(t_s, cp, delay_s)
    terms, b, db = _terms(spec, params, ops)
    conc = b[..., None] * cp
    columns = [db[j][..., None] * cp for j in range(spec.n_params)] if jacobian else None
    dconc_ddelay = b[..., None] * dcp if (jacobian and with_delay) else None
    for a, k, da, dk in terms:
        if jacobian:
            e, de = exp_convolution(t_s, cp, k, need_derivative=True)
            for j in range(spec.n_params):
                columns[j] = columns[j] + da[j][..., None] * e + (a * dk[j])[..., None] * de
            if with_delay:
                dconc_ddelay = dconc_ddelay + a[..., None] * exp_convolution(t_s, dcp, k)
        else:
            e = exp_convolution(t_s, cp, k)
        conc = conc + a[..., None] * e
    if not jacobian:
        return conc
    if with_delay:
        columns.append(dconc_ddelay)
    return conc, ops.stack(columns, -1)
