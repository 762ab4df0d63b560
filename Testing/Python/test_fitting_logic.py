"""The DCEPKFitting Logic's scene path (prepare -> compute -> publish) on the phantom, headless.

The module's ``DCEPKFittingLogic`` (Qt shell, needs a real Slicer) delegates each step to these
``mrml_bridge`` functions one to one (checked statically in test_fitting_module_static.py); here
they run against the real Slicer core libraries. Truths: ``pipeline.run_fit`` on the same arrays
(the CLI path), the phantom's ground truth, and numpy.
"""

import threading

import numpy as np
import pytest

from slicer_scene import slicer_scene  # noqa: F401  (fixture)
import slicer  # noqa: E402  (slicer_scene already required it)


from DCEPKFittingLib import mrml as bridge  # noqa: E402
from DCEPKFittingLib.core.errors import DCEPKInputError, JobCancelledError  # noqa: E402
from DCEPKFittingLib.core.geometry import Geometry  # noqa: E402
from DCEPKFittingLib.core.jobs import BackgroundJob, JobState  # noqa: E402
from DCEPKFittingLib.kinetics.fit_result import FITTED_STATUSES  # noqa: E402

from DCEPKFittingLib.pipeline import fit as pipeline  # noqa: E402
from DCEPKFittingLib.sims import phantom as phantom_lib  # noqa: E402

VFA_ANGLES = (2.0, 5.0, 10.0, 15.0, 20.0)


@pytest.fixture(scope="module")
def phantom():
    # Two slices of 32 x 32: every tissue and a tumour rim, small enough for 2 shared cores.
    return phantom_lib.make_phantom(shape=(2, 32, 32), vfa_flip_angles_deg=VFA_ANGLES, seed=3)


@pytest.fixture
def loaded(slicer_scene, phantom):
    return bridge.phantom_to_scene(slicer_scene.scene, phantom, "phantom", slicer_scene.sequences_logic)


def _options(loaded, phantom, **changes):
    segmentation = loaded["aifSegmentation"]
    options = dict(model="etofts", aif_segmentation=segmentation, aif_segment_id=bridge.segment_ids(segmentation)[0],
                   t10_s=None, vfa_sequence=loaded["vfa"], r1_per_mM_s=phantom.protocol.r1_per_mM_s,
                   hct=phantom.protocol.hct, mask=loaded["tissues"], statistics_segmentation=loaded["tissues"],
                   device="cpu")
    options.update(changes)
    return options


