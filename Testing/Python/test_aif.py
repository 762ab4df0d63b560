"""Population AIFs, blood/plasma conversion, ROI AIFs, AIF files and resampling, against
analytic properties (integrals, shifts, dose linearity), the papers' printed parameters and
constructed ground truth. Exact agreement with the OSIPI reference curves is in
test_osipi_signal_aif.py."""

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import gammaln

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.kinetics.aif import (POPULATION_AIFS, aif_from_roi, blood_to_plasma, georgiou_aif, load_aif_csv,
                                          parker_aif, plasma_to_blood, population_aif, resample_aif, weinmann_aif)


@pytest.mark.parametrize("name", POPULATION_AIFS)
def test_delay_shifts_and_zero_before_arrival(name):
    t = np.arange(0, 400, 0.7)
    base = population_aif(name, t)
    shifted = population_aif(name, t, delay_s=12.6)
    assert np.all(shifted[t < 12.6] == 0)
    after = t >= 12.6 + 1e-9
    np.testing.assert_allclose(shifted[after], population_aif(name, t[after] - 12.6), rtol=1e-12, atol=1e-15)
    assert np.all(base >= 0) and base.max() > 0.4  # all peak above 0.4 mM (blood) at 0.1 mmol/kg
    # negative times (before the bolus) are 0 too
    assert np.all(population_aif(name, -np.arange(1, 10.0)) == 0)


@pytest.mark.parametrize("name", POPULATION_AIFS)
def test_dose_scaling_is_linear(name):
    t = np.linspace(0, 300, 301)
    np.testing.assert_allclose(population_aif(name, t, dose_mmol_per_kg=0.05),
                               0.5 * population_aif(name, t), rtol=1e-12)
    with pytest.raises(DCEPKInputError, match="mmol/kg"):
        population_aif(name, t, dose_mmol_per_kg=15.0)


def test_weinmann_closed_form_integral():
    # Tofts & Kermode 1991: integral of D sum a_i exp(-m_i t) = D sum a_i / m_i (mM min).
    t_end_min = 60.0
    expected = 0.1 * (3.99 / 0.144 * (1 - math.exp(-0.144 * t_end_min)) + 4.78 / 0.0111 * (1 - math.exp(-0.0111 * t_end_min)))
    got, _ = quad(lambda ts: weinmann_aif(np.array([ts]))[0], 0, t_end_min * 60, limit=200)
    assert got / 60.0 == pytest.approx(expected, rel=1e-8)
    assert weinmann_aif(np.array([0.0]))[0] == pytest.approx(0.1 * (3.99 + 4.78))


def test_parker_first_pass_area():
    # The two Gaussians carry A1 + A2 = 1.139 mM min; the sigmoid-gated washout is near
    # alpha/beta * exp(-beta tau) over a long window. Checks scale and the s <-> min units.
    got, _ = quad(lambda ts: parker_aif(np.array([ts]))[0], 0, 120 * 60, limit=400, points=[10, 20, 30])
    washout = 1.050 / 0.1685 * math.exp(-0.1685 * 0.483) * (1 - math.exp(-0.1685 * (120 - 0.483)))
    assert got / 60.0 == pytest.approx(0.809 + 0.330 + washout, rel=0.01)
    peak_t = np.arange(0, 60, 0.01)[np.argmax(parker_aif(np.arange(0, 60, 0.01)))]
    assert peak_t == pytest.approx(0.17046 * 60, abs=0.3)  # first Gaussian centre T1 = 0.17046 min


