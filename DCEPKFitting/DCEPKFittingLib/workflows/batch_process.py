"""``dcepk batch`` in a child process, for callers that must stay responsive (the Slicer module's Logic).

``BatchJob`` is a ``core.jobs.BackgroundJob`` whose thread starts ``python -m DCEPKFittingLib.workflows.cli
batch ... --progress json`` in a process group of its own, reads its JSON progress lines and waits for
it. ``poll()`` (from a GUI timer, or by hand in a console) hands the progress to the caller's
``progress(fraction, message)`` on the polling thread; ``cancel()`` (or the caller's ``cancel`` event)
stops the whole process tree (the batch and its Dask workers: SIGTERM, then SIGKILL after a grace
period). Subjects finished before a cancel are kept; running the same batch again resumes it.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import List, Optional

from ..core.errors import DCEPKInputError, JobCancelledError
from ..core.jobs import BackgroundJob

GRACE_S = 5.0
LIB_PARENT = str(Path(__file__).resolve().parents[2])   # the folder holding DCEPKFittingLib


def batch_command_line(manifest, out_dir, python: Optional[str] = None, **options) -> List[str]:
    """The child's command: ``dcepk batch MANIFEST --out DIR --progress json`` plus ``options``
    (``workers=2`` -> ``--workers 2``, ``force=True`` -> ``--force``)."""
    command = [python or sys.executable, "-m", "DCEPKFittingLib.workflows.cli", "batch", str(manifest),
               "--out", str(out_dir), "--progress", "json"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value not in (None, False):
            command += [flag, str(value)]
    return command


def _stop_tree(process: subprocess.Popen) -> None:
    """End the child and its Dask workers (they share its process group / job tree)."""
    if process.poll() is not None:
        return
    if os.name == "posix":
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    else:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True)
    process.wait()


def start_batch_child(command: List[str], stderr) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (LIB_PARENT, env.get("PYTHONPATH")) if p)
    group = {"start_new_session": True} if os.name == "posix" else \
        {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
                            env=env, **group)


def run_batch_process(manifest, out_dir, progress=None, cancel=None, python: Optional[str] = None,
                      **options) -> dict:
    """Run the batch in a child process and wait for it; returns {exit_code, counts, out_dir, report}.
    A manifest or invocation the child refuses (status 2) raises ``DCEPKInputError`` with its message."""
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    with tempfile.TemporaryFile("w+") as stderr:
        process = start_batch_child(batch_command_line(manifest, out_dir, python, **options), stderr)
        reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)],
                                  daemon=True)
        reader.start()
        counts = {}
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    raise JobCancelledError("batch cancelled; finished subjects are kept")
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    continue
                if line is None:
                    break
                event = _event(line)
                counts = event.get("counts", counts)
                if "fraction" in event and progress is not None:
                    progress(event["fraction"], event.get("message", ""))
        finally:
            _stop_tree(process)
        stderr.seek(0)
        errors = [line.strip() for line in stderr if line.startswith("dcepk: error")]
    if process.returncode == 2:
        raise DCEPKInputError("\n".join(errors) or "dcepk batch refused the manifest or options (status 2)")
    if process.returncode not in (0, 1):
        raise RuntimeError(f"dcepk batch stopped with status {process.returncode}: {' '.join(errors)}")
    return {"exit_code": process.returncode, "counts": counts, "out_dir": str(out_dir),
            "report": str(Path(out_dir) / "report.md")}


def _event(line: str) -> dict:
    try:
        event = json.loads(line)
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


class _AnyOf:
    def __init__(self, *events):
        self._events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


class BatchJob(BackgroundJob):
    """A batch run in the background (see the module's docstring); ``result`` is ``run_batch_process``'s."""

    def __init__(self, manifest, out_dir, progress=None, cancel=None, python: Optional[str] = None, **options):
        self._caller_progress, self._caller_cancel = progress, cancel
        super().__init__(self._run_child, name="DCEPK batch")
        self._batch = (manifest, out_dir, python, options)

    def _run_child(self, progress, cancel):
        manifest, out_dir, python, options = self._batch
        return run_batch_process(manifest, out_dir, progress=progress, cancel=_AnyOf(cancel, self._caller_cancel),
                                 python=python, **options)

    def poll(self) -> list:
        updates = super().poll()
        if self._caller_progress is not None:
            for fraction, message in updates:
                self._caller_progress(fraction, message)
        return updates
