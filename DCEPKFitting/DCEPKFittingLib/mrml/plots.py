"""Curves in a plot chart (the AIF, a voxel's measured and fitted concentration)."""

from typing import Mapping

import numpy as np
import vtk
from vtkmodules.util import numpy_support

from ..core.errors import DCEPKInputError


def plot_curves(scene, chart_name: str, x: np.ndarray, curves: Mapping[str, np.ndarray], x_title: str,
                y_title: str, chart=None):
    """Line chart of ``curves`` ({name: y}) against ``x``: one table, one plot series per curve, one chart.

    Given ``chart`` (from an earlier call) its table and series are updated in place, so a live
    plot (AIF under a moving ROI, the curve of the voxel under the mouse) adds no nodes.
    """
    x = np.asarray(x, dtype=np.float64)
    if chart is None or chart.GetScene() is not scene:
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", chart_name)
    table_id = chart.GetAttribute("DCEPK.Table")
    table = scene.GetNodeByID(table_id) if table_id else None
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{chart_name} data")
        chart.SetAttribute("DCEPK.Table", table.GetID())
    vtk_table = vtk.vtkTable()
    for name, values in [(x_title, x)] + [(n, np.asarray(v, dtype=np.float64)) for n, v in curves.items()]:
        if values.shape != x.shape:
            raise DCEPKInputError(f"curve '{name}' has {values.size} points for {x.size} times")
        column = numpy_support.numpy_to_vtk(values, deep=True)
        column.SetName(name)
        vtk_table.AddColumn(column)
    table.SetAndObserveTable(vtk_table)
    existing = {chart.GetNthPlotSeriesNode(n).GetName(): chart.GetNthPlotSeriesNode(n)
                for n in range(chart.GetNumberOfPlotSeriesNodes())}
    for n, name in enumerate(curves):
        series = existing.pop(name, None)
        if series is None:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName(x_title)
        series.SetYColumnName(name)
        series.SetPlotType(series.PlotTypeScatter)
        # The measured curve as markers, fitted or mean curves as lines.
        series.SetMarkerStyle(series.MarkerStyleCircle if "measured" in name else series.MarkerStyleNone)
        series.SetLineStyle(series.LineStyleNone if "measured" in name else series.LineStyleSolid)
        colour = _PLOT_COLOURS[n % len(_PLOT_COLOURS)]
        series.SetColor(*colour)
    for stale in existing.values():
        chart.RemovePlotSeriesNodeID(stale.GetID())
        scene.RemoveNode(stale)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    chart.SetTitle(chart_name)
    return chart


_PLOT_COLOURS = ((0.85, 0.33, 0.1), (0.0, 0.45, 0.74), (0.47, 0.67, 0.19), (0.49, 0.18, 0.56))
