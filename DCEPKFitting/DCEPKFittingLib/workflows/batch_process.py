"""``dcepk batch`` in a child process, for callers that must stay responsive (the Slicer module's Logic).

``batch_job`` is a ``core.child_process.ChildProcessJob`` running ``python -m DCEPKFittingLib.workflows.cli
batch MANIFEST --out DIR --progress-format json``: ``poll()`` it (from a GUI timer, or by hand in a
console) for progress, ``cancel()`` it to kill the batch and its Dask workers at once (subjects finished
before are kept; the same batch run again resumes). Its ``result``: the exit status (0 every subject
finished, 1 some failed) and the counts of the batch record.
"""

import json
from pathlib import Path
from typing import List

from ..core.child_process import ChildCommand, ChildProcessJob, python_environment
from .batch import EXIT_ALL_FINISHED, EXIT_SOME_FAILED
from .batch_report import BATCH_RECORD, REPORT

LIB_PARENT = Path(__file__).resolve().parents[2]   # the folder holding DCEPKFittingLib
CLI_MODULE = "DCEPKFittingLib.workflows.cli"        # `dcepk`, run as `python -m` (Slicer installs no script)


def batch_command_line(python: str, manifest, out_dir, **options) -> List[str]:
    """``dcepk batch MANIFEST --out DIR --progress-format json`` plus ``options`` (``workers=2`` ->
    ``--workers 2``, ``force=True`` -> ``--force``)."""
    command = [python, "-m", CLI_MODULE, "batch", str(manifest), "--out", str(out_dir), "--progress-format", "json"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value not in (None, False):
            command += [flag, str(value)]
    return command


class BatchJob(ChildProcessJob):
    """The batch's job; ``poll()`` also hands progress to the caller's ``progress(fraction, message)`` and
    turns the caller's ``cancel`` event (when set) into ``cancel()``."""

    def __init__(self, commands, load, progress=None, cancel=None, **options):
        super().__init__(commands, load, **options)
        self._caller_progress, self._caller_cancel = progress, cancel

    def poll(self) -> list:
        if self._caller_cancel is not None and self._caller_cancel.is_set() and not self.cancel_requested:
            self.cancel()
        updates = super().poll()
        if self._caller_progress is not None:
            for fraction, message in updates:
                self._caller_progress(fraction, message)
        return updates


def batch_job(python: str, manifest, out_dir, progress=None, cancel=None, **options) -> BatchJob:
    """The (not yet started) job of ``dcepk batch`` on ``manifest`` into ``out_dir`` (see the module)."""
    manifest, out_dir = Path(manifest).resolve(), Path(out_dir).resolve()   # the child runs in a temporary folder
    command = ChildCommand(lambda folder: batch_command_line(python, manifest, out_dir, **options), 0.0, 1.0,
                           "the batch", success=(EXIT_ALL_FINISHED, EXIT_SOME_FAILED))
    job = BatchJob([command], load=lambda folder: _summary(job, out_dir), progress=progress, cancel=cancel,
                   env=python_environment([LIB_PARENT]), name="DCEPK batch (child process)")
    return job


def _summary(job: ChildProcessJob, out_dir: Path) -> dict:
    record = json.loads((out_dir / BATCH_RECORD).read_text())
    return {"exit_code": job.returncodes[-1], "counts": record["counts"], "out_dir": str(out_dir),
            "report": str(out_dir / REPORT)}

