"""The module panels' behaviour, headless: the real widget and Logic classes under Slicer's own Python.

Each test opens a module panel as Slicer does (``slicer_application``: Slicer's parameterNodeWrapper
and ScriptedLoadableModule on a slicer-core scene, Qt widgets as stand-ins of the .ui's classes) on
a small phantom whose acquisition differs from the panels' spin-box defaults (15 deg, 5 ms), then
does what a user does. Truths: the phantom's protocol and ground truth, numpy on its arrays, and
the scene itself (fingerprints of its nodes). Issue 16 items: 3 (header FA/TR, VFA TR), 4 (AIF
segment after a scene reload), 5 (T1 map in the inference panel), 6 (installation errors), 8 (AIF
box, live curve, voxel curve on click), 9 (cleanup stops the worker), 11 (Sample Data), and the
state machine's node deletion and cancel.
"""

import subprocess
import threading

import numpy as np
import pytest
from slicer_application import graft_sample_data, slicer_app  # noqa: F401  (fixture)

import slicer  # noqa: E402

from DCEPKFittingLib import mrml as bridge  # noqa: E402
from DCEPKFittingLib.core.errors import DCEPKInputError  # noqa: E402
from DCEPKFittingLib.core.jobs import raise_if_cancelled  # noqa: E402
from DCEPKFittingLib.kinetics.fit_result import FitStatus  # noqa: E402
from DCEPKFittingLib.sims.phantom import Protocol, make_phantom  # noqa: E402

VFA_ANGLES = (2.0, 5.0, 10.0, 15.0, 20.0)
# Not the panels' spin-box defaults (15 deg, 5 ms): a value taken from the spin box instead of the header shows.
PROTOCOL = dict(fa_deg=25.0, tr_s=0.0035, vfa_tr_s=0.0045, n_frames=30, frame_time_s=6.0)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(2, 24, 24), protocol=Protocol(**PROTOCOL), vfa_flip_angles_deg=VFA_ANGLES, seed=5)


@pytest.fixture
def loaded(slicer_app, phantom):
    return bridge.phantom_to_scene(slicer_app.scene, phantom, "phantom", slicer_app.wired.sequences_logic)


def _effective(given, header):
    return given if given is not None else header


# --------------------------------------------------------------------------- item 3: flip angle and TR
def test_fitting_uses_the_series_header_unless_the_user_ticks_an_override(slicer_app, phantom, loaded):
    widget = slicer_app.create_widget("DCEPKFitting")
    p = widget._parameterNode
    assert p.inputSequence is loaded["sequence"]  # the panel picks the first sequence
    p.aifSource = "population"
    assert widget.ui.applyButton.enabled
    assert widget.ui.acquisitionLabel.text == "flip angle 25 deg (series header); TR 3.5 ms (series header)"
    request = widget.logic.prepare(p.inputSequence, **widget.logic.optionsFromParameterNode(p))
    assert _effective(request.settings.fa_deg, request.series.flip_angle_deg) == PROTOCOL["fa_deg"]
    assert _effective(request.settings.tr_s, request.series.tr_s) == pytest.approx(PROTOCOL["tr_s"])

    widget.ui.flipAngleCheckBox.click()  # the user overrides the flip angle
    widget.ui.flipAngleSpinBox.value = 22.0
    assert widget.ui.acquisitionLabel.text.startswith("flip angle 22 deg (typed)")
    assert widget.logic.optionsFromParameterNode(p)["flipAngle_deg"] == 22.0
    widget.ui.flipAngleCheckBox.click()
    assert widget.logic.optionsFromParameterNode(p)["flipAngle_deg"] is None

    # VFA T1: the VFA series' own TR, from its header.
    p.t10Mode, p.vfaSequence = "vfa", loaded["vfa"]
    assert widget.ui.applyButton.enabled and "VFA TR 4.5 ms (series header)" in widget.ui.acquisitionLabel.text
    request = widget.logic.prepare(p.inputSequence, **widget.logic.optionsFromParameterNode(p))
    assert request.settings.vfa_tr_s == pytest.approx(PROTOCOL["vfa_tr_s"])
    widget.cleanup()


