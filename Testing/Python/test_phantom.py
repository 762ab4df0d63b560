"""Synthetic brain phantom: exact signal inversion, anatomy and truth, noise level, determinism,
input function, VFA rendering and files."""

import json

import numpy as np
import pytest

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.io import read_dce, read_volume
from DCEPKFittingLib.kinetics.aif import aif_from_roi, parker_aif
from DCEPKFittingLib.signal import detect_baseline_frames, fit_vfa_t1, signal_to_concentration
from DCEPKFittingLib.sims import phantom as phantom_module
from DCEPKFittingLib.sims.phantom import (LABEL_NAMES, NECROTIC_CORE, TUMOUR_RIM, VESSEL, WHITE_MATTER, Protocol,
                                          make_phantom, stream_phantom, write_phantom)

SMALL = (4, 48, 48)


@pytest.fixture(scope="module")
def clean64():
    return make_phantom(SMALL, snr=None, seed=3, dtype=np.float64, vfa_flip_angles_deg=(2, 5, 10, 15, 20))


def _invert(phantom):
    p = phantom.protocol
    return signal_to_concentration(phantom.series.signal, phantom.truth["T10"], p.fa_deg, p.tr_s,
                                   p.r1_per_mM_s, baseline_frames=p.baseline_frames)


def test_exact_inversion_recovers_concentration(clean64):
    conc, valid = _invert(clean64)
    tissue = clean64.labels > 0
    assert valid[tissue].all()
    assert not valid[~tissue].any()   # background has no signal: flagged, never a number
    np.testing.assert_allclose(conc[tissue], clean64.concentration_mM[tissue], atol=1e-6, rtol=0)
    assert clean64.concentration_mM[clean64.labels == TUMOUR_RIM].max() > 0.3  # something to recover


def test_float32_storage_limits_the_round_trip():
    phantom = make_phantom(SMALL, snr=None, seed=3)
    assert phantom.series.signal.dtype == np.float32
    conc, _ = _invert(phantom)
    tissue = phantom.labels > 0
    np.testing.assert_allclose(conc[tissue], phantom.concentration_mM[tissue], atol=2e-5, rtol=0)


def test_labels_truth_and_masks(clean64):
    ph = clean64
    assert ph.labels.shape == SMALL and ph.labels.dtype == np.uint8
    assert ph.series.signal.shape == SMALL + (ph.protocol.n_frames,)
    assert set(np.unique(ph.labels)) == set(LABEL_NAMES)          # every tissue is present
    assert ph.label_names == {v: n for v, n in LABEL_NAMES.items() if v != 0}
    for name in ("Ktrans", "ve", "vp", "kep", "T10", "S0"):
        assert ph.truth[name].shape == SMALL
    stacked = np.sum([m.astype(int) for m in ph.tissue_masks.values()], axis=0)
    np.testing.assert_array_equal(stacked, (ph.labels > 0).astype(int))  # masks partition the tissue
    np.testing.assert_array_equal(ph.aif_mask, ph.labels == VESSEL)
    rim = ph.labels == TUMOUR_RIM
    assert np.mean(ph.truth["Ktrans"][rim]) == pytest.approx(0.12, rel=0.02)  # set mean, textured
    assert np.std(ph.truth["Ktrans"][rim]) > 0.01                   # texture is there
    positive_ve = ph.truth["ve"] > 0
    np.testing.assert_allclose(ph.truth["kep"][positive_ve],
                               ph.truth["Ktrans"][positive_ve] / ph.truth["ve"][positive_ve])
    assert np.all(ph.truth["ve"] + ph.truth["vp"] <= 1.0)
    assert np.all(np.isnan(ph.truth["T10"][ph.labels == 0]))
    assert ph.truth["T10"][ph.labels == NECROTIC_CORE].mean() > ph.truth["T10"][ph.labels == WHITE_MATTER].mean()
    no_texture = make_phantom(SMALL, snr=None, seed=3, texture=False)
    assert np.all(no_texture.truth["Ktrans"][no_texture.labels == TUMOUR_RIM] == pytest.approx(0.12))


