"""DCEPK fitting core: DCE-MRI physics, tracer-kinetic fitting, file I/O and the ``dcepk`` CLI.

Folders, lowest layer first (a folder imports only from folders above it in this list; checked by
Testing/Python/test_architecture.py, described in docs/ARCHITECTURE.md):
``core`` (errors, geometry, units, device, output files, jobs), ``panels`` (the module panels' pure
logic), ``io`` (series files), ``signal`` (MR signal physics), ``kinetics`` (tracer-kinetic models and
the fitting engine), ``sims`` (phantom), ``analysis`` (statistics), ``pipeline`` (series -> maps in one
call), ``mrml`` (Slicer scene <-> core: the only folder besides ``widgets`` that imports ``slicer``),
``widgets`` (the Qt shell's shared code: the only folder that imports ``qt``), ``workflows`` (CLI, demo,
plugins: imported by nothing in the Lib).

Importing this package imports nothing else; the names below are loaded on first use (torch only by
the fitting engine, when a fit runs on a GPU).

Units follow the OSIPI lexicon everywhere at the API: time in seconds (``*_s``), Ktrans and
PS in 1/min, Fp in ml/100ml/min, ve and vp as fractions, T1 in s, R1 in 1/s, flip angles in
degrees, TR in seconds, concentration in mM, relaxivity r1 in 1/(mM s).
"""

from .core.lazy_exports import lazy_exports

__version__ = "0.1.0"

_PUBLIC = {
    "DCEPKInputError": "core.errors", "JobCancelledError": "core.errors", "Geometry": "core.geometry",
    "DCESeries": "io", "read_dce": "io", "read_volume": "io", "read_mask": "io", "write_volume": "io",
    "write_maps": "io", "write_dce_series": "io",
    "signal_to_concentration": "signal", "fit_vfa_t1": "signal", "spgr_signal": "signal",
    "TracerKineticModel": "kinetics.model", "PKFit": "kinetics.fit_result", "FitStatus": "kinetics.fit_result",
    "make_phantom": "sims.phantom", "label_statistics": "analysis.stats",
    "FitSettings": "pipeline.fit", "run_fit": "pipeline.fit",
}

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
