"""Reading and writing DCE series, masks and maps (DICOM, NIfTI, NRRD, Slicer MultiVolume NRRD).

Public API
----------
``read_dce(path, times_s=None, dt_s=None, kind=None)`` -> :class:`DCESeries`
    ``path`` is a folder or list of DICOM files, a multi-frame DICOM file, a 4-D NIfTI
    (``.nii``/``.nii.gz``), a 4-D NRRD (``.nrrd``/``.nhdr``, including Slicer MultiVolume and
    volume-sequence files) or a 4-D MetaImage (``.mha``/``.mhd``, no timing: give it).
``read_volume(path)`` -> ``(array [k, j, i], Geometry)`` (a 4-D file gives ``[k, j, i, n]``).
``read_mask(path, reference_geometry, reference_shape, labels=False)`` -> bool (or int) ``[k, j, i]``.
``write_volume(path, array, geometry, overwrite=False)`` -> Path (NIfTI, NRRD or MetaImage by suffix).
``write_dce_series(path, series, overwrite=False)`` -> Path (Slicer MultiVolume / sequence NRRD).
``write_maps(out_dir, maps, geometry, suffix='.nii.gz', overwrite=False)`` -> list of Paths.
``stage_volume`` / ``stage_dce_series`` / ``stage_maps`` add the same files to an
``output_files.OutputSet``, so that one command publishes all its outputs or none.

Every writer goes through ``output_files``: staged under a unique temporary name, verified (the
header read back against the data size), published atomically. Every reader keeps NaN and inf
(NIfTI data are read here: SimpleITK's NIfTI reader turns them into 0) and refuses a file whose
data are shorter than its header says, naming both sizes.

Timing rules (all times in seconds in the API)
----------------------------------------------
* An explicit ``times_s`` (one per frame) or ``dt_s`` (frame ``n`` at ``n * dt_s``) is for files
  without timing. Where the file has its own, different times, they are refused unless
  ``override_file_timing=True`` (``--override-timing``); giving both is an error.
* Times must look like seconds: a median frame interval over 300 s (or a series over 3 h) or under
  0.05 s is refused as a unit mistake (ms or minutes).
* DICOM: frames are ordered and timed by the first of AcquisitionTime (with AcquisitionDate),
  TriggerTime, ContentTime (with ContentDate) that differs between the images of every slice
  position. Times are relative to the first frame (frame 0 at 0 s), because clock times have
  no meaningful zero. For a 2-D multi-slice acquisition, a frame's time is the mean of its
  slices' times (``metadata['frame_time_spread_s']`` says how far they are apart). A TriggerTime
  missing from the first frame only is taken as 0 ms (as in the QIBA v6 phantom). Slices are
  sorted along the slice normal; a folder mixing series is an error that lists them
  (``series_uid=`` picks one, ``'all'`` joins series that each hold one time point).
* NRRD: the sequence index (``axis N index values`` with a time unit), else
  ``MultiVolume.FrameLabels`` (milliseconds unless ``MultiVolume.FrameIdentifyingDICOMTagUnits``
  says otherwise), kept as stored (not shifted to 0) so files round-trip exactly.
* NIfTI: ``toffset + n * pixdim[4]`` in the unit of ``xyzt_units`` (s, ms or us).
* Otherwise :class:`DCEPKInputError` asks for ``--times``/``--dt`` in seconds.
"""

import errno
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..core.errors import DCEPKInputError, setting
from ..core.geometry import Geometry, align_to_grid, check_same_grid
from .image_files import (TruncatedFileError, check_complete, read_nifti_data, read_nifti_header, read_nrrd_data,
                          read_nrrd_header)
from ..core.output_files import IncompleteWrite, OutputSet, check_targets
from ..core.plausibility import check_frame_times


@dataclass
class DCESeries:
    """A dynamic series: ``signal[k, j, i, t]`` with explicit frame times in seconds.

    ``flip_angle_deg`` and ``tr_s`` come from the file header when it has them, else None
    (the caller must then supply them for signal-to-concentration conversion).
    ``kind`` is ``"signal"`` (arbitrary units) or ``"concentration"`` (mM).
    """

    signal: np.ndarray
    times_s: np.ndarray
    geometry: Geometry = field(default_factory=Geometry)
    flip_angle_deg: Optional[float] = None
    tr_s: Optional[float] = None
    kind: str = "signal"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.signal = np.asarray(self.signal)
        if self.signal.ndim != 4:
            raise DCEPKInputError(
                f"a DCE series must be 4-D [k, j, i, t]; got an array of shape {self.signal.shape}. "
                "A single 3-D volume has no time course: load the whole dynamic series")
        if self.times_s is None:
            raise DCEPKInputError("the DCE series has no frame times: give them (--times or --dt in seconds)")
        self.times_s = np.asarray(self.times_s, dtype=np.float64).ravel()
        if self.times_s.size != self.signal.shape[-1]:
            raise DCEPKInputError(
                f"{self.times_s.size} frame times for {self.signal.shape[-1]} frames: give one time per frame")
        if not np.all(np.isfinite(self.times_s)) or np.any(np.diff(self.times_s) <= 0):
            raise DCEPKInputError("frame times must be finite and strictly increasing (seconds)")
        if self.kind not in ("signal", "concentration"):
            raise DCEPKInputError(f"unknown series kind '{self.kind}': use 'signal' or 'concentration'")

    @property
    def spatial_shape(self):
        return self.signal.shape[:3]

    @property
    def n_frames(self) -> int:
        return self.signal.shape[-1]


MIN_FRAMES = 3
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_NRRD_SUFFIXES = (".nrrd", ".nhdr")
_META_SUFFIXES = (".mha", ".mhd")
_DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
_WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_SUPPORTED = ("a folder (or list) of DICOM files, a multi-frame DICOM file, .nii, .nii.gz, .nrrd, .nhdr, "
              ".mha or .mhd")
# Seconds per time unit, for every reader of frame times (files and the Slicer scene).
TIME_UNITS_TO_S = {"s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
                   "ms": 1e-3, "msec": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
                   "us": 1e-6, "usec": 1e-6, "microsecond": 1e-6, "microseconds": 1e-6,
                   "min": 60.0, "minute": 60.0, "minutes": 60.0}
_SLICER_TIME_TAGS = ("TriggerTime", "AcquisitionTime", "SeriesTime", "ContentTime", "Time")


