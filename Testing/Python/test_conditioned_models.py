"""The shipped AIF-conditioned networks against independent truth: the OSIPI reference curves (each with
its own input function, the OSIPI tolerances), the QIBA v6 DRO with its input function (concordance),
an analytic set judged beside the core's NLLS, coverage on a held-out input-function family, and the
phantom's tumour. Every check also fails for a constant or an all-zero map."""

import csv

import numpy as np
import pytest
import torch

from DCEPKFittingLib.kinetics import aif as aif_lib
from DCEPKFittingLib.kinetics import tk_models
from DCEPKFittingLib.kinetics.model import TracerKineticModel
from DCEPKFittingLib.pipeline.input_function import InputFunctionSpec
from DCEPKFittingLib.sims.phantom import TUMOUR_RIM, WHITE_MATTER, make_phantom
from DCEPKInferenceLib.analysis import metrics
from DCEPKInferenceLib.nn import aif_encoding
from DCEPKInferenceLib.nn.model_store import list_models, load_model, model_mode
from DCEPKInferenceLib.pipeline.inference import run_inference
from DCEPKInferenceLib.training import encoded_patches, encoded_sets
from DCEPKInferenceLib.training.tasks import predict_encoded, predict_patches

from conftest import require_reference
from noisy_tofts_reference import KTRANS_BANDS, VE_BANDS, concordance_correlation, patch_medians, qiba_layout

torch.set_num_threads(1)
CONDITIONED = sorted(c["name"] for c in list_models() if model_mode(c) == "aif_conditioned")
VOXEL = [n for n in CONDITIONED if load_model(n, "cpu")[0].kind == "voxel"]
OSIPI_TOLERANCE = {"Ktrans": (0.005, 0.1), "ve": (0.05, 0.0), "vp": (0.025, 0.0)}


# The AIF-conditioned models shipped so far: the voxel-wise encoder (chosen on validation) and the local +
# global CNN; fcsa_net_aif and tcn_punet_aif are configured but not yet trained.
SHIPPED_CONDITIONED_NETWORKS = {"hetero_encoder", "ulas_cnn"}


def test_the_shipped_aif_conditioned_models_have_complete_cards():
    cards = {c["name"]: c for c in list_models() if model_mode(c) == "aif_conditioned"}
    assert {c["network"] for c in cards.values()} == SHIPPED_CONDITIONED_NETWORKS
    for name, card in cards.items():
        assert card["input_encoding"]["kind"] == "tofts_profile"
        assert card["simulator_ranges"]["aif_families_held_out"] == ["georgiou"]
        assert "two_rate" in card["simulator_ranges"]["protocol_families_held_out"]
        assert card["training"]["device"] and card["training"]["steps"] > 100 and card["retrain_command"]
        assert card["sd_calibration"]["seed"] not in (card["validation"]["set"]["seed"],)


def _voxel_predict(model, curves, times, plasma, noise=1e-3):
    basis = aif_encoding.series_basis(times, plasma, 1)
    encoded = aif_encoding.encode(np.asarray(curves, float), basis, np.full(len(curves), noise))
    mean, _ = model.predict(encoded.features, encoded.anchor, encoded.posterior_sd)
    return mean.numpy()


def _osipi_cases(filename):
    rows = list(csv.DictReader(open(require_reference("osipi", "DCEmodels", "data", filename))))
    return [{k: (np.array(v.split(), float) if " " in v.strip() else v) for k, v in r.items()} for r in rows]


@pytest.mark.parametrize("name", VOXEL)
@pytest.mark.parametrize("filename, parameters", [("dce_DRO_data_extended_tofts.csv", ("Ktrans", "ve", "vp")),
                                                  ("dce_DRO_data_tofts.csv", ("Ktrans", "ve"))])
def test_osipi_reference_curves_are_within_the_osipi_tolerance(name, filename, parameters):
    model, _ = load_model(name, "cpu")
    cases = _osipi_cases(filename)
    estimate = np.concatenate([_voxel_predict(model, c["C"][None], c["t"], c["ca"]) for c in cases])
    def within_tolerance(maps):   # every parameter of every case within the OSIPI tolerance
        return all(np.all(np.abs(maps[:, i] - reference[parameter]) <= limit[parameter])
                   for i, parameter in enumerate(("Ktrans", "ve", "vp")) if parameter in parameters)

    reference = {p: np.array([float(c[p]) for c in cases]) for p in parameters}
    limit = {p: OSIPI_TOLERANCE[p][0] + OSIPI_TOLERANCE[p][1] * np.abs(reference[p]) for p in parameters}
    assert within_tolerance(estimate), (estimate, reference)
    # the check can fail: all-zero maps and each parameter's mean everywhere are outside the tolerance (for
    # Ktrans; the DRO's ve and vp values are closer together than OSIPI's absolute tolerance)
    constant = np.stack([np.full(len(cases), reference[p].mean()) if p in parameters else np.zeros(len(cases))
                         for p in ("Ktrans", "ve", "vp")], axis=1)
    assert not within_tolerance(np.zeros_like(estimate)) and not within_tolerance(constant)


