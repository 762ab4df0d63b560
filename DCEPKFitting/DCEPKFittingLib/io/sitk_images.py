"""Images through SimpleITK (NIfTI, NRRD, MetaImage): reading with geometry, writing a staged file and
verifying it by reading its header back."""

import errno
from pathlib import Path
from typing import Tuple

import numpy as np

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry
from ..core.output_files import IncompleteWrite, OutputSet
from .image_files import TruncatedFileError, check_complete, read_nifti_data, read_nifti_header, read_nrrd_data
from .nrrd_writer import nrrd_header, write_nrrd
from .sources import Loaded, NIFTI_SUFFIXES, NRRD_SUFFIXES, lower_suffix


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
        if lower_suffix(Path(path)) in NIFTI_SUFFIXES:
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


def read_image(path) -> Tuple[np.ndarray, Geometry]:
    """Array with spatial axes ``[k, j, i]`` (then components / time last, contiguous) and the 3-D
    geometry. NaN and inf are kept; data shorter than the header says are refused."""
    suffix = lower_suffix(Path(path))
    if suffix in NIFTI_SUFFIXES + NRRD_SUFFIXES:
        # read here: straight into the final array (one copy in memory), NaN kept (see image_files)
        information = _sitk_read(path, information_only=True)
        dimension, components = information.GetDimension(), information.GetNumberOfComponents()
        _check_dimension(dimension, components)
        if suffix in NIFTI_SUFFIXES:
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


def read_image_series(path, timing_reader) -> Loaded:
    array, geometry = read_image(path)
    if array.dtype.kind in "iu" or array.dtype == bool:
        # Fitting needs floats; float32 holds 16-bit integers exactly.
        array = array.astype(np.float32 if array.dtype.itemsize <= 2 else np.float64)
    metadata = {"format": lower_suffix(Path(path)).lstrip(".")}
    times, problem, extra = (None, None, {})
    if array.ndim == 4:
        times, problem, extra = timing_reader(Path(path), array.shape[-1])
    metadata.update(extra.get("metadata", {}))
    return Loaded(signal=array, geometry=geometry, times_s=times, timing_problem=problem,
                   flip_angle_deg=extra.get("flip_angle_deg"), tr_s=extra.get("tr_s"), metadata=metadata)


def _sitk_image(array: np.ndarray, geometry: Geometry):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(v) for v in geometry.spacing])
    image.SetOrigin([float(v) for v in geometry.origin_lps])
    image.SetDirection([float(v) for v in geometry.direction_lps.ravel()])  # row-major; columns are the axes
    return image


def stage_volume_file(outputs: OutputSet, target: Path, suffix: str, array: np.ndarray, geometry: Geometry) -> Path:
    if suffix == ".nrrd":
        header = nrrd_header(array.dtype, array.shape, geometry, {}, list_axis=False)
        return outputs.add_stream(target, lambda handle: write_nrrd(handle, header, [array]),
                                  verify=lambda temporary: verify_image(temporary, target, array.size))
    return outputs.add_file(target, lambda temporary: _write_sitk_file(temporary, suffix, array, geometry),
                            verify=lambda temporary: verify_image(temporary, target, array.size))


def _write_sitk_file(temporary: Path, suffix: str, array: np.ndarray, geometry: Geometry) -> None:
    import SimpleITK as sitk
    try:
        sitk.WriteImage(_sitk_image(array, geometry), str(temporary), useCompression=suffix in (".nii.gz", ".mha"))
    except RuntimeError as error:
        raise OSError(errno.EIO, f"SimpleITK could not write it: {str(error).strip().splitlines()[-1][:200]}") \
            from None


def verify_image(temporary: Path, target: Path, voxels: int) -> None:
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
