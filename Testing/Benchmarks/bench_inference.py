"""Benchmark of the shipped inference networks against the conventional NLLS fit.

    cd <repo> && OMP_NUM_THREADS=2 python Testing/Benchmarks/bench_inference.py [--quick] [--no-write]

1. Held-out synthetic test sets (seeds never used in training; one subject, i.e. one AIF, per
   32x32 patch), four protocols, two of them outside the training ranges (20 frames x 16 s;
   200 frames x 1.2 s): RMSE, bias, CCC of Ktrans, ve, vp per network beside extended-Tofts
   NLLS (``TracerKineticModel``) with (a) the TRUE AIF of each subject (the conventional best
   case) and (b) the Parker population AIF placed at the detected bolus arrival (what a
   conventional fit can do with the information the networks get). Every method gets the same
   concentration (``canonical_grid.tissue_concentration``: FA, TR, T10, r1 known); the networks
   never get the AIF. Full SNR range (4-150) and low SNR (5-15) separately. The low-SNR ratio
   best network / NLLS comes with a 90 % interval from resampling whole subjects.
2. Calibration of each network's SD: fraction of truths inside mean +- 1.645 SD (target
   0.85-0.95, with its 90 % interval over subjects) and Spearman of |error| vs SD (target > 0.3),
   on the full-SNR sets; on the unseen protocols after the recalibration to the frame times
   that ``run_inference`` does there.
3. QIBA v6 DRO (noise-free, 0.5 s frames, 11 min) through each network without its AIF
   (FA 30 deg, TR 5 ms, T10 1 s and r1 4.5 given): per 10x10 patch median Ktrans,
   CCC vs truth and vs NLLS (NLLS with the DRO's own vascular AIF, T10 1.0 / 1.44 s, r1 4.5).
4. Speed: a 256 x 256 x 4 x 60-frame phantom slab, timed and extrapolated x10 to 40 slices,
   for the brain mask (auto) and for every voxel, beside signal->concentration + NLLS.
Prints tables and rewrites the "Inference" section of Testing/Benchmarks/RESULTS.md.
"""

import argparse
import multiprocessing
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
for lib in ("DCEPKFitting", "DCEPKInference"):
    sys.path.insert(0, str(ROOT / lib))

from DCEPKFittingLib import signal as signal_models
from DCEPKFittingLib.core.reference_data import missing_reason, reference_path  # noqa: E402
from DCEPKFittingLib.io import read_dce  # noqa: E402
from DCEPKFittingLib.kinetics import aif as aif_lib  # noqa: E402
from DCEPKFittingLib.kinetics.model import TracerKineticModel  # noqa: E402
from DCEPKFittingLib.sims.phantom import Protocol, make_phantom  # noqa: E402
from DCEPKInferenceLib.analysis import metrics  # noqa: E402
from DCEPKInferenceLib.data import canonical_grid as cg  # noqa: E402
from DCEPKInferenceLib.data import simulator
from DCEPKInferenceLib.nn.model_store import list_models, load_model, training_totals  # noqa: E402
from DCEPKInferenceLib.nn.networks import PARAM_NAMES  # noqa: E402
from DCEPKInferenceLib.pipeline.inference import protocol_outside_training, run_inference  # noqa: E402
from DCEPKInferenceLib.training import PROTOCOL_CALIBRATION, calibrate_to_protocol  # noqa: E402
from bench_fitting import time_curve_fit  # noqa: E402  (same folder: one curve_fit loop for both benchmarks)

# training draws [seed, step] with seeds 1-4, 11-21; validation 900001, calibration 900002,
# protocol calibration 900003, checks 424242
BENCH_SEED = 7_000_001
PROTOCOLS = {
    "60 x 5 s": np.arange(60) * 5.0,
    "two-rate 10 x 2 s + 40 x 8 s": np.concatenate([np.arange(10) * 2.0, 20.0 + np.arange(40) * 8.0]),
    "20 x 16 s (unseen)": np.arange(20) * 16.0,
    "200 x 1.2 s (unseen)": np.arange(200) * 1.2,
}
SNR_SETS = {"SNR 4-150": (4.0, 150.0), "SNR 5-15": (5.0, 15.0)}