def test_a_series_without_flip_angle_is_never_fitted_with_a_default(slicer_app, loaded):
    loaded["sequence"].RemoveAttribute(bridge.FLIP_ANGLE)
    widget = slicer_app.create_widget("DCEPKFitting")
    p = widget._parameterNode
    p.aifSource = "population"
    assert not widget.ui.applyButton.enabled
    assert "'Flip angle'" in widget.ui.applyButton.toolTip
    assert widget.ui.statusLabel.text == widget.ui.applyButton.toolTip
    with pytest.raises(DCEPKInputError, match="no flip angle in its header: give flipAngle_deg"):
        widget.logic.prepare(p.inputSequence, **widget.logic.optionsFromParameterNode(p))
    widget.ui.flipAngleCheckBox.click()
    assert widget.ui.applyButton.enabled and widget.ui.flipAngleSpinBox.enabled
    widget.cleanup()


# --------------------------------------------------------------------------- item 4: scene reload
def test_the_saved_aif_segment_survives_a_scene_reload(slicer_app, phantom, tmp_path):
    tissues = bridge.segmentation_from_labels(slicer_app.scene, phantom.labels, phantom.series.geometry,
                                              phantom.label_names, "tissues")
    saved_segment = bridge.segment_ids(tissues)[-1]  # not the first: a selector that resets shows
    storage = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "tissues.seg.nrrd"))
    assert storage.WriteData(tissues)
    tissues.SetAndObserveStorageNodeID(storage.GetID())
    widget = slicer_app.create_widget("DCEPKFitting")
    p = widget._parameterNode
    p.aifSource, p.aifSegmentation, p.aifSegmentId = "segment", tissues, saved_segment
    assert widget.ui.aifSegmentSelector.currentSegmentID() == saved_segment
    scene_file = str(tmp_path / "scene.mrml")
    slicer_app.scene.SetURL(scene_file)
    assert slicer_app.scene.Commit(scene_file)

    def reload_scene():  # File > Close Scene, then File > Load Scene of the saved file
        slicer_app.scene.Clear(0)
        slicer_app.scene.SetURL(scene_file)
        assert slicer_app.scene.Import()
        return slicer_app.scene.GetFirstNodeByName("tissues")

    reloaded = reload_scene()  # in the same session, the panel open
    assert bridge.segment_ids(reloaded) == bridge.segment_ids(tissues)
    assert (widget._parameterNode.aifSegmentId, widget.ui.aifSegmentSelector.currentSegmentID()) == \
        (saved_segment, saved_segment)
    widget.cleanup()

    reload_scene()  # in a new session: the panel is opened after the scene was loaded
    fresh = slicer_app.create_widget("DCEPKFitting")
    p = fresh._parameterNode
    assert p.aifSegmentation is not None and p.aifSegmentation.GetName() == "tissues"
    assert p.aifSegmentId == saved_segment, "the AIF segment was replaced by the segmentation's first segment"
    assert fresh.ui.aifSegmentSelector.currentSegmentID() == saved_segment
    assert fresh.ui.applyButton.enabled or "AIF" not in fresh.ui.applyButton.toolTip
    fresh.cleanup()


def test_choosing_a_segmentation_and_a_segment_stores_both(slicer_app, phantom, loaded):
    widget = slicer_app.create_widget("DCEPKFitting")
    p = widget._parameterNode
    selector = widget.ui.aifSegmentSelector
    widget.ui.aifSourceComboBox.setCurrentText("segment")
    tissues, vessel = loaded["tissues"], loaded["aifSegmentation"]
    selector.setCurrentNode(tissues)  # the user picks a segmentation: its first segment is selected
    assert (p.aifSegmentation, p.aifSegmentId) == (tissues, bridge.segment_ids(tissues)[0])
    selector.setCurrentSegmentID(bridge.segment_ids(tissues)[2])  # then a segment
    assert (p.aifSegmentation, p.aifSegmentId) == (tissues, bridge.segment_ids(tissues)[2])
    selector.setCurrentNode(vessel)  # then another segmentation
    assert (p.aifSegmentation, p.aifSegmentId) == (vessel, bridge.segment_ids(vessel)[0])
    assert selector.currentNode() is vessel and widget.ui.applyButton.enabled
    widget.cleanup()


