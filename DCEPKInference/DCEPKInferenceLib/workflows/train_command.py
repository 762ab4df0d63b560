"""``dcepk train``: the command line of ``training.train`` (and of ``--recalibrate``)."""

import argparse
import sys
from pathlib import Path
from typing import Optional

from DCEPKFittingLib.core.device import resolve_device

from ..nn.networks import NETWORKS
from ..training.calibration import recalibrate
from ..training.config import CONFIG_DIR, load_config
from ..training.trainer import train


def build_train_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dcepk train",
                                               description="train an inference network on simulated DCE data")
    parser.add_argument("--model", required=True, choices=sorted(NETWORKS), help="network name")
    parser.add_argument("--name", help="model name of the files and card (default: the network name; "
                                       "another name trains a variant beside it)")
    parser.add_argument("--config", type=Path,
                        help="training config JSON (default: the shipped configs/<name>.json)")
    parser.add_argument("--steps", type=int, help="optimiser steps (overrides the config)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", type=Path, default=Path("dcepk_models"), help="output folder for weights + card")
    parser.add_argument("--resume", type=Path, help="checkpoint (.checkpoint.pt) to continue from")
    parser.add_argument("--init-from", type=Path,
                        help="folder with a trained model of this name: fine-tune from its weights")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--time-budget-min", type=float, help="cut the steps to fit this many minutes (slow machines)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="only refit the SD calibration of the trained model in --out and rewrite its card")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def train_main(argv=None) -> int:
    args = build_train_parser().parse_args(argv)
    name = args.name or args.model
    if args.recalibrate:
        recalibrate(name, args.out, resolve_device(args.device))
        return 0
    config_path = args.config or (CONFIG_DIR / f"{name}.json" if args.name else None)
    train(args.model, load_config(args.model, config_path), steps=args.steps, device=args.device, out_dir=args.out,
          resume=args.resume, overwrite=args.overwrite, threads=args.threads, time_budget_min=args.time_budget_min,
          init_from=args.init_from, name=name)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
