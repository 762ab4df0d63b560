"""Tracer-kinetic forward models against closed forms, an independent ODE solution and finite differences."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.kinetics import tk_models as tk


def _nonuniform_times(n=80, end=300.0, seed=0):
    rng = np.random.default_rng(seed)
    steps = rng.uniform(0.5, 8.0, n - 1)
    return np.concatenate([[0.0], np.cumsum(steps) * end / steps.sum()])


def _aif(t):
    """A smooth bolus-like plasma curve (mM), arrival at 10 s."""
    s = np.clip(t - 10.0, 0, None) / 60.0
    return 6.0 * s * np.exp(-s / 0.12) / 0.12 * np.exp(-1) * 0.3 + 0.8 * (1 - np.exp(-s / 0.3)) * np.exp(-s / 4)


@pytest.mark.parametrize("grid", ["uniform", "nonuniform"])
@pytest.mark.parametrize("k", [0.0, 1e-6, 0.004, 0.05 / 2.0, 0.03, 0.5, 50.0, 5000.0])
def test_convolution_of_a_ramp_is_exact(grid, k):
    # cp(t) = t is piecewise linear, so the recursion must reproduce the closed form to rounding:
    # int_0^t tau exp(-k (t - tau)) dtau = t/k - (1 - exp(-k t))/k^2   (t^2/2 for k = 0)
    t = np.linspace(0, 300, 61) if grid == "uniform" else _nonuniform_times()
    if k == 0.0:
        expected = t ** 2 / 2
    elif k * t[-1] < 1e-3:
        expected = t ** 2 / 2 - k * t ** 3 / 6 + k ** 2 * t ** 4 / 24
    else:
        expected = t / k - (-np.expm1(-k * t)) / k ** 2
    got = tk.exp_convolution(t, t.copy(), k)
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12 * expected.max())


def test_convolution_derivative_in_k_matches_closed_form():
    # d/dk [t/k - (1 - e^{-kt})/k^2] = -t/k^2 + 2(1 - e^{-kt})/k^3 - t e^{-kt}/k^2
    t = _nonuniform_times()
    for k in (0.01, 0.2, 3.0):
        _, de = tk.exp_convolution(t, t.copy(), k, need_derivative=True)
        expected = -t / k ** 2 + 2 * (-np.expm1(-k * t)) / k ** 3 - t * np.exp(-k * t) / k ** 2
        np.testing.assert_allclose(de, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("grid", ["uniform", "nonuniform"])
def test_tofts_matches_closed_form_for_exponential_input(grid):
    # cp = e^{-a t}: C = Ktrans e^{-a t} (*) e^{-kep t} = Ktrans (e^{-a t} - e^{-kep t}) / (kep - a).
    # The linear interpolation of cp is second-order accurate, so a fine grid must be close and the
    # error must shrink ~4x when the step halves.
    ktrans, ve = 0.25, 0.4  # 1/min
    a = 0.01                # 1/s
    kep_s = ktrans / ve / 60
    errors = []
    for n in (301, 601):
        t = np.linspace(0, 300, n) if grid == "uniform" else _nonuniform_times(n, seed=1)
        cp = np.exp(-a * t)
        exact = ktrans / 60 * (np.exp(-a * t) - np.exp(-kep_s * t)) / (kep_s - a)
        got = tk.concentration("tofts", [ktrans, ve], t, cp)
        errors.append(np.abs(got - exact).max() / exact.max())
    assert errors[1] < 2e-5
    assert errors[0] / errors[1] > 3.0


def _ode_tissue(model, params, t, cp):
    """Independent reference: integrate the compartment ODEs with cp interpolated linearly."""
    spec = tk.get_model(model)
    p = dict(zip(spec.parameters, params))
    f = p["Fp"] / 6000.0
    ps = p["PS"] / 60.0
    vp = p["vp"]
    ve = p.get("ve")

    def rhs(time, y):
        ca = np.interp(time, t, cp)
        c_p, c_e = y
        dcp = (f * (ca - c_p) + ps * (c_e - c_p)) / vp if ve else (f * (ca - c_p) - ps * c_p) / vp
        dce = ps * (c_p - c_e) / ve if ve else ps * c_p  # 2CUM: c_e holds the amount taken up
        return [dcp, dce]

    sol = solve_ivp(rhs, (t[0], t[-1]), [0.0, 0.0], t_eval=t, rtol=1e-10, atol=1e-13, max_step=0.25,
                    method="LSODA")
    c_p, c_e = sol.y
    return vp * c_p + (ve * c_e if ve else c_e)


@pytest.mark.parametrize("model,params", [
    ("2cxm", [60.0, 0.2, 0.3, 0.05]),
    ("2cxm", [10.0, 0.05, 0.1, 0.2]),
    ("2cxm", [150.0, 1.0, 0.5, 0.01]),
    ("2cum", [60.0, 0.2, 0.05]),
    ("2cum", [20.0, 0.02, 0.3]),
])
def test_two_compartment_models_match_ode(model, params):
    t = _nonuniform_times(70, 300.0, seed=2)
    cp = _aif(t)
    reference = _ode_tissue(model, params, t, cp)
    got = tk.concentration(model, params, t, cp)
    np.testing.assert_allclose(got, reference, atol=1e-7 * reference.max(), rtol=0)


def test_patlak_and_extended_tofts_decompose():
    # Patlak: Ktrans * int cp + vp cp (trapezoid is exact for piecewise linear cp)
    t = _nonuniform_times()
    cp = _aif(t)
    integral = np.concatenate([[0.0], np.cumsum(np.diff(t) * (cp[1:] + cp[:-1]) / 2)])
    np.testing.assert_allclose(tk.concentration("patlak", [0.06, 0.04], t, cp),
                               0.06 / 60 * integral + 0.04 * cp, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(tk.concentration("etofts", [0.2, 0.3, 0.05], t, cp),
                               tk.concentration("tofts", [0.2, 0.3], t, cp) + 0.05 * cp, rtol=1e-13)


def test_delay_by_whole_frames_is_a_shift():
    t = np.arange(0, 200, 2.0)
    cp = _aif(t)
    shifted = np.concatenate([np.zeros(3), cp[:-3]])
    for model in tk.MODELS:
        p = np.array(tk.MODELS[model].initial)
        np.testing.assert_allclose(tk.concentration(model, p, t, cp, delay_s=6.0),
                                   tk.concentration(model, p, t, shifted), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("model", sorted(tk.MODELS))
def test_numpy_and_torch_agree_and_keep_dtype(model):
    t = _nonuniform_times(50)
    cp = _aif(t)
    rng = np.random.default_rng(3)
    spec = tk.MODELS[model]
    params = np.array(spec.initial) * rng.uniform(0.5, 1.5, (7, spec.n_params))
    delay = rng.uniform(0, 5, 7)
    c_np, j_np = tk.concentration_and_jacobian(model, params, t, cp, delay, with_delay=True)
    c_t, j_t = tk.concentration_and_jacobian(model, torch.tensor(params), torch.tensor(t), torch.tensor(cp),
                                             torch.tensor(delay), with_delay=True)
    assert isinstance(c_t, torch.Tensor) and c_t.dtype == torch.float64
    np.testing.assert_allclose(c_t.numpy(), c_np, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(j_t.numpy(), j_np, rtol=1e-12, atol=1e-15)
    c32 = tk.concentration(model, torch.tensor(params, dtype=torch.float32), t, cp)
    assert c32.dtype == torch.float32
    np.testing.assert_allclose(c32.numpy(), c_np if False else tk.concentration(model, params, t, cp),
                               rtol=2e-4, atol=2e-5 * np.abs(c_np).max())
    # per-voxel AIF (..., T) broadcasts the same way as a shared one
    per_voxel = tk.concentration(model, params, t, np.broadcast_to(cp, (7, t.size)).copy())
    np.testing.assert_allclose(per_voxel, tk.concentration(model, params, t, cp), rtol=1e-13)


@pytest.mark.parametrize("model", sorted(tk.MODELS))
def test_jacobian_matches_finite_differences(model):
    t = _nonuniform_times(60)
    cp = _aif(t)
    spec = tk.MODELS[model]
    p = np.array(spec.initial) * 1.3
    delay = 2.7
    _, jac = tk.concentration_and_jacobian(model, p, t, cp, delay, with_delay=True)
    for j in range(spec.n_params + 1):
        h = 1e-6 * (abs(p[j]) if j < spec.n_params else 1.0)
        plus, minus = p.copy(), p.copy()
        d_plus = d_minus = delay
        if j < spec.n_params:
            plus[j] += h
            minus[j] -= h
        else:
            d_plus, d_minus = delay + h, delay - h
        fd = (tk.concentration(model, plus, t, cp, d_plus) - tk.concentration(model, minus, t, cp, d_minus)) / (2 * h)
        np.testing.assert_allclose(jac[:, j], fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max() + 1e-12,
                                   err_msg=f"{model} d/d{(list(spec.parameters) + ['delay'])[j]}")


def test_kep_and_names():
    assert tk.kep(0.2, 0.4) == pytest.approx(0.5)
    assert tk.canonical_parameter_name("patlak", "PS") == "Ktrans"
    assert tk.get_model("Extended_Tofts").name == "etofts"
    for spec in tk.MODELS.values():
        assert len(spec.parameters) == len(spec.units) == len(spec.lower) == len(spec.upper) == spec.n_params
        assert all(lo <= x0 <= hi for lo, x0, hi in zip(spec.lower, spec.initial, spec.upper))


def test_bad_inputs_raise_clear_errors():
    t = np.linspace(0, 100, 20)
    cp = _aif(t)
    with pytest.raises(DCEPKInputError, match="unknown tracer-kinetic model"):
        tk.concentration("toftz", [0.1, 0.2], t, cp)
    with pytest.raises(DCEPKInputError, match="needs 3 parameters"):
        tk.concentration("etofts", [0.1, 0.2], t, cp)
    with pytest.raises(DCEPKInputError, match="one AIF sample per frame"):
        tk.concentration("tofts", [0.1, 0.2], t, cp[:-1])
    with pytest.raises(DCEPKInputError, match="no parameter"):
        tk.canonical_parameter_name("tofts", "Fp")


def test_blocked_and_stepwise_recursions_agree(monkeypatch):
    # long series use a blocked scan, large batches a step-by-step loop: both must give the same
    t = np.sort(np.concatenate([[0.0], np.random.default_rng(4).uniform(0, 300, 400)]))
    cp = _aif(t)
    k = np.array([0.0, 1e-5, 0.01, 0.3, 20.0])
    blocked = tk.exp_convolution(t, cp, k, need_derivative=True)
    monkeypatch.setattr(tk, "_SCAN_BUDGET", 0)
    stepwise = tk.exp_convolution(t, cp, k, need_derivative=True)
    for a, b in zip(blocked, stepwise):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13 * np.abs(b).max())
    # and the ramp closed form holds for the blocked path too
    monkeypatch.setattr(tk, "_SCAN_BUDGET", 1 << 22)
    np.testing.assert_allclose(tk.exp_convolution(t, t.copy(), 0.05), t / 0.05 - (-np.expm1(-0.05 * t)) / 0.05 ** 2,
                               rtol=1e-11)


def test_autograd_gradient_equals_analytic_jacobian():
    # the network training loss differentiates concentration() with autograd: it must agree
    t = torch.tensor(_nonuniform_times(50))
    cp = torch.tensor(_aif(t.numpy()))
    for model in sorted(tk.MODELS):
        params = torch.tensor(np.array(tk.MODELS[model].initial) * 1.2, requires_grad=True)
        weights = torch.linspace(0.5, 2.0, t.numel(), dtype=torch.float64)
        (tk.concentration(model, params, t, cp) * weights).sum().backward()
        _, jac = tk.concentration_and_jacobian(model, params.detach(), t, cp)
        np.testing.assert_allclose(params.grad.numpy(), (jac * weights[:, None]).sum(0).numpy(), rtol=1e-10,
                                   err_msg=model)