# --------------------------------------------------------------------------- item 5: T1 map for the networks
def test_inference_runs_with_a_t1_map_instead_of_one_t10(slicer_app, phantom, loaded):
    widget = slicer_app.create_widget("DCEPKInference")
    p = widget._parameterNode
    p.t10Mode = "map"
    assert not widget.ui.applyButton.enabled and "T1 map" in widget.ui.applyButton.toolTip
    assert widget.ui.t10MapSelector.enabled and not widget.ui.t10ValueSpinBox.enabled
    t10 = bridge.update_volume_from_array(slicer_app.scene, phantom.truth["T10"], phantom.series.geometry, "T1 map",
                                          units="s", map_name="T10")
    widget.ui.t10MapSelector.setCurrentNode(t10)
    widget.ui.t10MapUnitComboBox.setCurrentText("s")
    assert widget.ui.applyButton.enabled
    request = widget.logic.prepare(p.inputSequence, **widget.logic.optionsFromParameterNode(p))
    np.testing.assert_array_equal(request.t10_s, phantom.truth["T10"].astype(np.float32))
    widget.cleanup()


# --------------------------------------------------------------------------- item 6: installing packages
def test_an_installation_error_is_shown_and_nothing_runs(slicer_app, loaded, tmp_path, monkeypatch):
    module = slicer_app.import_module("DCEPKFitting")
    from DCEPKFittingLib.widgets import module_widget

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("dcepk-package-that-does-not-exist>=1\n")
    monkeypatch.setattr(module_widget, "requirementsFile", lambda: str(requirements))
    installs = []

    def failing_pip_install(requirements, *args, **kwargs):
        installs.append(list(requirements))
        raise subprocess.CalledProcessError(1, ["pip", "install"], "no such package")

    monkeypatch.setattr(slicer.packaging, "pip_install", failing_pip_install)  # under Slicer's own pip_ensure
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: True)
    widget = slicer_app.create_widget("DCEPKFitting", module)
    widget._parameterNode.aifSource = "population"
    widget.onApplyButton()  # a Qt slot: nothing may escape it
    assert installs == [["dcepk-package-that-does-not-exist>=1"]]
    assert slicer_app.errors and "could not be installed" in slicer_app.errors[-1]
    assert "Installing Python packages failed: nothing was run" in widget.ui.statusLabel.text
    assert widget._job is None and widget.ui.applyButton.enabled

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: False)  # the user declines
    widget.onApplyButton()
    assert len(installs) == 1 and widget.ui.statusLabel.text == "Python packages missing: nothing was run."
    widget.cleanup()


# --------------------------------------------------------------------------- item 8: AIF box and voxel curve
def test_a_new_aif_box_is_placed_on_the_series_where_the_user_looks(slicer_app, phantom, loaded):
    widget = slicer_app.create_widget("DCEPKFitting")
    vessel_k, vessel_j, vessel_i = np.argwhere(phantom.aif_mask)[0]
    centre = (phantom.series.geometry.ijk_to_ras() @ np.r_[vessel_i, vessel_j, vessel_k, 1.0])[:3]
    slicer_app.crosshair.SetCrosshairRAS(centre)  # Shift + mouse move over the vessel
    roi = widget.ui.aifRoiSelector.addNodeByUser()  # the selector's "Create new MarkupsROI"
    assert widget._parameterNode.aifRoi is roi and widget.ui.applyButton.enabled
    reference = bridge.reference_volume(phantom.series.spatial_shape, phantom.series.geometry)
    expected = np.zeros(phantom.series.spatial_shape, bool)
    expected[vessel_k, max(vessel_j - 2, 0):vessel_j + 3, max(vessel_i - 2, 0):vessel_i + 3] = True
    np.testing.assert_array_equal(bridge.mask_from_roi(roi, reference), expected)
    widget.cleanup()