def test_phantom_loads_as_sequence_vfa_segments_and_a_box_around_the_vessel(slicer_scene, phantom, loaded):
    series = bridge.series_from_sequence(loaded["sequence"])
    np.testing.assert_array_equal(series.signal, phantom.series.signal.astype(np.float32))
    np.testing.assert_allclose(series.times_s, phantom.series.times_s, rtol=1e-6)
    signals, angles, geometry = bridge.vfa_from_sequence(loaded["vfa"])
    assert angles == list(VFA_ANGLES)
    np.testing.assert_array_equal(signals, phantom.vfa.signals.astype(np.float32))
    reference = bridge.reference_volume(series.spatial_shape, series.geometry)
    masks = bridge.segment_masks(loaded["tissues"], reference)
    assert set(masks) == {phantom.label_names[v] for v in np.unique(phantom.labels) if v}
    for value, name in phantom.label_names.items():
        if name in masks:
            np.testing.assert_array_equal(masks[name], phantom.labels == value)
    box = bridge.mask_from_roi(loaded["aifRoi"], reference)
    (k0, j0, i0), (k1, j1, i1) = np.argwhere(phantom.aif_mask).min(0), np.argwhere(phantom.aif_mask).max(0)
    expected = np.zeros_like(box)
    expected[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = True
    np.testing.assert_array_equal(box, expected)


def test_logic_maps_equal_the_cli_path_and_are_near_ground_truth(slicer_scene, phantom, loaded):
    nodes, output = bridge.run_scene_fit(slicer_scene.scene, loaded["sequence"], **_options(loaded, phantom))

    settings = pipeline.FitSettings(
        model="etofts", vfa_signals=phantom.vfa.signals, vfa_flip_angles_deg=list(VFA_ANGLES),
        vfa_tr_s=phantom.vfa.tr_s, r1_per_mM_s=phantom.protocol.r1_per_mM_s, hct=phantom.protocol.hct,
        aif_mask=phantom.aif_mask, mask=phantom.labels > 0, device="cpu")
    cli = pipeline.run_fit(phantom.series, settings)
    assert set(nodes) - {"statistics"} == {name for name, a in cli.maps.items() if np.ndim(a) == 3}
    for name, expected in cli.maps.items():
        got = slicer.util.arrayFromVolume(nodes[name])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=name)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7, equal_nan=True, err_msg=name)
        matrix = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(nodes[name]))
        np.testing.assert_allclose(matrix, phantom.series.geometry.ijk_to_ras(), atol=1e-9)
    assert nodes["Ktrans"].GetAttribute("DCEPK.Units") == cli.units["Ktrans"]

    rim = phantom.labels == next(v for v, n in phantom.label_names.items() if "rim" in n)
    ktrans = slicer.util.arrayFromVolume(nodes["Ktrans"])[rim]
    ve = slicer.util.arrayFromVolume(nodes["ve"])[rim]
    assert np.median(np.abs(ktrans - phantom.truth["Ktrans"][rim]) / phantom.truth["Ktrans"][rim]) < 0.15
    assert np.median(np.abs(ve - phantom.truth["ve"][rim])) < 0.05

    rows = bridge.table_rows(nodes["statistics"])
    names = {v: n for v, n in phantom.label_names.items() if np.any(phantom.labels == v)}
    assert len(rows) == len(names) * len([m for m in cli.maps if m != "status"])
    fitted = np.isin(cli.maps["status"], [int(s) for s in FITTED_STATUSES])
    for row in rows:
        value = next(v for v, n in names.items() if n == row["segment"])
        # the statistics are over the fit's fitted voxels (the row says so), with counts per status
        assert row["voxels"] == "fitted"
        values = cli.maps[row["map"]][(phantom.labels == value) & fitted]
        assert row["count"] == np.isfinite(values).sum()
        assert row["n_fitted"] == np.sum((phantom.labels == value) & fitted)
        if row["count"]:
            assert row["mean"] == pytest.approx(np.nanmean(values), rel=1e-5, abs=1e-9)
            assert row["median"] == pytest.approx(np.nanmedian(values), rel=1e-5, abs=1e-9)

    # The voxel plot's fitted curve follows the measured concentration where the fit converged.
    k, j, i = np.argwhere(rim)[0]
    model = output.predict((k, j, i))
    assert np.sqrt(np.mean((model - output.concentration[k, j, i]) ** 2)) == pytest.approx(
        float(output.maps["rmse"][k, j, i]), rel=1e-3)


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def test_rerun_updates_outputs_and_new_outputs_when_asked(slicer_scene, phantom, loaded):
    scene = slicer_scene.scene
    first, _ = bridge.run_scene_fit(scene, loaded["sequence"], **_options(loaded, phantom))
    count = scene.GetNumberOfNodes()
    second, _ = bridge.run_scene_fit(scene, loaded["sequence"], **_options(loaded, phantom, method="linear"))
    assert scene.GetNumberOfNodes() == count
    assert all(second[name] is first[name] for name in first)
    third, _ = bridge.run_scene_fit(scene, loaded["sequence"],
                                    **_options(loaded, phantom, method="linear", update_existing=False))
    assert scene.GetNumberOfNodes() > count
    assert third["Ktrans"] is not first["Ktrans"] and third["Ktrans"].GetName() != first["Ktrans"].GetName()