def test_tissue_curve_matches_independent_extended_tofts(clean64):
    # Extended Tofts by brute-force numerical convolution on a fine grid, cp linear between frames.
    ph = clean64
    t = ph.series.times_s
    voxel = tuple(np.argwhere(ph.labels == TUMOUR_RIM)[0])
    ktrans, ve, vp = (ph.truth[n][voxel] / (60.0 if n == "Ktrans" else 1.0) for n in ("Ktrans", "ve", "vp"))
    fine = np.linspace(0, t[-1], 200001)
    cp = np.interp(fine, t, ph.aif_plasma_mM)
    dt = fine[1] - fine[0]
    expected = []
    for tn in t:
        upto = fine <= tn + 1e-12
        kernel = np.exp(-(ktrans / ve) * (tn - fine[upto]))
        expected.append(vp * np.interp(tn, t, ph.aif_plasma_mM) + ktrans * np.trapezoid(cp[upto] * kernel, dx=dt))
    np.testing.assert_allclose(ph.concentration_mM[voxel], expected, atol=1e-5, rtol=1e-4)


def test_input_function_is_the_population_aif_in_the_vessel(clean64):
    ph = clean64
    t = ph.series.times_s
    np.testing.assert_allclose(ph.aif_blood_mM, parker_aif(t, delay_s=t[ph.protocol.baseline_frames]), rtol=1e-12)
    np.testing.assert_allclose(ph.aif_plasma_mM, ph.aif_blood_mM / (1 - ph.protocol.hct), rtol=1e-12)
    assert np.all(ph.aif_blood_mM[: ph.protocol.baseline_frames] == 0)
    np.testing.assert_allclose(aif_from_roi(ph.concentration_mM, ph.aif_mask), ph.aif_blood_mM, atol=1e-12)
    # and through the signal: render, invert, average the vessel ROI
    conc, _ = _invert(ph)
    np.testing.assert_allclose(aif_from_roi(conc, ph.aif_mask), ph.aif_blood_mM, atol=1e-6)


@pytest.mark.parametrize("snr", [10.0, 40.0])
def test_noise_matches_requested_snr(snr):
    noisy = make_phantom((4, 64, 64), snr=snr, seed=5)
    clean = make_phantom((4, 64, 64), snr=None, seed=5)   # same anatomy: noise is drawn last
    nb = noisy.protocol.baseline_frames
    wm = clean.labels == WHITE_MATTER
    wm_signal = clean.series.signal[wm][:, :nb].mean()
    # Background magnitude is Rayleigh: E[M^2] = 2 sigma^2, independent of the phantom's own sigma.
    background = noisy.series.signal[clean.labels == 0].astype(np.float64)
    sigma_hat = np.sqrt(np.mean(background ** 2) / 2.0)
    assert sigma_hat == pytest.approx(noisy.noise_sigma, rel=0.01)
    assert wm_signal / sigma_hat == pytest.approx(snr, rel=0.02)
    # In white matter the Rician magnitude's spread is close to sigma (exactly so as SNR grows).
    spread = np.std(noisy.series.signal[wm][:, :nb] - clean.series.signal[wm][:, :nb])
    assert spread == pytest.approx(sigma_hat, rel=0.05 if snr > 20 else 0.1)


@pytest.mark.parametrize("snr", [None, 15.0])
def test_baseline_detected_on_the_phantom(snr):
    ph = make_phantom(SMALL, snr=snr, seed=4)
    # Never an enhanced frame in the baseline; at most the one frame of safety margin short.
    assert detect_baseline_frames(ph.series.signal) in (ph.protocol.baseline_frames - 1, ph.protocol.baseline_frames)