def test_the_live_aif_curve_follows_every_change_of_the_box(slicer_app, phantom, loaded):
    widget = slicer_app.create_widget("DCEPKFitting")
    roi = loaded["aifRoi"]
    widget._parameterNode.aifRoi = roi
    transform = slicer_app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    roi.SetAndObserveTransformNodeID(transform.GetID())
    for change in (lambda: roi.SetSize(*(np.array(roi.GetSize()) + 2.0)),    # a handle dragged
                   lambda: transform.SetMatrixTransformToParent(               # the box moved with its transform
                       slicer.util.vtkMatrixFromArray(np.array([[1, 0, 0, -6.0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                                [0, 0, 0, 1.0]])))):
        widget._aifTimer.stop()
        change()
        assert widget._aifTimer.isActive(), "the ROI change did not schedule a redraw"
    widget._aifTimer.timeout.emit()  # the throttle's time has passed
    chart_table = slicer_app.scene.GetNodeByID(widget._aifChart.GetAttribute("DCEPK.Table"))
    reference = bridge.reference_volume(phantom.series.spatial_shape, phantom.series.geometry)
    moved = bridge.mask_from_roi(roi, reference)
    assert moved.any() and not np.array_equal(moved, phantom.aif_mask)
    curve_column = chart_table.GetTable().GetColumn(1)
    assert curve_column.GetName() == f"mean signal, {int(moved.sum())} voxels"
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(chart_table, curve_column.GetName()),
                               phantom.series.signal[moved].mean(axis=0), rtol=1e-5)
    widget.cleanup()


class _SliceView:
    def __init__(self, interactor):
        self._interactor = interactor

    def sliceView(self):
        return self

    def interactor(self):
        return self._interactor


class _LayoutManager:
    """The application's layout manager, as far as the voxel-curve code uses it: slice views with real VTK interactors."""

    def __init__(self):
        import vtk

        self.views = {name: _SliceView(vtk.vtkRenderWindowInteractor()) for name in ("Red", "Yellow", "Green")}

    def sliceViewNames(self):
        return list(self.views)

    def sliceWidget(self, name):
        return self.views[name]


def _press_and_release(interactor, start, end):
    import vtk

    interactor.SetEventPosition(*start)
    interactor.InvokeEvent(vtk.vtkCommand.LeftButtonPressEvent)
    interactor.SetEventPosition(*end)
    interactor.InvokeEvent(vtk.vtkCommand.LeftButtonReleaseEvent)


def test_the_voxel_curve_follows_clicks_not_the_mouse_hovering(slicer_app, phantom, loaded):
    slicer_app.app.layout = _LayoutManager()
    widget = slicer_app.create_widget("DCEPKFitting")
    output = widget.logic.compute(widget.logic.prepare(loaded["sequence"], populationAif="parker", t10_s=1.4,
                                                       mask=loaded["tissues"], method="linear", device="cpu"))
    widget.logic.lastOutput = output
    widget.ui.voxelCurveCheckBox.click()
    k, j, i = np.argwhere(phantom.labels > 0)[5]
    ras = (phantom.series.geometry.ijk_to_ras() @ np.r_[i, j, k, 1.0])[:3]
    slicer_app.crosshair.SetCursorPositionRAS(ras)  # the mouse hovers over the voxel
    assert not slicer_app.plots.calls, "hovering plotted a curve"
    red = slicer_app.app.layout.views["Red"].interactor()
    _press_and_release(red, (40, 30), (80, 30))  # a drag (window/level) is not a click
    assert not slicer_app.plots.calls
    _press_and_release(red, (40, 30), (41, 30))
    assert slicer_app.plots.calls and slicer_app.plots.calls[-1][0] == "ShowChartInLayout"
    table = slicer_app.scene.GetNodeByID(widget._voxelChart.GetAttribute("DCEPK.Table"))
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "measured (mM)"),
                               output.concentration[k, j, i], rtol=1e-6)
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "fitted (mM)"), output.predict((k, j, i)),
                               rtol=1e-6)
    widget.ui.voxelCurveCheckBox.click()  # off: the views' observers are gone
    calls = len(slicer_app.plots.calls)
    _press_and_release(red, (40, 30), (40, 30))
    assert len(slicer_app.plots.calls) == calls
    widget.cleanup()


