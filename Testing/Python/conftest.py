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
