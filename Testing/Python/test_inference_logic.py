"""The DCEPKInference Logic's scene path (prepare -> compute -> publish) on the phantom, headless.

``DCEPKInferenceLogic`` (Qt shell, needs a real Slicer) delegates each step to these
``DCEPKInferenceLib.mrml`` functions one to one (checked in test_inference_module_static.py);
here they run against the real Slicer core libraries. Truths: ``run_inference`` called directly on
the same arrays (the ``dcepk infer`` path), ``pipeline.run_fit`` for the comparison fit, and numpy
for thresholding and statistics.
"""

import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import import_or_skip
from slicer_scene import slicer_scene  # noqa: F401  (fixture)

slicer = import_or_skip("slicer", "slicer-core (pip install slicer-core) is needed for MRML bridge tests")
import torch  # noqa: E402

from DCEPKFittingLib import mrml as fit_bridge  # noqa: E402
from DCEPKFittingLib.core.device import describe_device  # noqa: E402
from DCEPKFittingLib.core.errors import DCEPKInputError, JobCancelledError  # noqa: E402
from DCEPKFittingLib.core.geometry import Geometry  # noqa: E402
from DCEPKFittingLib.core.jobs import BackgroundJob, JobState  # noqa: E402
from DCEPKFittingLib.pipeline.fit import FitSettings, run_fit  # noqa: E402
from DCEPKFittingLib.sims.phantom import make_phantom  # noqa: E402
from DCEPKInferenceLib import mrml as bridge  # noqa: E402
from DCEPKInferenceLib.nn.model_store import list_models, model_mode  # noqa: E402
from DCEPKInferenceLib.pipeline.inference import run_inference  # noqa: E402

torch.set_num_threads(1)
T10_S = 1.2  # one T10 for the scene and the direct calls alike (the networks need one to get concentration)
# whatever AIF-free weights are shipped when the tests run (AIF-conditioned: test_inference_input_function_scene)
MODELS = [card["name"] for card in list_models() if model_mode(card) == "aif_free"]
DEFAULT_MODEL = "hetero_encoder" if "hetero_encoder" in MODELS else (MODELS[0] if MODELS else None)
if not MODELS:  # nothing to test without weights: skip on a user's checkout, fail in CI
    from DCEPKFittingLib.core.reference_data import reference_data_required

    if reference_data_required():
        pytest.fail("no network weights in DCEPKInference/Resources/Models", pytrace=False)
    pytest.skip("no network weights in DCEPKInference/Resources/Models", allow_module_level=True)
MAPS = ("Ktrans", "ve", "vp", "kep", "Ktrans_sd", "ve_sd", "vp_sd", "kep_sd")


@pytest.fixture(scope="module")
def phantom():
    # Two slices of 32 x 32 on an oblique grid, so a geometry mix-up cannot go unnoticed.
    phantom = make_phantom(shape=(2, 32, 32), seed=3)
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    phantom.series.geometry = Geometry(spacing=phantom.series.geometry.spacing, origin_lps=np.array([12.0, -30.0, 7.5]),
                                       direction_lps=rotation)
    return phantom


@pytest.fixture
def loaded(slicer_scene, phantom):
    return fit_bridge.phantom_to_scene(slicer_scene.scene, phantom, "phantom", slicer_scene.sequences_logic)


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _array(node):
    return slicer.util.arrayFromVolume(node)


@pytest.mark.parametrize("model_name", MODELS)
def test_maps_equal_run_inference_on_the_same_arrays_with_the_source_geometry(slicer_scene, phantom, loaded,
                                                                              model_name):
    nodes, result = bridge.run_scene_inference(slicer_scene.scene, loaded["sequence"], model_name=model_name,
                                               mask=loaded["tissues"], device="cpu", t10_s=T10_S)
    direct = run_inference(phantom.series, model_name, mask=phantom.labels > 0, device="cpu", t10_s=T10_S)
    assert set(nodes) == set(MAPS) | {"statistics"}  # the mask is a segmentation: statistics per segment
    for name in MAPS:
        got = _array(nodes[name])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, direct.maps[name], err_msg=f"{model_name} {name}")
        np.testing.assert_allclose(_ijk_to_ras(nodes[name]), phantom.series.geometry.ijk_to_ras(), atol=1e-9)
        assert nodes[name].GetAttribute("DCEPK.Units") == direct.units[name]
        assert nodes[name].GetAttribute(bridge.MODEL_ATTRIBUTE) == model_name
    for name in bridge.PARAMETERS:
        assert nodes[name].GetAttribute(bridge.UNCERTAINTY_ATTRIBUTE) == nodes[f"{name}_sd"].GetID()
    np.testing.assert_array_equal(result.inference.estimated, phantom.labels > 0)
    inside = phantom.labels > 0
    assert np.all(direct.maps["Ktrans_sd"][inside] > 0) and np.all(direct.maps["Ktrans"][~inside] == 0)


