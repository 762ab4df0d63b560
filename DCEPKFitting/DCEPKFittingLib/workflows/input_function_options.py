"""The input-function options of ``dcepk fit`` and ``dcepk infer``: one set, one reader, one writer.

Sources (one of): ``--aif-roi`` (an artery or vein mask), ``--aif-csv``, ``--population-aif``,
``--auto-aif [artery|vein|either]`` (detected: ``kinetics.aif_detection``). Modifiers:
``--aif-top-fraction``, ``--aif-is-plasma``, ``--hct``, ``--aif-delay``, ``--blood-t10``. With
``--auto-aif`` the command also writes the voxels it chose (``aif_auto_mask.nii.gz``: 1 artery,
2 vein; edit it and pass it back with ``--aif-roi``) and the curve (``aif_auto.csv``: time in s,
whole-blood concentration in mM, usable with ``--aif-csv``). ``--aif-roi-label`` picks one label of a
label map given to ``--aif-roi`` (1: the arteries of ``aif_auto_mask.nii.gz``).
"""

import argparse
from pathlib import Path
from typing import List

import numpy as np

from ..core.errors import DCEPKInputError
from ..kinetics.aif import POPULATION_AIFS
from ..kinetics.aif_detection import KINDS
from ..pipeline.input_function import (AUTO_CURVE_FILE, AUTO_MASK_FILE, SPEC_FIELDS, InputFunctionSpec,
                                       SignalInputFunction)


def add_input_function_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    from .cli import FRACTION, OPEN_FRACTION, POSITIVE_INT, SECONDS, checked   # the command line's option types
    blood_t10 = checked(float, lambda v: InputFunctionSpec(population_aif="parker", blood_t10_s=v).check(),
                        "blood T10 in seconds")
    group = parser.add_argument_group("input function (one source)")
    source = group.add_mutually_exclusive_group(required=required)
    source.add_argument("--aif-roi", type=Path, help="mask or label map of an artery (or vein) ROI on the series' grid")
    source.add_argument("--aif-csv", type=Path, help="CSV with time (s) and blood concentration (mM)")
    source.add_argument("--population-aif", choices=list(POPULATION_AIFS))
    source.add_argument("--auto-aif", nargs="?", const="either", choices=list(KINDS),
                        help=f"detect the input function automatically (default either: the artery, else the vein); "
                             f"writes the voxels chosen ({AUTO_MASK_FILE}: 1 artery, 2 vein) and the curve "
                             f"({AUTO_CURVE_FILE})")
    group.add_argument("--aif-roi-label", type=POSITIVE_INT,
                       help=f"use only this label of the --aif-roi label map (e.g. 1, the arteries of {AUTO_MASK_FILE})")
    group.add_argument("--aif-top-fraction", type=OPEN_FRACTION,
                       help="use only this fraction of most enhancing ROI voxels")
    group.add_argument("--aif-is-plasma", action="store_true", help="the ROI/CSV curve is plasma, not blood")
    group.add_argument("--hct", type=FRACTION, default=0.45, help="haematocrit (fraction)")
    group.add_argument("--aif-delay", type=SECONDS, default=0.0, help="extra delay of the input function in seconds")
    group.add_argument("--blood-t10", type=blood_t10,
                       help="T10 of blood in seconds for the ROI / detected vessel (default: --t10; for --auto-aif "
                            "with a single --t10 value, 1.6 s)")


def has_input_function(args) -> bool:
    return any(getattr(args, name, None) is not None for name in ("aif_roi", "aif_csv", "population_aif", "auto_aif"))


def input_function_spec(args, series) -> InputFunctionSpec:
    """The spec the options give, the ROI read onto the series' grid (a label map: every non-zero label,
    or ``--aif-roi-label``)."""
    from ..io import read_mask
    mask = None
    if args.aif_roi:
        labels = read_mask(args.aif_roi, series.geometry, series.spatial_shape, labels=True)
        mask = labels != 0 if args.aif_roi_label is None else labels == args.aif_roi_label
        if not mask.any():
            raise DCEPKInputError(f"--aif-roi {args.aif_roi} has no voxel labelled {args.aif_roi_label}")
    elif args.aif_roi_label is not None:
        raise DCEPKInputError("--aif-roi-label picks a label of --aif-roi: give the ROI file too")
    values = {"aif_mask": mask, "aif_csv": str(args.aif_csv) if args.aif_csv else None,
              "population_aif": args.population_aif, "auto_aif": args.auto_aif,
              "aif_top_fraction": args.aif_top_fraction, "aif_is_plasma": args.aif_is_plasma, "hct": args.hct,
              "aif_delay_s": args.aif_delay, "blood_t10_s": args.blood_t10}
    assert set(values) == set(SPEC_FIELDS)
    return InputFunctionSpec(**values).check()


def input_function_targets(args, out_dir: Path) -> List[Path]:
    """The files the input function adds to a command's outputs (checked before any work)."""
    return [out_dir / AUTO_MASK_FILE, out_dir / AUTO_CURVE_FILE] if args.auto_aif else []


def stage_input_function_outputs(outputs, out_dir: Path, found: SignalInputFunction, times_s, geometry) -> List[Path]:
    """With automatic detection, stage its mask (uint8: 1 artery, 2 vein) and blood curve (CSV)."""
    if found is None or found.detection is None:
        return []
    from ..io import stage_volume
    mask_path, curve_path = out_dir / AUTO_MASK_FILE, out_dir / AUTO_CURVE_FILE
    stage_volume(outputs, mask_path, found.label_map.astype(np.uint8), geometry)
    outputs.add_text(curve_path, curve_csv(times_s, found.blood_mM))
    return [mask_path, curve_path]


def curve_csv(times_s, concentration_mM) -> str:
    """A curve as the CSV that --aif-csv reads back: time (s) from the first frame, concentration (mM)."""
    rows = "".join(f"{t:.6g},{c:.6g}\n" for t, c in zip(np.asarray(times_s) - times_s[0], concentration_mM))
    return "time (s),concentration (mM)\n" + rows


def check_no_input_function(args, why: str) -> None:
    if has_input_function(args):
        raise DCEPKInputError(f"{why}: leave out --aif-roi, --aif-csv, --population-aif and --auto-aif")
