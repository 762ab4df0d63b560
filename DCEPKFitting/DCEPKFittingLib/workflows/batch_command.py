"""``dcepk batch`` and ``dcepk manifest``: the cohort commands' options, progress and exit status.

Progress goes to stderr as a bar (subjects done / failed / remaining, ETA), or with ``--progress-format
json`` as the protocol lines of ``core.child_process`` (the Slicer module's Logic reads them from a child
process), plus one JSON line per subject on stdout: ``{"dcepk_subject": key, "state", "error", "seconds",
"counts"}`` (state: done, up to date, failed, invalid).
"""

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import List, Optional

from ..core.errors import DCEPKInputError, JobCancelledError
from ..core.child_process import progress_reporter
from . import cli
from .batch import EXIT_ALL_FINISHED, EXIT_BATCH_ERROR, ClusterOptions, import_dask, run_batch
from .cohort_manifest import BatchDefaults

SUBJECT_KEY = "dcepk_subject"   # the JSON line of a subject's outcome (--progress-format json)
EXIT_CODES = ("exit status: 0 every subject finished, 1 some subjects failed (see report.md and logs/), "
              "2 bad invocation or manifest (nothing run), 3 the batch stopped on an unexpected error (a bug: "
              "please report it with its traceback), 130 interrupted (rerun the same command to resume)")


def _memory_limit(text: str) -> str:
    try:
        from dask.utils import parse_bytes
    except ImportError:   # the command says how to install Dask right after parsing
        return text
    if text != "auto":
        try:
            parse_bytes(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"'{text}' is not a memory size: use e.g. 4GiB, 500MB or auto") from None
    return text


def build_batch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcepk batch", epilog=EXIT_CODES,
        description="Maps and per-label statistics of a cohort on Dask: one row per subject in a manifest "
                    "(CSV/TSV) or a BIDS-like folder; resumable (finished subjects are kept).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("manifest", nargs="?", type=Path, help="cohort manifest (.csv or .tsv; README: Cohorts)")
    source.add_argument("--bids", type=Path, help="a BIDS-like folder to derive the manifest from")
    parser.add_argument("--out", required=True, type=Path, help="output folder (new, or an earlier batch's)")
    defaults = parser.add_argument_group("defaults for empty manifest cells")
    defaults.add_argument("--model", default="etofts", help="fit model, or none (default etofts)")
    defaults.add_argument("--method", default="nlls", help="nlls | linear")
    defaults.add_argument("--network", default="none", help="shipped network (dcepk infer --list), or none")
    defaults.add_argument("--aif", default="", help="input function of the fit and of an AIF-conditioned network: "
                               "parker | georgiou | weinmann | CSV | ROI mask | auto | auto-artery | auto-vein")
    defaults.add_argument("--t10", default="", help="pre-contrast T1 in seconds (or a map file) for rows without one")
    defaults.add_argument("--hct", default="0.45", help="haematocrit (fraction)")
    parser.add_argument("--device", default="auto", type=cli.DEVICE,
                        help="auto | cpu | cuda | cuda:N (auto: decided on each worker)")
    where = parser.add_argument_group("Dask cluster")
    where.add_argument("--scheduler", help="address of a running dask.distributed scheduler (e.g. tcp://host:8786; "
                                           "SLURM/PBS: README, Cohorts); default: a local cluster")
    where.add_argument("--workers", type=cli.POSITIVE_INT, help="local workers (default: one per core)")
    where.add_argument("--threads-per-worker", type=cli.POSITIVE_INT, default=1)
    where.add_argument("--memory-limit", type=_memory_limit, default="auto",
                       help="memory per local worker, e.g. 4GiB (default auto: the machine's memory / workers)")
    where.add_argument("--no-processes", action="store_true", help="local workers as threads of this process")
    where.add_argument("--dashboard-address", default=":8787", help="local dashboard address, or none")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="run the valid rows and record the invalid ones as failed (default: refuse the manifest)")
    parser.add_argument("--force", action="store_true", help="recompute every subject, finished or not")
    parser.add_argument("--verify-checksums", action="store_true",
                        help="hash every input and output again (default: only files whose size or time changed)")
    cli.add_progress_option(parser)
    return parser


