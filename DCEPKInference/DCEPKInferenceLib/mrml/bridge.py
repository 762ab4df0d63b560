"""MRML bridge of the inference module: scene nodes -> ``run_inference`` -> map and uncertainty volumes.

Imports ``slicer`` and VTK, never ``qt`` (runs in Slicer and under the headless ``slicer-core``
wheel). Reading series, masks and segments and writing volumes reuses
``DCEPKFittingLib.mrml.bridge``; only what is specific to inference lives here.

The module's Logic is three steps, so the slow one can run in a worker thread:
``prepare_scene_inference`` (reads nodes, main thread) -> ``compute_scene_inference`` (pure:
``run_inference``, optionally ``pipeline.run_fit``, thresholding and statistics; thread-safe) ->
``publish_scene_inference`` (writes nodes, main thread). Nothing is written before the computation
has succeeded, so a cancel or an error leaves the scene as it was.

Units (OSIPI): Ktrans and kep in 1/min, ve and vp fractions; ``<name>_sd`` maps are the network's
1-SD uncertainty in the same units; T10 and TR in seconds, flip angle in degrees.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Union

import numpy as np
import slicer

from DCEPKFittingLib.mrml import bridge as fit_bridge
from DCEPKFittingLib.io.dce_io import DCESeries
from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.jobs import raise_if_cancelled, report, sub_progress
from DCEPKFittingLib.analysis.stats import summarize

PARAMETERS = ("Ktrans", "ve", "vp", "kep")
UNITS = {"Ktrans": "1/min", "ve": "fraction", "vp": "fraction", "kep": "1/min"}
FIT_PREFIX = "fit_"               # conventional-fit maps published beside the network's: fit_Ktrans, ...
FIT_MODELS = ("etofts", "tofts", "patlak")
STATISTICS_COLUMNS = ("segment", "label", "map", "unit", "voxels", "count", "nan_count", "mean", "sd", "median",
                      "iqr", "p05", "p95", "mean_uncertainty", "excluded_fraction")
MODEL_ATTRIBUTE = "DCEPK.Model"
UNCERTAINTY_ATTRIBUTE = "DCEPK.UncertaintyNodeID"  # on a map: ID of its uncertainty (SD) volume

Threshold = Union[None, float, Mapping[str, float]]


# --------------------------------------------------------------------------- models and devices
def model_cards(directory=None) -> list:
    """Model cards of the shipped networks. Reads the JSON cards directly when torch is not installed yet,
    so the module panel can describe the networks before the user agrees to install dependencies."""
    try:
        from ..nn.model_store import list_models
    except ImportError:
        from pathlib import Path

        folder = Path(directory) if directory else Path(__file__).resolve().parents[2] / "Resources" / "Models"
        cards = []
        for path in sorted(folder.glob("*.json")):
            try:
                card = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(card, dict) and "sha256" in card and "network" in card:
                cards.append(card)
        return cards
    return list_models(directory)


def _number(value, digits=3) -> str:
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return "?"


def describe_model_card(card: Mapping) -> str:
    """The model card as short HTML for the module panel: what the network is, what it was trained on,
    what it outputs (with units), how it was validated."""
    name = card.get("name", card.get("network", "?"))
    lines = [f"<b>{name}</b> ({card.get('architecture', card.get('network', ''))}, "
             f"{int(card.get('n_parameters', 0))} weights)<br>{card.get('description', '')}"]
    outputs = card.get("outputs") or {p: UNITS[p] for p in PARAMETERS[:3]}
    lines.append("<br><b>Outputs</b>: " + ", ".join(f"{p} ({u})" for p, u in outputs.items())
                 + "; kep = Ktrans/ve (1/min); each with a 1-SD uncertainty map (&lt;name&gt;_sd, same unit).")
    if card.get("uncertainty"):
        lines.append(f"<br><b>Uncertainty</b>: {card['uncertainty']}")
    ranges = card.get("simulator_ranges", {})
    if ranges:
        trained = []
        for key, label in (("Ktrans_per_min", "Ktrans (1/min)"), ("ve", "ve"), ("vp", "vp")):
            value = ranges.get(key, {})
            if isinstance(value, dict) and "range" in value:
                trained.append(f"{label} {_number(value['range'][0])}-{_number(value['range'][1])}")
        for key, label in (("tk_model", "model"), ("aif_families", "AIFs"), ("n_frames", "frames"),
                           ("duration_s", "duration (s)"), ("fa_deg", "flip angle (deg)"), ("t10_s", "T10 (s)")):
            value = ranges.get(key)
            if isinstance(value, (list, tuple)):
                trained.append(f"{label} {'-'.join(_number(v) if not isinstance(v, str) else v for v in value)}"
                               if key != "aif_families" else f"{label} {', '.join(value)}")
            elif isinstance(value, str):
                trained.append(f"{label}: {value.split(',')[0]}")
        snr = ranges.get("baseline_snr", {})
        if isinstance(snr, dict) and "range" in snr:
            trained.append(f"baseline SNR {_number(snr['range'][0])}-{_number(snr['range'][1])}")
        lines.append("<br><b>Trained on</b> physics-based synthetic DCE data: " + "; ".join(trained) + ".")
    training = card.get("training", {})
    if training:
        lines.append(f"<br><b>Training</b>: {training.get('steps', '?')} steps on {training.get('device', '?')}"
                     + (f", {card['date_utc']}" if card.get("date_utc") else "") + ".")
    metrics = card.get("validation", {}).get("metrics", {})
    if metrics:
        size = card.get("validation", {}).get("set", {}).get("size", "?")
        rows = "".join(
            f"<tr><td>{p}</td><td>{_number(m.get('rmse'))}</td><td>{_number(m.get('bias'))}</td>"
            f"<td>{_number(m.get('ccc'))}</td><td>{_number(m.get('coverage90'))}</td></tr>"
            for p, m in metrics.items())
        lines.append(f"<br><b>Validation</b> (held-out synthetic set, {size} samples): "
                     "<table border='1' cellspacing='0' cellpadding='2'><tr><th>map</th><th>RMSE</th><th>bias</th>"
                     f"<th>CCC</th><th>90% coverage</th></tr>{rows}</table>"
                     "RMSE and bias in the map's unit; coverage: fraction of true values inside the 90% interval.")
    return "".join(lines)


def describe_device(device: str = "auto") -> str:
    """Where the network will run, in words, for the status line (same rule as ``run_inference``:
    'auto' takes the GPU only with enough free memory, else says why it falls back to the CPU)."""
    from ..pipeline.inference import GPU_BYTES_NEEDED, choose_device

    import torch

    notes = []
    chosen = choose_device(device, notes)  # raises DCEPKInputError for 'cuda' without a GPU
    if chosen.type == "cuda":
        free, total = torch.cuda.mem_get_info(chosen)
        return (f"GPU {torch.cuda.get_device_name(chosen)} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
                + (f"; under the {GPU_BYTES_NEEDED / 2**30:.0f} GiB advised" if free < GPU_BYTES_NEEDED else "")
                + ")")
    if notes:
        return "CPU: " + "; ".join(notes)
    return "CPU" if device == "cpu" else "CPU (no CUDA GPU found)"


# --------------------------------------------------------------------------- uncertainty threshold
def normalize_threshold(threshold: Threshold) -> Threshold:
    """None; a float r (relative: exclude voxels with SD > r * |value|); or {map: SD limit in the map's unit}."""
    if threshold is None:
        return None
    if isinstance(threshold, Mapping):
        limits = {}
        for name, limit in threshold.items():
            if name not in PARAMETERS:
                raise DCEPKInputError(f"uncertainty threshold for unknown map '{name}': use {', '.join(PARAMETERS)}")
            if limit is None or float(limit) <= 0:
                continue  # 0 or None: that map is not thresholded
            limits[name] = float(limit)
        return limits or None
    try:
        relative = float(threshold)
    except (TypeError, ValueError):
        raise DCEPKInputError(f"uncertainty threshold {threshold!r} must be a number (relative SD, e.g. 0.5) or "
                              "a dict of SD limits per map in the map's unit, e.g. {'Ktrans': 0.05}") from None
    if not np.isfinite(relative) or relative <= 0:
        raise DCEPKInputError(f"relative uncertainty threshold must be a positive number (0.5 = SD above 50 % "
                              f"of the value is excluded); got {threshold}")
    return relative


def excluded_by_uncertainty(maps: Mapping[str, np.ndarray], threshold: Threshold,
                            inferred: np.ndarray) -> Dict[str, np.ndarray]:
    """{parameter: bool [k, j, i]} of inferred voxels whose uncertainty exceeds the threshold."""
    threshold = normalize_threshold(threshold)
    excluded = {}
    for name in PARAMETERS:
        value, sd = np.asarray(maps[name], np.float64), np.asarray(maps[f"{name}_sd"], np.float64)
        if threshold is None:
            over = np.zeros(value.shape, dtype=bool)
        elif isinstance(threshold, dict):
            over = sd > threshold[name] if name in threshold else np.zeros(value.shape, dtype=bool)
        else:
            over = sd > threshold * np.abs(value)
        excluded[name] = over & inferred
    return excluded


# --------------------------------------------------------------------------- request / result
@dataclass
class SceneInferenceRequest:
    series: DCESeries
    model_name: str
    mask: Optional[np.ndarray]                  # bool [k, j, i]; None: run_inference's auto mask
    device: str = "auto"
    fa_deg: Optional[float] = None
    tr_s: Optional[float] = None
    t10_s: Union[None, float, np.ndarray] = None
    r1_per_mM_s: Optional[float] = None
    uncertainty_threshold: Threshold = None
    compare_with_fit: bool = False
    fit_settings: Optional[dict] = None         # FitSettings fields; mask = the inferred voxels, set at compute
    statistics_regions: Optional[Dict[str, np.ndarray]] = None
    source_id: str = ""
    output_prefix: str = "DCEPK-NN"
    update_existing: bool = True


@dataclass
class SceneInferenceResult:
    inference: object                           # inference.InferenceOutput (unthresholded)
    fit: Optional[object]                       # pipeline.FitOutput or None
    maps: Dict[str, np.ndarray]                 # what is published: thresholded maps (NaN = excluded), SDs, fit maps
    units: Dict[str, str]
    excluded: Dict[str, np.ndarray]             # bool [k, j, i] per parameter
    statistics: list = field(default_factory=list)
    messages: list = field(default_factory=list)


def prepare_scene_inference(sequence_node, model_name: str = "hetero_encoder", mask=None, device: str = "auto",
                            fa_deg: Optional[float] = None, tr_s: Optional[float] = None,
                            t10_s: Optional[float] = None, t10_map=None, t10_map_unit: str = "ms",
                            uncertainty_threshold: Threshold = None, compare_with_fit: bool = False,
                            fit_model: str = "etofts", population_aif: str = "parker", hct: float = 0.45,
                            r1_per_mM_s: Optional[float] = None, statistics_segmentation=None,
                            output_prefix: str = "DCEPK-NN", update_existing: bool = True) -> SceneInferenceRequest:
    """Read the nodes into a request; raises ``DCEPKInputError`` naming any problem. Reads only."""
    from ..nn.model_store import read_card

    read_card(model_name)  # unknown model: clear error now, before anything runs
    if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
        raise DCEPKInputError(f"unknown device {device!r}: use auto, cpu or cuda")
    threshold = normalize_threshold(uncertainty_threshold)
    series = fit_bridge.series_from_sequence(sequence_node)
    if series.kind != "concentration":
        fit_bridge.require_acquisition(fa_deg, series.flip_angle_deg, "flip angle", "flipAngle_deg (degrees)",
                                       "Flip angle")
        fit_bridge.require_acquisition(tr_s, series.tr_s, "TR", "tr_s (seconds)", "TR")
    reference = fit_bridge.reference_volume(series.spatial_shape, series.geometry)
    inference_mask = fit_bridge.mask_from_node(mask, reference, "inference mask")
    t10 = t10_s
    if t10_map is not None:
        t10 = fit_bridge.t10_map_seconds(t10_map, reference, t10_map_unit)
    elif t10 is None:
        raise DCEPKInputError("T10 is needed (the networks convert the signal to concentration): give a T10 value "
                              "in seconds or a T1 map volume")
    elif not 0.05 <= float(t10) <= 10.0:
        raise DCEPKInputError(f"T10 = {t10} s is outside 0.05-10 s: give T10 in seconds")
    _, regions = fit_bridge.statistics_regions(statistics_segmentation, mask, reference)
    fit_settings = None
    if compare_with_fit:
        if fit_model not in FIT_MODELS:
            raise DCEPKInputError(f"comparison fit model '{fit_model}' unknown: use one of {', '.join(FIT_MODELS)}")
        from DCEPKFittingLib.kinetics.aif import POPULATION_AIFS

        if population_aif not in POPULATION_AIFS:
            raise DCEPKInputError(f"population AIF '{population_aif}' unknown: use one of {', '.join(POPULATION_AIFS)}")
        fit_settings = dict(model=fit_model, method="nlls", t10_s=t10,
                            fa_deg=fa_deg, tr_s=tr_s, r1_per_mM_s=r1_per_mM_s, population_aif=population_aif,
                            hct=hct, device=device)
    return SceneInferenceRequest(
        series=series, model_name=model_name, mask=inference_mask, device=device, fa_deg=fa_deg, tr_s=tr_s,
        t10_s=t10, r1_per_mM_s=r1_per_mM_s, uncertainty_threshold=threshold, compare_with_fit=compare_with_fit,
        fit_settings=fit_settings,
        statistics_regions=regions, source_id=series.metadata.get("sequence_id", ""),
        output_prefix=output_prefix or "DCEPK-NN", update_existing=update_existing)


def compute_scene_inference(request: SceneInferenceRequest, progress=None, cancel=None) -> SceneInferenceResult:
    """``run_inference`` (and the comparison fit) on the prepared arrays: no scene access, thread-safe."""
    from ..pipeline.inference import run_inference

    split = 0.5 if request.compare_with_fit else 1.0
    inference = run_inference(request.series, request.model_name, mask=request.mask, device=request.device,
                              fa_deg=request.fa_deg, tr_s=request.tr_s, t10_s=request.t10_s,
                              r1_per_mM_s=request.r1_per_mM_s,
                              progress=sub_progress(progress, 0.0, 0.95 * split), cancel=cancel)
    raise_if_cancelled(cancel)
    fit = None
    messages = list(inference.notes)
    if request.compare_with_fit:
        from DCEPKFittingLib.pipeline.fit import FitSettings, run_fit

        report(progress, 0.5, "conventional fit for comparison")
        settings = FitSettings(mask=inference.mask, **request.fit_settings)
        fit = run_fit(request.series, settings, progress=sub_progress(progress, 0.5, 0.95), cancel=cancel)
        raise_if_cancelled(cancel)
        messages.append(f"comparison fit used the {request.fit_settings['population_aif']} population AIF")
    report(progress, 0.95, "uncertainty threshold and statistics")
    result = derive_outputs(request, inference, fit)
    result.messages = messages + result.messages
    report(progress, 1.0, "done")
    return result


def derive_outputs(request: SceneInferenceRequest, inference, fit=None) -> SceneInferenceResult:
    """Thresholded maps and per-segment statistics from the raw outputs (pure numpy; cheap, so a new
    threshold can be applied to an earlier result without running the network again)."""
    inferred = np.asarray(inference.mask, dtype=bool)
    excluded = excluded_by_uncertainty(inference.maps, request.uncertainty_threshold, inferred)
    maps, units = {}, {}
    for name, array in inference.maps.items():
        array = np.asarray(array, dtype=np.float32)
        if name in excluded and excluded[name].any():
            array = np.where(excluded[name], np.float32(np.nan), array)
        maps[name] = array
        units[name] = inference.units.get(name, UNITS.get(name.replace("_sd", ""), ""))
    if fit is not None:
        for name in PARAMETERS:
            for suffix in ("", "_se"):
                if f"{name}{suffix}" in fit.maps:
                    maps[f"{FIT_PREFIX}{name}{suffix}"] = np.asarray(fit.maps[f"{name}{suffix}"], dtype=np.float32)
                    units[f"{FIT_PREFIX}{name}{suffix}"] = fit.units.get(name, UNITS[name])
    messages = []
    if request.uncertainty_threshold is not None and inferred.any():
        messages.append("excluded by the uncertainty threshold: " + ", ".join(
            f"{name} {100.0 * excluded[name].sum() / inferred.sum():.1f} %" for name in PARAMETERS))
    rows = statistics_rows(maps, inference.maps, excluded, inferred, request.statistics_regions, units) \
        if request.statistics_regions else []
    return SceneInferenceResult(inference=inference, fit=fit, maps=maps, units=units, excluded=excluded,
                                statistics=rows, messages=messages)


def rethreshold(request: SceneInferenceRequest, result: SceneInferenceResult, uncertainty_threshold: Threshold):
    """(new request, new result) with another uncertainty threshold, from an earlier result."""
    request = dataclasses.replace(request, uncertainty_threshold=normalize_threshold(uncertainty_threshold))
    new = derive_outputs(request, result.inference, result.fit)
    new.messages = [m for m in result.messages if not m.startswith("excluded by")] + new.messages
    return request, new


# --------------------------------------------------------------------------- statistics
def statistics_rows(maps: Mapping[str, np.ndarray], raw_maps: Mapping[str, np.ndarray],
                    excluded: Mapping[str, np.ndarray], inferred: np.ndarray,
                    regions: Mapping[str, np.ndarray], units: Mapping[str, str]) -> list:
    """One row per (segment, map) over the segment's inferred voxels (NaN-aware, see ``STATISTICS_COLUMNS``).

    Network maps: value statistics of the kept voxels (excluded voxels count as NaN), mean of the
    1-SD uncertainty over all the segment's inferred voxels, and the fraction excluded by the threshold.
    Comparison-fit maps (``fit_<name>``): the fit's standard error as uncertainty, no exclusion.
    """
    names = [n for n in PARAMETERS if n in maps] + [FIT_PREFIX + n for n in PARAMETERS if FIT_PREFIX + n in maps]
    rows = []
    for label, (segment, region) in enumerate(regions.items(), start=1):
        voxels = np.asarray(region, dtype=bool) & inferred
        n_voxels = int(voxels.sum())
        for name in names:
            row = {"segment": segment, "label": label, "map": name, "unit": units.get(name, ""), "voxels": n_voxels}
            row.update(summarize(maps[name][voxels]))
            if name.startswith(FIT_PREFIX):
                se = maps.get(f"{name}_se")
                row["mean_uncertainty"] = _nanmean(se[voxels]) if se is not None else float("nan")
                row["excluded_fraction"] = float("nan")
            else:
                row["mean_uncertainty"] = _nanmean(raw_maps[f"{name}_sd"][voxels])
                row["excluded_fraction"] = (float(excluded[name][voxels].sum()) / n_voxels) if n_voxels else float("nan")
            rows.append({column: row[column] for column in STATISTICS_COLUMNS})
    return rows


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


# --------------------------------------------------------------------------- publish
def _node_by_name(scene, class_name: str, name: str):
    collection = scene.GetNodesByClassByName(class_name, name)
    return collection.GetItemAsObject(0) if collection.GetNumberOfItems() else None


def publish_scene_inference(scene, request: SceneInferenceRequest, result: SceneInferenceResult,
                            existing_nodes: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
    """Write maps, uncertainty maps (and comparison-fit maps, statistics table) into the scene.

    Returns ``{map name: volume node, 'statistics': table node}``. With ``update_existing`` the nodes
    of an earlier run with the same prefix are updated in place; ``existing_nodes`` (the dict an
    earlier publish returned) names the nodes to update explicitly (re-thresholding a result).
    """
    shape = tuple(request.series.spatial_shape)
    for name, array in result.maps.items():  # check everything before the first write
        if np.shape(array) != shape:
            raise DCEPKInputError(f"map {name} has shape {np.shape(array)}, not the series' {shape}")
    existing_nodes = dict(existing_nodes or {})
    nodes = {}
    before = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
    was_batch = scene.IsBatchProcessing()
    if not was_batch:
        scene.StartState(scene.BatchProcessState)
    try:
        for name, array in result.maps.items():
            node_name = fit_bridge.output_name(request.output_prefix, name)
            existing = existing_nodes.get(name)
            if existing is not None and existing.GetScene() is not scene:
                existing = None
            if existing is None and request.update_existing and name not in existing_nodes:
                existing = fit_bridge.find_output_node(scene, node_name)
            if existing is None and not request.update_existing:
                node_name = scene.GenerateUniqueName(node_name)
            elif existing is not None:
                node_name = existing.GetName()
            node = fit_bridge.update_volume_from_array(scene, array, result.inference.geometry, node_name,
                                                       existing_node=existing, units=result.units.get(name, ""),
                                                       map_name=name)
            node.SetAttribute("DCEPK.Source", request.source_id)
            node.SetAttribute(MODEL_ATTRIBUTE, "conventional fit" if name.startswith(FIT_PREFIX)
                              else request.model_name)
            nodes[name] = node
        for name in PARAMETERS:
            nodes[name].SetAttribute(UNCERTAINTY_ATTRIBUTE, nodes[f"{name}_sd"].GetID())
        if result.statistics:
            table_name = fit_bridge.output_name(request.output_prefix, "statistics")
            existing_table = existing_nodes.get("statistics")
            if existing_table is None and request.update_existing and "statistics" not in existing_nodes:
                existing_table = _node_by_name(scene, "vtkMRMLTableNode", table_name)
            if existing_table is None and not request.update_existing:
                table_name = scene.GenerateUniqueName(table_name)
            elif existing_table is not None:
                table_name = existing_table.GetName()
            nodes["statistics"] = fit_bridge.table_from_rows(scene, result.statistics, table_name, existing_table,
                                                             STATISTICS_COLUMNS)
    except BaseException:
        # Should writing fail half-way, take out what this call added (nodes it updated keep the new values).
        for node in [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]:
            if node is not None and node.GetID() not in before:
                scene.RemoveNode(node)
        raise
    finally:
        if not was_batch:
            scene.EndState(scene.BatchProcessState)
    return nodes


def run_scene_inference(scene, sequence_node, progress=None, cancel=None, **options):
    """prepare -> compute -> publish in one synchronous call; returns ``(nodes, SceneInferenceResult)``."""
    request = prepare_scene_inference(sequence_node, **options)
    result = compute_scene_inference(request, progress=progress, cancel=cancel)
    return publish_scene_inference(scene, request, result), result


# --------------------------------------------------------------------------- display
def show_map_with_uncertainty(scene, map_node, uncertainty_node, background_node=None,
                              views=("Red", "Yellow"), opacity: float = 0.8) -> None:
    """Map and its uncertainty side by side: map over the anatomy in the first slice view, its
    uncertainty in the second, both in the first view's orientation, navigation linked."""
    if map_node is None or uncertainty_node is None:
        raise DCEPKInputError("no map and uncertainty to show: run the inference first")
    composites = {node.GetLayoutName(): node for node in _nodes(scene, "vtkMRMLSliceCompositeNode")}
    slices = {node.GetLayoutName(): node for node in _nodes(scene, "vtkMRMLSliceNode")}
    missing = [view for view in views if view not in composites or view not in slices]
    if missing:
        raise DCEPKInputError(f"the scene has no slice view {', '.join(missing)}: show the views first")
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    orientation = slices[views[0]].GetOrientationString()
    for view, foreground in zip(views, (map_node, uncertainty_node)):
        composite = composites[view]
        composite.SetBackgroundVolumeID(background_node.GetID() if background_node is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID())
        composite.SetForegroundOpacity(opacity if background_node is not None else 1.0)
        composite.SetLinkedControl(True)
        slices[view].SetOrientation(orientation)


def _nodes(scene, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())]
