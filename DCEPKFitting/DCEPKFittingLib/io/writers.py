"""The public writers: volumes, DCE series (Slicer MultiVolume / sequence NRRD) and maps, each with a
``stage_*`` form that adds the file to an ``OutputSet`` (all outputs of a command published together or none)."""

from pathlib import Path
from typing import Dict, List

import numpy as np

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry
from ..core.output_files import OutputSet, check_targets
from .nrrd_writer import multivolume_keys, nrrd_header, write_nrrd
from .series import DCESeries
from .sitk_images import stage_volume_file, verify_image
from .sources import WRITE_SUFFIXES, check_geometry, prepare_volume_array, volume_suffix


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
    array = prepare_volume_array(array, what=f"the volume for {target.name}")
    suffix = volume_suffix(target)
    check_geometry(geometry)
    return stage_volume_file(outputs, target, suffix, array, geometry)


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
    check_geometry(geometry)
    keys = multivolume_keys(times_s, flip_angle_deg, tr_s, kind)
    header = nrrd_header(np.dtype(dtype), tuple(shape), geometry, keys, list_axis=True)
    return outputs.add_stream(target, lambda handle: write_nrrd(handle, header, slabs),
                              verify=lambda temporary: verify_image(temporary, target, int(np.prod(shape))))


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
    if suffix not in WRITE_SUFFIXES:
        raise DCEPKInputError(f"unknown map format '{suffix}': use one of {', '.join(WRITE_SUFFIXES)}")
    return suffix


def stage_maps(outputs: OutputSet, out_dir, maps: Dict[str, np.ndarray], geometry: Geometry,
               suffix: str = ".nii.gz") -> List[Path]:
    """Add every map to ``outputs`` (see :func:`write_maps`)."""
    if not maps:
        raise DCEPKInputError("no maps to write")
    targets = map_targets(out_dir, list(maps), suffix)
    check_geometry(geometry)
    prepared, shape = [], None
    for (name, array), target in zip(maps.items(), targets):
        array = prepare_volume_array(array, what=f"map '{name}'")
        if shape is not None and array.shape != shape:
            raise DCEPKInputError(
                f"map '{name}' has shape {array.shape} but the others {shape}: maps must share one grid")
        shape = array.shape
        prepared.append((target, array))
    check_targets(targets, outputs.overwrite)
    return [stage_volume_file(outputs, target, _map_suffix(suffix), array, geometry) for target, array in prepared]