def test_cancel_mid_run_leaves_the_scene_unchanged(slicer_scene, phantom, loaded):
    scene = slicer_scene.scene
    earlier, _ = bridge.run_scene_fit(scene, loaded["sequence"], **_options(loaded, phantom, method="linear"))
    earlier_ktrans = slicer.util.arrayFromVolume(earlier["Ktrans"]).copy()
    before = slicer_scene.fingerprint()

    cancel = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if fraction >= 0.15:  # inside the voxel fit, after T1 mapping and the AIF
            cancel.set()

    with pytest.raises(JobCancelledError):
        bridge.run_scene_fit(scene, loaded["sequence"], progress=progress, cancel=cancel,
                             **_options(loaded, phantom, model="tofts"))
    assert seen and max(seen) < 1.0
    assert slicer_scene.fingerprint() == before
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(earlier["Ktrans"]), earlier_ktrans)

    # The widget's path: compute in a BackgroundJob, cancelled while running; nothing is published.
    request = bridge.prepare_scene_fit(loaded["sequence"], **_options(loaded, phantom, model="tofts"))
    gate = threading.Event()

    def compute(request, progress=None, cancel=None):
        gate.wait(10)  # the job is surely running when it is cancelled
        return bridge.compute_scene_fit(request, progress=progress, cancel=cancel)

    job = BackgroundJob(compute, request).start()
    job.cancel()
    gate.set()
    assert job.wait(120) == JobState.CANCELLED and job.result is None
    assert slicer_scene.fingerprint() == before


def test_bad_input_raises_a_clear_error_and_leaves_the_scene_unchanged(slicer_scene, phantom, loaded):
    scene = slicer_scene.scene
    before = slicer_scene.fingerprint()

    far_roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "nowhere")
    far_roi.SetCenter(5000.0, 5000.0, 5000.0)
    far_roi.SetSize(10.0, 10.0, 10.0)
    before = slicer_scene.fingerprint()
    with pytest.raises(DCEPKInputError, match="AIF ROI contains no voxel"):
        bridge.run_scene_fit(scene, loaded["sequence"],
                             **_options(loaded, phantom, aif_segmentation=None, aif_roi=far_roi))
    with pytest.raises(DCEPKInputError, match="choose one input function"):
        bridge.run_scene_fit(scene, loaded["sequence"], **_options(loaded, phantom, population_aif="parker"))
    with pytest.raises(DCEPKInputError, match="no input function"):
        bridge.run_scene_fit(scene, loaded["sequence"], **_options(loaded, phantom, aif_segmentation=None))
    t10_map = bridge.update_volume_from_array(scene, np.full(phantom.series.spatial_shape, 1.2), phantom.series.geometry,
                                              "T10 in seconds", colour="Grey")
    before = slicer_scene.fingerprint()
    with pytest.raises(DCEPKInputError, match="unit is probably wrong"):
        bridge.run_scene_fit(scene, loaded["sequence"],
                             **_options(loaded, phantom, vfa_sequence=None, t10_map=t10_map, t10_map_unit="ms"))
    with pytest.raises(DCEPKInputError, match="choose one source of pre-contrast T1"):
        bridge.run_scene_fit(scene, loaded["sequence"], **_options(loaded, phantom, t10_map=t10_map))
    elsewhere = bridge.segmentation_from_labels(scene, np.ones((2, 4, 4), np.int16),
                                                Geometry(origin_lps=[1000.0, 1000.0, 1000.0]),
                                                {1: "off the grid"}, "elsewhere")
    before = slicer_scene.fingerprint()
    with pytest.raises(DCEPKInputError, match="off the grid"):
        bridge.run_scene_fit(scene, loaded["sequence"], **_options(loaded, phantom, statistics_segmentation=elsewhere))
    assert slicer_scene.fingerprint() == before

    sequence = loaded["sequence"]
    sequence.RemoveAttribute("MultiVolume.FrameLabels")
    sequence.SetIndexUnit("")
    before = slicer_scene.fingerprint()
    with pytest.raises(DCEPKInputError, match="no frame times"):
        bridge.run_scene_fit(scene, sequence, **_options(loaded, phantom))
    assert slicer_scene.fingerprint() == before
    assert not slicer_scene.nodes_by_class("vtkMRMLTableNode")