# ---------------------------------------------------------------------------------------------
# Public readers
# ---------------------------------------------------------------------------------------------

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
    source = _source_kind(path)
    if source == "dicom":
        loaded = _read_dicom(path, series_uid=series_uid)
    elif source == "nifti":
        loaded = _read_image_series(path, _nifti_timing)
    elif source == "nrrd":
        loaded = _read_image_series(path, _nrrd_timing)
    else:
        loaded = _read_image_series(path, lambda p, n: (None, "a MetaImage file stores no frame times", {}))

    signal = loaded.signal
    where = _describe(path)
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
    times = _resolve_times(loaded.times_s, loaded.timing_problem, n_frames, times_s, dt_s, metadata, where,
                           override_file_timing)

    _check_finite(signal, where, nonfinite, metadata)
    file_kind = metadata.get("file_kind")
    if kind is None:
        kind = file_kind or "signal"
    elif file_kind and file_kind != kind:
        raise DCEPKInputError(
            f"{where} says it holds {file_kind} (its DCEPK.Kind), but it was to be read as {kind}: drop "
            f"{setting('--input-kind', 'kind')} to take the file's word, or fix the file")
    return DCESeries(signal=signal, times_s=times, geometry=loaded.geometry, flip_angle_deg=loaded.flip_angle_deg,
                     tr_s=loaded.tr_s, kind=kind, metadata=metadata)


@dataclass
class VFASeries:
    """Variable-flip-angle images read from DICOM: ``signals [k, j, i, n]`` (one volume per flip
    angle, increasing), ``flip_angles_deg (n,)``, ``tr_s``, ``geometry`` and where they came from."""
    signals: np.ndarray
    flip_angles_deg: np.ndarray
    tr_s: float
    geometry: Geometry
    notes: List[str] = field(default_factory=list)


def read_vfa_dicom(path) -> VFASeries:
    """A variable-flip-angle T1 acquisition from a DICOM folder (or file list): the images are
    grouped by their FlipAngle header, one volume per flip angle (one series for all, or one series
    per flip angle), and TR is read from RepetitionTime (ms in DICOM; seconds here). Errors name
    what is missing or inconsistent: no flip angle, one flip angle only, different TRs or grids."""
    where = _describe(path)
    datasets, _ = _read_dicom_datasets(_dicom_files(path), isinstance(path, (list, tuple)))
    images = [image for filename, dataset in datasets for image in _dicom_images(filename, dataset)]
    if not images:
        raise DCEPKInputError(f"no DICOM images found in {where}: give the folder of the variable-flip-angle images")
    if any(image.flip_angle_deg is None for image in images):
        raise DCEPKInputError(f"some DICOM images in {where} have no FlipAngle header: give the flip angles (--fa)")
    row, column = _check_uniform(images, where)
    normal = np.cross(row, column)
    by_angle: Dict[float, List[_DicomImage]] = {}
    for image in images:
        by_angle.setdefault(round(float(image.flip_angle_deg), 3), []).append(image)
    if len(by_angle) < 2:
        raise DCEPKInputError(f"all images in {where} have the flip angle {next(iter(by_angle)):g} deg: VFA T1 mapping "
                              "needs images at two or more flip angles")
    volumes, trs, geometry, shape = [], [], None, None
    for angle in sorted(by_angle):
        slices = _group_slices(by_angle[angle], normal, f"the {angle:g} deg images of {where}")
        if len(slices[0]) != 1:
            raise DCEPKInputError(f"{len(slices[0])} images per slice position at {angle:g} deg in {where}: keep one "
                                  "image per slice and flip angle (the VFA series only)")
        angle_geometry = _dicom_geometry(slices, row, column, normal, where)
        volume = np.stack([_dicom_pixels(group[0]) for group in slices])
        if geometry is None:
            geometry, shape = angle_geometry, volume.shape
        elif volume.shape != shape or not geometry.is_close(angle_geometry):
            raise DCEPKInputError(f"the {angle:g} deg images of {where} are not on the grid of the others: VFA images "
                                  "must share one field of view and slice positions")
        volumes.append(volume)
        trs += [image.tr_ms for image in by_angle[angle] if image.tr_ms is not None]
    if not trs:
        raise DCEPKInputError(f"the DICOM images of {where} have no RepetitionTime header: give TR (--tr, seconds)")
    if max(trs) - min(trs) > 1e-3 * max(trs):
        raise DCEPKInputError(f"the images of {where} have different repetition times ({min(trs):g}-{max(trs):g} ms): "
                              "VFA T1 mapping needs one TR for all flip angles")
    angles = np.array(sorted(by_angle))
    tr_s = float(np.median(trs)) / 1000.0
    return VFASeries(np.stack(volumes, axis=-1), angles, tr_s, geometry,
                     [f"flip angles {', '.join(f'{a:g}' for a in angles)} deg and TR {tr_s * 1000:g} ms "
                      "from the DICOM headers"])


def read_volume(path) -> Tuple[np.ndarray, Geometry]:
    """Read one volume (mask, label map, T1 map...) as ``(array [k, j, i], Geometry)``.

    The array keeps the file's data type (labels stay integers). A 4-D file (e.g. a stack of
    variable-flip-angle images) gives ``[k, j, i, n]``; a 2-D image gives one slice ``[1, j, i]``.
    A folder of DICOM files of one series is read as a volume too.
    """
    source = _source_kind(path)
    if source == "dicom":
        loaded = _read_dicom(path, series_uid=None, dynamic=False)
        array = loaded.signal[..., 0] if loaded.signal.shape[-1] == 1 else loaded.signal
        return array, loaded.geometry
    return _read_image(path)


def read_mask(path, reference_geometry: Optional[Geometry], reference_shape, labels: bool = False) -> np.ndarray:
    """Read a mask or label map that must lie on the reference grid (``[k, j, i]`` of the series).

    Returns a boolean mask (any non-zero label), or with ``labels=True`` the integer labels.
    """
    array, geometry = read_volume(path)
    where = _describe(path)
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


# ---------------------------------------------------------------------------------------------
# Public writers
# ---------------------------------------------------------------------------------------------

def write_volume(path, array, geometry: Geometry, overwrite: bool = False) -> Path:
    """Write a 3-D volume ``[k, j, i]`` as NIfTI (.nii/.nii.gz), NRRD (.nrrd) or MetaImage (.mha).

    Floating-point data is written as float32, booleans as uint8, integers as they are. The file
    is staged, verified and published by ``output_files``; an existing target is refused unless
    ``overwrite=True``.
    """
    with OutputSet(overwrite) as outputs:
        stage_volume(outputs, path, array, geometry)
        return outputs.commit()[0]


def stage_volume(outputs: OutputSet, path, array, geometry: Geometry) -> Path:
    """Add a volume file to ``outputs`` (see :func:`write_volume`)."""
    target = Path(path)
    array = _prepare_volume_array(array, what=f"the volume for {target.name}")
    suffix = volume_suffix(target)
    _check_geometry(geometry)
    return _stage_volume_file(outputs, target, suffix, array, geometry)


