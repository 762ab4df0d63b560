"""SPGR signal, VFA T1 mapping, signal to concentration and baseline detection against
analytic truths (closed-form SPGR values, Ernst angle, noise-free round trips, an independent
scipy optimiser)."""

import numpy as np
import pytest
from scipy.optimize import least_squares

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.signal import (RELAXIVITY_R1, T1FitStatus, default_r1, detect_baseline_frames, fit_vfa_t1,
                                    signal_to_concentration, spgr_signal)

TR = 0.005


def test_spgr_limits_and_ernst_angle():
    # TR >> T1: full recovery, S = S0 sin(a).
    assert spgr_signal(100.0, 1e4, 30.0, 0.9) == pytest.approx(100.0 * np.sin(np.pi / 6), rel=1e-12)
    # The Ernst angle arccos(exp(-TR/T1)) maximises the signal.
    t1 = 1.2
    fas = np.linspace(1, 30, 29001)
    s = spgr_signal(1.0, 1 / t1, fas, TR)
    ernst = np.rad2deg(np.arccos(np.exp(-TR / t1)))
    assert fas[np.argmax(s)] == pytest.approx(ernst, abs=2e-3)
    # B1 scales the flip angle, not the signal.
    assert spgr_signal(1.0, 1.0, 10.0, TR, b1=1.5) == pytest.approx(spgr_signal(1.0, 1.0, 15.0, TR), rel=1e-12)


@pytest.mark.parametrize("bad, match", [(0.26, "radians"), (-5, "between 0 and 180"), (200, "between 0 and 180")])
def test_flip_angle_errors(bad, match):
    with pytest.raises(DCEPKInputError, match=match):
        spgr_signal(1.0, 1.0, bad, TR)


def test_tr_in_ms_is_refused():
    with pytest.raises(DCEPKInputError, match="milliseconds"):
        spgr_signal(1.0, 1.0, 15.0, 5.0)


def _vfa_volume(rng, shape=(3, 4, 5), b1=None):
    t1 = rng.uniform(0.3, 3.0, shape)
    s0 = rng.uniform(500, 5000, shape)
    fa = np.array([2.0, 5.0, 10.0, 15.0, 20.0])
    b1v = 1.0 if b1 is None else b1
    sig = spgr_signal(s0[..., None], 1 / t1[..., None], fa, TR, b1=np.asarray(b1v)[..., None] if np.ndim(b1v) else b1v)
    return t1, s0, fa, sig


@pytest.mark.parametrize("method", ["linear", "nonlinear"])
def test_vfa_recovers_noise_free_t1(method):
    rng = np.random.default_rng(1)
    t1, s0, fa, sig = _vfa_volume(rng)
    t1_fit, s0_fit, status = fit_vfa_t1(sig, fa, TR, method=method)
    assert t1_fit.shape == t1.shape and status.shape == t1.shape
    assert np.all(status == T1FitStatus.OK)
    np.testing.assert_allclose(t1_fit, t1, rtol=1e-8)
    np.testing.assert_allclose(s0_fit, s0, rtol=1e-8)


@pytest.mark.parametrize("method", ["linear", "nonlinear"])
def test_vfa_b1_map_correction(method):
    rng = np.random.default_rng(2)
    b1 = rng.uniform(0.8, 1.2, (3, 4, 5))
    t1, _, fa, sig = _vfa_volume(rng, b1=b1)
    t1_fit, _, _ = fit_vfa_t1(sig, fa, TR, method=method, b1=b1)
    np.testing.assert_allclose(t1_fit, t1, rtol=1e-8)
    # Ignoring a 20 % B1 error biases T1 strongly (roughly by b1^2): the map matters.
    t1_nob1, _, _ = fit_vfa_t1(sig, fa, TR, method=method)
    assert np.max(np.abs(t1_nob1 / t1 - 1)) > 0.2


