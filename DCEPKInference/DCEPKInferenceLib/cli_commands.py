"""The inference package's commands and demo step, plugged into ``dcepk`` through entry points.

Imports of torch-heavy modules happen only when a command runs, so ``dcepk --help`` stays fast.
"""


def _infer(argv):
    from .inference import infer_main
    return infer_main(argv)


def _train(argv):
    from .training import train_main
    return train_main(argv)


def commands():
    return {
        "infer": ("neural-network maps with uncertainty, no AIF needed (dcepk infer --help)", _infer),
        "train": ("train a network on simulated DCE data (dcepk train --help)", _train),
    }


def demo_networks(series, mask, device, progress):
    """Maps of every shipped network on the demo series, keyed by network name."""
    from DCEPKFittingLib.jobs import sub_progress
    from .inference import run_inference
    from .model_store import list_models

    cards = list_models()
    results = {}
    for index, card in enumerate(cards):
        step = sub_progress(progress, index / len(cards), (index + 1) / len(cards))
        results[card["name"]] = run_inference(series, card["name"], mask=mask, device=device, progress=step).maps
    return results