def test_relative_and_absolute_uncertainty_thresholds_match_numpy(slicer_scene, phantom, loaded):
    scene = slicer_scene.scene
    raw_nodes, raw = bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL,
                                                mask=loaded["tissues"], device="cpu", t10_s=T10_S)
    raw_maps = {name: _array(raw_nodes[name]).copy() for name in MAPS}
    inside = phantom.labels > 0
    count = scene.GetNumberOfNodes()

    relative = 0.8
    nodes, result = bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL,
                                               mask=loaded["tissues"], device="cpu", uncertainty_threshold=relative,
                                               t10_s=T10_S)
    assert scene.GetNumberOfNodes() == count and nodes["Ktrans"] is raw_nodes["Ktrans"]  # updated in place
    for name in bridge.PARAMETERS:
        expected_out = inside & (raw_maps[f"{name}_sd"] > relative * np.abs(raw_maps[name]))
        got = _array(nodes[name])
        np.testing.assert_array_equal(np.isnan(got), expected_out, err_msg=name)
        np.testing.assert_array_equal(got[~expected_out], raw_maps[name][~expected_out], err_msg=name)
        np.testing.assert_array_equal(_array(nodes[f"{name}_sd"]), raw_maps[f"{name}_sd"])  # SDs never masked
    assert any(result.excluded[n].any() for n in bridge.PARAMETERS)
    assert any((~result.excluded[n] & inside).any() for n in bridge.PARAMETERS)
    assert nodes["Ktrans"].GetDisplayNode().GetApplyThreshold() == bool(result.excluded["Ktrans"].any())

    # Absolute limits per map (the median SD in the tissue: about half the voxels go), kep not thresholded.
    limits = {"Ktrans": float(np.median(raw_maps["Ktrans_sd"][inside])),
              "ve": float(np.median(raw_maps["ve_sd"][inside]))}
    nodes, result = bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL,
                                               mask=loaded["tissues"], device="cpu", uncertainty_threshold=limits,
                                               t10_s=T10_S)
    for name in bridge.PARAMETERS:
        expected_out = inside & (raw_maps[f"{name}_sd"] > limits[name]) if name in limits else np.zeros_like(inside)
        np.testing.assert_array_equal(np.isnan(_array(nodes[name])), expected_out, err_msg=name)
    assert 0.3 < result.excluded["Ktrans"].sum() / inside.sum() < 0.7

    # A new threshold on the earlier result (no new inference) gives what a fresh run gives, in the same nodes.
    request = bridge.prepare_scene_inference(loaded["sequence"], model_name=DEFAULT_MODEL, mask=loaded["tissues"],
                                             device="cpu", uncertainty_threshold=limits, t10_s=T10_S)
    request, again = bridge.rethreshold(request, result, relative)
    republished = bridge.publish_scene_inference(scene, request, again, existing_nodes=nodes)
    assert scene.GetNumberOfNodes() == count and republished["ve"] is nodes["ve"]
    for name in bridge.PARAMETERS:
        expected_out = inside & (raw_maps[f"{name}_sd"] > relative * np.abs(raw_maps[name]))
        np.testing.assert_array_equal(np.isnan(_array(republished[name])), expected_out, err_msg=name)

    for bad in (-1.0, 0.0, "lots", {"T1": 0.1}):
        with pytest.raises(DCEPKInputError, match="threshold"):
            bridge.normalize_threshold(bad)


