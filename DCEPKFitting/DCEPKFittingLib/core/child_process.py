"""Compute in a child process: the progress-line protocol, killing a process tree, and ``ChildProcessJob``.

Why a child process (after SlicerMONAIAuto3DSeg): a crash in torch or CUDA inside Slicer takes the
application and the user's unsaved scene down with it, and a thread can only stop at its next cancel
check. A child process is killed at once, whole process tree, and the parent reads its outputs only
after it exited successfully, so a cancel, a crash or a kill from outside leaves nothing half-loaded.

The protocol: a ``dcepk`` command run with ``--progress-format json`` writes one JSON object per line,
``{"dcepk_progress": <fraction 0..1>, "message": "..."}`` (``progress_line``); every other line is the
command's own output (warnings, ``dcepk: error: ...``), kept as the job's log. ``parse_progress_line``
reads one line back; the tests drive it directly.

``ChildProcessJob`` is a ``jobs.BackgroundJob`` (``start``, ``poll``, ``cancel``, ``wait``, ``state``,
``result``, ``error``), so the module widgets poll either from a QTimer. In its own thread it
writes the inputs into a new temporary folder (``prepare``), runs the commands one after another
(each its own share of the progress), loads the results (``load``) once all exited with status 0,
and always removes the folder. ``cancel()`` kills the running command's process tree from the
caller's thread: it takes effect at once, not at the next check.

``compute_place`` is the one rule deciding between a child process and a worker thread.
"""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from .errors import DCEPKInputError, JobCancelledError
from .jobs import BackgroundJob, ConsoleProgress, JobState, raise_if_cancelled

PROGRESS_KEY = "dcepk_progress"
PROGRESS_FORMATS = ("bar", "json")
EXIT_INPUT_ERROR = 2      # the dcepk commands' status for bad input (the message is their 'dcepk: error:' line)
EXIT_INTERRUPTED = 130    # a dcepk command stopped by Ctrl-C / its own cancel
ERROR_PREFIX = "dcepk: error: "
LOG_LINES = 200           # lines of a command's output kept for an error report

COMPUTE_PLACES = ("auto", "child", "thread")
# 'auto': a child process from this size on. Starting one costs about 2 s (Python, numpy, torch, the
# files in and out); below it a worker thread finishes first and a crash is unlikely.
CHILD_PROCESS_MIN_VOXEL_FRAMES = 2_000_000


def compute_place(place: str, voxels: int, frames: int) -> str:
    """'child' or 'thread' for ``place`` ('auto', 'child' or 'thread') and a job of ``voxels`` x ``frames``."""
    if place not in COMPUTE_PLACES:
        raise DCEPKInputError(f"compute place {place!r} unknown: use 'auto' (a child process for large jobs), "
                              "'child' or 'thread'")
    if place != "auto":
        return place
    return "child" if int(voxels) * int(frames) >= CHILD_PROCESS_MIN_VOXEL_FRAMES else "thread"


# ----------------------------------------------------------------------------- the progress-line protocol
def progress_line(fraction: float, message: str = "") -> str:
    """One line of the protocol (no newline)."""
    return json.dumps({PROGRESS_KEY: round(min(max(float(fraction), 0.0), 1.0), 5), "message": str(message)})


def parse_progress_line(line: str) -> Optional[Tuple[float, str]]:
    """``(fraction, message)`` of a progress line, or None for any other line (the command's own output)."""
    text = line.strip()
    if not text.startswith("{") or PROGRESS_KEY not in text:
        return None
    try:
        event = json.loads(text)
        fraction = float(event[PROGRESS_KEY])
    except (ValueError, TypeError, KeyError):
        return None
    if not 0.0 <= fraction <= 1.0:
        return None
    return fraction, str(event.get("message", ""))


