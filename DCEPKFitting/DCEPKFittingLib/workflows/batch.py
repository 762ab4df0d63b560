"""``dcepk batch``: the per-subject pipeline over a cohort on Dask, resumable and failure-isolated.

Each subject is one Dask task (``batch_subject.run_subject``) on a ``dask.distributed`` cluster: a
``LocalCluster`` by default (worker processes of 1 thread each, as many as the machine has cores,
since a subject's fit is itself multi-threaded; a memory limit per worker) or an existing scheduler
(``--scheduler ADDRESS``: e.g. a SLURM or PBS cluster started with dask-jobqueue, README "Cohorts").
Nothing here is a scheduler of its own. Dask is the optional extra ``.[cohort]``: it is imported when
a batch runs, never with the command line.

A subject whose run manifest matches its inputs, options and outputs is skipped; one whose inputs or
options changed, or that had not finished, is computed again; a failing subject is recorded (message
in the table and report, traceback in ``logs/``) and the others go on. Exit status: 0 every subject
finished, 1 some failed, 2 bad invocation or manifest (nothing run), 3 the batch itself stopped on an
unexpected error (a Python crash would say 1 too), 130 interrupted.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from ..core.errors import DCEPKInputError
from ..core.jobs import raise_if_cancelled, report
from ..core.output_files import write_text_file
from ..core.runner import THREADS_VARIABLE, available_cores
from . import batch_report
from .batch_subject import outdated_reason, run_subject
from .cohort_manifest import Manifest

EXIT_ALL_FINISHED, EXIT_SOME_FAILED, EXIT_BATCH_ERROR = 0, 1, 3
BATCH_RECORD = batch_report.BATCH_RECORD
LOG_DIR = "logs"
COHORT_EXTRA = ('pip install "dcepk[cohort]" (from a source tree: pip install -e ".[cohort]"; in Slicer: '
                'slicer.util.pip_install("dask[distributed] pyarrow"))')


@dataclass
class ClusterOptions:
    """Where the subjects run: an existing scheduler, or a local cluster of ``workers`` (None: one per
    core, at most one per subject) x ``threads_per_worker``, in processes (or threads of this one)."""
    scheduler: Optional[str] = None
    workers: Optional[int] = None
    threads_per_worker: int = 1
    processes: bool = True
    memory_limit: str = "auto"          # per worker: "4GiB", "auto" (the machine's memory / workers)
    dashboard_address: Optional[str] = ":8787"


@dataclass
class BatchSummary:
    out_dir: Path
    outcomes: List[dict]                # one per subject: key, state (done, up to date, failed, invalid), error
    exit_code: int
    files: List[Path] = field(default_factory=list)
    dashboard_link: Optional[str] = None
    worker_peak_memory: dict = field(default_factory=dict)   # worker -> peak resident memory (bytes)

    def count(self, state: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome["state"] == state)


def import_dask():
    try:
        import dask
        import distributed
    except ImportError:
        raise DCEPKInputError(f"dcepk batch runs on Dask, which is not installed: {COHORT_EXTRA}") from None
    return dask, distributed


def check_out_dir(out_dir: Path) -> None:
    """An output folder is new, empty, or an earlier batch's (resumed); anything else is refused, so a
    batch never mixes its files with someone else's."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DCEPKInputError(f"{out_dir} is a file: give a folder for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / BATCH_RECORD).is_file():
        raise DCEPKInputError(f"{out_dir} holds files that dcepk batch did not write (no {BATCH_RECORD}): give a "
                              "new or empty folder, or the folder of an earlier batch to resume it")


