"""NRRD files written directly: the header (geometry, Slicer MultiVolume / sequence timing keys) and the
data streamed slab by slab, optionally gzip-compressed."""

from typing import Dict

import numpy as np

from ..core.errors import DCEPKInputError
from ..core.geometry import Geometry


_NRRD_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "short", "uint16": "ushort", "int32": "int",
               "uint32": "uint", "int64": "int64", "uint64": "uint64", "float32": "float", "float64": "double"}


def _format_number(value: float) -> str:
    return repr(float(value))  # shortest text that reads back to the same double


def nrrd_header(dtype: np.dtype, shape: tuple, geometry: Geometry, keys: Dict[str, str], list_axis: bool) -> bytes:
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


def write_nrrd(handle, header: bytes, slabs) -> None:
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


def multivolume_keys(times_s: np.ndarray, fa_deg, tr_s, kind: str) -> Dict[str, str]:
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
