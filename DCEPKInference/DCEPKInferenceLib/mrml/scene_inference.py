"""Inference, scene side: the module's Logic is three steps, so the slow one can run in a worker thread:
``prepare_scene_inference`` (reads nodes, main thread) -> ``compute_scene_inference`` (pure:
``run_inference``, optionally ``pipeline.fit.run_fit``, thresholding and statistics; thread-safe) ->
``publish_scene_inference`` (writes nodes, main thread). Nothing is written before the computation
has succeeded, so a cancel or an error leaves the scene as it was.

Units (OSIPI): Ktrans and kep in 1/min, ve and vp fractions; ``<name>_sd`` maps are the network's
1-SD uncertainty in the same units; T10 and TR in seconds, flip angle in degrees.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Union

import numpy as np

from DCEPKFittingLib import mrml as fit_mrml
from DCEPKFittingLib.analysis.stats import summarize
from DCEPKFittingLib.core.device import resolve_device
from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.jobs import raise_if_cancelled, report, sub_progress
from DCEPKFittingLib.io import DCESeries
from DCEPKFittingLib.mrml.volumes import node_by_name
from DCEPKFittingLib.pipeline.input_function import SPEC_FIELDS

from ..nn.input_definitions import READ_LABEL, ReadFromImage
from .model_cards import PARAMETERS, UNITS
from .uncertainty import Threshold, UNCERTAINTY_ATTRIBUTE, excluded_by_uncertainty, normalize_threshold

READ_NAME = "DCEPK AIF (read by network)"   # image-only mode: what the reader looked at, and its curve


FIT_PREFIX = "fit_"               # conventional-fit maps published beside the network's: fit_Ktrans, ...
FIT_MODELS = ("etofts", "tofts", "patlak")
STATISTICS_COLUMNS = ("segment", "label", "map", "unit", "voxels", "count", "nan_count", "mean", "sd", "median",
                      "iqr", "p05", "p95", "mean_uncertainty", "excluded_fraction")
MODEL_ATTRIBUTE = "DCEPK.Model"


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
    input_function: Optional[object] = None     # InputFunctionSpec: AIF-conditioned models (None: AIF-free)


@dataclass
class SceneInferenceResult:
    inference: object                           # the network's PKFit (unthresholded)
    fit: Optional[object]                       # the comparison fit's PKFit, or None
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
                            output_prefix: str = "DCEPK-NN", update_existing: bool = True,
                            aif_source: Optional[str] = None, aif_roi=None, aif_roi_label: int = 0, aif_csv: str = "",
                            auto_aif: str = "either", blood_t10_s: Optional[float] = None) -> SceneInferenceRequest:
    """Read the nodes into a request; raises ``DCEPKInputError`` naming any problem. Reads only.

    ``aif_source`` (``roi``, ``csv``, ``population``, ``auto``; None: no input function) gives an
    AIF-conditioned model its input function (``fit_mrml.input_function_from_nodes``, with
    ``population_aif`` and ``hct``); the comparison fit then uses the same one. ``image``: image-only
    mode (``ReadFromImage``: detection, else the reader network; the comparison fit uses detection)."""
    from ..nn.model_store import model_mode, read_card

    conditioned = model_mode(read_card(model_name)) == "aif_conditioned"  # unknown model: clear error now
    if conditioned != (aif_source is not None):
        raise DCEPKInputError(f"network '{model_name}' is AIF-conditioned: choose an input function source (ROI, CSV, "
                              "population or automatic detection)" if conditioned else
                              f"network '{model_name}' reads no input function: choose no source, or an "
                              "AIF-conditioned network")
    resolve_device(device)   # an unknown device, or a GPU asked for where there is none: said now
    threshold = normalize_threshold(uncertainty_threshold)
    series = fit_mrml.series_from_sequence(sequence_node)
    if series.kind != "concentration":
        fit_mrml.require_acquisition(fa_deg, series.flip_angle_deg, "flip angle", "flipAngle_deg (degrees)",
                                       "Flip angle")
        fit_mrml.require_acquisition(tr_s, series.tr_s, "TR", "tr_s (seconds)", "TR")
    reference = fit_mrml.reference_volume(series.spatial_shape, series.geometry)
    inference_mask = fit_mrml.mask_from_node(mask, reference, "inference mask")
    t10 = t10_s
    if t10_map is not None:
        t10 = fit_mrml.t10_map_seconds(t10_map, reference, t10_map_unit)
    elif t10 is None:
        raise DCEPKInputError("T10 is needed (the networks convert the signal to concentration): give a T10 value "
                              "in seconds or a T1 map volume")
    elif not 0.05 <= float(t10) <= 10.0:
        raise DCEPKInputError(f"T10 = {t10} s is outside 0.05-10 s: give T10 in seconds")
    _, regions = fit_mrml.statistics_regions(statistics_segmentation, mask, reference)
    spec = ReadFromImage(hct=hct, blood_t10_s=blood_t10_s or None).check() if aif_source == "image" else \
        None if aif_source is None else fit_mrml.input_function_from_nodes(
            reference, aif_source, aif_roi, aif_roi_label, aif_csv, population_aif, auto_aif, hct, blood_t10_s)
    fit_settings = None
    if compare_with_fit:
        if fit_model not in FIT_MODELS:
            raise DCEPKInputError(f"comparison fit model '{fit_model}' unknown: use one of {', '.join(FIT_MODELS)}")
        from DCEPKFittingLib.kinetics.aif import POPULATION_AIFS

        if population_aif not in POPULATION_AIFS:
            raise DCEPKInputError(f"population AIF '{population_aif}' unknown: use one of {', '.join(POPULATION_AIFS)}")
        source = dict(population_aif=population_aif, hct=hct) if spec is None else \
            dict(auto_aif="either", hct=hct, blood_t10_s=blood_t10_s or None) if isinstance(spec, ReadFromImage) \
            else {name: getattr(spec, name) for name in SPEC_FIELDS}
        fit_settings = dict(model=fit_model, method="nlls", t10_s=t10, fa_deg=fa_deg, tr_s=tr_s,
                            r1_per_mM_s=r1_per_mM_s, device=device, **source)
    return SceneInferenceRequest(
        series=series, model_name=model_name, mask=inference_mask, device=device, fa_deg=fa_deg, tr_s=tr_s,
        t10_s=t10, r1_per_mM_s=r1_per_mM_s, uncertainty_threshold=threshold, compare_with_fit=compare_with_fit,
        fit_settings=fit_settings,
        statistics_regions=regions, source_id=series.metadata.get("sequence_id", ""),
        output_prefix=output_prefix or "DCEPK-NN", update_existing=update_existing, input_function=spec)


def compute_scene_inference(request: SceneInferenceRequest, progress=None, cancel=None) -> SceneInferenceResult:
    """``run_inference`` (and the comparison fit) on the prepared arrays: no scene access, thread-safe."""
    from ..pipeline.inference import run_inference

    split = 0.5 if request.compare_with_fit else 1.0
    inference = run_inference(request.series, request.model_name, mask=request.mask, device=request.device,
                              fa_deg=request.fa_deg, tr_s=request.tr_s, t10_s=request.t10_s,
                              r1_per_mM_s=request.r1_per_mM_s, input_function=request.input_function,
                              progress=sub_progress(progress, 0.0, 0.95 * split), cancel=cancel)
    raise_if_cancelled(cancel)
    fit = None
    if request.compare_with_fit:
        from DCEPKFittingLib.pipeline.fit import run_fit

        report(progress, 0.5, "conventional fit for comparison")
        fit = run_fit(request.series, comparison_fit_settings(request, inference.estimated),
                      progress=sub_progress(progress, 0.5, 0.95), cancel=cancel)
        raise_if_cancelled(cancel)
    report(progress, 0.95, "uncertainty threshold and statistics")
    result = inference_result(request, inference, fit)
    report(progress, 1.0, "done")
    return result


def comparison_fit_settings(request: SceneInferenceRequest, inferred: np.ndarray):
    """The comparison fit's ``FitSettings``: the request's, on the voxels the network inferred."""
    from DCEPKFittingLib.pipeline.fit import FitSettings

    return FitSettings(mask=inferred, **request.fit_settings)


def inference_result(request: SceneInferenceRequest, inference, fit=None) -> SceneInferenceResult:
    """The published result of a run (in a thread or a child process): ``derive_outputs`` and the messages."""
    messages = list(inference.messages)
    if fit is not None:
        used = "automatic detection (either)" if isinstance(request.input_function, ReadFromImage) else \
            request.input_function.describe() if request.input_function is not None else \
            f"the {request.fit_settings['population_aif']} population AIF"
        messages.append(f"comparison fit used {used}")
    result = derive_outputs(request, inference, fit)
    result.messages = messages + result.messages
    return result


def derive_outputs(request: SceneInferenceRequest, inference, fit=None) -> SceneInferenceResult:
    """Thresholded maps and per-segment statistics from the raw outputs (pure numpy; cheap, so a new
    threshold can be applied to an earlier result without running the network again)."""
    inferred = np.asarray(inference.estimated, dtype=bool)
    excluded = excluded_by_uncertainty(inference.maps, request.uncertainty_threshold, inferred)
    maps, units = {}, {}
    for name, array in inference.maps.items():
        if name == "status":   # every inferred voxel is 'fitted': the network's maps and SDs say all
            continue
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
            node_name = fit_mrml.output_name(request.output_prefix, name)
            existing = existing_nodes.get(name)
            if existing is not None and existing.GetScene() is not scene:
                existing = None
            if existing is None and request.update_existing and name not in existing_nodes:
                existing = fit_mrml.find_output_node(scene, node_name)
            if existing is None and not request.update_existing:
                node_name = scene.GenerateUniqueName(node_name)
            elif existing is not None:
                node_name = existing.GetName()
            node = fit_mrml.update_volume_from_array(scene, array, result.inference.geometry, node_name,
                                                       existing_node=existing, units=result.units.get(name, ""),
                                                       map_name=name)
            node.SetAttribute("DCEPK.Source", request.source_id)
            node.SetAttribute(MODEL_ATTRIBUTE, "conventional fit" if name.startswith(FIT_PREFIX)
                              else request.model_name)
            nodes[name] = node
        for name in PARAMETERS:
            nodes[name].SetAttribute(UNCERTAINTY_ATTRIBUTE, nodes[f"{name}_sd"].GetID())
        if result.statistics:
            table_name = fit_mrml.output_name(request.output_prefix, "statistics")
            existing_table = existing_nodes.get("statistics")
            if existing_table is None and request.update_existing and "statistics" not in existing_nodes:
                existing_table = node_by_name(scene, "vtkMRMLTableNode", table_name)
            if existing_table is None and not request.update_existing:
                table_name = scene.GenerateUniqueName(table_name)
            elif existing_table is not None:
                table_name = existing_table.GetName()
            nodes["statistics"] = fit_mrml.table_from_rows(scene, result.statistics, table_name, existing_table,
                                                             STATISTICS_COLUMNS)
        if existing_nodes == {}:   # a new run (not a re-threshold): the voxels automatic detection chose
            nodes.update(_publish_detected(scene, request, result))
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


def _publish_detected(scene, request: SceneInferenceRequest, result: SceneInferenceResult) -> Dict[str, object]:
    """{'input_function': segmentation, 'input_function_chart': chart} when automatic detection chose the
    input function (an earlier detection's nodes replaced with ``update_existing``), else {}."""
    found = getattr(result.inference, "input_function", None)
    spec = request.input_function
    if found is None or not (isinstance(spec, ReadFromImage) or getattr(spec, "auto_aif", None)):
        return {}   # the user's own ROI, a CSV or a population AIF: nothing to show
    if isinstance(spec, ReadFromImage) and found.blood_mM is None:
        # the reader network gave it (plasma, no blood curve; in a thread or read back from a child): the
        # voxels it looked at most and the curve it read
        return fit_mrml.publish_run_detection(
            scene, found, request.series.times_s, result.inference.geometry, request.update_existing, READ_NAME,
            {READ_LABEL: "read by the network"}, {"plasma (read from the image)": result.inference.aif_plasma_mM})
    return fit_mrml.publish_run_detection(scene, found, request.series.times_s, result.inference.geometry,
                                          request.update_existing)


def run_scene_inference(scene, sequence_node, progress=None, cancel=None, **options):
    """prepare -> compute -> publish in one synchronous call; returns ``(nodes, SceneInferenceResult)``."""
    request = prepare_scene_inference(sequence_node, **options)
    result = compute_scene_inference(request, progress=progress, cancel=cancel)
    return publish_scene_inference(scene, request, result), result
