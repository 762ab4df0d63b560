"""Benchmark of the AIF-conditioned networks against the core's NLLS fit given the same input function.

    cd <repo> && python Testing/Benchmarks/bench_inference.py [--patches 48] [--quick] [--no-write]

1. Model choice on a validation set (training input-function and protocol families, SNR 10, seed
   900031, never a test set): the best network is the one with the lowest Ktrans median absolute
   error whose coverage is 0.85-0.95 and whose gross-error fraction is no more than NLLS's.
2. Held-out test sets (``inference_sets``): the Georgiou input-function family (never trained on)
   with the training protocols; the training families with the two-rate protocol family (never
   trained on); both held out; each at baseline SNR 5, 10, 20, 30. Plus the issue's independent
   family (gamma variate + recirculation + bi-exponential washout, 48 x 7.2 s) and stress rows (the
   baseline misplaced by up to 2 frames; tissue 0-6 s behind the input function given).
   Ktrans, ve, vp, kep: median absolute error, gross errors, bias, RMSE, 90 % coverage; the ratio
   network / NLLS with a 90 % interval over resampled subjects (patches).
3. The issue's targets, checked on the held-out sets with the best network.
4. QIBA v6 DRO (noise-free, 11 min at 0.5 s) with the DRO's own input function (vascular rows, blood
   T10 1.44 s): per-patch Ktrans, ve, kep CCC of NLLS and every network, and the AIF-free network.
5. Speed: a 256 x 256 x 40 x 60-frame series (4 slices timed, x10), brain mask and all voxels, 1 and
   2 threads, beside NLLS on the same machine in the same run; the device is printed.
Rewrites the "Inference" section of Testing/Benchmarks/RESULTS.md (``--no-write``: print only).
"""

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference_sets as sets  # noqa: E402
from inference_sets import NLLS, PARAMETERS  # noqa: E402

from DCEPKInferenceLib.nn.model_store import list_models, load_model, model_mode, training_totals  # noqa: E402

ROOT = sets.ROOT
SNRS = (5.0, 10.0, 20.0, 30.0)
HELD_OUT = {"Georgiou AIF x training protocols": {"aif_family": "georgiou"},
            "training AIFs x two-rate protocols": {"protocol_family": "two_rate"},
            "Georgiou AIF x two-rate protocols": {"aif_family": "georgiou", "protocol_family": "two_rate"}}
EXTRA = {"reporter family, 48 x 7.2 s": ({"aif_family": "reporter", "times_s": sets.REPORTER_TIMES}, (10.0, 30.0)),
         "stress: baseline misplaced by up to 2 frames (Georgiou)": ({"aif_family": "georgiou", "jitter": True},
                                                                    (10.0,)),
         "stress: tissue 0-6 s behind the AIF given (Georgiou)": ({"aif_family": "georgiou", "delay": (0.0, 6.0)},
                                                                 (10.0,))}
VALIDATION_INDEX = 900_031   # a validation set: training families; its own seed (not 95xxxx)


def log(message):
    print(message, file=sys.stderr, flush=True)


def conditioned_models(models_dir):
    cards = [c for c in list_models(models_dir) if model_mode(c) == "aif_conditioned"]
    return {c["name"]: load_model(c["name"], "cpu", models_dir)[0] for c in cards}, cards


def validation_choice(models, n_patches):
    test = sets.simulate_set("validation (training families)", VALIDATION_INDEX, n_patches, 10.0)
    results = sets.run_methods(test, models, log)
    return sets.choose_best(results), results


def held_out(models, n_patches, snrs):
    rows = []
    index = 0
    for name, kwargs in HELD_OUT.items():
        for snr in snrs:
            index += 1
            test = sets.simulate_set(name, index, n_patches, snr, **kwargs)
            rows.append((test, sets.run_methods(test, models, log)))
    for name, (kwargs, extra_snrs) in EXTRA.items():
        for snr in extra_snrs:
            index += 1
            test = sets.simulate_set(name, index, n_patches, snr, **kwargs)
            rows.append((test, sets.run_methods(test, models, log)))
    return rows