def write_dce_series(path, series: DCESeries, overwrite: bool = False) -> Path:
    """Write a series as a 3D Slicer MultiVolume / volume-sequence NRRD that :func:`read_dce` reads back.

    The file has a ``list`` axis first (frames), ``MultiVolume.FrameLabels`` in ms, the sequence
    index ``axis 0 index values`` in seconds, and ``MultiVolume.DICOM.FlipAngle`` (deg) /
    ``MultiVolume.DICOM.RepetitionTime`` (ms) when known. Name it ``*.seq.nrrd`` for Slicer to load
    it as a volume sequence by default.
    """
    if not isinstance(series, DCESeries):
        raise DCEPKInputError("write_dce_series needs a DCESeries (signal [k, j, i, t] with times_s)")
    signal = np.asarray(series.signal)
    if signal.dtype == bool:
        signal = signal.astype(np.uint8)
    elif signal.dtype.kind == "f" and signal.dtype != np.float64:
        signal = signal.astype(np.float32, copy=False)
    with OutputSet(overwrite) as outputs:
        stage_dce_series(outputs, path, [signal], signal.shape, signal.dtype, series.times_s, series.geometry,
                         series.flip_angle_deg, series.tr_s, series.kind)
        return outputs.commit()[0]


def stage_dce_series(outputs: OutputSet, path, slabs, shape, dtype, times_s, geometry: Geometry,
                     flip_angle_deg=None, tr_s=None, kind: str = "signal") -> Path:
    """Add a DCE series file to ``outputs``, written from ``slabs``: arrays ``[k0:k1, j, i, t]`` in
    slice order that together make ``shape`` (an iterable, so a series can be written as it is made
    without ever being whole in memory)."""
    target = Path(path)
    if not target.name.lower().endswith(".nrrd"):
        raise DCEPKInputError(
            f"a DCE series is written as NRRD: name the file '*.seq.nrrd' or '*.nrrd', not {target.name}")
    times_s = np.asarray(times_s, dtype=np.float64)
    _check_geometry(geometry)
    keys = _multivolume_keys(times_s, flip_angle_deg, tr_s, kind)
    header = _nrrd_header(np.dtype(dtype), tuple(shape), geometry, keys, list_axis=True)
    return outputs.add_stream(target, lambda handle: _write_nrrd(handle, header, slabs),
                              verify=lambda temporary: _verify_image(temporary, target, int(np.prod(shape))))


def write_maps(out_dir, maps: Dict[str, np.ndarray], geometry: Geometry, suffix: str = ".nii.gz",
               overwrite: bool = False) -> List[Path]:
    """Write every map as ``out_dir/<name><suffix>``: all of them or none.

    Every target is checked before anything is written; all files are staged and verified, and
    only then published, so a failure leaves no partial set behind and earlier files as they were.
    """
    with OutputSet(overwrite) as outputs:
        stage_maps(outputs, out_dir, maps, geometry, suffix)
        return outputs.commit()


def map_targets(out_dir, names, suffix: str = ".nii.gz") -> List[Path]:
    """The files :func:`write_maps` writes for these map names (for checking them before a run)."""
    suffix = _map_suffix(suffix)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DCEPKInputError(f"{out_dir} exists and is not a folder: choose another output folder")
    targets = []
    for name in names:
        if not isinstance(name, str) or not name or name != Path(name).name or name.startswith("."):
            raise DCEPKInputError(f"map name {name!r} cannot be a file name: use a plain name such as 'Ktrans'")
        targets.append(out_dir / f"{name}{suffix}")
    return targets


def _map_suffix(suffix: str) -> str:
    suffix = (suffix if suffix.startswith(".") else "." + suffix).lower()
    if suffix not in _WRITE_SUFFIXES:
        raise DCEPKInputError(f"unknown map format '{suffix}': use one of {', '.join(_WRITE_SUFFIXES)}")
    return suffix


def stage_maps(outputs: OutputSet, out_dir, maps: Dict[str, np.ndarray], geometry: Geometry,
               suffix: str = ".nii.gz") -> List[Path]:
    """Add every map to ``outputs`` (see :func:`write_maps`)."""
    if not maps:
        raise DCEPKInputError("no maps to write")
    targets = map_targets(out_dir, list(maps), suffix)
    _check_geometry(geometry)
    prepared, shape = [], None
    for (name, array), target in zip(maps.items(), targets):
        array = _prepare_volume_array(array, what=f"map '{name}'")
        if shape is not None and array.shape != shape:
            raise DCEPKInputError(
                f"map '{name}' has shape {array.shape} but the others {shape}: maps must share one grid")
        shape = array.shape
        prepared.append((target, array))
    check_targets(targets, outputs.overwrite)
    return [_stage_volume_file(outputs, target, _map_suffix(suffix), array, geometry) for target, array in prepared]


# ---------------------------------------------------------------------------------------------
# Source detection and common helpers
# ---------------------------------------------------------------------------------------------

@dataclass
class _Loaded:
    signal: np.ndarray
    geometry: Geometry
    times_s: Optional[np.ndarray] = None
    timing_problem: Optional[str] = None  # why the file gives no timing
    flip_angle_deg: Optional[float] = None
    tr_s: Optional[float] = None
    metadata: dict = field(default_factory=dict)


def _describe(path) -> str:
    if isinstance(path, (list, tuple)):
        return f"the {len(path)} DICOM files given"
    return str(path)


def _lower_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _NIFTI_SUFFIXES + _NRRD_SUFFIXES + _META_SUFFIXES:
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


def _source_kind(path) -> str:
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
    suffix = _lower_suffix(path)
    if suffix in _NIFTI_SUFFIXES:
        return "nifti"
    if suffix in _NRRD_SUFFIXES:
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


def _resolve_times(file_times, problem, n_frames, times_s, dt_s, metadata, where, override) -> np.ndarray:
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


def finite_voxels(signal: np.ndarray, block: int = 65536) -> np.ndarray:
    """bool ``[k, j, i]``: voxels whose whole curve is finite (by blocks of voxels: no 4-D boolean
    copy of the series)."""
    flat = signal.reshape(-1, signal.shape[-1])
    finite = np.empty(flat.shape[0], dtype=bool)
    for start in range(0, flat.shape[0], block):
        finite[start:start + block] = np.isfinite(flat[start:start + block]).all(axis=-1)
    return finite.reshape(signal.shape[:-1])


def _check_finite(signal: np.ndarray, where: str, nonfinite: str, metadata) -> None:
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


