"""DCEPK inference: pharmacokinetic maps (Ktrans, ve, vp, kep) with uncertainty, directly from
a DCE signal series by neural networks trained on physics-based synthetic data.

Pure core: numpy / scipy / torch / safetensors only, never ``slicer``, ``qt`` or ``vtk``.
Physics (tracer-kinetic and SPGR signal models, population AIFs) comes from ``DCEPKFittingLib``;
this package never re-implements it.

Modules: ``canonical_grid`` (any protocol -> fixed network input), ``simulator`` (training data),
``networks`` (the four architectures), ``training`` (``dcepk train``), ``model_store`` (shipped
weights + model cards, checksum-verified), ``inference`` (``run_inference``, ``dcepk infer``).
"""

__version__ = "0.1.0"
