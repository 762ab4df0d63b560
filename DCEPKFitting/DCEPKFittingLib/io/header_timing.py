"""Frame times from file headers: NIfTI (``toffset + n * pixdim[4]`` in the unit of ``xyzt_units``, read
directly: SimpleITK's handling of the time unit is not part of its API) and NRRD (the sequence index, or
Slicer MultiVolume frame labels)."""

import math
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..core.errors import DCEPKInputError
from .image_files import read_nifti_header, read_nrrd_header
from .series import TIME_UNITS_TO_S


_SLICER_TIME_TAGS = ("TriggerTime", "AcquisitionTime", "SeriesTime", "ContentTime", "Time")


_NIFTI_TIME_UNITS = {8: ("s", 1.0), 16: ("ms", 1e-3), 24: ("us", 1e-6)}


def nifti_timing(path: Path, n_frames: int):
    header = read_nifti_header(path)
    if header["dim"][0] >= 5 and header["dim"][5] > 1:
        raise DCEPKInputError(
            f"{path} stores {header['dim'][5]} values per voxel (a vector NIfTI, 5th dimension), not frames over "
            "time (4th dimension): give the DCE series")
    metadata = {"nifti_pixdim4": float(header["pixdim"][4]), "nifti_xyzt_units": header["xyzt_units"]}
    dt = float(header["pixdim"][4])
    unit_code = header["xyzt_units"] & 0x38
    if unit_code not in _NIFTI_TIME_UNITS:
        why = (f"the NIfTI time unit code is {unit_code} (not s, ms or us)" if unit_code else
               f"the NIfTI header gives pixdim[4] = {dt:g} without a time unit")
        return None, why, {"metadata": metadata}
    if not math.isfinite(dt) or dt <= 0:
        return None, f"the NIfTI header gives a frame interval pixdim[4] = {dt:g}", {"metadata": metadata}
    unit, scale = _NIFTI_TIME_UNITS[unit_code]
    toffset = header["toffset"] if math.isfinite(header["toffset"]) else 0.0
    metadata["timing_source"] = f"NIfTI toffset + n * pixdim[4] ({unit})"
    times = (toffset + np.arange(n_frames, dtype=np.float64) * dt) * scale
    return times, None, {"metadata": metadata}


def _nrrd_words(value: str) -> List[str]:
    """Split a per-axis field such as ``labels: "time" "" ""`` or ``kinds: list domain``."""
    value = value.strip()
    if '"' in value:
        return value.split('"')[1::2]
    return value.split()


def _float_list(text: str, where: str) -> np.ndarray:
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        return np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        raise DCEPKInputError(
            f"{where} holds non-numeric values ('{text[:60]}'): give the times with --times") from None


def _optional_float(text) -> Optional[float]:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def nrrd_timing(path: Path, n_frames: int):
    fields, keys, _ = read_nrrd_header(path)
    metadata = {"nrrd_keys": {k: v for k, v in keys.items() if len(v) < 200}}
    extra = {"metadata": metadata}
    fa = _optional_float(keys.get("MultiVolume.DICOM.FlipAngle"))
    tr_ms = _optional_float(keys.get("MultiVolume.DICOM.RepetitionTime"))
    extra["flip_angle_deg"] = fa
    extra["tr_s"] = tr_ms / 1000.0 if tr_ms is not None else None  # Slicer stores the DICOM value, in ms
    kind = keys.get("DCEPK.Kind", "").strip()
    if kind in ("signal", "concentration"):
        metadata["file_kind"] = kind

    kinds = _nrrd_words(fields.get("kinds", ""))
    not_frames = [k for k in kinds if k.lower() not in ("domain", "space", "time", "list", "vector", "none", "???")]
    if not_frames:
        raise DCEPKInputError(
            f"{path} is a {not_frames[0]} image (NRRD kind), not a dynamic series: give the DCE series")
    tag = keys.get("MultiVolume.FrameIdentifyingDICOMTagName", "").strip()
    tag_unit = keys.get("MultiVolume.FrameIdentifyingDICOMTagUnits", "").strip().lower()
    if tag and tag not in _SLICER_TIME_TAGS and tag_unit not in TIME_UNITS_TO_S:
        return None, (f"its frames are indexed by {tag} ({tag_unit or 'no unit'}), not by time: this is not a "
                      "DCE series"), extra

    # 1) Slicer volume-sequence index with a time unit: exact values.
    list_axis = next((a for a, k in enumerate(kinds) if k.lower() in ("list", "time", "vector")), None)
    problems = []
    if list_axis is not None and f"axis {list_axis} index values" in keys:
        units = _nrrd_words(fields.get("units", "")) if "units" in fields else []
        unit = units[list_axis].strip().lower() if list_axis < len(units) else ""
        if unit in TIME_UNITS_TO_S:
            values = _float_list(keys[f"axis {list_axis} index values"], "the sequence index values")
            if values.size == n_frames:
                metadata["timing_source"] = f"NRRD sequence index values ({unit})"
                return values * TIME_UNITS_TO_S[unit], None, extra
            problems.append(f"{values.size} sequence index values for {n_frames} frames")
        else:
            problems.append(f"the sequence index has no time unit ('{unit}')")

    # 2) Slicer MultiVolume frame labels (ms by Slicer's convention).
    if "MultiVolume.FrameLabels" in keys:
        labels = _float_list(keys["MultiVolume.FrameLabels"], "MultiVolume.FrameLabels")
        unit = tag_unit or "ms"
        if unit not in TIME_UNITS_TO_S:
            return None, f"MultiVolume.FrameLabels are in '{unit}', not a time unit", extra
        if labels.size != n_frames:
            problems.append(f"{labels.size} MultiVolume.FrameLabels for {n_frames} frames")
        else:
            metadata["timing_source"] = f"MultiVolume.FrameLabels ({unit})"
            return labels * TIME_UNITS_TO_S[unit], None, extra
    return None, "; ".join(problems) or "the NRRD header has no MultiVolume.FrameLabels or sequence index", extra
