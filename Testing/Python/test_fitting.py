"""Fitting engine: recovery of known parameters, agreement with scipy's optimiser, standard errors
against Monte Carlo, delay, statuses, chunking / progress / cancel and input errors."""

import threading

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from DCEPKFittingLib.core.errors import DCEPKInputError, JobCancelledError
from DCEPKFittingLib.kinetics import fitting, varpro
from DCEPKFittingLib.kinetics import nested_models
from DCEPKFittingLib.kinetics import tk_models as tk
from DCEPKFittingLib.kinetics.fit_result import FitStatus
from DCEPKFittingLib.kinetics.nested_models import SelectedModel


def _aif(t):
    """Bolus-like plasma curve (mM) arriving at 20 s."""
    s = np.clip(t - 20.0, 0, None) / 60.0
    return 5 * s * np.exp(-s / 0.1) / 0.1 * np.exp(-1) * 0.5 + 0.8 * (1 - np.exp(-s / 0.3)) * np.exp(-s / 4)


def _times(kind, n=60, end=300.0):
    if kind == "uniform":
        return np.arange(n) * (end / n)
    rng = np.random.default_rng(5)
    steps = rng.uniform(1.0, 9.0, n - 1)
    return np.concatenate([[0.0], np.cumsum(steps) * end / steps.sum()])


TRUE_PARAMS = {
    "tofts": [[0.05, 0.1], [0.2, 0.3], [0.6, 0.5], [0.01, 0.2]],
    "etofts": [[0.05, 0.1, 0.01], [0.2, 0.3, 0.05], [0.6, 0.5, 0.1], [0.1, 0.25, 0.0]],
    "patlak": [[0.0, 0.05], [0.05, 0.02], [0.15, 0.1]],
    "2cxm": [[20.0, 0.1, 0.2, 0.05], [60.0, 0.3, 0.3, 0.08], [10.0, 0.05, 0.1, 0.1]],
    "2cum": [[20.0, 0.05, 0.05], [60.0, 0.2, 0.1], [10.0, 0.02, 0.03]],
}


@pytest.mark.parametrize("grid", ["uniform", "nonuniform"])
@pytest.mark.parametrize("model", sorted(TRUE_PARAMS))
def test_nlls_recovers_noise_free_parameters(model, grid):
    t = _times(grid, n=90 if model in ("2cxm", "2cum") else 60)
    cp = _aif(t)
    truth = np.array(TRUE_PARAMS[model])
    curves = tk.concentration(model, truth, t, cp)
    # the optimiser alone: a parameter whose truth is its lower bound is reported at the bound
    result = fitting.fit_curves(curves, t, cp, model, device="cpu", model_selection=False)
    np.testing.assert_allclose(result.parameter_array(), truth, rtol=2e-3, atol=2e-4)
    assert np.all(result.r2 > 0.999999)
    at_bound = (truth == np.array(tk.MODELS[model].lower)).any(1)
    np.testing.assert_array_equal(result.status, np.where(at_bound, FitStatus.AT_BOUND, FitStatus.FITTED))
    # with the model choice (the default) such a voxel is the nested model without that parameter:
    # extended Tofts with vp = 0 is Tofts, Patlak with Ktrans = 0 plasma only, and it is fitted
    chosen = fitting.fit_curves(curves, t, cp, model, device="cpu")
    assert np.all(chosen.status == FitStatus.FITTED)
    nested = {"etofts": SelectedModel.TOFTS, "patlak": SelectedModel.PLASMA}.get(model)
    expected = np.where(at_bound, nested if nested is not None else -1, nested_models.MODEL_CODES[model])
    np.testing.assert_array_equal(chosen.selected_model, expected)
    finite = np.isfinite(chosen.parameter_array())
    np.testing.assert_allclose(chosen.parameter_array()[finite], truth[finite], rtol=2e-3, atol=2e-4)
    if model == "patlak":   # no leakage: ve / kep do not exist, Ktrans is exactly 0
        assert chosen.params["Ktrans"][at_bound][0] == 0.0


def test_linear_methods():
    t = _times("uniform", n=150)
    cp = _aif(t)
    # Patlak is exactly linear in its parameters (the trapezoid integral is exact for a piecewise-linear AIF)
    truth = np.array(TRUE_PARAMS["patlak"])
    result = fitting.fit_curves(tk.concentration("patlak", truth, t, cp), t, cp, "patlak", method="linear")
    np.testing.assert_allclose(result.parameter_array(), truth, atol=1e-9)
    # Murase's linearised (extended) Tofts is approximate (trapezoid integral of C): close, not exact
    for model in ("tofts", "etofts"):
        truth = np.array(TRUE_PARAMS[model])[:3]
        result = fitting.fit_curves(tk.concentration(model, truth, t, cp), t, cp, model, method="linear")
        np.testing.assert_allclose(result.parameter_array(), truth, rtol=0.03, atol=2e-3)
    with pytest.raises(DCEPKInputError, match="no linear form"):
        fitting.fit_curves(np.zeros((1, t.size)), t, cp, "2cxm", method="linear")