def _f(x, digits=4):
    return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def parameter_table(rows, parameter, snrs=None):
    lines = [f"| set | SNR | method | median abs error | gross | bias | RMSE | cov90 | undefined |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for test, results in rows:
        if snrs and test.snr not in snrs:
            continue
        for method, r in results.items():
            m = r[parameter]
            lines.append(f"| {test.name} | {test.snr:g} | {method} | {_f(m['median_abs_error'])} | "
                         f"{_f(m['gross_error_fraction'], 3)} | {_f(m['bias'])} | {_f(m['rmse'])} | "
                         f"{_f(m['coverage90'], 3)} | {_f(m['undefined'], 3)} |")
    return lines


def target_lines(rows, best):
    """The issue's AIF-conditioned targets on the held-out families, with the best network."""
    out = []
    for test, results in rows:
        if test.name not in HELD_OUT or test.snr not in (10.0, 30.0) or best not in results:
            continue
        net, ref = results[best]["Ktrans"], results[NLLS]["Ktrans"]
        ratio = net["median_abs_error"] / ref["median_abs_error"]
        low, high = sets.ratio_interval(net, ref, test.n_patches)
        c_low, c_high = sets.coverage_interval(net, test.n_patches)
        if test.snr == 10.0:
            met = ratio <= 1.0 and net["gross_error_fraction"] <= ref["gross_error_fraction"] \
                and 0.85 <= net["coverage90"] <= 0.95
            goal = "ratio <= 1, gross <= NLLS, cov90 0.85-0.95"
        else:
            met, goal = ratio <= 1.5, "ratio <= 1.5"
        out.append(f"- {test.name}, SNR {test.snr:g}: {best} Ktrans median abs error {net['median_abs_error']:.4f} vs "
                   f"NLLS {ref['median_abs_error']:.4f}, ratio {ratio:.2f} [{low:.2f}, {high:.2f}]; gross "
                   f"{net['gross_error_fraction']:.3f} vs {ref['gross_error_fraction']:.3f}; cov90 "
                   f"{net['coverage90']:.3f} [{c_low:.3f}, {c_high:.3f}] (target {goal}: "
                   f"{'met' if met else 'NOT met'})")
    return out


def render(validation, best, rows, qiba_lines, speed_lines, header):
    lines = ["## Inference", "", *header, "",
             "### Model choice on the validation set (training families, SNR 10; never a test set)", "",
             "| method | Ktrans median abs error | gross | cov90 |", "|---|---:|---:|---:|"]
    for method, r in validation.items():
        k = r["Ktrans"]
        lines.append(f"| {method} | {_f(k['median_abs_error'])} | {_f(k['gross_error_fraction'], 3)} | "
                     f"{_f(k['coverage90'], 3)} |")
    lines += ["", f"Best network (lowest median abs error with coverage 0.85-0.95 and gross errors <= NLLS): "
              f"**{best}**", "", "### The issue's targets (held-out families, best network)", ""]
    lines += target_lines(rows, best)
    lines += ["", "[a, b]: 90 % interval over resampled subjects (patches: one input function each)."]
    for parameter in PARAMETERS:
        snrs = None if parameter == "Ktrans" else (10.0, 30.0)
        lines += ["", f"### {parameter}" + ("" if snrs is None else " (SNR 10 and 30)"), ""]
        lines += parameter_table(rows, parameter, snrs)
    lines += ["", "Gross error: |error| > max(floor, half the truth), floors Ktrans 0.05 /min, ve 0.05, vp 0.025, "
              "kep 0.5 /min. ve and kep are scored on voxels with true Ktrans >= 0.01 /min; 'undefined' is the "
              "share of those where the method gave no value (NLLS's model choice: no leakage), counted as gross "
              "errors and left out of the median, bias and RMSE. NLLS coverage: +-1.645 standard errors of the fit."]
    return "\n".join(lines + ["", *qiba_lines, "", *speed_lines]) + "\n"


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
    parser.add_argument("--patches", type=int, default=48, help="32x32 patches (subjects) per set")
    parser.add_argument("--quick", action="store_true", help="4 patches per set, SNR 10 only, no speed")
    parser.add_argument("--models-dir", type=Path, help="models to benchmark (default: the shipped ones)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    from bench_inference_extra import qiba_section, speed_section   # noqa: E402  (same folder)
    started = time.perf_counter()
    torch.set_num_threads(1)
    models, cards = conditioned_models(args.models_dir)
    n_patches = 4 if args.quick else args.patches
    log("validation...")
    best, validation = validation_choice(models, n_patches)
    log(f"best on validation: {best}")
    rows = held_out(models, n_patches, (10.0,) if args.quick else SNRS)
    qiba_lines = qiba_section(models, args.models_dir, log)
    speed_lines = [] if args.quick else speed_section(list(models), args.models_dir, log)
    budgets = ", ".join("{} {} steps / {:.0f} s on {}".format(c["name"], *training_totals(c), c["training"]["device"])
                        for c in cards)
    header = [f"command: `python Testing/Benchmarks/bench_inference.py --patches {n_patches}`; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, 2 CPU cores shared with "
              f"other jobs (timings are ratios within this run), torch {torch.__version__}, device cpu; total "
              f"{time.perf_counter() - started:.0f} s.",
              f"Networks (AIF-conditioned, trained on CPU: {budgets}); each test set: {n_patches} textured 32x32 "
              "patches, one subject (input function, protocol, baseline SNR) each; NLLS and the networks get the "
              "same concentration and the same frame-sampled input function (the tissue was simulated on a 0.25 s "
              "grid from the continuous one). Test seeds 95xxxx are used by nothing else."]
    text = render(validation, best, rows, qiba_lines, speed_lines, header)
    print(text)
    if not args.no_write:
        write_section(text, ROOT / "Testing" / "Benchmarks" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