def test_statistics_table_matches_numpy_with_uncertainty_and_excluded_fraction(slicer_scene, phantom, loaded):
    relative = 0.8
    # The inference mask (a label map) is the left half of the tissue, so segments straddle its edge.
    inferred = (phantom.labels > 0) & (np.arange(32)[None, None, :] < 16)
    labelmap = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "left half")
    slicer.util.updateVolumeFromArray(labelmap, inferred.astype(np.uint8))
    labelmap.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(phantom.series.geometry.ijk_to_ras()))
    nodes, result = bridge.run_scene_inference(slicer_scene.scene, loaded["sequence"], model_name=DEFAULT_MODEL,
                                               device="cpu", mask=labelmap, uncertainty_threshold=relative,
                                               statistics_segmentation=loaded["tissues"], t10_s=T10_S)
    direct = run_inference(phantom.series, DEFAULT_MODEL, mask=inferred, device="cpu", t10_s=T10_S)
    np.testing.assert_array_equal(result.inference.estimated, inferred)
    rows = fit_bridge.table_rows(nodes["statistics"])
    names = {v: n for v, n in phantom.label_names.items() if np.any(phantom.labels == v)}
    assert len(rows) == len(names) * len(bridge.PARAMETERS)
    assert [c for c in bridge.STATISTICS_COLUMNS if c not in rows[0]] == []
    checked_partial = False
    for row in rows:
        value = next(v for v, n in names.items() if n == row["segment"])
        voxels = (phantom.labels == value) & inferred
        raw, sd = direct.maps[row["map"]][voxels], direct.maps[row["map"] + "_sd"][voxels]
        out = sd > relative * np.abs(raw)
        kept = raw[~out].astype(np.float64)
        assert row["voxels"] == voxels.sum()
        assert row["count"] == kept.size and row["nan_count"] == out.sum()
        assert row["unit"] == bridge.UNITS[row["map"]]
        if voxels.any():
            assert row["excluded_fraction"] == pytest.approx(out.mean(), abs=1e-12)
            assert row["mean_uncertainty"] == pytest.approx(sd.astype(np.float64).mean(), rel=1e-6)
            checked_partial |= 0 < voxels.sum() < (phantom.labels == value).sum()
        else:
            assert np.isnan(row["excluded_fraction"]) and np.isnan(row["mean_uncertainty"])
        if kept.size > 1:
            p05, q1, median, q3, p95 = np.percentile(kept, [5, 25, 50, 75, 95])
            assert row["mean"] == pytest.approx(kept.mean(), rel=1e-6, abs=1e-9)
            assert row["sd"] == pytest.approx(kept.std(ddof=1), rel=1e-6, abs=1e-9)
            assert row["median"] == pytest.approx(median, rel=1e-6, abs=1e-9)
            assert row["iqr"] == pytest.approx(q3 - q1, rel=1e-6, abs=1e-9)
            assert (row["p05"], row["p95"]) == (pytest.approx(p05, rel=1e-6, abs=1e-9),
                                                pytest.approx(p95, rel=1e-6, abs=1e-9))
        elif kept.size == 0:
            assert np.isnan(row["mean"])
    assert checked_partial, "no segment straddled the mask's edge: the intersection was not exercised"


def test_comparison_fit_equals_the_pipeline_on_the_inferred_voxels(slicer_scene, phantom, loaded):
    nodes, result = bridge.run_scene_inference(slicer_scene.scene, loaded["sequence"], model_name=DEFAULT_MODEL,
                                               mask=loaded["tissues"], device="cpu", compare_with_fit=True,
                                               t10_s=1.2, fit_model="etofts", population_aif="parker")
    settings = FitSettings(model="etofts", method="nlls", t10_s=1.2, population_aif="parker", hct=0.45,
                           mask=phantom.labels > 0, device="cpu")
    fit = run_fit(phantom.series, settings)
    for name in ("Ktrans", "ve", "vp", "kep"):
        got = _array(nodes[f"fit_{name}"])
        np.testing.assert_allclose(got, fit.maps[name], rtol=2e-5, atol=1e-7, equal_nan=True, err_msg=name)
        np.testing.assert_allclose(_ijk_to_ras(nodes[f"fit_{name}"]), phantom.series.geometry.ijk_to_ras(), atol=1e-9)
    rows = [r for r in fit_bridge.table_rows(nodes["statistics"]) if r["map"] == "fit_Ktrans"]
    assert rows
    for row in rows:
        value = next(v for v, n in phantom.label_names.items() if n == row["segment"])
        values = fit.maps["Ktrans"][phantom.labels == value]
        assert row["count"] == np.isfinite(values).sum()
        assert row["mean"] == pytest.approx(np.nanmean(values), rel=1e-5, abs=1e-9)
        se = fit.maps["Ktrans_se"][phantom.labels == value]   # none in a segment without leakage
        expected = np.nanmean(se) if np.isfinite(se).any() else np.nan
        assert row["mean_uncertainty"] == pytest.approx(expected, rel=1e-5, abs=1e-9, nan_ok=True)
        assert np.isnan(row["excluded_fraction"])


