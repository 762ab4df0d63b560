"""Fitting speed and accuracy against baselines measured in the same run, thread scaling, and peak memory.

    python Testing/Benchmarks/bench_fitting.py [--voxels N] [--repeats N] [--device cpu|cuda] [--write-results]

Synthetic noisy curves (60 frames, 5 s apart, bolus AIF, Gaussian noise 0.01 mM). For each model:
voxels/s of our batched fit (``TracerKineticModel``: NLLS, and the linear fit where there is one), against
(a) ``scipy.optimize.curve_fit``, one voxel at a time, on a lean single-voxel model written here for it
    (the exact convolution of the piecewise-linear AIF in plain numpy, checked against the project's model
    at start-up), on the first voxels of the same curves (same truth, noise and AIF), and
(b) the PyPI package ``dcmri`` (serial ``Tissue.train``; its HF kinetics is the extended Tofts model),
    extended Tofts only, on signals it simulates itself from the same first parameter sets (when installed:
    ``pip install dcmri==0.6.20``),
with the median absolute error against the truth so that speed is not bought with wrong answers. Every
method is timed alike: one warm-up run on its own data, then the best of ``--repeats`` runs. Then our
extended Tofts NLLS on 1 and on 2 threads (the job runner's scaling), and the peak memory of fitting a
large volume in a child process.
"""

import argparse
import datetime
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DCEPKFitting"))

from DCEPKFittingLib.core.runner import thread_count  # noqa: E402
from DCEPKFittingLib.kinetics import nested_models  # noqa: E402
from DCEPKFittingLib.kinetics import tk_models as tk  # noqa: E402
from DCEPKFittingLib.kinetics.model import TracerKineticModel  # noqa: E402

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


def best_of(run, repeats):
    """(best wall-clock seconds, last result): one warm-up run, then the best of ``repeats`` runs. Every
    timed method goes through here, so each gets the same warm-up and the same number of tries."""
    run()
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


# ------------------------------------------------------------------ the curve_fit baseline's own models
def lean_exp_convolution(t, cp, rate_per_s):
    """int cp(u) exp(-k (t - u)) du of one voxel at the frame times, for cp linear between its samples:
    each segment's integral in closed form, decayed to every later frame (a (T, T) matrix product)."""
    dt = np.diff(t)
    x = rate_per_s * dt
    if x.min() < 1e-3:   # k -> 0: the closed forms cancel; their Taylor series
        whole = dt * (1 - x / 2 + x * x / 6)
        ramp = dt * dt * (0.5 - x / 3 + x * x / 8)
    else:
        whole = -np.expm1(-x) / rate_per_s                          # int_0^dt e^{-ks} ds
        ramp = (1 - np.exp(-x) * (1 + x)) / rate_per_s ** 2         # int_0^dt s e^{-ks} ds
    segment = cp[1:] * whole - (cp[1:] - cp[:-1]) / dt * ramp       # ends at t[m + 1]
    lag = t[1:, None] - t[None, 1:]
    decay = np.where(lag >= 0, np.exp(-rate_per_s * np.maximum(lag, 0.0)), 0.0)
    return np.concatenate([[0.0], decay @ segment])


def lean_concentration(model, t, cp, p):
    """One voxel's tissue concentration (mM) for parameters ``p`` in OSIPI units, in plain numpy."""
    if model in ("tofts", "etofts"):
        ktrans, ve = p[0] / 60.0, p[1]
        vp = p[2] if model == "etofts" else 0.0
        return ktrans * lean_exp_convolution(t, cp, ktrans / ve) + vp * cp
    if model == "patlak":
        integral = np.concatenate([[0.0], np.cumsum(0.5 * (cp[1:] + cp[:-1]) * np.diff(t))])
        return p[0] / 60.0 * integral + p[1] * cp
    flow, ps = p[0] / 6000.0, p[1] / 60.0     # ml/100ml/min and 1/min -> 1/s
    vp = p[-1]
    if model == "2cum":   # F E int cp + F (1 - E) cp * exp(-t / Tp), E = PS / (F + PS), Tp = vp / (F + PS)
        uptake = flow * ps / (flow + ps)
        return uptake * lean_exp_convolution(t, cp, 0.0) + (flow - uptake) * lean_exp_convolution(
            t, cp, (flow + ps) / vp)
    ve = p[2]             # 2CXM: impulse response F [a e^{-K+ t} + (1 - a) e^{-K- t}]
    plasma_rate, exchange_rate, washout_rate = (flow + ps) / vp, ps / ve, flow / vp
    total = plasma_rate + exchange_rate
    root = math.sqrt(max(total * total - 4 * exchange_rate * washout_rate, 1e-30))
    fast, slow = (total + root) / 2, (total - root) / 2
    fraction = (washout_rate - slow) / root
    return flow * (fraction * lean_exp_convolution(t, cp, fast) + (1 - fraction) * lean_exp_convolution(t, cp, slow))