def test_the_fit_in_a_worker_leaves_torchs_process_wide_thread_count_alone(slicer_scene, phantom, loaded,
                                                                           monkeypatch):
    """Issue 16 item 9: Slicer runs the fit in a BackgroundJob; torch.set_num_threads is process-wide,
    so the fit must not call it. Issue 19: the fit's chunks run on the job runner's threads in either
    case, and no path changes a process-wide setting."""
    import torch

    calls = []
    original = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append((threading.current_thread().name, n)),
                                                             original(n)))
    request = bridge.prepare_scene_fit(loaded["sequence"], **_options(loaded, phantom, method="linear"))
    job = BackgroundJob(bridge.compute_scene_fit, request, name="DCEPK fit").start()
    assert job.wait(120) == JobState.FINISHED, job.error_traceback
    assert calls == [], f"the worker changed torch's thread count: {calls}"
    in_worker = job.result.maps["Ktrans"]
    on_main = bridge.compute_scene_fit(request).maps["Ktrans"]  # from the main thread: same maps
    np.testing.assert_array_equal(in_worker, on_main)
    assert calls == [], f"the fit changed torch's thread count: {calls}"


# --------------------------------------------------------------------------- the module's Logic class itself
# The DCEPKFitting module file imported as Slicer imports it, with Slicer's own parameterNodeWrapper
# and ScriptedLoadableModule (conformance tier: needs ../shared/slicer-src, see slicer_application).
from slicer_application import slicer_app  # noqa: E402,F401  (fixture)


@pytest.fixture
def app_loaded(slicer_app, phantom):
    return bridge.phantom_to_scene(slicer_app.scene, phantom, "phantom", slicer_app.wired.sequences_logic)


def test_module_logic_run_from_the_console_equals_the_cli_path(slicer_app, phantom, app_loaded):
    module = slicer_app.import_module("DCEPKFitting")
    logic = module.DCEPKFittingLogic(scene=slicer_app.scene)
    segmentation = app_loaded["aifSegmentation"]
    nodes = logic.run(app_loaded["sequence"], model="etofts", aifSegmentation=segmentation,
                      aifSegmentId=bridge.segment_ids(segmentation)[0], t10_s=None, vfaSequence=app_loaded["vfa"],
                      r1_per_mM_s=phantom.protocol.r1_per_mM_s, hematocrit=phantom.protocol.hct,
                      mask=app_loaded["tissues"], statisticsSegmentation=app_loaded["tissues"], device="cpu")
    cli = pipeline.run_fit(phantom.series, pipeline.FitSettings(
        model="etofts", vfa_signals=phantom.vfa.signals, vfa_flip_angles_deg=list(VFA_ANGLES),
        vfa_tr_s=phantom.vfa.tr_s, r1_per_mM_s=phantom.protocol.r1_per_mM_s, hct=phantom.protocol.hct,
        aif_mask=phantom.aif_mask, mask=phantom.labels > 0, device="cpu"))
    for name in ("Ktrans", "ve", "vp", "R2", "status"):
        np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes[name]), cli.maps[name], rtol=2e-5, atol=1e-7,
                                   equal_nan=True, err_msg=name)
    assert logic.lastOutput is not None and logic.lastNodes is nodes
    assert nodes["statistics"].GetName() == "DCEPK statistics"


def test_module_gui_options_reach_the_fit(slicer_app, phantom, app_loaded):
    module = slicer_app.import_module("DCEPKFitting")
    logic = module.DCEPKFittingLogic(scene=slicer_app.scene)
    p = logic.getParameterNode()  # Slicer's wrapper on the scene's parameter node, as the panel has it
    p.inputSequence, p.model, p.method, p.hematocrit = app_loaded["sequence"], "patlak", "linear", 0.4
    p.useRepetitionTime, p.repetitionTimeMs = True, phantom.protocol.tr_s * 1000.0  # typed in ms
    p.relaxivity, p.fitMask = phantom.protocol.r1_per_mM_s, app_loaded["tissues"]
    p.device, p.outputPrefix = "cpu", "GUI"
    p.aifSource, p.aifRoi, p.populationAif = "population", app_loaded["aifRoi"], "parker"
    p.t10Mode, p.vfaSequence, p.vfaFlipAngles = "vfa", app_loaded["vfa"], ", ".join(f"{a:g}" for a in VFA_ANGLES)
    options = logic.optionsFromParameterNode(p)
    assert options["tr_s"] == pytest.approx(phantom.protocol.tr_s)  # ms in the GUI, s at the API
    assert options["flipAngle_deg"] is None and options["vfaTr_s"] is None  # from the headers
    assert options["vfaFlipAngles_deg"] == list(VFA_ANGLES) and "aifRoi" not in options
    assert options["mask"] is app_loaded["tissues"]  # the node union field
    request = logic.prepare(app_loaded["sequence"], **options)
    assert request.settings.population_aif == "parker" and request.settings.aif_mask is None
    assert request.settings.model == "patlak" and request.settings.hct == pytest.approx(0.4)
    assert request.settings.vfa_tr_s == pytest.approx(phantom.vfa.tr_s)
    nodes = logic.publish(request, logic.compute(request))
    assert {"Ktrans", "vp"} <= set(nodes) and nodes["Ktrans"].GetName() == "GUI Ktrans"
    assert logic.describeDevice("cpu") == "CPU"


