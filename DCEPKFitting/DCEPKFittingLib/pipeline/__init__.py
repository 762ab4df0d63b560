"""One call from a series to maps, below every front end: ``fit`` (``run_fit``: T1 -> concentration ->
input function -> fit). The CLI, the Slicer Logic (through ``mrml``) and the demo call it; the torch
engine is imported when a fit runs, not with this package.
"""

from .fit import FitOutput, FitSettings, run_fit

__all__ = ["FitOutput", "FitSettings", "run_fit"]