def test_rerun_updates_outputs_and_makes_new_ones_when_asked(slicer_scene, loaded):
    scene = slicer_scene.scene
    first, _ = bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL,
                                          mask=loaded["tissues"], device="cpu", t10_s=T10_S)
    first_ktrans = _array(first["Ktrans"]).copy()
    count = scene.GetNumberOfNodes()
    second, _ = bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL,
                                           mask=loaded["tissues"], device="cpu", uncertainty_threshold=0.5, t10_s=T10_S)
    assert scene.GetNumberOfNodes() == count and all(second[name] is first[name] for name in first)
    third, _ = bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL,
                                          mask=loaded["tissues"], device="cpu", update_existing=False, t10_s=T10_S)
    volumes = [name for name in third if name != "statistics"]
    assert scene.GetNumberOfNodes() == count + 2 * len(volumes) + 1  # each volume with its display node, a table
    assert third["Ktrans"] is not first["Ktrans"] and third["Ktrans"].GetName() != first["Ktrans"].GetName()
    np.testing.assert_array_equal(_array(third["Ktrans"]), first_ktrans)  # unthresholded, like the first run
    assert np.isnan(_array(first["Ktrans"])).any()  # the first run's node holds the thresholded second run


def test_cancel_mid_run_leaves_the_scene_unchanged(slicer_scene, loaded):
    scene = slicer_scene.scene
    earlier, _ = bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL,
                                            mask=loaded["tissues"], device="cpu", t10_s=T10_S)
    earlier_ktrans = _array(earlier["Ktrans"]).copy()
    before = slicer_scene.fingerprint()

    for stop_at in (0.2, 0.7):  # inside the network's pass, then inside the comparison fit
        cancel, seen = threading.Event(), []

        def progress(fraction, message, stop_at=stop_at):
            seen.append(fraction)
            if fraction >= stop_at:
                cancel.set()

        with pytest.raises(JobCancelledError):
            bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL, mask=loaded["tissues"],
                                       device="cpu", compare_with_fit=True, uncertainty_threshold=0.5,
                                       progress=progress, cancel=cancel, t10_s=T10_S)
        assert seen and max(seen) < 1.0
        assert slicer_scene.fingerprint() == before
        np.testing.assert_array_equal(_array(earlier["Ktrans"]), earlier_ktrans)

    # The widget's path: compute in a BackgroundJob, cancelled while it runs; nothing is published.
    request = bridge.prepare_scene_inference(loaded["sequence"], model_name=DEFAULT_MODEL, mask=loaded["tissues"],
                                             device="cpu", compare_with_fit=True, t10_s=T10_S)
    gate = threading.Event()

    def compute(request, progress=None, cancel=None):
        gate.wait(10)  # the job is surely running when it is cancelled
        return bridge.compute_scene_inference(request, progress=progress, cancel=cancel)

    job = BackgroundJob(compute, request).start()
    job.cancel()
    gate.set()
    assert job.wait(120) == JobState.CANCELLED and job.result is None
    assert slicer_scene.fingerprint() == before