NLLS_TRUE, NLLS_POPULATION = "NLLS (true AIF)", "NLLS (Parker AIF)"
CURVE_FIT_VOXELS = 200
CURVE_FIT_LOOP = f"NLLS, per-voxel scipy curve_fit loop (true AIF; {CURVE_FIT_VOXELS} voxels, extrapolated)"
SPEED_REPEATS = 2   # the faster of two runs: a shared CPU slows single runs by up to ~1.5x
CARD_FACTORS_ONLY = "card's SD factors, not recalibrated"


def amplitude_floor_factor():
    """Without the AIF, the data fix only a * Ktrans (a = the subject's AIF amplitude factor, uniform
    over SIMULATOR_RANGES). The best estimate of the form g * a * Ktrans has g = E[a] / E[a^2] and
    relative RMSE sqrt(1 - E[a]^2 / E[a^2]): a floor for any AIF-free method from the amplitude
    alone (AIF width and haematocrit add to it)."""
    lo, hi = simulator.SIMULATOR_RANGES["aif_amplitude_factor"]
    mean, mean_sq = (lo + hi) / 2, (hi ** 3 - lo ** 3) / (3 * (hi - lo))
    return float(np.sqrt(1 - mean ** 2 / mean_sq))


def nlls_on_patch(patch, aif):
    """Extended Tofts NLLS of one patch on the networks' concentration, with the subject's true
    plasma AIF (``aif='true'``) or the Parker population AIF from the detected bolus arrival
    (``aif.population_aif_at_arrival``, as ``pipeline.run_fit``) with the simulator's mean haematocrit."""
    sub = patch["subject"]
    n_base = patch["canonical"].baseline_frames
    conc, _, _ = cg.tissue_concentration(patch["signal"], n_base, sub.fa_deg, sub.tr_s, patch["t10"],
                                         sub.r1_per_mM_s)
    if aif == "true":
        cp = sub.cp_mM
    else:
        cp = aif_lib.population_aif_at_arrival("parker", sub.times_s, n_base,
                                               hct=float(np.mean(simulator.SIMULATOR_RANGES["hct"])))
    fit = TracerKineticModel(sub.times_s, cp, "etofts", method="nlls", device="cpu").fit(conc)
    return np.nan_to_num(np.stack([fit.maps[n] for n in PARAM_NAMES], axis=1))


def _one_thread():
    torch.set_num_threads(1)


def nlls_pool(workers):
    """Worker processes for the per-patch NLLS fits: each patch has its own AIF, so each is a
    separate small fit on one thread; processes use the other cores."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)


def network_on_patches(model, card, patches):
    """(mean, sd, sd_with_card_factors) (N, 3) as ``run_inference`` gives them: on frame times outside
    the training ranges the SD is first recalibrated to the protocol (``training.calibrate_to_protocol``),
    and the third item is the SD the card's factors alone gave (else None)."""
    times = patches[0]["subject"].times_s
    card_factors = list(model.config["sd_scale"])
    extra = calibrate_to_protocol(model, times) if protocol_outside_training(times, card) else None
    try:
        mean, sd = _network_outputs(model, patches)
    finally:
        model.config["sd_scale"] = card_factors
    return mean, sd, (None if extra is None else sd / np.asarray(extra, dtype=sd.dtype))


def _network_outputs(model, patches):
    with torch.no_grad():
        torch.manual_seed(0)
        protocol = [p["canonical"].protocol for p in patches]
        if model.kind == "voxel":
            c = [p["canonical"] for p in patches]
            curves = torch.from_numpy(np.concatenate([x.curves for x in c]))
            valid = torch.from_numpy(np.concatenate([np.broadcast_to(x.valid, x.curves.shape) for x in c]))
            mean, sd = model.predict(curves, valid, torch.from_numpy(np.concatenate(protocol)))
            return mean.numpy(), sd.numpy()
        batch = simulator.patches_to_batch(patches)
        size = patches[0]["size"]
        image = np.stack([f.T.reshape(-1, size, size) for f in protocol]).astype(np.float32)
        mean, sd = model.predict(torch.from_numpy(batch.curves), torch.from_numpy(batch.valid),
                                 torch.from_numpy(image), torch.from_numpy(batch.tissue))
        return tuple(x.permute(0, 2, 3, 1).reshape(-1, 3).numpy() for x in (mean, sd))


