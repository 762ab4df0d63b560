"""Image-only mode: the input function read from the image, against NLLS with realistically placed ROIs,
and reliability as the TCN paper measured it (ICC between repeated measurements).

    cd <repo> && python Testing/Benchmarks/bench_image_only.py [--subjects 24] [--no-write]

Held-out slices (``data.vessel_slices``: textured tissue, arteries and veins with partial volume in the
signal domain and inflow; the Georgiou input-function family, never trained on; 96 x 96 at SNR 10).
Per subject:
* NLLS (the core's fit, ``run_fit``) with the AIF of operator 1's ROI, of operator 2's ROI (same noise),
  and of operator 1's ROI on a second noise realisation; nominal blood T10 1.6 s, as an operator would;
  and with the automatically detected AIF (the networks' own), on both noise realisations;
* image-only networks: the input function found automatically (``--auto-aif``) and read by the reader
  network (``aif_reader``, when it is shipped) into each AIF-conditioned network, on both noise
  realisations; ``tcn_punet_aif`` also with two latent draws.
Accuracy: Ktrans median abs error over leaky tissue pixels (true Ktrans >= 0.01 /min; vessels left out)
and gross errors over all tissue pixels. Reliability: ICC(A,1) (McGraw
& Wong 1996) of the per-subject median Ktrans of the enhancing tissue (true Ktrans >= 0.05 /min).
Speed (``--no-speed`` leaves it out): image mode on a 256 x 256 x 40 x 60-frame series against the same
network given the vessel ROI, in the same run.
Writes the "Image-only mode" section of Testing/Benchmarks/RESULTS.md.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference_sets  # noqa: E402,F401  (the Lib folders on the path)
from DCEPKFittingLib.core.geometry import Geometry  # noqa: E402
from DCEPKFittingLib.io import DCESeries  # noqa: E402
from DCEPKFittingLib.pipeline.fit import FitSettings, run_fit  # noqa: E402
from DCEPKFittingLib.pipeline.input_function import InputFunctionSpec  # noqa: E402
from DCEPKInferenceLib.analysis import metrics  # noqa: E402
from DCEPKInferenceLib.data.vessel_slices import operator_roi, simulate_vessel_slice  # noqa: E402
from DCEPKInferenceLib.nn.model_store import list_models, model_mode  # noqa: E402
from DCEPKInferenceLib.nn.input_definitions import ReadFromImage  # noqa: E402
from DCEPKInferenceLib.pipeline.inference import run_inference  # noqa: E402

SEED = 960_000
NOMINAL_BLOOD_T10_S = 1.6
ENHANCING = 0.05


def log(message):
    print(message, file=sys.stderr, flush=True)


def _series(slice_):
    return DCESeries(signal=slice_.signal[None], times_s=slice_.times_s, geometry=Geometry(),
                     flip_angle_deg=slice_.fa_deg, tr_s=slice_.tr_s)


def _nlls(slice_, roi, tissue):
    """NLLS Ktrans with the AIF of ``roi`` (bool [H, W]), or with automatic detection (``roi`` None)."""
    source = dict(auto_aif="either") if roi is None else dict(aif_mask=roi[None])
    settings = FitSettings(t10_s=slice_.t10_s[None], r1_per_mM_s=slice_.r1_per_mM_s, blood_t10_s=NOMINAL_BLOOD_T10_S,
                           hct=slice_.hct, mask=tissue[None], device="cpu", **source)
    return run_fit(_series(slice_), settings).maps["Ktrans"][0]


SOURCES = {"automatic AIF": InputFunctionSpec(auto_aif="either", blood_t10_s=NOMINAL_BLOOD_T10_S, hct=0.45),
           "reader network": ReadFromImage(reader_only=True),
           "image mode (detection, else reader)": ReadFromImage(blood_t10_s=NOMINAL_BLOOD_T10_S)}


def _network(slice_, name, tissue, seed=0, source="automatic AIF"):
    """Ktrans of network ``name`` with the input function of ``source`` (``SOURCES``)."""
    torch.manual_seed(seed)
    spec = SOURCES[source]
    return run_inference(_series(slice_), name, mask=tissue[None], device="cpu", t10_s=slice_.t10_s[None],
                         r1_per_mM_s=slice_.r1_per_mM_s, input_function=spec).maps["Ktrans"][0]


def one_subject(index, size, snr, networks, with_reader):
    structure = [SEED, index]
    first = simulate_vessel_slice(np.random.default_rng(structure), size, aif_family="georgiou", snr=snr)
    second = simulate_vessel_slice(np.random.default_rng(structure), size, aif_family="georgiou", snr=snr,
                                   noise_rng=np.random.default_rng(structure + [1]))
    tissue = first.blood_fraction == 0
    truth = first.params[0]
    rois = [operator_roi(np.random.default_rng(structure + [10 + k]), first) for k in range(2)]
    out = {"truth": truth, "tissue": tissue,
           "NLLS, operator 1": _nlls(first, rois[0], tissue), "NLLS, operator 2": _nlls(first, rois[1], tissue),
           "NLLS, operator 1, second noise": _nlls(second, rois[0], tissue)}
    for key, series in (("NLLS, automatic AIF", first), ("NLLS, automatic AIF, second noise", second)):
        try:   # the fit given the same detected input function as the networks
            out[key] = _nlls(series, None, tissue)
        except Exception as error:
            log(f"  subject {index} NLLS (automatic AIF): {error}")
    for name in networks:
        for source in SOURCES:
            if source != "automatic AIF" and not with_reader:
                continue
            try:
                out[f"{name}, {source}"] = _network(first, name, tissue, source=source)
                out[f"{name}, {source}, second noise"] = _network(second, name, tissue, source=source)
                if name.startswith("tcn_punet"):
                    out[f"{name}, {source}, latent draw 2"] = _network(first, name, tissue, seed=1, source=source)
            except Exception as error:   # detection found nothing: say so, count it
                log(f"  subject {index} {name} ({source}): {error}")
    return out


def speed_lines(log_progress=log):
    """Seconds for image mode on a 256 x 256 x 40 x 60-frame series (4 phantom slices timed, x10, 2 threads),
    against the same network given the vessel ROI in the same run (the baseline)."""
    from bench_inference_extra import _timed
    from DCEPKFittingLib.sims.phantom import Protocol, make_phantom
    protocol = Protocol(n_frames=60, frame_time_s=5.0)
    phantom = make_phantom(shape=(4, 256, 256), protocol=protocol, snr=30.0, seed=3)
    brain = phantom.labels > 0
    torch.set_num_threads(2)
    sources = {"vessel ROI given (baseline)": InputFunctionSpec(aif_mask=phantom.aif_mask),
               "image mode (detection)": ReadFromImage(blood_t10_s=NOMINAL_BLOOD_T10_S),
               "reader network alone": ReadFromImage(reader_only=True)}
    seconds = {}
    for label, spec in sources.items():
        seconds[label] = 10 * _timed(lambda: run_inference(phantom.series, "hetero_encoder_aif", mask=brain,
                                                           device="cpu", t10_s=phantom.truth["T10"],
                                                           r1_per_mM_s=protocol.r1_per_mM_s, input_function=spec))
        log_progress(f"  speed {label}: {seconds[label]:.1f} s")
    torch.set_num_threads(1)
    baseline = seconds["vessel ROI given (baseline)"]
    lines = ["", "Speed of image mode: hetero_encoder_aif on a 256 x 256 x 40 x 60-frame series (4 phantom slices "
             f"timed, x10; brain mask {int(brain.sum()) * 10} voxels), 2 threads on 2 shared cores, the faster of 2 "
             "runs; target under 60 s.", "", "| input function | seconds | vs the ROI given |", "|---|---:|---:|"]
    lines += [f"| {label} | {value:.1f} | {value / baseline:.2f}x |" for label, value in seconds.items()]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--snr", type=float, default=10.0)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--no-speed", action="store_true", help="leave out the 256 x 256 x 40 x 60 speed rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    networks = [c["name"] for c in list_models() if model_mode(c) == "aif_conditioned"]
    with_reader = any(model_mode(c) == "aif_reader" for c in list_models())
    subjects = []
    for index in range(args.subjects):
        subjects.append(one_subject(index, args.size, args.snr, networks, with_reader))
        log(f"subject {index + 1}/{args.subjects}")
    text = render(subjects, args, time.perf_counter() - started)
    if with_reader and not args.no_speed:
        text += "\n".join(speed_lines()) + "\n"
    print(text)
    if not args.no_write:
        path = inference_sets.ROOT / "Testing" / "Benchmarks" / "RESULTS.md"
        old = path.read_text()
        pattern = re.compile(r"^## Image-only mode\n.*?(?=^## |\Z)", re.S | re.M)
        new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
        path.write_text(new)
    return 0


def _lesion_median(subject, key):
    region = subject["tissue"] & (subject["truth"] >= ENHANCING)
    return float(np.nanmedian(subject[key][region])) if region.any() else np.nan


def _pairs(subjects, first, second):
    rows = [(_lesion_median(s, first), _lesion_median(s, second)) for s in subjects if first in s and second in s]
    rows = np.array([r for r in rows if np.all(np.isfinite(r))])
    return (metrics.icc_a1(rows), len(rows)) if len(rows) >= 3 else (np.nan, len(rows))


def render(subjects, args, wall):
    methods = [k for k in subjects[0] if k not in ("truth", "tissue") and "second noise" not in k
               and "latent draw" not in k]
    lines = ["## Image-only mode", "",
             f"command: `python Testing/Benchmarks/bench_image_only.py --subjects {args.subjects} --size {args.size} "
             f"--snr {args.snr:g}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {wall:.0f} s on 2 shared "
             "CPU cores. Held-out slices: Georgiou input functions (never trained on), arteries and veins with "
             "partial volume (signal domain) and inflow; simulator vs simulator (the same physics made the "
             "training data), so these figures say how the methods compare, not how a real scanner's arteries look.",
             "", "| method | Ktrans median abs error (leaky tissue) | gross errors (all tissue) | subjects |",
             "|---|---:|---:|---:|"]
    for method in methods:
        errors, gross, count = [], [], 0
        for s in subjects:
            if method in s:
                count += 1
                e, t = s[method][s["tissue"]], s["truth"][s["tissue"]]
                errors.append(np.abs(e - t)[t >= 0.01])
                gross.append(metrics.is_gross_error(e, t, "Ktrans"))
        errors, gross = np.concatenate(errors), np.concatenate(gross)
        lines.append(f"| {method} | {np.nanmedian(errors):.4f} | {np.mean(gross):.3f} | {count} |")
    lines += ["", "Reliability (the TCN paper's measure): ICC(A,1) of the per-subject median Ktrans of the "
              f"enhancing tissue (true Ktrans >= {ENHANCING} /min), between two measurements of the same subjects.",
              "", "| method | repeated measurement | ICC(A,1) | subjects |", "|---|---|---:|---:|"]
    pairs = [("NLLS", "two independent ROI placements, same noise", "NLLS, operator 1", "NLLS, operator 2"),
             ("NLLS", "same ROI, two noise realisations", "NLLS, operator 1", "NLLS, operator 1, second noise"),
             ("NLLS, automatic AIF", "two noise realisations", "NLLS, automatic AIF",
              "NLLS, automatic AIF, second noise")]
    for method in methods:
        if not method.startswith("NLLS") and any(source in method for source in SOURCES):
            pairs.append((method, "two noise realisations", method, f"{method}, second noise"))
            if method.startswith("tcn_punet"):
                pairs.append((method, "two latent draws", method, f"{method}, latent draw 2"))
    for method, what, first, second in pairs:
        icc, n = _pairs(subjects, first, second)
        lines.append(f"| {method} | {what} | {icc:.3f} | {n} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
