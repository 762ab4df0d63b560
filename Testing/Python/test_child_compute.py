"""Both module Logics computing in a real child process (``dcepk fit`` / ``dcepk infer``), headless.

The module files are imported as Slicer imports them (``slicer_application``: Slicer's own
ScriptedLoadableModule and parameterNodeWrapper on a slicer-core scene); each Logic runs with
``computeIn = "child"`` against the same Logic with ``computeIn = "thread"``. Truths: the thread's maps
(themselves tested against the CLI and the phantom's ground truth), the phantom's ground truth, the
scene's fingerprint (every node's ID, class, name, modification time), the process table and the
temporary folder on disk. The children start Python with torch: each run takes about 2-3 s more than
the thread's.
"""

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import process_alive
from slicer_application import slicer_app  # noqa: F401  (fixture)

import slicer  # noqa: E402

from DCEPKFittingLib import mrml as bridge  # noqa: E402
from DCEPKFittingLib.core.child_process import ChildProcessFailed, ChildProcessJob  # noqa: E402
from DCEPKFittingLib.core.errors import JobCancelledError  # noqa: E402
from DCEPKFittingLib.sims.phantom import make_phantom  # noqa: E402

VFA_ANGLES = (2.0, 5.0, 10.0, 15.0, 20.0)
LONG_FIT = dict(model="2cxm", populationAif="parker", t10_s=1.4, device="cpu")  # ~4 s on 2 x 64 x 64 in a thread


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(2, 32, 32), vfa_flip_angles_deg=VFA_ANGLES, seed=3)


@pytest.fixture
def loaded(slicer_app, phantom):
    return bridge.phantom_to_scene(slicer_app.scene, phantom, "phantom", slicer_app.wired.sequences_logic)


def _logic(slicer_app, module_name, place, jobs_folder=None):
    logic = getattr(slicer_app.import_module(module_name), f"{module_name}Logic")(scene=slicer_app.scene)
    logic.computeIn = place
    if jobs_folder is not None:
        jobs_folder.mkdir(exist_ok=True)
        logic.childTemporaryFolder = str(jobs_folder)
    return logic


def _arrays(nodes):
    return {name: slicer.util.arrayFromVolume(node).copy() for name, node in nodes.items() if name != "statistics"}


def _recording_jobs(logic):
    """The jobs the Logic starts, kept for the test (the Logic's own run() waits for them)."""
    jobs, start = [], logic.startCompute
    logic.startCompute = lambda request: jobs.append(start(request)) or jobs[-1]
    return jobs


# --------------------------------------------------------------------------- the same maps as the thread
def test_a_fit_in_a_child_process_gives_the_maps_of_the_thread(slicer_app, phantom, loaded, tmp_path):
    segmentation = loaded["aifSegmentation"]
    options = dict(model="etofts", aifSegmentation=segmentation, aifSegmentId=bridge.segment_ids(segmentation)[0],
                   t10_s=None, vfaSequence=loaded["vfa"], r1_per_mM_s=phantom.protocol.r1_per_mM_s,
                   hematocrit=phantom.protocol.hct, mask=loaded["tissues"], statisticsSegmentation=loaded["tissues"],
                   device="cpu")
    thread = _logic(slicer_app, "DCEPKFitting", "thread")
    in_thread = _arrays(thread.run(loaded["sequence"], outputPrefix="thread", **options))
    child = _logic(slicer_app, "DCEPKFitting", "child", tmp_path / "jobs")
    jobs, seen = _recording_jobs(child), []
    nodes = child.run(loaded["sequence"], outputPrefix="child", progress=lambda f, m: seen.append((f, m)), **options)
    assert len(jobs) == 1 and isinstance(jobs[0], ChildProcessJob) and jobs[0].returncodes == [0, 0]  # t1map, fit
    assert set(nodes) == set(in_thread) | {"statistics"}
    got = _arrays(nodes)
    np.testing.assert_array_equal(got["T10_s"], in_thread["T10_s"])
    for name in ("status", "selected_model"):
        np.testing.assert_array_equal(got[name], in_thread[name])
    for name, expected in in_thread.items():  # the fit's T10 passed through a float32 file: float32 rounding
        assert got[name].dtype == np.float32 or got[name].dtype == expected.dtype, name
        np.testing.assert_allclose(got[name], expected, rtol=2e-5, atol=1e-7, equal_nan=True, err_msg=name)
    rim = phantom.labels == next(v for v, n in phantom.label_names.items() if "rim" in n)
    assert np.median(np.abs(got["Ktrans"][rim] - phantom.truth["Ktrans"][rim]) / phantom.truth["Ktrans"][rim]) < 0.15
    rows = {(r["segment"], r["map"]): r for r in bridge.table_rows(nodes["statistics"])}
    thread_rows = bridge.table_rows(thread.lastNodes["statistics"])
    assert len(rows) == len(thread_rows)
    for row in thread_rows:
        assert rows[(row["segment"], row["map"])]["mean"] == pytest.approx(row["mean"], rel=1e-4, nan_ok=True)
    # The child's progress reached the Logic's caller, from its own steps to the end.
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and any("voxels" in m for _, m in seen)
    # The voxel plot after a child's fit: measured and fitted curves as after the thread's.
    k, j, i = np.argwhere(rim)[3]
    ras = (phantom.series.geometry.ijk_to_ras() @ np.r_[i, j, k, 1.0])[:3]
    (_, times, curves), (_, thread_times, thread_curves) = child.voxelCurves(ras), thread.voxelCurves(ras)
    np.testing.assert_array_equal(times, thread_times)
    for name, curve in thread_curves.items():
        np.testing.assert_allclose(curves[name], curve, rtol=1e-4, atol=1e-6, err_msg=name)
    assert list((tmp_path / "jobs").iterdir()) == []  # the temporary folder is gone
    # (with a fixed T10, no T1 map through a file, the maps are the thread's to the last bit: the module's
    # self-test DCEPKFittingTest.test_FitInChildProcess checks it, here in test_slicer_conformance)