def test_georgiou_matches_printed_table3_parameters():
    # Independent evaluation of the Horsfield form with the parameters as printed in Table 3
    # of Georgiou et al. 2019 (rounded); our more precise parameters stay within 2 % of peak.
    a, m = (0.37, 0.33, 10.06), (0.11, 1.17, 16.02)
    alpha, beta, tau = 5.26, 0.032, 0.129
    t_min = np.arange(0, 5, 0.1 / 60)
    env = sum(ai * np.exp(-mi * t_min) for ai, mi in zip(a, m))
    g = np.zeros_like(t_min)
    for k in range(int(5 / tau) + 1):
        tk = t_min - k * tau
        shape = (k + 1) * alpha + k
        pos = tk > 0
        g[pos] += np.exp(shape * np.log(tk[pos]) - tk[pos] / beta - (shape + 1) * math.log(beta) - gammaln(shape + 1))
    printed = env * g
    ours = georgiou_aif(t_min * 60)
    assert np.max(np.abs(ours - printed)) < 0.02 * printed.max()
    assert 8.0 < ours.max() < 9.5  # the published peak is about 8.6 mM


def test_blood_plasma_conversion():
    cb = np.array([0.0, 1.0, 5.5])
    np.testing.assert_allclose(blood_to_plasma(cb, 0.45), cb / 0.55)
    np.testing.assert_allclose(plasma_to_blood(blood_to_plasma(cb, 0.4), 0.4), cb)
    t = np.linspace(0, 200, 50)
    np.testing.assert_allclose(population_aif("parker", t, compartment="plasma", hct=0.42),
                               parker_aif(t) / 0.58)
    np.testing.assert_allclose(population_aif("weinmann", t, compartment="blood", hct=0.45),
                               weinmann_aif(t) * 0.55)
    with pytest.raises(DCEPKInputError, match="percent"):
        blood_to_plasma(cb, 45)
    with pytest.raises(DCEPKInputError, match="unknown population AIF"):
        population_aif("fritz", t)


def _roi_series(rng):
    t = np.arange(0, 300, 5.0)
    curve = parker_aif(t, delay_s=20)
    scale = rng.uniform(0.2, 1.0, (3, 4, 5))
    conc = scale[..., None] * curve
    return t, curve, scale, conc


def test_aif_from_roi_mean_and_nan_voxels():
    rng = np.random.default_rng(0)
    _, curve, scale, conc = _roi_series(rng)
    roi = np.zeros((3, 4, 5), bool)
    roi[1, 1:3, 2:5] = True
    conc[1, 1, 2, 7] = np.nan  # a voxel whose inversion failed in one frame
    kept = roi.copy()
    kept[1, 1, 2] = False
    np.testing.assert_allclose(aif_from_roi(conc, roi), scale[kept].mean() * curve, rtol=1e-12)


@pytest.mark.parametrize("rank_by", ["peak", "area"])
def test_aif_from_roi_top_fraction(rank_by):
    rng = np.random.default_rng(1)
    _, curve, scale, conc = _roi_series(rng)
    roi = np.ones((3, 4, 5), bool)
    top = np.sort(scale.ravel())[::-1][:6]  # ceil(0.1 * 60) brightest voxels
    np.testing.assert_allclose(aif_from_roi(conc, roi, top_fraction=0.1, rank_by=rank_by),
                               top.mean() * curve, rtol=1e-12)


def test_aif_from_roi_errors():
    conc = np.ones((2, 3, 4, 10))
    with pytest.raises(DCEPKInputError, match="empty"):
        aif_from_roi(conc, np.zeros((2, 3, 4)))
    with pytest.raises(DCEPKInputError, match="grid"):
        aif_from_roi(conc, np.ones((2, 3, 5)))
    bad = conc.copy()
    bad[..., 3] = np.nan
    with pytest.raises(DCEPKInputError, match="valid concentration"):
        aif_from_roi(bad, np.ones((2, 3, 4)))
    with pytest.raises(DCEPKInputError, match="4-D"):
        aif_from_roi(conc[0], np.ones((3, 4)))
    with pytest.raises(DCEPKInputError, match="top_fraction"):
        aif_from_roi(conc, np.ones((2, 3, 4)), top_fraction=10)


