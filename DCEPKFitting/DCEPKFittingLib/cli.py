"""``dcepk`` command line: phantom, t1map, fit, stats, demo, infer, train.

Every command reads and writes files only; units are in the option names' help texts.
Errors in the input print one clear line and exit with status 2; nothing is half-written.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from .errors import DCEPKInputError, JobCancelledError
from .plugins import plugin_commands

EXIT_INPUT_ERROR = 2


def _value_or_file(text: str):
    """A number (e.g. T10 in s) or the path of a map file."""
    try:
        return float(text)
    except ValueError:
        return Path(text)


T10_UNIT_SECONDS = {"s": 1.0, "ms": 1e-3}


def add_t10_options(parser: argparse.ArgumentParser, required_note: str = "") -> None:
    parser.add_argument("--t10", type=_value_or_file,
                        help=f"pre-contrast T1{required_note}: a value or a map file on the series grid, "
                             "in --t10-unit")
    parser.add_argument("--t10-unit", default="s", choices=sorted(T10_UNIT_SECONDS),
                        help="unit of --t10 (default s; Slicer's PkModeling and many scanners write T1 maps in ms)")


def read_t10(args, series):
    """``--t10`` in seconds: None, one value, or a map checked against the series' grid."""
    from .dce_io import read_volume
    from .geometry import check_same_grid
    if args.t10 is None:
        return None
    if isinstance(args.t10, Path):
        t10_map, t10_geometry = read_volume(args.t10)
        check_same_grid(series.spatial_shape, series.geometry, t10_map.shape, t10_geometry, "DCE series", "T10 map")
        return t10_map.astype(np.float64) * T10_UNIT_SECONDS[args.t10_unit]
    return args.t10 * T10_UNIT_SECONDS[args.t10_unit]


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("timing (only when the file has none)")
    group.add_argument("--dt", type=float, help="frame interval in seconds")
    group.add_argument("--times", type=str,
                       help="frame times in seconds: comma-separated list or a text file with one per line")


