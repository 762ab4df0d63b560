"""``dcepk infer``: the command line of ``run_inference`` (maps, their SDs and a JSON summary)."""

import argparse
import sys
from pathlib import Path
from typing import Optional

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.child_process import progress_reporter
from DCEPKFittingLib.core.output_files import OutputSet, check_targets
from DCEPKFittingLib.io import map_targets, read_mask, stage_maps, stage_volume
from DCEPKFittingLib.pipeline.input_function import AUTO_CURVE_FILE, AUTO_MASK_FILE
from DCEPKFittingLib.workflows.cli import (DEVICE, POSITIVE_INT, add_acquisition_options, add_progress_option,
                                           add_series_options, add_t10_options, print_messages, read_series_option,
                                           read_t10, write_summary)
from DCEPKFittingLib.workflows.input_function_options import (add_input_function_options, curve_csv,
                                                              has_input_function, input_function_spec,
                                                              input_function_targets, stage_input_function_outputs)

from ..nn.input_definitions import READ_CURVE_FILE, READ_MASK_FILE, ReadFromImage
from ..nn.model_store import check_model_name, list_models, model_mode, read_card
from ..pipeline.inference import (DEFAULT_CONDITIONED_MODEL, DEFAULT_MODEL, INFER_SUMMARY, MAP_ORDER, run_inference,
                                  training_protocol_ranges)

MODES = {"aif": "the input function given (--aif-roi, --aif-csv, --population-aif or --auto-aif) into an "
                "AIF-conditioned network",
         "image": "read from the image: the input function detected automatically (as --auto-aif either) and, where "
                  "no usable vessel is found, read by the reader network (aif_reader), into an AIF-conditioned "
                  "network",
         "aif-free": "a network that sees no input function (Ktrans known only up to the input function's "
                     "amplitude)"}


def _model_name(text: str) -> str:
    try:
        return check_model_name(text)
    except DCEPKInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_infer_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="dcepk infer", description="Ktrans, ve, vp, kep maps with uncertainty by a neural network")
    parser.add_argument("input", type=Path, nargs="?", help="DCE signal series (DICOM folder, NIfTI, NRRD)")
    parser.add_argument("--mode", choices=list(MODES),
                        help="; ".join(f"{k}: {v}" for k, v in MODES.items()) + " (default: aif with an input "
                             "function, image without one, or the --model's mode)")
    parser.add_argument("--model", type=_model_name,
                        help=f"shipped network (see --list; default {DEFAULT_CONDITIONED_MODEL}, or {DEFAULT_MODEL} "
                             "for --mode aif-free)")
    parser.add_argument("--out", type=Path, help="output folder for the maps")
    parser.add_argument("--device", default="auto", type=DEVICE, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--mask", type=Path, help="mask / label map on the series grid (default: auto)")
    add_input_function_options(parser, required=False)
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


def _list_models() -> int:
    for card in list_models():
        val = card.get("validation", {}).get("metrics", {}).get("Ktrans", {})
        frames, interval = training_protocol_ranges(card)
        trained = (f"\ttrained on {frames[0]}-{frames[1]} frames, {interval[0]:g}-{interval[1]:g} s apart"
                   if frames and interval else "")
        error = (f"median abs error {val['median_abs_error']:.4f}" if "median_abs_error" in val
                 else f"RMSE {val.get('rmse', float('nan')):.4f}")
        print(f"{card['name']}\t{model_mode(card)}\t{card.get('description', '')}\tvalidation Ktrans {error} 1/min"
              f"{trained}")
    return 0


def choose_mode_and_model(args):
    """(mode, model name): --mode, else aif with an input function, the --model's own mode, or image."""
    mode = args.mode
    if mode is None:
        if has_input_function(args):
            mode = "aif"
        elif args.model:
            mode = "aif-free" if model_mode(read_card(args.model)) == "aif_free" else "image"
        else:
            mode = "image"
    model = args.model or (DEFAULT_MODEL if mode == "aif-free" else DEFAULT_CONDITIONED_MODEL)
    if mode == "aif" and not has_input_function(args):
        raise DCEPKInputError("--mode aif needs an input function: --aif-roi, --aif-csv, --population-aif or --auto-aif")
    if mode != "aif" and has_input_function(args):
        raise DCEPKInputError(f"--mode {mode} takes no input function: leave out --aif-roi, --aif-csv, --population-aif "
                              "and --auto-aif, or use --mode aif")
    return mode, model


def infer_main(argv=None) -> int:
    args = build_infer_parser().parse_args(argv)
    if args.list:
        return _list_models()
    if args.input is None or args.out is None:
        raise DCEPKInputError("give the DCE series and an output folder: dcepk infer INPUT --out DIR")
    mode, model = choose_mode_and_model(args)
    reads_image = mode == "image"
    # image mode: detection's files, or the reader's where detection found no vessel
    read_targets = [args.out / READ_MASK_FILE, args.out / READ_CURVE_FILE] if reads_image else []
    detect_targets = [args.out / AUTO_MASK_FILE, args.out / AUTO_CURVE_FILE] if reads_image else []
    check_targets(map_targets(args.out, MAP_ORDER) + [args.out / INFER_SUMMARY] + input_function_targets(args, args.out)
                  + read_targets + detect_targets, args.overwrite)
    series = read_series_option(args)
    spec = ReadFromImage(hct=args.hct, blood_t10_s=args.blood_t10).check() if reads_image else \
        input_function_spec(args, series) if mode != "aif-free" else None
    mask = read_mask(args.mask, series.geometry, series.spatial_shape) if args.mask else None
    result = run_inference(series, model, mask=mask, device=args.device, fa_deg=args.fa, tr_s=args.tr,
                           t10_s=read_t10(args, series), r1_per_mM_s=args.r1, batch_voxels=args.batch_voxels,
                           baseline_frames=args.baseline_frames,
                           progress=progress_reporter(args.progress_format, f"infer {model}"),
                           protocol_calibration=not args.no_protocol_calibration, input_function=spec)
    print_messages("note", result.messages)
    summary = {"command": "infer", "input": str(args.input), "mode": mode, "model": model, "device": result.device,
               "input_function": spec.describe() if spec else None,
               "aif_plasma_mM": None if result.aif_plasma_mM is None else result.aif_plasma_mM.tolist(),
               "timing_source": series.metadata.get("timing_source"), "times_s": series.times_s.tolist(),
               "baseline_frames": result.baseline_frames, "units": result.units, "notes": result.messages}
    with OutputSet(args.overwrite) as outputs:
        written = stage_maps(outputs, args.out, result.maps, result.geometry)
        stage_input_function_outputs(outputs, args.out, result.input_function, series.times_s, result.geometry)
        if reads_image and result.input_function.detection is None:   # what the reader looked at, its curve
            stage_volume(outputs, read_targets[0], result.input_function.label_map, result.geometry)
            outputs.add_text(read_targets[1], curve_csv(series.times_s, result.aif_plasma_mM))
        write_summary(outputs, args.out / INFER_SUMMARY, summary)
        outputs.commit()
    print(f"{len(written)} maps ({', '.join(result.maps)}) written to {args.out} "
          f"[mode {mode}, model {model}, device {result.device}, {result.baseline_frames} baseline frames]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(infer_main())