def test_bad_input_raises_a_clear_error_and_leaves_the_scene_unchanged(slicer_scene, loaded):
    scene = slicer_scene.scene
    before = slicer_scene.fingerprint()
    with pytest.raises(DCEPKInputError, match="no model 'no_such_network'"):
        bridge.run_scene_inference(scene, loaded["sequence"], model_name="no_such_network", device="cpu")
    with pytest.raises(DCEPKInputError, match="unknown device"):
        bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL, device="tpu", t10_s=T10_S)
    with pytest.raises(DCEPKInputError, match="T10"):
        bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL, device="cpu", t10_s=1400.0)
    with pytest.raises(DCEPKInputError, match="comparison fit model"):
        bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL, device="cpu",
                                   compare_with_fit=True, fit_model="2cxm", t10_s=T10_S)
    with pytest.raises(DCEPKInputError, match="population AIF 'fritz'"):
        bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL, device="cpu",
                                   compare_with_fit=True, population_aif="fritz", t10_s=T10_S)
    if not torch.cuda.is_available():
        with pytest.raises(DCEPKInputError, match="no CUDA GPU"):
            bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL, device="cuda", t10_s=T10_S)
    assert slicer_scene.fingerprint() == before

    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    before = slicer_scene.fingerprint()
    with pytest.raises(DCEPKInputError, match="no segments"):
        bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL, device="cpu", mask=empty,
                                   t10_s=T10_S)

    sequence = loaded["sequence"]
    sequence.RemoveAttribute("MultiVolume.FrameLabels")
    sequence.SetIndexUnit("")
    before = slicer_scene.fingerprint()
    with pytest.raises(DCEPKInputError, match="no frame times"):
        bridge.run_scene_inference(scene, sequence, model_name=DEFAULT_MODEL, device="cpu", t10_s=T10_S)
    assert slicer_scene.fingerprint() == before
    assert not slicer_scene.nodes_by_class("vtkMRMLTableNode")
    assert not [n for n in slicer_scene.nodes_by_class("vtkMRMLScalarVolumeNode") if n.GetAttribute("DCEPK.Map")]


def test_show_map_with_uncertainty_puts_them_side_by_side(slicer_scene, loaded):
    scene = slicer_scene.scene
    nodes, _ = bridge.run_scene_inference(scene, loaded["sequence"], model_name=DEFAULT_MODEL, device="cpu",
                                          mask=loaded["tissues"], t10_s=T10_S)
    with pytest.raises(DCEPKInputError, match="no slice view"):
        bridge.show_map_with_uncertainty(scene, nodes["Ktrans"], nodes["Ktrans_sd"])
    layout = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    for view, orientation in (("Red", "Axial"), ("Yellow", "Sagittal")):
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(view)
        slice_node.SetOrientation(orientation)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(view)
    background = fit_bridge.update_volume_from_array(scene, np.ones((2, 32, 32)), Geometry(), "anatomy", colour="Grey")
    bridge.show_map_with_uncertainty(scene, nodes["ve"], nodes["ve_sd"], background)
    composites = {n.GetLayoutName(): n for n in slicer_scene.nodes_by_class("vtkMRMLSliceCompositeNode")}
    slices = {n.GetLayoutName(): n for n in slicer_scene.nodes_by_class("vtkMRMLSliceNode")}
    assert composites["Red"].GetForegroundVolumeID() == nodes["ve"].GetID()
    assert composites["Yellow"].GetForegroundVolumeID() == nodes["ve_sd"].GetID()
    assert {c.GetBackgroundVolumeID() for c in composites.values()} == {background.GetID()}
    assert slices["Yellow"].GetOrientationString() == "Axial"
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView


def test_model_card_text_and_device_description():
    card = next(c for c in list_models() if c["name"] == DEFAULT_MODEL)
    text = bridge.describe_model_card(card)
    assert DEFAULT_MODEL in text and "1/min" in text
    for metrics in card.get("validation", {}).get("metrics", {}).values():
        assert f"{float(metrics['rmse']):.3g}" in text
    assert [c["name"] for c in bridge.model_cards()] == sorted(c["name"] for c in list_models()
                                                               if model_mode(c) != "aif_reader")
    assert describe_device("cpu") == "CPU"
    if not torch.cuda.is_available():
        assert describe_device("auto").startswith("CPU")
        with pytest.raises(DCEPKInputError, match="no CUDA GPU"):
            describe_device("cuda")
    else:
        assert describe_device("cuda").startswith("GPU")


