"""A cohort manifest derived from a BIDS-like folder (``dcepk manifest DIR``, ``dcepk batch --bids DIR``).

The layout (BIDS naming; DCE has no BIDS datatype yet, so ``dce/`` follows ``func/``'s conventions)::

    DIR/sub-<s>/[ses-<t>/]dce/sub-<s>[_ses-<t>]_dce.nii.gz     the DCE series (also .nii or .nrrd)
                              ..._dce.json                     sidecar: FlipAngle (deg),
                                                               RepetitionTimeExcitation (TR, s),
                                                               VolumeTiming (frame times, s) or
                                                               RepetitionTime (frame interval, s, as BIDS 4-D)
                              ..._aifmask.nii.gz               ROI on an artery (optional)
                              ..._aif.csv                      or an input function: time (s), blood conc. (mM)
                         anat/..._T1map.nii.gz                 T10 map in seconds (BIDS qMRI), or
                         anat/..._flip-<n>_VFA.nii.gz + .json  VFA images with FlipAngle, RepetitionTimeExcitation
                         anat/..._dseg.nii.gz + ..._dseg.tsv   tissue labels and their names (index, name)

Every subject (and session) folder with a ``dce`` series gives one row; a file that is absent leaves
its column empty (the command's defaults fill it: ``--aif parker``, ``--t10 1.4``, or the row is
reported). Paths in a written manifest are relative to the manifest's folder.
"""

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

from ..core.errors import DCEPKInputError
from ..core.output_files import write_text_file
from .cohort_manifest import BatchDefaults, Manifest, validate_rows

COLUMNS = ("subject", "session", "dce", "fa", "tr", "times", "dt", "t10", "vfa", "vfa_fa", "vfa_tr", "aif",
           "labels", "label_names")
SERIES_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
_FLIP = re.compile(r"_flip-(\d+)_VFA\.nii(\.gz)?$")


def _one(folder: Path, pattern: str) -> Optional[Path]:
    found = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if len(found) > 1:
        raise DCEPKInputError(f"{folder} holds {len(found)} files matching {pattern} ({', '.join(p.name for p in found)}): "
                              "keep one per subject and session")
    return found[0] if found else None


def _sidecar(image: Path) -> dict:
    name = image.name
    for suffix in SERIES_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    path = image.with_name(name + ".json")
    if not path.is_file():
        return {}
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DCEPKInputError(f"the sidecar {path} is not readable JSON ({error})") from None
    return sidecar if isinstance(sidecar, dict) else {}


def _number(value) -> str:
    return "" if value is None else f"{float(value):g}"


def _session_row(subject: str, session: str, folder: Path) -> Optional[Dict[str, str]]:
    dce = next((p for s in SERIES_SUFFIXES for p in [_one(folder / "dce", f"*_dce{s}")] if p), None)
    if dce is None:
        return None
    sidecar = _sidecar(dce)
    row = {"subject": subject, "session": session, "dce": str(dce), "fa": _number(sidecar.get("FlipAngle")),
           "tr": _number(sidecar.get("RepetitionTimeExcitation"))}
    if sidecar.get("VolumeTiming"):
        row["times"] = ";".join(_number(t) for t in sidecar["VolumeTiming"])
    elif sidecar.get("RepetitionTime"):
        row["dt"] = _number(sidecar["RepetitionTime"])
    anat = folder / "anat"
    t1map = _one(anat, "*_T1map.nii*")
    vfa = sorted((p for p in anat.glob("*_VFA.nii*") if _FLIP.search(p.name)),
                 key=lambda p: int(_FLIP.search(p.name).group(1))) if anat.is_dir() else []
    if t1map is not None:
        row["t10"] = str(t1map)
    elif vfa:
        sidecars = [_sidecar(p) for p in vfa]
        row["vfa"] = ";".join(str(p) for p in vfa)
        row["vfa_fa"] = ";".join(_number(s.get("FlipAngle")) for s in sidecars)
        row["vfa_tr"] = _number(sidecars[0].get("RepetitionTimeExcitation"))
    aif = _one(folder / "dce", "*_aifmask.nii*") or _one(anat, "*_aifmask.nii*") or _one(folder / "dce", "*_aif.csv")
    row["aif"] = str(aif) if aif else ""
    labels = _one(anat, "*_dseg.nii*")
    if labels is not None:
        row["labels"] = str(labels)
        names = _one(anat, "*_dseg.tsv")
        row["label_names"] = str(names) if names else ""
    return row


def bids_rows(root) -> List[Dict[str, str]]:
    """One row (column -> text, absolute paths) per subject and session folder holding a DCE series."""
    root = Path(root)
    if not root.is_dir():
        raise DCEPKInputError(f"{root} is not a folder: give the top folder of the BIDS-like layout")
    rows = []
    for subject_dir in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        subject = subject_dir.name[len("sub-"):]
        sessions = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir())
        for folder, session in ([(s, s.name[len("ses-"):]) for s in sessions] or [(subject_dir, "")]):
            row = _session_row(subject, session, folder)
            if row is not None:
                rows.append(row)
    if not rows:
        raise DCEPKInputError(f"no sub-*/[ses-*/]dce/*_dce.nii.gz series under {root}: see the layout in the README "
                              "(Cohorts) or write a manifest")
    return rows


def bids_manifest(root, defaults: Optional[BatchDefaults] = None, network_names=None,
                  skip_invalid: bool = False) -> Manifest:
    rows = bids_rows(root)
    return validate_rows(list(COLUMNS), [[row.get(c, "") for c in COLUMNS] for row in rows], Path(root).resolve(),
                         f"the folder {root}", defaults, network_names, skip_invalid)


def write_manifest(rows: List[Dict[str, str]], path, overwrite: bool = False) -> Path:
    """A manifest file (CSV or TSV by suffix) of ``rows``, with paths relative to its folder."""
    path = Path(path)
    delimiter = {".csv": ",", ".tsv": "\t"}.get(path.suffix.lower())
    if delimiter is None:
        raise DCEPKInputError(f"name the manifest .csv or .tsv, not {path.name}")
    base = path.resolve().parent

    def relative(column: str, text: str) -> str:
        if column not in ("dce", "t10", "vfa", "aif", "labels", "label_names") or not text:
            return text
        return ";".join(os.path.relpath(p, base) if os.path.isabs(p) else p for p in text.split(";"))

    text = io.StringIO(newline="")
    writer = csv.writer(text, delimiter=delimiter)
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([relative(c, row.get(c, "")) for c in COLUMNS])
    return write_text_file(path, text.getvalue(), overwrite=overwrite)