def per_subject_sum(values, n_subjects):
    """(N, 3) per-voxel values, voxels grouped by subject in order -> (n_subjects, 3) sums."""
    return np.asarray(values, float).reshape(n_subjects, -1, values.shape[-1]).sum(1)


def ratio_interval(best_sse, nlls_sse):
    """90 % interval over resampled subjects of RMSE(best) / RMSE(NLLS), both on the same subjects."""
    return metrics.group_bootstrap_interval(lambda s: np.sqrt(best_sse[s].sum() / nlls_sse[s].sum()),
                                            len(best_sse))


def coverage_interval(inside, voxels_per_subject):
    return metrics.group_bootstrap_interval(lambda s: inside[s].sum() / (len(s) * voxels_per_subject), len(inside))


def synthetic(models, cards, n_patches, log, pool):
    rows, calib, floors = [], [], {}
    for p_index, (pname, times) in enumerate(PROTOCOLS.items()):
        for s_index, (sname, snr_range) in enumerate(SNR_SETS.items()):
            rng = np.random.default_rng([BENCH_SEED, p_index, s_index])
            patches = [simulator.simulate_patch(rng, 32, snr_range, times) for _ in range(n_patches)]
            truth = np.concatenate([p["params"] for p in patches])
            floors[(pname, sname)] = amplitude_floor_factor() * float(np.sqrt(np.mean(truth[:, 0] ** 2)))
            results = {}
            t0 = time.perf_counter()
            for method, aif in ((NLLS_TRUE, "true"), (NLLS_POPULATION, "parker")):
                results[method] = (np.concatenate(list(pool.map(nlls_on_patch, patches, [aif] * len(patches)))), None)
            log(f"  {pname} / {sname}: NLLS {time.perf_counter() - t0:.1f} s")
            card_sd = {}
            for name, model in models.items():
                *results[name], card_sd[name] = network_on_patches(model, cards[name], patches)

            def calibration_row(method, est, sd):
                inside = per_subject_sum(metrics.inside90(est, sd, truth), n_patches)
                return {"protocol": pname, "method": method, "subject_inside": inside,
                        "subject_voxels": truth.shape[0] // n_patches,
                        **{par: metrics.agreement(est[:, i], truth[:, i], sd[:, i])
                           for i, par in enumerate(PARAM_NAMES)}}

            for method, (est, sd) in results.items():
                row = {"protocol": pname, "snr": sname, "method": method, "n": truth.shape[0],
                       "subject_sse": per_subject_sum((est - truth) ** 2, n_patches)}
                for i, par in enumerate(PARAM_NAMES):
                    row[par] = metrics.agreement(est[:, i], truth[:, i])
                rows.append(row)
                if sd is not None and s_index == 0:
                    calib.append(calibration_row(method, est, sd))
                    if card_sd.get(method) is not None:
                        calib.append(calibration_row(f"{method} ({CARD_FACTORS_ONLY})", est, card_sd[method]))
    return rows, calib, floors


