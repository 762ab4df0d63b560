"""The fit, scene side: the Slicer module's Logic is these three steps. ``prepare_scene_fit`` reads
nodes into plain data (main thread), ``compute_scene_fit`` runs ``pipeline.fit.run_fit`` (pure, thread-safe:
the widget runs it in a BackgroundJob), ``publish_scene_fit`` writes the results into the scene (main thread).
Nothing touches the scene before the computation has succeeded, so cancel or error leaves it as it was."""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from ..core.errors import DCEPKInputError
from ..core.geometry import check_same_grid
from ..io import DCESeries
from .input_function_nodes import input_function_from_nodes, publish_run_detection
from .map_volumes import find_output_node, update_volume_from_array
from .masks import mask_from_node, mask_from_segment, segment_masks
from .sequences import acquisition_from_sequence, series_from_sequence, vfa_from_sequence
from .tables import statistics_table
from .volumes import node_by_name, reference_volume, volume_array, volume_geometry


@dataclass
class SceneFitRequest:
    series: DCESeries
    settings: object  # pipeline.FitSettings
    source_id: str
    statistics_regions: Optional[Dict[str, np.ndarray]] = None
    output_prefix: str = "DCEPK"
    update_existing: bool = True


def statistics_regions(statistics_segmentation, mask, reference):
    """(segmentation node, {segment name: bool [k,j,i]}) for the statistics table, or (None, None).

    The explicit statistics segmentation wins; otherwise a mask given as a segmentation also
    defines the regions, so one segmentation can both restrict the run and group its statistics.
    """
    source = statistics_segmentation
    if source is None and mask is not None and not isinstance(mask, np.ndarray) \
            and mask.IsA("vtkMRMLSegmentationNode"):
        source = mask
    if source is None:
        return None, None
    return source, segment_masks(source, reference)


