"""``dcepk demo``: the whole workflow on the built-in synthetic phantom, with ground truth.

phantom -> VFA T1 map -> AIF from the vessel ROI -> extended Tofts fit -> maps, per-tissue
statistics and a PNG figure of fitted (and, when the networks are installed, inferred) maps
beside the ground truth. Everything lands in one output folder; nothing outside it is touched,
and every file is published at the end, together (an error or Ctrl-C leaves the folder as it was).
"""

import time
from pathlib import Path
from typing import Dict

import numpy as np

from ..analysis.stats import label_statistics, stage_table
from ..core.errors import DCEPKInputError
from ..core.jobs import ConsoleProgress, sub_progress
from ..core.output_files import OutputSet, check_targets
from ..io import stage_maps
from ..pipeline.fit import FitSettings, run_fit
from ..sims.phantom import make_phantom, stage_phantom
from .plugins import load_entry_points

FIGURE_PARAMETERS = (("Ktrans", "1/min", (0.0, 0.3)), ("ve", "", (0.0, 0.6)), ("vp", "", (0.0, 0.1)))


def _check_output_folder(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DCEPKInputError(f"{out_dir} is a file: choose another output folder (--out)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DCEPKInputError(f"{out_dir} exists and is not empty: choose another --out or pass --overwrite")
    check_targets([out_dir / "statistics.tsv", out_dir / "demo_maps.png"], overwrite)  # a folder we can write in


def _extra_analyses(phantom, t10_s, device: str, progress) -> Dict[str, dict]:
    """Maps from installed extensions (the shipped networks), by method name; empty when none.
    They get what the fit got but the AIF: the series, mask, T10 (s, the VFA map) and r1."""
    analyses = load_entry_points("dcepk.demo_analyses")
    if not analyses:
        print("(neural-network inference skipped: no inference extension is installed)")
    results = {}
    for index, analysis in enumerate(analyses):
        step = sub_progress(progress, index / len(analyses), (index + 1) / len(analyses))
        results.update(analysis(phantom.series, phantom.labels > 0, device, step, t10_s=t10_s,
                                r1_per_mM_s=phantom.protocol.r1_per_mM_s))
    return results


def save_figure(outputs: OutputSet, path: Path, truth: Dict[str, np.ndarray], fitted: Dict[str, np.ndarray],
                inferred: Dict[str, Dict[str, np.ndarray]], slice_index: int) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour_map = matplotlib.colormaps["inferno"].with_extremes(bad="black")  # unfitted voxels are NaN
    columns = [("ground truth", truth), ("NLLS fit", fitted)] + [(name, maps) for name, maps in inferred.items()]
    figure, axes = plt.subplots(len(FIGURE_PARAMETERS), len(columns),
                                figsize=(2.6 * len(columns) + 0.8, 2.5 * len(FIGURE_PARAMETERS)), squeeze=False)
    for row, (name, unit, limits) in enumerate(FIGURE_PARAMETERS):
        for col, (title, maps) in enumerate(columns):
            axis = axes[row, col]
            image = axis.imshow(np.asarray(maps[name])[slice_index], cmap=colour_map, vmin=limits[0], vmax=limits[1])
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=9)
            if col == 0:
                axis.set_ylabel(f"{name} ({unit})" if unit else name)
        figure.colorbar(image, ax=axes[row, :].tolist(), shrink=0.8)
    figure.suptitle("DCEPK demo: synthetic brain phantom")
    try:
        return outputs.add_stream(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(figure)


def run_demo(out_dir, with_inference: bool = True, device: str = "auto", overwrite: bool = False,
             progress=None) -> Dict[str, object]:
    out_dir = Path(out_dir)
    _check_output_folder(out_dir, overwrite)
    progress = progress or ConsoleProgress("demo")
    start = time.perf_counter()

    with OutputSet(overwrite) as outputs:
        result = _run_and_stage(outputs, out_dir, device, with_inference, progress)
        outputs.commit()
    progress(1.0, "done")
    elapsed = time.perf_counter() - start
    phantom, rim = result["phantom"], result.pop("rim")
    inferred = result["inferred"]
    print(f"\nDCEPK demo finished in {elapsed:.1f} s; outputs in {out_dir}/")
    print(f"  maps: {out_dir / 'maps_fit'}/  statistics: {out_dir / 'statistics.tsv'}  figure: {result['figure']}")
    print(f"  {'tumour rim (median)':<22}{'truth':>10}{'NLLS fit':>10}" + "".join(f"{n:>16}" for n in inferred))
    for name in ("Ktrans", "ve", "vp"):
        values = [np.nanmedian(phantom.truth[name][rim]), np.nanmedian(result["fit"].maps[name][rim])]
        values += [np.nanmedian(maps[name][rim]) for maps in inferred.values()]
        print(f"  {name:<22}" + f"{values[0]:>10.4f}{values[1]:>10.4f}" + "".join(f"{v:>16.4f}" for v in values[2:]))
    result["elapsed_s"] = elapsed
    return result


def _run_and_stage(outputs: OutputSet, out_dir: Path, device: str, with_inference: bool, progress) -> dict:
    """The demo's computations, each output staged into ``outputs`` as it comes."""
    phantom = make_phantom(vfa_flip_angles_deg=(2.0, 5.0, 10.0, 15.0, 20.0))
    stage_phantom(outputs, phantom, out_dir / "phantom")
    settings = FitSettings(
        model="etofts", vfa_signals=phantom.vfa.signals, vfa_flip_angles_deg=phantom.vfa.flip_angles_deg,
        vfa_tr_s=phantom.vfa.tr_s, r1_per_mM_s=phantom.protocol.r1_per_mM_s, hct=phantom.protocol.hct,
        aif_mask=phantom.aif_mask, mask=phantom.labels > 0, device=device)
    result = run_fit(phantom.series, settings, progress=sub_progress(progress, 0.0, 0.7))
    stage_maps(outputs, out_dir / "maps_fit", result.maps, phantom.series.geometry)

    inferred = (_extra_analyses(phantom, result.maps["T10_s"], device, sub_progress(progress, 0.7, 0.95))
                if with_inference else {})
    for name, maps in inferred.items():
        stage_maps(outputs, out_dir / f"maps_{name}", maps, phantom.series.geometry)

    stat_maps = {f"fit_{k}": result.maps[k] for k in ("Ktrans", "ve", "vp")}
    stat_maps.update({f"true_{k}": phantom.truth[k] for k in ("Ktrans", "ve", "vp")})
    for name, maps in inferred.items():
        stat_maps.update({f"{name}_{k}": maps[k] for k in ("Ktrans", "ve", "vp")})
    # the fit's statistics over its fitted voxels (counts per status in every row)
    rows = label_statistics(stat_maps, phantom.labels, phantom.label_names, status=result.maps["status"],
                            status_of=[name for name in stat_maps if name.startswith("fit_")])
    stage_table(outputs, rows, out_dir / "statistics.tsv")

    tumour = max(phantom.label_names, key=lambda v: np.sum(phantom.labels == v) if "rim" in phantom.label_names[v] else -1)
    slice_index = int(np.argmax(np.sum(phantom.labels == tumour, axis=(1, 2))))
    figure = save_figure(outputs, out_dir / "demo_maps.png", phantom.truth, result.maps, inferred, slice_index)
    return {"fit": result, "inferred": inferred, "statistics": rows, "figure": figure, "phantom": phantom,
            "rim": phantom.labels == tumour}
