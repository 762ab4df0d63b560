"""Locate the shared reference data (OSIPI, QIBA v6 DRO, Slicer MultiVolume phantoms).

The data is never copied into the repository. Tests find it through ``reference_data_dir``:
``$DCEPK_REFERENCE_DATA`` if set, else ``../shared/data`` beside the project root. When the
data is missing, a user's test run skips with the reason; a CI run (``CI`` or
``DCEPK_REQUIRE_REFERENCE_DATA`` set to a true value) fails instead, so CI never silently skips.
"""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]
_TRUE = {"1", "true", "yes", "on"}


def reference_data_dir() -> Path:
    env = os.environ.get("DCEPK_REFERENCE_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


def reference_data_required() -> bool:
    """True when a missing reference data set must be an error rather than a skip."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE
               for name in ("DCEPK_REQUIRE_REFERENCE_DATA", "CI"))


def reference_path(*parts: str) -> Path:
    """Path of a reference file or folder; it may not exist (see ``missing_reason``)."""
    return reference_data_dir().joinpath(*parts)


def missing_reason(*parts: str):
    """None when the reference item exists, else a sentence saying what is missing and how to get it."""
    path = reference_path(*parts)
    if path.exists():
        return None
    return (f"reference data {path} not found: put the shared data set there or point "
            f"DCEPK_REFERENCE_DATA at its folder")
