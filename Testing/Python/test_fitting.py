"""Fitting engine (``TracerKineticModel``): recovery of known parameters, agreement with scipy's optimiser,
standard errors against Monte Carlo, delay, statuses, the numpy engine against the torch engine, chunking /
progress / cancel and input errors."""

import threading

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from DCEPKFittingLib.core.errors import DCEPKInputError, JobCancelledError
from DCEPKFittingLib.kinetics import nested_models, varpro
from DCEPKFittingLib.kinetics import tk_models as tk
from DCEPKFittingLib.kinetics.fit_result import FitStatus
from DCEPKFittingLib.kinetics.model import VALUES_PER_VOXEL_FRAME, TracerKineticModel
from DCEPKFittingLib.kinetics.nested_models import SelectedModel


def fit(curves, t, cp, model, mask=None, progress=None, cancel=None, **options):
    return TracerKineticModel(t, cp, model, **options).fit(curves, mask, progress=progress, cancel=cancel)


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
    result = fit(curves, t, cp, model, device="cpu", model_selection=False)
    np.testing.assert_allclose(result.parameter_array(), truth, rtol=2e-3, atol=2e-4)
    assert np.all(result.maps["R2"] > 0.999999)
    at_bound = (truth == np.array(tk.MODELS[model].lower)).any(1)
    np.testing.assert_array_equal(result.status, np.where(at_bound, FitStatus.AT_BOUND, FitStatus.FITTED))
    # with the model choice (the default) such a voxel is the nested model without that parameter:
    # extended Tofts with vp = 0 is Tofts, Patlak with Ktrans = 0 plasma only, and it is fitted
    chosen = fit(curves, t, cp, model, device="cpu")
    assert np.all(chosen.status == FitStatus.FITTED)
    nested = {"etofts": SelectedModel.TOFTS, "patlak": SelectedModel.PLASMA}.get(model)
    expected = np.where(at_bound, nested if nested is not None else -1, nested_models.MODEL_CODES[model])
    np.testing.assert_array_equal(chosen.selected_model, expected)
    finite = np.isfinite(chosen.parameter_array())
    np.testing.assert_allclose(chosen.parameter_array()[finite], truth[finite], rtol=2e-3, atol=2e-4)
    if model == "patlak":   # no leakage: ve / kep do not exist, Ktrans is exactly 0
        assert chosen.maps["Ktrans"][at_bound][0] == 0.0


def test_linear_methods():
    t = _times("uniform", n=150)
    cp = _aif(t)
    # Patlak is exactly linear in its parameters (the trapezoid integral is exact for a piecewise-linear AIF)
    truth = np.array(TRUE_PARAMS["patlak"])
    result = fit(tk.concentration("patlak", truth, t, cp), t, cp, "patlak", method="linear")
    np.testing.assert_allclose(result.parameter_array(), truth, atol=1e-9)
    # Murase's linearised (extended) Tofts is approximate (trapezoid integral of C): close, not exact
    for model in ("tofts", "etofts"):
        truth = np.array(TRUE_PARAMS[model])[:3]
        result = fit(tk.concentration(model, truth, t, cp), t, cp, model, method="linear")
        np.testing.assert_allclose(result.parameter_array(), truth, rtol=0.03, atol=2e-3)
    with pytest.raises(DCEPKInputError, match="no linear form"):
        fit(np.zeros((1, t.size)), t, cp, "2cxm", method="linear")


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
    ours = fit(curves, t, cp, model, device="cpu", model_selection=False)
    for i, y in enumerate(curves):
        ref = least_squares(lambda p: tk.concentration(model, p, t, cp) - y, np.clip(truth[i], spec.lower, spec.upper),
                            jac=lambda p: tk.concentration_and_jacobian(model, p, t, cp)[1],
                            bounds=(spec.lower, spec.upper), xtol=1e-14, ftol=1e-14, gtol=1e-14)
        ssr_ref = 2 * ref.cost
        ssr_ours = t.size * ours.maps["rmse"][i] ** 2
        assert ssr_ours <= ssr_ref * (1 + 1e-6) + 1e-14
        np.testing.assert_allclose(ours.parameter_array()[i], ref.x, rtol=2e-3, atol=2e-4)


def test_standard_errors_match_monte_carlo_spread():
    t = _times("uniform", n=60)
    cp = _aif(t)
    truth = np.array([0.2, 0.3, 0.05])
    rng = np.random.default_rng(3)
    n = 600
    curves = tk.concentration("etofts", truth, t, cp) + rng.normal(0, 0.02, (n, t.size))
    result = fit(curves, t, cp, "etofts", device="cpu", model_selection=False)
    for name in ("Ktrans", "ve", "vp"):
        spread = np.std(result.maps[name])
        reported = np.median(result.uncertainty_of(name))
        assert 0.8 < reported / spread < 1.25, (name, reported, spread)


