"""A package's public names loaded on first use, so that importing the package imports nothing heavy."""

import importlib
import sys
from typing import Callable, Dict, Tuple


def lazy_exports(package: str, public: Dict[str, str]) -> Tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``public`` maps a name to the submodule (relative to
    the package) that defines it, imported when the name is first asked for (PEP 562)."""
    def __getattr__(name):
        if name in public:
            return getattr(importlib.import_module(f"{package}.{public[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__
