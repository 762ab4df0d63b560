"""Low-level image file checks shared by the readers and the writers' verification.

- ``read_nifti_data(path, size_xyz_t)``: the voxel data of a NIfTI-1 file, read here rather than by
  SimpleITK, whose NIfTI reader (ITK 5.4's niftilib) silently turns every NaN and +-inf into 0
  (fixed upstream in ITK 6, InsightSoftwareConsortium/ITK#6683). A 4-D file comes back time last,
  ``[k, j, i, t]``, filled frame by frame (one copy of the series in memory).
- ``check_complete(path)``: NIfTI, NRRD and MetaImage files whose data are shorter than their header
  says (an interrupted copy, a full disk) raise :class:`DCEPKInputError` with the expected and the
  actual number of bytes. ITK reads a short NIfTI as zero-filled, and says "No such file" for a short
  MetaImage.

Sizes are bytes of image data (uncompressed). Pure core: numpy only.
"""

import contextlib
import gzip
import math
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..core.errors import DCEPKInputError

_BLOCK = 1 << 22  # 4 MiB: streaming block when only counting bytes

# NIfTI-1 datatype codes that hold one real number per voxel.
NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                1280: "u8"}
_NIFTI_OTHER = {32: "complex", 128: "RGB colour", 1536: "128-bit float", 1792: "complex", 2048: "RGBA colour",
                2304: "RGBA colour"}


def _fmt_bytes(count: int) -> str:
    return f"{count:,} bytes"


class TruncatedFileError(DCEPKInputError):
    """An image file whose data are shorter than its header says (``expected`` and ``actual`` bytes)."""

    def __init__(self, message: str, expected: int, actual: int):
        super().__init__(message)
        self.expected, self.actual = expected, actual


def truncated_error(path, expected: int, actual: int, what: str = "image data") -> TruncatedFileError:
    return TruncatedFileError(
        f"{path} is truncated: its header announces {_fmt_bytes(expected)} of {what} but the file holds only "
        f"{_fmt_bytes(actual)} (an interrupted copy, download or a full disk?): copy or export it again",
        expected, actual)


