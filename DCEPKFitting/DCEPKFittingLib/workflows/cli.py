"""``dcepk`` command line: phantom, t1map, fit, stats, demo, batch, manifest, infer, train.

Every command reads and writes files only; units are in the option names' help texts.
Options are checked as they are parsed (argparse names the option); errors in the input print one
clear line naming the option and exit with status 2. Output targets are checked before any
computation, and all outputs of a command are published together or not at all.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from ..core.errors import DCEPKInputError, JobCancelledError, command_line_terms
from .input_function_options import (add_input_function_options, input_function_spec, input_function_targets,
                                     stage_input_function_outputs)
from .plugins import plugin_commands

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
T10_UNIT_SECONDS = {"s": 1.0, "ms": 1e-3}


# ------------------------------------------------------------------------ option types (parse time)
def checked(convert: Callable, check: Optional[Callable] = None, name: str = "value") -> Callable:
    """An argparse type: ``convert`` the text, then ``check`` it (a core check raising
    DCEPKInputError); argparse then prints ``argument --x: <message>`` and exits with status 2."""
    def parse(text):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"'{text}' is not a {name}") from None
        if check is not None:
            try:
                with command_line_terms():
                    check(value)
            except DCEPKInputError as error:
                raise argparse.ArgumentTypeError(str(error)) from None
        return value
    parse.__name__ = name
    return parse


def _require(condition: Callable[[float], bool], message: str) -> Callable:
    def check(value):
        if not condition(value):
            raise DCEPKInputError(message.format(value=value))
    return check


def _finite(value) -> bool:
    return math.isfinite(value)


POSITIVE_INT = checked(int, _require(lambda v: v >= 1, "must be at least 1, got {value}"), "whole number")
NON_NEGATIVE_INT = checked(int, _require(lambda v: v >= 0, "must be 0 or more, got {value}"), "whole number")
FRACTION = checked(float, _require(lambda v: 0.0 <= v < 1.0, "must be a fraction in [0, 1), got {value:g}"),
                   "number")
OPEN_FRACTION = checked(float, _require(lambda v: 0.0 < v <= 1.0, "must be a fraction in (0, 1], got {value:g}"),
                        "number")
SECONDS = checked(float, _require(_finite, "must be a finite number of seconds, got {value:g}"), "number")


def _flip_angle(value):
    from ..signal import check_flip_angle
    check_flip_angle(value, name="the flip angle")


def _repetition_time(value):
    from ..signal import check_tr
    check_tr(value)


def _device_name(value):
    from ..core.device import check_device_name
    check_device_name(value)


def _relaxivity(value):
    from ..core.plausibility import check_r1
    check_r1(value)


def _frame_interval(value):
    from ..core.plausibility import check_frame_times
    if not (math.isfinite(value) and value > 0):
        raise DCEPKInputError(f"must be a positive frame interval in seconds, got {value:g}")
    check_frame_times([0.0, value], f"--dt {value:g}")


FLIP_ANGLE = checked(float, _flip_angle, "flip angle in degrees")
REPETITION_TIME = checked(float, _repetition_time, "repetition time in seconds")
RELAXIVITY = checked(float, _relaxivity, "relaxivity in 1/(mM s)")
FRAME_INTERVAL = checked(float, _frame_interval, "frame interval in seconds")
DEVICE = checked(str, _device_name, "device")


def read_text_option(path: Path, option: str) -> str:
    """A small text file given to an option; a binary or unreadable file is named as such."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DCEPKInputError(f"{option} {path}: cannot read it ({error.strerror or error})") from None
    if b"\0" in data[:4096]:
        raise DCEPKInputError(f"{option} {path} is a binary file, not text: give a plain text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DCEPKInputError(f"{option} {path} is not a text file (not UTF-8): give a plain text file") from None


def numbers(text: str) -> Optional[np.ndarray]:
    try:
        return np.array([float(v) for v in text.replace(",", " ").split()], dtype=np.float64)
    except ValueError:
        return None


def parse_times(text: Optional[str]) -> Optional[np.ndarray]:
    """``--times``: comma-separated seconds (any length) or a text file of them."""
    if text is None or isinstance(text, np.ndarray):
        return text
    times = numbers(text)
    if times is None:
        path = Path(text)
        try:
            is_file = path.is_file()
        except OSError:  # e.g. a name longer than the file system allows: not a file
            is_file = False
        if not is_file:
            raise DCEPKInputError(f"--times must be numbers in seconds (comma-separated) or a text file of them; "
                                  f"got '{text[:60]}'")
        times = numbers(read_text_option(path, "--times"))
        if times is None:
            raise DCEPKInputError(f"--times file {path} must hold numbers in seconds (one per line or "
                                  "comma-separated)")
    if times.size == 0:
        raise DCEPKInputError("--times is empty: give one time in seconds per frame")
    return times


def _wrap_core_errors(function):
    def parse(text):
        try:
            with command_line_terms():
                return function(text)
        except DCEPKInputError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__name__ = function.__name__
    return parse


FRAME_TIMES = _wrap_core_errors(parse_times)


def _value_or_file(text: str):
    """A number (e.g. T10 in s) or the path of a map file."""
    try:
        value = float(text)
    except ValueError:
        return Path(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number or a map file, got {text}")
    return value


def add_t10_options(parser: argparse.ArgumentParser, required_note: str = "") -> None:
    parser.add_argument("--t10", type=_value_or_file,
                        help=f"pre-contrast T1{required_note}: a value or a map file on the series grid, "
                             "in --t10-unit")
    parser.add_argument("--t10-unit", default="s", choices=sorted(T10_UNIT_SECONDS),
                        help="unit of --t10 (default s; Slicer's PkModeling and many scanners write T1 maps in ms)")


def read_t10(args, series):
    """``--t10`` in seconds: None, one value, or a map checked against the series' grid."""
    from ..core.geometry import check_same_grid
    from ..io import read_volume
    if args.t10 is None:
        return None
    if isinstance(args.t10, Path):
        t10_map, t10_geometry = read_volume(args.t10)
        check_same_grid(series.spatial_shape, series.geometry, t10_map.shape, t10_geometry, "DCE series", "T10 map")
        return t10_map.astype(np.float64) * T10_UNIT_SECONDS[args.t10_unit]
    return args.t10 * T10_UNIT_SECONDS[args.t10_unit]


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("timing (only when the file has none, unless --override-timing)")
    group.add_argument("--dt", type=FRAME_INTERVAL, help="frame interval in seconds")
    group.add_argument("--times", type=FRAME_TIMES,
                       help="frame times in seconds: comma-separated list or a text file with one per line")
    group.add_argument("--override-timing", action="store_true",
                       help="use --dt / --times even where the file stores different frame times")


def add_series_options(parser: argparse.ArgumentParser) -> None:
    """How the DCE series is read: its timing and, in a DICOM folder of several series, which one."""
    add_timing_options(parser)
    parser.add_argument("--series-uid", help="SeriesInstanceUID of the dynamic series in a DICOM folder holding "
                                             "several ('all': each time point is its own series)")


def add_acquisition_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fa", type=FLIP_ANGLE, help="flip angle in degrees (default: from the header)")
    parser.add_argument("--tr", type=REPETITION_TIME, help="repetition time in seconds (default: from the header)")
    parser.add_argument("--r1", type=RELAXIVITY, help="relaxivity in 1/(mM s) (default: gadoterate at 3 T)")
    parser.add_argument("--baseline-frames", type=POSITIVE_INT,
                        help="number of pre-contrast frames (default: detected)")


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    from ..core.child_process import PROGRESS_FORMATS
    parser.add_argument("--progress-format", default="bar", choices=PROGRESS_FORMATS,
                        help="progress on stderr: a bar, or one JSON object per line "
                             "({\"dcepk_progress\": fraction, \"message\": text}) for a program that runs dcepk")


def read_series_option(args, kind: Optional[str] = None):
    """The DCE series of a fit or infer command; NaN/inf voxels are kept (and reported as invalid)."""
    from ..io import read_dce
    return read_dce(args.input, times_s=args.times, dt_s=args.dt, kind=kind, nonfinite="keep",
                    override_file_timing=args.override_timing, series_uid=args.series_uid)


def nonfinite_note(series) -> List[str]:
    voxels = series.metadata.get("nonfinite_voxels")
    if not voxels:
        return []
    return [f"{voxels} voxels of the series hold NaN or inf values: they are left out (invalid input, NaN in "
            "every map)"]


# ------------------------------------------------------------------------ parser
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcepk", description="DCE-MRI pharmacokinetic maps by tracer-kinetic fitting and neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the synthetic brain DCE phantom and its ground truth")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--shape", type=POSITIVE_INT, nargs=3, metavar=("K", "J", "I"), default=None,
                   help="voxels (slices rows columns)")
    p.add_argument("--frames", type=checked(int, _require(lambda v: v >= 3, "must be at least 3, got {value}"),
                                            "whole number"), default=None, help="number of frames")
    p.add_argument("--frame-time", type=FRAME_INTERVAL, default=None, help="frame interval in seconds")
    p.add_argument("--snr", type=checked(float, _require(lambda v: v > 0, "must be positive (inf: no noise), got "
                                                         "{value:g}"), "number"),
                   default=None, help="baseline signal to noise ratio (inf: no noise)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--vfa-flip-angles", type=FLIP_ANGLE, nargs="*", default=[2.0, 5.0, 10.0, 15.0, 20.0],
                   help="flip angles (degrees) of the VFA images to render for T1 mapping (none: no VFA)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("t1map", help="T1 map (s) from a variable-flip-angle series")
    p.add_argument("inputs", nargs="+", type=Path, help="a DICOM folder of the VFA images, one 4-D file (flip "
                   "angles last) or one 3-D file per flip angle")
    p.add_argument("--fa", type=FLIP_ANGLE, nargs="+", help="flip angles in degrees, in input order (default for a "
                   "DICOM folder: from the headers)")
    p.add_argument("--tr", type=REPETITION_TIME, help="repetition time in seconds, e.g. 0.005 (default for a DICOM "
                   "folder: from the headers)")
    p.add_argument("--b1", type=Path, help="B1 map (actual / nominal flip angle)")
    p.add_argument("--method", choices=["nonlinear", "linear"], default="nonlinear")
    p.add_argument("--out", required=True, type=_wrap_core_errors(_volume_target),
                   help="output T1 map file (.nii.gz, .nii, .nrrd or .mha)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("fit", help="fit a tracer-kinetic model voxel by voxel")
    p.add_argument("input", type=Path, help="DCE series: DICOM folder, 4-D NIfTI, NRRD or Slicer MultiVolume NRRD")
    p.add_argument("--model", default="etofts", choices=["tofts", "etofts", "patlak", "2cxm", "2cum"])
    p.add_argument("--method", default="nlls", choices=["nlls", "linear"])
    p.add_argument("--input-kind", default=None, choices=["signal", "concentration"],
                   help="whether the series holds signal (a.u.) or concentration (mM) (default: as the file says, "
                        "else signal)")
    add_input_function_options(p)
    add_t10_options(p)
    add_acquisition_options(p)
    p.add_argument("--mask", type=Path, help="mask of the voxels to fit")
    p.add_argument("--fit-delay", action="store_true", help="also fit the arterial delay per voxel")
    p.add_argument("--no-model-choice", action="store_true", help="fit the model to every voxel as asked, without "
                   "choosing no enhancement / plasma only / a simpler leakage model where the data support no more")
    p.add_argument("--device", default="auto", type=DEVICE, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", required=True, type=Path, help="output folder for the maps")
    p.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd"])
    p.add_argument("--save-concentration", action="store_true",
                   help=f"also write the concentration series (mM) the fit used, as {CONCENTRATION_FILE}")
    p.add_argument("--overwrite", action="store_true")
    add_series_options(p)
    add_progress_option(p)

    p = sub.add_parser("stats", help="per-label statistics of one or more maps")
    p.add_argument("maps", nargs="+", type=Path, help="map files on the label map's grid")
    p.add_argument("--labels", required=True, type=Path, help="label map (integer labels, 0 = background)")
    p.add_argument("--label-names", type=_wrap_core_errors(read_label_names), help="text file of 'value name' lines")
    p.add_argument("--out", type=_wrap_core_errors(_table_target),
                   help="output .tsv, .txt (tab-separated) or .csv (default: print to stdout)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="phantom -> T1 map -> AIF -> fit (+ networks) -> maps, statistics, figure")
    p.add_argument("--out", type=Path, default=Path("dcepk-demo"), help="output folder (default: ./dcepk-demo)")
    p.add_argument("--no-inference", action="store_true", help="skip the neural-network part")
    p.add_argument("--device", default="auto", type=DEVICE, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--overwrite", action="store_true")

    for name, (help_text, _) in {**COHORT_COMMANDS, **plugin_commands()}.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _cohort_command(name: str) -> Callable:
    def run(argv):
        from . import batch_command   # Dask is imported when a batch runs, not with the command line
        return getattr(batch_command, name)(argv)
    return run


# Commands that parse their own options, as the plugins' do (workflows/batch_command.py).
COHORT_COMMANDS = {
    "batch": ("maps and per-label statistics of a cohort on Dask (resumable; README: Cohorts)",
              _cohort_command("batch_main")),
    "manifest": ("write a cohort manifest from a BIDS-like folder", _cohort_command("manifest_main"))}


def _volume_target(text: str) -> Path:
    from ..io import volume_suffix
    volume_suffix(Path(text))
    return Path(text)


def _table_target(text: str) -> Path:
    from ..analysis.stats import table_suffix
    table_suffix(text)
    return Path(text)


def read_label_names(path) -> dict:
    """``--label-names``: 'value name' per line (# comments and blank lines skipped)."""
    names = {}
    for number, line in enumerate(read_text_option(Path(path), "--label-names").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        value, _, name = line.strip().partition(" ")
        try:
            label = int(value)
        except ValueError:
            raise DCEPKInputError(f"--label-names {path}, line {number}: '{line.strip()[:40]}' does not start with a "
                                  "whole-number label value: write 'value name' per line, e.g. '4 tumour rim'") from None
        names[label] = name.strip() or f"label {label}"
    return names


# ------------------------------------------------------------------------ commands
def _cmd_phantom(args) -> int:
    from ..core.output_files import check_targets
    from ..sims.phantom import Protocol, phantom_targets, stream_phantom
    protocol_overrides = {}
    if args.frames is not None:
        protocol_overrides["n_frames"] = args.frames
    if args.frame_time is not None:
        protocol_overrides["frame_time_s"] = args.frame_time
    vfa = tuple(args.vfa_flip_angles) or None
    check_targets(phantom_targets(args.out, vfa), args.overwrite)
    kwargs = {"protocol": Protocol(**protocol_overrides), "seed": args.seed, "vfa_flip_angles_deg": vfa}
    if args.shape is not None:
        kwargs["shape"] = tuple(args.shape)
    if args.snr is not None:
        kwargs["snr"] = args.snr
    written = stream_phantom(args.out, overwrite=args.overwrite, **kwargs)
    print(f"phantom written to {args.out}")
    for path in written:
        print(f"  {path}")
    return 0


def vfa_inputs(args):
    """(signals [k, j, i, n], flip angles (deg), TR (s), geometry): a DICOM folder's from its headers
    unless --fa / --tr are given, files' from --fa / --tr. Says which values it used."""
    from ..core.geometry import check_same_grid
    from ..io import read_vfa_dicom, read_volume
    if len(args.inputs) == 1 and args.inputs[0].is_dir() and (args.fa is None or args.tr is None):
        vfa = read_vfa_dicom(args.inputs[0])
        fa = vfa.flip_angles_deg if args.fa is None else np.asarray(args.fa)
        tr = vfa.tr_s if args.tr is None else args.tr
        if fa.size != vfa.signals.shape[-1]:
            raise DCEPKInputError(f"{vfa.signals.shape[-1]} flip angles in the DICOM folder but {fa.size} given (--fa)")
        origin = {True: "given", False: "from the DICOM headers"}
        print(f"flip angles {', '.join(f'{a:g}' for a in fa)} deg ({origin[args.fa is not None]}), "
              f"TR {tr * 1000:g} ms ({origin[args.tr is not None]})")
        return vfa.signals, fa, tr, vfa.geometry
    if args.fa is None or args.tr is None:
        raise DCEPKInputError("give the flip angles (--fa, degrees) and TR (--tr, seconds) of the VFA images: only a "
                              "DICOM folder carries them in its headers")
    volumes = [read_volume(path) for path in args.inputs]
    first_shape, geometry = volumes[0][0].shape, volumes[0][1]
    for path, (array, other) in zip(args.inputs[1:], volumes[1:]):
        check_same_grid(first_shape, geometry, array.shape, other, f"VFA image {args.inputs[0].name}",
                        f"VFA image {path.name}")
        if array.ndim != 3:
            raise DCEPKInputError(f"VFA image {path.name} has shape {array.shape}: give one 3-D file per flip angle "
                                  "or a single 4-D file")
    if len(volumes) == 1 and volumes[0][0].ndim == 4:
        signals = volumes[0][0]
    elif volumes[0][0].ndim != 3:
        raise DCEPKInputError(f"VFA image {args.inputs[0].name} has shape {first_shape}: give one 3-D file per flip "
                              "angle or a single 4-D file")
    else:
        signals = np.stack([array for array, _ in volumes], axis=-1)
    if signals.shape[-1] != len(args.fa):
        raise DCEPKInputError(f"{signals.shape[-1]} VFA images but {len(args.fa)} flip angles (--fa): give one per image")
    return signals, np.asarray(args.fa), args.tr, geometry


def _cmd_t1map(args) -> int:
    from ..core.geometry import check_same_grid
    from ..core.output_files import check_targets
    from ..io import read_volume, write_volume
    from ..signal import fit_vfa_t1
    check_targets([args.out], args.overwrite)
    signals, flip_angles, tr_s, geometry = vfa_inputs(args)
    b1 = None
    if args.b1:
        b1, b1_geometry = read_volume(args.b1)
        check_same_grid(signals.shape, geometry, b1.shape, b1_geometry, "VFA images", "B1 map")
    t1_s, _, _ = fit_vfa_t1(signals, flip_angles, tr_s, method=args.method, b1=b1)
    write_volume(args.out, np.asarray(t1_s, dtype=np.float32), geometry, overwrite=args.overwrite)
    print(f"T1 map (s) written to {args.out}")
    return 0


def write_summary(outputs, path: Path, summary: dict) -> None:
    """A JSON sidecar beside the maps: settings, units, warnings and notes of the run."""
    outputs.add_text(path, json.dumps(summary, indent=2, default=str) + "\n")


def print_messages(kind: str, messages) -> None:
    for message in messages:
        print(f"dcepk: {kind}: {message}", file=sys.stderr)


FIT_SUMMARY = "dcepk_fit.json"
CONCENTRATION_FILE = "concentration.seq.nrrd"


def _cmd_fit(args) -> int:
    from ..core.child_process import progress_reporter
    from ..core.output_files import OutputSet, check_targets
    from ..io import map_targets, read_mask, stage_dce_series, stage_maps
    from ..kinetics.fit_result import map_names
    from ..pipeline.fit import FitSettings, run_fit
    names = map_names(args.model, args.fit_delay)
    extra = [args.out / FIT_SUMMARY] + ([args.out / CONCENTRATION_FILE] if args.save_concentration else [])
    check_targets(map_targets(args.out, names, args.format) + extra + input_function_targets(args, args.out),
                  args.overwrite)
    series = read_series_option(args, kind=args.input_kind)
    grid = (series.geometry, series.spatial_shape)
    spec = input_function_spec(args, series)
    settings = FitSettings(
        model=args.model, method=args.method, t10_s=read_t10(args, series), fa_deg=args.fa, tr_s=args.tr,
        r1_per_mM_s=args.r1, baseline_frames=args.baseline_frames, **vars(spec),
        mask=read_mask(args.mask, *grid) if args.mask else None,
        fit_delay=args.fit_delay, device=args.device, model_selection=not args.no_model_choice)
    result = run_fit(series, settings, progress=progress_reporter(args.progress_format, f"fit {args.model}"),
                     reuse_series_memory=True)
    notes = nonfinite_note(series) + (result.input_function.notes if result.input_function else [])
    print_messages("note", notes)
    print_messages("warning", result.messages)
    summary = {"command": "fit", "input": str(args.input), "model": args.model, "method": args.method,
               "timing_source": series.metadata.get("timing_source"), "times_s": series.times_s.tolist(),
               "baseline_frames": result.baseline_frames,
               "baseline_frames_given": args.baseline_frames is not None,
               "noise_sd_signal_units": result.noise_sigma, "voxels_per_status": _status_counts(result),
               "model_choice": not args.no_model_choice, "units": result.units,
               "input_function": spec.describe(), "aif_plasma_mM": result.aif_plasma_mM.tolist(),
               "warnings": list(result.messages), "notes": notes}
    with OutputSet(args.overwrite) as outputs:
        stage_maps(outputs, args.out, result.maps, series.geometry, suffix=args.format)
        stage_input_function_outputs(outputs, args.out, result.input_function, series.times_s, series.geometry)
        if args.save_concentration:
            conc = result.concentration
            stage_dce_series(outputs, args.out / CONCENTRATION_FILE, [conc], conc.shape, conc.dtype, series.times_s,
                             series.geometry, kind="concentration")
        write_summary(outputs, args.out / FIT_SUMMARY, summary)
        outputs.commit()
    print(f"{len(result.maps)} maps written to {args.out}: {', '.join(sorted(result.maps))}")
    print(_fit_summary(result, given_baseline=args.baseline_frames is not None))
    return 0


def _fit_summary(result, given_baseline: bool) -> str:
    """Baseline frames, noise level and what the fit chose, in one line for the user."""
    parts = []
    if result.baseline_frames is not None:
        origin = "given" if given_baseline else "detected"
        parts.append(f"baseline: {result.baseline_frames} pre-contrast frames ({origin})")
    if result.noise_sigma is not None:
        parts.append(f"noise SD {result.noise_sigma:.4g} (signal units)")
    parts.append("voxels: " + ", ".join(f"{count} {name}" for name, count in _status_counts(result).items()))
    return "; ".join(parts)


def _status_counts(result) -> dict:
    """Voxels per fit status (those that occur, masked left out), by the status' name."""
    from ..kinetics.fit_result import FitStatus
    status = result.maps["status"]
    return {member.name.lower().replace("_", " "): int(np.sum(status == member)) for member in FitStatus
            if member != FitStatus.MASKED and np.any(status == member)}


def _cmd_stats(args) -> int:
    from ..analysis.stats import check_label_map, label_statistics, write_table
    from ..core.geometry import check_same_grid
    from ..core.output_files import check_targets
    from ..io import read_volume
    if args.out:
        check_targets([args.out], args.overwrite)
    labels, label_geometry = read_volume(args.labels)
    if labels.ndim != 3:
        raise DCEPKInputError(f"the label map {args.labels} has shape {labels.shape}: give one 3-D label map")
    labels = check_label_map(labels, f"the label map {args.labels}")
    maps = {}
    for path in args.maps:
        array, geometry = read_volume(path)
        check_same_grid(labels.shape, label_geometry, array.shape, geometry, "label map", f"map {path.name}")
        maps[path.name.split(".")[0]] = array
    # a fit's status map among the maps: counts per status, statistics over the fitted voxels only
    status = maps.pop("status", None)
    rows = label_statistics(maps, labels, args.label_names, status=status)
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
    extensions = {**COHORT_COMMANDS, **plugin_commands()}
    if argv and argv[0] in extensions:
        _, entry = extensions[argv[0]]
        return guarded(lambda: entry(argv[1:]))
    with command_line_terms():
        args = _build_parser().parse_args(argv)
    commands = {"phantom": _cmd_phantom, "t1map": _cmd_t1map, "fit": _cmd_fit, "stats": _cmd_stats, "demo": _cmd_demo}
    return guarded(lambda: commands[args.command](args))


def guarded(run) -> int:
    """Run a command in command-line terms; input and output errors print one line and give status 2."""
    try:
        with command_line_terms():
            return int(run() or 0)
    except DCEPKInputError as error:
        print(f"dcepk: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as error:  # an input that cannot be read (permissions, a vanished file)
        where = f"{error.filename}: " if error.filename else ""
        print(f"dcepk: error: {where}{error.strerror or error}: check the path and its permissions", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except JobCancelledError:
        print("dcepk: cancelled; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ndcepk: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