def test_determinism_with_seed():
    a = make_phantom(SMALL, seed=11, vfa_flip_angles_deg=(3, 15))
    b = make_phantom(SMALL, seed=11, vfa_flip_angles_deg=(3, 15))
    c = make_phantom(SMALL, seed=12, vfa_flip_angles_deg=(3, 15))
    np.testing.assert_array_equal(a.series.signal, b.series.signal)
    np.testing.assert_array_equal(a.vfa.signals, b.vfa.signals)
    np.testing.assert_array_equal(a.labels, b.labels)
    for name in a.truth:
        np.testing.assert_array_equal(a.truth[name], b.truth[name])
    assert not np.array_equal(a.series.signal, c.series.signal)
    assert not np.array_equal(a.truth["Ktrans"], c.truth["Ktrans"])


def test_vfa_series_gives_t10(clean64):
    vfa = clean64.vfa
    assert vfa.signals.shape == SMALL + (5,)
    t1, _, _ = fit_vfa_t1(vfa.signals, vfa.flip_angles_deg, vfa.tr_s, method="linear")
    tissue = clean64.labels > 0
    np.testing.assert_allclose(t1[tissue], clean64.truth["T10"][tissue], rtol=1e-6)


def test_protocol_options():
    times = np.concatenate([np.arange(0, 30, 3.0), 30 + np.arange(1, 41) * 6.0])
    protocol = Protocol(times_s=times, baseline_frames=4, fa_deg=20, field_T=1.5, aif="georgiou", hct=0.4)
    assert protocol.r1_per_mM_s == 3.6           # gadoterate at 1.5 T (Rohrer 2005)
    ph = make_phantom(SMALL, protocol=protocol, snr=None, seed=0,
                      lesions=[dict(center_mm=(0, 0, 15.0), radius_mm=12.0)])
    np.testing.assert_array_equal(ph.series.times_s, times)
    assert ph.series.flip_angle_deg == 20
    assert np.all(ph.aif_blood_mM[:4] == 0) and ph.aif_blood_mM[5] > 0
    assert ph.lesions[0]["radius_mm"] == 12.0
    assert np.any(ph.labels == TUMOUR_RIM)
    assert np.median(ph.truth["T10"][ph.labels == WHITE_MATTER]) == pytest.approx(0.65, rel=0.05)


CUSTOM_TISSUES = {TUMOUR_RIM: dict(Ktrans=0.25, ve=0.55, vp=0.40), NECROTIC_CORE: dict(Ktrans=0.02, ve=0.70, vp=0.20)}


def test_custom_tissue_properties_are_the_maps_and_stay_physical():
    """Issue 19: vp was divided by the ve already rescaled, so where the texture took ve + vp above 0.99
    it stayed above (and above 1 in places). Without texture the maps are the given properties; with it each
    voxel's ve + vp is at most 0.99 and the tissue's median is the given value."""
    lesion = [dict(center_mm=(0, 0, 20.0), radius_mm=30.0, core_fraction=0.5)]
    flat = make_phantom(SMALL, snr=None, texture=False, lesions=lesion, tissue_properties=CUSTOM_TISSUES)
    textured = make_phantom(SMALL, snr=None, seed=4, lesions=lesion, tissue_properties=CUSTOM_TISSUES)
    for label, properties in CUSTOM_TISSUES.items():
        inside = flat.labels == label
        assert inside.sum() > 20, LABEL_NAMES[label]
        for name, value in properties.items():
            np.testing.assert_allclose(flat.truth[name][inside], value, rtol=1e-12, err_msg=name)
            median = np.median(textured.truth[name][textured.labels == label])
            assert median == pytest.approx(value, rel=0.1), (LABEL_NAMES[label], name)
    for ph in (flat, textured):
        assert np.all(ph.truth["ve"] + ph.truth["vp"] <= phantom_module.MAX_VOLUME_FRACTION + 1e-12)
    rim = textured.labels == TUMOUR_RIM
    assert np.any(textured.truth["ve"][rim] + textured.truth["vp"][rim] > 0.98)   # the cap was needed
    with pytest.raises(DCEPKInputError, match="ve \\+ vp = 1.1"):
        make_phantom(SMALL, tissue_properties={TUMOUR_RIM: dict(ve=0.8, vp=0.3)})