def is_gzip(path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


# ---------------------------------------------------------------------------------------------
# NIfTI-1
# ---------------------------------------------------------------------------------------------

def read_nifti_header(path) -> dict:
    """The NIfTI-1 fields the readers need (dims, pixdim, units, data type, offset, scaling)."""
    path = Path(path)
    opener = gzip.open if is_gzip(path) else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read(540)
    except (OSError, EOFError) as error:
        raise DCEPKInputError(f"cannot read the NIfTI header of {path} ({error}): the file is damaged; "
                              "re-export it") from None
    if len(raw) < 348:
        raise DCEPKInputError(f"{path} is too short to be a NIfTI file ({len(raw)} bytes, a header alone is 348): "
                              "re-export it")
    for endian in "<>":
        def get(offset, code, count=1):
            dtype = np.dtype(endian + code)
            return np.frombuffer(raw[offset:offset + dtype.itemsize * count], dtype=dtype)

        size = int(get(0, "i4")[0])
        if size == 348:
            # NIfTI-1 stores float32: take the shortest decimal of each value (0.1 s, not 0.100000001 s).
            def decimal(values):
                return np.array([float(np.format_float_positional(v, unique=True)) for v in values])
            return {"endian": endian, "dim": get(40, "i2", 8).astype(np.int64), "datatype": int(get(70, "i2")[0]),
                    "pixdim": decimal(get(76, "f4", 8)), "vox_offset": float(get(108, "f4")[0]),
                    "scl_slope": float(get(112, "f4")[0]), "scl_inter": float(get(116, "f4")[0]),
                    "xyzt_units": int(raw[123]), "toffset": float(decimal(get(136, "f4"))[0]),
                    "magic": bytes(raw[344:347])}
        if size == 540:
            # SimpleITK 2.5 does not read NIfTI-2 images, so there is nothing to take geometry from.
            raise DCEPKInputError(f"{path} is NIfTI-2, which cannot be read here: save it as NIfTI-1 "
                                  "(e.g. nibabel.Nifti1Image) or as NRRD")
    raise DCEPKInputError(f"{path} is not a NIfTI-1 or NIfTI-2 file (bad header size): re-export it")


def _nifti_layout(path, header) -> Tuple[np.dtype, int, int]:
    """(voxel dtype, data offset in bytes, number of voxels) of a single-file NIfTI-1."""
    code = header["datatype"]
    if code not in NIFTI_DTYPES:
        kind = _NIFTI_OTHER.get(code, f"data type code {code}")
        raise DCEPKInputError(f"{path} holds {kind} voxels; DCE series, maps and masks need one real number per "
                              "voxel: convert it to a greyscale (scalar) image")
    if header["magic"] != b"n+1":
        raise DCEPKInputError(f"{path} is a NIfTI header without its data (a .hdr/.img pair): save it as one "
                              ".nii or .nii.gz file")
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7 or np.any(header["dim"][1:ndim + 1] < 1):
        raise DCEPKInputError(f"{path} has invalid dimensions {header['dim'][:ndim + 1].tolist()}: re-export it")
    count = int(np.prod(header["dim"][1:ndim + 1], dtype=np.int64))
    offset = int(header["vox_offset"]) if math.isfinite(header["vox_offset"]) else 352
    return np.dtype(header["endian"] + NIFTI_DTYPES[code]), max(offset, 348), count


def _scaling(header) -> Optional[Tuple[float, float]]:
    # As niftilib: a non-finite or zero slope means "no scaling".
    slope, inter = header["scl_slope"], header["scl_inter"]
    if not math.isfinite(slope) or slope == 0.0:
        return None
    inter = inter if math.isfinite(inter) else 0.0
    return None if (slope == 1.0 and inter == 0.0) else (slope, inter)


def _read_exactly(handle, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``handle``; returns the bytes read (fewer only at the end of the data).
    Reads at most ``_BLOCK`` bytes at a time: gzip's readinto reads into a temporary of the requested
    size first, which for a whole series would double its memory."""
    done = 0
    while done < len(buffer):
        try:
            got = handle.readinto(buffer[done:done + _BLOCK])
        except EOFError:  # gzip: the compressed stream ended before its end marker
            return done
        if not got:
            return done
        done += got
    return done


def _open_data(path, offset: int):
    handle = gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")
    try:
        handle.seek(offset)
    except (EOFError, OSError):
        handle.close()
        raise DCEPKInputError(f"{path} ends before its image data begin (byte {offset}): it is truncated; "
                              "copy or export it again") from None
    return handle


def read_nifti_data(path, itk_size: Tuple[int, ...]) -> np.ndarray:
    """Voxel values of a NIfTI-1 file, NaN and inf kept, shaped for ``itk_size`` (x, y, z[, t]) as
    ``[k, j, i]`` or, for 4-D, ``[k, j, i, t]``. Scaling (scl_slope / scl_inter) gives float32 (float64
    data stay float64); otherwise the file's data type is kept."""
    header = read_nifti_header(path)
    dtype, offset, count = _nifti_layout(path, header)
    shape_kji = tuple(int(n) for n in reversed(itk_size[:3]))
    frames = int(itk_size[3]) if len(itk_size) > 3 else 1
    if len(itk_size) > 4 or int(np.prod(shape_kji)) * frames != count:
        raise DCEPKInputError(f"{path}: cannot lay out {count} voxels as {tuple(itk_size)}: re-export the image")
    scale = _scaling(header)
    out_dtype = dtype.newbyteorder("=")
    if scale is not None:
        out_dtype = np.dtype(np.float64 if dtype.itemsize == 8 and dtype.kind == "f" else np.float32)
    per_frame = int(np.prod(shape_kji))
    out = np.empty(shape_kji + ((frames,) if len(itk_size) == 4 else ()), dtype=out_dtype)
    frame = np.empty(per_frame, dtype=dtype) if (len(itk_size) == 4 or dtype != out_dtype) else None
    with _open_data(path, offset) as handle:
        for t in range(frames):
            target = frame if frame is not None else out.reshape(-1)
            got = _read_exactly(handle, memoryview(target.view(np.uint8)))
            if got < target.nbytes:
                raise truncated_error(path, count * dtype.itemsize, t * per_frame * dtype.itemsize + got)
            if frame is None:
                continue
            values = frame.reshape(shape_kji)
            if len(itk_size) == 4:
                out[..., t] = values
            else:
                out[...] = values
        _finish_stream(handle, path)
    if scale is not None:
        out *= out.dtype.type(scale[0])
        out += out.dtype.type(scale[1])
    return out


def _finish_stream(handle, path) -> None:
    """Read past the data so that gzip checks the stream's CRC and length (a damaged file raises)."""
    try:
        handle.read(1)
    except (EOFError, OSError, zlib.error) as error:
        raise DCEPKInputError(f"{path} is damaged ({error}): copy or export it again") from None


def _counted(handle) -> int:
    """Bytes left in ``handle`` (decompressed for gzip); stops at a truncated stream's end."""
    total, buffer = 0, bytearray(_BLOCK)
    view = memoryview(buffer)
    while True:
        got = _read_exactly(handle, view)
        total += got
        if got < len(view):
            return total


def _check_nifti(path) -> None:
    header = read_nifti_header(path)
    dtype, offset, count = _nifti_layout(path, header)
    expected = count * dtype.itemsize
    if is_gzip(path):
        with _open_data(path, offset) as handle:
            actual = _counted(handle)
    else:
        actual = max(Path(path).stat().st_size - offset, 0)
    if actual < expected:
        raise truncated_error(path, expected, actual)


# ---------------------------------------------------------------------------------------------
# NRRD
# ---------------------------------------------------------------------------------------------

def read_nrrd_header(path) -> Tuple[dict, dict, int]:
    """Standard fields, ``key:=value`` pairs and the byte offset where the data begin (the header is text)."""
    fields, keys = {}, {}
    with open(path, "rb") as handle:
        magic = handle.readline()
        if not magic.startswith(b"NRRD"):
            raise DCEPKInputError(f"{path} is not a NRRD file (no NRRD magic): re-export it")
        for _ in range(100000):
            line = handle.readline()
            if not line or line in (b"\n", b"\r\n"):
                break
            text = line.decode("latin-1").rstrip("\r\n")
            if text.startswith("#"):
                continue
            if ":=" in text:
                key, value = text.split(":=", 1)
                keys[key] = value
            elif ":" in text:
                key, value = text.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        return fields, keys, handle.tell()


def _nrrd_type_size(name: str) -> Optional[int]:
    name = name.lower().replace("_t", "")
    for words, size in (("double", 8), ("float", 4), ("long long", 8), ("longlong", 8), ("int64", 8),
                        ("int32", 4), ("int16", 2), ("int8", 1), ("char", 1), ("short", 2), ("int", 4)):
        if words in name:
            return size
    return None


_NRRD_NUMPY = {1: "i1", 2: "i2", 4: "i4", 8: "i8"}


def _nrrd_dtype(fields) -> Optional[np.dtype]:
    name = fields.get("type", "").lower()
    size = _nrrd_type_size(name)
    if size is None:
        return None
    if "float" in name or "double" in name:
        code = "f%d" % size
    else:
        unsigned = name.startswith(("u", "unsigned"))
        code = ("u" if unsigned else "i") + str(size)
    return np.dtype((">" if fields.get("endian", "little").lower() == "big" else "<") + code)


def _nrrd_layout(path):
    """(fields, data file, data start, dtype, sizes, encoding), or None for layouts left to ITK
    (other encodings, several data files, line skips, unknown types)."""
    fields, _, data_start = read_nrrd_header(path)
    dtype = _nrrd_dtype(fields)
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
        skip = int(fields.get("byte skip", "0") or 0)
    except ValueError:
        return None
    encoding = fields.get("encoding", "raw").lower()
    if dtype is None or not sizes or encoding not in ("raw", "gzip", "gz") or "line skip" in fields or skip < 0:
        return None
    source = Path(path)
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is not None:
        if " " in data_file.strip() or data_file.strip().upper().startswith("LIST"):
            return None  # several data files
        source = Path(path).parent / data_file.strip()
        data_start = 0
        if not source.is_file():
            raise DCEPKInputError(f"the data file {source} named by the header {path} is missing: copy both files")
    return source, data_start + (skip if encoding == "raw" else 0), skip if encoding != "raw" else 0, dtype, sizes, \
        encoding


@contextlib.contextmanager
def _open_nrrd_data(source: Path, start: int, gzip_skip: int, encoding: str):
    with open(source, "rb") as raw:
        raw.seek(start)
        if encoding == "raw":
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as handle:
            try:
                handle.seek(gzip_skip)
            except EOFError:
                raise truncated_error(source, gzip_skip, 0) from None
            yield handle


def _check_nrrd(path) -> None:
    layout = _nrrd_layout(path)
    if layout is None:
        return  # ITK checks what it reads itself
    source, start, gzip_skip, dtype, sizes, encoding = layout
    expected = int(np.prod(sizes, dtype=np.int64)) * dtype.itemsize
    if encoding == "raw":
        actual = max(source.stat().st_size - start, 0)
    else:
        with _open_nrrd_data(source, start, gzip_skip, encoding) as handle:
            actual = _counted(handle)
    if actual < expected:
        raise truncated_error(source, expected, actual)


def read_nrrd_data(path, itk_size: Tuple[int, ...], components: int) -> Optional[np.ndarray]:
    """Voxel values of a raw or gzip NRRD as ``[k, j, i]``, ``[k, j, i, t]`` (4-D, frames slowest on
    disk) or ``[k, j, i, c]`` (a list / vector axis first, as Slicer's MultiVolume files), read into
    their final array (one copy in memory). None for layouts left to SimpleITK."""
    layout = _nrrd_layout(path)
    if layout is None:
        return None
    source, start, gzip_skip, dtype, sizes, encoding = layout
    spatial = tuple(int(n) for n in itk_size[:3])
    if components > 1 and len(itk_size) == 3 and sizes == [components, *spatial]:
        shape, frames = tuple(reversed(spatial)) + (components,), 1      # C order [k, j, i, c]
    elif components > 1 and len(itk_size) == 3 and sizes == [*spatial, components]:
        shape, frames = tuple(reversed(spatial)), components             # list axis slowest: frame by frame
    elif components == 1 and len(itk_size) == 4 and sizes == list(itk_size):
        shape, frames = tuple(reversed(spatial)), int(itk_size[3])       # frames slowest: frame by frame
    elif components == 1 and len(itk_size) in (2, 3) and sizes == list(itk_size):
        shape, frames = tuple(reversed(spatial)), 1
    else:
        return None
    native = dtype.newbyteorder("=")
    out = np.empty(shape + ((frames,) if frames > 1 or len(itk_size) == 4 else ()), dtype=native)
    per_frame = int(np.prod(shape))
    frame = np.empty(per_frame, dtype=dtype) if (frames > 1 or dtype != native) else None
    with _open_nrrd_data(source, start, gzip_skip, encoding) as handle:
        for t in range(frames):
            target = frame if frame is not None else out.reshape(-1)
            got = _read_exactly(handle, memoryview(target.view(np.uint8)))
            if got < target.nbytes:
                raise truncated_error(source, per_frame * frames * dtype.itemsize, t * per_frame * dtype.itemsize + got)
            if frame is None:
                continue
            if out.ndim > len(shape):
                out[..., t] = frame.reshape(shape)
            else:
                out[...] = frame.reshape(shape)
        if encoding != "raw":
            _finish_stream(handle, source)
    return out


# ---------------------------------------------------------------------------------------------
# MetaImage
# ---------------------------------------------------------------------------------------------

_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _read_meta_header(path) -> Tuple[dict, int]:
    fields = {}
    with open(path, "rb") as handle:
        for _ in range(1000):
            line = handle.readline()
            if not line:
                break
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
        return fields, handle.tell()


def _check_meta(path) -> None:
    fields, data_start = _read_meta_header(path)
    size = _MET_SIZES.get(fields.get("ElementType", ""))
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return
    data_file = fields.get("ElementDataFile", "")
    if size is None or not dims or data_file.upper().startswith("LIST") or "%" in data_file:
        return
    source = Path(path) if data_file.upper() == "LOCAL" else Path(path).parent / data_file
    if source != Path(path):
        data_start = 0
        if not source.is_file():
            raise DCEPKInputError(f"the data file {source} named by the header {path} is missing: copy both files")
    expected = int(np.prod(dims, dtype=np.int64)) * channels * size
    if fields.get("CompressedData", "False").lower() != "true":
        actual = max(source.stat().st_size - data_start, 0)
    else:
        actual = _inflated_size(source, data_start)
    if actual < expected:
        raise truncated_error(source, expected, actual)


def _inflated_size(path, start: int) -> int:
    stream, total = zlib.decompressobj(), 0
    with open(path, "rb") as handle:
        handle.seek(start)
        for block in iter(lambda: handle.read(_BLOCK), b""):
            try:
                total += len(stream.decompress(block))
            except zlib.error:
                return total
    return total


def check_complete(path) -> None:
    """Raise :class:`DCEPKInputError` naming expected and actual sizes if the file's data are short.

    NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr: raw or gzip) and MetaImage (.mha, .mhd); other files
    and encodings pass (their readers check them)."""
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)
    elif name.endswith((".mha", ".mhd")):
        _check_meta(path)