def test_csv_and_automatic_input_functions_reach_the_child_and_come_back_as_in_the_thread(slicer_app, phantom, loaded,
                                                                                       tmp_path):
    """``dcepk fit`` in the child gets the CSV file and ``--auto-aif`` (command_line_arguments), and an
    automatic run's detected voxels and curve come back from its files into the scene as the thread's do."""
    times = phantom.series.times_s - phantom.series.times_s[0]
    path = tmp_path / "aif.csv"
    path.write_text("time (s),concentration (mM)\n" + "".join(f"{t:.6f},{c:.9g}\n"
                                                              for t, c in zip(times, phantom.aif_blood_mM)))
    common = dict(model="etofts", t10_s=1.3, r1_per_mM_s=phantom.protocol.r1_per_mM_s, hematocrit=phantom.protocol.hct,
                  mask=loaded["tissues"], device="cpu")
    thread = _logic(slicer_app, "DCEPKFitting", "thread")
    child = _logic(slicer_app, "DCEPKFitting", "child", tmp_path / "jobs")
    for source in (dict(autoAif="artery", bloodT10_s=1.7), dict(aifCsv=str(path))):
        jobs = _recording_jobs(child)
        in_thread = thread.run(loaded["sequence"], outputPrefix="thread", **common, **source)
        expected = {name: slicer.util.arrayFromVolume(node).copy() for name, node in in_thread.items()
                    if name not in bridge.NOT_MAPS}
        thread_output = thread.lastOutput
        nodes = child.run(loaded["sequence"], outputPrefix="child", **common, **source)
        assert len(jobs) == 1 and isinstance(jobs[0], ChildProcessJob) and jobs[0].returncodes == [0]
        np.testing.assert_allclose(child.lastOutput.aif_plasma_mM, thread_output.aif_plasma_mM, rtol=1e-6)
        assert child.lastOutput.messages == thread_output.messages   # the input function and detection notes
        for name, array in expected.items():
            np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes[name]), array, rtol=2e-5, atol=1e-7,
                                       equal_nan=True, err_msg=name)
        if "autoAif" in source:
            assert thread_output.settings.blood_t10_s == 1.7 and "automatic detection (artery)" in \
                child.lastOutput.messages[-1]
            found = thread_output.input_function.label_map
            assert (found == 1).any() and np.all(phantom.aif_mask[found == 1])   # on the phantom's vessel
            np.testing.assert_array_equal(child.lastOutput.input_function.label_map, found)
            np.testing.assert_allclose(child.lastOutput.input_function.blood_mM, thread_output.input_function.blood_mM,
                                       rtol=1e-5)
            detected = nodes["input_function"]
            assert detected.GetName() == bridge.DETECTED_NAME and nodes["input_function_chart"] is not None
            reference = bridge.reference_volume(phantom.series.spatial_shape, phantom.series.geometry)
            np.testing.assert_array_equal(bridge.roi_mask(detected, reference, 1), found == 1)
        else:
            np.testing.assert_allclose(child.lastOutput.aif_plasma_mM, phantom.aif_plasma_mM, rtol=1e-6, atol=1e-9)
            assert "input_function" not in nodes
    assert list((tmp_path / "jobs").iterdir()) == []


