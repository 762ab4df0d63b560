"""The child-process runner (``core.child_process``) with real child processes: small Python programs
that print the progress protocol, fail, start a grandchild, write part of an output or sleep; and
``dcepk fit --progress-format json`` itself. Truths: what the programs were written to do, the
operating system's process table, and the files on disk."""

import io
import json
import os
import signal
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import process_alive

from DCEPKFittingLib.core import child_process as cp
from DCEPKFittingLib.core.errors import DCEPKInputError, JobCancelledError
from DCEPKFittingLib.core.jobs import JobState
from DCEPKFittingLib.workflows import cli


def _python(code):
    """A command running ``code`` (dedented) in a fresh Python."""
    return lambda folder: [sys.executable, "-c", textwrap.dedent(code)]


def _job(tmp_path, *codes, load=None, spans=None, **options):
    spans = spans or [(n / len(codes), (n + 1) / len(codes)) for n in range(len(codes))]
    commands = [cp.ChildCommand(_python(code), start, stop, f"step {n}") for n, (code, (start, stop))
                in enumerate(zip(codes, spans))]
    return cp.ChildProcessJob(commands, load=load or (lambda folder: "loaded"), temp_parent=tmp_path, **options)


def test_progress_lines_round_trip_and_other_lines_are_not_progress():
    for fraction, message in ((0.0, ""), (0.25, "fitted 5 of 20 voxels"), (1.0, 'quotes " and ünïcode')):
        assert cp.parse_progress_line(cp.progress_line(fraction, message) + "\n") == (fraction, message)
    assert cp.parse_progress_line(cp.progress_line(7.0, "clipped")) == (1.0, "clipped")
    for line in ("dcepk: warning: the AIF looks like tissue", "", "{not json dcepk_progress", '{"other": 1}',
                 '{"dcepk_progress": "half"}', '{"dcepk_progress": 1.5}', "[1, 2]"):
        assert cp.parse_progress_line(line) is None, line


def test_json_progress_writes_changes_and_the_end_but_not_every_call():
    stream = io.StringIO()
    progress = cp.JsonProgress(stream, min_interval_s=60.0)
    for n in range(100):
        progress(n / 200, "fitting")       # same message, within the interval: one line
    progress(0.6, "statistics")          # new message: a line
    progress(1.0, "statistics")          # the end: always a line
    lines = [cp.parse_progress_line(line) for line in stream.getvalue().splitlines()]
    assert lines == [(0.0, "fitting"), (0.6, "statistics"), (1.0, "statistics")]


