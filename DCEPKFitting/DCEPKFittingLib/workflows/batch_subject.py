"""One subject of ``dcepk batch``: the pipeline's entry points in turn, outputs in the subject's own folder.

series -> (T1 map) -> ``pipeline.run_fit`` (conversion, AIF, fit) and/or a shipped network (the
inference package's ``dcepk.networks`` entry point) -> maps -> ``analysis.stats.label_statistics``.
Every output goes through ``OutputSet``; the run manifest (``run.json``: inputs with their sizes and
SHA-256, options, software version, outputs with their sizes and SHA-256) is published last, in a set
of its own, so a subject is finished exactly when its run manifest is there and its files match it.
``run_subject`` never raises: a failure comes back as a message (and the traceback for the log).
"""

import argparse
import hashlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..core.errors import DCEPKInputError, DCEPKOutputError
from ..core.output_files import OutputSet
from ..core.output_files import sha256_of
from .cohort_manifest import SubjectSpec

RUN_MANIFEST = "run.json"
STATISTICS_FILE = "statistics.csv"
SUMMARY_FILE = "summary.json"
CODE_MAPS = ("status", "selected_model")  # integer codes, not quantities: no statistics of them


def software_version() -> str:
    from .. import __version__
    return __version__


def fingerprint(spec: SubjectSpec) -> str:
    """SHA-256 of what the subject's results depend on, but the inputs' contents (checked apart)."""
    text = json.dumps({"inputs": spec.inputs, "options": spec.options, "version": software_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _files_of(path: Path) -> List[Path]:
    """A file, or every file under a folder (DICOM), in a stable order."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def file_record(path: Path, previous: Optional[dict] = None, verify: bool = False) -> dict:
    """Path, size, modification time (ns) and SHA-256 of a file. The checksum of ``previous`` is reused
    when size and time are unchanged (as make and git do) unless ``verify``."""
    stat = path.stat()
    record = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    same = previous is not None and all(previous.get(k) == record[k] for k in ("path", "size", "mtime_ns"))
    record["sha256"] = previous["sha256"] if same and not verify else sha256_of(path)
    return record


def input_records(spec: SubjectSpec) -> Dict[str, List[dict]]:
    return {role: [file_record(f) for p in paths for f in _files_of(Path(p))] for role, paths in spec.inputs.items()}


def read_run_manifest(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / RUN_MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def outdated_reason(spec: SubjectSpec, folder: Path, verify: bool = False) -> Optional[str]:
    """Why the subject must be (re)computed, or None when its outputs match its inputs and options."""
    run = read_run_manifest(folder)
    if run is None:
        return "not finished before" if folder.exists() else "new"
    if run.get("fingerprint") != fingerprint(spec):
        return "options, input paths or software version changed"
    for role, paths in spec.inputs.items():
        recorded = run.get("inputs", {}).get(role, [])
        current = [f for p in paths for f in _files_of(Path(p))]
        if [str(f) for f in current] != [r["path"] for r in recorded]:
            return f"the files of input '{role}' changed"
        for path, previous in zip(current, recorded):
            if file_record(path, previous, verify)["sha256"] != previous["sha256"]:
                return f"input '{role}' changed ({path.name})"
    for record in run.get("outputs", []):
        path = folder / record["path"]
        if not path.is_file() or path.stat().st_size != record["size"]:
            return f"output {record['path']} is missing or changed"
        if (verify or path.stat().st_mtime_ns != record["mtime_ns"]) and sha256_of(path) != record["sha256"]:
            return f"output {record['path']} changed"
    return None


def run_subject(spec: SubjectSpec, out_root: str, device: str = "auto") -> dict:
    """Analyse one subject into ``out_root/subjects/<folder>``; returns its outcome (never raises)."""
    started = time.time()
    folder = Path(out_root) / "subjects" / spec.folder
    outcome = {"key": spec.key, "subject": spec.subject, "session": spec.session, "folder": str(folder)}
    try:
        previous = _forget_previous_run(folder)
        inputs = input_records(spec)
        analyses, geometry, notes = analyse(spec, device)
        outputs = _write_outputs(folder, spec, analyses, geometry, notes, previous)
        _write_run_manifest(folder, spec, inputs, outputs, started)
        outcome.update(state="done", notes=notes)
    except Exception as error:  # the batch goes on: the subject is recorded as failed, with its traceback
        message = str(error) if isinstance(error, (DCEPKInputError, DCEPKOutputError)) else \
            f"{type(error).__name__}: {error}"
        outcome.update(state="failed", error=message, traceback=traceback.format_exc())
    outcome["seconds"] = time.time() - started
    return outcome


def _forget_previous_run(folder: Path) -> List[str]:
    """Remove the run manifest of an earlier run (the subject is unfinished until the new one is
    written); returns the outputs it listed, to remove those the new run does not write again."""
    previous = read_run_manifest(folder)
    try:
        os.unlink(folder / RUN_MANIFEST)
    except FileNotFoundError:
        pass
    return [record["path"] for record in (previous or {}).get("outputs", [])]


def _series_arguments(spec: SubjectSpec) -> argparse.Namespace:
    """The manifest row in the form of ``dcepk fit``'s options, for the command line's own readers."""
    options, inputs = spec.options, spec.inputs
    t10_map = inputs.get("t10_map")
    return argparse.Namespace(
        input=Path(inputs["dce"][0]), times=None if options["times_s"] is None else np.asarray(options["times_s"]),
        dt=options["dt_s"], override_timing=options["override_timing"], series_uid=options["series_uid"],
        t10=Path(t10_map[0]) if t10_map else options["t10_s"], t10_unit=options["t10_unit"] if t10_map else "s")


def analyse(spec: SubjectSpec, device: str = "auto"):
    """({method: analysis}, geometry, notes): each analysis holds maps, units, the voxels analysed and
    its per-label statistics rows."""
    from ..io import read_mask
    from . import cli
    options, inputs = spec.options, spec.inputs
    args = _series_arguments(spec)
    series = cli.read_series_option(args, kind=options["input_kind"])
    notes = cli.nonfinite_note(series)
    grid = (series.geometry, series.spatial_shape)
    labels, label_names = _labels(spec, grid)
    mask = read_mask(inputs["mask"][0], *grid) if "mask" in inputs else (None if labels is None else labels > 0)
    t10 = cli.read_t10(args, series)
    vfa = _vfa(spec, series) if "vfa" in inputs else None
    input_function = _input_function(spec, grid)
    analyses = {}
    if options["model"] != "none":
        analyses["fit"] = _fit(spec, series, t10, vfa, mask, input_function, device, options["network"] == "none")
        notes += analyses["fit"]["notes"]
    if options["network"] != "none":
        if vfa is not None:   # the T1 map from the fit when there is one
            t10 = analyses["fit"]["maps"]["T10_s"] if "fit" in analyses else _vfa_t1(vfa)
        analyses["network"] = _network(spec, series, t10, mask, input_function, device)
        notes += analyses["network"]["notes"]
    for method, analysis in analyses.items():
        analysis["rows"] = _statistics(spec, method, analysis, labels, label_names)
    return analyses, series.geometry, notes


def _labels(spec: SubjectSpec, grid):
    from ..analysis.stats import check_label_map
    from ..io import read_mask
    if "labels" not in spec.inputs:
        return None, {}
    path = spec.inputs["labels"][0]
    labels = check_label_map(read_mask(path, *grid, labels=True), f"the label map {path}")
    return labels, read_label_names(spec.inputs["label_names"][0]) if "label_names" in spec.inputs else {}


def read_label_names(path) -> Dict[int, str]:
    """'value name' lines (``dcepk stats --label-names``) or a BIDS ``dseg.tsv`` (columns index, name)."""
    from . import cli
    text = cli.read_text_option(Path(path), "label_names")
    header = text.splitlines()[0].lower().split("\t") if text.strip() else []
    if "index" in header and "name" in header:
        index, name = header.index("index"), header.index("name")
        names = {}
        for number, line in enumerate(text.splitlines()[1:], 2):
            cells = line.split("\t")
            if len(cells) <= max(index, name):
                continue
            try:
                names[int(cells[index])] = cells[name].strip()
            except ValueError:
                raise DCEPKInputError(f"{path}, line {number}: index '{cells[index]}' is not a whole number") from None
        return names
    return cli.read_label_names(path)


def _vfa(spec: SubjectSpec, series):
    """(signals [k, j, i, n], flip angles (deg), TR (s)) of the subject's VFA series, on the series grid."""
    from ..core.geometry import check_same_grid
    from . import cli
    args = argparse.Namespace(inputs=[Path(p) for p in spec.inputs["vfa"]], fa=spec.options["vfa_fa_deg"],
                              tr=spec.options["vfa_tr_s"])
    signals, flip_angles, tr_s, geometry = cli.vfa_inputs(args)
    check_same_grid(series.spatial_shape, series.geometry, signals.shape[:3], geometry, "DCE series", "VFA series")
    return signals, flip_angles, tr_s


def _vfa_t1(vfa) -> np.ndarray:
    from ..signal import fit_vfa_t1
    return np.asarray(fit_vfa_t1(*vfa, method="nonlinear")[0], dtype=np.float32)


def _input_function(spec: SubjectSpec, grid):
    """The subject's input function (``pipeline.input_function.InputFunctionSpec``), None without one: the
    fit and an AIF-conditioned network resolve the same one."""
    from ..io import read_mask
    from ..pipeline.input_function import InputFunctionSpec
    options, inputs = spec.options, spec.inputs
    found = InputFunctionSpec(
        aif_mask=read_mask(inputs["aif_roi"][0], *grid) if "aif_roi" in inputs else None,
        aif_csv=inputs["aif_csv"][0] if "aif_csv" in inputs else None, population_aif=options["population_aif"],
        auto_aif=options.get("auto_aif"), aif_top_fraction=options["aif_top_fraction"],
        aif_is_plasma=options["aif_is_plasma"], hct=options["hct"], aif_delay_s=options["aif_delay_s"])
    return found if found.sources_given() else None


def _fit(spec: SubjectSpec, series, t10, vfa, mask, input_function, device: str, last_use: bool) -> dict:
    from ..pipeline.fit import FitSettings, run_fit
    from ..pipeline.input_function import SPEC_FIELDS
    options = spec.options
    vfa_signals, vfa_angles, vfa_tr = vfa if vfa is not None else (None, None, None)
    settings = FitSettings(
        model=options["model"], method=options["method"], t10_s=t10, vfa_signals=vfa_signals,
        vfa_flip_angles_deg=vfa_angles, vfa_tr_s=vfa_tr, fa_deg=options["fa_deg"], tr_s=options["tr_s"],
        r1_per_mM_s=options["r1_per_mM_s"], baseline_frames=options["baseline_frames"], mask=mask,
        fit_delay=options["fit_delay"], device=device,
        **({} if input_function is None else {name: getattr(input_function, name) for name in SPEC_FIELDS}))
    return _analysis(options["model"], run_fit(series, settings, reuse_series_memory=last_use))


def _network(spec: SubjectSpec, series, t10, mask, input_function, device: str) -> dict:
    from .plugins import network_provider
    options = spec.options
    provider = network_provider()
    if provider is None:
        raise DCEPKInputError("network maps need the inference package (DCEPKInference), which is not installed")
    result = provider["maps"](series, options["network"], mask=mask, device=device, t10_s=t10,
                              fa_deg=options["fa_deg"], tr_s=options["tr_s"], r1_per_mM_s=options["r1_per_mM_s"],
                              baseline_frames=options["baseline_frames"], input_function=input_function)
    return _analysis(options["network"], result)


def _analysis(model: str, result) -> dict:
    """What the subject's outputs need of a fit's or a network's ``PKFit`` (``model``: the model or network)."""
    return {"model": model, "maps": result.maps, "units": result.units, "status": result.status,
            "analysed": result.estimated, "notes": list(result.messages), "baseline_frames": result.baseline_frames}


def _statistics(spec: SubjectSpec, method: str, analysis: dict, labels, label_names) -> List[dict]:
    """Tidy rows: subject, session, method, model, label, segment, map, unit, then the core's statistics."""
    from ..analysis.stats import label_statistics
    if labels is None:   # no label map: one row per map over the voxels analysed
        labels, label_names = analysis["analysed"].astype(np.int64), {1: "analysed voxels"}
    maps = {name: array for name, array in analysis["maps"].items() if name not in CODE_MAPS}
    rows = label_statistics(maps, labels, label_names, status=analysis["status"])
    return [{"subject": spec.subject, "session": spec.session, "method": method, "model": analysis["model"],
             "label": row.pop("label"), "segment": row.pop("segment"), "map": row["map"],
             "unit": analysis["units"].get(row.pop("map"), ""), **row} for row in rows]


def _write_outputs(folder: Path, spec: SubjectSpec, analyses: dict, geometry, notes: List[str],
                   previous: List[str]) -> List[Path]:
    from ..analysis.stats import stage_table
    from ..io import stage_maps
    summary = {"subject": spec.subject, "session": spec.session, "options": spec.options, "notes": notes,
               "baseline_frames": {m: a["baseline_frames"] for m, a in analyses.items()},
               "units": {m: a["units"] for m, a in analyses.items()}}
    with OutputSet(overwrite=True) as outputs:
        written = []
        for method, analysis in analyses.items():
            written += stage_maps(outputs, folder / f"maps_{method}", analysis["maps"], geometry)
        rows = [row for analysis in analyses.values() for row in analysis["rows"]]
        written.append(stage_table(outputs, rows, folder / STATISTICS_FILE))
        written.append(outputs.add_text(folder / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n"))
        outputs.commit()
    kept = {str(path.relative_to(folder)) for path in written}
    for stale in set(previous) - kept:   # outputs of an earlier run with other options (e.g. another model)
        try:
            os.unlink(folder / stale)
        except OSError:
            pass
    return written


def _write_run_manifest(folder: Path, spec: SubjectSpec, inputs: dict, outputs: List[Path], started: float) -> None:
    """The subject's run manifest, published last: from here on the subject counts as finished."""
    manifest = {"subject": spec.subject, "session": spec.session, "manifest_line": spec.line,
                "software": {"dcepk": software_version()}, "fingerprint": fingerprint(spec),
                "options": spec.options, "inputs": inputs,
                "outputs": [dict(file_record(path), path=str(path.relative_to(folder))) for path in outputs],
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "seconds": round(time.time() - started, 3)}
    with OutputSet(overwrite=True) as run_manifest:
        run_manifest.add_text(folder / RUN_MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        run_manifest.commit()
