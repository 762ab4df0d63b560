"""``dcepk train``: the command line of ``training.train`` (and of ``--recalibrate``, ``--all``)."""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from DCEPKFittingLib.core.device import resolve_device
from DCEPKFittingLib.core.errors import DCEPKInputError

from ..nn.model_store import DEFAULT_MODELS_DIR
from ..nn.networks import NETWORKS
from ..training.calibration import recalibrate
from ..training.config import CONFIG_DIR, load_config, shipped_configs
from ..training.selection import select_anchor_band
from ..training.trainer import train


def build_train_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dcepk train",
                                               description="train an inference network on simulated DCE data")
    parser.add_argument("--model", choices=sorted(NETWORKS) + ["aif_reader"], help="network name")
    parser.add_argument("--all", action="store_true",
                        help="retrain every shipped model from its config (configs/*.json) into --out (default: the "
                             "shipped models folder) and rewrite its card; on CPU each run is cut to its config's "
                             "cpu_budget")
    parser.add_argument("--name", help="model name of the files and card (default: the network name; "
                                       "another name trains a variant beside it)")
    parser.add_argument("--config", type=Path,
                        help="training config JSON (default: the shipped configs/<name>.json)")
    parser.add_argument("--steps", type=int, help="optimiser steps (overrides the config)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", type=Path, help="output folder for weights + card (default: ./dcepk_models; "
                                                 "with --all the shipped models folder)")
    parser.add_argument("--resume", type=Path, help="checkpoint (.checkpoint.pt) to continue from")
    parser.add_argument("--init-from", type=Path,
                        help="folder with a trained model of this name: fine-tune from its weights")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--time-budget-min", type=float, help="cut the steps to fit this many minutes (slow machines)")
    parser.add_argument("--select-anchor-band", action="store_true",
                        help="AIF-conditioned models: choose the anchored head's band on the validation set by "
                             "short pilot runs of the config's candidates first (config 'selection')")
    parser.add_argument("--recalibrate", action="store_true",
                        help="only refit the SD calibration of the trained model in --out and rewrite its card")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def _train_one(network: str, name: str, config: dict, args, device, budget: Optional[float], threads) -> dict:
    if args.select_anchor_band or (args.all and config.get("selection")):
        selection = config.get("selection") or {}
        if "anchor_band_candidates" not in selection:
            raise DCEPKInputError(f"the config of {name} names no 'selection': anchor_band_candidates to choose from")
        pilot = json.loads(json.dumps(config))
        pilot["training"]["pool_subjects"] = selection.get("pilot_pool_subjects", pilot["training"]["pool_subjects"])
        chosen = select_anchor_band(network, pilot, selection["anchor_band_candidates"], selection["pilot_steps"],
                                    device, threads)
        config["network_config"]["anchor_band"] = chosen["anchor_band"]
        config["training"]["selected_by"] = chosen["selected_by"]
    return train(network, config, steps=args.steps, device=device, out_dir=args.out, resume=args.resume,
                 overwrite=args.overwrite, threads=threads, time_budget_min=budget, init_from=args.init_from,
                 name=name)


def _train_all(args) -> int:
    """Every shipped model from its config; on a CPU each run within its config's cpu_budget."""
    device = resolve_device(args.device)
    args.out = args.out or DEFAULT_MODELS_DIR
    for name, path in shipped_configs().items():
        network = json.loads(path.read_text())["network"]
        config = load_config(network, path)
        cpu = config.get("cpu_budget") or {}
        on_cpu = device == "cpu"
        budget = args.time_budget_min or (cpu.get("time_budget_min") if on_cpu else None)
        threads = args.threads or (cpu.get("threads") if on_cpu else None)
        print(f"dcepk train --all: {name} ({network}, {device}"
              + (f", {budget:g} min" if budget else "") + ")", file=sys.stderr, flush=True)
        _train_one(network, name, config, args, device, budget, threads)
    print("all shipped models retrained; now rewrite the benchmark: python Testing/Benchmarks/bench_inference.py "
          "--write-results", file=sys.stderr)
    return 0


def train_main(argv=None) -> int:
    args = build_train_parser().parse_args(argv)
    if args.all:
        if args.model or args.name or args.config or args.resume or args.init_from or args.recalibrate:
            raise DCEPKInputError("--all retrains every shipped model from its own config: give no --model, --name, "
                                  "--config, --resume, --init-from or --recalibrate with it")
        return _train_all(args)
    if not args.model:
        raise DCEPKInputError("give the network to train (--model) or --all")
    name = args.name or args.model
    args.out = args.out or Path("dcepk_models")
    if args.recalibrate:
        recalibrate(name, args.out, resolve_device(args.device))
        return 0
    config_path = args.config or (CONFIG_DIR / f"{name}.json" if args.name else None)
    _train_one(args.model, name, load_config(args.model, config_path), args, args.device, args.time_budget_min,
               args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