def _check_geometry(geometry) -> None:
    if not isinstance(geometry, Geometry):
        raise DCEPKInputError("a Geometry (spacing, origin, direction) is needed to write an image file")
    if not (np.all(np.isfinite(geometry.origin_lps)) and np.all(np.isfinite(geometry.direction_lps))):
        raise DCEPKInputError("the geometry has NaN/inf origin or direction: cannot write it")
    if abs(np.linalg.det(geometry.direction_lps)) < 1e-6:
        raise DCEPKInputError("the geometry's direction matrix is singular: axes must be independent")


def _prepare_volume_array(array, what: str) -> np.ndarray:
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
    for suffix in _WRITE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DCEPKInputError(f"cannot tell the format of '{Path(target).name}': end the name in "
                          f"{', '.join(_WRITE_SUFFIXES)}")


# ---------------------------------------------------------------------------------------------
# SimpleITK-based images (NIfTI, NRRD, MetaImage)
# ---------------------------------------------------------------------------------------------

def _sitk_read(path, information_only: bool = False):
    """A SimpleITK image (or, with ``information_only``, a reader holding only the header)."""
    import SimpleITK as sitk
    try:
        if information_only:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return reader
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        if _lower_suffix(Path(path)) in _NIFTI_SUFFIXES:
            read_nifti_header(Path(path))  # names the problem (e.g. NIfTI-2) when it can
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise DCEPKInputError(
            f"cannot read {path}: the file is damaged or not a readable image ({first_line[:200]}); "
            "re-export it from the scanner or from Slicer") from None


def _geometry_of(source) -> Geometry:
    """3-D geometry of a SimpleITK image or header reader (a 2-D image is one slice; a 4-D one its first 3 axes)."""
    dimension = source.GetDimension()
    spacing = np.array(source.GetSpacing(), dtype=np.float64)
    origin = np.array(source.GetOrigin(), dtype=np.float64)
    direction = np.array(source.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    if dimension == 2:
        return Geometry(spacing=[spacing[0], spacing[1], 1.0], origin_lps=[origin[0], origin[1], 0.0],
                        direction_lps=[[direction[0, 0], direction[0, 1], 0.0],
                                       [direction[1, 0], direction[1, 1], 0.0], [0.0, 0.0, 1.0]])
    return Geometry(spacing=spacing[:3], origin_lps=origin[:3], direction_lps=direction[:3, :3])


def _check_dimension(dimension: int, components: int) -> None:
    if dimension == 4 and components > 1:
        raise DCEPKInputError("a 4-D image with several components per voxel is not a DCE series or volume")
    if dimension not in (2, 3, 4):
        raise DCEPKInputError(f"a {dimension}-D image is neither a volume nor a DCE series: give a 3-D volume "
                              "or a 4-D series (x, y, z, time)")


def _read_image(path) -> Tuple[np.ndarray, Geometry]:
    """Array with spatial axes ``[k, j, i]`` (then components / time last, contiguous) and the 3-D
    geometry. NaN and inf are kept; data shorter than the header says are refused."""
    suffix = _lower_suffix(Path(path))
    if suffix in _NIFTI_SUFFIXES + _NRRD_SUFFIXES:
        # read here: straight into the final array (one copy in memory), NaN kept (see image_files)
        information = _sitk_read(path, information_only=True)
        dimension, components = information.GetDimension(), information.GetNumberOfComponents()
        _check_dimension(dimension, components)
        if suffix in _NIFTI_SUFFIXES:
            array = read_nifti_data(path, information.GetSize()) if components == 1 else None
        else:
            array = read_nrrd_data(path, information.GetSize(), components)
        if array is not None:
            return (array[np.newaxis] if dimension == 2 else array), _geometry_of(information)
    check_complete(path)
    import SimpleITK as sitk
    image = _sitk_read(path)
    dimension = image.GetDimension()
    _check_dimension(dimension, image.GetNumberOfComponentsPerPixel())
    view = sitk.GetArrayViewFromImage(image)
    if dimension == 4:
        array = np.ascontiguousarray(np.moveaxis(view, 0, -1))  # SimpleITK gives [t, k, j, i]
    else:
        array = np.array(view[np.newaxis] if dimension == 2 else view)  # one copy; the image is freed below
    geometry = _geometry_of(image)
    del view, image
    return array, geometry


def _read_image_series(path, timing_reader) -> _Loaded:
    array, geometry = _read_image(path)
    if array.dtype.kind in "iu" or array.dtype == bool:
        # Fitting needs floats; float32 holds 16-bit integers exactly.
        array = array.astype(np.float32 if array.dtype.itemsize <= 2 else np.float64)
    metadata = {"format": _lower_suffix(Path(path)).lstrip(".")}
    times, problem, extra = (None, None, {})
    if array.ndim == 4:
        times, problem, extra = timing_reader(Path(path), array.shape[-1])
    metadata.update(extra.get("metadata", {}))
    return _Loaded(signal=array, geometry=geometry, times_s=times, timing_problem=problem,
                   flip_angle_deg=extra.get("flip_angle_deg"), tr_s=extra.get("tr_s"), metadata=metadata)


def _sitk_image(array: np.ndarray, geometry: Geometry):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(v) for v in geometry.spacing])
    image.SetOrigin([float(v) for v in geometry.origin_lps])
    image.SetDirection([float(v) for v in geometry.direction_lps.ravel()])  # row-major; columns are the axes
    return image


def _stage_volume_file(outputs: OutputSet, target: Path, suffix: str, array: np.ndarray, geometry: Geometry) -> Path:
    if suffix == ".nrrd":
        header = _nrrd_header(array.dtype, array.shape, geometry, {}, list_axis=False)
        return outputs.add_stream(target, lambda handle: _write_nrrd(handle, header, [array]),
                                  verify=lambda temporary: _verify_image(temporary, target, array.size))
    return outputs.add_file(target, lambda temporary: _write_sitk_file(temporary, suffix, array, geometry),
                            verify=lambda temporary: _verify_image(temporary, target, array.size))


def _write_sitk_file(temporary: Path, suffix: str, array: np.ndarray, geometry: Geometry) -> None:
    import SimpleITK as sitk
    try:
        sitk.WriteImage(_sitk_image(array, geometry), str(temporary), useCompression=suffix in (".nii.gz", ".mha"))
    except RuntimeError as error:
        raise OSError(errno.EIO, f"SimpleITK could not write it: {str(error).strip().splitlines()[-1][:200]}") \
            from None


def _verify_image(temporary: Path, target: Path, voxels: int) -> None:
    """A written image file read back: the header's voxel count and data as long as it announces.
    SimpleITK's NIfTI writer does not report a short write (a full disk), so this is where it shows."""
    try:
        check_complete(temporary)
        information = _sitk_read(temporary, information_only=True)
    except TruncatedFileError as error:
        raise IncompleteWrite(errno.EIO, f"{error.actual:,} of {error.expected:,} bytes of image data") from None
    except DCEPKInputError:
        raise IncompleteWrite(errno.EIO, "it does not read back as an image") from None
    written = int(np.prod(information.GetSize())) * information.GetNumberOfComponents()
    if written != voxels:
        raise IncompleteWrite(errno.EIO, f"its header holds {written} voxels instead of {voxels}")


