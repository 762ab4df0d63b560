"""The one runner of long, chunked work (signal to concentration, fitting, network inference).

The items (voxels) are cut into chunks sized to the cores and to a working-set budget
(``plan_chunks``); ``run_chunks`` runs them on a pool of threads (numpy and torch release the GIL in
their kernels), reports progress as chunks finish, checks the cancel between chunks and hands the
work a ``jobs.CancelScope`` that it checks inside its own loops, which is set when any chunk fails or
the caller is interrupted (Ctrl-C), so that the other threads stop within a check instead of running
to the end. Nothing here touches a library's process-wide thread setting, and torch is never imported.
"""

import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

from . import jobs
from .errors import DCEPKInputError

DEFAULT_WORKING_SET_BYTES = 512 << 20   # all threads together
CHUNKS_PER_THREAD = 4                  # for balance between threads, and progress to report
THREADS_VARIABLE = "DCEPK_THREADS"     # an environment variable to cap the threads (a shared machine)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def thread_count(threads: Optional[int] = None) -> int:
    """``threads`` if given, else ``$DCEPK_THREADS`` if set, else the available cores."""
    if threads is None:
        text = os.environ.get(THREADS_VARIABLE, "").strip()
        if text:
            try:
                threads = int(text)
            except ValueError:
                raise DCEPKInputError(f"{THREADS_VARIABLE}={text!r} is not a number of threads: set it to a "
                                      "whole number, or unset it to use every core") from None
    if threads is None:
        return available_cores()
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise DCEPKInputError(f"threads must be a whole number, at least 1; got {threads!r}")
    return int(threads)


@dataclass(frozen=True)
class ChunkPlan:
    """How ``n_items`` are cut: ``size`` items a chunk, ``count`` chunks, run on ``threads`` threads."""
    n_items: int
    size: int
    count: int
    threads: int


def plan_chunks(n_items: int, bytes_per_item: float, *, threads: Optional[int] = None,
                working_set_bytes: Optional[int] = None, min_chunk: int = 1,
                max_chunk: Optional[int] = None) -> ChunkPlan:
    """Chunks of equal size: ``CHUNKS_PER_THREAD`` a thread where there is enough work (balance and
    progress), no fewer than ``min_chunk`` items (what a chunk costs besides its items), no more than
    ``max_chunk`` and no more than a thread's share of ``working_set_bytes`` at ``bytes_per_item`` each
    (the memory bound wins over ``min_chunk``)."""
    n_items = int(n_items)
    threads = thread_count(threads)
    budget = DEFAULT_WORKING_SET_BYTES if working_set_bytes is None else int(working_set_bytes)
    if budget <= 0:
        raise DCEPKInputError(f"the working-set budget must be a positive number of bytes; got {working_set_bytes!r}")
    by_memory = max(1, int(budget // (threads * max(float(bytes_per_item), 1.0))))
    if max_chunk is not None:
        by_memory = min(by_memory, max(1, int(max_chunk)))
    balanced = math.ceil(n_items / (threads * CHUNKS_PER_THREAD)) if n_items else 1
    size = max(1, min(by_memory, max(balanced, int(min_chunk))))
    count = math.ceil(n_items / size) if n_items else 0
    return ChunkPlan(n_items, size, count, max(1, min(threads, count)))


def run_chunks(work: Callable[[int, int, jobs.CancelScope], object], plan: ChunkPlan, *, progress=None,
               cancel=None, message: str = "{done} of {total}") -> None:
    """``work(start, stop, scope)`` for each chunk [start, stop) of the plan, on ``plan.threads`` worker
    threads (never the calling thread, whose library settings stay as they are). ``work`` writes its
    results itself (chunks are disjoint) and checks ``scope`` (``jobs.raise_if_cancelled``) in its loops.
    Progress ``message`` is formatted with the items ``done`` and the ``total``. The first error (or a
    Ctrl-C in the caller) stops the other chunks and is raised here."""
    scope = jobs.CancelScope(cancel)
    done = 0

    def run(start, stop):
        jobs.raise_if_cancelled(scope)
        work(start, stop, scope)
        return stop - start

    with ThreadPoolExecutor(max_workers=plan.threads, thread_name_prefix="dcepk-chunk",
                            initializer=_one_blas_thread_here) as pool:
        futures = [pool.submit(run, start, min(start + plan.size, plan.n_items))
                   for start in range(0, plan.n_items, plan.size)]
        try:
            for future in as_completed(futures):
                done += future.result()
                jobs.report(progress, done / max(plan.n_items, 1), message.format(done=done, total=plan.n_items))
        except BaseException:
            scope.set()   # the running chunks stop at their next check
            for future in futures:
                future.cancel()
            raise
    jobs.raise_if_cancelled(cancel)


@lru_cache(maxsize=1)
def _openblas_local_thread_setter():
    """numpy's OpenBLAS call that sets the BLAS threads of the calling thread only (OpenBLAS >= 0.3.27),
    found among the libraries loaded in this process; None where there is none (or no /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            setter = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local")
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return setter
    return None


def _one_blas_thread_here() -> None:
    """A worker's BLAS calls (numpy's matrix products) run in the worker itself, on its core. OpenBLAS's own
    thread pool serves one caller at a time and its threads spin between calls, taking the cores from the
    workers: on 2 cores the extended Tofts fit ran at 53,000 voxels/s on two workers and 61,000 on one with
    OpenBLAS's threads, 73,000 on one with two BLAS threads of its own, and 119,000 on one with one."""
    setter = _openblas_local_thread_setter()
    if setter is not None:
        setter(1)