def _network_names():
    from .plugins import network_provider
    provider = network_provider()
    return None if provider is None else provider["names"]


def _manifest(args):
    from .bids_layout import bids_manifest
    from .cohort_manifest import read_manifest
    defaults = BatchDefaults(model=args.model, method=args.method, network=args.network, aif=args.aif,
                             t10=args.t10, hct=args.hct)
    if args.bids is not None:
        return bids_manifest(args.bids, defaults, _network_names(), args.skip_invalid), str(args.bids)
    return read_manifest(args.manifest, defaults, _network_names(), args.skip_invalid), str(args.manifest)


def batch_main(argv: Optional[List[str]] = None) -> int:
    with cli.command_line_terms():
        args = build_batch_parser().parse_args(argv)
    import_dask()
    import pyarrow  # noqa: F401  (the Parquet table; part of the cohort extra)
    manifest, source = _manifest(args)
    progress = progress_reporter(args.progress_format, "batch")

    def on_subject(outcome, counts):
        if outcome["state"] in ("failed", "invalid"):
            print(f"\ndcepk: {outcome['key']} failed: {outcome['error']}", file=sys.stderr)
        if args.progress_format == "json":
            print(json.dumps({SUBJECT_KEY: outcome["key"], "state": outcome["state"], "error": outcome.get("error"),
                              "seconds": outcome.get("seconds"), "counts": counts}), flush=True)

    cluster = ClusterOptions(scheduler=args.scheduler, workers=args.workers,
                             threads_per_worker=args.threads_per_worker, processes=not args.no_processes,
                             memory_limit=args.memory_limit,
                             dashboard_address=None if args.dashboard_address == "none" else args.dashboard_address)
    try:
        summary = run_batch(manifest, args.out, device=args.device, cluster=cluster, force=args.force,
                            verify_checksums=args.verify_checksums, source=source, progress=progress,
                            on_subject=on_subject)
    except (KeyboardInterrupt, JobCancelledError):
        print("\ndcepk batch: interrupted; the subjects that finished are kept: run the same command again to "
              "resume", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except (DCEPKInputError, OSError):
        raise   # the command line's own messages (status 2)
    except Exception:   # not 1, which says "some subjects failed"
        traceback.print_exc()
        print("\ndcepk batch: stopped on an unexpected error (above; please report it); the subjects that finished "
              "are kept: run the same command again to resume", file=sys.stderr)
        return EXIT_BATCH_ERROR
    finished = summary.count("done") + summary.count("up to date")
    print(f"dcepk batch: {finished} of {len(summary.outcomes)} subjects finished ({summary.count('up to date')} were "
          f"up to date), {summary.count('failed') + summary.count('invalid')} failed; table, report and logs in "
          f"{args.out}", file=sys.stderr)
    return summary.exit_code


def manifest_main(argv: Optional[List[str]] = None) -> int:
    from .bids_layout import bids_rows, write_manifest
    parser = argparse.ArgumentParser(prog="dcepk manifest",
                                     description="Write a cohort manifest from a BIDS-like folder (README: Cohorts)")
    parser.add_argument("folder", type=Path, help="top folder: sub-*/[ses-*/]dce/*_dce.nii.gz ...")
    parser.add_argument("--out", required=True, type=Path, help="manifest file to write (.csv or .tsv)")
    parser.add_argument("--overwrite", action="store_true")
    with cli.command_line_terms():
        args = parser.parse_args(argv)
    rows = bids_rows(args.folder)
    write_manifest(rows, args.out, overwrite=args.overwrite)
    print(f"manifest of {len(rows)} subject session(s) written to {args.out}; check it, then: "
          f"dcepk batch {args.out} --out DIR", file=sys.stderr)
    return EXIT_ALL_FINISHED
