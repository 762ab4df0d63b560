"""The fitting module's Logic runs ``dcepk batch`` on a manifest in the background (child process), with
progress and cancel, as from Slicer's Python console (Slicer's own Python source, see slicer_application)."""

import threading
import time

import pytest

from conftest import import_or_skip
from batch_cohort import make_subject, read_rows, subject_row, truth_median, write_manifest

import_or_skip("distributed", "dcepk batch runs on Dask (pip install -e '.[test]')")
psutil = import_or_skip("psutil", "installed with dask.distributed")

from slicer_application import slicer_app  # noqa: E402,F401  (fixture)
from DCEPKFittingLib.core.jobs import JobState  # noqa: E402

QUICK = dict(workers=1, no_processes=True, dashboard_address="none")


def _wait(job, timeout_s=180.0):
    end = time.time() + timeout_s
    while not job.done and time.time() < end:
        job.poll()   # what a qt.QTimer does in Slicer
        time.sleep(0.1)
    assert job.done, "the batch did not end"


def test_logic_runs_a_batch_in_the_background_with_progress(slicer_app, tmp_path):
    for seed, name in ((1, "a"), (2, "b")):
        make_subject(tmp_path / name, seed)
    manifest = write_manifest(tmp_path / "cohort.csv", [subject_row("a"), subject_row("b", aif="parker")])
    logic = slicer_app.import_module("DCEPKFitting").DCEPKFittingLogic(scene=slicer_app.scene)
    reports = []
    job = logic.runBatch(str(manifest), str(tmp_path / "out"), progress=lambda f, m: reports.append((f, m)), **QUICK)
    assert not job.done   # returned at once: the batch runs in a child process
    _wait(job)
    assert job.state == JobState.FINISHED, job.error
    assert job.result["exit_code"] == 0 and job.result["counts"]["done"] == 2
    assert reports[-1][0] == 1.0 and any(f == 1.0 and "2 done (0 up to date), 0 failed" in m for f, m in reports)
    # the same call again, blocking this time: the batch resumes, every subject up to date
    again = logic.runBatch(str(manifest), str(tmp_path / "out"), wait=True, **QUICK)
    assert again["exit_code"] == 0 and again["counts"]["up to date"] == 2
    rim = [r for r in read_rows(tmp_path / "out" / "cohort_statistics.csv")
           if (r["subject"], r["map"], r["label"]) == ("a", "Ktrans", "4")]
    assert float(rim[0]["median"]) == pytest.approx(truth_median(tmp_path / "a", "Ktrans"), rel=0.12)


def test_cancel_stops_the_batch_and_its_process_tree_and_keeps_finished_subjects(slicer_app, tmp_path):
    names = ("a", "b", "c", "d")
    for seed, name in enumerate(names, start=1):
        make_subject(tmp_path / name, seed)
    manifest = write_manifest(tmp_path / "cohort.csv", [subject_row(n) for n in names])
    logic = slicer_app.import_module("DCEPKFitting").DCEPKFittingLogic(scene=slicer_app.scene)
    cancel = threading.Event()
    job = logic.runBatch(str(manifest), str(tmp_path / "out"), cancel=cancel, **QUICK)
    while "1 done" not in job.message and not job.done:
        job.poll()
        time.sleep(0.02)
    cancel.set()
    _wait(job, 30.0)
    assert job.state == JobState.CANCELLED
    assert not psutil.Process().children(recursive=True)   # the batch and its workers are gone
    finished = [n for n in names if (tmp_path / "out" / "subjects" / f"sub-{n}" / "run.json").is_file()]
    assert 1 <= len(finished) < len(names)


def test_a_child_status_listed_as_success_finishes_the_job_and_others_fail_it(tmp_path):
    """``dcepk batch`` exits 1 when some subjects failed: the job loads its results, a crash still fails it."""
    import sys
    from DCEPKFittingLib.core.child_process import ChildCommand, ChildProcessFailed, ChildProcessJob, wait_for_job

    def job(status, success):
        argv = lambda folder: [sys.executable, "-c", f"import sys; print('ran'); sys.exit({status})"]  # noqa: E731
        return ChildProcessJob([ChildCommand(argv, 0.0, 1.0, "the batch", success=success)],
                               load=lambda folder: "loaded").start()

    assert wait_for_job(job(1, (0, 1))) == "loaded"
    with pytest.raises(ChildProcessFailed, match="exit status 1"):
        wait_for_job(job(1, (0,)))
    with pytest.raises(ChildProcessFailed, match="exit status 3"):
        wait_for_job(job(3, (0, 1)))