def test_vfa_nonlinear_reaches_least_squares_optimum():
    # Noisy voxels: compare with scipy's trust-region least squares, voxel by voxel.
    rng = np.random.default_rng(3)
    t1, s0, fa, sig = _vfa_volume(rng, shape=(20,))
    noisy = sig + rng.normal(0, 0.02 * sig.max(axis=-1, keepdims=True), sig.shape)
    t1_fit, s0_fit, status = fit_vfa_t1(noisy, fa, TR, method="nonlinear")
    assert np.all(status == T1FitStatus.OK)
    for n in range(noisy.shape[0]):
        res = least_squares(lambda p: spgr_signal(p[0], 1 / p[1], fa, TR) - noisy[n], [s0[n], t1[n]],
                            x_scale=[s0[n], t1[n]], xtol=1e-14, ftol=1e-14, gtol=1e-14)
        ours = np.sum((spgr_signal(s0_fit[n], 1 / t1_fit[n], fa, TR) - noisy[n]) ** 2)
        assert ours <= 2 * res.cost * (1 + 1e-6)
        assert t1_fit[n] == pytest.approx(res.x[1], rel=1e-4)


def test_vfa_status_for_undefined_voxels():
    fa = np.array([3.0, 10.0, 20.0])
    good = spgr_signal(1000.0, 1.0, fa, TR)
    sig = np.stack([good, [100.0, -1.0, 50.0], [np.nan, 1.0, 1.0],
                    # rises steeply with flip angle like nothing with T1 > 0 can: slope E1 > 1
                    spgr_signal(1000.0, 1.0, fa, TR) * np.array([0.1, 1.0, 5.0])])
    for method in ("linear", "nonlinear"):
        t1, s0, status = fit_vfa_t1(sig, fa, TR, method=method)
        assert status.tolist() == [T1FitStatus.OK, T1FitStatus.NONPOSITIVE_SIGNAL,
                                   T1FitStatus.NAN_INPUT, T1FitStatus.NONPHYSICAL], method
        assert t1[0] == pytest.approx(1.0, rel=1e-8)
        assert np.all(np.isnan(t1[1:])) and np.all(np.isnan(s0[1:]))


def test_vfa_input_errors():
    fa = np.array([3.0, 10.0])
    with pytest.raises(DCEPKInputError, match="flip angles"):
        fit_vfa_t1(np.ones((4, 3)), fa, TR)
    with pytest.raises(DCEPKInputError, match="radians"):
        fit_vfa_t1(np.ones((4, 2)), np.deg2rad(fa), TR)
    with pytest.raises(DCEPKInputError, match="percent"):
        fit_vfa_t1(np.ones((4, 2)), fa, TR, b1=100.0)
    with pytest.raises(DCEPKInputError, match="'linear' or 'nonlinear'"):
        fit_vfa_t1(np.ones((4, 2)), fa, TR, method="fast")


def _render(conc, t10, fa, r1, s0=1000.0, b1=1.0):
    r1_t = 1 / np.asarray(t10)[..., None] + r1 * conc
    return spgr_signal(np.asarray(s0)[..., None] if np.ndim(s0) else s0, r1_t, fa,
                       TR, b1=np.asarray(b1)[..., None] if np.ndim(b1) else b1)


def test_exact_inversion_round_trip_with_maps():
    rng = np.random.default_rng(4)
    shape, n_t, n_base = (2, 3, 4), 30, 5
    conc = np.zeros(shape + (n_t,))
    conc[..., n_base:] = rng.uniform(0, 8, shape + (n_t - n_base,))
    t10 = rng.uniform(0.5, 2.5, shape)
    b1 = rng.uniform(0.8, 1.2, shape)
    sig = _render(conc, t10, 25.0, 4.5, s0=rng.uniform(100, 1e4, shape), b1=b1)
    got, valid = signal_to_concentration(sig, t10, 25.0, TR, 4.5, baseline_frames=n_base, b1=b1)
    assert valid.all()
    np.testing.assert_allclose(got, conc, atol=1e-9)
    # The linear approximation (signal enhancement proportional to concentration) would be far
    # off at these concentrations; the exact inversion is not that approximation.
    rel = sig / sig[..., :n_base].mean(-1, keepdims=True) - 1
    lin = rel * (1 / t10[..., None]) / 4.5
    assert np.nanmax(np.abs(lin - conc)) > 1.0