# ---------------------------------------------------------------------------------------------
# NIfTI timing (header read directly: SimpleITK's handling of the time unit is not part of its API)
# ---------------------------------------------------------------------------------------------

_NIFTI_TIME_UNITS = {8: ("s", 1.0), 16: ("ms", 1e-3), 24: ("us", 1e-6)}


def _nifti_timing(path: Path, n_frames: int):
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


# ---------------------------------------------------------------------------------------------
# NRRD: header parsing (timing keys), Slicer MultiVolume / sequence timing, and writing
# ---------------------------------------------------------------------------------------------

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


def _nrrd_timing(path: Path, n_frames: int):
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


_NRRD_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "short", "uint16": "ushort", "int32": "int",
               "uint32": "uint", "int64": "int64", "uint64": "uint64", "float32": "float", "float64": "double"}


def _format_number(value: float) -> str:
    return repr(float(value))  # shortest text that reads back to the same double


def _nrrd_header(dtype: np.dtype, shape: tuple, geometry: Geometry, keys: Dict[str, str], list_axis: bool) -> bytes:
    """Header of a gzip NRRD in LPS; with ``list_axis`` the last array axis (frames) becomes NRRD axis 0."""
    type_name = _NRRD_TYPES.get(np.dtype(dtype).name)
    if type_name is None:
        raise DCEPKInputError(f"cannot write data type {dtype} to NRRD: use float32/64 or integers")
    # C order [k, j, i(, t)]: the last array axis varies fastest, and NRRD lists the fastest axis first.
    sizes = list(reversed(shape))
    vectors = [geometry.direction_lps[:, axis] * geometry.spacing[axis] for axis in range(3)]
    directions = " ".join("(" + ",".join(_format_number(v) for v in vector) + ")" for vector in vectors)
    lines = ["NRRD0005", "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html", f"type: {type_name}",
             f"dimension: {len(shape)}", "space: left-posterior-superior",
             "sizes: " + " ".join(str(s) for s in sizes)]
    if list_axis:
        lines += [f"space directions: none {directions}", "kinds: list domain domain domain",
                  'labels: "time" "" "" ""', 'units: "s" "" "" ""']
    else:
        lines += [f"space directions: {directions}", "kinds: domain domain domain"]
    lines += ["endian: little", "encoding: gzip",
              "space origin: (" + ",".join(_format_number(v) for v in geometry.origin_lps) + ")"]
    lines += [f"{key}:={value}" for key, value in keys.items()]
    return ("\n".join(lines) + "\n\n").encode("latin-1")


def _write_nrrd(handle, header: bytes, slabs) -> None:
    """Write ``header`` and the gzip-compressed data of ``slabs`` (C-order arrays, in order)."""
    import gzip
    handle.write(header)
    with gzip.GzipFile(fileobj=handle, mode="wb", compresslevel=4, mtime=0) as stream:
        for slab in slabs:
            data = np.ascontiguousarray(slab, dtype=slab.dtype.newbyteorder("<"))
            flat = data.reshape(-1).view(np.uint8)
            chunk = 64 << 20
            for start in range(0, flat.size, chunk):
                stream.write(flat[start:start + chunk])


def _multivolume_keys(times_s: np.ndarray, fa_deg, tr_s, kind: str) -> Dict[str, str]:
    times_ms = times_s * 1000.0
    keys = {
        "DataNodeClassName": "vtkMRMLScalarVolumeNode",
        "axis 0 index type": "numeric",
        "axis 0 index values": " ".join(_format_number(t) for t in times_s),  # seconds, exact
        "MultiVolume.FrameIdentifyingDICOMTagName": "TriggerTime",
        "MultiVolume.FrameIdentifyingDICOMTagUnits": "ms",
        "MultiVolume.FrameLabels": ",".join(format(t, ".15g") for t in times_ms),
        "MultiVolume.NumberOfFrames": str(len(times_s)),
        "DCEPK.Kind": kind,
    }
    if fa_deg is not None:
        keys["MultiVolume.DICOM.FlipAngle"] = _format_number(fa_deg)
    if tr_s is not None:
        keys["MultiVolume.DICOM.RepetitionTime"] = _format_number(float(tr_s) * 1000.0)
    return keys


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------

_TIME_TAG_ORDER = ("AcquisitionTime", "TriggerTime", "ContentTime")
_POSITION_TOLERANCE_MM = 0.01


@dataclass
class _DicomImage:
    """One 2-D image: a single-frame file or one frame of a multi-frame file."""
    filename: str
    frame: Optional[int]
    dataset: object
    series_uid: str
    rows: int
    columns: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    times_s: Dict[str, Optional[float]]
    order_keys: Dict[str, Optional[float]]
    slope: float = 1.0
    intercept: float = 0.0
    flip_angle_deg: Optional[float] = None
    tr_ms: Optional[float] = None
    slice_thickness: Optional[float] = None
    spacing_between_slices: Optional[float] = None


def _parse_tm(text) -> Optional[float]:
    """DICOM TM (HHMMSS.FFFFFF, or the old HH:MM:SS form) to seconds since midnight."""
    if text is None:
        return None
    text = str(text).strip().replace(":", "")
    if not text:
        return None
    try:
        hours = int(text[0:2])
        minutes = int(text[2:4]) if len(text) >= 4 else 0
        seconds = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return hours * 3600.0 + minutes * 60.0 + seconds


def _parse_da(text) -> Optional[float]:
    """DICOM DA (YYYYMMDD) to seconds since 1970, so that times across midnight stay ordered."""
    text = str(text or "").strip().replace(".", "")
    if len(text) != 8:
        return None
    try:
        return (datetime(int(text[:4]), int(text[4:6]), int(text[6:8])) - datetime(1970, 1, 1)).total_seconds()
    except ValueError:
        return None


def _parse_dt(text) -> Optional[float]:
    """DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX) to seconds since 1970 (time zone ignored)."""
    text = str(text or "").strip()
    for sign in "+-":
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    day = _parse_da(text[:8])
    if day is None:
        return None
    clock = _parse_tm(text[8:]) if len(text) > 8 else 0.0
    return None if clock is None else day + clock


def _clock_time(dataset, time_keyword: str, date_keyword: str) -> Optional[float]:
    clock = _parse_tm(dataset.get(time_keyword))
    if clock is None:
        return None
    day = _parse_da(dataset.get(date_keyword))
    return clock + (day if day is not None else 0.0)


