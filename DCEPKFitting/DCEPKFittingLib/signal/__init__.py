"""MR signal physics (modules ``spgr``, ``vfa_t1``, ``concentration``, ``baseline``, ``relaxivity``,
``rician``): spoiled gradient echo (SPGR) signal, variable-flip-angle T1 mapping,
signal to concentration by exact SPGR inversion, bolus-arrival (baseline) detection and
contrast-agent relaxivities.

Units (OSIPI lexicon): T1 in s, R1 in 1/s, flip angle in degrees (``fa_deg``), TR in s
(``tr_s``), concentration in mM, relaxivity r1 in 1/(mM s). ``b1`` is the ratio of actual to
nominal flip angle. Everything is vectorised over whole volumes; time / flip angle is the last
axis (``[k, j, i, t]``, ``[..., nFA]``).
"""

from .baseline import detect_baseline_frames
from .concentration import check_t10, signal_to_concentration
from .relaxivity import RELAXIVITY_R1, default_r1
from .spgr import check_flip_angle, check_tr, spgr_signal
from .vfa_t1 import T1FitStatus, fit_vfa_t1

__all__ = ["check_flip_angle", "check_t10", "check_tr", "default_r1", "detect_baseline_frames", "fit_vfa_t1",
           "RELAXIVITY_R1", "signal_to_concentration", "spgr_signal", "T1FitStatus"]