# --------------------------------------------------------------------------- every input function source of dcepk fit
def _rim_medians(nodes, phantom):
    """(fitted median, true median) of Ktrans and ve over the tumour rim."""
    rim = phantom.labels == phantom_lib.TUMOUR_RIM
    return {name: (float(np.nanmedian(slicer.util.arrayFromVolume(nodes[name])[rim])),
                   float(np.median(phantom.truth[name][rim]))) for name in ("Ktrans", "ve")}


def _vfa_options(app_loaded, phantom):
    return dict(model="etofts", t10_s=None, vfaSequence=app_loaded["vfa"], r1_per_mM_s=phantom.protocol.r1_per_mM_s,
                hematocrit=phantom.protocol.hct, mask=app_loaded["tissues"], device="cpu")


def test_module_logic_fits_with_automatic_detection_and_puts_the_detected_vessel_in_the_scene(
        slicer_app, phantom, app_loaded):
    """``autoAif`` from the console: the vessel found without any ROI, the rim's Ktrans and ve near the
    phantom's truth, the detected voxels (on the phantom's vessel) and curve in the scene, and the fit's
    notes saying which input function it used."""
    module = slicer_app.import_module("DCEPKFitting")
    logic = module.DCEPKFittingLogic(scene=slicer_app.scene)
    logic.computeIn = "thread"
    nodes = logic.run(app_loaded["sequence"], autoAif="either", **_vfa_options(app_loaded, phantom))
    for name, (fitted, truth) in _rim_medians(nodes, phantom).items():
        assert fitted == pytest.approx(truth, rel=0.15), name
    output = logic.lastOutput
    assert np.max(np.abs(output.aif_plasma_mM - phantom.aif_plasma_mM)) < 0.15 * phantom.aif_plasma_mM.max()
    assert any("automatic detection (either)" in m for m in output.messages), output.messages

    detected = nodes["input_function"]
    assert detected.GetName() == bridge.DETECTED_NAME
    reference = bridge.reference_volume(phantom.series.spatial_shape, phantom.series.geometry)
    artery = bridge.roi_mask(detected, reference, 1)                   # segment 1: 'artery'
    assert detected.GetSegmentation().GetNthSegment(0).GetName() == "artery"
    assert artery.any() and np.all(phantom.aif_mask[artery])           # every artery voxel on the vessel
    np.testing.assert_array_equal(artery, output.input_function.label_map == 1)
    chart = nodes["input_function_chart"]
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    table = chart.GetNthPlotSeriesNode(0).GetTableNode().GetTable()
    curve = np.array([table.GetValue(r, 1).ToDouble() for r in range(table.GetNumberOfRows())])
    np.testing.assert_allclose(curve, output.input_function.blood_mM, rtol=1e-6)
    assert {"input_function", "input_function_chart"} <= set(bridge.NOT_MAPS)

    # A second run replaces the detection (one segmentation of that name); a box run leaves it alone.
    logic.run(app_loaded["sequence"], autoAif="artery", **_vfa_options(app_loaded, phantom))
    assert slicer_app.scene.GetNodesByClassByName("vtkMRMLSegmentationNode",
                                                  bridge.DETECTED_NAME).GetNumberOfItems() == 1
    nodes = logic.run(app_loaded["sequence"], aifRoi=app_loaded["aifRoi"], **_vfa_options(app_loaded, phantom))
    assert "input_function" not in nodes


