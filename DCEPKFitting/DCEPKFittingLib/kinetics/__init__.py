"""Tracer kinetics: the forward models, input functions and the fitting engine.

``tk_models`` (forward models and Jacobians, numpy or torch), ``aif`` (population and ROI input functions),
``fit_result`` (``FitResult``, ``FitStatus``, map names and units; numpy only), ``fitting`` (``fit_curves``,
``fit_volume``: the driver, chunks on threads), ``chunk_fit`` (one chunk: strategy per model, delay, model
choice, errors and status), ``linear`` (bounded linear least squares, Patlak), ``levenberg_marquardt``,
``varpro`` (variable projection for Tofts / extended Tofts), ``nested_models`` (per-voxel model choice).
The engine (``fitting``, ``chunk_fit``, ``linear``, ``levenberg_marquardt``, ``varpro``, ``nested_models``)
imports torch; the rest does not.
"""