def test_inversion_flags_undefined_voxels():
    t = np.zeros((4, 10))
    t[:, 3:] = 2.0
    sig = _render(t, 1.0, 15.0, 4.0)
    sig[1, 6] = 10 * sig[1, 0]          # above M = S0 sin(a): no R1 can give it
    sig[2, :3] = -5.0                   # negative baseline
    sig[3, 4] = np.nan
    conc, valid = signal_to_concentration(sig, 1.0, 15.0, TR, 4.0, baseline_frames=3)
    assert valid.tolist() == [True, False, False, False]
    np.testing.assert_allclose(conc[0], t[0], atol=1e-9)
    assert np.isnan(conc[1, 6]) and np.isfinite(conc[1, 5])
    assert np.all(np.isnan(conc[2]))
    assert np.isnan(conc[3, 4])
    # NaN T10 (failed T1 fit) propagates as invalid, not as a number.
    conc, valid = signal_to_concentration(sig[:2], np.array([np.nan, 1.0]), 15.0, TR, 4.0, baseline_frames=3)
    assert not valid[0] and np.all(np.isnan(conc[0]))
    with pytest.raises(DCEPKInputError, match="T10 has no positive finite value"):
        signal_to_concentration(sig[:1], np.array([np.nan]), 15.0, TR, 4.0, baseline_frames=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(signal=np.zeros((3, 10))), "zero or negative"),
    (dict(signal=np.full((3, 10), np.nan)), "NaN"),
    (dict(signal=np.ones((3, 1))), "at least 2 frames"),
    (dict(fa_deg=0.26), "radians"),
    (dict(tr_s=5.0), "milliseconds"),
    (dict(t10_s=1000.0), "milliseconds"),
    (dict(baseline_frames=10), "no post-contrast"),
    (dict(baseline_frames=0), "at least 1"),
    (dict(r1_per_mM_s=4500.0), "not plausible"),
    (dict(t10_s=np.ones((2,))), "does not match"),
])
def test_inversion_input_errors(kwargs, match):
    args = dict(signal=np.ones((3, 10)), t10_s=1.0, fa_deg=15.0, tr_s=TR, r1_per_mM_s=4.0, baseline_frames=2)
    args.update(kwargs)
    with pytest.raises(DCEPKInputError, match=match):
        signal_to_concentration(**args)


def _enhancing_curve(n_t, arrival, rng, sigma_rel):
    from DCEPKFittingLib.kinetics.aif import parker_aif
    t = np.arange(n_t) * 4.0
    conc = 0.5 * parker_aif(t, delay_s=arrival * 4.0)
    clean = _render(conc, 1.4, 20.0, 4.0)
    return clean, clean + rng.normal(0, sigma_rel * clean[0], clean.shape)


@pytest.mark.parametrize("arrival", [1, 4, 10, 25])
@pytest.mark.parametrize("sigma_rel", [0.0, 0.02, 0.05])
def test_detect_baseline_frames(arrival, sigma_rel):
    rng = np.random.default_rng(arrival)
    clean, noisy = _enhancing_curve(60, arrival, rng, sigma_rel)
    n = detect_baseline_frames(noisy)
    enhancement = clean - clean[0]
    # Never counts a clearly enhanced frame as baseline (the arrival frame of the Parker curve
    # holds under 3 % of the peak, within the noise), never misses more than one frame.
    assert np.all(enhancement[:n] <= 0.03 * enhancement.max())
    assert arrival - 1 <= n <= arrival + 1
    if sigma_rel == 0:
        assert n == arrival   # every frame before the first that rises at all


def test_detect_baseline_frames_on_series_and_used_by_inversion():
    rng = np.random.default_rng(7)
    clean, _ = _enhancing_curve(50, 8, rng, 0.0)
    series = np.broadcast_to(clean, (2, 3, 4, 50)) * rng.uniform(0.5, 2.0, (2, 3, 4, 1))
    series = series + rng.normal(0, 0.01 * clean[0], series.shape)
    n = detect_baseline_frames(series)
    assert 6 <= n <= 8
    conc, valid = signal_to_concentration(series, 1.4, 20.0, TR, 4.0)
    conc_n, _ = signal_to_concentration(series, 1.4, 20.0, TR, 4.0, baseline_frames=n)
    np.testing.assert_allclose(conc, conc_n)
    with pytest.raises(DCEPKInputError, match="at least 3 frames"):
        detect_baseline_frames(np.ones(2))
    flat = 100 + np.random.default_rng(0).normal(0, 1, 40)
    with pytest.raises(DCEPKInputError, match="no contrast arrival"):
        detect_baseline_frames(flat)