def qiba(models, log, models_dir=None):
    reason = missing_reason("qiba_v6")
    if reason:
        return None, reason
    series = read_dce(reference_path("qiba_v6"))
    sig = series.signal[0].astype(np.float64)                          # (80, 50, T)
    k_true = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.35])
    truth_k = np.repeat(k_true, 5)
    # NLLS reference: concentration with T10 1.0 s (tissue) and 1.44 s (blood), r1 4.5, plasma AIF
    n_base = signal_models.detect_baseline_frames(sig[70:80].reshape(-1, sig.shape[-1]))
    cb, _ = signal_models.signal_to_concentration(sig[70:80].reshape(-1, sig.shape[-1]), 1.44, 30.0, 0.005, 4.5,
                                                  baseline_frames=n_base)
    cp = aif_lib.blood_to_plasma(np.nanmean(cb, axis=0), 0.45)
    patch_curves = np.stack([sig[10 + 10 * a + 2:10 + 10 * a + 8, 10 * b + 2:10 * b + 8].reshape(-1, sig.shape[-1]).mean(0)
                             for a in range(6) for b in range(5)])
    conc, _ = signal_models.signal_to_concentration(patch_curves, 1.0, 30.0, 0.005, 4.5, baseline_frames=n_base)
    fit = TracerKineticModel(series.times_s, cp, "etofts", method="nlls", device="cpu").fit(np.nan_to_num(conc))
    nlls_k = fit.maps["Ktrans"]
    out = {"NLLS (DRO AIF)": {"ccc_truth": metrics.ccc(nlls_k, truth_k), "ccc_nlls": 1.0,
                              "rmse": metrics.rmse(nlls_k, truth_k)}}
    mask = np.zeros(series.spatial_shape, bool)
    mask[0, 10:70] = True
    for name in models:
        result = run_inference(series, name, mask=mask, device="cpu", fa_deg=30.0, tr_s=0.005, t10_s=1.0,
                               r1_per_mM_s=4.5, baseline_frames=n_base, models_dir=models_dir)
        kmap = result.maps["Ktrans"][0]
        est = np.array([np.median(kmap[10 + 10 * a + 2:10 + 10 * a + 8, 10 * b + 2:10 * b + 8])
                        for a in range(6) for b in range(5)])
        out[name] = {"ccc_truth": metrics.ccc(est, truth_k), "ccc_nlls": metrics.ccc(est, nlls_k),
                     "rmse": metrics.rmse(est, truth_k)}
        log(f"  QIBA {name}: per-patch Ktrans {np.round(est.reshape(6, 5), 3).tolist()}")
    return out, None


def speed(models, log, models_dir=None):
    protocol = Protocol(n_frames=60, frame_time_s=5.0)
    ph = make_phantom(shape=(4, 256, 256), protocol=protocol, snr=30.0, seed=3)
    brain = ph.labels > 0
    out = {}
    for name in models:
        for label, mask in (("brain mask", None), ("all voxels", np.ones_like(brain))):
            runs = []
            for _ in range(SPEED_REPEATS):
                t0 = time.perf_counter()
                run_inference(ph.series, name, mask=mask, device="cpu", t10_s=ph.truth["T10"],
                              r1_per_mM_s=protocol.r1_per_mM_s, models_dir=models_dir)
                runs.append(time.perf_counter() - t0)
            out[(name, label)] = min(runs) * 10
    t0 = time.perf_counter()
    conc, _ = signal_models.signal_to_concentration(ph.series.signal[brain], ph.truth["T10"][brain],
                                                    protocol.fa_deg, protocol.tr_s, protocol.r1_per_mM_s,
                                                    baseline_frames=protocol.baseline_frames)
    TracerKineticModel(ph.series.times_s, ph.aif_plasma_mM, "etofts", method="nlls", device="cpu").fit(
        np.nan_to_num(conc))
    out[(NLLS_TRUE, "brain mask")] = (time.perf_counter() - t0) * 10
    # the conventional per-voxel fit, on a random subset of the same brain voxels, extrapolated
    subset = np.random.default_rng(0).choice(conc.shape[0], CURVE_FIT_VOXELS, replace=False)
    rate, _ = time_curve_fit("etofts", ph.series.times_s, ph.aif_plasma_mM, np.nan_to_num(conc[subset]))
    out[(CURVE_FIT_LOOP, "brain mask")] = conc.shape[0] / rate * 10
    out["_voxels"] = (int(brain.sum()) * 10, 256 * 256 * 40)
    return out


