"""QIBA v6 and speed sections of the inference benchmark (``bench_inference.py``)."""

import time

import numpy as np
import torch

import inference_sets  # noqa: F401  (puts the Lib folders and Testing/Python on the path)
from DCEPKFittingLib.core.device import describe_device
from DCEPKFittingLib.core.reference_data import missing_reason, reference_path
from DCEPKFittingLib.io import read_dce
from DCEPKFittingLib.pipeline.fit import FitSettings, run_fit
from DCEPKFittingLib.pipeline.input_function import InputFunctionSpec
from DCEPKFittingLib.sims.phantom import Protocol, make_phantom
from DCEPKInferenceLib.analysis import metrics
from DCEPKInferenceLib.nn.model_store import list_models
from DCEPKInferenceLib.pipeline.inference import DEFAULT_MODEL, run_inference
from noisy_tofts_reference import patch_medians, qiba_layout, true_patch_values



def qiba_section(models, models_dir, log):
    lines = ["### QIBA v6 DRO with its own input function (noise-free, 1321 frames x 0.5 s)", ""]
    reason = missing_reason("qiba_v6")
    if reason:
        return lines + [f"skipped: {reason}"]
    series = read_dce(reference_path("qiba_v6"))
    t10, roi, tissue = qiba_layout(series.spatial_shape)
    spec = InputFunctionSpec(aif_mask=roi, hct=0.45)
    truth = dict(zip(("Ktrans", "ve"), true_patch_values()))
    truth["kep"] = truth["Ktrans"] / truth["ve"]
    maps = {"NLLS (extended Tofts, DRO AIF)": run_fit(series, FitSettings(model="etofts", t10_s=t10, r1_per_mM_s=4.5,
                                                                         mask=tissue, **vars(spec))).maps}
    for name in models:
        maps[name] = run_inference(series, name, mask=tissue, device="cpu", t10_s=t10, r1_per_mM_s=4.5,
                                   models_dir=models_dir, input_function=spec).maps
    if any(card["name"] == DEFAULT_MODEL for card in list_models(models_dir)):
        maps[f"{DEFAULT_MODEL} (AIF-free, no input function)"] = run_inference(
            series, DEFAULT_MODEL, mask=tissue, device="cpu", t10_s=t10, r1_per_mM_s=4.5, models_dir=models_dir).maps
    lines += ["| method | Ktrans CCC | ve CCC | kep CCC | Ktrans median abs error (1/min) |", "|---|---:|---:|---:|---:|"]
    for name, m in maps.items():
        est = {p: patch_medians(m[p]) for p in ("Ktrans", "ve", "kep")}
        ccc = {p: metrics.ccc(np.nan_to_num(est[p]), truth[p]) for p in est}
        lines.append(f"| {name} | {ccc['Ktrans']:.4f} | {ccc['ve']:.4f} | {ccc['kep']:.4f} | "
                     f"{np.median(np.abs(est['Ktrans'] - truth['Ktrans'])):.4f} |")
        log(f"  QIBA {name}: Ktrans CCC {ccc['Ktrans']:.4f}")
    lines += ["", "Per 10x10 patch (inner 6x6 median), 30 patches; the networks get FA, TR, T10, r1 and the input "
              "function from the vascular rows (blood T10 1.44 s, haematocrit 0.45), as NLLS does. The ve = 0.01 "
              "column (kep up to 35 /min) lies outside the training prior's fast-exchange range only at its top."]
    return lines


def _timed(function, repeats=2):
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def speed_section(names, models_dir, log):
    """Seconds for a 256 x 256 x 40 x 60-frame series, from 4 slices x 10, at 1 and 2 threads."""
    protocol = Protocol(n_frames=60, frame_time_s=5.0)
    phantom = make_phantom(shape=(4, 256, 256), protocol=protocol, snr=30.0, seed=3)
    brain = phantom.labels > 0
    spec = InputFunctionSpec(aif_mask=phantom.aif_mask)
    kw = dict(device="cpu", t10_s=phantom.truth["T10"], r1_per_mM_s=protocol.r1_per_mM_s, models_dir=models_dir,
              input_function=spec)
    rows = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        settings = FitSettings(t10_s=phantom.truth["T10"], r1_per_mM_s=protocol.r1_per_mM_s, mask=brain,
                               device="cpu", **vars(spec))
        rows[("NLLS (run_fit, extended Tofts)", "brain mask", threads)] = 10 * _timed(
            lambda: run_fit(phantom.series, settings), 1)
        for name in names:
            for label, mask in (("brain mask", brain), ("all voxels", np.ones_like(brain))):
                rows[(name, label, threads)] = 10 * _timed(lambda: run_inference(phantom.series, name, mask=mask,
                                                                                 **kw))
                log(f"  speed {name} {label} {threads} thread(s): {rows[(name, label, threads)]:.1f} s")
    torch.set_num_threads(1)
    lines = [f"### Speed: 256 x 256 x 40 x 60 frames (timed on 4 slices, x10; brain mask {int(brain.sum()) * 10} "
             f"voxels, all {256 * 256 * 40}); the device auto would use: {describe_device('auto')}",
             "", "Wall clock, the faster of 2 runs (NLLS: 1 run), on 2 cores shared with other jobs: compare within a "
             "column. Input function from the phantom's vessel ROI (its resolution included in every row); target: "
             "under 60 s on 2 cores.", "",
             "| method | voxels | 1 thread (s) | 2 threads (s) | vs NLLS (2 threads) |", "|---|---|---:|---:|---:|"]
    nlls = rows[("NLLS (run_fit, extended Tofts)", "brain mask", 2)]
    for (name, label, threads), seconds in rows.items():
        if threads == 2:
            lines.append(f"| {name} | {label} | {rows[(name, label, 1)]:.1f} | {seconds:.1f} | "
                         f"{nlls / seconds:.1f}x faster |")
    return lines
