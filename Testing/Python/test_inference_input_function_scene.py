"""The inference Logic with an input function, from the scene: an AIF ROI (box, or the detected
segmentation with its segment number), automatic detection (its voxels come back as an editable
segmentation and a chart), the same spec as the pipeline's, and the child process's command line.

Truths: the phantom's vessel voxels and its plasma input function, and ``run_inference`` on the same
arrays. The AIF paths run on an untrained AIF-conditioned network (they compare input functions);
the maps are judged against the phantom's truth only with the shipped ``hetero_encoder_aif``
(``test_shipped_aif_conditioned_network_from_the_scene_meets_the_phantom_truth``: runs once it ships).
"""

import numpy as np
import pytest

from conftest import import_or_skip
from slicer_scene import slicer_scene  # noqa: F401  (fixture)

slicer = import_or_skip("slicer", "slicer-core (pip install slicer-core) is needed for MRML bridge tests")

from DCEPKFittingLib import mrml as fit_bridge  # noqa: E402
from DCEPKFittingLib.core.errors import DCEPKInputError  # noqa: E402
from DCEPKFittingLib.pipeline.input_function import InputFunctionSpec  # noqa: E402
from DCEPKFittingLib.sims.phantom import TUMOUR_RIM, VESSEL, WHITE_MATTER, make_phantom  # noqa: E402
from DCEPKInferenceLib.mrml.child_inference import infer_command  # noqa: E402
from DCEPKInferenceLib.nn.model_store import DEFAULT_MODELS_DIR  # noqa: E402
from DCEPKInferenceLib.pipeline.inference import DEFAULT_CONDITIONED_MODEL, run_inference  # noqa: E402
from DCEPKInferenceLib.workflows.infer_command import build_infer_parser  # noqa: E402
from test_inference_logic import module  # noqa: E402, F401  (fixture: DCEPKInference.py headless)

T10_S = 1.2
SHIPPED = (DEFAULT_MODELS_DIR / f"{DEFAULT_CONDITIONED_MODEL}.json").is_file()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(2, 32, 32), snr=30.0, seed=3)


@pytest.fixture
def loaded(slicer_scene, phantom):
    return fit_bridge.phantom_to_scene(slicer_scene.scene, phantom, "phantom", slicer_scene.sequences_logic)


def _close_to_truth(plasma, phantom):
    truth = phantom.aif_plasma_mM
    assert np.max(np.abs(plasma - truth)) < 0.15 * truth.max()


def _segment_mask(segmentation, number, series):
    reference = fit_bridge.reference_volume(series.spatial_shape, series.geometry)
    return fit_bridge.roi_mask(segmentation, reference, number)


def test_logic_infers_with_an_aif_roi_and_with_detection_as_the_pipeline_does(
        slicer_scene, phantom, loaded, module, untrained_conditioned_models):
    logic = module.DCEPKInferenceLogic(scene=slicer_scene.scene)
    common = dict(modelName=DEFAULT_CONDITIONED_MODEL, maskNode=loaded["tissues"], device="cpu", t10_s=T10_S)
    blood_t10 = float(np.mean(phantom.truth["T10"][phantom.aif_mask]))
    nodes = logic.run(loaded["sequence"], aifSource="roi", aifRoi=loaded["aifSegmentation"],
                      hematocrit=phantom.protocol.hct, bloodT10_s=blood_t10, **common)
    roi_run = logic.lastResult.inference
    direct = run_inference(phantom.series, DEFAULT_CONDITIONED_MODEL, mask=phantom.labels > 0, device="cpu",
                           t10_s=T10_S, input_function=InputFunctionSpec(aif_mask=phantom.aif_mask, blood_t10_s=blood_t10,
                                                                         hct=phantom.protocol.hct))
    np.testing.assert_array_equal(roi_run.aif_plasma_mM, direct.aif_plasma_mM)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(nodes["ve"]), direct.maps["ve"])
    _close_to_truth(roi_run.aif_plasma_mM, phantom)
    assert "input_function" not in nodes   # an ROI run leaves the user's nodes alone

    nodes = logic.run(loaded["sequence"], aifSource="auto", **common)
    detected = nodes["input_function"]
    assert detected.GetName() == fit_bridge.DETECTED_NAME and nodes["input_function_chart"] is not None
    artery = _segment_mask(detected, 1, phantom.series)
    assert artery.any() and np.all(phantom.labels[artery] == VESSEL)
    auto_plasma = logic.lastResult.inference.aif_plasma_mM
    _close_to_truth(auto_plasma, phantom)

    # Detect, then the detected segmentation as the ROI (what the panel's Detect button sets up): the same curve
    segmentation, chart, segment = logic.detectInputFunction(loaded["sequence"], t10_s=T10_S)
    assert slicer_scene.scene.GetNodesByClassByName("vtkMRMLSegmentationNode",
                                                    fit_bridge.DETECTED_NAME).GetNumberOfItems() == 1
    assert segment == 1 and chart.GetNumberOfPlotSeriesNodes() == 1
    logic.run(loaded["sequence"], aifSource="roi", aifRoi=segmentation, aifRoiLabel=segment, bloodT10_s=1.6, **common)
    np.testing.assert_array_equal(logic.lastResult.inference.aif_plasma_mM, auto_plasma)


