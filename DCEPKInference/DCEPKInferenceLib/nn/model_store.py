"""Shipped network weights and model cards: list, load (checksum-verified), save.

Each model is ``<name>.safetensors`` (weights only: safetensors never runs code) beside
``<name>.json`` (model card: architecture, config, simulator ranges, training budget,
validation metrics, code version, SHA-256 of the weights file). The default folder is
``DCEPKInference/Resources/Models``; ``$DCEPK_MODELS_DIR`` or the ``models_dir`` argument
points elsewhere (e.g. models retrained on a GPU).

Finding and reading the cards needs no torch (the module panel lists the networks before the user has
agreed to install it); torch and safetensors are imported by ``load_model`` and ``save_model``.
"""

import errno
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Tuple

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.output_files import OutputSet, sha256_of

from ..data.canonical_grid import INPUT_DESCRIPTION, PROTOCOL_FEATURES
from .input_definitions import ENCODING, READER_INPUT

SOURCE_MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"


def _default_models_dir() -> Path:
    """The Slicer module's Resources/Models (source tree, Slicer, editable install), else the
    copy a wheel installs as the data package ``DCEPKInferenceModels``."""
    if SOURCE_MODELS_DIR.is_dir():
        return SOURCE_MODELS_DIR
    spec = importlib.util.find_spec("DCEPKInferenceModels")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return SOURCE_MODELS_DIR


DEFAULT_MODELS_DIR = _default_models_dir()


