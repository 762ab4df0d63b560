"""Progress reporting, cancellation and a small background job runner.

Long-running core functions take two optional keyword arguments:

- ``progress(fraction, message)``: called with a fraction in [0, 1] and a short message;
- ``cancel``: any object with ``is_set()`` (a ``threading.Event``); the function calls
  ``raise_if_cancelled(cancel)`` between chunks and so stops with ``JobCancelledError``
  without returning partial results.

``BackgroundJob`` runs such a function in a worker thread and hands its progress, result or
error to the caller through a queue, so a GUI can poll it from a timer and stay responsive
(torch and numpy release the GIL in their kernels). The Slicer modules use it; so can scripts.
"""

import enum
import queue
import threading
import traceback
from typing import Any, Callable, Optional

from .errors import JobCancelledError

ProgressCallback = Callable[[float, str], None]


def raise_if_cancelled(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise JobCancelledError("cancelled by the user")


class CancelScope:
    """A cancel flag set by its own ``set()`` or by its parent's (the user's cancel, or None).

    A function running work on several threads passes one to them and sets it when it stops for
    any reason (an error, Ctrl-C in the main thread), so the others stop at their next check
    rather than finishing their work for nothing."""

    def __init__(self, parent=None):
        self._parent = parent
        self._own = threading.Event()

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._parent is not None and self._parent.is_set())


def report(progress: Optional[ProgressCallback], fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)


def sub_progress(progress: Optional[ProgressCallback], start: float, stop: float) -> Optional[ProgressCallback]:
    """Map a step's own 0..1 progress onto the [start, stop] part of the whole job."""
    if progress is None:
        return None
    return lambda fraction, message="": progress(start + (stop - start) * fraction, message)


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class BackgroundJob:
    """Run ``function(*args, progress=..., cancel=..., **kwargs)`` in a worker thread.

    Poll with ``poll()`` (returns the progress events since the last poll, and updates
    ``state``); ``cancel()`` asks the function to stop at its next check; ``wait()`` blocks.
    After the end, ``result`` holds the return value, or ``error`` / ``error_traceback`` the
    exception. A cancelled job has ``state == CANCELLED`` and no result.
    """

    def __init__(self, function: Callable[..., Any], *args, name: str = "DCEPK job", **kwargs):
        self._function = function
        self._args = args
        self._kwargs = kwargs
        self._events: "queue.Queue[tuple]" = queue.Queue()
        self._cancel_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.state = JobState.PENDING
        self.fraction = 0.0
        self.message = ""
        self.result = None
        self.error: Optional[BaseException] = None
        self.error_traceback = ""

    def start(self) -> "BackgroundJob":
        self.state = JobState.RUNNING
        self._thread.start()
        return self

    def _progress(self, fraction: float, message: str = "") -> None:
        self._events.put(("progress", fraction, message))

    def _run(self) -> None:
        try:
            value = self._function(*self._args, progress=self._progress, cancel=self._cancel_event,
                                   **self._kwargs)
            raise_if_cancelled(self._cancel_event)
            self._events.put(("finished", value))
        except JobCancelledError:
            self._events.put(("cancelled",))
        except BaseException as exc:  # handed to the caller, who decides how to show it
            self._events.put(("failed", exc, traceback.format_exc()))

    def cancel(self) -> None:
        self._cancel_event.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_event.is_set()

    @property
    def done(self) -> bool:
        return self.state in (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED)

    def poll(self) -> list:
        """Drain pending events; returns the list of (fraction, message) progress updates."""
        updates = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return updates
            kind = event[0]
            if kind == "progress":
                self.fraction, self.message = event[1], event[2]
                updates.append((event[1], event[2]))
            elif kind == "finished":
                self.result, self.state = event[1], JobState.FINISHED
            elif kind == "cancelled":
                self.state = JobState.CANCELLED
            else:
                self.error, self.error_traceback, self.state = event[1], event[2], JobState.FAILED

    def wait(self, timeout: Optional[float] = None) -> JobState:
        self._thread.join(timeout)
        self.poll()
        return self.state


class ConsoleProgress:
    """A progress callback drawing one updating bar on a terminal stream (stderr by default).

    On a stream that is not a terminal (logs, CI) it prints a line per 10 % step instead of
    carriage-return updates, so logs stay readable.
    """

    def __init__(self, label: str = "", stream=None, width: int = 30):
        import sys
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_decile = -1

    def __call__(self, fraction: float, message: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        filled = int(round(fraction * self.width))
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:5.1f}% {message}"
        if self._interactive:
            self.stream.write("\r" + line[:120].ljust(120))
            if fraction >= 1.0:
                self.stream.write("\n")
        else:
            decile = int(fraction * 10)
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(line + "\n")
        self.stream.flush()