def test_module_logic_fits_with_an_aif_csv_file(slicer_app, phantom, app_loaded, tmp_path):
    """``aifCsv``: the phantom's true blood curve as a CSV file (time from the first frame, mM) is the
    input function the fit uses (made plasma with the haematocrit), and the rim's maps meet the truth."""
    times = phantom.series.times_s - phantom.series.times_s[0]
    path = tmp_path / "aif.csv"
    path.write_text("time (s),concentration (mM)\n" + "".join(f"{t:.6f},{c:.9g}\n"
                                                              for t, c in zip(times, phantom.aif_blood_mM)))
    module = slicer_app.import_module("DCEPKFitting")
    logic = module.DCEPKFittingLogic(scene=slicer_app.scene)
    logic.computeIn = "thread"
    nodes = logic.run(app_loaded["sequence"], aifCsv=str(path), **_vfa_options(app_loaded, phantom))
    np.testing.assert_allclose(logic.lastOutput.aif_plasma_mM, phantom.aif_plasma_mM, rtol=1e-6, atol=1e-9)
    assert any(f"CSV file {path}" in m for m in logic.lastOutput.messages), logic.lastOutput.messages
    for name, (fitted, truth) in _rim_medians(nodes, phantom).items():
        assert fitted == pytest.approx(truth, rel=0.15), name
    assert "input_function" not in nodes

    count = slicer_app.scene.GetNumberOfNodes()
    with pytest.raises(DCEPKInputError, match="does not exist"):         # said at prepare, before any compute
        logic.prepare(app_loaded["sequence"], aifCsv=str(tmp_path / "missing.csv"),
                      **_vfa_options(app_loaded, phantom))
    with pytest.raises(DCEPKInputError, match="an AIF CSV file and automatic detection are given"):
        logic.prepare(app_loaded["sequence"], aifCsv=str(path), autoAif="vein", **_vfa_options(app_loaded, phantom))
    with pytest.raises(DCEPKInputError, match="must be one of artery, vein, either"):
        logic.prepare(app_loaded["sequence"], autoAif="aorta", **_vfa_options(app_loaded, phantom))
    assert slicer_app.scene.GetNumberOfNodes() == count


def test_module_gui_csv_and_auto_sources_reach_the_fit(slicer_app, phantom, app_loaded, tmp_path):
    """The panel's new sources, through optionsFromParameterNode, give the settings the command line
    would: the CSV path, the detection kind and the blood T10 (for a vessel's signal only)."""
    module = slicer_app.import_module("DCEPKFitting")
    logic = module.DCEPKFittingLogic(scene=slicer_app.scene)
    p = logic.getParameterNode()
    p.inputSequence, p.device, p.bloodT10 = app_loaded["sequence"], "cpu", 1.55
    path = tmp_path / "aif.csv"
    path.write_text("0,0\n10,1\n")
    p.aifSource, p.aifCsvPath = "csv", str(path)
    options = logic.optionsFromParameterNode(p)
    assert options["aifCsv"] == str(path) and "bloodT10_s" not in options and "autoAif" not in options
    settings = logic.prepare(app_loaded["sequence"], **options).settings
    assert (settings.aif_csv, settings.auto_aif, settings.aif_mask, settings.blood_t10_s) == (str(path), None, None,
                                                                                              None)
    p.aifSource, p.autoAifKind = "auto", "vein"
    options = logic.optionsFromParameterNode(p)
    assert options["autoAif"] == "vein" and options["bloodT10_s"] == pytest.approx(1.55) and "aifCsv" not in options
    settings = logic.prepare(app_loaded["sequence"], **options).settings
    assert (settings.auto_aif, settings.aif_csv, settings.blood_t10_s) == ("vein", None, pytest.approx(1.55))
    assert settings.input_function.describe() == "automatic detection (vein)"