@pytest.mark.parametrize("name", CONDITIONED)
def test_qiba_v6_with_its_input_function_is_concordant(name):
    from DCEPKFittingLib.io import read_dce
    series = read_dce(require_reference("qiba_v6"))
    t10, roi, tissue = qiba_layout(series.spatial_shape)
    result = run_inference(series, name, mask=tissue, device="cpu", t10_s=t10, r1_per_mM_s=4.5,
                           input_function=InputFunctionSpec(aif_mask=roi, hct=0.45))
    truth = np.repeat(KTRANS_BANDS, len(VE_BANDS))
    assert concordance_correlation(patch_medians(result.maps["Ktrans"]), truth) >= 0.95
    assert concordance_correlation(np.full_like(truth, truth.mean()), truth) < 0.5
    assert concordance_correlation(np.zeros_like(truth), truth) < 0.5


def _analytic_set(seed=0, n=4000):
    """Parker AIF, 60 x 5 s, concentration-domain Gaussian noise 0.02 mM, truths over the tissue range."""
    rng = np.random.default_rng(seed)
    times = np.arange(60) * 5.0
    plasma = aif_lib.population_aif("parker", times, delay_s=30.0, compartment="plasma")
    truth = np.column_stack([rng.uniform(0.01, 0.6, n), rng.uniform(0.1, 0.6, n), rng.uniform(0.0, 0.1, n)])
    curves = tk_models.concentration("etofts", truth, times, plasma) + 0.02 * rng.standard_normal((n, times.size))
    return times, plasma, truth, curves


@pytest.mark.parametrize("name", VOXEL)
def test_analytic_set_error_is_that_of_nlls_and_far_below_a_constant(name):
    """Concentration input with Gaussian noise (a DRO, maps from other software), not the signal route the
    network mostly trained on: trained on Rician signal noise alone it carried that route's bias over
    (+3 % Ktrans, twice NLLS's error) until 15 % of its training subjects came as concentration."""
    model, _ = load_model(name, "cpu")
    times, plasma, truth, curves = _analytic_set()
    estimate = _voxel_predict(model, curves, times, plasma, noise=0.02)
    fit = TracerKineticModel(times, plasma, "etofts", device="cpu").fit(curves)
    network_error = metrics.median_abs_error(estimate[:, 0], truth[:, 0])
    assert network_error <= 1.2 * metrics.median_abs_error(fit.maps["Ktrans"], truth[:, 0])
    for wrong in (np.zeros(len(truth)), np.full(len(truth), truth[:, 0].mean())):
        assert metrics.median_abs_error(wrong, truth[:, 0]) >= 3 * network_error


@pytest.mark.parametrize("name", CONDITIONED)
def test_coverage_on_a_held_out_input_function_family(name):
    """Georgiou input functions (never trained on) and two-rate protocols (never trained on), SNR 10:
    the calibrated 90 % interval covers 0.82-0.97 of the truths (the 0.85-0.95 target widened by the
    sampling spread of a 32-subject set; the benchmark holds the real bar)."""
    model, _ = load_model(name, "cpu")
    kw = dict(aif_family="georgiou", protocol_family="two_rate", snr_range=10.0, training=False)
    if model.kind == "voxel":
        data = encoded_sets.build_set(955_001, 32, 64, **kw)
        mean, sd = predict_encoded(model, data)
        truth = data.params.numpy()
    else:
        mean, sd, truth = predict_patches(model, encoded_patches.build_patches(955_002, 8, 32, model.uses_stream,
                                                                               **kw), "cpu")
    coverage = metrics.coverage90(mean[:, 0], sd[:, 0], truth[:, 0])
    assert 0.82 <= coverage <= 0.97
    assert metrics.coverage90(np.zeros_like(mean[:, 0]), sd[:, 0], truth[:, 0]) < 0.82