def run_batch(manifest: Manifest, out_dir, *, device: str = "auto", cluster: Optional[ClusterOptions] = None,
              force: bool = False, verify_checksums: bool = False, source: str = "", progress=None, cancel=None,
              on_subject: Optional[Callable[[dict, dict], None]] = None) -> BatchSummary:
    """Run every subject of ``manifest`` into ``out_dir`` (see the module's docstring).

    ``progress(fraction, message)`` and ``cancel`` (``is_set()``) as everywhere in DCEPK;
    ``on_subject(outcome, counts)`` after each subject. Returns the summary (its ``exit_code``)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    started = time.time()
    write_text_file(out_dir / BATCH_RECORD, json.dumps({"state": "running", "source": source,
                                                       "started": _timestamp(started)}, indent=2) + "\n",
                    overwrite=True)
    outcomes = [{"key": row.key, "subject": row.subject, "session": row.session, "state": "invalid",
                 "error": "; ".join(row.problems)} for row in manifest.invalid]
    tracker = _Tracker(len(manifest.specs) + len(outcomes), progress, on_subject)
    for outcome in outcomes:
        tracker.record(outcome)
    todo = []
    for spec in manifest.specs:
        reason = "forced (--force)" if force else outdated_reason(spec, out_dir / "subjects" / spec.folder,
                                                                  verify_checksums)
        if reason is None:
            outcomes.append(tracker.record({"key": spec.key, "subject": spec.subject, "session": spec.session,
                                            "state": "up to date", "seconds": 0.0}))
        else:
            todo.append((spec, reason))
    dashboard, memory = None, {}
    if todo:
        dashboard, memory = _compute(todo, out_dir, device, cluster or ClusterOptions(), tracker, outcomes, cancel)
    order = {spec.key: n for n, spec in enumerate(manifest.specs)}
    outcomes.sort(key=lambda outcome: order.get(outcome["key"], -1))   # the invalid rows first, then as listed
    exit_code = EXIT_SOME_FAILED if any(o["state"] in ("failed", "invalid") for o in outcomes) else EXIT_ALL_FINISHED
    summary = BatchSummary(out_dir, outcomes, exit_code, dashboard_link=dashboard, worker_peak_memory=memory)
    record = {"state": "finished", "source": source, "started": _timestamp(started),
              "seconds": round(time.time() - started, 3), "device": device, "exit_code": exit_code,
              "counts": tracker.counts, "dashboard": dashboard, "worker_peak_memory_bytes": memory,
              "subjects": [{k: v for k, v in o.items() if k != "traceback"} for o in outcomes]}
    summary.files = batch_report.write_cohort_outputs(out_dir, manifest.specs, outcomes, record)
    report(progress, 1.0, tracker.message())
    return summary


def _compute(todo, out_dir: Path, device: str, options: ClusterOptions, tracker, outcomes: List[dict], cancel):
    """Run the subjects on the cluster; returns (dashboard link, peak memory per worker)."""
    dask, _ = import_dask()
    from distributed import as_completed
    client, local = _start_client(dask, options, len(todo))
    try:
        dashboard = client.dashboard_link if (options.scheduler or options.dashboard_address) else None
        tracker.announce(client, dashboard)
        futures = {client.submit(run_subject, spec, str(out_dir), device, key=f"dcepk-{spec.key}-{os.urandom(4).hex()}",
                                 pure=False): (spec, reason) for spec, reason in todo}
        pending = as_completed(list(futures))
        while not pending.is_empty():
            raise_if_cancelled(cancel)
            for future in pending.next_batch(block=False) or []:
                outcome = _outcome(future, *futures[future])
                if outcome["state"] == "failed":
                    _write_log(out_dir, outcome)
                outcomes.append(tracker.record(outcome))
            time.sleep(0.05)
        return dashboard, _peak_memory(client, options)
    finally:
        client.close()
        if local is not None:
            local.close()


def _start_client(dask, options: ClusterOptions, tasks: int):
    from distributed import Client, LocalCluster
    if options.scheduler:
        return Client(options.scheduler), None
    cores = available_cores()
    workers = options.workers or max(1, min(cores, tasks))
    # each subject's fit uses the cores its worker has: threads per fit = cores / (workers x threads), for the
    # chunk runner (its own variable) and torch's and BLAS's thread pools (a network's inference)
    fit_threads = str(max(1, cores // (workers * options.threads_per_worker)))
    settings = {f"distributed.nanny.pre-spawn-environ.{name}": fit_threads
                for name in (THREADS_VARIABLE, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    settings["distributed.scheduler.allowed-failures"] = 1   # a subject that kills its worker twice has failed
    with dask.config.set(settings):
        local = LocalCluster(n_workers=workers, threads_per_worker=options.threads_per_worker,
                             processes=options.processes, memory_limit=options.memory_limit,
                             dashboard_address=options.dashboard_address)
    return Client(local), local


def _outcome(future, spec, reason: str) -> dict:
    try:
        outcome = future.result()
    except Exception as error:   # the worker died (memory limit, crash) or the cluster went away
        outcome = {"key": spec.key, "subject": spec.subject, "session": spec.session, "state": "failed",
                   "error": f"the worker running this subject stopped ({type(error).__name__}: {error}); if it "
                            "ran out of memory, give fewer workers or a larger --memory-limit",
                   "traceback": "", "seconds": 0.0}
    outcome["reason"] = reason
    return outcome


def _write_log(out_dir: Path, outcome: dict) -> None:
    log = out_dir / LOG_DIR / f"{outcome['key']}.log"
    write_text_file(log, f"{outcome['key']}: {outcome['error']}\n\n{outcome.get('traceback', '')}", overwrite=True)
    outcome["log"] = str(log.relative_to(out_dir))


def _peak_rss_bytes() -> Optional[int]:
    try:
        import resource
    except ImportError:   # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _peak_memory(client, options: ClusterOptions) -> dict:
    if options.scheduler is None and not options.processes:
        return {"this process (threads)": _peak_rss_bytes()}
    try:
        return dict(client.run(_peak_rss_bytes))
    except Exception:   # a worker that went away: no figure rather than no summary
        return {}


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


class _Tracker:
    """Counts of the subjects by state, the progress message (done / failed / remaining, ETA)."""

    def __init__(self, total: int, progress, on_subject):
        self.total, self.progress, self.on_subject = total, progress, on_subject
        self.counts = {"done": 0, "up to date": 0, "failed": 0, "invalid": 0}
        self.started = time.time()
        self.computed = 0

    def announce(self, client, dashboard: Optional[str]) -> None:
        workers = len(client.scheduler_info().get("workers", {}))
        where = f"Dask dashboard: {dashboard}" if dashboard else "no dashboard"
        report(self.progress, self.fraction(), f"{workers} Dask worker(s); {where}")

    def record(self, outcome: dict) -> dict:
        self.counts[outcome["state"]] += 1
        if outcome["state"] in ("done", "failed") and outcome.get("seconds"):
            self.computed += 1
        report(self.progress, self.fraction(), self.message())
        if self.on_subject is not None:
            self.on_subject(outcome, dict(self.counts))
        return outcome

    def fraction(self) -> float:
        return sum(self.counts.values()) / max(self.total, 1)

    def message(self) -> str:
        finished = self.counts["done"] + self.counts["up to date"]
        failed = self.counts["failed"] + self.counts["invalid"]
        remaining = self.total - finished - failed
        text = f"{finished} done ({self.counts['up to date']} up to date), {failed} failed, {remaining} remaining"
        if remaining and self.computed:
            eta = (time.time() - self.started) / self.computed * remaining
            text += f", ETA {int(eta // 60)}:{int(eta % 60):02d}"
        return text