# --------------------------------------------------------------------------- items 9 and the state machine
def _blocking_compute(finished_after_cancel_s=0.3):
    """A compute that runs until cancelled, then takes a moment to finish its chunk (as a fit does)."""
    def compute(request, progress=None, cancel=None):
        cancel.wait(30)
        threading.Event().wait(finished_after_cancel_s)
        raise_if_cancelled(cancel)
    return compute


def test_cancel_leaves_the_scene_as_it_was_and_cleanup_joins_the_worker(slicer_app, loaded, monkeypatch):
    widget = slicer_app.create_widget("DCEPKFitting")
    p = widget._parameterNode
    p.aifSource = "population"
    monkeypatch.setattr(widget.logic, "compute", _blocking_compute())
    before = slicer_app.wired.fingerprint()
    widget.onApplyButton()
    job = widget._job
    assert job is not None and not widget.ui.applyButton.enabled and widget.ui.cancelButton.enabled
    widget.onCancelButton()
    job.wait(30)
    widget.onJobTimer()
    assert widget.ui.statusLabel.text == "Cancelled: the scene is unchanged."
    assert widget.ui.applyButton.enabled and not widget.ui.cancelButton.enabled
    assert slicer_app.wired.fingerprint() == before  # no node added, none written

    widget.onApplyButton()  # running again when the module is unloaded
    job = widget._job
    widget.cleanup()
    assert not job._thread.is_alive(), "cleanup() returned with the worker still running"
    assert widget._job is None and not widget._jobTimer.isActive()


def test_deleting_an_input_node_disables_apply_with_the_reason(slicer_app, loaded):
    widget = slicer_app.create_widget("DCEPKFitting")
    p = widget._parameterNode
    p.aifRoi = loaded["aifRoi"]
    assert widget.ui.applyButton.enabled
    slicer_app.scene.RemoveNode(loaded["aifRoi"])
    assert p.aifRoi is None and not widget.ui.applyButton.enabled
    assert "Place an AIF ROI" in widget.ui.statusLabel.text
    slicer_app.scene.RemoveNode(loaded["sequence"])
    assert p.inputSequence is None and "Choose the DCE series" in widget.ui.applyButton.toolTip
    widget.cleanup()


# --------------------------------------------------------------------------- item 11: Sample Data
def test_download_sample_loads_the_phantom_through_slicers_sample_data(slicer_app, tmp_path):
    sample_data = graft_sample_data(slicer_app.source)
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(tmp_path / "remote-cache"))
    slicer_app.scene.SetCacheManager(cache)
    module = slicer_app.import_module("DCEPKFitting")
    module.registerSampleData()
    source = sample_data.SampleDataLogic().sourceForSampleName("DCEPK phantom")
    assert source.loadFileTypes == ["SequenceFile"] and source.uris[0].startswith("file://")
    node = sample_data.downloadSample("DCEPK phantom")  # what scripts and tutorials call
    assert node is not None and node.IsA("vtkMRMLSequenceNode") and node.GetName() == "DCEPK phantom"
    expected = make_phantom(vfa_flip_angles_deg=module.PHANTOM_VFA_FLIP_ANGLES_DEG)
    series = bridge.series_from_sequence(node)
    np.testing.assert_array_equal(series.signal, expected.series.signal.astype(np.float32))
    np.testing.assert_allclose(series.times_s, expected.series.times_s, rtol=1e-6)


