"""Shared test fixtures: reference data that skips on a user's machine and fails in CI."""

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for lib in ("DCEPKFitting", "DCEPKInference"):
    if str(ROOT / lib) not in sys.path:
        sys.path.insert(0, str(ROOT / lib))

from DCEPKFittingLib.core.reference_data import missing_reason, reference_data_required, reference_path  # noqa: E402


def require_reference(*parts: str) -> Path:
    """Path of a reference item; skip (user machine) or fail (CI) when it is absent."""
    reason = missing_reason(*parts)
    if reason:
        if reference_data_required():
            pytest.fail(reason + " (required because CI or DCEPK_REQUIRE_REFERENCE_DATA is set)")
        pytest.skip(reason)
    return reference_path(*parts)


@pytest.fixture
def reference():
    return require_reference


def import_or_skip(module_name: str, reason: str):
    """Import a test-only dependency; skip without it on a user's machine, fail in CI."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        message = f"{reason} ({error})"
        if reference_data_required():
            pytest.fail(message + " (required because CI or DCEPK_REQUIRE_REFERENCE_DATA is set)")
        pytest.skip(message, allow_module_level=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a killed one not yet reaped by its parent is a zombie: dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # no /proc (macOS): the signal test is all there is
        return True


@pytest.fixture
def untrained_conditioned_models(tmp_path_factory, monkeypatch):
    """``$DCEPK_MODELS_DIR`` pointing at the shipped models plus an untrained AIF-conditioned network under
    the default name (unless one is shipped): for tests of the input-function paths, which compare the
    input function each path resolves (with each other and with a phantom's truth), never the maps."""
    from DCEPKInferenceLib.nn.model_store import DEFAULT_MODELS_DIR, save_model
    from DCEPKInferenceLib.pipeline.inference import DEFAULT_CONDITIONED_MODEL

    folder = tmp_path_factory.getbasetemp() / "models_with_untrained_conditioned"
    if not folder.is_dir():
        folder.mkdir()
        for path in DEFAULT_MODELS_DIR.glob("*.*"):
            if path.suffix in (".json", ".safetensors"):
                (folder / path.name).symlink_to(path)
        if not (folder / f"{DEFAULT_CONDITIONED_MODEL}.json").exists():
            import torch

            from DCEPKInferenceLib.nn.input_definitions import ENCODING
            from DCEPKInferenceLib.nn.networks import build_network

            torch.manual_seed(0)
            model = build_network("hetero_encoder", {"mode": "aif_conditioned", "hidden": [8], "members": 1})
            card = {"network": "hetero_encoder", "network_config": model.config, "mode": "aif_conditioned",
                    "input_encoding": {k: ENCODING[k] for k in ("kind", "version", "kep_bank_per_min", "features")},
                    "description": "untrained, for tests of the input-function paths"}
            save_model(model, card, folder, DEFAULT_CONDITIONED_MODEL)
    monkeypatch.setenv("DCEPK_MODELS_DIR", str(folder))
    return folder
