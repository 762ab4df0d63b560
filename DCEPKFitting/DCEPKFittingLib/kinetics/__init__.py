"""Tracer kinetics: the forward models, input functions and the fitting engine.

``model`` (``TracerKineticModel``: a model of one protocol whose ``fit`` over curves or a volume returns a
``PKFit``; chunks on the cores), ``fit_result`` (``PKFit``, the one result type of fits and networks,
``FitStatus``, map names and units; numpy only), ``tk_models`` (forward models and Jacobians),
``array_backend`` (numpy and torch behind one interface), ``aif`` (population and ROI input functions),
``chunk_fit`` (one chunk: strategy per model, delay, model choice, errors and status), ``linear`` (bounded
linear least squares, Patlak), ``levenberg_marquardt``, ``varpro`` (variable projection for Tofts /
extended Tofts), ``nested_models`` (per-voxel model choice). The engine runs on numpy on the CPU and on
torch on a GPU; torch is imported only then.
"""
