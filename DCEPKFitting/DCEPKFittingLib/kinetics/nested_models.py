"""Per-voxel choice among nested tracer-kinetic models, so that a voxel with no measurable leakage
reports Ktrans = 0 (ve and kep undefined) instead of whatever an ill-posed fit lands on.

Why: on a voxel without leakage the extended Tofts least-squares optimum is often a spike
(ve -> 0 and kep of 70/min or more, so that the leakage term imitates vp x cp); with Tofts, a
plasma-only curve is imitated the same way. These are genuine optima of an over-parameterised
model, not optimiser failures, so a better optimiser cannot remove them; a model choice can.

Candidates (``SelectedModel``): no enhancement (C = 0), plasma only (C = vp cp), and the leakage
models nested in the model asked for (``tofts``, ``etofts``, ``patlak``). First *is there
leakage?*: the model asked for against the better of the two models without leakage. Then, for a
leaky extended-Tofts voxel, Patlak (no backflux seen: ve undefined), and Tofts where the
extended Tofts optimum has vp = 0, if they do as well by the criterion (``SUBMODELS``). Plasma
only is never compared with Tofts directly: Tofts with kep -> infinity reproduces it, so such a
comparison lets noise pick a spike.

Each comparison is by the Bayesian information criterion (Schwarz 1978),
BIC = T ln(SSR / T) + k ln T, T frames and k parameters: the variance is each model's own
residual variance (the voxel's own noise), and ln T per parameter is 4.1 at 60 frames. The
leakage test of a Tofts model counts one parameter more than it has: its rate constant kep is
not identified when there is no leakage (the leakage term vanishes as Ktrans -> 0 and imitates
vp cp as kep -> infinity), and such a nuisance parameter makes the likelihood ratio exceed its
nominal chi-square (Davies, Biometrika 1987;74:33-43); with the nominal count 0.2 % of the
phantom's normal brain still came out above 0.05 /min, with the extra count 0.04 %, at the cost
of 3 % fewer low-leakage voxels (Ktrans < 0.05) found at SNR 5.

The voxel's noise includes its baseline. A concentration converted from signal uses the mean
pre-contrast signal S0, whose error shifts every post-contrast frame by the same amount (to
first order), a correlated error that ordinary residuals ignore: ignoring it, 12 % of
non-leaking voxels at a baseline SNR of 10 looked leaky to the criterion; allowing for it, 1 %.
With ``baseline_aware`` (signal input) each model is given a free constant offset over all
frames for the comparison, which is the generalised least-squares metric for that error (the
baseline frames' mean is zero by construction, so the offset costs their deviation from it). The
models without leakage are fitted with the offset exactly (closed form); the leakage models keep
their ordinary least-squares parameters and only their residuals are profiled over the offset,
which can only make them look worse: the decision errs towards "no leakage". The parameters
reported are always the ordinary least-squares ones.
"""

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import tk_models as tk
from .array_backend import array_ops

NESTED_MODELS = ("tofts", "etofts", "patlak")


class SelectedModel(enum.IntEnum):
    """Codes of the ``selected_model`` map: the model each voxel's parameters come from."""
    NOT_FITTED = 0          # outside the mask, or invalid input
    NO_ENHANCEMENT = 1      # C = 0: Ktrans = vp = 0, ve and kep undefined (NaN)
    PLASMA = 2              # C = vp cp: Ktrans = 0, ve and kep undefined (NaN)
    TOFTS = 3               # Ktrans, ve; vp = 0
    EXTENDED_TOFTS = 4      # Ktrans, ve, vp
    PATLAK = 5              # Ktrans, vp
    TWO_COMPARTMENT_EXCHANGE = 6
    TWO_COMPARTMENT_UPTAKE = 7


MODEL_CODES = {"tofts": SelectedModel.TOFTS, "etofts": SelectedModel.EXTENDED_TOFTS,
               "patlak": SelectedModel.PATLAK, "2cxm": SelectedModel.TWO_COMPARTMENT_EXCHANGE,
               "2cum": SelectedModel.TWO_COMPARTMENT_UPTAKE}


@dataclass
class ChunkFit:
    """A model fitted to n curves, in the layout of the model asked for (numpy arrays or torch tensors)."""
    x: Any                              # (n, P) OSIPI units; NaN where undefined
    ssr: Any                            # (n,) sum of squared residuals
    hess: Any                           # (n, P, P) J^T J
    converged: Any                      # (n,) bool
    residual_sum: Optional[Any] = None  # (n,) sum over time of the residuals
    refit: Optional[Any] = None         # (n,) bool: optimum outside the bounds, bounded refit deferred
    free: Optional[Any] = None          # (n, P) bool: parameters the chosen model estimates
    selected: Optional[Any] = None      # (n,) SelectedModel codes

    def assign(self, index, other: "ChunkFit") -> None:
        """Put ``other`` (a fit of the voxels ``index``) in place."""
        for name in ("x", "ssr", "hess", "converged", "residual_sum"):
            target, value = getattr(self, name), getattr(other, name)
            if target is not None and value is not None:
                target[index] = value


