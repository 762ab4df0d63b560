"""Per-label (tissue ROI) statistics of parameter maps, NaN-aware, as rows for a table or file."""

import csv
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np

from .errors import DCEPKInputError

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
                     label_values: Optional[Iterable[int]] = None) -> List[dict]:
    """One row per (label, map): label value and name, map name, then ``STAT_COLUMNS``.

    ``labels`` is an integer array of the maps' shape; 0 is background and left out unless
    listed in ``label_values``.
    """
    labels = np.asarray(labels)
    for name, array in maps.items():
        if np.shape(array) != labels.shape:
            raise DCEPKInputError(
                f"map '{name}' has shape {np.shape(array)} but the label map has shape {labels.shape}: "
                "resample the label map onto the map's grid first")
    if label_values is None:
        label_values = [int(v) for v in np.unique(labels) if v != 0]
    label_names = dict(label_names or {})
    rows = []
    for value in label_values:
        inside = labels == value
        for map_name, array in maps.items():
            row = {"label": int(value), "segment": label_names.get(int(value), f"label {value}"),
                   "map": map_name}
            row.update(summarize(np.asarray(array)[inside]))
            rows.append(row)
    return rows


def write_table(rows: List[dict], path, overwrite: bool = False) -> Path:
    """Write rows as CSV (``.csv``) or tab-separated (any other suffix, e.g. ``.tsv``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DCEPKInputError(f"{path} exists: choose another output or pass overwrite=True (--overwrite)")
    if not rows:
        raise DCEPKInputError("no statistics to write: the label map has no labelled voxels")
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path
