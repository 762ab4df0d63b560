"""One input-function path for fitting and the networks: the same spec gives the same curve through
``run_fit`` and ``run_inference``, and through ``dcepk fit`` / ``dcepk infer`` with the same options;
errors name every option; modes refuse what they cannot use."""

import json

import numpy as np
import pytest

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.io import read_volume, write_dce_series, write_volume
from DCEPKFittingLib.pipeline.fit import FitSettings, run_fit
from DCEPKFittingLib.pipeline.input_function import InputFunctionSpec
from DCEPKFittingLib.sims.phantom import VESSEL, make_phantom
from DCEPKFittingLib.workflows.cli import main as dcepk
from DCEPKFittingLib.workflows.input_function_options import AUTO_CURVE_FILE, AUTO_MASK_FILE
from DCEPKInferenceLib.pipeline.inference import DEFAULT_CONDITIONED_MODEL, DEFAULT_MODEL, run_inference


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(2, 48, 48), snr=30.0, seed=4)


@pytest.fixture(autouse=True)
def conditioned_model(untrained_conditioned_models):
    """No shipped weights needed: these tests compare input functions, never maps."""
    return untrained_conditioned_models


@pytest.mark.parametrize("source", ["roi", "auto", "population", "csv"])
def test_fit_and_infer_resolve_the_same_input_function(source, phantom, tmp_path):
    csv = tmp_path / "aif.csv"
    csv.write_text("time (s),concentration (mM)\n" + "".join(
        f"{t},{c}\n" for t, c in zip(phantom.series.times_s, phantom.aif_blood_mM)))
    spec = {"roi": InputFunctionSpec(aif_mask=phantom.aif_mask), "auto": InputFunctionSpec(auto_aif="either"),
            "population": InputFunctionSpec(population_aif="parker"), "csv": InputFunctionSpec(aif_csv=str(csv))}[source]
    mask = phantom.labels > 0
    fit = run_fit(phantom.series, FitSettings(t10_s=phantom.truth["T10"], mask=mask, **vars(spec)))
    inferred = run_inference(phantom.series, DEFAULT_CONDITIONED_MODEL, mask=mask, device="cpu",
                             t10_s=phantom.truth["T10"], input_function=spec)
    np.testing.assert_array_equal(inferred.aif_plasma_mM, fit.aif_plasma_mM)
    if source in ("roi", "auto", "csv"):   # and it is the phantom's own blood curve, as plasma
        truth = phantom.aif_plasma_mM
        assert np.max(np.abs(fit.aif_plasma_mM - truth)) < 0.15 * truth.max()
    if source == "auto":
        chosen = inferred.input_function.detection.chosen
        assert np.all(phantom.labels[chosen] == VESSEL)


def test_dcepk_fit_and_infer_take_the_same_options_and_write_the_detected_voxels(phantom, tmp_path):
    series_path = tmp_path / "dce.seq.nrrd"
    write_dce_series(series_path, phantom.series)
    t10 = tmp_path / "t10.nii.gz"
    write_volume(t10, phantom.truth["T10"], phantom.series.geometry)
    common = [str(series_path), "--t10", str(t10), "--auto-aif", "artery", "--hct", "0.42"]
    assert dcepk(["fit", *common, "--out", str(tmp_path / "fit")]) == 0
    assert dcepk(["infer", *common, "--out", str(tmp_path / "infer")]) == 0
    masks = [read_volume(tmp_path / out / AUTO_MASK_FILE)[0] for out in ("fit", "infer")]
    np.testing.assert_array_equal(masks[0], masks[1])
    assert set(np.unique(masks[0])) <= {0, 1, 2} and np.all(phantom.labels[masks[0] == 1] == VESSEL)
    curves = [np.loadtxt(tmp_path / out / AUTO_CURVE_FILE, delimiter=",", skiprows=1) for out in ("fit", "infer")]
    np.testing.assert_array_equal(curves[0], curves[1])
    summary = json.loads((tmp_path / "infer" / "dcepk_infer.json").read_text())
    assert summary["mode"] == "aif" and summary["input_function"] == "automatic detection (artery)"
    # the mask edited (here: as written) and given back as an ROI gives the same curve
    again = [str(series_path), "--t10", str(t10), "--aif-roi", str(tmp_path / "fit" / AUTO_MASK_FILE),
             "--aif-roi-label", "1", "--hct", "0.42", "--out", str(tmp_path / "roi")]
    assert dcepk(["fit", *again]) == 0
    assert json.loads((tmp_path / "roi" / "dcepk_fit.json").read_text())["input_function"] == "ROI"


def test_input_function_errors_name_every_option(phantom):
    with pytest.raises(DCEPKInputError, match="aif_mask.*aif_csv.*population_aif.*auto_aif.*got none"):
        InputFunctionSpec().check()
    with pytest.raises(DCEPKInputError, match="got roi, auto"):
        InputFunctionSpec(aif_mask=phantom.aif_mask, auto_aif="artery").check()
    with pytest.raises(DCEPKInputError, match="artery, vein, either"):
        InputFunctionSpec(auto_aif="capillary").check()


def test_modes_refuse_what_they_cannot_use(phantom, tmp_path, capsys):
    kw = dict(device="cpu", t10_s=phantom.truth["T10"])
    with pytest.raises(DCEPKInputError, match="AIF-conditioned: give an input function"):
        run_inference(phantom.series, DEFAULT_CONDITIONED_MODEL, **kw)
    with pytest.raises(DCEPKInputError, match="reads no input function"):
        run_inference(phantom.series, DEFAULT_MODEL, input_function=InputFunctionSpec(population_aif="parker"), **kw)
    series_path = tmp_path / "dce.seq.nrrd"
    write_dce_series(series_path, phantom.series)
    base = ["infer", str(series_path), "--t10", "1.2", "--out", str(tmp_path / "o")]
    assert dcepk(base + ["--mode", "aif"]) == 2
    assert "--mode aif needs an input function" in capsys.readouterr().err
    assert dcepk(base + ["--mode", "image", "--population-aif", "parker"]) == 2
    assert "--mode image takes no input function" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
