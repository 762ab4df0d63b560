"""Choices made on the validation set only: the anchored head's band k (short pilot runs, one per
candidate), recorded in the card as ``selected_by``. Test sets never take part in a choice."""

import copy
import sys
import tempfile
from pathlib import Path
from typing import Dict, Sequence

from .trainer import train

SELECTION_RULE = ("lowest validation Ktrans median absolute error after a pilot run per candidate "
                  "(same seed and number of steps); validation = training AIF and protocol families, seed 900001")


def select_anchor_band(model_name: str, config: Dict, candidates: Sequence[float], pilot_steps: int,
                       device="auto", threads=None, log=sys.stderr, cancel=None) -> Dict:
    """Train a short pilot per candidate band (the same steps each: a busy machine does not favour one)
    and return ``{"anchor_band": best, "selected_by": {...}}``."""
    scores = {}
    with tempfile.TemporaryDirectory(prefix="dcepk_pilot_") as folder:
        for band in candidates:
            pilot = copy.deepcopy(config)
            pilot["network_config"]["anchor_band"] = float(band)
            card = train(model_name, pilot, steps=pilot_steps, device=device, out_dir=Path(folder) / f"band_{band:g}",
                         threads=threads, log=log, cancel=cancel)
            metrics = card["validation"]["metrics"]["Ktrans"]
            scores[f"{float(band):g}"] = {"median_abs_error": metrics["median_abs_error"],
                                          "gross_error_fraction": metrics["gross_error_fraction"],
                                          "steps": card["training"]["steps"]}
            print(f"[{model_name}] pilot anchor_band {band:g}: validation Ktrans median abs error "
                  f"{metrics['median_abs_error']:.5f}, gross {metrics['gross_error_fraction']:.4f}", file=log,
                  flush=True)
    best = min(scores, key=lambda band: scores[band]["median_abs_error"])
    return {"anchor_band": float(best), "selected_by": {"rule": SELECTION_RULE, "pilot_steps": pilot_steps,
                                                        "candidates": scores}}