# --------------------------------------------------------------------------- the module's Logic class itself
@pytest.fixture(scope="module")
def module():
    """DCEPKInference.py imported headless. slicer-core lacks only the application framework the file
    imports at load time (qt, slicer.i18n, slicer.parameterNodeWrapper, slicer.ScriptedLoadableModule):
    minimal stand-ins for those let the real Logic run against the real scene. The widget is not used."""
    import importlib.util
    import sys
    import types

    def stand_in(name, **attributes):
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        return stub

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    stand_ins = {
        "qt": stand_in("qt"),
        "slicer.i18n": stand_in("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text),
        "slicer.parameterNodeWrapper": stand_in("slicer.parameterNodeWrapper", parameterNodeWrapper=lambda c: c,
                                                Choice=lambda *a: ("Choice", a), WithinRange=lambda *a: ("Range", a)),
        "slicer.ScriptedLoadableModule": stand_in(
            "slicer.ScriptedLoadableModule", ScriptedLoadableModule=type("ScriptedLoadableModule", (Base,), {}),
            ScriptedLoadableModuleLogic=type("ScriptedLoadableModuleLogic", (Base,), {}),
            ScriptedLoadableModuleWidget=type("ScriptedLoadableModuleWidget", (Base,), {}),
            ScriptedLoadableModuleTest=type("ScriptedLoadableModuleTest", (Base,), {})),
    }
    path = Path(__file__).resolve().parents[2] / "DCEPKInference" / "DCEPKInference.py"
    with pytest.MonkeyPatch.context() as patch:
        for name, stub in stand_ins.items():
            patch.setitem(sys.modules, name, stub)
        spec = importlib.util.spec_from_file_location("DCEPKInference_headless", path)
        loaded_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded_module)
    return loaded_module


def _gui_state(module, **changes):
    """A parameter node's values: the wrapper's defaults (read from the class) with ``changes``."""
    wrapper = module.DCEPKInferenceParameterNode
    state = {name: getattr(wrapper, name, None) for name in wrapper.__annotations__}
    state.update(changes)
    return type("GuiState", (), state)()


def test_module_logic_console_call_and_gui_options(slicer_scene, phantom, loaded, module):
    scene = slicer_scene.scene
    logic = module.DCEPKInferenceLogic(scene=scene)
    nodes = logic.run(loaded["sequence"], modelName=DEFAULT_MODEL, maskNode=loaded["tissues"], device="cpu",
                      uncertaintyThreshold={"Ktrans": 0.05}, compareWithFit=True, t10_s=1.2,
                      segmentationNode=loaded["tissues"], outputPrefix="NN")
    direct = run_inference(phantom.series, DEFAULT_MODEL, mask=phantom.labels > 0, device="cpu", t10_s=1.2)
    out = (phantom.labels > 0) & (direct.maps["Ktrans_sd"] > 0.05)
    np.testing.assert_array_equal(np.isnan(_array(nodes["Ktrans"])), out)
    np.testing.assert_array_equal(_array(nodes["Ktrans"])[~out], direct.maps["Ktrans"][~out])
    np.testing.assert_array_equal(_array(nodes["ve"]), direct.maps["ve"])
    assert nodes["Ktrans"].GetName() == "NN Ktrans" and "fit_Ktrans" in nodes and "statistics" in nodes
    assert logic.lastNodes is nodes

    count = scene.GetNumberOfNodes()
    again = logic.applyUncertaintyThreshold(None)
    assert scene.GetNumberOfNodes() == count and again["Ktrans"] is nodes["Ktrans"]
    np.testing.assert_array_equal(_array(again["Ktrans"]), direct.maps["Ktrans"])

    # The GUI's options (ms -> s, unticked inputs -> None, threshold modes) drive the same call.
    state = _gui_state(module, mode="aif-free", inputSequence=loaded["sequence"], inferenceMask=loaded["tissues"],
                       device="cpu",
                       useRepetitionTime=True, repetitionTimeMs=5.0, useT10=True, t10Value=1.2,
                       thresholdMode="absolute", ktransSdLimit=0.05, veSdLimit=0.0, vpSdLimit=0.0, kepSdLimit=0.0,
                       statisticsSegmentation=None, outputPrefix="GUI")
    options = logic.optionsFromParameterNode(state)
    assert options["tr_s"] == pytest.approx(0.005) and options["flipAngle_deg"] is None
    assert options["uncertaintyThreshold"] == {"Ktrans": 0.05}
    assert logic.uncertaintyThresholdFromParameterNode(_gui_state(module, thresholdMode="relative",
                                                                  relativeThreshold=0.3)) == 0.3
    assert logic.uncertaintyThresholdFromParameterNode(_gui_state(module, thresholdMode="none")) is None
    gui_nodes = logic.run(state.inputSequence, **options)
    np.testing.assert_array_equal(np.isnan(_array(gui_nodes["Ktrans"])), out)
    assert gui_nodes["Ktrans"].GetName() == "GUI Ktrans"

    with pytest.raises(DCEPKInputError, match="no model"):
        logic.run(loaded["sequence"], modelName="no_such_network")
    assert scene.GetNumberOfNodes() == count + len(gui_nodes) * 2 - 1  # the GUI run's volumes + displays, a table


