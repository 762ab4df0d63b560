"""The spoiled gradient echo (SPGR) signal and the checks of its acquisition settings: flip angle in
degrees, TR in seconds, B1 as the ratio of actual to nominal flip angle."""

import numpy as np

from ..core.errors import DCEPKInputError, setting


def check_flip_angle(fa_deg, name="fa_deg"):
    """Flip angle(s) in degrees as a float array; catches radians and nonsense early."""
    fa = np.asarray(fa_deg, dtype=np.float64)
    shown = ", ".join(f"{v:g}" for v in fa.ravel()[:8])
    if fa.size == 0 or not np.all(np.isfinite(fa)):
        raise DCEPKInputError(f"{name} must be finite flip angle(s) in degrees; got {shown or 'none'}")
    if np.any(fa <= 0) or np.any(fa >= 180):
        raise DCEPKInputError(f"{name} must be between 0 and 180 degrees; got {shown}")
    if np.any(fa < 1.0):
        # Every DCE / VFA protocol uses >= 1 degree; values below 1 are almost surely radians.
        raise DCEPKInputError(
            f"{name} = {shown} looks like radians: pass flip angles in degrees "
            "(e.g. 15, not 0.26)")
    return fa


def check_tr(tr_s):
    """Repetition time in seconds as a float; catches milliseconds given by mistake."""
    name = setting("--tr", "tr_s")
    try:
        tr = float(tr_s)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"{name} must be one number (repetition time in seconds); got {tr_s}") from None
    if not np.isfinite(tr) or tr <= 0:
        raise DCEPKInputError(f"{name} must be a positive repetition time in seconds; got {tr:g}")
    if tr > 1.0:
        raise DCEPKInputError(
            f"{name} = {tr:g} s is longer than 1 s, which no SPGR protocol uses: TR looks like "
            "milliseconds; pass it in seconds (e.g. 0.005 for 5 ms)")
    return tr


def check_b1(b1, name="b1"):
    b = np.asarray(b1, dtype=np.float64)
    finite = b[np.isfinite(b)]
    if finite.size and (np.any(finite <= 0) or np.any(finite > 5)):
        raise DCEPKInputError(
            f"{name} is the ratio of actual to nominal flip angle (about 0.5-1.5); got values "
            f"from {finite.min():g} to {finite.max():g}. If the map is in percent, divide by 100")
    return b


def spgr_signal(s0, r1_per_s, fa_deg, tr_s, b1=1.0):
    """Steady-state SPGR signal S0 sin(a) (1 - E1) / (1 - cos(a) E1), E1 = exp(-TR R1).

    T2* decay is ignored (TE << T2*). ``s0`` is the equilibrium magnetisation scaled by the
    receive gain (the signal at 90 degrees with TR >> T1). Arguments broadcast with numpy rules.
    """
    fa = check_flip_angle(fa_deg)
    tr = check_tr(tr_s)
    alpha = np.deg2rad(fa * check_b1(b1))
    e1 = np.exp(-tr * np.asarray(r1_per_s, dtype=np.float64))
    return np.asarray(s0, dtype=np.float64) * np.sin(alpha) * (1.0 - e1) / (1.0 - np.cos(alpha) * e1)