@pytest.mark.parametrize("model", ["tofts", "etofts", "2cum", "patlak"])
def test_nlls_reaches_the_scipy_least_squares_optimum(model):
    # independent optimiser (scipy trust-region reflective, tight tolerances, started at the
    # truth) on the same forward model: our bounded fit must find the same minimum
    t = _times("nonuniform", n=80)
    cp = _aif(t)
    spec = tk.MODELS[model]
    rng = np.random.default_rng(11)
    truth = np.array(TRUE_PARAMS[model])
    curves = tk.concentration(model, truth, t, cp) + rng.normal(0, 0.01, (len(truth), t.size))
    ours = fitting.fit_curves(curves, t, cp, model, device="cpu", model_selection=False)
    for i, y in enumerate(curves):
        ref = least_squares(lambda p: tk.concentration(model, p, t, cp) - y, np.clip(truth[i], spec.lower, spec.upper),
                            jac=lambda p: tk.concentration_and_jacobian(model, p, t, cp)[1],
                            bounds=(spec.lower, spec.upper), xtol=1e-14, ftol=1e-14, gtol=1e-14)
        ssr_ref = 2 * ref.cost
        ssr_ours = t.size * ours.rmse[i] ** 2
        assert ssr_ours <= ssr_ref * (1 + 1e-6) + 1e-14
        np.testing.assert_allclose(ours.parameter_array()[i], ref.x, rtol=2e-3, atol=2e-4)


def test_standard_errors_match_monte_carlo_spread():
    t = _times("uniform", n=60)
    cp = _aif(t)
    truth = np.array([0.2, 0.3, 0.05])
    rng = np.random.default_rng(3)
    n = 600
    curves = tk.concentration("etofts", truth, t, cp) + rng.normal(0, 0.02, (n, t.size))
    result = fitting.fit_curves(curves, t, cp, "etofts", device="cpu", model_selection=False)
    for name in ("Ktrans", "ve", "vp"):
        spread = np.std(result.params[name])
        reported = np.median(result.stderr[name])
        assert 0.8 < reported / spread < 1.25, (name, reported, spread)


@pytest.mark.parametrize("model", ["patlak", "etofts", "2cum"])
def test_delay_is_recovered(model):
    t = _times("uniform", n=100, end=300.0)
    cp = _aif(t)
    truth = np.array(TRUE_PARAMS[model][1])
    curves = tk.concentration(model, truth, t, cp, delay_s=6.3)[None]
    continuous = fitting.fit_curves(curves, t, cp, model, fit_delay=True, delay_step_s=None)
    assert continuous.delay_s[0] == pytest.approx(6.3, abs=0.05)
    np.testing.assert_allclose(continuous.parameter_array()[0], truth, rtol=0.02, atol=1e-3)
    snapped = fitting.fit_curves(curves, t, cp, model, fit_delay=True, delay_step_s=0.5)
    assert snapped.delay_s[0] in (6.0, 6.5)
    assert "delay_s" in snapped.maps()


def test_invalid_voxels_masks_and_maps():
    t = _times("uniform")
    cp = _aif(t)
    truth = np.array(TRUE_PARAMS["etofts"])
    volume = tk.concentration("etofts", truth, t, cp).reshape(1, 2, 2, t.size).copy()
    volume[0, 1, 1, 5] = np.nan
    mask = np.ones((1, 2, 2), dtype=bool)
    mask[0, 0, 1] = False
    result = fitting.fit_volume(volume, t, cp, "etofts", mask=mask, device="cpu")
    assert result.status.shape == (1, 2, 2) and result.status.dtype == np.uint8
    assert result.status[0, 0, 1] == FitStatus.MASKED
    assert result.status[0, 1, 1] == FitStatus.INVALID_INPUT
    assert np.isnan(result.params["Ktrans"][0, 1, 1]) and np.isnan(result.params["Ktrans"][0, 0, 1])
    assert result.params["Ktrans"][0, 0, 0] == pytest.approx(truth[0, 0], rel=1e-3)
    maps = result.maps()
    assert {"Ktrans", "ve", "vp", "kep", "Ktrans_se", "ve_se", "vp_se", "R2", "rmse", "status"} <= set(maps)
    assert set(maps) == set(result.units) and result.units["kep"] == "1/min" and result.units["rmse"] == "mM"
    np.testing.assert_allclose(maps["kep"][0, 0, 0], truth[0, 0] / truth[0, 1], rtol=1e-3)
    np.testing.assert_allclose(result.fitted_curve((0, 1, 0)), volume[0, 1, 0], atol=1e-6)
    assert np.all(np.isnan(result.fitted_curve((0, 1, 1))))
    two_cxm = fitting.fit_curves(tk.concentration("2cxm", TRUE_PARAMS["2cxm"][0], t, cp)[None], t, cp, "2cxm")
    fp, ps = TRUE_PARAMS["2cxm"][0][:2]
    assert two_cxm.maps()["Ktrans"][0] == pytest.approx(fp / 100 * ps / (fp / 100 + ps), rel=0.02)