def _number(value) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, str):
            value = list(value)[0]
        number = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def _vector(value, size: int) -> Optional[np.ndarray]:
    try:
        vector = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return vector if vector.size == size and np.all(np.isfinite(vector)) else None


def _dicom_files(path) -> List[Path]:
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DCEPKInputError(f"{len(missing)} of the DICOM files given do not exist (e.g. {missing[0]}): "
                                  "check the file list")
        return files
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(Path(root) / name for root, _, names in os.walk(path) for name in names
                   if not name.startswith("."))
    if not files:
        raise DCEPKInputError(f"the folder {path} is empty: give the folder that holds the DICOM files of the series")
    return files


def _read_dicom_datasets(files: List[Path], explicit: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError
    datasets, skipped = [], []
    for filename in files:
        try:
            # Pixel data is read later, only for the chosen series' files (memory stays at the size
            # of the headers while sorting); measured no slower on the 1321-file QIBA phantom.
            dataset = pydicom.dcmread(str(filename), defer_size=4096)
        except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            if explicit:
                raise DCEPKInputError(f"{filename} is not a readable DICOM file ({type(error).__name__}): "
                                      "remove it from the list") from None
            skipped.append(str(filename))
            continue
        datasets.append((str(filename), dataset))
    return datasets, skipped


def _pixel_measures(dataset, frame_group=None):
    """Position, orientation, spacing from a frame's functional groups, else the top-level dataset."""
    def first_item(container, keyword):
        if container is None:
            return None
        sequence = container.get(keyword)
        return sequence[0] if sequence else None

    shared = first_item(dataset, "SharedFunctionalGroupsSequence") if frame_group is not None else None

    def find(sequence_keyword, keyword):
        if frame_group is not None:  # enhanced multi-frame: per-frame group, then shared group
            for source in (frame_group, shared):
                item = first_item(source, sequence_keyword)
                if item is not None and keyword in item:
                    return item.get(keyword)
        return dataset.get(keyword)

    position = _vector(find("PlanePositionSequence", "ImagePositionPatient") or [], 3)
    orientation = _vector(find("PlaneOrientationSequence", "ImageOrientationPatient") or [], 6)
    spacing = _vector(find("PixelMeasuresSequence", "PixelSpacing") or [], 2)
    thickness = _number(find("PixelMeasuresSequence", "SliceThickness"))
    between = _number(find("PixelMeasuresSequence", "SpacingBetweenSlices"))
    slope = _number(find("PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _number(find("PixelValueTransformationSequence", "RescaleIntercept"))
    return position, orientation, spacing, thickness, between, slope, intercept


def _dicom_images(filename: str, dataset) -> List[_DicomImage]:
    """The 2-D images of one DICOM file, with the keys used to sort them. Empty if it has no image."""
    if "PixelData" not in dataset or "Rows" not in dataset or "Columns" not in dataset:
        return []
    series_uid = str(dataset.get("SeriesInstanceUID", ""))
    fa = _number(dataset.get("FlipAngle"))
    tr_ms = _number(dataset.get("RepetitionTime"))
    n_frames = int(_number(dataset.get("NumberOfFrames")) or 1)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    images = []
    if n_frames > 1 and per_frame is not None and len(per_frame) == n_frames:
        shared = dataset.get("SharedFunctionalGroupsSequence")
        shared = shared[0] if shared else None
        for frame in range(n_frames):
            group = per_frame[frame]
            position, orientation, spacing, thickness, between, slope, intercept = _pixel_measures(dataset, group)
            content = group.get("FrameContentSequence")
            content = content[0] if content else {}
            times = {"AcquisitionTime": _parse_dt(content.get("FrameAcquisitionDateTime")),
                     "TriggerTime": None, "ContentTime": _parse_dt(content.get("FrameReferenceDateTime"))}
            cardiac = group.get("CardiacSynchronizationSequence")
            if cardiac:
                delay = _number(cardiac[0].get("NominalCardiacTriggerDelayTime"))
                times["TriggerTime"] = delay / 1000.0 if delay is not None else None
            timing = None
            for source in (group, shared):
                sequence = source.get("MRTimingAndRelatedParametersSequence") if source is not None else None
                if sequence:
                    timing = sequence[0]
                    break
            frame_fa = _number(timing.get("FlipAngle")) if timing is not None else None
            frame_tr = _number(timing.get("RepetitionTime")) if timing is not None else None
            images.append(_DicomImage(
                filename=filename, frame=frame, dataset=dataset, series_uid=series_uid,
                rows=int(dataset.Rows), columns=int(dataset.Columns), position=position, orientation=orientation,
                pixel_spacing=spacing, times_s=times,
                order_keys={"TemporalPositionIndex": _number(content.get("TemporalPositionIndex")),
                            "InstanceNumber": float(frame)},
                slope=slope if slope is not None else 1.0, intercept=intercept if intercept is not None else 0.0,
                flip_angle_deg=frame_fa if frame_fa is not None else fa,
                tr_ms=frame_tr if frame_tr is not None else tr_ms, slice_thickness=thickness,
                spacing_between_slices=between))
        return images
    position, orientation, spacing, thickness, between, slope, intercept = _pixel_measures(dataset)
    trigger_ms = _number(dataset.get("TriggerTime"))
    times = {"AcquisitionTime": _clock_time(dataset, "AcquisitionTime", "AcquisitionDate"),
             "TriggerTime": trigger_ms / 1000.0 if trigger_ms is not None else None,
             "ContentTime": _clock_time(dataset, "ContentTime", "ContentDate")}
    if times["AcquisitionTime"] is None and dataset.get("AcquisitionDateTime"):
        times["AcquisitionTime"] = _parse_dt(dataset.get("AcquisitionDateTime"))
    order = {"TemporalPositionIdentifier": _number(dataset.get("TemporalPositionIdentifier")),
             "InstanceNumber": _number(dataset.get("InstanceNumber"))}
    for frame in ([None] if n_frames == 1 else range(n_frames)):
        images.append(_DicomImage(
            filename=filename, frame=frame, dataset=dataset, series_uid=series_uid, rows=int(dataset.Rows),
            columns=int(dataset.Columns), position=position, orientation=orientation, pixel_spacing=spacing,
            times_s=dict(times), order_keys=dict(order), slope=slope if slope is not None else 1.0,
            intercept=intercept if intercept is not None else 0.0, flip_angle_deg=fa, tr_ms=tr_ms,
            slice_thickness=thickness, spacing_between_slices=between))
    return images


def _series_summary(uid: str, images: List[_DicomImage]) -> str:
    dataset = images[0].dataset
    number = dataset.get("SeriesNumber", "?")
    description = str(dataset.get("SeriesDescription", "")).strip() or "no description"
    return f"  series {number} '{description}': {len(images)} images, SeriesInstanceUID {uid or '(none)'}"


def _choose_series(images: List[_DicomImage], series_uid: Optional[str], where: str) -> List[_DicomImage]:
    by_series: Dict[str, List[_DicomImage]] = {}
    for image in images:
        by_series.setdefault(image.series_uid, []).append(image)
    if series_uid == "all":
        return images
    if series_uid is not None:
        if series_uid not in by_series:
            raise DCEPKInputError(f"{where} has no series with SeriesInstanceUID {series_uid}; it holds:\n"
                                  + "\n".join(_series_summary(u, i) for u, i in by_series.items()))
        return by_series[series_uid]
    if len(by_series) > 1:
        summary = "\n".join(_series_summary(u, i) for u, i in sorted(by_series.items(), key=lambda item: -len(item[1])))
        shapes = {(len(i), i[0].rows, i[0].columns) for i in by_series.values()}
        hint = ("\nAll have the same number and size of images: if the scanner stored each time point as its own "
                f"series, read them together with {setting('--series-uid all', 'series_uid=all')}." if len(shapes) == 1
                else "")
        raise DCEPKInputError(
            f"{where} mixes {len(by_series)} DICOM series; give the folder of the dynamic series alone, or choose "
            f"one with {setting('--series-uid UID', 'series_uid=UID')}:\n{summary}{hint}")
    return next(iter(by_series.values()))


def _check_uniform(images: List[_DicomImage], where: str) -> Tuple[np.ndarray, np.ndarray]:
    first = images[0]
    if first.orientation is None or first.position is None or first.pixel_spacing is None:
        missing = [name for name, value in (("ImageOrientationPatient", first.orientation),
                                            ("ImagePositionPatient", first.position),
                                            ("PixelSpacing", first.pixel_spacing)) if value is None]
        raise DCEPKInputError(f"the DICOM images of {where} lack {', '.join(missing)}: the voxel geometry is unknown; "
                              "export the series with its geometry, or convert it to NIfTI/NRRD first")
    for image in images:
        if (image.rows, image.columns) != (first.rows, first.columns):
            raise DCEPKInputError(
                f"{where} mixes images of {first.rows}x{first.columns} and {image.rows}x{image.columns} pixels "
                f"({image.filename}): keep only the dynamic series' images")
        if image.orientation is None or np.max(np.abs(image.orientation - first.orientation)) > 1e-4:
            raise DCEPKInputError(f"{where} mixes image orientations ({image.filename}): keep only the dynamic series")
        if image.pixel_spacing is None or np.max(np.abs(image.pixel_spacing - first.pixel_spacing)) > 1e-4:
            raise DCEPKInputError(f"{where} mixes pixel spacings ({image.filename}): keep only the dynamic series")
        if image.position is None:
            raise DCEPKInputError(f"{image.filename} has no ImagePositionPatient: cannot place it in the volume")
    row = first.orientation[:3] / np.linalg.norm(first.orientation[:3])
    column = first.orientation[3:] / np.linalg.norm(first.orientation[3:])
    return row, column


def _group_slices(images: List[_DicomImage], normal: np.ndarray, where: str) -> List[List[_DicomImage]]:
    """Images grouped by slice position, slices sorted along the normal."""
    coordinates = np.array([float(image.position @ normal) for image in images])
    order = np.argsort(coordinates, kind="stable")
    groups: List[List[_DicomImage]] = []
    last = None
    for index in order:
        if last is None or coordinates[index] - last > _POSITION_TOLERANCE_MM:
            groups.append([])
        groups[-1].append(images[index])
        last = coordinates[index]
    for group in groups:
        spread = max(float(np.max(np.abs(image.position - group[0].position))) for image in group)
        if spread > 0.1:
            raise DCEPKInputError(f"images of the same slice in {where} are shifted by {spread:.2f} mm: the folder "
                                  "mixes acquisitions with different fields of view; keep only the dynamic series")
    counts = [len(group) for group in groups]
    if len(set(counts)) > 1:
        detail = ", ".join(f"slice {n}: {c}" for n, c in enumerate(counts) if c != max(set(counts), key=counts.count))
        raise DCEPKInputError(
            f"{where} has {len(groups)} slice positions but not the same number of images at each "
            f"(most have {max(set(counts), key=counts.count)}; {detail}): files are missing or another series is "
            "mixed in; export the complete dynamic series")
    return groups


def _time_tag(groups: List[List[_DicomImage]], where: str) -> Tuple[Optional[str], List[str]]:
    """First tag of AcquisitionTime, TriggerTime, ContentTime that orders every slice's images."""
    notes = []
    repeated = None  # a tag that varies but repeats at one position: several images per time point
    for tag in _TIME_TAG_ORDER:
        usable = True
        filled = False
        for group in groups:
            values = [image.times_s[tag] for image in group]
            present = [v for v in values if v is not None]
            missing = len(values) - len(present)
            if len(set(present)) != len(present) or len(present) < 2:
                if len(set(present)) > 1 and repeated is None:
                    repeated = (tag, len(present) - len(set(present)))
                usable = False
                break
            if missing == 1 and tag == "TriggerTime" and min(present) > 0:
                filled = True  # e.g. QIBA v6: the first frame's TriggerTime is empty, meaning 0
            elif missing:
                usable = False
                break
        if usable:
            if filled:
                for group in groups:
                    for image in group:
                        if image.times_s[tag] is None:
                            image.times_s[tag] = 0.0
                notes.append("one image per slice had no TriggerTime; it was taken as 0 ms (the first frame)")
            return tag, notes
    if repeated is not None:
        raise DCEPKInputError(
            f"in {where}, {repeated[1]} image(s) at one slice position repeat a {repeated[0]} of another: the series "
            "holds several images per time point (echoes, magnitude and phase, or duplicate files); export or "
            "copy only the dynamic magnitude images")
    return None, notes


def _read_dicom(path, series_uid: Optional[str], dynamic: bool = True) -> _Loaded:
    where = _describe(path)
    files = _dicom_files(path)
    explicit = isinstance(path, (list, tuple))
    datasets, skipped = _read_dicom_datasets(files, explicit)
    images: List[_DicomImage] = []
    for filename, dataset in datasets:
        images.extend(_dicom_images(filename, dataset))
    if not images:
        raise DCEPKInputError(
            f"no DICOM images found in {where} ({len(files)} files, {len(skipped)} not DICOM, "
            f"{len(datasets)} DICOM without pixel data): give the folder of the DCE series")
    images = _choose_series(images, series_uid, where)
    row, column = _check_uniform(images, where)
    normal = np.cross(row, column)
    groups = _group_slices(images, normal, where)

    tag, notes = _time_tag(groups, where)
    times = None
    problem = None
    if tag is not None:
        for group in groups:
            group.sort(key=lambda image: image.times_s[tag])
        frame_times = np.array([[image.times_s[tag] for image in group] for group in groups])  # [slice, frame]
        mean_times = frame_times.mean(axis=0)
        times = mean_times - mean_times[0]
        spread = float(np.max(frame_times.max(axis=0) - frame_times.min(axis=0)))
    else:
        problem = ("no DICOM AcquisitionTime, TriggerTime or ContentTime differs between the images of each slice"
                   if len(groups[0]) > 1 else None)
        spread = None
        for key in ("TemporalPositionIdentifier", "TemporalPositionIndex", "InstanceNumber"):
            values = [[image.order_keys.get(key) for image in group] for group in groups]
            if all(None not in v and len(set(v)) == len(v) for v in values):
                for group in groups:
                    group.sort(key=lambda image: image.order_keys[key])
                notes.append(f"frames ordered by {key} (no usable acquisition time)")
                break
        else:
            if len(groups[0]) > 1:
                raise DCEPKInputError(
                    f"cannot order the {len(groups[0])} images of each slice in {where}: they share the same "
                    "acquisition, trigger and content times and instance numbers (duplicate files, or several "
                    "echoes / image types in one series); export the dynamic series alone")

    n_slices, n_frames = len(groups), len(groups[0])
    first = groups[0][0]
    signal = np.empty((n_slices, first.rows, first.columns, n_frames), dtype=np.float32)
    for k, group in enumerate(groups):
        for t, image in enumerate(group):
            signal[k, :, :, t] = _dicom_pixels(image)
            if image.frame is None and "PixelData" in image.dataset:
                del image.dataset.PixelData  # decoded: free the raw bytes as we go

    geometry = _dicom_geometry(groups, row, column, normal, where)
    fas = sorted({round(image.flip_angle_deg, 4) for image in images if image.flip_angle_deg is not None})
    if dynamic and len(fas) > 1 and n_frames > 1:
        raise DCEPKInputError(
            f"the flip angle varies within {where} ({', '.join(f'{v:g}' for v in fas)} deg): this looks like a "
            "variable-flip-angle T1 series, not a DCE series; load the dynamic series")
    trs = [image.tr_ms for image in images if image.tr_ms is not None]
    dataset = first.dataset
    metadata = {
        "format": "dicom", "series_instance_uid": first.series_uid,
        "series_description": str(dataset.get("SeriesDescription", "")),
        "series_number": str(dataset.get("SeriesNumber", "")), "n_files": len(datasets),
        "skipped_files": len(skipped),
        "notes": notes,
    }
    if tag is not None:
        metadata["timing_source"] = f"DICOM {tag}"
        metadata["time_origin_s"] = float(mean_times[0])  # subtracted: frame 0 is at 0 s
        metadata["frame_time_spread_s"] = spread
    return _Loaded(signal=signal, geometry=geometry, times_s=times, timing_problem=problem,
                   flip_angle_deg=fas[0] if fas else None,
                   tr_s=float(np.median(trs)) / 1000.0 if trs else None,  # DICOM RepetitionTime is in ms
                   metadata=metadata)


def _raw_pixels(image: _DicomImage) -> Optional[np.ndarray]:
    """Uncompressed greyscale pixels straight from the buffer (pydicom's decoder is ~10x slower per file)."""
    dataset = image.dataset
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        if syntax is None or syntax.is_compressed or syntax.is_deflated:
            return None
        little = syntax.is_little_endian
    except AttributeError:
        return None
    bits = int(dataset.get("BitsAllocated", 0))
    stored = int(dataset.get("BitsStored", bits))
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    if int(dataset.get("SamplesPerPixel", 1)) != 1 or bits not in (8, 16, 32) or (signed and stored != bits):
        return None
    dtype = np.dtype(("i" if signed else "u") + str(bits // 8)).newbyteorder("<" if little else ">")
    per_frame = image.rows * image.columns
    frame = image.frame or 0
    buffer = dataset.PixelData
    if len(buffer) < (frame + 1) * per_frame * dtype.itemsize:
        return None
    pixels = np.frombuffer(buffer, dtype=dtype, count=per_frame, offset=frame * per_frame * dtype.itemsize)
    if not signed and stored < bits:
        pixels = pixels & np.asarray((1 << stored) - 1, dtype=dtype)  # high bits may hold overlays
    return pixels.reshape(image.rows, image.columns)


def _dicom_pixels(image: _DicomImage) -> np.ndarray:
    dataset = image.dataset
    try:
        pixels = _raw_pixels(image)
    except Exception:  # noqa: BLE001 - a damaged file: let the full decoders report it
        pixels = None
    if pixels is None:
        try:
            pixels = dataset.pixel_array
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for undecodable data
            pixels = _sitk_pixels(image.filename, error)
        if image.frame is not None and pixels.ndim == 3:
            pixels = pixels[image.frame]
    if pixels.shape != (image.rows, image.columns):
        raise DCEPKInputError(f"{image.filename}: pixel data of shape {pixels.shape} for {image.rows}x{image.columns} "
                              "pixels (colour or damaged image); DCE analysis needs greyscale images")
    pixels = pixels.astype(np.float32)
    if image.slope != 1.0 or image.intercept != 0.0:
        pixels = pixels * np.float32(image.slope) + np.float32(image.intercept)
    return pixels


def _sitk_pixels(filename: str, error: Exception) -> np.ndarray:
    # pydicom cannot decode some compressed transfer syntaxes without extra packages; GDCM can.
    import SimpleITK as sitk
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(filename))
    except RuntimeError:
        raise DCEPKInputError(f"cannot decode the pixel data of {filename} ({error}); decompress the series "
                              "(e.g. 'gdcmconv --raw') or export it uncompressed") from None
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _dicom_geometry(groups, row, column, normal, where) -> Geometry:
    first = groups[0][0]
    in_plane = [float(first.pixel_spacing[1]), float(first.pixel_spacing[0])]  # (column spacing di, row spacing dj)
    positions = np.array([group[0].position for group in groups])
    if len(groups) > 1:
        steps = np.diff(positions @ normal)
        spacing = float(np.mean(steps))
        if np.max(np.abs(steps - spacing)) > max(0.01 * spacing, 1e-3):
            raise DCEPKInputError(
                f"the slices of {where} are not evenly spaced (steps {np.min(steps):.3f} to {np.max(steps):.3f} mm): "
                "a slice is probably missing; export the complete series")
    else:
        spacing = first.spacing_between_slices or first.slice_thickness or 1.0
    direction = np.column_stack([row, column, normal])
    return Geometry(spacing=[in_plane[0], in_plane[1], spacing], origin_lps=positions[0], direction_lps=direction)