@pytest.mark.parametrize("name", CONDITIONED)
def test_phantom_tumour_with_its_own_input_function(name):
    phantom = make_phantom(shape=(2, 64, 64), snr=30.0, seed=5)
    mask = phantom.labels > 0
    result = run_inference(phantom.series, name, mask=mask, device="cpu", t10_s=phantom.truth["T10"],
                           input_function=InputFunctionSpec(aif_mask=phantom.aif_mask))
    rim, white = phantom.labels == TUMOUR_RIM, phantom.labels == WHITE_MATTER

    def tumour_ok(maps):
        near = all(abs(np.median(maps[p][rim]) - np.median(phantom.truth[p][rim]))
                   <= 0.3 * np.median(phantom.truth[p][rim]) for p in ("Ktrans", "ve", "vp"))
        return near and np.median(maps["Ktrans"][rim]) > 5 * np.median(maps["Ktrans"][white])

    assert tumour_ok(result.maps)
    constant = {p: np.full_like(result.maps[p], float(np.median(phantom.truth[p][mask]))) for p in ("Ktrans", "ve", "vp")}
    assert not tumour_ok(constant) and not tumour_ok({p: np.zeros_like(v) for p, v in constant.items()})


def test_the_plasma_only_choice_finds_no_leakage_where_there_is_none_and_keeps_it_where_there_is():
    """Analytic curves on the Parker AIF with noise: y = vp cp (white matter: vp 0.02) is 'no leakage' with
    vp recovered; an extended Tofts curve with Ktrans 0.1 /min, ve 0.3, vp 0.02 is kept as leakage."""
    rng = np.random.default_rng(7)
    times = np.arange(60) * 5.0
    plasma = aif_lib.population_aif("parker", times, delay_s=30.0, compartment="plasma")
    basis = aif_encoding.series_basis(times, plasma, 6)
    n = 500
    no_leak = 0.02 * plasma + 0.005 * rng.standard_normal((n, times.size))
    leak = tk_models.concentration("etofts", np.tile([0.1, 0.3, 0.02], (n, 1)), times, plasma) \
        + 0.005 * rng.standard_normal((n, times.size))
    found, vp = aif_encoding.plasma_only_choice(no_leak, basis)
    assert found.mean() >= 0.95 and abs(np.median(vp[found]) - 0.02) < 0.002
    assert aif_encoding.plasma_only_choice(leak, basis)[0].mean() <= 0.01
    network = np.tile([0.11, 0.025, 0.016], (n, 1))            # the reading the choice replaces
    chosen = aif_encoding.with_plasma_only_choice(network, found, vp)
    encoded = aif_encoding.encode(no_leak, basis, np.full(n, 0.005))   # the encoding carries the same choice
    assert np.array_equal(encoded.no_leakage.numpy(), found) and np.allclose(encoded.plasma_vp.numpy(), vp)
    assert np.median(chosen[:, 0]) == 0.0 and abs(np.median(chosen[:, 2]) - 0.02) < 0.002


def test_the_slice_path_keeps_the_plasma_only_choice_too():
    """A 2-D AIF-conditioned network (untrained: its readings are arbitrary) on a slice whose left half is
    plasma-only (vp 0.02, as white matter) and right half leaky: the left half reads Ktrans 0 and the
    plasma-only vp whatever the network says, the right half keeps the network's reading."""
    from DCEPKFittingLib.core.geometry import Geometry
    from DCEPKFittingLib.io import DCESeries
    from DCEPKFittingLib.signal import spgr_signal
    from DCEPKInferenceLib.nn.networks import build_network
    from DCEPKInferenceLib.pipeline.conditioned_inference import predict_conditioned_slices

    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    times = np.arange(50) * 5.0
    plasma = aif_lib.population_aif("parker", times, delay_s=30.0, compartment="plasma")
    size, t10, fa, tr, r1 = 16, 1.2, 15.0, 0.005, 4.5
    truth = np.zeros((size, size, 3))
    truth[:, : size // 2] = [0.0, 0.3, 0.02]
    truth[:, size // 2:] = [0.15, 0.3, 0.02]
    conc = tk_models.concentration("etofts", truth.reshape(-1, 3), times, plasma)
    signal = 1000.0 * spgr_signal(1.0, 1.0 / t10 + r1 * conc, fa, tr)
    signal = np.abs(signal + 1.0 * rng.standard_normal(signal.shape)).reshape(1, size, size, -1)
    series = DCESeries(signal=signal.astype(np.float32), times_s=times, geometry=Geometry(), flip_angle_deg=fa, tr_s=tr)
    model = build_network("ulas_cnn", {"mode": "aif_conditioned"}).eval()
    basis = aif_encoding.series_basis(times, plasma, 6)
    mask = np.ones((1, size, size), bool)
    mean, _ = predict_conditioned_slices(model, series, mask, basis, 6, t10, fa, tr, r1, torch.device("cpu"))
    left, right = mean[0, :, : size // 2], mean[0, :, size // 2:]
    # BIC takes the plasma-only curve for ~80 % of such voxels at this noise (the voxel path's rate too)
    assert np.mean(left[..., 0] == 0.0) >= 0.7 and abs(np.median(left[..., 2]) - 0.02) < 0.003
    assert np.mean(right[..., 0] == 0.0) <= 0.05