def check_lean_models():
    """The baseline must fit the same model as ours: the lean curves equal the project's to 1e-9."""
    t, cp = frame_times(), plasma_aif(frame_times())
    for model in RANGES:
        _, _, truth, _ = synthetic(model, 20, seed=1)
        ours = tk.concentration(model, truth, t, cp)
        lean = np.array([lean_concentration(model, t, cp, p) for p in truth])
        error = np.max(np.abs(lean - ours)) / np.max(np.abs(ours))
        if error > 1e-9:
            raise AssertionError(f"the lean {model} model differs from the project's by {error:.2g}")


def time_curve_fit(model, t, cp, curves, repeats=1):
    """(voxels/s, estimates): scipy's curve_fit, one voxel after another, on the lean model."""
    from scipy.optimize import curve_fit
    spec = tk.MODELS[model]

    def f(_, *p):
        return lean_concentration(model, t, cp, p)

    def run():
        estimates = []
        for y in curves:
            try:
                p, _ = curve_fit(f, t, y, p0=spec.initial, bounds=(spec.lower, spec.upper), maxfev=2000)
            except RuntimeError:
                p = np.full(spec.n_params, np.nan)
            estimates.append(p)
        return np.array(estimates)

    seconds, estimates = best_of(run, repeats)
    return curves.shape[0] / seconds, estimates


def time_ours(model, t, cp, curves, repeats, **options):
    """(voxels/s, parameters (N, P)) of our fit of every curve."""
    fitter = TracerKineticModel(t, cp, model, **options)
    seconds, result = best_of(lambda: fitter.fit(curves), repeats)
    return curves.shape[0] / seconds, result.parameter_array()


def time_dcmri(truth, t, cp, repeats, seed=0):
    """dcmri serial Tissue.train, kinetics 'HF' (= extended Tofts: Ktrans = PS, ve = vi, vp = vb (1 - H))."""
    import dcmri
    hct = 0.45
    blood_molar = cp * (1 - hct) / 1000.0  # dcmri takes the blood concentration in M
    rng = np.random.default_rng(seed)
    signals = []
    for ktrans, ve, vp in truth:
        tissue = dcmri.Tissue(kinetics="HF", water_exchange="FF", sequence="SS", ca=blood_molar, t=t,
                              vb=vp / (1 - hct), vi=ve, PS=ktrans / 60.0)
        signal = tissue.predict(t)
        # noise of the same relative size as the concentration benchmark's, on the signal
        signals.append(signal + rng.normal(0, 0.005 * signal.max(), signal.shape))

    def run():
        estimates = []
        for signal in signals:
            tissue = dcmri.Tissue(kinetics="HF", water_exchange="FF", sequence="SS", ca=blood_molar, t=t)
            tissue.train(t, signal)
            estimates.append([tissue.PS * 60.0, tissue.vi, tissue.vb * (1 - hct)])
        return np.array(estimates)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds, estimates = best_of(run, repeats)
    return len(signals) / seconds, estimates


