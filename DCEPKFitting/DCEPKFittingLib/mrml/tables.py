"""Statistics tables: the core's label statistics per segment as a table node, table rows back, and
a table saved as CSV through the core's one writer (never overwriting without asking)."""

import csv
import errno
import inspect
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

import numpy as np
import slicer
import vtk

from ..analysis.stats import label_statistics
from ..core.errors import DCEPKInputError
from ..core.output_files import IncompleteWrite, OutputSet


Regions = Union[Mapping[str, np.ndarray], Tuple[np.ndarray, Mapping[int, str]]]


def _core_label_statistics(maps, labels, names, label_values=None, status=None) -> list:
    """``stats.label_statistics``; the fit status map goes along when the core takes one (it then adds
    voxel counts per status to each row). Whatever columns the core returns reach the table."""
    kwargs = {"label_values": label_values} if label_values is not None else {}
    if status is not None and "status" in inspect.signature(label_statistics).parameters:
        kwargs["status"] = status
    return label_statistics(maps, labels, names, **kwargs)


def statistics_rows(maps: Mapping[str, np.ndarray], regions: Regions, status=None) -> list:
    """Rows of ``stats.label_statistics`` for named masks ``{name: bool}`` or ``(labels, {value: name})``.

    Masks may overlap (segments often do), so each mask is summarised on its own.
    """
    if isinstance(regions, tuple):
        labels, names = regions
        return _core_label_statistics(maps, np.asarray(labels), names, status=status)
    rows = []
    for value, (name, mask) in enumerate(regions.items(), start=1):
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            raise DCEPKInputError(f"segment '{name}' is empty on the maps' grid: paint it or pick another")
        for row in _core_label_statistics(maps, mask.astype(np.int32), {1: name}, [1], status):
            row["label"] = value
            rows.append(row)
    return rows


def statistics_table(scene, maps: Mapping[str, np.ndarray], regions: Regions, name: str = "DCEPK statistics",
                     existing_table=None, units: Optional[Mapping[str, str]] = None, status=None):
    """Table node with one row per (segment, map): segment, label, map, unit, then every column the
    core's statistics give (count, NaN count, mean, SD, median, IQR, p05, p95, ...)."""
    rows = statistics_rows(maps, regions, status)
    if not rows:
        raise DCEPKInputError("no statistics: the segments or labels hold no voxels")
    rows = [dict(row, unit=(units or {}).get(row["map"], "")) for row in rows]
    leading = ["segment", "label", "map", "unit"]
    columns = leading + [c for c in dict.fromkeys(k for row in rows for k in row) if c not in leading]
    return table_from_rows(scene, rows, name, existing_table, columns)


def table_from_rows(scene, rows: list, name: str, existing_table=None, columns=None):
    """Table node (new, or ``existing_table`` updated in place) from a list of dicts: text columns for
    strings, integer columns for ints, double columns for everything else (a missing value is NaN)."""
    if not rows:
        raise DCEPKInputError("no statistics: the segments hold no voxel")
    columns = list(columns or rows[0].keys())
    vtk_table = vtk.vtkTable()
    for column in columns:
        present = [row[column] for row in rows if column in row]
        integers = len(present) == len(rows) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present)
        array = vtk.vtkStringArray() if isinstance(present[0], str) else \
            vtk.vtkIntArray() if integers else vtk.vtkDoubleArray()
        array.SetName(column)
        array.SetNumberOfValues(len(rows))
        for r, row in enumerate(rows):
            value = row.get(column, "" if isinstance(array, vtk.vtkStringArray) else float("nan"))
            array.SetValue(r, value if isinstance(array, vtk.vtkStringArray) else
                           int(value) if isinstance(array, vtk.vtkIntArray) else float(value))
        vtk_table.AddColumn(array)
    table = existing_table if existing_table is not None and existing_table.GetScene() is scene else None
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    else:
        table.SetName(name)
    table.SetAndObserveTable(vtk_table)
    table.SetUseColumnTitleAsColumnHeader(True)  # Slicer 5.8+: the minimum this extension supports
    return table


def table_rows(table_node) -> list:
    """The table's rows as dicts (numbers as float): for tests and scripts."""
    table = table_node.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            value = column.GetValue(r)
            row[column.GetName()] = value if isinstance(column, vtk.vtkStringArray) else float(value)
        rows.append(row)
    return rows


def save_table_csv(scene, table_node, path: str, overwrite: bool = False) -> str:
    """Write the table as CSV through its storage node, with the column-type sidecar Slicer writes beside
    it ('<name>.schema.csv'), both staged, verified and published together by ``core.output_files``: never
    half-written, never overwritten unasked, nothing left behind on a failure."""
    target = Path(path).absolute()
    if target.suffix.lower() != ".csv":
        raise DCEPKInputError(f"cannot write a table as '{target.name}': name it .csv")
    schema = {}

    def write(temporary: Path) -> None:
        storage = slicer.vtkMRMLTableStorageNode()
        storage.SetScene(scene)
        storage.SetFileName(str(temporary))
        if not storage.WriteData(table_node):
            raise OSError(errno.EIO, "Slicer's table writer reported a failure")
        sidecar = temporary.with_name(temporary.name[: -len(".csv")] + ".schema.csv")
        if sidecar.exists():   # staged under the set's own name below, not left under the temporary one
            schema["text"] = sidecar.read_text()
            sidecar.unlink()

    def verify(temporary: Path) -> None:
        with open(temporary, newline="") as handle:
            lines = sum(1 for _ in csv.reader(handle))
        if lines != table_node.GetTable().GetNumberOfRows() + 1:
            raise IncompleteWrite(errno.EIO, f"{lines} of {table_node.GetTable().GetNumberOfRows() + 1} lines")

    with OutputSet(overwrite) as outputs:
        outputs.add_file(target, write, verify)
        if "text" in schema:
            outputs.add_text(target.with_name(target.name[: -len(".csv")] + ".schema.csv"), schema["text"])
        outputs.commit()
    return str(target)