def test_chunks_progress_cancel_and_dtype():
    t = _times("uniform")
    cp = _aif(t)
    rng = np.random.default_rng(2)
    truth = np.array([0.2, 0.3, 0.05]) * rng.uniform(0.5, 1.5, (40, 3))
    curves = tk.concentration("etofts", truth, t, cp) + rng.normal(0, 0.01, (40, t.size))
    events = []
    whole = fitting.fit_curves(curves, t, cp, "etofts", device="cpu")
    chunked = fitting.fit_curves(curves, t, cp, "etofts", device="cpu", chunk_voxels=7,
                                 progress=lambda f, m: events.append(f))
    np.testing.assert_allclose(chunked.parameter_array(), whole.parameter_array(), rtol=1e-9)
    assert events[-1] == 1.0 and all(a <= b for a, b in zip(events, events[1:])) and len(events) >= 6
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobCancelledError):
        fitting.fit_curves(curves, t, cp, "etofts", cancel=cancel)
    single = fitting.fit_curves(curves, t, cp, "etofts", dtype=torch.float32)
    np.testing.assert_allclose(single.parameter_array(), whole.parameter_array(), rtol=2e-2, atol=2e-3)


def test_bad_input_raises_clear_errors():
    t = _times("uniform")
    cp = _aif(t)
    curves = np.zeros((2, t.size))
    with pytest.raises(DCEPKInputError, match="too few"):
        fitting.fit_curves(curves[:, :3], t[:3], cp[:3], "etofts")
    with pytest.raises(DCEPKInputError, match="NaN or inf"):
        fitting.fit_curves(curves, np.where(np.arange(t.size) == 3, np.nan, t), cp, "tofts")
    with pytest.raises(DCEPKInputError, match="AIF contains NaN"):
        fitting.fit_curves(curves, t, np.where(np.arange(t.size) == 3, np.inf, cp), "tofts")
    with pytest.raises(DCEPKInputError, match="one plasma"):
        fitting.fit_curves(curves, t, cp[:-1], "tofts")
    with pytest.raises(DCEPKInputError, match="to match the frame times"):
        fitting.fit_curves(curves[:, :-1], t, cp, "tofts")
    with pytest.raises(DCEPKInputError, match="increase strictly"):
        fitting.fit_curves(curves, t[::-1], cp, "tofts")
    with pytest.raises(DCEPKInputError, match="unknown tracer-kinetic model"):
        fitting.fit_curves(curves, t, cp, "gamma")
    with pytest.raises(DCEPKInputError, match="unknown fitting method"):
        fitting.fit_curves(curves, t, cp, "tofts", method="bayes")
    with pytest.raises(DCEPKInputError, match="mask"):
        fitting.fit_volume(curves.reshape(1, 1, 2, t.size), t, cp, "tofts", mask=np.ones((1, 2, 1)))
    with pytest.raises(DCEPKInputError, match="4-D"):
        fitting.fit_volume(curves, t, cp, "tofts")
    with pytest.raises(DCEPKInputError, match="unknown device"):
        fitting.fit_curves(curves, t, cp, "tofts", device="tpu")


@pytest.mark.parametrize("grid", ["uniform", "nonuniform"])
def test_variable_projection_sums_match_explicit_convolutions(grid):
    # the Tofts fast path accumulates dot products inside the recursion instead of storing curves
    t = _times(grid)
    cp = _aif(t)
    rng = np.random.default_rng(9)
    k = torch.tensor(rng.uniform(0, 0.05, 50))
    y = torch.tensor(rng.normal(size=(50, t.size)))
    e, d = tk.exp_convolution(torch.tensor(t), torch.tensor(cp), k, need_derivative=True)
    cp_t = torch.tensor(cp)
    expected = [(e * e).sum(-1), (e * d).sum(-1), (d * d).sum(-1), e @ cp_t, d @ cp_t, (y * e).sum(-1),
                (y * d).sum(-1)]
    got = varpro.convolution_moments(torch.tensor(t), cp_t, k, y.T.contiguous())
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12 * float(b.abs().max()))
