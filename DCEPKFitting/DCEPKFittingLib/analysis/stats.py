"""Per-label (tissue ROI) statistics of parameter maps, NaN-aware, as rows for a table or file."""

import csv
import io
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np

from ..core.errors import DCEPKInputError
from ..core.output_files import OutputSet

# Table formats by file suffix: the delimiter. Anything else (.xlsx, .ods...) is refused rather
# than written as text under a name that promises another format.
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}

STAT_COLUMNS = ("count", "nan_count", "mean", "sd", "median", "iqr", "p05", "p95")


def summarize(values: np.ndarray) -> Dict[str, float]:
    """Statistics of a 1-D sample; NaN values are counted apart and left out of the rest."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    row = {"count": int(finite.size), "nan_count": int(values.size - finite.size)}
    if finite.size == 0:
        row.update({name: float("nan") for name in STAT_COLUMNS[2:]})
        return row
    p05, q1, median, q3, p95 = np.percentile(finite, [5, 25, 50, 75, 95])
    row.update({
        "mean": float(finite.mean()),
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "median": float(median),
        "iqr": float(q3 - q1),
        "p05": float(p05),
        "p95": float(p95),
    })
    return row


def label_statistics(maps: Mapping[str, np.ndarray], labels: np.ndarray,
                     label_names: Optional[Mapping[int, str]] = None,
                     label_values: Optional[Iterable[int]] = None,
                     status: Optional[np.ndarray] = None,
                     status_of: Optional[Iterable[str]] = None) -> List[dict]:
    """One row per (label, map): label value and name, map name, then ``STAT_COLUMNS``.

    ``labels`` is an integer array of the maps' shape; 0 is background and left out unless
    listed in ``label_values``. With ``status`` (a fit's status map, ``fit_result.FitStatus``) every
    row also counts the label's voxels per status (``n_fitted``, ``n_not_enhancing``, ...), and
    the statistics of the maps in ``status_of`` (default: all) are over the fitted voxels only,
    as the row's ``voxels`` column says ("fitted"; "all" for the other maps): a voxel at a bound,
    not converged, not enhancing or with invalid input has no estimate to average.
    """
    for name, array in maps.items():
        if np.shape(array) != np.shape(labels):
            raise DCEPKInputError(
                f"map '{name}' has shape {np.shape(array)} but the label map has shape {np.shape(labels)}: "
                "resample the label map onto the map's grid first")
    labels = check_label_map(labels)
    fitted, names_by_status = None, {}
    if status is not None:
        from ..kinetics.fit_result import FITTED_STATUSES, FitStatus
        status = np.asarray(status)
        if status.shape != labels.shape:
            raise DCEPKInputError(f"the status map has shape {status.shape} but the label map has shape "
                                  f"{labels.shape}: give the status map of the same fit")
        fitted = np.isin(status, [int(s) for s in FITTED_STATUSES])
        names_by_status = {int(member): "n_" + member.name.lower() for member in FitStatus}
    filtered = set(maps) if status_of is None else set(status_of)
    if label_values is None:
        label_values = [int(v) for v in np.unique(labels) if v != 0]
    label_names = dict(label_names or {})
    rows = []
    for value in label_values:
        inside = labels == value
        counts = {column: int(np.sum(status[inside] == code)) for code, column in names_by_status.items()}
        for map_name, array in maps.items():
            row = {"label": int(value), "segment": label_names.get(int(value), f"label {value}"),
                   "map": map_name}
            only_fitted = fitted is not None and map_name in filtered
            use = inside & fitted if only_fitted else inside
            if status is not None:
                row["voxels"] = "fitted" if only_fitted else "all"
            row.update(summarize(np.asarray(array)[use]))
            row.update(counts)
            rows.append(row)
    return rows


def check_label_map(labels, where: str = "the label map") -> np.ndarray:
    """Integer labels as int64; a map of non-integer values or without any label is refused
    (rounding would silently merge or invent regions)."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels)
        if not finite.all() or np.any(labels[finite] != np.round(labels[finite])):
            odd = labels[~finite | (labels != np.round(labels))]
            raise DCEPKInputError(
                f"{where} has {odd.size} voxels that are not whole numbers (e.g. {odd.flat[0]:g}): it looks like a "
                "map or a probability image, not labels; export the segmentation as a label map (integers)")
    elif labels.dtype.kind not in "iub":
        raise DCEPKInputError(f"{where} has data type {labels.dtype}: export the segmentation as a label map")
    labels = labels.astype(np.int64)
    if not np.any(labels != 0):
        raise DCEPKInputError(f"{where} is empty (every voxel is 0, the background): draw or load the segments first")
    return labels


def table_suffix(path) -> str:
    """The suffix of a table file, refused unless it is one written here (.csv, .tsv, .txt)."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_DELIMITERS:
        raise DCEPKInputError(f"cannot write a table as '{Path(path).name}': name it .csv (comma-separated), .tsv "
                              "or .txt (tab-separated), which spreadsheets open too")
    return suffix


def write_table(rows: List[dict], path, overwrite: bool = False) -> Path:
    """Write rows as CSV (``.csv``) or tab-separated (``.tsv``, ``.txt``), staged and verified."""
    with OutputSet(overwrite) as outputs:
        stage_table(outputs, rows, path)
        return outputs.commit()[0]


def stage_table(outputs: OutputSet, rows: List[dict], path) -> Path:
    """Add a statistics table to ``outputs`` (see :func:`write_table`)."""
    delimiter = TABLE_DELIMITERS[table_suffix(path)]
    if not rows:
        raise DCEPKInputError("no statistics to write: the label map has no labelled voxels")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0].keys()), delimiter=delimiter)
    writer.writeheader()
    writer.writerows(rows)
    return outputs.add_text(path, text.getvalue())