class _Criterion:
    """BIC of each candidate, with the baseline offset profiled out when ``baseline_aware``."""

    def __init__(self, y, baseline_aware):
        self.n_frames = y.shape[1]
        self.penalty = math.log(self.n_frames)
        self.baseline_aware = baseline_aware
        # below the optimisers' precision (and float32 rounding of the input) fits are exact: they
        # tie, and a tie goes to the simpler model
        self.ops = array_ops(y)
        self.floor = 1e-12 * self.ops.clamp((y * y).sum(-1), min=1e-300)

    def subset(self, index) -> "_Criterion":
        part = _Criterion.__new__(_Criterion)
        part.__dict__.update(self.__dict__, floor=self.floor[index])
        return part

    def profiled(self, ssr, residual_sum):
        return ssr - residual_sum * residual_sum / self.n_frames if self.baseline_aware else ssr

    def __call__(self, ssr, n_params):
        ops = self.ops
        return self.n_frames * ops.log(ops.maximum(ssr, self.floor) / self.n_frames) + n_params * self.penalty


def _without_leakage(y, cp, criterion):
    """BIC of no enhancement and of plasma only; the plasma-only vp by ordinary least squares and
    the SSR of both models with their reported parameters."""
    ops = array_ops(y)
    y_c = y @ cp
    cc = (cp * cp).sum()
    vp = ops.clamp(y_c / cc, 0.0, 1.0)
    yy = (y * y).sum(-1)
    reported_ssr = (yy, yy - 2 * vp * y_c + vp * vp * cc)
    if criterion.baseline_aware:  # exact fit with the offset: centre the curves
        y_centred = y - y.mean(-1)[:, None]
        cp_centred = cp - cp.mean()
        ssr_none = (y_centred * y_centred).sum(-1)
        scale = (cp_centred * cp_centred).sum()
        vp_offset = ops.clamp(y_centred @ cp_centred / scale, 0.0, 1.0)
        ssr_plasma = ssr_none - 2 * vp_offset * (y_centred @ cp_centred) + vp_offset * vp_offset * scale
    else:
        ssr_none, ssr_plasma = reported_ssr
    return criterion(ssr_none, 0), criterion(ssr_plasma, 1), vp, reported_ssr


def residual_sums(spec, y, t, cp, x):
    """Sum over time of y - f(x): one forward evaluation, for fits that do not track it."""
    f = tk.concentration(spec.name, array_ops(x).nan_to_num(x), t, cp)
    return (y - f).sum(-1)


def choose(spec, y, t, cp, fit: ChunkFit, baseline_aware: bool, refit: Callable, fit_submodel: Callable,
           lower, upper) -> ChunkFit:
    """Choose each voxel's model; returns ``fit`` with x, ssr, hess, converged, free and selected set.

    ``refit(index, fit)`` refits those voxels of ``fit`` with the bounded optimiser (returns a
    ``ChunkFit``); ``fit_submodel(name, curves)`` fits a nested leakage model (``SUBMODELS``) to
    curves, a ``ChunkFit`` in that model's own layout with its residual sums; ``lower``,
    ``upper`` the bounds of the model's parameters.
    """
    ops = array_ops(y)
    n, n_params = fit.x.shape
    criterion = _Criterion(y, baseline_aware)
    ic_none, ic_plasma, vp_plasma, quiet_ssr = _without_leakage(y, cp, criterion)
    ic_null = ops.minimum(ic_none, ic_plasma)
    if fit.residual_sum is None:
        fit.residual_sum = residual_sums(spec, y, t, cp, fit.x)
    ic_leaky = criterion(criterion.profiled(fit.ssr, fit.residual_sum), n_params)
    # Tofts models: one parameter more for kep, unidentified without leakage (Patlak has none)
    margin = criterion.penalty if spec.name in ("tofts", "etofts") else 0.0
    leaky = ic_leaky + margin < ic_null
    if fit.refit is not None:
        # only voxels that leak even by the unbounded optimum are worth the bounded refit
        redo = ops.nonzero(leaky & fit.refit)
        if ops.numel(redo):
            fit.assign(redo, refit(redo, fit))
            ic_leaky[redo] = criterion.subset(redo)(criterion.profiled(fit.ssr[redo], fit.residual_sum[redo]),
                                                    n_params)
            leaky[redo] = ic_leaky[redo] + margin < ic_null[redo]
    fit.free = ops.copy(ops.broadcast_to(leaky[:, None], (n, n_params)))
    fit.selected = ops.where(leaky, int(MODEL_CODES[spec.name]),
                             ops.where(ic_none <= ic_plasma, int(SelectedModel.NO_ENHANCEMENT),
                                       int(SelectedModel.PLASMA)))
    best = ops.copy(ic_leaky)
    for name, (code, positions, fixed, bound) in SUBMODELS.get(spec.name, {}).items():
        if bound is None:
            _take_submodel_where_better(y, fit, leaky, best, criterion, code, positions, fixed,
                                        lambda curves, model=name: fit_submodel(model, curves))
            continue
        # an optimum at this bound is the submodel's optimum already (the bound is active in it):
        # same SSR with fewer parameters, so the criterion takes the submodel without a refit
        index, side = bound
        limit = (lower if side < 0 else upper)[index]
        at_bound = leaky & (fit.selected == int(MODEL_CODES[spec.name])) & \
            (side * (fit.x[:, index] - limit) >= -1e-9 * (upper[index] - lower[index]))
        for position, value in fixed.items():
            fit.x[at_bound, position] = value
            fit.free[at_bound, position] = False
        fit.selected[at_bound] = int(code)
    _set_models_without_leakage(spec, cp, fit, leaky, vp_plasma, quiet_ssr, ic_none <= ic_plasma)
    return fit


