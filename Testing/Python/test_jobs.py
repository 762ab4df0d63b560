"""Background job runner: progress, result, error and cancel paths."""

import threading
import time

import pytest

from DCEPKFittingLib.errors import JobCancelledError
from DCEPKFittingLib.jobs import BackgroundJob, JobState, raise_if_cancelled, sub_progress


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