def test_self_test_ground_truth_checks_pass_on_the_sample_phantom(slicer_scene, module):
    """The Slicer self-test's ground-truth checks, on the phantom the 'DCEPK phantom' sample data makes
    (DCEPKFittingLogic.loadPhantomSample: default size, these VFA angles), with the shipped weights."""
    phantom = make_phantom(vfa_flip_angles_deg=(2.0, 5.0, 10.0, 15.0, 20.0))
    nodes_in = fit_bridge.phantom_to_scene(slicer_scene.scene, phantom, "DCEPK phantom", slicer_scene.sequences_logic)
    logic = module.DCEPKInferenceLogic(scene=slicer_scene.scene)
    t10_node = module.DCEPKInferenceTest.addPhantomT10Map(slicer_scene.scene, phantom)
    outputs = logic.run(nodes_in["sequence"], modelName=module.DEFAULT_MODEL, maskNode=nodes_in["tissues"],
                        segmentationNode=nodes_in["tissues"], device="cpu", t10Map=t10_node, t10MapUnit="s")
    maps = {name: _array(node).copy() for name, node in outputs.items() if name != "statistics"}
    checks = module.DCEPKInferenceTest.phantomChecks(phantom, maps)
    assert len(checks) == 7
    print("\n".join(description for description, _ in checks))  # margins, shown with -s
    failed = [description for description, passed in checks if not passed]
    assert not failed, failed

    # The checks can fail: an all-zero map fails every check on the truth, and a network that gave the brain's
    # median everywhere, or the true tumour-rim median everywhere, fails them too.
    brain = phantom.labels > 0
    rim = phantom.labels == next(v for v, n in phantom.label_names.items() if "rim" in n)
    wrong = {"all zero": {name: np.zeros_like(array) for name, array in maps.items()},
             "brain median": {name: np.full_like(array, np.median(array[brain])) for name, array in maps.items()},
             "true rim median": {name: np.full_like(array, np.median(phantom.truth.get(name, array)[rim]))
                                 for name, array in maps.items()}}
    for label, constant in wrong.items():
        failed = [d for d, passed in module.DCEPKInferenceTest.phantomChecks(phantom, constant) if not passed]
        assert failed, label
        if label == "all zero":
            assert len(failed) == len(checks) - 1, failed   # all but the rim's voxel count


def test_a_publish_that_fails_half_way_takes_out_what_it_added(slicer_scene, loaded, monkeypatch):
    scene = slicer_scene.scene
    request = bridge.prepare_scene_inference(loaded["sequence"], model_name=DEFAULT_MODEL, mask=loaded["tissues"],
                                             device="cpu", t10_s=T10_S)
    result = bridge.compute_scene_inference(request)
    before = slicer_scene.fingerprint()
    real, calls = fit_bridge.update_volume_from_array, []

    def failing_on_the_third_map(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 3:
            raise MemoryError("simulated failure while writing a map")
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_bridge, "update_volume_from_array", failing_on_the_third_map)
    with pytest.raises(MemoryError):
        bridge.publish_scene_inference(scene, request, result)
    assert len(calls) == 3
    assert slicer_scene.fingerprint() == before
    monkeypatch.undo()
    nodes = bridge.publish_scene_inference(scene, request, result)  # and a later publish works
    np.testing.assert_array_equal(_array(nodes["vp"]), result.maps["vp"])
