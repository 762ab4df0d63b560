"""Background job runner: progress, result, error and cancel paths."""

import threading
import time

import numpy as np
import pytest

from DCEPKFittingLib.core.errors import JobCancelledError
from DCEPKFittingLib.core.jobs import BackgroundJob, JobState, raise_if_cancelled, sub_progress


def _sum_in_chunks(values, progress=None, cancel=None, gate=None):
    total = 0
    for index, value in enumerate(values):
        if gate is not None:
            gate.wait(5)
        raise_if_cancelled(cancel)
        total += value
        progress((index + 1) / len(values), f"chunk {index + 1}")
    return total


def test_job_reports_progress_and_result():
    job = BackgroundJob(_sum_in_chunks, list(range(10))).start()
    assert job.wait(10) is JobState.FINISHED
    assert job.result == 45
    assert job.fraction == pytest.approx(1.0)
    assert job.message == "chunk 10"


def test_job_error_is_handed_to_caller():
    def fails(progress=None, cancel=None):
        raise ValueError("bad input named here")

    job = BackgroundJob(fails).start()
    assert job.wait(10) is JobState.FAILED
    assert isinstance(job.error, ValueError) and "bad input" in str(job.error)
    assert "ValueError" in job.error_traceback and job.result is None


def test_cancel_stops_between_chunks_without_result():
    gate = threading.Event()
    job = BackgroundJob(_sum_in_chunks, list(range(100)), gate=gate).start()
    job.cancel()
    gate.set()
    assert job.wait(10) is JobState.CANCELLED
    assert job.result is None and job.error is None


def test_cancel_after_last_chunk_still_discards_result():
    # A cancel that arrives while the function returns must not publish its result.
    def slow_return(progress=None, cancel=None):
        time.sleep(0.2)
        return "late"

    job = BackgroundJob(slow_return).start()
    job.cancel()
    assert job.wait(10) is JobState.CANCELLED and job.result is None


def test_sub_progress_maps_ranges():
    seen = []
    step = sub_progress(lambda f, m: seen.append((round(f, 6), m)), 0.5, 0.75)
    step(0.0, "a")
    step(1.0, "b")
    assert seen == [(0.5, "a"), (0.75, "b")]
    with pytest.raises(JobCancelledError):
        event = threading.Event()
        event.set()
        raise_if_cancelled(event)


# --- cancel reaches work that is already running (issue 17) ---------------------------------------
class _CancelAfter:
    """A cancel flag that turns on at its ``n``-th query (a user pressing Cancel mid-way)."""

    def __init__(self, n):
        self.n, self.queries = n, 0

    def is_set(self):
        self.queries += 1
        return self.queries >= self.n


def test_a_cancel_reaches_the_layers_of_a_network_within_one_batch():
    """One batch of all voxels: the cancel is seen inside it (each layer checks), not after it."""
    from DCEPKFittingLib.sims.phantom import make_phantom
    from DCEPKInferenceLib.pipeline.inference import run_inference
    phantom = make_phantom((1, 32, 32), snr=None, seed=2)
    cancel = _CancelAfter(6)
    with pytest.raises(JobCancelledError):
        run_inference(phantom.series, "hetero_encoder_fast", mask=phantom.labels > 0, device="cpu",
                      t10_s=phantom.truth["T10"], r1_per_mM_s=phantom.protocol.r1_per_mM_s,
                      batch_voxels=10**6, cancel=cancel)
    assert cancel.queries == 6  # the batch loop itself checks once before the batch: the rest were layers
    done = run_inference(phantom.series, "hetero_encoder_fast", mask=phantom.labels > 0, device="cpu",
                         t10_s=phantom.truth["T10"], r1_per_mM_s=phantom.protocol.r1_per_mM_s,
                         cancel=threading.Event())  # the checks are gone again: the network still runs
    assert np.isfinite(done.maps["Ktrans"][phantom.labels > 0]).all()


def test_a_cancel_reaches_a_running_fit_chunk_within_a_second():
    """A 2CXM chunk takes several seconds; the cancel arrives while it runs and is seen at the next
    block of the iterations (the machine is shared: 2 s allowed for the 1 s target)."""
    from DCEPKFittingLib.kinetics.model import TracerKineticModel
    from DCEPKFittingLib.sims.phantom import make_phantom
    phantom = make_phantom((1, 96, 96), snr=30.0, seed=1)
    curves = phantom.concentration_mM.reshape(-1, phantom.series.n_frames)[(phantom.labels > 0).ravel()]
    curves = np.tile(curves, (4, 1))  # ~10,000 curves x 3 starts: one chunk, seconds per stage
    model = TracerKineticModel(phantom.series.times_s, phantom.aif_plasma_mM, "2cxm")
    job = BackgroundJob(model.fit, curves).start()
    deadline = time.monotonic() + 60
    while not job.poll() and time.monotonic() < deadline:  # the first progress report: the fit has begun
        time.sleep(0.05)
    time.sleep(1.5)
    asked = time.monotonic()
    job.cancel()
    assert job.wait(20) is JobState.CANCELLED
    assert time.monotonic() - asked < 2.0


CTRL_C_CHILD = """
import sys
from DCEPKFittingLib.workflows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_dcepk_fit_and_its_worker_chunks_within_a_second(tmp_path):
    """Ctrl-C in the main thread used to wait for every running chunk to finish (10-55 s)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from DCEPKFittingLib.workflows.cli import main
    root = Path(__file__).resolve().parents[2]
    assert main(["phantom", "--out", str(tmp_path / "p"), "--shape", "2", "96", "96", "--frames", "40",
                 "--vfa-flip-angles"]) == 0
    argv = ["fit", str(tmp_path / "p" / "dce.seq.nrrd"), "--model", "2cxm", "--aif-roi",
            str(tmp_path / "p" / "aif_mask.nii.gz"), "--t10", str(tmp_path / "p" / "truth" / "T10.nii.gz"),
            "--mask", str(tmp_path / "p" / "labels.nii.gz"), "--out", str(tmp_path / "maps")]
    env = dict(os.environ, PYTHONPATH=f"{root / 'DCEPKFitting'}:{root / 'DCEPKInference'}")
    child = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, *argv], stderr=subprocess.PIPE, text=True, env=env)
    for line in child.stderr:
        if "input function" in line:  # the fit starts next
            break
    time.sleep(2.0)
    asked = time.monotonic()
    child.send_signal(signal.SIGINT)
    answered = None
    for line in child.stderr:
        if "interrupted" in line and answered is None:
            answered = time.monotonic() - asked
    assert child.wait(30) == 130
    assert answered is not None and answered < 2.0, answered
    assert not (tmp_path / "maps").exists()