@pytest.mark.parametrize("model", ["patlak", "etofts", "2cum"])
def test_delay_is_recovered(model):
    t = _times("uniform", n=100, end=300.0)
    cp = _aif(t)
    truth = np.array(TRUE_PARAMS[model][1])
    curves = tk.concentration(model, truth, t, cp, delay_s=6.3)[None]
    continuous = fit(curves, t, cp, model, fit_delay=True, delay_step_s=None)
    assert continuous.maps["delay_s"][0] == pytest.approx(6.3, abs=0.05)
    np.testing.assert_allclose(continuous.parameter_array()[0], truth, rtol=0.02, atol=1e-3)
    snapped = fit(curves, t, cp, model, fit_delay=True, delay_step_s=0.5)
    assert snapped.maps["delay_s"][0] in (6.0, 6.5)
    assert snapped.units["delay_s"] == "s"
    np.testing.assert_allclose(snapped.predict(0), curves[0], atol=0.02 * curves.max())


def test_invalid_voxels_masks_and_maps():
    t = _times("uniform")
    cp = _aif(t)
    truth = np.array(TRUE_PARAMS["etofts"])
    volume = tk.concentration("etofts", truth, t, cp).reshape(1, 2, 2, t.size).copy()
    volume[0, 1, 1, 5] = np.nan
    mask = np.ones((1, 2, 2), dtype=bool)
    mask[0, 0, 1] = False
    result = fit(volume, t, cp, "etofts", mask=mask, device="cpu")
    assert result.status.shape == (1, 2, 2) and result.status.dtype == np.uint8
    assert result.status[0, 0, 1] == FitStatus.MASKED
    assert result.status[0, 1, 1] == FitStatus.INVALID_INPUT
    assert np.isnan(result.maps["Ktrans"][0, 1, 1]) and np.isnan(result.maps["Ktrans"][0, 0, 1])
    assert result.maps["Ktrans"][0, 0, 0] == pytest.approx(truth[0, 0], rel=1e-3)
    maps = result.maps
    assert {"Ktrans", "ve", "vp", "kep", "Ktrans_se", "ve_se", "vp_se", "R2", "rmse", "status"} <= set(maps)
    assert set(maps) == set(result.units) and result.units["kep"] == "1/min" and result.units["rmse"] == "mM"
    np.testing.assert_allclose(maps["kep"][0, 0, 0], truth[0, 0] / truth[0, 1], rtol=1e-3)
    np.testing.assert_allclose(result.predict((0, 1, 0)), volume[0, 1, 0], atol=1e-6)
    assert np.all(np.isnan(result.predict((0, 1, 1))))
    whole = result.predict()
    assert whole.shape == volume.shape and np.all(np.isnan(whole[0, 0, 1]))
    np.testing.assert_allclose(whole[0, 1, 0], volume[0, 1, 0], atol=1e-6)
    two_cxm = fit(tk.concentration("2cxm", TRUE_PARAMS["2cxm"][0], t, cp)[None], t, cp, "2cxm")
    fp, ps = TRUE_PARAMS["2cxm"][0][:2]
    assert two_cxm.maps["Ktrans"][0] == pytest.approx(fp / 100 * ps / (fp / 100 + ps), rel=0.02)


def test_chunks_threads_progress_and_cancel():
    t = _times("uniform")
    cp = _aif(t)
    rng = np.random.default_rng(2)
    truth = np.array([0.2, 0.3, 0.05]) * rng.uniform(0.5, 1.5, (40, 3))
    curves = tk.concentration("etofts", truth, t, cp) + rng.normal(0, 0.01, (40, t.size))
    events = []
    whole = fit(curves, t, cp, "etofts", device="cpu", threads=1)
    # a working-set budget of 7 voxels a thread: 6 chunks on 2 threads, each voxel's fit its own
    seven_voxels = 7 * 8 * VALUES_PER_VOXEL_FRAME * t.size
    chunked = fit(curves, t, cp, "etofts", device="cpu", threads=2, working_set_bytes=2 * seven_voxels,
                  progress=lambda f, m: events.append(f))
    np.testing.assert_allclose(chunked.parameter_array(), whole.parameter_array(), rtol=1e-9)
    assert events[-1] == 1.0 and all(a <= b for a, b in zip(events, events[1:])) and len(events) >= 6
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobCancelledError):
        fit(curves, t, cp, "etofts", cancel=cancel)