def models_dir(path=None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get("DCEPK_MODELS_DIR")
    return Path(env) if env else DEFAULT_MODELS_DIR


def list_models(directory=None) -> List[Dict]:
    """Model cards (dicts) of every model in the folder, by name."""
    folder = models_dir(directory)
    cards = []
    for card_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(card, dict) and "sha256" in card and "network" in card:
            cards.append(card)
    return cards


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_model_name(name: str) -> str:
    """A model is named, never pathed: letters, digits, '_', '-', '.' only, so that a name always
    resolves inside the models folder (``../x`` or ``/tmp/x`` would load weights from elsewhere)."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name) or ".." in name:
        raise DCEPKInputError(f"'{name}' is not a model name: give the name of a model in the models folder "
                              "(letters, digits, '_', '-' and '.'; see dcepk infer --list), not a path")
    return name


def read_card(name: str, directory=None) -> Dict:
    check_model_name(name)
    folder = models_dir(directory)
    card_path = folder / f"{name}.json"
    if not card_path.is_file():
        names = [c["name"] for c in list_models(folder)]
        raise DCEPKInputError(f"no model '{name}' in {folder} (available: {', '.join(names) or 'none'}): "
                              "choose one of those or train it with 'dcepk train'")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as error:
        raise DCEPKInputError(f"model card {card_path} is not valid JSON ({error}): reinstall the model files") from None
    for key in ("network", "network_config", "sha256"):
        if key not in card:
            raise DCEPKInputError(f"model card {card_path} has no '{key}': reinstall the model files")
    _check_input(card, name, card_path)
    return card


def reader_installed(directory=None) -> bool:
    """Whether image-only mode's reader network (card mode 'aif_reader') is in the models folder."""
    return any(model_mode(card) == "aif_reader" for card in list_models(directory))


def model_mode(card: Dict) -> str:
    """'aif_conditioned' (takes an input function), 'aif_reader' (image-only mode's input-function reader)
    or 'aif_free' (cards written before the modes: aif_free)."""
    return card.get("mode", "aif_free")


def _check_input(card: Dict, name: str, card_path) -> None:
    """The network input the card names must be the one this version computes."""
    expected = {"canonical_grid": {"input": INPUT_DESCRIPTION, "protocol_features": list(PROTOCOL_FEATURES)},
                "input_encoding": {k: ENCODING[k] for k in ("kind", "version", "kep_bank_per_min", "features")}}
    expected["reader_input"] = READER_INPUT
    needs = {"aif_conditioned": ["input_encoding"], "aif_reader": ["reader_input"]}.get(model_mode(card),
                                                                                      ["canonical_grid"])
    for key in needs + [k for k in expected if k in card and k not in needs]:
        stated = card.get(key) or {}
        if any(json.loads(json.dumps(stated.get(field))) != json.loads(json.dumps(value))
               for field, value in expected[key].items()):
            raise DCEPKInputError(f"model '{name}' ({card_path}) was trained on another network input ({key}: "
                                  f"{stated.get('input', stated.get('kind', 'not stated'))!r}) than this version "
                                  "computes: install the models of this version or retrain with 'dcepk train'")


def load_model(name: str, device="cpu", directory=None) -> Tuple["torch.nn.Module", Dict]:
    """(network in eval mode on ``device``, model card). The weights' SHA-256 must match the card."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .networks import build_network

    folder = models_dir(directory)
    card = read_card(name, folder)
    weights = folder / f"{name}.safetensors"
    if not weights.is_file():
        raise DCEPKInputError(f"weights file {weights} for model '{name}' is missing: reinstall the extension's "
                              "model files or retrain with 'dcepk train'")
    digest = sha256_of(weights)
    if digest != card["sha256"]:
        raise DCEPKInputError(f"weights file {weights} is corrupt or not the one its model card describes "
                              f"(SHA-256 {digest[:12]}... != {card['sha256'][:12]}...): reinstall the model files")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise DCEPKInputError(f"weights file {weights} cannot be read ({error}): reinstall the model files") from None
    broken = [key for key, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise DCEPKInputError(f"weights file {weights} holds NaN or inf values ({len(broken)} tensors, e.g. "
                              f"{broken[0]}): it would give NaN maps; retrain or reinstall the model files")
    model = build_network(card["network"], card["network_config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise DCEPKInputError(f"weights in {weights} do not fit the '{card['network']}' architecture of its card "
                              f"({str(error)[:200]}): reinstall or retrain the model") from None
    return model.to(device).eval(), card


def training_totals(card: Dict) -> Tuple[int, float]:
    """Optimiser steps and wall seconds of a model's whole training, following the chain of
    ``training.initialised_from`` entries of fine-tuned models (a resumed run already counts
    its earlier steps)."""
    run = card["training"]
    steps, wall = int(run["steps"]), float(run.get("wall_s") or 0.0)
    parent = run.get("initialised_from")
    while parent:
        steps += int(parent["steps"])
        wall += float(parent.get("wall_s") or 0.0)
        parent = parent.get("initialised_from")
    return steps, wall


def save_model(model: "torch.nn.Module", card: Dict, directory, name: str, overwrite: bool = False) -> Dict:
    """Write ``<name>.safetensors`` and ``<name>.json`` (with the weights' SHA-256) atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    check_model_name(name)
    folder = Path(directory)
    targets = [folder / f"{name}.safetensors", folder / f"{name}.json"]
    if not overwrite and any(t.exists() for t in targets):
        raise DCEPKInputError(f"model '{name}' already exists in {folder}: choose another --out or pass --overwrite")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    written = {}

    def verify_weights(temporary: Path) -> None:
        try:
            readable = set(load_file(str(temporary))) == set(state)
        except (SafetensorError, ValueError):
            readable = False
        if not readable:
            raise OSError(errno.EIO, "the weights written do not read back")
        # the card's checksum is that of the staged file, which is published unchanged with it
        written.update(sha256=sha256_of(temporary), size=temporary.stat().st_size)

    with OutputSet(overwrite) as outputs:
        outputs.add_file(targets[0], lambda temporary: save_file(state, str(temporary)), verify=verify_weights)
        card = dict(card, name=name, sha256=written["sha256"], weights_bytes=written["size"])
        outputs.add_text(targets[1], json.dumps(card, indent=2, sort_keys=False))
        outputs.commit()
    return card