def test_the_input_function_a_network_needs_is_asked_for_by_name(slicer_scene, loaded, module,
                                                                 untrained_conditioned_models):
    logic = module.DCEPKInferenceLogic(scene=slicer_scene.scene)
    count = slicer_scene.scene.GetNumberOfNodes()
    with pytest.raises(DCEPKInputError, match="AIF-conditioned: choose an input function source"):
        logic.run(loaded["sequence"], modelName=DEFAULT_CONDITIONED_MODEL, t10_s=T10_S, device="cpu")
    with pytest.raises(DCEPKInputError, match="no AIF CSV file given"):
        logic.run(loaded["sequence"], modelName=DEFAULT_CONDITIONED_MODEL, t10_s=T10_S, aifSource="csv")
    with pytest.raises(DCEPKInputError, match="segmentation .* has 1 segment"):
        logic.run(loaded["sequence"], modelName=DEFAULT_CONDITIONED_MODEL, t10_s=T10_S, aifSource="roi",
                  aifRoi=loaded["aifSegmentation"], aifRoiLabel=2)
    assert slicer_scene.scene.GetNumberOfNodes() == count


def test_the_child_process_gets_the_same_input_function(slicer_scene, phantom, loaded, module, tmp_path,
                                                        untrained_conditioned_models):
    logic = module.DCEPKInferenceLogic(scene=slicer_scene.scene)
    for source in ({"aifSource": "roi", "aifRoi": loaded["aifRoi"], "hematocrit": 0.41, "bloodT10_s": 1.55},
                   {"aifSource": "auto", "autoAif": "vein"}, {"aifSource": "population", "populationAif": "georgiou"}):
        request = logic.prepare(loaded["sequence"], modelName=DEFAULT_CONDITIONED_MODEL, t10_s=T10_S, **source)
        command = infer_command("python", request, tmp_path)
        args = build_infer_parser().parse_args(command[3:])
        spec = request.input_function
        assert args.mode == "aif" and args.hct == spec.hct and args.blood_t10 == spec.blood_t10_s
        assert (args.auto_aif, args.population_aif) == (spec.auto_aif, spec.population_aif)
        assert (args.aif_roi is not None) == (spec.aif_mask is not None)
    np.testing.assert_array_equal(logic.prepare(loaded["sequence"], modelName=DEFAULT_CONDITIONED_MODEL,
                                                t10_s=T10_S, aifSource="roi", aifRoi=loaded["aifSegmentation"],
                                                aifRoiLabel=1).input_function.aif_mask, phantom.aif_mask)


@pytest.mark.parametrize("source", ["auto", "image"])   # image mode: detection finds the phantom's artery
def test_a_child_process_run_with_detection_gives_what_the_thread_gives(slicer_scene, phantom, loaded, module,
                                                                       tmp_path, untrained_conditioned_models, source):
    logic = module.DCEPKInferenceLogic(scene=slicer_scene.scene)
    logic.childTemporaryFolder = str(tmp_path)
    options = dict(modelName=DEFAULT_CONDITIONED_MODEL, maskNode=loaded["tissues"], device="cpu", t10_s=T10_S,
                   aifSource=source)
    logic.computeIn = "thread"
    logic.run(loaded["sequence"], **options)
    thread = logic.lastResult.inference
    logic.computeIn = "child"   # dcepk infer --mode aif --auto-aif either in a child process
    nodes = logic.run(loaded["sequence"], **options)
    child = logic.lastResult.inference
    np.testing.assert_allclose(child.aif_plasma_mM, thread.aif_plasma_mM, rtol=1e-6)
    np.testing.assert_array_equal(child.input_function.label_map, thread.input_function.label_map)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes["Ktrans"]), thread.maps["Ktrans"], rtol=1e-5,
                               atol=1e-7)
    _close_to_truth(child.aif_plasma_mM, phantom)
    assert nodes["input_function"].GetName() == fit_bridge.DETECTED_NAME


@pytest.mark.skipif(not SHIPPED, reason=f"{DEFAULT_CONDITIONED_MODEL} is not in Resources/Models yet")
@pytest.mark.parametrize("source", ["roi", "auto", "image"])
def test_shipped_aif_conditioned_network_from_the_scene_meets_the_phantom_truth(slicer_scene, phantom, loaded,
                                                                               module, source):
    logic = module.DCEPKInferenceLogic(scene=slicer_scene.scene)
    t10_map = fit_bridge.update_volume_from_array(slicer_scene.scene, phantom.truth["T10"], phantom.series.geometry,
                                                  "T1 map", units="s", map_name="T10")   # tissue and blood
    nodes = logic.run(loaded["sequence"], modelName=DEFAULT_CONDITIONED_MODEL, maskNode=loaded["tissues"],
                      device="cpu", t10Map=t10_map, t10MapUnit="s", aifSource=source, aifRoi=loaded["aifSegmentation"],
                      hematocrit=phantom.protocol.hct)
    rim, white = phantom.labels == TUMOUR_RIM, phantom.labels == WHITE_MATTER
    for name in ("Ktrans", "ve"):   # an all-zero map misses both by 100 %
        estimate = np.median(slicer.util.arrayFromVolume(nodes[name])[rim])
        truth = np.median(phantom.truth[name][rim])
        assert abs(estimate - truth) <= 0.3 * truth, (name, estimate, truth)
    ktrans = slicer.util.arrayFromVolume(nodes["Ktrans"])
    assert np.median(ktrans[rim]) > 5 * np.median(ktrans[white])   # a constant map has no contrast
