"""DCEPK pure core: DCE-MRI physics, tracer-kinetic fitting, file I/O and the ``dcepk`` CLI.

Imports only numpy, scipy, torch, SimpleITK and pydicom. Never imports ``slicer``, ``qt`` or
``vtk``; the MRML bridge (``mrml_bridge``) is the one module here that imports ``slicer`` and
is never imported from this package's other modules.

Units follow the OSIPI lexicon everywhere at the API: time in seconds (``*_s``), Ktrans and
PS in 1/min, Fp in ml/100ml/min, ve and vp as fractions, T1 in s, R1 in 1/s, flip angles in
degrees, TR in seconds, concentration in mM, relaxivity r1 in 1/(mM s).
"""

__version__ = "0.1.0"