# --------------------------------------------------------------------------- the whole panel workflow
def test_apply_runs_in_the_background_and_shows_maps_status_and_table(slicer_app, phantom, loaded):
    widget = slicer_app.create_widget("DCEPKFitting")
    p = widget._parameterNode
    p.aifSource, p.method, p.device = "population", "linear", "cpu"
    p.fitMask = p.statisticsSegmentation = loaded["tissues"]
    widget.ui.showFitStatusCheckBox.click()
    widget.onApplyButton()
    assert widget._job is not None and widget.ui.statusLabel.text.startswith("Fitting on")
    widget._job.wait(120)
    widget.onJobTimer()
    assert widget.ui.statusLabel.text.startswith("Done:"), (widget.ui.statusLabel.text, slicer_app.errors)
    nodes = widget.logic.lastNodes
    composite = slicer_app.scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == nodes["Ktrans"].GetID()
    assert composite.GetLabelVolumeID() == nodes["status"].GetID()  # 'Show fit status' ticked
    selection = slicer_app.wired.app_logic.GetSelectionNode()
    assert selection.GetActiveTableID() == nodes["statistics"].GetID()
    assert widget.ui.exportTableButton.enabled and widget.ui.applyButton.enabled
    rows = bridge.table_rows(nodes["statistics"])
    ktrans = slicer.util.arrayFromVolume(nodes["Ktrans"])
    fitted = slicer.util.arrayFromVolume(nodes["status"]) == FitStatus.FITTED   # statistics over fitted voxels
    for row in (r for r in rows if r["map"] == "Ktrans"):
        value = next(v for v, n in phantom.label_names.items() if n == row["segment"])
        inside = (phantom.labels == value) & fitted
        if inside.any():
            assert row["mean"] == pytest.approx(np.nanmean(ktrans[inside]), rel=1e-5)
    widget.ui.showFitStatusCheckBox.click()  # unticked: the label layer is cleared
    assert not composite.GetLabelVolumeID()


# --------------------------------------------------------------------------- issue 20: the input function
def test_the_fitting_panel_offers_csv_and_detection_and_detect_makes_the_aif_segment(slicer_app, phantom, loaded,
                                                                                    tmp_path):
    from DCEPKFittingLib.sims.phantom import VESSEL

    widget = slicer_app.create_widget("DCEPKFitting")
    p = widget._parameterNode
    widget.ui.aifSourceComboBox.setCurrentText("csv")
    assert p.aifSource == "csv" and widget.ui.aifCsvPathLineEdit.enabled and not widget.ui.aifRoiSelector.enabled
    assert not widget.ui.applyButton.enabled and "AIF CSV file" in widget.ui.applyButton.toolTip
    path = tmp_path / "aif.csv"
    times = phantom.series.times_s - phantom.series.times_s[0]
    path.write_text("".join(f"{t:.6f},{c:.9g}\n" for t, c in zip(times, phantom.aif_blood_mM)))
    widget.ui.aifCsvPathLineEdit.text = str(path)   # typed: the parameter node follows
    assert p.aifCsvPath == str(path) and widget.ui.applyButton.enabled
    request = widget.logic.prepare(p.inputSequence, **widget.logic.optionsFromParameterNode(p))
    assert request.settings.aif_csv == str(path) and request.settings.input_function.source() == "csv"

    widget.ui.aifSourceComboBox.setCurrentText("auto")
    assert widget.ui.autoAifKindComboBox.enabled and widget.ui.bloodT10SpinBox.enabled
    assert not widget.ui.aifCsvPathLineEdit.enabled and widget.ui.applyButton.enabled
    widget.ui.autoAifKindComboBox.setCurrentText("artery")
    request = widget.logic.prepare(p.inputSequence, **widget.logic.optionsFromParameterNode(p))
    assert request.settings.auto_aif == "artery" and request.settings.aif_mask is None

    widget.ui.detectAifButton.click()   # the detected voxels become the (editable) AIF segment
    detected = p.aifSegmentation
    assert p.aifSource == "segment" and detected is not None and detected.GetName() == bridge.DETECTED_NAME
    assert widget.ui.aifSegmentSelector.currentNode() is detected
    assert widget.ui.aifSegmentSelector.currentSegmentID() == p.aifSegmentId == bridge.segment_ids(detected)[0]
    assert widget.ui.applyButton.enabled, widget.ui.applyButton.toolTip
    assert slicer_app.plots.calls and slicer_app.plots.calls[-1][0] == "ShowChartInLayout"
    reference = bridge.reference_volume(phantom.series.spatial_shape, phantom.series.geometry)
    artery = bridge.roi_mask(detected, reference, 1)
    assert artery.any() and np.all(phantom.labels[artery] == VESSEL)
    request = widget.logic.prepare(p.inputSequence, **widget.logic.optionsFromParameterNode(p))
    np.testing.assert_array_equal(request.settings.aif_mask, artery)

    # Apply with automatic detection: the detected vessel's chart is shown after the fit, the maps counted
    widget.ui.aifSourceComboBox.setCurrentText("auto")
    p.method, p.device = "linear", "cpu"
    p.fitMask = loaded["tissues"]
    widget.onApplyButton()
    widget._job.wait(120)
    widget.onJobTimer()
    assert widget.ui.statusLabel.text.startswith("Done:"), (widget.ui.statusLabel.text, slicer_app.errors)
    nodes = widget.logic.lastNodes
    maps = [name for name in nodes if name not in bridge.NOT_MAPS]
    assert f"Done: {len(maps)} maps." in widget.ui.statusLabel.text and "automatic detection" in \
        widget.ui.statusLabel.text
    assert nodes["input_function"].GetName() == bridge.DETECTED_NAME
    assert slicer_app.plots.calls[-1] == ("ShowChartInLayout", (nodes["input_function_chart"],))
    widget.cleanup()