@pytest.mark.parametrize("text, factor", [
    ("time (ms),Cb (mM)\n0,0\n5000,1.5\n10000,2.0\n", 1e-3),
    ("t_min;c\n0;0\n0.5;1.5\n1;2.0\n", 60.0),
    ("# exported AIF\n0\t0\n5\t1.5\n10\t2.0\n", 1.0),
    ("0 0\n5 1.5\n10 2.0\n", 1.0),
    ("Time,Signal\n0,0\n5,1.5\n10,2\n", 1.0),
])
def test_load_aif_csv_formats(tmp_path, text, factor):
    path = tmp_path / "aif.csv"
    path.write_text(text)
    t, c = load_aif_csv(path)
    np.testing.assert_allclose(t, np.array([0, 5, 10.0]) if factor != 60.0 else np.array([0, 30, 60.0]))
    np.testing.assert_allclose(c, [0, 1.5, 2.0])


def test_load_aif_csv_micromolar(tmp_path):
    path = tmp_path / "aif.csv"
    path.write_text("time (s),conc (uM)\n0,0\n1,1500\n")
    np.testing.assert_allclose(load_aif_csv(path)[1], [0, 1.5])


@pytest.mark.parametrize("text, match", [
    ("", "no data rows"),
    ("time,c\n0,1\n", "at least 2"),
    ("0,1,2\n1,2,3\n", "expected 2 columns"),
    ("0,1\n1,abc\n", "not numbers"),
    ("0,1\n0,2\n", "strictly increasing"),
    ("0,1\n1,nan\n", "NaN"),
    ("time (h),c (mM)\n0,1\n1,2\n", "unknown unit 'h'"),
    ("time (s),c (mg/ml)\n0,1\n1,2\n", "unknown unit 'mg/ml'"),
])
def test_load_aif_csv_bad_files(tmp_path, text, match):
    path = tmp_path / "aif.csv"
    path.write_text(text)
    with pytest.raises(DCEPKInputError, match=match):
        load_aif_csv(path)
    with pytest.raises(DCEPKInputError, match="does not exist"):
        load_aif_csv(tmp_path / "missing.csv")


def test_load_slicer_prescribed_aif(reference):
    # Slicer PkModeling's prescribed-AIF files: '#' comment, 'Time,Signal' header, seconds.
    path = reference("pkmodeling_dro", "DRO3min5secinf_PrescribedAIF-sparse.csv")
    t, c = load_aif_csv(path)
    dense_t, dense_c = load_aif_csv(reference("pkmodeling_dro", "DRO3min5secinf_PrescribedAIF.csv"))
    assert np.all(np.diff(t) > 0) and c.max() > 0
    # The sparse file (10 s) is the dense one (5 s) with every second row removed: resampled onto the dense
    # file's grid it gives the dense values at the times both hold, the mean of its two neighbours in between
    # (linear interpolation), and its last value held for the 5 s the dense file runs longer.
    on_dense = resample_aif(t, c, dense_t)
    shared = np.isin(dense_t, t)
    assert shared.sum() == t.size and (~shared).sum() == dense_t.size - t.size > 10
    np.testing.assert_allclose(on_dense[shared], dense_c[shared], rtol=1e-12)
    between = np.flatnonzero(~shared)[:-1]
    np.testing.assert_allclose(on_dense[between], 0.5 * (dense_c[between - 1] + dense_c[between + 1]), rtol=1e-12)
    assert dense_t[-1] > t[-1] and on_dense[-1] == c[-1]


def test_resample_aif():
    ts = np.array([10.0, 20.0, 30.0, 40.0])
    cs = 2.0 * ts - 5.0
    td = np.array([0.0, 9.9, 10.0, 15.0, 33.3, 40.0, 52.0])
    got = resample_aif(ts, cs, td, max_gap_s=15)
    np.testing.assert_allclose(got[2:6], 2.0 * td[2:6] - 5.0)  # linear data: interpolation is exact
    assert got[0] == 0 and got[1] == 0                      # before the first point
    assert got[6] == cs[-1]                                  # short hold at the end
    with pytest.raises(DCEPKInputError, match="covering the whole acquisition"):
        resample_aif(ts, cs, np.array([0.0, 100.0]))
    with pytest.raises(DCEPKInputError, match="strictly increasing"):
        resample_aif(ts[::-1], cs, td)