def prepare_scene_fit(sequence_node, model: str = "etofts", method: str = "nlls",
                      aif_roi=None, aif_segmentation=None, aif_segment_id: Optional[str] = None,
                      population_aif: Optional[str] = None, aif_top_fraction: Optional[float] = None,
                      aif_delay_s: float = 0.0, hct: float = 0.45,
                      t10_s: Optional[float] = 1.4, t10_map=None, t10_map_unit: str = "ms",
                      vfa_sequence=None, vfa_flip_angles_deg: Optional[Sequence[float]] = None,
                      vfa_tr_s: Optional[float] = None, fa_deg: Optional[float] = None, tr_s: Optional[float] = None,
                      r1_per_mM_s: Optional[float] = None, mask=None, fit_delay: bool = False, device: str = "auto",
                      statistics_segmentation=None, output_prefix: str = "DCEPK",
                      update_existing: bool = True, aif_csv: str = "", auto_aif: Optional[str] = None,
                      blood_t10_s: Optional[float] = None) -> SceneFitRequest:
    """Read the nodes into a ``SceneFitRequest``; raises ``DCEPKInputError`` on bad input. Reads only.

    Input function, exactly one of: ``aif_roi`` (a box), ``aif_segmentation`` + ``aif_segment_id``,
    ``population_aif``, ``aif_csv`` (time s, concentration mM) or ``auto_aif`` ('either', 'artery',
    'vein': detected as ``dcepk fit --auto-aif``; the voxels and curve are published with the maps).
    ``blood_t10_s``: T10 of blood for a vessel's signal (ROI, segment, detected; None: the T10 given,
    detection with one T10 value: 1.6 s)."""
    from ..pipeline.fit import FitSettings  # imported here: the module loads before its dependencies are checked

    series = series_from_sequence(sequence_node)
    if series.kind != "concentration":
        require_acquisition(fa_deg, series.flip_angle_deg, "flip angle", "flipAngle_deg (degrees)", "Flip angle")
        require_acquisition(tr_s, series.tr_s, "TR", "tr_s (seconds)", "TR")
    reference = reference_volume(series.spatial_shape, series.geometry)
    aif_mask = None
    if aif_segmentation is not None and aif_segment_id:
        aif_mask = mask_from_segment(aif_segmentation, aif_segment_id, reference)
        if not aif_mask.any():
            raise DCEPKInputError("the AIF segment contains no voxel of the DCE series: paint it over the artery")
    elif aif_roi is not None:
        aif_mask = mask_from_node(aif_roi, reference, "AIF ROI")
    aif_csv = (aif_csv or "").strip()
    given = [name for name, value in (("an AIF ROI (or segment)", aif_mask is not None),
                                      ("a population AIF", population_aif), ("an AIF CSV file", aif_csv),
                                      ("automatic detection", auto_aif)) if value]
    if not given:
        raise DCEPKInputError("no input function: place an ROI (or segment) on an artery, give an AIF CSV file, "
                              "choose a population AIF or automatic detection")
    if len(given) > 1:
        raise DCEPKInputError(f"{' and '.join(given)} are given: choose one input function")
    if auto_aif and series.kind == "concentration":
        raise DCEPKInputError("automatic detection reads a signal series (relative enhancement, noise): this series "
                              "is concentration")
    detected = None
    if aif_csv or auto_aif:   # checked as the Inference module checks them (the CSV file read, the kind known)
        detected = input_function_from_nodes(reference, "csv" if aif_csv else "auto", csv_path=aif_csv,
                                             auto_kind=auto_aif or "either", hct=hct, blood_t10_s=blood_t10_s)
    if t10_map is not None and vfa_sequence is not None:
        raise DCEPKInputError("both a T10 map and a VFA series are given: choose one source of pre-contrast T1")
    t10 = t10_s
    if t10_map is not None:
        t10 = t10_map_seconds(t10_map, reference, t10_map_unit)
    vfa_signals = vfa_angles = None
    if vfa_sequence is not None:
        vfa_signals, vfa_angles, vfa_geometry = vfa_from_sequence(vfa_sequence, vfa_flip_angles_deg)
        check_same_grid(series.spatial_shape, series.geometry, vfa_signals.shape, vfa_geometry,
                        "DCE series", "VFA series")
        if vfa_tr_s is None:
            vfa_tr_s = acquisition_from_sequence(vfa_sequence)[1]
        require_acquisition(vfa_tr_s, None, "VFA TR", "vfaTr_s (seconds)", "VFA TR", "VFA series")
        t10 = None
    fit_mask = mask_from_node(mask, reference, "fit mask")
    statistics_source, regions = statistics_regions(statistics_segmentation, mask, reference)
    if regions is not None:
        empty = [name for name, region in regions.items() if not region.any()]
        if empty:  # found now, not after the fit: publishing must not stop half-way
            raise DCEPKInputError(f"segment(s) {', '.join(empty)} of '{statistics_source.GetName()}' hold no voxel of "
                                  "the DCE series: paint them on the series or remove them")
    settings = FitSettings(
        model=model, method=method, t10_s=t10, vfa_signals=vfa_signals, vfa_flip_angles_deg=vfa_angles,
        vfa_tr_s=vfa_tr_s, fa_deg=fa_deg, tr_s=tr_s, r1_per_mM_s=r1_per_mM_s, aif_mask=aif_mask,
        aif_top_fraction=aif_top_fraction, population_aif=population_aif or None, hct=hct,
        aif_csv=detected.aif_csv if detected else None, auto_aif=detected.auto_aif if detected else None,
        blood_t10_s=blood_t10_s or None, aif_delay_s=aif_delay_s, mask=fit_mask, fit_delay=fit_delay, device=device)
    settings.input_function.check()   # haematocrit, blood T10: said now, not after a background start
    return SceneFitRequest(series=series, settings=settings, source_id=series.metadata.get("sequence_id", ""),
                           statistics_regions=regions, output_prefix=output_prefix or "DCEPK",
                           update_existing=update_existing)


def require_acquisition(given, header, what: str, argument: str, checkbox: str, series: str = "DCE series"):
    """Refuse a run whose acquisition value is neither given nor in the header: no silent default."""
    if given is None and header is None:
        raise DCEPKInputError(f"the {series} has no {what} in its header: give {argument} (in the module panel: "
                              f"tick '{checkbox}' and type it)")


