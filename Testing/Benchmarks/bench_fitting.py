"""Fitting speed and accuracy against baselines measured in the same run, and peak memory.

    python Testing/Benchmarks/bench_fitting.py [--voxels N] [--device cpu|cuda] [--write-results]

Synthetic noisy curves (60 frames, 5 s apart, bolus AIF, Gaussian noise 0.01 mM). For each model:
voxels/s of our batched NLLS (and linear fit where there is one), against
(a) a per-voxel ``scipy.optimize.curve_fit`` loop on a subset (extrapolated to voxels/s) on the
    same forward model, and
(b) the PyPI package ``dcmri`` (serial ``Tissue.train``; its HF kinetics is the extended Tofts
    model, trained on signals it simulates itself from the same parameters), extended Tofts only,
with the median absolute error against the truth so that speed is not bought with wrong answers.
Then the peak memory of fitting a large chunked volume in a child process.
"""

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DCEPKFitting"))

from DCEPKFittingLib.kinetics import fitting, nested_models  # noqa: E402
from DCEPKFittingLib.kinetics import tk_models as tk  # noqa: E402

N_FRAMES = 60
FRAME_S = 5.0
NOISE_MM = 0.01
# uniform ranges of the true parameters (OSIPI units, order of tk_models.MODELS)
RANGES = {
    "tofts": [(0.02, 0.5), (0.1, 0.6)],
    "etofts": [(0.02, 0.5), (0.1, 0.6), (0.005, 0.1)],
    "patlak": [(0.0, 0.2), (0.005, 0.1)],
    "2cxm": [(10.0, 80.0), (0.02, 0.3), (0.1, 0.5), (0.02, 0.1)],
    "2cum": [(10.0, 80.0), (0.01, 0.2), (0.02, 0.1)],
}


def frame_times():
    return np.arange(N_FRAMES) * FRAME_S


def plasma_aif(t):
    """Bolus-like plasma concentration (mM), arrival at 20 s."""
    s = np.clip(t - 20.0, 0, None) / 60.0
    return 5 * s * np.exp(-s / 0.1) / 0.1 * np.exp(-1) * 0.5 + 0.8 * (1 - np.exp(-s / 0.3)) * np.exp(-s / 4)


def synthetic(model, n, seed=0):
    rng = np.random.default_rng(seed)
    low, high = np.array(RANGES[model]).T
    truth = rng.uniform(low, high, (n, len(low)))
    t = frame_times()
    cp = plasma_aif(t)
    curves = tk.concentration(model, truth, t, cp) + rng.normal(0, NOISE_MM, (n, t.size))
    return t, cp, truth, curves


def median_errors(estimate, truth):
    """Median absolute error per parameter, over the voxels where it is defined (the model choice
    leaves ve NaN where it finds no backflux or no leakage)."""
    return np.nanmedian(np.abs(estimate - truth), axis=0)


def time_ours(model, method, t, cp, curves, device, model_selection=True):
    """Voxels per second (wall clock), the parameters, and the CPU seconds used (all threads): on a
    shared machine the CPU time compares two fits more fairly than the wall clock."""
    fitting.fit_curves(curves[:200], t, cp, model, method=method, device=device)  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fitting.fit_curves(curves, t, cp, model, method=method, device=device, model_selection=model_selection)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return curves.shape[0] / elapsed, result.parameter_array(), time.process_time() - cpu_start


def time_curve_fit(model, t, cp, curves):
    from scipy.optimize import curve_fit
    spec = tk.MODELS[model]

    def f(_, *p):
        return tk.concentration(model, np.array(p), t, cp)

    estimates = []
    start = time.perf_counter()
    for y in curves:
        try:
            p, _ = curve_fit(f, t, y, p0=spec.initial, bounds=(spec.lower, spec.upper), maxfev=2000)
        except RuntimeError:
            p = np.full(spec.n_params, np.nan)
        estimates.append(p)
    elapsed = time.perf_counter() - start
    return curves.shape[0] / elapsed, np.array(estimates)


