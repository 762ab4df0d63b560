"""OSIPI DCE-DSC-MRI CodeCollection test cases for population AIFs, VFA T1 mapping and signal
to concentration, with the OSIPI pass criterion |measured - reference| <= a_tol + r_tol |reference|.

Conventions of the reference files (as in the OSIPI test code): AIF times are in minutes and
delays in seconds; the QIBA T1 file gives R1 in 1/ms; the prostate T1 file gives TR and T1 in
ms and its reference is the non-B1-corrected nonlinear fit; the signal-to-concentration
reference averages baseline frames 1 .. numbaselinepts-1 (the first dynamic is skipped).
"""

import csv
from collections import OrderedDict

import numpy as np
import pytest

from DCEPKFittingLib.kinetics.aif import georgiou_aif, parker_aif
from DCEPKFittingLib.signal import T1FitStatus, fit_vfa_t1, signal_to_concentration


def _rows(path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _numbers(cell):
    return np.array(cell.split(), dtype=np.float64)


def _passes(measured, reference, a_tol, r_tol):
    return np.abs(measured - reference) <= a_tol + r_tol * np.abs(reference)


@pytest.mark.parametrize("filename, function", [
    ("ParkerAIF_ref.csv", parker_aif),
    ("ParkerAIF_ref_with_delay.csv", parker_aif),
    ("GeorgiouAIF_ref.csv", georgiou_aif),
])
def test_population_aif_reference_curves(reference, filename, function):
    path = reference("osipi", "PopulationAIF_DCE", "data", filename)
    cases = OrderedDict()
    for row in _rows(path):
        cases.setdefault(row["label"], []).append(row)
    assert len(cases) >= 7
    worst = 0.0
    for label, rows in cases.items():
        t_s = np.array([float(r["time"]) for r in rows]) * 60.0   # file: minutes
        cb_ref = np.array([float(r["Cb"]) for r in rows])
        delay_s = float(rows[0].get("delay") or 0.0)              # file: seconds
        cb = function(t_s, delay_s=delay_s)
        ok = _passes(cb, cb_ref, 1e-4, 0.01)
        assert ok.all(), f"{filename} {label}: {np.sum(~ok)} of {ok.size} points fail, max error {np.abs(cb - cb_ref).max():.3g} mM"
        worst = max(worst, float(np.abs(cb - cb_ref).max()))
    print(f"\n{filename}: {len(cases)}/{len(cases)} curves pass, max |error| {worst:.2e} mM")


def _t1_cases(reference, dataset):
    rows = _rows(reference("osipi", "T1_mapping", "data", f"t1_{dataset}_data.csv"))
    labels, signals, fas, trs, r1_ref = [], [], [], [], []
    for row in rows:
        labels.append(row["label"])
        signals.append(_numbers(row["s"]))
        fas.append(_numbers(row["FA"]))
        tr = _numbers(row["TR"])[0]
        if dataset == "prostate":
            trs.append(tr / 1000.0)                                 # ms -> s
            r1_ref.append(1000.0 / float(row[" T1 nonlinear"]))     # T1 ms -> R1 1/s
        elif dataset == "quiba":
            trs.append(tr)
            r1_ref.append(float(row["R1"]) * 1000.0)                # 1/ms -> 1/s
        else:
            trs.append(tr)
            r1_ref.append(float(row["R1"]))
    return labels, signals, fas, trs, np.array(r1_ref), rows


def _fit_all(signals, fas, trs, method, b1=None):
    # Cases with the same protocol are fitted together, as a volume would be.
    r1 = np.full(len(signals), np.nan)
    status = np.zeros(len(signals), np.uint8)
    groups = OrderedDict()
    for n, (fa, tr) in enumerate(zip(fas, trs)):
        groups.setdefault((tuple(fa), tr), []).append(n)
    for (fa, tr), idx in groups.items():
        b1_group = None if b1 is None else np.asarray(b1)[idx]
        t1, _, st = fit_vfa_t1(np.stack([signals[i] for i in idx]), np.array(fa), tr, method=method, b1=b1_group)
        r1[idx] = 1.0 / t1
        status[idx] = st
    return r1, status


# Published OSIPI results: the linear fit misses one low-SNR prostate voxel, whose reference
# comes from the nonlinear fit; nonlinear fitting passes every case.
KNOWN_LINEAR_FAILURES = {"Pat5_voxel5_prostaat"}


@pytest.mark.parametrize("method", ["linear", "nonlinear"])
def test_vfa_t1_osipi(reference, method):
    total, passed, worst, failures = 0, 0, 0.0, []
    for dataset in ("brain", "quiba", "prostate"):
        labels, signals, fas, trs, r1_ref, _ = _t1_cases(reference, dataset)
        r1, status = _fit_all(signals, fas, trs, method)
        assert np.all((status == T1FitStatus.OK) | (status == T1FitStatus.NOT_CONVERGED))
        ok = _passes(r1, r1_ref, 0.05, 0.05)
        total += ok.size
        passed += int(ok.sum())
        worst = max(worst, float(np.nanmax(np.abs(r1 - r1_ref))))
        failures += [labels[i] for i in np.flatnonzero(~ok)]
    print(f"\nOSIPI VFA T1 {method}: {passed}/{total} pass, max |dR1| {worst:.4f} 1/s, failing: {failures}")
    assert total == 171
    if method == "nonlinear":
        assert passed == total, failures
        assert worst < 0.11  # best published: 0.109 1/s
    else:
        assert set(failures) <= KNOWN_LINEAR_FAILURES, failures


def test_vfa_t1_prostate_b1_corrected(reference):
    # The prostate file also gives B1 (percent) and B1-corrected nonlinear T1 (ms).
    labels, signals, fas, trs, _, rows = _t1_cases(reference, "prostate")
    b1 = np.array([float(r["B1"]) for r in rows]) / 100.0
    r1_ref = 1000.0 / np.array([float(r[" T1 nonlinear B1cor"]) for r in rows])
    r1, _ = _fit_all(signals, fas, trs, "nonlinear", b1=b1)
    ok = _passes(r1, r1_ref, 0.05, 0.05)
    print(f"\nOSIPI prostate B1-corrected nonlinear: {ok.sum()}/{ok.size} pass, max |dR1| {np.abs(r1 - r1_ref).max():.2e}")
    assert ok.all(), [labels[i] for i in np.flatnonzero(~ok)]


def test_signal_to_concentration_osipi(reference):
    rows = _rows(reference("osipi", "SI_to_Conc", "data", "SI2Conc_data.csv"))
    assert len(rows) == 5
    worst = 0.0
    for row in rows:
        signal, conc_ref = _numbers(row["s"]), _numbers(row["conc"])
        conc, valid = signal_to_concentration(
            signal, float(row["T1base"]), float(row["FA"]), float(row["TR"]), float(row["r1"]),
            baseline_frames=int(row["numbaselinepts"]), baseline_start=1)
        assert valid, row["label"]
        ok = _passes(conc, conc_ref, 1e-5, 1e-5)
        assert ok.all(), f"{row['label']}: max error {np.abs(conc - conc_ref).max():.3g} mM"
        worst = max(worst, float(np.abs(conc - conc_ref).max()))
    print(f"\nOSIPI SI to concentration: 5/5 curves pass, max |error| {worst:.2e} mM")