def t10_map_seconds(t10_map, reference, unit: str) -> np.ndarray:
    scale = {"ms": 1e-3, "s": 1.0}.get((unit or "").strip().lower())
    if scale is None:
        raise DCEPKInputError(f"unknown T10 map unit '{unit}': use 'ms' or 's'")
    values = volume_array(t10_map).astype(np.float32) * scale
    check_same_grid(volume_array(reference).shape, volume_geometry(reference), values.shape,
                    volume_geometry(t10_map), "DCE series", f"T10 map '{t10_map.GetName()}'")
    typical = float(np.nanmedian(values[values > 0])) if np.any(values > 0) else 0.0
    if not 0.05 <= typical <= 10.0:
        raise DCEPKInputError(
            f"the T10 map's typical value is {typical:g} s with unit '{unit}': T10 of tissue is 0.05-10 s, so "
            "the unit is probably wrong (choose ms or s to match the map)")
    return values


def compute_scene_fit(request: SceneFitRequest, progress=None, cancel=None):
    """``pipeline.run_fit`` on the prepared data: no scene access, safe in a worker thread."""
    from ..pipeline.fit import run_fit

    return run_fit(request.series, request.settings, progress=progress, cancel=cancel)


def output_name(prefix: str, map_name: str) -> str:
    return f"{prefix} {map_name}"


# keys of publish_scene_fit's result that are no map: the statistics table, a detected input function
NOT_MAPS = ("statistics", "input_function", "input_function_chart")


def publish_scene_fit(scene, request: SceneFitRequest, output) -> Dict[str, object]:
    """Write the maps (and per-segment statistics) into the scene; returns ``{map name: node}``, with
    'statistics' (the table) and, after automatic detection, 'input_function' (segmentation
    ``DETECTED_NAME``: segments 'artery', 'vein') and 'input_function_chart' (the blood curve).

    With ``update_existing`` the nodes of an earlier run with the same prefix are updated in place.
    """
    maps = {name: np.asarray(array) for name, array in output.maps.items() if np.ndim(array) == 3}
    for name, array in maps.items():  # check everything before the first write
        if array.shape != tuple(request.series.spatial_shape):
            raise DCEPKInputError(f"map {name} has shape {array.shape}, not the series' {request.series.spatial_shape}")
    nodes = {}
    for name, array in maps.items():
        node_name = output_name(request.output_prefix, name)
        existing = find_output_node(scene, node_name) if request.update_existing else None
        if existing is None and not request.update_existing:
            node_name = scene.GenerateUniqueName(node_name)
        node = update_volume_from_array(scene, array, output.geometry, node_name, existing_node=existing,
                                        units=output.units.get(name, ""), map_name=name)
        node.SetAttribute("DCEPK.Source", request.source_id)
        nodes[name] = node
    if request.statistics_regions:
        table_name = output_name(request.output_prefix, "statistics")
        existing_table = None
        if request.update_existing:
            existing_table = node_by_name(scene, "vtkMRMLTableNode", table_name)
        else:
            table_name = scene.GenerateUniqueName(table_name)
        stat_maps = {name: array for name, array in maps.items() if name != "status"}
        nodes["statistics"] = statistics_table(scene, stat_maps, request.statistics_regions, table_name,
                                               existing_table, output.units, status=maps.get("status"))
    if request.settings.auto_aif is not None:   # the voxels and curve automatic detection chose
        nodes.update(publish_run_detection(scene, output.input_function, request.series.times_s, output.geometry,
                                           request.update_existing))
    return nodes


def run_scene_fit(scene, sequence_node, progress=None, cancel=None, **options):
    """prepare -> compute -> publish in one synchronous call; returns ``(nodes, PKFit)``."""
    request = prepare_scene_fit(sequence_node, **options)
    output = compute_scene_fit(request, progress=progress, cancel=cancel)
    return publish_scene_fit(scene, request, output), output