class JsonProgress:
    """A progress callback writing protocol lines (``--progress-format json``) to ``stream`` (stderr).

    A line is written when the message changes or at most every ``min_interval_s``, and always at 1.0."""

    def __init__(self, stream=None, min_interval_s: float = 0.1):
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval_s = min_interval_s
        self._last = (None, "", 0.0)

    def __call__(self, fraction: float, message: str = "") -> None:
        last_fraction, last_message, last_time = self._last
        now = time.monotonic()
        if (message == last_message and fraction < 1.0 and last_fraction is not None
                and now - last_time < self.min_interval_s):
            return
        self._last = (fraction, message, now)
        self.stream.write(progress_line(fraction, message) + "\n")
        self.stream.flush()


def progress_reporter(progress_format: str, label: str):
    """The progress callback of a ``dcepk`` command: a bar on the terminal, or protocol lines."""
    return JsonProgress() if progress_format == "json" else ConsoleProgress(label)


# ----------------------------------------------------------------------------- processes
def python_environment(paths: Iterable) -> dict:
    """This process's environment with ``paths`` first on the child's PYTHONPATH (in Slicer the module
    folders are on ``sys.path`` only, not in the environment) and its output in UTF-8."""
    env = dict(os.environ)
    entries = [str(Path(p)) for p in paths]
    if env.get("PYTHONPATH"):
        entries.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(entries)
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def start_process(argv: Sequence[str], env: Optional[dict] = None, cwd=None) -> subprocess.Popen:
    """Start ``argv`` as the leader of a new process group (so its whole tree can be killed), output and
    errors in one text stream; on Windows without a console window."""
    options = {}
    if os.name == "nt":
        options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
    else:
        options["start_new_session"] = True
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace", bufsize=1, env=env, cwd=cwd, **options)


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process it started (SIGKILL to its group; ``taskkill /T`` on Windows)."""
    if process.poll() is not None:
        return
    try:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True,
                           creationflags=subprocess.CREATE_NO_WINDOW, check=False)
        else:
            os.killpg(process.pid, signal.SIGKILL)  # start_process made it its group's leader
    except (OSError, subprocess.SubprocessError):
        pass
    if process.poll() is None:
        process.kill()


class ChildProcessFailed(RuntimeError):
    """A child process that crashed, was killed from outside, or failed in an unexpected way."""

    def __init__(self, message: str, returncode: Optional[int] = None, log: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.log = log


def exit_error(label: str, returncode: int, log_lines: Sequence[str]) -> BaseException:
    """The error for a command that ended with ``returncode`` != 0: the command's own message for bad
    input, a clear report for a crash or a kill."""
    log = "\n".join(log_lines)
    reported = [line[len(ERROR_PREFIX):] for line in log_lines if line.startswith(ERROR_PREFIX)]
    if returncode == EXIT_INPUT_ERROR and reported:
        return DCEPKInputError(reported[-1])
    if returncode == EXIT_INTERRUPTED:
        return JobCancelledError(f"{label} was interrupted")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return ChildProcessFailed(
            f"{label} stopped unexpectedly (its process was killed by {name}: out of memory, a crash in torch or "
            "CUDA, or killed from outside); nothing was loaded, the scene is unchanged. Try again, on the CPU or "
            "with a smaller mask", returncode, log)
    last = next((line for line in reversed(log_lines) if line.strip()), "no output")
    return ChildProcessFailed(f"{label} failed (exit status {returncode}): {last}; nothing was loaded, the scene "
                              "is unchanged (the details show its output)", returncode, log)


# ----------------------------------------------------------------------------- the job
@dataclass
class ChildCommand:
    """One command of a job: ``argv(folder)`` gives its command line in the job's temporary folder;
    its progress fills ``[start, stop]`` of the job's; ``label`` names it in messages ('the fit');
    ``success``: the exit statuses that are not an error (``dcepk batch``: 1, some subjects failed)."""
    argv: Callable[[Path], List[str]]
    start: float
    stop: float
    label: str
    success: Tuple[int, ...] = (0,)


class ChildProcessJob(BackgroundJob):
    """Commands run one after another in child processes: a ``jobs.BackgroundJob`` (poll, wait, state,
    result, error) whose ``cancel()`` also kills the running command's process tree, at once.

    ``prepare(folder, progress, cancel)`` writes the inputs into the job's new temporary folder (in the
    job's thread); ``load(folder)`` reads the result after every command exited with status 0. The
    folder (made in ``temp_parent``, default the system's) is removed at the end whatever happened,
    unless ``keep_folder`` (for a bug report). ``env`` is the children's environment. ``returncodes``:
    the exit status of each command run (negative: killed by that signal, as by a cancel). A failed
    command's output is its error's ``log``.
    """

    def __init__(self, commands: Sequence[ChildCommand], load: Callable[[Path], object],
                 prepare: Optional[Callable] = None, env: Optional[dict] = None, temp_parent=None,
                 keep_folder: bool = False, name: str = "DCEPK job"):
        super().__init__(self._work, name=name)
        self._commands = list(commands)
        self._load = load
        self._prepare = prepare
        self._env = env
        self._temp_parent = temp_parent
        self._keep_folder = keep_folder
        self._lock = threading.Lock()
        self._process: Optional[subprocess.Popen] = None
        self.folder: Optional[Path] = None
        self.returncodes: List[int] = []

    def start(self) -> "ChildProcessJob":
        self.folder = Path(tempfile.mkdtemp(prefix="dcepk-job-", dir=self._temp_parent))
        return super().start()

    def cancel(self) -> None:
        """Stop now: the running command's process tree is killed from the caller's thread."""
        with self._lock:
            super().cancel()
            process = self._process
        if process is not None:
            kill_process_tree(process)

    @property
    def process_id(self) -> Optional[int]:
        """The running command's process id (None between commands)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def _work(self, progress, cancel):
        """The job's thread: inputs, commands, outputs; the folder removed whatever happened."""
        try:
            if self._prepare is not None:
                progress(0.0, "writing the inputs of the child process")
                self._prepare(self.folder, progress, cancel)
            for command in self._commands:
                self._run_command(command, progress, cancel)
            raise_if_cancelled(cancel)
            progress(1.0, "loading the results")
            return self._load(self.folder)
        finally:
            if not self._keep_folder:
                _remove_folder(self.folder)

    def _run_command(self, command: ChildCommand, progress, cancel) -> None:
        argv = command.argv(self.folder)
        with self._lock:
            raise_if_cancelled(cancel)
            process = self._process = start_process(argv, env=self._env, cwd=self.folder)
        log = collections.deque(maxlen=LOG_LINES)
        span = command.stop - command.start
        try:
            for line in process.stdout:
                parsed = parse_progress_line(line)
                if parsed is not None:
                    progress(command.start + span * parsed[0], parsed[1])
                elif line.strip():
                    log.append(line.rstrip())
            returncode = process.wait()
            self.returncodes.append(returncode)
        finally:
            process.stdout.close()
            with self._lock:
                self._process = None
        raise_if_cancelled(cancel)  # a cancel kills the process: its exit status says nothing
        if returncode not in command.success:
            raise exit_error(command.label, returncode, list(log))


def _remove_folder(folder: Optional[Path]) -> None:
    """Remove the job's folder; on Windows a killed child may hold its files open for a moment."""
    if folder is None:
        return
    for attempt in range(5):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.1 * (attempt + 1))


def wait_for_job(job, progress=None, cancel=None, poll_s: float = 0.05):
    """Block until ``job`` (started) ends: its progress handed to ``progress``, ``cancel`` (an event) passed
    on to it; returns its result, or raises its error (``JobCancelledError`` when cancelled)."""
    while not job.done:
        if cancel is not None and cancel.is_set() and not job.cancel_requested:
            job.cancel()
        time.sleep(poll_s)
        for fraction, message in job.poll():  # (job.wait would drain the progress events itself)
            if progress is not None:
                progress(fraction, message)
    if job.state == JobState.CANCELLED:
        raise JobCancelledError("cancelled by the user")
    if job.state == JobState.FAILED:
        raise job.error
    return job.result
