"""The public readers: ``read_dce`` (a dynamic series from DICOM, NIfTI, NRRD or MetaImage; timing rules in
the package's docstring), ``read_volume`` and ``read_mask``."""

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..core.errors import DCEPKInputError, setting
from ..core.geometry import Geometry, align_to_grid
from .dicom import read_dicom
from .header_timing import nifti_timing, nrrd_timing
from .series import DCESeries
from .sitk_images import read_image, read_image_series
from .sources import check_finite, describe, resolve_times, source_kind


MIN_FRAMES = 3


def read_dce(path, times_s=None, dt_s=None, kind: Optional[str] = None, *, series_uid: Optional[str] = None,
             nonfinite: str = "error", override_file_timing: bool = False) -> DCESeries:
    """Read a dynamic series from DICOM, NIfTI, NRRD (Slicer MultiVolume / sequence) or MetaImage.

    ``times_s`` (seconds, one per frame) or ``dt_s`` (seconds) time a file that has no timing; a
    file's own, different timing is replaced only with ``override_file_timing=True``.
    ``kind`` is ``'signal'`` or ``'concentration'``; None takes it from the file (a series written
    by :func:`write_dce_series` records it), else ``'signal'``. A kind that contradicts the file's
    is an error.
    ``series_uid`` picks one series from a DICOM folder holding several; ``'all'`` reads them as one
    (for scanners that store each time point as its own series).
    ``nonfinite``: ``'error'`` refuses NaN/inf values; ``'keep'`` keeps them (the fit gives those
    voxels the invalid-input status) and counts them in ``metadata['nonfinite_voxels']``.
    """
    if times_s is not None and dt_s is not None:
        raise DCEPKInputError(f"give either frame times ({setting('--times', 'times_s')}) or a frame interval "
                              f"({setting('--dt', 'dt_s')}), not both")
    if nonfinite not in ("error", "keep"):
        raise DCEPKInputError(f"nonfinite must be 'error' or 'keep', got {nonfinite!r}")
    source = source_kind(path)
    if source == "dicom":
        loaded = read_dicom(path, series_uid=series_uid)
    elif source == "nifti":
        loaded = read_image_series(path, nifti_timing)
    elif source == "nrrd":
        loaded = read_image_series(path, nrrd_timing)
    else:
        loaded = read_image_series(path, lambda p, n: (None, "a MetaImage file stores no frame times", {}))

    signal = loaded.signal
    where = describe(path)
    if signal.ndim != 4:
        raise DCEPKInputError(
            f"{where} holds a single {signal.ndim}-D volume of shape {signal.shape} (k, j, i), not a dynamic "
            "series: give the whole DCE series (a 4-D file or the folder of all its DICOM frames)")
    n_frames = signal.shape[-1]
    if n_frames == 1 and source == "dicom" and not isinstance(path, (list, tuple)) and Path(path).is_file():
        raise DCEPKInputError(f"{where} is a single DICOM image: give the folder that holds all the files of the "
                              "dynamic series")
    if n_frames < MIN_FRAMES:
        raise DCEPKInputError(
            f"{where} has {n_frames} frame(s); a DCE analysis needs at least {MIN_FRAMES} "
            "(pre-contrast baseline and an uptake curve): check that the whole dynamic series was exported")

    metadata = dict(loaded.metadata)
    metadata.setdefault("source", where)
    times = resolve_times(loaded.times_s, loaded.timing_problem, n_frames, times_s, dt_s, metadata, where,
                           override_file_timing)

    check_finite(signal, where, nonfinite, metadata)
    file_kind = metadata.get("file_kind")
    if kind is None:
        kind = file_kind or "signal"
    elif file_kind and file_kind != kind:
        raise DCEPKInputError(
            f"{where} says it holds {file_kind} (its DCEPK.Kind), but it was to be read as {kind}: drop "
            f"{setting('--input-kind', 'kind')} to take the file's word, or fix the file")
    return DCESeries(signal=signal, times_s=times, geometry=loaded.geometry, flip_angle_deg=loaded.flip_angle_deg,
                     tr_s=loaded.tr_s, kind=kind, metadata=metadata)


def read_volume(path) -> Tuple[np.ndarray, Geometry]:
    """Read one volume (mask, label map, T1 map...) as ``(array [k, j, i], Geometry)``.

    The array keeps the file's data type (labels stay integers). A 4-D file (e.g. a stack of
    variable-flip-angle images) gives ``[k, j, i, n]``; a 2-D image gives one slice ``[1, j, i]``.
    A folder of DICOM files of one series is read as a volume too.
    """
    source = source_kind(path)
    if source == "dicom":
        loaded = read_dicom(path, series_uid=None, dynamic=False)
        array = loaded.signal[..., 0] if loaded.signal.shape[-1] == 1 else loaded.signal
        return array, loaded.geometry
    return read_image(path)


def read_mask(path, reference_geometry: Optional[Geometry], reference_shape, labels: bool = False) -> np.ndarray:
    """Read a mask or label map that must lie on the reference grid (``[k, j, i]`` of the series).

    Returns a boolean mask (any non-zero label), or with ``labels=True`` the integer labels.
    """
    array, geometry = read_volume(path)
    where = describe(path)
    if array.ndim != 3:
        raise DCEPKInputError(
            f"the mask {where} has shape {array.shape}; a mask must be a single 3-D volume [k, j, i]: "
            "export the segmentation as a label map volume")
    # a one-slice (or 2-D) mask of a multi-slice series is placed on its slice
    array = align_to_grid(array, geometry, tuple(reference_shape)[:3], reference_geometry,
                          "DCE series", f"mask {Path(str(path)).name}")
    if array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise DCEPKInputError(f"the mask {where} has {bad} NaN/inf voxels: save it as a label map (integers)")
        if np.any(array != np.round(array)):
            raise DCEPKInputError(
                f"the mask {where} has non-integer values (range {array.min():g} to {array.max():g}); it looks "
                "like a map or a probability image, not a mask: threshold it into a label map first")
    if labels:
        return np.rint(array).astype(np.int32) if array.dtype.kind == "f" else array.astype(np.int32)
    mask = array != 0
    if not mask.any():
        raise DCEPKInputError(f"the mask {where} is empty (no non-zero voxel): draw the region or pick another file")
    return mask