@pytest.mark.parametrize("model", ["etofts", "2cxm", "patlak"])
def test_the_numpy_engine_agrees_with_the_torch_engine(model):
    """A CPU fit runs on numpy, a GPU fit on torch: the same code through ``array_backend``. On the CPU the
    torch engine (a torch.device given) must give the same fit to rounding, model choice and status included."""
    t = _times("nonuniform", n=80 if model == "2cxm" else 60)
    cp = _aif(t)
    rng = np.random.default_rng(4)
    truth = np.array(TRUE_PARAMS[model]) * rng.uniform(0.7, 1.3, (25, 1, 1))
    curves = tk.concentration(model, truth.reshape(-1, truth.shape[-1]), t, cp)
    curves += rng.normal(0, 0.02, curves.shape)
    curves[3, 7] = np.nan
    on_numpy = fit(curves, t, cp, model, device="cpu")
    on_torch = fit(curves, t, cp, model, device=torch.device("cpu"))
    np.testing.assert_array_equal(on_numpy.status, on_torch.status)
    np.testing.assert_array_equal(on_numpy.selected_model, on_torch.selected_model)
    for name in on_numpy.maps:
        if name.endswith("_se"):   # where J^T J is near singular the errors are huge and their digits rounding
            value = on_numpy.maps[name[:-3]]
            determined = np.isfinite(on_torch.maps[name]) & (on_torch.maps[name] < np.abs(value))
            assert determined.sum() >= 10, name
            np.testing.assert_allclose(on_numpy.maps[name][determined], on_torch.maps[name][determined], rtol=1e-5,
                                       err_msg=name)
        else:
            np.testing.assert_allclose(on_numpy.maps[name], on_torch.maps[name], rtol=1e-6, atol=1e-10, err_msg=name)
    assert on_numpy.status[3] == FitStatus.INVALID_INPUT


def test_bad_input_raises_clear_errors():
    t = _times("uniform")
    cp = _aif(t)
    curves = np.zeros((2, t.size))
    with pytest.raises(DCEPKInputError, match="too few"):
        fit(curves[:, :3], t[:3], cp[:3], "etofts")
    with pytest.raises(DCEPKInputError, match="NaN or inf"):
        fit(curves, np.where(np.arange(t.size) == 3, np.nan, t), cp, "tofts")
    with pytest.raises(DCEPKInputError, match="AIF contains NaN"):
        fit(curves, t, np.where(np.arange(t.size) == 3, np.inf, cp), "tofts")
    with pytest.raises(DCEPKInputError, match="one plasma"):
        fit(curves, t, cp[:-1], "tofts")
    with pytest.raises(DCEPKInputError, match="frames of the frame times"):
        fit(curves[:, :-1], t, cp, "tofts")
    with pytest.raises(DCEPKInputError, match="increase strictly"):
        fit(curves, t[::-1], cp, "tofts")
    with pytest.raises(DCEPKInputError, match="unknown tracer-kinetic model"):
        fit(curves, t, cp, "gamma")
    with pytest.raises(DCEPKInputError, match="unknown fitting method"):
        fit(curves, t, cp, "tofts", method="bayes")
    with pytest.raises(DCEPKInputError, match="mask"):
        fit(curves.reshape(1, 1, 2, t.size), t, cp, "tofts", mask=np.ones((1, 2, 1)))
    with pytest.raises(DCEPKInputError, match="unknown device"):
        fit(curves, t, cp, "tofts", device="tpu")


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("grid", ["uniform", "nonuniform"])
def test_variable_projection_sums_match_explicit_convolutions(grid, library):
    # the Tofts fast path accumulates dot products inside the recursion instead of storing curves
    array = torch.tensor if library == "torch" else np.asarray
    t = _times(grid)
    cp = _aif(t)
    rng = np.random.default_rng(9)
    k, y = rng.uniform(0, 0.05, 50), rng.normal(size=(50, t.size))
    e, d = tk.exp_convolution(t, cp, k, need_derivative=True)
    expected = [(e * e).sum(-1), (e * d).sum(-1), (d * d).sum(-1), e @ cp, d @ cp, (y * e).sum(-1), (y * d).sum(-1),
                e.sum(-1)]
    got = varpro.convolution_moments(array(t), array(cp), array(k), array(np.ascontiguousarray(y.T)))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-10, atol=1e-12 * float(np.abs(b).max()))