def time_dcmri(truth, t, cp, seed=0):
    """dcmri serial Tissue.train, kinetics 'HF' (= extended Tofts: Ktrans = PS, ve = vi, vp = vb (1 - H))."""
    import dcmri
    hct = 0.45
    blood_molar = cp * (1 - hct) / 1000.0  # dcmri takes the blood concentration in M
    rng = np.random.default_rng(seed)
    estimates = []
    signals = []
    for ktrans, ve, vp in truth:
        tissue = dcmri.Tissue(kinetics="HF", water_exchange="FF", sequence="SS", ca=blood_molar, t=t,
                              vb=vp / (1 - hct), vi=ve, PS=ktrans / 60.0)
        signal = tissue.predict(t)
        # noise of the same relative size as the concentration benchmark's, on the signal
        signals.append(signal + rng.normal(0, 0.005 * signal.max(), signal.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        for signal in signals:
            tissue = dcmri.Tissue(kinetics="HF", water_exchange="FF", sequence="SS", ca=blood_molar, t=t)
            tissue.train(t, signal)
            estimates.append([tissue.PS * 60.0, tissue.vi, tissue.vb * (1 - hct)])
        elapsed = time.perf_counter() - start
    return len(signals) / elapsed, np.array(estimates)


MEMORY_CHILD = """
import resource, sys, time, numpy as np
sys.path.insert(0, {lib!r})
from DCEPKFittingLib.kinetics import fitting, tk_models as tk
sys.path.insert(0, {bench!r})
import bench_fitting as b
shape = {shape!r}
t = np.arange({frames}) * 3.0
cp = b.plasma_aif(t)
rng = np.random.default_rng(0)
low, high = np.array(b.RANGES['etofts']).T
base = (tk.concentration('etofts', rng.uniform(low, high, (4096, 3)), t, cp)
        + rng.normal(0, b.NOISE_MM, (4096, t.size))).astype(np.float32)
n = int(np.prod(shape))
volume = np.empty((n, t.size), dtype=np.float32)
for start in range(0, n, 4096):
    volume[start:start + 4096] = base[: min(4096, n - start)]
volume = volume.reshape(tuple(shape) + (t.size,))
def status_kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
before = status_kb('VmRSS:')
try:  # reset the kernel's peak-RSS mark so that VmHWM is the fit's own peak
    open('/proc/self/clear_refs', 'w').write('5')
except OSError:
    pass
start = time.perf_counter()
result = fitting.fit_volume(volume, t, cp, 'etofts', device={device!r}, chunk_voxels={chunk})
elapsed = time.perf_counter() - start
after = status_kb('VmHWM:')
print(before, after, volume.nbytes, elapsed, int((result.status == 1).sum() + (result.status == 2).sum()))
"""


def measure_memory(shape, frames, device, chunk):
    code = f"import torch; torch.set_num_threads({torch.get_num_threads()})\n" + MEMORY_CHILD.format(
        lib=str(ROOT / "DCEPKFitting"), bench=str(Path(__file__).parent), shape=shape,
                               frames=frames, device=device, chunk=chunk)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before_kb, after_kb, input_bytes, elapsed, fitted = out.stdout.split()
    return dict(peak_mb=int(after_kb) / 1024, before_mb=int(before_kb) / 1024, input_mb=int(input_bytes) / 2 ** 20,
                seconds=float(elapsed), fitted=int(fitted))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxels", type=int, default=100000, help="voxels per model for our fits (two-compartment "
                        "models use a fiftieth)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--curve-fit-voxels", type=int, default=200)
    parser.add_argument("--dcmri-voxels", type=int, default=20)
    parser.add_argument("--models", default="tofts,etofts,patlak,2cxm,2cum")
    parser.add_argument("--memory-shape", default="60,256,256", help="k,j,i of the volume for the memory test "
                        "(100 frames); 'none' to skip")
    parser.add_argument("--chunk-voxels", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--write-results", action="store_true", help="replace the 'Fitting' section of "
                        "Testing/Benchmarks/RESULTS.md with this run's table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    emit, lines = report_lines()
    emit(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
         f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
         f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    emit(f"command: python Testing/Benchmarks/bench_fitting.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    emit(f"data: {N_FRAMES} frames, {FRAME_S:g} s apart, noise SD {NOISE_MM} mM; float64")
    emit("targets (extended Tofts NLLS, 2 cores, 60 frames): >= 50,000 voxels/s and >= 500x the curve_fit loop. "
         "Timings on a shared machine vary by 2x or more from run to run.")
    emit()
    emit("| model | method | voxels | voxels/s | vs curve_fit | vs dcmri | median abs error (per parameter) |")
    emit("|---|---|---:|---:|---:|---:|---|")
    for model in args.models.split(","):
        n = args.voxels if model in ("tofts", "etofts", "patlak") else max(args.voxels // 50, 500)
        t, cp, truth, curves = synthetic(model, n)
        names = ", ".join(tk.MODELS[model].parameters)
        cf_n = args.curve_fit_voxels if model in ("tofts", "etofts", "patlak") else max(args.curve_fit_voxels // 4, 20)
        cf_rate, cf_est = time_curve_fit(model, t, cp, curves[:cf_n])
        dc_rate = None
        if model == "etofts" and args.dcmri_voxels > 0:
            dc_rate, dc_est = time_dcmri(truth[: args.dcmri_voxels], t, cp)
        # nested models: the fit with the per-voxel model choice (the default) and without it, so
        # that the choice's cost shows; errors over the voxels where the parameter is defined
        runs = [("nlls", True), ("nlls", False), ("linear", True)] if model in nested_models.NESTED_MODELS \
            else [("nlls", True)]
        ours_on_subset = None
        for method, choice in runs:
            rate, est, cpu_s = time_ours(model, method, t, cp, curves, args.device, model_selection=choice)
            if method == "nlls" and choice:
                ours_on_subset = median_errors(est[:cf_n], truth[:cf_n])
                choice_cpu_s = cpu_s
            ratio_dc = f"{rate / dc_rate:,.0f}x" if dc_rate else "-"
            label = f"ours {method}" + ("" if choice or model not in nested_models.NESTED_MODELS else
                                        f", no model choice (the choice's cost: {choice_cpu_s / cpu_s - 1:+.0%} "
                                        "CPU time)")
            emit(f"| {model} | {label} | {n} | {rate:,.0f} | {rate / cf_rate:,.0f}x | {ratio_dc} | "
                 f"{names}: {np.array2string(median_errors(est, truth), precision=4)} |")
        emit(f"| {model} | scipy curve_fit loop | {cf_n} | {cf_rate:,.1f} | 1x | - | "
             f"{names}: {np.array2string(median_errors(cf_est, truth[:cf_n]), precision=4)} "
             f"(ours nlls on the same voxels: {np.array2string(ours_on_subset, precision=4)}) |")
        if dc_rate:
            emit(f"| {model} | dcmri Tissue.train (HF, serial) | {args.dcmri_voxels} | {dc_rate:,.1f} | - | 1x | "
                 f"{names}: {np.array2string(median_errors(dc_est, truth[: args.dcmri_voxels]), precision=4)} "
                 "(trained on signals it simulates from the same parameters; noise model differs, so errors "
                 "are not comparable with the rows above) |")
    if args.memory_shape != "none":
        shape = [int(v) for v in args.memory_shape.split(",")]
        mem = measure_memory(shape, 100, args.device, args.chunk_voxels)
        emit()
        emit(f"memory: extended Tofts NLLS of a {'x'.join(map(str, shape))} x 100-frame float32 volume "
             f"({mem['input_mb']:,.0f} MB input), chunks of {args.chunk_voxels} voxels: peak RSS during the fit "
             f"{mem['peak_mb']:,.0f} MB (before it, with the input loaded: {mem['before_mb']:,.0f} MB; the fit "
             f"added {mem['peak_mb'] - mem['before_mb']:,.0f} MB); {mem['seconds']:.1f} s, "
             f"{mem['fitted'] / mem['seconds']:,.0f} voxels/s, {mem['fitted']} voxels fitted")
    if args.write_results:
        write_results(lines)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


def report_lines():
    """``emit(text)`` prints a line and keeps it; the kept ``lines`` go to RESULTS.md."""
    lines = []

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    return emit, lines


def write_results(lines, title="Fitting"):
    """Replace the '## <title>' section of RESULTS.md with ``lines`` (appended if there is none)."""
    path = Path(__file__).parent / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n" + "\n".join(lines) + "\n"
    start = text.find(f"## {title}\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    temporary = path.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(path)


if __name__ == "__main__":
    main()