MEMORY_CHILD = """
import resource, sys, time, numpy as np
sys.path.insert(0, {lib!r})
from DCEPKFittingLib.kinetics import tk_models as tk
from DCEPKFittingLib.kinetics.model import TracerKineticModel
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
result = TracerKineticModel(t, cp, 'etofts', device={device!r}).fit(volume)
elapsed = time.perf_counter() - start
after = status_kb('VmHWM:')
print(before, after, volume.nbytes, elapsed, int((result.status == 1).sum() + (result.status == 2).sum()))
"""


def measure_memory(shape, frames, device):
    code = MEMORY_CHILD.format(lib=str(ROOT / "DCEPKFitting"), bench=str(Path(__file__).parent), shape=shape,
                               frames=frames, device=device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before_kb, after_kb, input_bytes, elapsed, fitted = out.stdout.split()
    return dict(peak_mb=int(after_kb) / 1024, before_mb=int(before_kb) / 1024, input_mb=int(input_bytes) / 2 ** 20,
                seconds=float(elapsed), fitted=int(fitted))


def model_rows(emit, model, args):
    """The table's rows of one model: our fits, the curve_fit loop, dcmri (extended Tofts)."""
    n = args.voxels if model in ("tofts", "etofts", "patlak") else max(args.voxels // 50, 500)
    t, cp, truth, curves = synthetic(model, n)
    names = ", ".join(tk.MODELS[model].parameters)
    cf_n = args.curve_fit_voxels if model in ("tofts", "etofts", "patlak") else max(args.curve_fit_voxels // 4, 20)
    cf_rate, cf_est = time_curve_fit(model, t, cp, curves[:cf_n], args.repeats)
    dc_rate = None
    if model == "etofts" and args.dcmri_voxels > 0:
        try:
            dc_rate, dc_est = time_dcmri(truth[: args.dcmri_voxels], t, cp, args.repeats)
        except ImportError:
            emit(f"(dcmri is not installed: its row is left out; pip install dcmri==0.6.20)")
    # nested models: the fit with the per-voxel model choice (the default) and without it, so that
    # the choice's cost shows; errors over the voxels where the parameter is defined
    runs = [("nlls", True), ("nlls", False), ("linear", True)] if model in nested_models.NESTED_MODELS \
        else [("nlls", True)]
    ours_on_subset = None
    for method, choice in runs:
        rate, est = time_ours(model, t, cp, curves, args.repeats, method=method, model_selection=choice,
                              device=args.device)
        if method == "nlls" and choice:
            ours_on_subset, choice_rate = median_errors(est[:cf_n], truth[:cf_n]), rate
        ratio_dc = f"{rate / dc_rate:,.0f}x" if dc_rate else "-"
        label = f"ours {method}" + ("" if choice or model not in nested_models.NESTED_MODELS else
                                    f", no model choice (the choice's cost: {rate / choice_rate - 1:+.0%} time)")
        emit(f"| {model} | {label} | {n} | {rate:,.0f} | {rate / cf_rate:,.0f}x | {ratio_dc} | "
             f"{names}: {np.array2string(median_errors(est, truth), precision=4)} |")
    emit(f"| {model} | scipy curve_fit loop (lean single-voxel model) | first {cf_n} | {cf_rate:,.1f} | 1x | - | "
         f"{names}: {np.array2string(median_errors(cf_est, truth[:cf_n]), precision=4)} "
         f"(ours nlls on the same voxels: {np.array2string(ours_on_subset, precision=4)}) |")
    if dc_rate:
        emit(f"| {model} | dcmri Tissue.train (HF, serial) | first {args.dcmri_voxels} parameter sets | "
             f"{dc_rate:,.1f} | - | 1x | "
             f"{names}: {np.array2string(median_errors(dc_est, truth[: args.dcmri_voxels]), precision=4)} "
             "(trained on signals it simulates from the same parameters; noise model differs, so errors "
             "are not comparable with the rows above) |")


def _numpy_workload(_=None, rounds=4000):
    """A fixed single-threaded numpy workload (element-wise passes over 20,000 values, as the fit's)."""
    values = np.linspace(0.0, 1.0, 20_000)
    out = np.empty_like(values)
    for _ in range(rounds):
        np.multiply(values, 1.0001, out=out)
        np.add(out, values, out=out)


def machine_parallelism(repeats):
    """How much faster two independent processes do two workloads than one does one: what this (shared)
    machine gave two workers at the time, the ceiling of the threads' ratio."""
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(2) as pool:
        one, _ = best_of(lambda: pool.map(_numpy_workload, [None]), repeats)
        two, _ = best_of(lambda: pool.map(_numpy_workload, [None, None]), repeats)
    return 2 * one / two


def thread_scaling(emit, args):
    """Our extended Tofts NLLS of the same curves on 1 thread and on 2 (the job runner's scaling), beside
    the machine's own 2 / 1 for independent processes measured in the same run."""
    t, cp, _, curves = synthetic("etofts", args.voxels)
    rates = {}
    for threads in (1, 2):
        rates[threads], _ = time_ours("etofts", t, cp, curves, args.repeats, threads=threads, device=args.device)
    emit(f"threads: extended Tofts NLLS with the model choice, the same {args.voxels} curves: 1 thread "
         f"{rates[1]:,.0f} voxels/s, 2 threads {rates[2]:,.0f} voxels/s: 2 / 1 = {rates[2] / rates[1]:.2f}x "
         f"(two independent processes on this machine at the time: {machine_parallelism(args.repeats):.2f}x)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxels", type=int, default=100000, help="voxels per model for our fits (two-compartment "
                        "models use a fiftieth)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of every method after one warm-up run; "
                        "the best counts")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--curve-fit-voxels", type=int, default=200)
    parser.add_argument("--dcmri-voxels", type=int, default=20)
    parser.add_argument("--models", default="tofts,etofts,patlak,2cxm,2cum")
    parser.add_argument("--memory-shape", default="60,256,256", help="k,j,i of the volume for the memory test "
                        "(100 frames); 'none' to skip")
    parser.add_argument("--write-results", action="store_true", help="replace the 'Fitting' section of "
                        "Testing/Benchmarks/RESULTS.md with this run's table")
    args = parser.parse_args(argv)
    check_lean_models()

    emit, lines = report_lines()
    emit(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
         f"{os.cpu_count()} CPU cores, shared with other engineers' jobs while it ran (load average "
         f"{os.getloadavg()[0]:.1f} at the start; timings vary run to run: compare the ratios, all measured in this "
         f"run); numpy {np.__version__}, our fit on {thread_count()} threads, device {args.device}")
    emit(f"command: python Testing/Benchmarks/bench_fitting.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    emit(f"data: {N_FRAMES} frames, {FRAME_S:g} s apart, noise SD {NOISE_MM} mM, the same curves for every method "
         f"(curve_fit: the first of them); float64. Timing: one warm-up run, then the best of {args.repeats}.")
    emit("targets (extended Tofts NLLS, 2 cores, 60 frames): >= 50,000 voxels/s and >= 500x the curve_fit loop.")
    emit()
    emit("| model | method | voxels | voxels/s | vs curve_fit (same curves: its first N) | vs dcmri | "
         "median abs error (per parameter) |")
    emit("|---|---|---:|---:|---:|---:|---|")
    for model in args.models.split(","):
        model_rows(emit, model, args)
    emit()
    thread_scaling(emit, args)
    if args.memory_shape != "none":
        shape = [int(v) for v in args.memory_shape.split(",")]
        mem = measure_memory(shape, 100, args.device)
        emit()
        emit(f"memory: extended Tofts NLLS of a {'x'.join(map(str, shape))} x 100-frame float32 volume "
             f"({mem['input_mb']:,.0f} MB input), chunks from the job runner's working-set budget: peak RSS during "
             f"the fit {mem['peak_mb']:,.0f} MB (before it, with the input loaded: {mem['before_mb']:,.0f} MB; the fit "
             f"added {mem['peak_mb'] - mem['before_mb']:,.0f} MB); {mem['seconds']:.1f} s, "
             f"{mem['fitted'] / mem['seconds']:,.0f} voxels/s, {mem['fitted']} voxels fitted")
    emit(f"load average at the end: {os.getloadavg()[0]:.1f}")
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