def test_an_inference_in_a_child_process_gives_the_result_of_the_thread(slicer_app, phantom, loaded, tmp_path):
    """``dcepk infer`` with the network's own mask, then ``dcepk fit`` on the voxels it inferred."""
    from DCEPKInferenceLib.nn.model_store import list_models

    if not any(card["name"] == "hetero_encoder" for card in list_models()):
        pytest.fail("the shipped hetero_encoder weights are missing from DCEPKInference/Resources/Models")
    options = dict(modelName="hetero_encoder", device="cpu", t10_s=1.2, uncertaintyThreshold=0.5,
                   compareWithFit=True, segmentationNode=loaded["tissues"])
    thread = _logic(slicer_app, "DCEPKInference", "thread")
    in_thread = _arrays(thread.run(loaded["sequence"], outputPrefix="thread", **options))
    child = _logic(slicer_app, "DCEPKInference", "child", tmp_path / "jobs")
    jobs = _recording_jobs(child)
    nodes = child.run(loaded["sequence"], outputPrefix="child", **options)
    assert jobs[0].returncodes == [0, 0]  # infer, then the comparison fit
    got = _arrays(nodes)
    assert set(got) == set(in_thread) and {"Ktrans_sd", "fit_Ktrans"} <= set(got)
    for name, expected in in_thread.items():
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
    np.testing.assert_array_equal(child.lastResult.inference.estimated, thread.lastResult.inference.estimated)
    assert child.lastResult.messages == thread.lastResult.messages
    assert child.lastResult.inference.device == thread.lastResult.inference.device == "cpu"
    rows, thread_rows = bridge.table_rows(nodes["statistics"]), bridge.table_rows(thread.lastNodes["statistics"])
    assert [r["map"] for r in rows] == [r["map"] for r in thread_rows]
    for row, thread_row in zip(rows, thread_rows):
        assert row["mean"] == pytest.approx(thread_row["mean"], rel=1e-6, nan_ok=True)
        assert row["excluded_fraction"] == pytest.approx(thread_row["excluded_fraction"], nan_ok=True)
    assert list((tmp_path / "jobs").iterdir()) == []


# --------------------------------------------------------------------------- cancel and a crash
@pytest.fixture
def long_fit(slicer_app, tmp_path):
    """A fit of seconds (2CXM on 2 x 64 x 64 voxels) by a Logic computing in a child process."""
    phantom = make_phantom(shape=(2, 64, 64), seed=4)
    nodes = bridge.phantom_to_scene(slicer_app.scene, phantom, "long", slicer_app.wired.sequences_logic)
    logic = _logic(slicer_app, "DCEPKFitting", "child", tmp_path / "jobs")
    return logic, nodes["sequence"], _recording_jobs(logic), tmp_path / "jobs"


def test_cancel_of_a_fit_in_a_child_process_takes_effect_within_a_second(slicer_app, long_fit):
    logic, sequence, jobs, jobs_folder = long_fit
    before = slicer_app.wired.fingerprint()
    cancel, at = threading.Event(), {}

    def progress(fraction, message):
        if fraction >= 0.1 and not cancel.is_set():  # the child reads its inputs and computes
            at.update(pid=jobs[0].process_id, time=time.monotonic(), message=message)
            cancel.set()

    with pytest.raises(JobCancelledError):
        logic.run(sequence, progress=progress, cancel=cancel, **LONG_FIT)
    elapsed = time.monotonic() - at["time"]
    assert elapsed < 1.0, f"the cancel took {elapsed:.2f} s"
    assert at["pid"] and not process_alive(at["pid"])
    if os.name != "nt":
        assert jobs[0].returncodes == [-signal.SIGKILL], "the child was not running the fit when cancelled"
    assert slicer_app.wired.fingerprint() == before  # no node added, none modified
    assert list(jobs_folder.iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL from outside is a POSIX test")
def test_a_child_process_killed_mid_fit_fails_clearly_and_leaves_no_output_and_the_scene_unchanged(slicer_app,
                                                                                                  long_fit):
    logic, sequence, jobs, jobs_folder = long_fit
    logic.computeIn = "thread"  # an earlier result the failed run would have updated
    earlier = logic.run(sequence, outputPrefix="earlier", populationAif="parker", t10_s=1.4, method="linear",
                        device="cpu")
    logic.computeIn = "child"
    earlier_ktrans = slicer.util.arrayFromVolume(earlier["Ktrans"]).copy()
    before = slicer_app.wired.fingerprint()
    outputs_at_kill = []

    def progress(fraction, message):
        job = jobs[-1]
        if fraction >= 0.1 and job.process_id and not outputs_at_kill:
            outputs_at_kill.append(sorted(p.name for p in (job.folder / "maps").glob("*"))
                                   if (job.folder / "maps").exists() else [])
            os.kill(job.process_id, signal.SIGKILL)  # as a crash in torch or CUDA, or the OOM killer, would

    with pytest.raises(ChildProcessFailed, match="the fit stopped unexpectedly .*killed by SIGKILL.*scene is "
                                                 "unchanged"):
        logic.run(sequence, outputPrefix="earlier", progress=progress, **LONG_FIT)
    assert outputs_at_kill == [[]]  # the maps are published only when the fit is whole
    assert slicer_app.wired.fingerprint() == before
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(earlier["Ktrans"]), earlier_ktrans)
    assert list(jobs_folder.iterdir()) == []  # and nothing of the killed run is left on disk