# Leakage models nested in extended Tofts (Ktrans, ve, vp): where each of their parameters goes,
# the value of the one they lack, and where they are tried (None: fitted in every leaky voxel;
# else the bound, parameter index and -1 lower / +1 upper, at which an extended Tofts optimum is
# that model's). Patlak is kep -> 0: no backflux is seen and ve is undefined. Fitted everywhere
# (it is linear, so cheap), it removes the ve salt of voxels with little leakage (1216 -> 268
# finite ve in the phantom's normal brain, none above 0.2) for a 2.5 % higher Ktrans median error
# on the speed benchmark. Tofts is vp = 0, taken where extended Tofts puts vp at 0: tried
# wherever vp was uncertain, it dropped a real vp from 12-17 % of that benchmark's voxels and
# raised its Ktrans median error by 6-12 %.
SUBMODELS = {"etofts": {"patlak": (SelectedModel.PATLAK, (0, 2), {1: float("nan")}, None),
                        "tofts": (SelectedModel.TOFTS, (0, 1), {2: 0.0}, (2, -1))}}


def _take_submodel_where_better(y, fit, candidates, ic_best, criterion, code, positions, fixed, fit_curves):
    """Fit the submodel on ``candidates`` and keep it where its BIC is no worse than the best so far."""
    ops = array_ops(y)
    index = ops.nonzero(candidates)
    if ops.numel(index) == 0:
        return
    sub = fit_curves(y[index])
    ic = criterion.subset(index)(criterion.profiled(sub.ssr, sub.residual_sum), len(positions))
    better = (ic <= ic_best[index]) & ops.isfinite(sub.x).all(-1)
    chosen = index[better]
    if ops.numel(chosen) == 0:
        return
    ic_best[chosen] = ic[better]
    x = ops.empty_like(fit.x[chosen])
    hess = ops.zeros_like(fit.hess[chosen])
    free = ops.zeros_like(fit.free[chosen])
    where = ops.asarray(positions, like=y, dtype="int64")
    x[:, where] = sub.x[better]
    for position, value in fixed.items():
        x[:, position] = value
    hess[:, where[:, None], where[None, :]] = sub.hess[better]
    free[:, where] = True
    fit.x[chosen], fit.hess[chosen], fit.free[chosen] = x, hess, free
    fit.ssr[chosen] = sub.ssr[better]
    fit.converged[chosen] = sub.converged[better]
    fit.selected[chosen] = int(code)


def _set_models_without_leakage(spec, cp, fit, leaky, vp_plasma, quiet_ssr, no_enhancement):
    """Ktrans = 0, ve NaN; vp (where the model has it) from plasma only, or 0 with no enhancement."""
    ops = array_ops(fit.x)
    quiet = ops.nonzero(~leaky)
    n_quiet = ops.numel(quiet)
    if n_quiet == 0:
        return
    names = spec.parameters
    x = ops.zeros((n_quiet, len(names)), like=fit.x)
    hess = ops.zeros((n_quiet, len(names), len(names)), like=fit.x)
    plasma = ~no_enhancement[quiet]
    vp = ops.where(plasma, vp_plasma[quiet], ops.zeros_like(vp_plasma[quiet]))
    if "ve" in names:
        x[:, names.index("ve")] = float("nan")
    if "vp" in names:
        i = names.index("vp")
        x[:, i] = vp
        hess[:, i, i] = (cp * cp).sum()
        fit.free[quiet, i] = plasma
    fit.ssr[quiet] = ops.where(plasma, quiet_ssr[1][quiet], quiet_ssr[0][quiet])
    fit.x[quiet] = x
    fit.hess[quiet] = hess
    fit.converged[quiet] = True
