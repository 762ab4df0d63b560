"""One call from a series to maps, below every front end: ``fit`` (``run_fit``: T1 -> concentration ->
input function -> fit), returning a ``kinetics.fit_result.PKFit``. The CLI, the Slicer Logic (through
``mrml``) and the demo call it; a CPU fit runs on numpy, so torch is not imported.
"""

from .fit import FitSettings, run_fit

__all__ = ["FitSettings", "run_fit"]