def test_compute_place_rule():
    assert cp.compute_place("child", 1, 1) == "child" and cp.compute_place("thread", 10**9, 100) == "thread"
    big = cp.CHILD_PROCESS_MIN_VOXEL_FRAMES
    assert cp.compute_place("auto", big // 50, 50) == "child"
    assert cp.compute_place("auto", big // 50 - 1, 50) == "thread"
    with pytest.raises(DCEPKInputError, match="compute place 'gpu' unknown"):
        cp.compute_place("gpu", 1, 1)


def test_commands_run_in_order_with_their_share_of_the_progress_and_the_folder_is_removed(tmp_path):
    step = """
        import json, sys
        print("a line of the command's own output")
        for f in (0.0, 0.5, 1.0):
            print(json.dumps({"dcepk_progress": f, "message": "step %s" % f}), file=sys.stderr, flush=True)
        open("done-%d" % len(__import__("os").listdir(".")), "w").close()
    """
    seen_files = []
    job = _job(tmp_path, step, step, spans=[(0.0, 0.4), (0.4, 0.9)],
               load=lambda folder: seen_files.extend(sorted(p.name for p in folder.iterdir())) or 42)
    seen = []
    result = cp.wait_for_job(job.start(), progress=lambda f, m: seen.append((round(f, 6), m)))
    assert result == 42 and job.state == JobState.FINISHED
    assert seen == [(0.0, "step 0.0"), (0.2, "step 0.5"), (0.4, "step 1.0"), (0.4, "step 0.0"), (0.65, "step 0.5"),
                    (0.9, "step 1.0"), (1.0, "loading the results")]
    assert seen_files == ["done-0", "done-1"]  # both ran, in the job's folder, one after the other
    assert not job.folder.exists() and list(tmp_path.iterdir()) == []


def test_a_commands_input_error_is_its_own_message_and_a_failure_keeps_its_output(tmp_path):
    job = _job(tmp_path, """
        import sys
        print("dcepk: error: the mask is empty (no non-zero voxel): draw the region", file=sys.stderr)
        sys.exit(2)
    """).start()
    with pytest.raises(DCEPKInputError, match=r"^the mask is empty \(no non-zero voxel\): draw the region$"):
        cp.wait_for_job(job)
    loads = []
    job = _job(tmp_path, "print('partial work'); raise RuntimeError('boom in torch')",
               load=lambda folder: loads.append(folder)).start()
    with pytest.raises(cp.ChildProcessFailed, match=r"step 0 failed \(exit status 1\): RuntimeError: boom in torch"):
        cp.wait_for_job(job)
    assert "partial work" in job.error.log and "Traceback" in job.error.log
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_cancel_kills_the_whole_process_tree_at_once(tmp_path):
    """A command that started a grandchild and both sleep: cancel stops both within a second."""
    pid_file = tmp_path / "grandchild.pid"
    job = _job(tmp_path / "jobs", f"""
        import json, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        print(json.dumps({{"dcepk_progress": 0.1, "message": "working"}}), file=sys.stderr, flush=True)
        time.sleep(60)
    """)
    (tmp_path / "jobs").mkdir()
    job.start()
    deadline = time.monotonic() + 30
    while not any(f == 0.1 for f, _ in job.poll()) and time.monotonic() < deadline:
        time.sleep(0.02)
    child, grandchild = job.process_id, int(pid_file.read_text())
    assert child and process_alive(grandchild)
    started = time.monotonic()
    job.cancel()
    assert job.wait(5) == JobState.CANCELLED
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"cancel took {elapsed:.2f} s"
    for _ in range(50):  # the grandchild is re-parented and reaped by init once killed
        if not process_alive(grandchild):
            break
        time.sleep(0.02)
    assert not process_alive(child) and not process_alive(grandchild)
    assert list((tmp_path / "jobs").iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL from outside is a POSIX test")
def test_a_child_killed_from_outside_is_reported_and_its_partial_output_never_read(tmp_path):
    """As a crash would: the command wrote part of its output, then died. Nothing is loaded; the kept
    folder shows the partial file was left for removal, and by default the folder is removed."""
    code = """
        import json, sys, time
        open("maps.partial", "w").write("half a map")
        print(json.dumps({"dcepk_progress": 0.5, "message": "fitting"}), file=sys.stderr, flush=True)
        time.sleep(60)
    """
    for keep in (True, False):
        loads = []
        job = _job(tmp_path, code, load=lambda folder: loads.append(folder), keep_folder=keep).start()
        while not job.poll():
            time.sleep(0.02)
        os.kill(job.process_id, signal.SIGKILL)
        with pytest.raises(cp.ChildProcessFailed, match="killed by SIGKILL.*nothing was loaded, the scene is "
                                                        "unchanged"):
            cp.wait_for_job(job)
        assert loads == [] and job.error.returncode == -signal.SIGKILL
        assert job.folder.exists() == keep
        if keep:
            assert [p.name for p in job.folder.iterdir()] == ["maps.partial"]
    assert len(list(tmp_path.iterdir())) == 1  # only the kept folder


def test_cancel_before_the_command_starts_runs_nothing(tmp_path):
    gate = threading.Event()
    ran = tmp_path / "ran"

    def prepare(folder, progress, cancel):
        gate.wait(10)

    job = _job(tmp_path / "jobs", f"open({str(ran)!r}, 'w').close()", prepare=prepare)
    (tmp_path / "jobs").mkdir()
    job.start()
    job.cancel()
    gate.set()
    assert job.wait(10) == JobState.CANCELLED and not ran.exists()
    with pytest.raises(JobCancelledError):
        cp.wait_for_job(job)


def test_dcepk_fit_progress_as_json_lines_and_its_outputs_for_the_logic(tmp_path, capsys):
    """The CLI's side of the protocol: protocol lines on stderr, increasing to 1; with
    --save-concentration the concentration it fitted, and the input function in the summary."""
    from DCEPKFittingLib.io import read_dce, write_dce_series
    from DCEPKFittingLib.pipeline.fit import FitSettings, run_fit
    from DCEPKFittingLib.sims.phantom import make_phantom

    series = write_dce_series(tmp_path / "dce.seq.nrrd", make_phantom(shape=(1, 16, 16), seed=2).series)
    assert cli.main(["fit", str(series), "--population-aif", "parker", "--t10", "1.4", "--method", "linear",
                     "--device", "cpu", "--out", str(tmp_path / "maps"), "--progress-format", "json",
                     "--save-concentration"]) == 0
    lines = capsys.readouterr().err.splitlines()
    progress = [cp.parse_progress_line(line) for line in lines if cp.parse_progress_line(line)]
    assert len(progress) >= 3 and progress[-1][0] == 1.0
    assert [f for f, _ in progress] == sorted(f for f, _ in progress)
    assert not [line for line in lines if "[" in line and "%" in line]  # no progress bar
    summary = json.loads((tmp_path / "maps" / cli.FIT_SUMMARY).read_text())
    direct = run_fit(read_dce(series), FitSettings(population_aif="parker", t10_s=1.4, method="linear", device="cpu"))
    np.testing.assert_allclose(summary["aif_plasma_mM"], direct.aif_plasma_mM, rtol=1e-12)
    saved = read_dce(tmp_path / "maps" / cli.CONCENTRATION_FILE)
    assert saved.kind == "concentration"
    np.testing.assert_array_equal(saved.signal, direct.concentration)
    np.testing.assert_array_equal(saved.times_s, direct.times_s)