def test_relaxivity_table():
    # Rohrer et al. 2005 plasma values, 37 C.
    assert default_r1() == 3.5
    assert default_r1("Gadovist", 1.5) == 5.2
    assert default_r1("gadobenate", 3) == 5.5
    assert set(RELAXIVITY_R1) == {"gadoterate", "gadobutrol", "gadopentetate", "gadoteridol", "gadobenate"}
    for values in RELAXIVITY_R1.values():
        assert values[1.5] >= values[3.0] > 3.0  # r1 falls with field for these small agents
    with pytest.raises(DCEPKInputError, match="unknown contrast agent"):
        default_r1("water")
    with pytest.raises(DCEPKInputError, match="1.5 T and 3 T"):
        default_r1("gadoterate", 7.0)


def test_progress_and_cancel():
    import threading
    from DCEPKFittingLib.core.errors import JobCancelledError
    sig = _render(np.zeros((3, 4, 10)), 1.0, 15.0, 4.0)
    seen = []
    signal_to_concentration(sig, 1.0, 15.0, TR, 4.0, baseline_frames=2, progress=lambda f, m: seen.append(f))
    assert seen and seen[-1] == 1.0
    stop = threading.Event()
    stop.set()
    with pytest.raises(JobCancelledError):
        signal_to_concentration(sig, 1.0, 15.0, TR, 4.0, baseline_frames=2, cancel=stop)
    with pytest.raises(JobCancelledError):
        fit_vfa_t1(np.ones((3, 2)) * [5.0, 9.0], [3.0, 10.0], TR, cancel=stop)


def test_float32_series_is_converted_in_double_precision():
    rng = np.random.default_rng(9)
    conc = np.zeros((50, 20))
    conc[:, 4:] = rng.uniform(0, 5, (50, 16))
    sig = _render(conc, 1.2, 20.0, 4.0)
    got32, _ = signal_to_concentration(sig.astype(np.float32), 1.2, 20.0, TR, 4.0, baseline_frames=4)
    assert got32.dtype == np.float64
    np.testing.assert_allclose(got32, conc, atol=1e-4)   # float32 rounding of the signal only


@pytest.mark.parametrize("tr_s", [0.0005, 0.004, 0.01])
def test_float32_arithmetic_stays_within_1e4_mM_of_double(tr_s):
    """dtype=float32 (the networks' input): the documented bound over tissue-to-vessel concentrations."""
    rng = np.random.default_rng(10)
    conc = np.zeros((400, 30))
    conc[:, 5:] = rng.uniform(0, 20, (400, 25))
    t10 = rng.uniform(0.3, 3.0, 400)
    sig = spgr_signal(1000.0, 1 / t10[:, None] + 4.0 * conc, 20.0, tr_s)
    got64, ok64 = signal_to_concentration(sig, t10, 20.0, tr_s, 4.0, baseline_frames=5)
    got32, ok32 = signal_to_concentration(sig, t10, 20.0, tr_s, 4.0, baseline_frames=5, dtype=np.float32)
    assert got32.dtype == np.float32 and ok32.all() and ok64.all()
    np.testing.assert_allclose(got64, conc, atol=1e-9)
    np.testing.assert_allclose(got32, got64, atol=1e-4)
    with pytest.raises(DCEPKInputError, match="float32 or float64"):
        signal_to_concentration(sig, t10, 20.0, tr_s, 4.0, baseline_frames=5, dtype=np.int16)


