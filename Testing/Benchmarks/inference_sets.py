"""Test sets and methods of the inference benchmark (``bench_inference.py``).

A set is ``n`` textured 32x32 patches, one subject each (input-function family, protocol, SNR), from
``data.aif_conditioned.simulate_patch``; each patch's pixels are encoded once
(``training.encoded_patches.encode_patch``) and every method gets the same concentration and the same
frame-sampled input function: NLLS (the core's extended-Tofts fit with its default model choice,
``TracerKineticModel``) and every AIF-conditioned network. Seeds 95xxxx are used by nothing else.

Metrics per parameter (``evaluate``): median absolute error, gross-error fraction
(|error| > max(floor, half the truth): floors Ktrans 0.05 /min, ve 0.05, vp 0.025, kep 0.5 /min;
``analysis.metrics.GROSS_ERROR_FLOOR``), bias, RMSE and 90 % coverage (networks: +-1.645 SD; NLLS:
+-1.645 SE). ve and kep are scored on leaky voxels only (true Ktrans >= 0.01 /min), where they are
defined; an undefined estimate (NLLS's model choice found no leakage: ve, kep NaN) counts as a gross
error and is left out of the median, bias and RMSE ("undefined" column).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
for folder in ("DCEPKFitting", "DCEPKInference", "Testing/Python"):   # the Libs, and the tests' reference builders
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))

from DCEPKFittingLib.kinetics.model import TracerKineticModel  # noqa: E402
from DCEPKInferenceLib.analysis import metrics  # noqa: E402
from DCEPKInferenceLib.data import aif_conditioned as sim  # noqa: E402
from DCEPKInferenceLib.nn import aif_encoding  # noqa: E402
from DCEPKInferenceLib.nn.networks import PARAM_NAMES  # noqa: E402
from DCEPKInferenceLib.training import encoded_patches  # noqa: E402

SET_SEED = 950_000
PATCH = 32
LEAKY_KTRANS = 0.01          # ve and kep are scored where the true Ktrans is at least this (1/min)
Z90 = metrics.Z90
NLLS = "NLLS (same AIF)"
REPORTER_TIMES = np.arange(48) * 7.2


@dataclass
class TestSet:
    name: str
    snr: float
    subjects: list
    truth: np.ndarray                                   # (N, 3) pixels of all patches, patch by patch
    encoded: Dict[str, torch.Tensor] = field(default_factory=dict)
    info: List[Dict] = field(default_factory=list)

    @property
    def n_patches(self) -> int:
        return len(self.subjects)


def simulate_set(name, index, n_patches, snr, aif_family=None, protocol_family=None, times_s=None,
                 delay=None, jitter=False) -> TestSet:
    """``n_patches`` patches at baseline SNR ``snr`` from ``[SET_SEED, index, patch]``."""
    subjects, truths, parts = [], [], {}
    for patch in range(n_patches):
        rng = np.random.default_rng([SET_SEED, index, patch])
        subject, maps = sim.simulate_patch(rng, PATCH, aif_family=aif_family, protocol_family=protocol_family,
                                           times_s=times_s, snr_range=snr, delay=delay, training=jitter,
                                           measured_like_aif=False)
        subjects.append(subject)
        truths.append(maps.reshape(3, -1).T)
        for key, value in encoded_patches.encode_patch(subject, PATCH, with_stream=True).items():
            parts.setdefault(key, []).append(value)
    encoded = {key: torch.from_numpy(np.stack(values)) for key, values in parts.items()}
    encoded["params"] = torch.from_numpy(np.stack([t.T.reshape(3, PATCH, PATCH) for t in truths]).astype(np.float32))
    info = [{"aif": s.aif_family, "protocol": s.protocol_family, "frames": int(s.times_s.size),
             "baseline_error": s.baseline_frames - s.true_baseline_frames} for s in subjects]
    return TestSet(name, snr, subjects, np.concatenate(truths), encoded, info)


def nlls(test: TestSet):
    """(estimate, SE) (N, 3): the core's NLLS per patch with the patch's input function (as given to
    the networks), model choice on (the project's default), signal-converted curves."""
    estimates, errors = [], []
    for subject in test.subjects:
        fit = TracerKineticModel(subject.times_s, subject.given_plasma_mM, "etofts", method="nlls", device="cpu",
                                 signal_baseline=True).fit(subject.conc_mM)
        estimates.append(np.stack([fit.maps[n] for n in PARAM_NAMES], 1))
        errors.append(np.stack([fit.uncertainty_of(n) for n in PARAM_NAMES], 1))
    return np.concatenate(estimates), np.concatenate(errors)


@torch.no_grad()
def network(model, test: TestSet, block: int = 8):
    """(mean, SD) (N, 3) of an AIF-conditioned network on the set, patch by patch."""
    torch.manual_seed(0)
    model.eval()
    data = test.encoded
    means, sds = [], []
    for start in range(0, test.n_patches, block):
        batch = encoded_patches.as_float({k: v[start:start + block] for k, v in data.items()}, "cpu")
        if model.kind == "voxel":
            flat = {k: batch[k].permute(0, 2, 3, 1).reshape(-1, batch[k].shape[1])
                    for k in ("encoding", "anchor", "posterior_sd")}
            mean, sd = model.predict(flat["encoding"], flat["anchor"], flat["posterior_sd"])
        else:
            mean, sd = (x.permute(0, 2, 3, 1).reshape(-1, 3) for x in model.predict(batch))
        mean = mean.numpy().reshape(-1, PATCH * PATCH, 3)
        for row, subject in zip(mean, test.subjects[start:start + block]):   # as run_inference does
            basis = aif_encoding.series_basis(subject.times_s, subject.given_plasma_mM, subject.baseline_frames)
            row[:] = aif_encoding.with_plasma_only_choice(row, *aif_encoding.plasma_only_choice(subject.conc_mM, basis))
        means.append(mean.reshape(-1, 3))
        sds.append(sd.numpy())
    return np.concatenate(means), np.concatenate(sds)


def with_kep(estimate, sd, truth):
    """(N, 4) estimate, SD and truth with kep (1/min) appended (first-order SD, ``metrics.kep_with_sd``)."""
    kep, kep_sd = metrics.kep_with_sd(estimate[:, 0], estimate[:, 1], sd[:, 0], sd[:, 1])
    kep = np.where(np.isfinite(estimate[:, 1]), kep, np.nan)
    true_kep = truth[:, 0] / np.maximum(truth[:, 1], metrics.KEP_VE_FLOOR)
    return (np.column_stack([estimate, kep]), np.column_stack([sd, kep_sd]), np.column_stack([truth, true_kep]))


PARAMETERS = PARAM_NAMES + ("kep",)


def evaluate(estimate, sd, truth, patches: int) -> Dict[str, Dict]:
    """Per parameter: median abs error, gross fraction, bias, RMSE, cov90, undefined fraction, and the
    per-patch pieces the bootstrap intervals resample (``subject`` index per scored voxel)."""
    estimate, sd, truth = with_kep(estimate, sd, truth)
    subject = np.repeat(np.arange(patches), truth.shape[0] // patches)
    leaky = truth[:, 0] >= LEAKY_KTRANS
    out = {}
    for i, name in enumerate(PARAMETERS):
        scored = leaky if name in ("ve", "kep") else np.ones_like(leaky)
        e, s, t = estimate[scored, i], sd[scored, i], truth[scored, i]
        defined = np.isfinite(e)
        error = e[defined] - t[defined]
        with np.errstate(invalid="ignore"):
            inside = np.abs(e - t) <= Z90 * s
        out[name] = {"median_abs_error": float(np.median(np.abs(error))),
                     "gross_error_fraction": float(np.mean(metrics.is_gross_error(e, t, name))),
                     "bias": float(np.mean(error)), "rmse": float(np.sqrt(np.mean(error ** 2))),
                     "coverage90": float(np.mean(inside)), "undefined": float(np.mean(~defined)),
                     "_abs_error": np.where(defined, np.abs(e - t), np.inf), "_inside": inside,
                     "_gross": metrics.is_gross_error(e, t, name), "_subject": subject[scored]}
    return out


def bootstrap(statistic, subjects: np.ndarray, n_subjects: int, draws: int = 1000, seed: int = 0):
    """90 % percentile interval of ``statistic(voxel_index)`` over resamples of whole subjects."""
    order = np.argsort(subjects, kind="stable")
    starts = np.searchsorted(subjects[order], np.arange(n_subjects + 1))
    members = [order[starts[i]:starts[i + 1]] for i in range(n_subjects)]
    rng = np.random.default_rng(seed)
    values = [statistic(np.concatenate([members[j] for j in rng.integers(0, n_subjects, n_subjects)]))
              for _ in range(draws)]
    low, high = np.percentile(values, [5, 95])
    return float(low), float(high)


def ratio_interval(network_row, nlls_row, n_subjects):
    """90 % interval of median-abs-error(network) / median-abs-error(NLLS) over resampled subjects."""
    a, b = network_row["_abs_error"], nlls_row["_abs_error"]
    return bootstrap(lambda ix: np.median(a[ix]) / np.median(b[ix]), network_row["_subject"], n_subjects)


def coverage_interval(row, n_subjects):
    return bootstrap(lambda ix: np.mean(row["_inside"][ix]), row["_subject"], n_subjects)


def run_methods(test: TestSet, models: Dict, log=None) -> Dict[str, Dict]:
    """{method: evaluate(...)} for NLLS and every model on one set."""
    results = {}
    estimate, se = nlls(test)
    results[NLLS] = evaluate(estimate, se, test.truth, test.n_patches)
    for name, model in models.items():
        mean, sd = network(model, test)
        results[name] = evaluate(mean, sd, test.truth, test.n_patches)
    if log:
        log(f"  {test.name} SNR {test.snr:g}: " + ", ".join(
            f"{m} {r['Ktrans']['median_abs_error']:.4f}" for m, r in results.items()))
    return results


def choose_best(validation: Dict[str, Dict], coverage_band=(0.85, 0.95)) -> Optional[str]:
    """The network with the lowest validation Ktrans median abs error whose validation coverage lies in
    the band and whose gross-error fraction is no more than NLLS's; else the lowest error of all."""
    nets = {m: r["Ktrans"] for m, r in validation.items() if m != NLLS}
    if not nets:
        return None
    eligible = {m: r for m, r in nets.items() if coverage_band[0] <= r["coverage90"] <= coverage_band[1]
                and r["gross_error_fraction"] <= validation[NLLS]["Ktrans"]["gross_error_fraction"]}
    pool = eligible or nets
    return min(pool, key=lambda m: pool[m]["median_abs_error"])