# --------------------------------------------------------------------------- the panel
def test_the_panels_cancel_button_kills_the_child_within_a_second_and_leaves_the_scene(slicer_app, long_fit):
    """Apply, the QTimer polling the job's queue (its ticks called here), Cancel."""
    _, sequence, _, jobs_folder = long_fit
    widget = slicer_app.create_widget("DCEPKFitting")
    widget.logic.computeIn, widget.logic.childTemporaryFolder = "child", str(jobs_folder)
    p = widget._parameterNode
    p.inputSequence, p.aifSource, p.model, p.device = sequence, "population", "2cxm", "cpu"
    before = slicer_app.wired.fingerprint()
    widget.onApplyButton()
    job = widget._job
    assert isinstance(job, ChildProcessJob) and widget.ui.statusLabel.text.endswith("(in a separate process)")
    assert widget._jobTimer.isActive() and widget.ui.cancelButton.enabled
    deadline = time.monotonic() + 60
    while widget.ui.progressBar.value < 10 and time.monotonic() < deadline:  # the child's progress reaches the bar
        time.sleep(0.05)
        widget.onJobTimer()
    pid, started = job.process_id, time.monotonic()
    assert pid and widget.ui.progressBar.value >= 10
    widget.ui.cancelButton.click()
    while widget._job is not None and time.monotonic() - started < 5:
        time.sleep(0.05)
        widget.onJobTimer()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"the panel showed the cancel after {elapsed:.2f} s"
    assert widget.ui.statusLabel.text == "Cancelled: the scene is unchanged."
    assert widget.ui.applyButton.enabled and not widget.ui.cancelButton.enabled and not widget._jobTimer.isActive()
    assert not process_alive(pid) and list(jobs_folder.iterdir()) == []
    assert slicer_app.wired.fingerprint() == before
    widget.cleanup()


# --------------------------------------------------------------------------- the child's interpreter
def test_the_child_runs_on_pythonslicer_in_slicer_and_on_this_python_elsewhere(monkeypatch, tmp_path):
    """As Slicer's own slicer.util.pythonSlicerModule finds it: PythonSlicer on the PATH (the application
    puts it there), else in the application's bin folder; outside Slicer this interpreter. In Slicer,
    sys.executable is the application, which cannot run ``-m``: refused with what to set."""
    import shutil
    import sys
    import types

    from DCEPKFittingLib.core.errors import DCEPKInputError
    from DCEPKFittingLib.mrml import child_fit

    assert child_fit.child_python("/opt/python3") == "/opt/python3"  # the Logic's pythonExecutable
    monkeypatch.setattr(shutil, "which", lambda name: "/Slicer/bin/PythonSlicer" if name == "PythonSlicer" else None)
    assert child_fit.child_python() == "/Slicer/bin/PythonSlicer"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    home = tmp_path / "Slicer-5.8"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")).write_text("")
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(slicerHome=str(home)), raising=False)
    assert child_fit.child_python() == str(home / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(slicerHome=str(tmp_path / "elsewhere")))
    monkeypatch.setattr(sys, "executable", str(home / "Slicer"))
    with pytest.raises(DCEPKInputError, match="pythonExecutable.*computeIn = 'thread'"):
        child_fit.child_python()
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3.11")
    assert child_fit.child_python() == "/usr/bin/python3.11"