@pytest.mark.parametrize("artery_share", ["blood rows", "one artery row among much tissue"])
def test_baseline_of_a_quantised_low_signal_series_with_a_slow_upslope(artery_share):
    """Small whole-number signals (artery baseline 15, tissue 20 a.u., noise SD 1), 1 s frames and
    a dispersed bolus arriving half a frame before frame 10: no baseline frame may hold upslope,
    i.e. an artery signal risen by more than 1 % of its peak rise, and at most one pre-contrast
    frame may be lost. (The earlier threshold detector took 12 frames when the artery was a small
    share of the enhancing voxels: its frames 10 and 11 had risen by 0.4 % and 1.6 %.)"""
    import noisy_tofts_reference as reference
    ref = reference.build(seed=4, tissue_baseline=20.0, blood_baseline=15.0, noise_sd=1.0, quantise=True,
                          dispersion_s=5.0, frame_s=1.0)
    signal = ref.signal if artery_share == "blood rows" else \
        np.concatenate([ref.signal[:, 10:70]] * 3 + [ref.signal[:, 70:71]], axis=1)
    clean = reference.build(noise=False, tissue_baseline=20.0, blood_baseline=15.0, noise_sd=1.0,
                            dispersion_s=5.0, frame_s=1.0).signal[0, 75, 25]
    rise = (clean - clean[0]) / (clean.max() - clean[0])
    n = detect_baseline_frames(signal, times_s=ref.times_s)
    assert np.all(rise[:n] <= 0.01), (n, np.round(rise[:n + 1], 4))
    assert reference.BASELINE_FRAMES - 1 <= n
    assert np.all(signal == np.round(signal))   # it really is whole numbers


def test_baseline_ignores_flicker_of_burnt_in_text():
    # a few voxels whose value jumps by thousands every other frame (a frame counter) outrank the
    # artery by their range: they must not set the baseline
    rng = np.random.default_rng(2)
    clean, noisy = _enhancing_curve(60, 12, rng, 0.01)
    series = np.broadcast_to(noisy, (1, 20, 20, 60)).copy()
    series[0, 0, :] = 6000 + 2000 * rng.integers(0, 2, size=(20, 30)).repeat(2, axis=-1)
    assert detect_baseline_frames(series) == 12


def test_noise_level_from_the_baseline_frames_at_known_snr():
    """sigma (per quadrature channel) from the baseline frames of a magnitude image holding air,
    a dark vessel (SNR 1.5) and tissue (SNR 20): within 5 %; the vessel's second-moment baseline
    is unbiased where its mean is 25 % high."""
    from DCEPKFittingLib.signal import rician
    rng = np.random.default_rng(8)
    sigma, frames = 3.0, 10
    level = np.concatenate([np.zeros(3000), np.full(1000, 1.5 * sigma), np.full(4000, 20 * sigma)])
    magnitude = np.hypot(level[:, None] + rng.normal(0, sigma, (level.size, frames)),
                         rng.normal(0, sigma, (level.size, frames)))
    estimate = rician.estimate_noise_sigma(magnitude, frames)
    assert estimate == pytest.approx(sigma, rel=0.05)
    vessel = magnitude[3000:4000]
    assert vessel.mean() / (1.5 * sigma) > 1.2
    assert np.mean(rician.corrected_baseline(vessel, estimate) ** 2) == pytest.approx((1.5 * sigma) ** 2, rel=0.1)
    assert rician.estimate_noise_sigma(np.full((10, 8), 5.0), 8) == 0.0   # noise-free: no correction


def test_canonical_grid_uses_the_one_detector():
    from DCEPKInferenceLib.data import canonical_grid
    rng = np.random.default_rng(3)
    _, noisy = _enhancing_curve(60, 9, rng, 0.02)
    series = noisy * rng.uniform(0.8, 1.2, (50, 1))
    t = np.arange(60) * 4.0
    assert canonical_grid.estimate_baseline_frames(series, t) == detect_baseline_frames(series, times_s=t)
    flat = 100 + rng.normal(0, 1, (50, 60))
    assert canonical_grid.estimate_baseline_frames(flat, t) == 5   # nothing enhances: the first 20 s
    with pytest.raises(DCEPKInputError, match="no contrast arrival"):
        canonical_grid.estimate_baseline_frames(flat)
