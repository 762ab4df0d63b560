"""``dcepk infer``: the command line of ``run_inference`` (maps, their SDs and a JSON summary)."""

import argparse
import sys
from pathlib import Path
from typing import Optional

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.child_process import progress_reporter
from DCEPKFittingLib.core.output_files import OutputSet, check_targets
from DCEPKFittingLib.io import map_targets, read_mask, stage_maps
from DCEPKFittingLib.workflows.cli import (DEVICE, POSITIVE_INT, add_acquisition_options, add_progress_option,
                                           add_series_options, add_t10_options, print_messages, read_series_option,
                                           read_t10, write_summary)

from ..nn.model_store import check_model_name, list_models
from ..pipeline.inference import DEFAULT_MODEL, INFER_SUMMARY, MAP_ORDER, run_inference, training_protocol_ranges


def _model_name(text: str) -> str:
    try:
        return check_model_name(text)
    except DCEPKInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_infer_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="dcepk infer", description="Ktrans, ve, vp, kep maps with uncertainty by a neural network (no AIF)")
    parser.add_argument("input", type=Path, nargs="?", help="DCE signal series (DICOM folder, NIfTI, NRRD)")
    parser.add_argument("--model", default=DEFAULT_MODEL, type=_model_name, help="shipped network (see --list)")
    parser.add_argument("--out", type=Path, help="output folder for the maps")
    parser.add_argument("--device", default="auto", type=DEVICE, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--mask", type=Path, help="mask / label map on the series grid (default: auto)")
    add_t10_options(parser, " (required)")
    add_acquisition_options(parser)
    add_series_options(parser)
    parser.add_argument("--batch-voxels", type=POSITIVE_INT, default=65536, help="voxels per chunk (memory bound)")
    parser.add_argument("--no-protocol-calibration", action="store_true",
                        help="keep the card's SD factors for frame times outside the training ranges")
    parser.add_argument("--list", action="store_true", help="list the shipped models and exit")
    add_progress_option(parser)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def infer_main(argv=None) -> int:
    args = build_infer_parser().parse_args(argv)
    if args.list:
        for card in list_models():
            val = card.get("validation", {}).get("metrics", {}).get("Ktrans", {})
            frames, interval = training_protocol_ranges(card)
            trained = (f"\ttrained on {frames[0]}-{frames[1]} frames, {interval[0]:g}-{interval[1]:g} s apart"
                       if frames and interval else "")
            print(f"{card['name']}\t{card.get('description', '')}\tvalidation Ktrans RMSE "
                  f"{val.get('rmse', float('nan')):.4f} 1/min{trained}")
        return 0
    if args.input is None or args.out is None:
        raise DCEPKInputError("give the DCE series and an output folder: dcepk infer INPUT --out DIR")
    check_targets(map_targets(args.out, MAP_ORDER) + [args.out / INFER_SUMMARY], args.overwrite)
    series = read_series_option(args)
    mask = read_mask(args.mask, series.geometry, series.spatial_shape) if args.mask else None
    result = run_inference(series, args.model, mask=mask, device=args.device, fa_deg=args.fa, tr_s=args.tr,
                           t10_s=read_t10(args, series), r1_per_mM_s=args.r1, batch_voxels=args.batch_voxels,
                           baseline_frames=args.baseline_frames,
                           progress=progress_reporter(args.progress_format, f"infer {args.model}"),
                           protocol_calibration=not args.no_protocol_calibration)
    print_messages("note", result.messages)
    summary = {"command": "infer", "input": str(args.input), "model": args.model, "device": result.device,
               "timing_source": series.metadata.get("timing_source"), "times_s": series.times_s.tolist(),
               "baseline_frames": result.baseline_frames, "units": result.units, "notes": result.messages}
    with OutputSet(args.overwrite) as outputs:
        written = stage_maps(outputs, args.out, result.maps, result.geometry)
        write_summary(outputs, args.out / INFER_SUMMARY, summary)
        outputs.commit()
    print(f"{len(written)} maps ({', '.join(result.maps)}) written to {args.out} "
          f"[model {args.model}, device {result.device}, {result.baseline_frames} baseline frames]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(infer_main())