@pytest.mark.parametrize("call, match", [
    (lambda: make_phantom((4, 8, 8)), "16 x 16"),
    (lambda: make_phantom(SMALL, snr=-3), "snr"),
    (lambda: Protocol(n_frames=5, baseline_frames=5), "5 pre-contrast"),
    (lambda: Protocol(tr_s=5.0), "milliseconds"),
    (lambda: Protocol(aif="unknown"), "unknown AIF"),
    (lambda: make_phantom(SMALL, lesions=[dict(radius_mm=5)]), "center_mm"),
])
def test_input_errors(call, match):
    with pytest.raises(DCEPKInputError, match=match):
        call()


def test_write_phantom_round_trip(tmp_path):
    ph = make_phantom(SMALL, seed=2, vfa_flip_angles_deg=(2, 15))
    out = tmp_path / "phantom"
    written = write_phantom(ph, out)
    assert all(p.exists() for p in written)
    series = read_dce(out / "dce.seq.nrrd")
    np.testing.assert_allclose(series.signal, ph.series.signal)
    np.testing.assert_allclose(series.times_s, ph.series.times_s)
    assert series.flip_angle_deg == pytest.approx(15.0) and series.tr_s == pytest.approx(0.005)
    labels, geometry = read_volume(out / "labels.nii.gz")
    np.testing.assert_array_equal(labels, ph.labels)
    assert geometry.is_close(ph.series.geometry)
    ktrans, _ = read_volume(out / "truth" / "Ktrans.nii.gz")
    np.testing.assert_allclose(ktrans, ph.truth["Ktrans"], rtol=1e-6)
    fa2, _ = read_volume(out / "vfa" / "fa2.nii.gz")
    np.testing.assert_allclose(fa2, ph.vfa.signals[..., 0], rtol=1e-6)
    description = json.loads((out / "protocol.json").read_text())
    assert description["protocol"]["r1_per_mM_s"] == ph.protocol.r1_per_mM_s
    csv_rows = (out / "aif_blood.csv").read_text().splitlines()
    assert len(csv_rows) == ph.series.n_frames + 1
    before = (out / "labels.txt").read_text()
    with pytest.raises(DCEPKInputError, match="already exist"):
        write_phantom(ph, out)
    assert (out / "labels.txt").read_text() == before
    assert len(write_phantom(ph, out, overwrite=True)) == len(written)


def test_streamed_phantom_writes_the_same_files_as_the_phantom_in_memory(tmp_path, monkeypatch):
    """``dcepk phantom`` renders the series slab by slab straight into its file; one slice per slab
    here, so the slab seams and the noise generators' hand-over are exercised."""
    kwargs = dict(shape=(3, 32, 24), seed=9, snr=20.0, vfa_flip_angles_deg=(3.0, 12.0),
                  protocol=Protocol(n_frames=12, frame_time_s=3.0, baseline_frames=3))
    write_phantom(make_phantom(**kwargs), tmp_path / "whole")
    monkeypatch.setattr(phantom_module, "_slab_slices", lambda model: 1)
    streamed = make_phantom(**kwargs)
    stream_phantom(tmp_path / "streamed", **kwargs)
    whole = {p.relative_to(tmp_path / "whole"): p.read_bytes() for p in (tmp_path / "whole").rglob("*") if p.is_file()}
    files = {p.relative_to(tmp_path / "streamed"): p.read_bytes() for p in (tmp_path / "streamed").rglob("*")
             if p.is_file()}
    assert files == whole and len(files) == 14  # series, labels, names, AIF mask and CSV, protocol, 6 truths, 2 VFA
    np.testing.assert_array_equal(streamed.series.signal, read_dce(tmp_path / "whole" / "dce.seq.nrrd").signal)
    # the noise: Rician, with the sigma of the white matter's pre-contrast signal and the SNR
    assert streamed.noise_sigma > 0 and not np.array_equal(streamed.series.signal,
                                                             make_phantom(**dict(kwargs, snr=None)).series.signal)
