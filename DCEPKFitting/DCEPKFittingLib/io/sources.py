"""What a path holds (DICOM, NIfTI, NRRD, MetaImage) and the checks every reader shares: frame times given
or read (and refused when they disagree), NaN / inf, geometry, the volume suffixes a writer accepts."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..core.errors import DCEPKInputError, setting
from ..core.geometry import Geometry
from ..core.plausibility import check_frame_times
from .series import finite_voxels


NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
_META_SUFFIXES = (".mha", ".mhd")
_DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_SUPPORTED = ("a folder (or list) of DICOM files, a multi-frame DICOM file, .nii, .nii.gz, .nrrd, .nhdr, "
              ".mha or .mhd")


@dataclass
class Loaded:
    signal: np.ndarray
    geometry: Geometry
    times_s: Optional[np.ndarray] = None
    timing_problem: Optional[str] = None  # why the file gives no timing
    flip_angle_deg: Optional[float] = None
    tr_s: Optional[float] = None
    metadata: dict = field(default_factory=dict)


def describe(path) -> str:
    if isinstance(path, (list, tuple)):
        return f"the {len(path)} DICOM files given"
    return str(path)


def lower_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES + NRRD_SUFFIXES + _META_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def source_kind(path) -> str:
    if isinstance(path, (list, tuple)):
        if not path:
            raise DCEPKInputError("the list of DICOM files is empty: give the files (or the folder) of the series")
        return "dicom"
    if path is None or str(path) == "":
        raise DCEPKInputError(f"no input given: give {_SUPPORTED}")
    path = Path(path)
    if not path.exists():
        raise DCEPKInputError(f"{path} does not exist: check the path (give {_SUPPORTED})")
    if path.is_dir():
        return "dicom"
    suffix = lower_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in NRRD_SUFFIXES:
        return "nrrd"
    if suffix in _META_SUFFIXES:
        return "meta"
    if suffix in _DICOM_SUFFIXES or _is_dicom_file(path):
        return "dicom"
    raise DCEPKInputError(f"unknown file type '{path.name}': give {_SUPPORTED}")


def _given_times(times_s, dt_s, n_frames, where) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Frame times given by the caller (``times_s`` or ``dt_s``) and how to name them, or (None, None)."""
    if times_s is not None:
        try:
            times = np.asarray(times_s, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise DCEPKInputError(f"frame times must be numbers in seconds, got {str(times_s)[:60]}") from None
        if times.size != n_frames:
            raise DCEPKInputError(
                f"{times.size} frame times given for the {n_frames} frames of {where}: give one time (s) per frame")
        return times, setting("--times", "times_s given")
    if dt_s is not None:
        try:
            dt = float(dt_s)
        except (TypeError, ValueError):
            dt = math.nan
        if not math.isfinite(dt) or dt <= 0:
            raise DCEPKInputError(f"the frame interval must be a positive number of seconds, got {dt_s}")
        return np.arange(n_frames, dtype=np.float64) * dt, setting("--dt", "dt_s given")
    return None, None


def resolve_times(file_times, problem, n_frames, times_s, dt_s, metadata, where, override) -> np.ndarray:
    times, source = _given_times(times_s, dt_s, n_frames, where)
    if times is None and file_times is not None:
        times = np.asarray(file_times, dtype=np.float64)
        source = metadata.get("timing_source", "file")
    elif times is None:
        raise DCEPKInputError(
            f"{where} has no usable frame times ({problem or 'none stored'}): give them with "
            f"{setting('--times', 'times_s')} (comma-separated seconds) or {setting('--dt', 'dt_s')} "
            "(frame interval in seconds)")
    if not np.all(np.isfinite(times)):
        raise DCEPKInputError(f"frame times of {where} ({source}) contain NaN or inf: give finite times in seconds")
    steps = np.diff(times)
    if np.any(steps <= 0):
        first = int(np.argmax(steps <= 0))
        raise DCEPKInputError(
            f"frame times of {where} ({source}) must increase strictly, but frame {first + 1} is at "
            f"{times[first + 1]:g} s after frame {first} at {times[first]:g} s: give increasing times in seconds")
    if file_times is not None and source != metadata.get("timing_source"):
        file_times = np.asarray(file_times, dtype=np.float64)
        if not override and not np.allclose(times - times[0], file_times - file_times[0], rtol=1e-6, atol=1e-6):
            shown = ", ".join(f"{t:g}" for t in file_times[:4]) + (", ..." if file_times.size > 4 else "")
            raise DCEPKInputError(
                f"{where} stores its own frame times ({metadata.get('timing_source', 'file')}: {shown} s), and "
                f"the {source} differ from them: leave them out to use the file's timing, or add "
                f"{setting('--override-timing', 'override_file_timing=True')} to replace it")
        metadata["file_times_s"] = file_times
    check_frame_times(times, f"the frame times of {where} ({source})")
    metadata["timing_source"] = source
    return times


def check_finite(signal: np.ndarray, where: str, nonfinite: str, metadata) -> None:
    if signal.dtype.kind not in "fc":
        return
    finite = finite_voxels(signal)
    if finite.all():
        return
    voxels = int(np.count_nonzero(~finite))
    values = int(np.count_nonzero(~np.isfinite(signal[~finite])))
    if nonfinite == "error":
        raise DCEPKInputError(
            f"{where} has {values} NaN/inf values (in {voxels} voxels): fix them in the source, or read the series "
            "keeping them (nonfinite='keep'), so that those voxels are reported as invalid input and not fitted")
    metadata["nonfinite_values"] = values
    metadata["nonfinite_voxels"] = voxels


def check_geometry(geometry) -> None:
    if not isinstance(geometry, Geometry):
        raise DCEPKInputError("a Geometry (spacing, origin, direction) is needed to write an image file")
    if not (np.all(np.isfinite(geometry.origin_lps)) and np.all(np.isfinite(geometry.direction_lps))):
        raise DCEPKInputError("the geometry has NaN/inf origin or direction: cannot write it")
    if abs(np.linalg.det(geometry.direction_lps)) < 1e-6:
        raise DCEPKInputError("the geometry's direction matrix is singular: axes must be independent")


def prepare_volume_array(array, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise DCEPKInputError(f"{what} has shape {array.shape}: a volume must be 3-D [k, j, i]")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    if array.dtype.kind in "iu":
        limits = np.iinfo(np.int32)
        if array.dtype.itemsize == 8 and array.size and limits.min <= array.min() and array.max() <= limits.max:
            return array.astype(np.int32)  # 64-bit integers are poorly supported by NIfTI/NRRD readers
        return array
    raise DCEPKInputError(f"{what} has data type {array.dtype}: write numbers (float or integer)")


def volume_suffix(target: Path) -> str:
    """The format suffix of a volume file to write; other names are refused."""
    name = Path(target).name.lower()
    for suffix in WRITE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DCEPKInputError(f"cannot tell the format of '{Path(target).name}': end the name in "
                          f"{', '.join(WRITE_SUFFIXES)}")
