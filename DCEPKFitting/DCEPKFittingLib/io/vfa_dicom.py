"""Variable-flip-angle series from DICOM: one volume per flip angle, with the TR, for T1 mapping."""

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry
from .dicom import (DicomImage, check_uniform, dicom_files, dicom_geometry, dicom_images, dicom_pixels, group_slices,
                    read_dicom_datasets)
from .sources import describe


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
    where = describe(path)
    datasets, _ = read_dicom_datasets(dicom_files(path), isinstance(path, (list, tuple)))
    images = [image for filename, dataset in datasets for image in dicom_images(filename, dataset)]
    if not images:
        raise DCEPKInputError(f"no DICOM images found in {where}: give the folder of the variable-flip-angle images")
    if any(image.flip_angle_deg is None for image in images):
        raise DCEPKInputError(f"some DICOM images in {where} have no FlipAngle header: give the flip angles (--fa)")
    row, column = check_uniform(images, where)
    normal = np.cross(row, column)
    by_angle: Dict[float, List[DicomImage]] = {}
    for image in images:
        by_angle.setdefault(round(float(image.flip_angle_deg), 3), []).append(image)
    if len(by_angle) < 2:
        raise DCEPKInputError(f"all images in {where} have the flip angle {next(iter(by_angle)):g} deg: VFA T1 mapping "
                              "needs images at two or more flip angles")
    volumes, trs, geometry, shape = [], [], None, None
    for angle in sorted(by_angle):
        slices = group_slices(by_angle[angle], normal, f"the {angle:g} deg images of {where}")
        if len(slices[0]) != 1:
            raise DCEPKInputError(f"{len(slices[0])} images per slice position at {angle:g} deg in {where}: keep one "
                                  "image per slice and flip angle (the VFA series only)")
        angle_geometry = dicom_geometry(slices, row, column, normal, where)
        volume = np.stack([dicom_pixels(group[0]) for group in slices])
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