def _fmt(x, digits=3):
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def render(rows, calib, floors, qiba_out, qiba_note, speed_out, budgets, threads, wall, n_patches):
    lines = ["## Inference", "",
             f"`OMP_NUM_THREADS={threads} python Testing/Benchmarks/bench_inference.py` on {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {threads} CPU thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"total {wall:.0f} s. Networks were trained on CPU with a small budget ({budgets}); a GPU retrain "
             "(`retrain_command` in each model card) is expected to improve the network figures below.", "",
             f"### Synthetic held-out sets ({n_patches} 32x32 textured patches per row, one subject and AIF each, seeds "
             "unseen in training; every method gets the same concentration from FA, TR, T10, r1; NLLS gets the true "
             "AIF or the Parker population AIF, the networks no AIF)", "",
             "| protocol | SNR | method | Ktrans RMSE | Ktrans bias | Ktrans CCC | ve RMSE | ve CCC | vp RMSE | vp CCC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['protocol']} | {r['snr']} | {r['method']} | {_fmt(r['Ktrans']['rmse'])} | "
                     f"{_fmt(r['Ktrans']['bias'])} | {_fmt(r['Ktrans']['ccc'])} | {_fmt(r['ve']['rmse'])} | "
                     f"{_fmt(r['ve']['ccc'])} | {_fmt(r['vp']['rmse'])} | {_fmt(r['vp']['ccc'])} |")
    lines += ["", "Low SNR (5-15), Ktrans RMSE of the best network / NLLS (target <= 0.7):", ""]
    for pname in PROTOCOLS:
        sub = [r for r in rows if r["protocol"] == pname and r["snr"] == "SNR 5-15"]
        best = min((r for r in sub if not r["method"].startswith("NLLS")), key=lambda r: r["Ktrans"]["rmse"])
        parts = []
        nlls_rows = {r["method"]: r for r in sub if r["method"] in (NLLS_TRUE, NLLS_POPULATION)}
        true_rmse = nlls_rows[NLLS_TRUE]["Ktrans"]["rmse"]
        for reference, nl in nlls_rows.items():
            ratio = best["Ktrans"]["rmse"] / nl["Ktrans"]["rmse"]
            low, high = ratio_interval(best["subject_sse"][:, 0], nl["subject_sse"][:, 0])
            parts.append(f"vs {reference} {_fmt(nl['Ktrans']['rmse'])}: ratio {ratio:.2f} "
                         f"[{low:.2f}, {high:.2f}] ({'meets' if ratio <= 0.7 else 'misses'})")
        lines.append(f"- {pname}: {best['method']} {_fmt(best['Ktrans']['rmse'])}; " + "; ".join(parts)
                     + f"; AIF-amplitude floor of any AIF-free method {_fmt(floors[(pname, 'SNR 5-15')])}, i.e. "
                     f"a ratio of {floors[(pname, 'SNR 5-15')] / true_rmse:.2f} vs NLLS (true AIF)")
    lines += ["", "[a, b]: 90 % interval over the subjects, by resampling whole subjects (one AIF each, so the "
              "subject, not the voxel, is the independent unit)."]
    lines += ["", f"(The floor is {amplitude_floor_factor():.3f} x the RMS true Ktrans of the set: with no AIF the "
              "data fix only amplitude x Ktrans, and the amplitude factor is uniform over "
              f"{simulator.SIMULATOR_RANGES['aif_amplitude_factor']}; see `amplitude_floor_factor`.)"]
    lines += ["", "### Calibration (SNR 4-150): coverage of the 90 % interval (target 0.85-0.95) and Spearman "
              "|error| vs SD (target > 0.3)", "",
              "On the two unseen protocols the SD is recalibrated to the frame times first, as `run_inference` does "
              f"for frame times outside the training ranges (`training.calibrate_to_protocol`: "
              f"{PROTOCOL_CALIBRATION['subjects']} simulated subjects, seed {PROTOCOL_CALIBRATION['seed']}, not the "
              f"benchmark's); the rows marked \"{CARD_FACTORS_ONLY}\" show the same maps with the SD the card's "
              "factors alone give. Both sets come from the same simulator, so the recalibrated rows check the "
              "recalibration, not how well the simulator stands for a real scanner.", "",
              "Coverage [a, b]: 90 % interval over resampled subjects.", "",
              "| protocol | method | Ktrans cov90 | Ktrans rho | ve cov90 | ve rho | vp cov90 | vp rho |",
              "|---|---|---|---|---|---|---|---|"]
    for c in calib:
        cells = []
        for i, p in enumerate(PARAM_NAMES):
            low, high = coverage_interval(c["subject_inside"][:, i], c["subject_voxels"])
            cells.append(f"{_fmt(c[p]['coverage90'], 2)} [{low:.2f}, {high:.2f}] | "
                         f"{_fmt(c[p]['spearman_abs_err_sd'], 2)}")
        lines.append(f"| {c['protocol']} | {c['method']} | " + " | ".join(cells) + " |")
    lines += ["", "### QIBA v6 DRO (no AIF given to the networks; FA, TR, T10, r1 given; per 10x10 patch, "
              "30 patches)", ""]
    if qiba_out is None:
        lines.append(f"skipped: {qiba_note}")
    else:
        lines += ["| method | Ktrans CCC vs truth | Ktrans CCC vs NLLS | Ktrans RMSE (1/min) |", "|---|---|---|---|"]
        for name, v in qiba_out.items():
            lines.append(f"| {name} | {_fmt(v['ccc_truth'])} | {_fmt(v['ccc_nlls'])} | {_fmt(v['rmse'], 4)} |")
        lines.append("")
        lines.append("The DRO lies partly outside the training ranges (ve = 0.01 column; 11 min, of which the "
                     "networks use the first 508 s).")
    voxels, full = speed_out.pop("_voxels")
    lines += ["", f"### Speed, 256 x 256 x 40 x 60 frames on CPU ({threads} thread(s)); measured on 4 slices, x10 "
              f"(brain mask {voxels} voxels, all {full})", "",
              f"Timings are wall clock on a CPU shared with other jobs, each network's the faster of {SPEED_REPEATS} "
              "runs; single runs here varied by up to ~1.5x. NLLS is the core's vectorised fit (`TracerKineticModel`, "
              "signal conversion included), the same that the rows above use.", "",
              "| method | voxels | seconds (extrapolated) | faster than NLLS (brain mask) | faster than the curve_fit loop |",
              "|---|---|---|---|---|"]
    nlls_seconds = speed_out.get((NLLS_TRUE, "brain mask"))
    loop_seconds = speed_out.get((CURVE_FIT_LOOP, "brain mask"))
    for (name, label), seconds in speed_out.items():
        network = name not in (NLLS_TRUE, CURVE_FIT_LOOP) and label == "brain mask"
        faster = f"{nlls_seconds / seconds:.1f}x" if network else ""
        faster_loop = f"{loop_seconds / seconds:,.0f}x" if network or name == NLLS_TRUE else ""
        lines.append(f"| {name} | {label} | {seconds:,.1f} | {faster} | {faster_loop} |")
    return "\n".join(lines) + "\n"


