"""Cohort throughput of ``dcepk batch``: subjects per minute on 1 local Dask worker vs all local workers.

    python Testing/Benchmarks/bench_batch.py [--subjects 20] [--shape 4 64 64] [--frames 40] [--write-results]

A cohort of phantom subjects (``dcepk phantom``, seeds 1..N: VFA T1, vessel ROI, labels; extended Tofts
NLLS) runs twice from scratch, each time as ``dcepk batch`` in a child process on a local cluster of
worker processes (1 thread each): once with 1 worker (the baseline, measured in the same run), once with
one worker per core. Reported: wall time of the whole command (cluster start, the subjects, the cohort
table and report), subjects per minute, the scaling ratio (all workers / 1 worker), and each worker's
peak resident memory (``ru_maxrss``, from the batch record). A third run of the same command measures
a resume where every subject is up to date.
"""

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing" / "Python"))
from batch_cohort import batch_command, subject_row, write_manifest  # noqa: E402
from DCEPKFittingLib.core.runner import available_cores  # noqa: E402

RESULTS = ROOT / "Testing" / "Benchmarks" / "RESULTS.md"
SECTION = "## Cohorts (dcepk batch)"
NOTE = ("Threads per fit = cores / workers (each worker's chunk runner gets $DCEPK_THREADS, one BLAS thread per "
        "runner thread): the 1-worker run fits one subject at a time on every core, the all-workers run one subject "
        "per core; what differs besides is the part of a subject that runs on one thread (reading, T1 map, AIF, "
        "statistics, writing). Peak memory per worker: the worker process's whole peak resident memory "
        "(interpreter, libraries, subject). A load average near the core count at the start means other processes "
        "held cores that the workers then shared: the scaling ratio is only meaningful on an otherwise idle machine.")


def make_cohort(folder: Path, subjects: int, shape, frames: int) -> Path:
    from DCEPKFittingLib.workflows import cli
    rows = []
    for seed in range(1, subjects + 1):
        name = f"s{seed:03d}"
        with contextlib.redirect_stdout(io.StringIO()):   # the phantom command lists its files
            assert cli.main(["phantom", "--out", str(folder / name), "--shape", *map(str, shape), "--frames", str(frames),
                             "--frame-time", "5", "--seed", str(seed)]) == 0
        rows.append(subject_row(name))
    return write_manifest(folder / "cohort.csv", rows)


def run_batch(folder: Path, out: str, workers: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run(batch_command("cohort.csv", "--out", out, "--workers", workers, "--dashboard-address",
                                        "none"), cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"dcepk batch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads((folder / out / "dcepk_batch.json").read_text())
    memory = [v for v in record["worker_peak_memory_bytes"].values() if v]
    return {"workers": workers, "seconds": seconds, "counts": record["counts"],
            "peak_mib": [m / 2**20 for m in memory]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=(4, 64, 64))
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    cores = available_cores()
    load_at_start = os.getloadavg()[0]   # other processes' demand: what the workers could not have
    with tempfile.TemporaryDirectory(prefix="dcepk-bench-batch-") as temporary:
        folder = Path(temporary)
        make_cohort(folder, args.subjects, args.shape, args.frames)
        one = run_batch(folder, "out1", 1)
        every = run_batch(folder, "outN", cores)
        resume = run_batch(folder, "outN", cores)
    rate = {run["workers"]: args.subjects / run["seconds"] * 60 for run in (one, every)}
    lines = [
        SECTION, "",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{cores} CPU cores shared with other engineers' work (load average {load_at_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; timings vary run to run); Python {platform.python_version()}",
        f"command: python Testing/Benchmarks/bench_batch.py --subjects {args.subjects} --shape {' '.join(map(str, args.shape))} "
        f"--frames {args.frames}",
        f"cohort: {args.subjects} phantom subjects of {args.shape[0]}x{args.shape[1]}x{args.shape[2]} voxels x {args.frames} "
        "frames (VFA T1, vessel ROI AIF, extended Tofts NLLS, statistics per label); local cluster of worker processes, "
        "1 thread each; wall time of the whole `dcepk batch` command", "",
        "| workers | wall time (s) | subjects/min | scaling vs 1 worker | peak memory per worker (MiB) |",
        "|---:|---:|---:|---:|---|"]
    for run in (one, every):
        lines.append(f"| {run['workers']} | {run['seconds']:.1f} | {rate[run['workers']]:.1f} | "
                     f"{rate[run['workers']] / rate[1]:.2f}x | {', '.join(f'{m:.0f}' for m in run['peak_mib'])} |")
    lines += ["", f"resume of the {cores}-worker run with every subject up to date: {resume['seconds']:.1f} s "
                  f"({resume['counts']['up to date']} of {args.subjects} subjects skipped).", "",
              NOTE, ""]
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        write_section(text)


def write_section(text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md."""
    current = RESULTS.read_text()
    if SECTION in current:
        start = current.index(SECTION)
        following = current.find("\n## ", start + len(SECTION))
        current = current[:start] + text + ("\n" + current[following + 1:] if following >= 0 else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(current)


if __name__ == "__main__":
    main()
