"""DCEPK inference: pharmacokinetic maps (Ktrans, ve, vp, kep) with uncertainty, directly from
a DCE signal series by neural networks trained on physics-based synthetic data.

Pure core: numpy / scipy / torch / safetensors, never ``qt``; ``mrml`` is the one folder that imports
``slicer``. Physics (tracer-kinetic and SPGR signal models, population AIFs) comes from
``DCEPKFittingLib``; this package never re-implements it, and the fitting package never imports it.

Folders, lowest layer first: ``data`` (canonical grid, simulator), ``analysis`` (metrics), ``nn``
(networks, model store), ``training`` (``dcepk train``'s engine, SD calibration), ``pipeline``
(``run_inference``), ``mrml`` (Slicer scene), ``workflows`` (``dcepk infer`` / ``train``, entry points).
The names below are loaded on first use.
"""

from DCEPKFittingLib.core.lazy_exports import lazy_exports

__version__ = "0.1.0"

_PUBLIC = {"run_inference": "pipeline.inference", "list_models": "nn.model_store", "load_model": "nn.model_store",
           "train": "training.trainer"}

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