def write_section(text, path):
    """Replace (or append) only the '## Inference' section; other sections are left untouched."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(r"^## Inference\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 patches per set, skip speed")
    parser.add_argument("--patches", type=int, default=128, help="32x32 patches (subjects) per protocol and SNR set")
    parser.add_argument("--models-dir", type=Path, help="folder of models to benchmark (default: the shipped ones)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    cards = list_models(args.models_dir)
    models = {card["name"]: load_model(card["name"], "cpu", args.models_dir)[0] for card in cards}
    budgets = ", ".join("{} {} steps / {:.0f} s".format(c["name"], *training_totals(c)) for c in cards)
    log("synthetic sets...")
    n_patches = 2 if args.quick else args.patches
    with nlls_pool(threads) as pool:
        rows, calib, floors = synthetic(models, {card["name"]: card for card in cards}, n_patches, log, pool)
    log("QIBA v6...")
    qiba_out, qiba_note = qiba(models, log, args.models_dir)
    speed_out = {"_voxels": (0, 0)} if args.quick else (log("speed...") or speed(models, log, args.models_dir))
    text = render(rows, calib, floors, qiba_out, qiba_note, speed_out, budgets, threads, time.perf_counter() - started,
                  n_patches)
    print(text)
    if not args.no_write:
        write_section(text, ROOT / "Testing" / "Benchmarks" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
