"""Peak memory of the ``dcepk`` commands on a large series, as a multiple of the series' size.

    python Testing/Benchmarks/bench_memory.py [--shape 40 256 256] [--frames 80] [--write-results]
    python Testing/Benchmarks/bench_memory.py --code /path/to/other/checkout --input DIR --commands fit infer

Targets: ``dcepk fit`` and ``dcepk infer`` peak at most 2.0x the float32 series plus a bounded chunk
working set (one that does not grow with the series); ``dcepk phantom`` streams the series to its
file, so its peak does not grow with the number of frames.

Each command runs alone in a child process (one at a time: the machine is shared); its peak is the
child's ``ru_maxrss``. The baseline is a child that imports what the commands import (interpreter,
numpy, SciPy, SimpleITK, torch, DCEPK) and exits, measured in the same run; the ratio is
(peak - baseline) / series bytes. ``--code`` runs another checkout's commands on the same input (the
before / after comparison); ``--input`` reuses a phantom folder written earlier.
"""

import argparse
import datetime
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import resource, sys
rc = 0
try:
    if sys.argv[1] == "--baseline":
        import numpy, scipy.ndimage, SimpleITK, torch
        import DCEPKFittingLib.pipeline.fit, DCEPKFittingLib.workflows.cli, DCEPKInferenceLib.pipeline.inference
    else:
        from DCEPKFittingLib.workflows.cli import main
        rc = main(sys.argv[1:])
finally:
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def run(code: Path, argv, label: str):
    """(peak RSS in bytes, seconds) of one command in a child process; stops on failure."""
    env_path = f"{code / 'DCEPKFitting'}:{code / 'DCEPKInference'}"
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                           env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    seconds = time.perf_counter() - started
    peak = [int(line.split()[1]) * 1024 for line in child.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    if child.returncode != 0 or not peak:
        sys.exit(f"{label} failed ({child.returncode}):\n{child.stderr[-3000:]}")
    return peak[0], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 256, 256], metavar=("K", "J", "I"))
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose commands are measured")
    parser.add_argument("--input", type=Path, help="an existing `dcepk phantom` folder (skips writing one)")
    parser.add_argument("--commands", nargs="+", default=["phantom", "fit", "infer"],
                        choices=["phantom", "fit", "infer"])
    parser.add_argument("--model", default="hetero_encoder_fast", help="network for dcepk infer")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--write-results", action="store_true", help="replace the memory section of RESULTS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dcepk-bench-memory-"))
    series_bytes = 4 * args.frames * args.shape[0] * args.shape[1] * args.shape[2]
    rows = []
    baseline, _ = run(args.code, ["--baseline"], "baseline")
    rows.append(("imports only (baseline)", baseline, None, None))
    try:
        phantom = args.input or work / "phantom"
        shape = [str(n) for n in args.shape]
        if "phantom" in args.commands or args.input is None:
            for frames in (args.frames // 4, args.frames):  # a streamed phantom's peak does not grow with frames
                target = work / f"phantom_{frames}" if frames != args.frames else phantom
                peak, seconds = run(args.code, ["phantom", "--out", str(target), "--shape", *shape, "--frames",
                                                str(frames), "--vfa-flip-angles"], "phantom")
                rows.append((f"dcepk phantom, {frames} frames", peak, seconds, 4 * frames * args.shape[0]
                             * args.shape[1] * args.shape[2]))
                if target != phantom:
                    shutil.rmtree(target)
        common = ["--t10", str(phantom / "truth" / "T10.nii.gz"), "--mask", str(phantom / "labels.nii.gz")]
        if "fit" in args.commands:
            peak, seconds = run(args.code, ["fit", str(phantom / "dce.seq.nrrd"), "--model", "etofts", "--aif-roi",
                                            str(phantom / "aif_mask.nii.gz"), *common, "--out", str(work / "fit")],
                                "fit")
            rows.append(("dcepk fit (etofts, AIF ROI, brain mask)", peak, seconds, series_bytes))
        if "infer" in args.commands:
            peak, seconds = run(args.code, ["infer", str(phantom / "dce.seq.nrrd"), "--model", args.model, *common,
                                            "--out", str(work / "infer")], "infer")
            rows.append((f"dcepk infer ({args.model}, brain mask)", peak, seconds, series_bytes))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
             f"shared with other jobs; code: {args.code}",
             f"command: python Testing/Benchmarks/bench_memory.py --shape {' '.join(map(str, args.shape))} "
             f"--frames {args.frames}",
             f"series: {args.shape[0]}x{args.shape[1]}x{args.shape[2]} x {args.frames} frames float32 = "
             f"{series_bytes / 2**20:,.0f} MiB; target for fit and infer: (peak - baseline) <= 2.0x the series + a "
             "bounded chunk working set; phantom: streamed", "",
             "| command | peak RSS (MiB) | above baseline (MiB) | (peak - baseline) / series | peak / series | s |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, peak, seconds, size in rows:
        above = peak - baseline
        ratio = f"{above / size:.2f}x" if size else "-"
        whole = f"{peak / size:.2f}x" if size else "-"
        lines.append(f"| {label} | {peak / 2**20:,.0f} | {above / 2**20:,.0f} | {ratio} | {whole} | "
                     f"{seconds:.0f} |" if seconds is not None else
                     f"| {label} | {peak / 2**20:,.0f} | 0 | - | - | - |")
    print("\n".join(lines))
    if args.write_results:
        write_results("\n".join(lines))


def write_results(section: str) -> None:
    path = ROOT / "Testing" / "Benchmarks" / "RESULTS.md"
    text = path.read_text()
    start = text.find("## Memory")
    end = text.find("\n## ", start + 1) if start >= 0 else -1
    block = "## Memory\n\n" + section + "\n"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        text = text[:start] + block + (text[end:] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    main()