def test_the_inference_panel_detects_the_input_function_and_lists_networks_by_mode(slicer_app, phantom, loaded,
                                                                                  untrained_conditioned_models):
    from DCEPKFittingLib.sims.phantom import VESSEL
    from DCEPKInferenceLib.pipeline.inference import DEFAULT_CONDITIONED_MODEL, DEFAULT_MODEL

    widget = slicer_app.create_widget("DCEPKInference")
    p = widget._parameterNode
    assert (p.mode, p.aifSource, p.modelName) == ("aif", "auto", DEFAULT_CONDITIONED_MODEL)
    assert widget.ui.applyButton.enabled and widget.ui.detectAifButton.enabled
    widget.ui.modeComboBox.setCurrentText("aif-free")     # the AIF-free networks, no input function
    assert p.modelName == DEFAULT_MODEL and not widget.ui.aifSourceComboBox.enabled
    assert widget.logic.optionsFromParameterNode(p)["aifSource"] is None
    widget.ui.modeComboBox.setCurrentText("aif")
    widget.ui.aifSourceComboBox.setCurrentText("roi")
    assert not widget.ui.applyButton.enabled and "AIF ROI" in widget.ui.applyButton.toolTip
    assert widget.ui.aifRoiSelector.enabled and widget.ui.aifRoiLabelSpinBox.enabled

    widget.ui.detectAifButton.click()   # the detected voxels become the (editable) AIF ROI
    detected = p.aifRoi
    assert detected is not None and detected.IsA("vtkMRMLSegmentationNode") and p.aifRoiLabel == 1
    assert widget.ui.aifRoiSelector.currentNode() is detected and widget.ui.applyButton.enabled
    reference = bridge.reference_volume(phantom.series.spatial_shape, phantom.series.geometry)
    artery = bridge.roi_mask(detected, reference, 1)
    assert artery.any() and np.all(phantom.labels[artery] == VESSEL)
    assert slicer_app.scene.GetFirstNodeByName(bridge.DETECTED_NAME + "").IsA("vtkMRMLSegmentationNode")
    request = widget.logic.prepare(p.inputSequence, **widget.logic.optionsFromParameterNode(p))
    np.testing.assert_array_equal(request.input_function.aif_mask, artery)
    widget.cleanup()
