"""Automatic arterial / venous input detection against known truth: the phantom's vessel and blood
curve, the QIBA v6 DRO's vascular rows, and a slice with an artery and a vein whose voxels and
curves are known, plus one case per rejection rule (inflow-bright vessel, partial-volume artery,
noise speckle), determinism and the error when nothing enhances."""

import numpy as np
import pytest

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.kinetics import aif as aif_lib
from DCEPKFittingLib.kinetics import aif_detection, tk_models
from DCEPKFittingLib.pipeline.fit import FitSettings, run_fit
from DCEPKFittingLib.pipeline.input_function import InputFunctionSpec, input_function_from_signal
from DCEPKFittingLib.signal import detect_baseline_frames, spgr_signal
from DCEPKFittingLib.sims.phantom import VESSEL, make_phantom

from conftest import require_reference
from noisy_tofts_reference import KTRANS_BANDS, VE_BANDS, concordance_correlation, patch_medians

FA, TR, R1 = 15.0, 0.005, 4.0
BLOOD_T10, TISSUE_T10 = 1.6, 1.2


def _disk(n, cy, cx, r):
    yy, xx = np.mgrid[:n, :n]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)[None]


def vessel_slice(seed=0, snr=40.0, inflow=False, pv_artery=False, speckle=False, n=96, frames=60, dt=4.0):
    """One slice of tissue with an artery (Parker blood curve, arrival 20 s) and a vein (the same
    curve 6 s later, dispersed), rendered through the SPGR equation with Rician noise; optional
    extra vessels that must be rejected."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) * dt
    blood = aif_lib.parker_aif(t, delay_s=20.0)
    fine = np.arange(0.0, t[-1] + 1.0, 0.25)
    vein_blood = np.interp(t, fine, tk_models.exp_convolution(fine, aif_lib.parker_aif(fine, delay_s=26.0),
                                                               1 / 3.0) / 3.0)
    tissue = tk_models.concentration("etofts", np.array([[0.05, 0.2, 0.03]]), t, aif_lib.blood_to_plasma(blood))[0]
    conc = np.broadcast_to(tissue, (1, n, n, frames)).copy()
    t10 = np.full((1, n, n), TISSUE_T10)
    case = {"artery": _disk(n, 10, 10, 3), "vein": _disk(n, 30, 30, 3)}
    for name, curve in (("artery", blood), ("vein", vein_blood)):
        conc[case[name]] = curve
        t10[case[name]] = BLOOD_T10
    clean = spgr_signal(1000.0, 1 / t10[..., None] + R1 * conc, FA, TR)
    blood_signal = spgr_signal(1000.0, 1 / BLOOD_T10 + R1 * blood, FA, TR)
    if pv_artery:   # 40 % blood in every voxel, mixed in the signal domain
        case["rejected"] = _disk(n, 30, 10, 3)
        clean[case["rejected"]] = 0.4 * blood_signal + 0.6 * clean[case["rejected"]]
    if inflow:      # through-plane inflow: a brighter baseline, a smaller relative enhancement
        case["rejected"] = _disk(n, 10, 30, 2)
        clean[case["rejected"]] = blood_signal + 0.15 * (1000.0 * np.sin(np.deg2rad(FA)) - blood_signal)
    sigma = clean[0, 50, 50, 0] / snr
    noisy = np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))
    if speckle:     # one voxel with spikes after the bolus arrives
        case["rejected"] = np.zeros((1, n, n), bool)
        case["rejected"][0, 20, 5] = True
        noisy[case["rejected"]] *= 1 + 3.0 * np.abs(rng.standard_normal(frames)) * (np.arange(frames) > 6)
    return {"signal": noisy.astype(np.float32), "times": t, "blood": blood, "vein_blood": vein_blood, **case}


def _precision(chosen, truth):
    return float((chosen & truth).sum() / max(chosen.sum(), 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_phantom_vessel_is_found_and_its_curve_is_the_blood_input_function(seed):
    phantom = make_phantom(seed=seed)                   # SNR 30; the vessel's curve is the blood AIF
    series = phantom.series
    found = input_function_from_signal(series.signal, series.times_s, InputFunctionSpec(auto_aif="either"),
                                       t10_s=phantom.truth["T10"], fa_deg=series.flip_angle_deg, tr_s=series.tr_s,
                                       r1_per_mM_s=phantom.protocol.r1_per_mM_s,
                                       baseline_frames=phantom.protocol.baseline_frames)
    vessel = phantom.labels == VESSEL
    assert found.detection.chosen.sum() >= 8
    assert _precision(found.detection.chosen, vessel) >= 0.9
    truth = phantom.aif_blood_mM
    assert found.blood_mM.max() == pytest.approx(truth.max(), rel=0.10)
    assert np.trapezoid(found.blood_mM, series.times_s) == pytest.approx(np.trapezoid(truth, series.times_s), rel=0.10)
    assert any("artery voxels" in note for note in found.notes)


def test_artery_and_vein_are_told_apart_and_their_curves_follow_the_truth():
    case = vessel_slice()
    n_base = detect_baseline_frames(case["signal"], times_s=case["times"])
    found = aif_detection.detect_input_function(case["signal"], case["times"], n_base, "either")
    assert found.kind == "artery"
    assert _precision(found.artery_mask, case["artery"]) == 1.0 and found.artery_mask.sum() >= 20
    assert _precision(found.vein_mask, case["vein"]) == 1.0 and found.vein_mask.sum() >= 20
    vein = aif_detection.detect_input_function(case["signal"], case["times"], n_base, "vein")
    assert vein.kind == "vein" and np.array_equal(vein.chosen, found.vein_mask)
    kw = dict(fa_deg=FA, tr_s=TR, r1_per_mM_s=R1, baseline_frames=n_base)
    for kind, truth in (("artery", case["blood"]), ("vein", case["vein_blood"])):
        curve = input_function_from_signal(case["signal"], case["times"],
                                           InputFunctionSpec(auto_aif=kind, blood_t10_s=BLOOD_T10),
                                           t10_s=TISSUE_T10, **kw).blood_mM
        assert np.max(np.abs(curve - truth)) < 0.08 * truth.max()
        # a constant or all-zero curve is far from the truth by the same measure
        assert np.max(np.abs(np.full_like(truth, truth.mean()) - truth)) > 0.08 * truth.max()


@pytest.mark.parametrize("rejected", ["inflow", "pv_artery", "speckle"])
def test_each_rejection_rule_has_a_case_it_rejects(rejected):
    case = vessel_slice(**{rejected: True})
    found = aif_detection.detect_input_function(case["signal"], case["times"], 5)
    assert not (found.label_map > 0)[case["rejected"]].any()
    assert _precision(found.artery_mask, case["artery"]) == 1.0


def test_without_the_inflow_rules_the_inflow_vessel_would_be_taken(monkeypatch):
    """The inflow vessel is a candidate and joins the arterial cluster: only its bright baseline and
    small enhancement keep it out."""
    case = vessel_slice(inflow=True)
    monkeypatch.setattr(aif_detection, "INFLOW_S0_RATIO", np.inf)
    monkeypatch.setattr(aif_detection, "FULL_LUMEN_SHARE", 0.0)
    found = aif_detection.detect_input_function(case["signal"], case["times"], 5)
    assert found.artery_mask[case["rejected"]].all()


def test_detection_is_deterministic_and_refuses_a_series_without_enhancement():
    case = vessel_slice(seed=3, snr=15.0)
    first = aif_detection.detect_input_function(case["signal"], case["times"], 5)
    second = aif_detection.detect_input_function(case["signal"].copy(), case["times"], 5)
    assert np.array_equal(first.label_map, second.label_map)
    flat = np.broadcast_to(case["signal"][..., :1], case["signal"].shape).copy()
    flat += np.random.default_rng(0).normal(0.0, 0.5, flat.shape).astype(np.float32)
    with pytest.raises(DCEPKInputError, match="no arterial candidate.*--aif-roi.*--population-aif"):
        aif_detection.detect_input_function(flat, case["times"], 5)
    with pytest.raises(DCEPKInputError, match="input kind"):
        aif_detection.detect_input_function(case["signal"], case["times"], 5, "capillary")


def test_qiba_v6_vascular_rows_are_found_and_the_fit_with_them_is_concordant():
    from DCEPKFittingLib.io import read_dce
    series = read_dce(require_reference("qiba_v6"))
    t10 = np.full(series.spatial_shape, 1.0)
    t10[:, 70:80, :] = 1.44
    tissue = np.zeros(series.spatial_shape, bool)
    tissue[:, 10:70, :] = True
    result = run_fit(series, FitSettings(model="tofts", t10_s=t10, r1_per_mM_s=4.5, hct=0.45, auto_aif="artery",
                                         mask=tissue))
    chosen = result.input_function.detection.chosen
    assert chosen.sum() >= 100 and np.all(np.nonzero(chosen[0])[0] >= 70)
    strip_mean = np.asarray(series.signal[0, 70:80], dtype=np.float64).reshape(-1, series.n_frames).mean(0)
    chosen_mean = np.asarray(series.signal[chosen], dtype=np.float64).mean(0)
    assert np.corrcoef(strip_mean, chosen_mean)[0, 1] >= 0.99
    true_ktrans = np.repeat(KTRANS_BANDS, len(VE_BANDS))
    ktrans = patch_medians(np.where(tissue, result.maps["Ktrans"], np.nan))
    assert concordance_correlation(ktrans, true_ktrans) >= 0.99
    assert concordance_correlation(np.full_like(true_ktrans, true_ktrans.mean()), true_ktrans) < 0.5