def parse_times(text: Optional[str]) -> Optional[np.ndarray]:
    if text is None:
        return None
    path = Path(text)
    raw = path.read_text() if path.is_file() else text
    try:
        return np.array([float(v) for v in raw.replace(",", " ").split()], dtype=np.float64)
    except ValueError:
        raise DCEPKInputError(f"--times must be numbers in seconds (comma-separated or one per line), got '{text[:60]}'")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcepk", description="DCE-MRI pharmacokinetic maps by tracer-kinetic fitting and neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the synthetic brain DCE phantom and its ground truth")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--shape", type=int, nargs=3, metavar=("K", "J", "I"), default=None, help="voxels (slices rows columns)")
    p.add_argument("--frames", type=int, default=None, help="number of frames")
    p.add_argument("--frame-time", type=float, default=None, help="frame interval in seconds")
    p.add_argument("--snr", type=float, default=None, help="baseline signal to noise ratio (inf: no noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vfa-flip-angles", type=float, nargs="*", default=[2.0, 5.0, 10.0, 15.0, 20.0],
                   help="flip angles (degrees) of the VFA images to render for T1 mapping (none: no VFA)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("t1map", help="T1 map (s) from a variable-flip-angle series")
    p.add_argument("inputs", nargs="+", type=Path, help="one 4-D file (flip angles last) or one 3-D file per flip angle")
    p.add_argument("--fa", type=float, nargs="+", required=True, help="flip angles in degrees, in input order")
    p.add_argument("--tr", type=float, required=True, help="repetition time in seconds (e.g. 0.005)")
    p.add_argument("--b1", type=Path, help="B1 map (actual / nominal flip angle)")
    p.add_argument("--method", choices=["nonlinear", "linear"], default="nonlinear")
    p.add_argument("--out", required=True, type=Path, help="output T1 map file (.nii.gz or .nrrd)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("fit", help="fit a tracer-kinetic model voxel by voxel")
    p.add_argument("input", type=Path, help="DCE series: DICOM folder, 4-D NIfTI, NRRD or Slicer MultiVolume NRRD")
    p.add_argument("--model", default="etofts", choices=["tofts", "etofts", "patlak", "2cxm", "2cum"])
    p.add_argument("--method", default="nlls", choices=["nlls", "linear"])
    p.add_argument("--input-kind", default="signal", choices=["signal", "concentration"],
                   help="whether the series holds signal (a.u.) or concentration (mM)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--aif-roi", type=Path, help="mask file of an artery (or vein) ROI on the series' grid")
    source.add_argument("--aif-csv", type=Path, help="CSV with time (s) and blood concentration (mM)")
    source.add_argument("--population-aif", choices=["parker", "georgiou", "weinmann"])
    p.add_argument("--aif-top-fraction", type=float, help="use only this fraction of most enhancing ROI voxels")
    p.add_argument("--aif-is-plasma", action="store_true", help="the ROI/CSV curve is plasma, not blood")
    p.add_argument("--hct", type=float, default=0.45, help="haematocrit (fraction)")
    p.add_argument("--aif-delay", type=float, default=0.0, help="extra delay of the input function in seconds")
    add_t10_options(p)
    p.add_argument("--fa", type=float, help="flip angle in degrees (default: from the header)")
    p.add_argument("--tr", type=float, help="repetition time in seconds (default: from the header)")
    p.add_argument("--r1", type=float, help="relaxivity in 1/(mM s) (default: gadoterate at 3 T)")
    p.add_argument("--baseline-frames", type=int, help="number of pre-contrast frames (default: detected)")
    p.add_argument("--mask", type=Path, help="mask of the voxels to fit")
    p.add_argument("--fit-delay", action="store_true", help="also fit the arterial delay per voxel")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, type=Path, help="output folder for the maps")
    p.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd"])
    p.add_argument("--overwrite", action="store_true")
    add_timing_options(p)

    p = sub.add_parser("stats", help="per-label statistics of one or more maps")
    p.add_argument("maps", nargs="+", type=Path, help="map files on the label map's grid")
    p.add_argument("--labels", required=True, type=Path, help="label map (integer labels, 0 = background)")
    p.add_argument("--label-names", type=Path, help="text file of 'value name' lines")
    p.add_argument("--out", type=Path, help="output .tsv or .csv (default: print to stdout)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="phantom -> T1 map -> AIF -> fit (+ networks) -> maps, statistics, figure")
    p.add_argument("--out", type=Path, default=Path("dcepk-demo"), help="output folder (default: ./dcepk-demo)")
    p.add_argument("--no-inference", action="store_true", help="skip the neural-network part")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true")

    for name, (help_text, _) in plugin_commands().items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _read_label_names(path: Optional[Path]):
    if path is None:
        return None
    names = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            value, _, name = line.strip().partition(" ")
            names[int(value)] = name.strip() or f"label {value}"
    return names


def _cmd_phantom(args) -> int:
    from .phantom import Protocol, make_phantom, write_phantom
    protocol_overrides = {}
    if args.frames is not None:
        protocol_overrides["n_frames"] = args.frames
    if args.frame_time is not None:
        protocol_overrides["frame_time_s"] = args.frame_time
    kwargs = {"protocol": Protocol(**protocol_overrides), "seed": args.seed,
              "vfa_flip_angles_deg": tuple(args.vfa_flip_angles) or None}
    if args.shape is not None:
        kwargs["shape"] = tuple(args.shape)
    if args.snr is not None:
        kwargs["snr"] = args.snr
    phantom = make_phantom(**kwargs)
    written = write_phantom(phantom, args.out, overwrite=args.overwrite)
    print(f"phantom written to {args.out}")
    for path in written or []:
        print(f"  {path}")
    return 0


def _cmd_t1map(args) -> int:
    from .dce_io import read_volume, write_volume
    from .signal_models import fit_vfa_t1
    volumes = [read_volume(path) for path in args.inputs]
    geometry = volumes[0][1]
    if len(volumes) == 1 and volumes[0][0].ndim == 4:
        signals = volumes[0][0]
    else:
        signals = np.stack([array for array, _ in volumes], axis=-1)
    if signals.shape[-1] != len(args.fa):
        raise DCEPKInputError(f"{signals.shape[-1]} VFA images but {len(args.fa)} flip angles (--fa): give one per image")
    b1 = read_volume(args.b1)[0] if args.b1 else None
    t1_s, _, _ = fit_vfa_t1(signals, np.asarray(args.fa), args.tr, method=args.method, b1=b1)
    write_volume(args.out, np.asarray(t1_s, dtype=np.float32), geometry, overwrite=args.overwrite)
    print(f"T1 map (s) written to {args.out}")
    return 0


def _cmd_fit(args) -> int:
    from .dce_io import read_dce, read_mask, write_maps
    from .jobs import ConsoleProgress
    from .pipeline import FitSettings, run_fit
    series = read_dce(args.input, times_s=parse_times(args.times), dt_s=args.dt, kind=args.input_kind)
    grid = (series.geometry, series.spatial_shape)
    settings = FitSettings(
        model=args.model, method=args.method, t10_s=read_t10(args, series), fa_deg=args.fa, tr_s=args.tr,
        r1_per_mM_s=args.r1,
        baseline_frames=args.baseline_frames,
        aif_mask=read_mask(args.aif_roi, *grid) if args.aif_roi else None,
        aif_top_fraction=args.aif_top_fraction, population_aif=args.population_aif,
        aif_csv=str(args.aif_csv) if args.aif_csv else None, aif_is_plasma=args.aif_is_plasma,
        hct=args.hct, aif_delay_s=args.aif_delay,
        mask=read_mask(args.mask, *grid) if args.mask else None,
        fit_delay=args.fit_delay, device=args.device)
    result = run_fit(series, settings, progress=ConsoleProgress(f"fit {args.model}"))
    written = write_maps(args.out, result.maps, series.geometry, suffix=args.format, overwrite=args.overwrite)
    print(f"{len(written)} maps written to {args.out}: {', '.join(sorted(result.maps))}")
    return 0


def _cmd_stats(args) -> int:
    from .dce_io import read_volume
    from .geometry import check_same_grid
    from .stats import label_statistics, write_table
    labels, label_geometry = read_volume(args.labels)
    maps = {}
    for path in args.maps:
        array, geometry = read_volume(path)
        check_same_grid(labels.shape, label_geometry, array.shape, geometry, "label map", f"map {path.name}")
        maps[path.name.split(".")[0]] = array
    rows = label_statistics(maps, np.rint(labels).astype(np.int64), _read_label_names(args.label_names))
    if args.out:
        write_table(rows, args.out, overwrite=args.overwrite)
        print(f"statistics of {len(maps)} map(s) over {len({r['label'] for r in rows})} label(s) written to {args.out}")
    else:
        columns = list(rows[0].keys()) if rows else []
        print("\t".join(columns))
        for row in rows:
            print("\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.out, with_inference=not args.no_inference, device=args.device, overwrite=args.overwrite)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands of installed extensions (e.g. infer, train) parse their own options.
    extensions = plugin_commands()
    if argv and argv[0] in extensions:
        _, entry = extensions[argv[0]]
        return _guarded(lambda: entry(argv[1:]))
    args = _build_parser().parse_args(argv)
    commands = {"phantom": _cmd_phantom, "t1map": _cmd_t1map, "fit": _cmd_fit, "stats": _cmd_stats, "demo": _cmd_demo}
    return _guarded(lambda: commands[args.command](args))


def _guarded(run) -> int:
    try:
        return int(run() or 0)
    except DCEPKInputError as error:
        print(f"dcepk: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except JobCancelledError:
        print("dcepk: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ndcepk: interrupted; no output was written for the unfinished step", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
