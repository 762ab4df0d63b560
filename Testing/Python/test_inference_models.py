"""Shipped weights (checksums, model-card metrics), run_inference / dcepk infer, training resume."""

import dataclasses
import shutil
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from DCEPKFittingLib.core.errors import DCEPKInputError, JobCancelledError
from DCEPKFittingLib.io import read_volume, write_dce_series, write_maps
from DCEPKFittingLib.kinetics.fit_result import FitStatus
from DCEPKFittingLib.pipeline.input_function import InputFunctionSpec
from DCEPKFittingLib.sims.phantom import TUMOUR_RIM, WHITE_MATTER, Protocol, make_phantom
from DCEPKInferenceLib import training
from DCEPKInferenceLib.data import simulator
from DCEPKInferenceLib.nn.model_store import (DEFAULT_MODELS_DIR, list_models, load_model, model_mode, read_card,
                                              sha256_of, training_totals)
from DCEPKInferenceLib.nn.networks import NETWORKS
from DCEPKInferenceLib.pipeline.inference import protocol_outside_training, run_inference
from DCEPKInferenceLib.workflows.infer_command import infer_main

torch.set_num_threads(1)
SHIPPED = sorted(card["name"] for card in list_models())    # every network's own model, and any variants
NETWORK_OF = {card["name"]: card["network"] for card in list_models()}
AIF_FREE = sorted(card["name"] for card in list_models() if model_mode(card) == "aif_free")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(2, 48, 48), snr=40.0, seed=11)


def test_every_network_is_shipped_with_a_complete_card():
    cards = {card["name"]: card for card in list_models()}
    assert set(NETWORKS) <= set(cards) and set(NETWORK_OF.values()) - {"aif_reader"} == set(NETWORKS)
    for name, card in cards.items():
        if name not in AIF_FREE:   # an AIF-conditioned card's contents: test_conditioned_models
            assert sha256_of(DEFAULT_MODELS_DIR / f"{name}.safetensors") == card["sha256"]
            continue
        weights = DEFAULT_MODELS_DIR / f"{name}.safetensors"
        assert sha256_of(weights) == card["sha256"]
        assert weights.stat().st_size < 20e6
        for key in ("architecture", "network_config", "simulator_ranges", "training", "validation",
                    "date_utc", "code_version", "uncertainty", "check"):
            assert key in card, f"{name} card lacks {key}"
        assert card["training"]["steps"] >= 1 and card["simulator_ranges"]["Ktrans_per_min"]["range"] == [0.0, 1.5]


@pytest.mark.parametrize("name", AIF_FREE)
def test_aif_free_model_beats_the_prior_mean_on_fresh_simulated_truth(name):
    """Truth from subjects no card or training used (seed 424243), against the uninformed predictor:
    no number written by the training code is compared with."""
    model, _ = load_model(name, "cpu")
    rng = np.random.default_rng(424_243)
    batch = training.to_torch(simulator.sample_voxels(rng, 8, 64) if model.kind == "voxel"
                              else simulator.sample_patches(rng, 4, 32), "cpu")
    mean, _, truth, _ = training.predict_batch(model, batch)
    error = np.sqrt(np.mean((mean[:, 0] - truth[:, 0]) ** 2))
    prior_mean = simulator.sample_tissue_params(np.random.default_rng(0), 200_000)[:, 0].mean()
    assert error < 0.8 * np.sqrt(np.mean((truth[:, 0] - prior_mean) ** 2))
    assert error < 0.8 * np.sqrt(np.mean(truth[:, 0] ** 2))          # an all-zero map


def test_corrupt_missing_and_unknown_weights_give_clear_errors(tmp_path):
    name = "hetero_encoder"
    for suffix in (".json", ".safetensors"):
        shutil.copy(DEFAULT_MODELS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    model, _ = load_model(name, "cpu", tmp_path)                    # intact copy loads
    weights = tmp_path / f"{name}.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DCEPKInputError, match="corrupt"):
        load_model(name, "cpu", tmp_path)
    weights.unlink()
    with pytest.raises(DCEPKInputError, match="missing"):
        load_model(name, "cpu", tmp_path)
    with pytest.raises(DCEPKInputError, match="no model 'nonexistent'"):
        load_model("nonexistent", "cpu", tmp_path)


@pytest.mark.parametrize("name", AIF_FREE)   # AIF-conditioned models on the phantom: test_conditioned_models
def test_run_inference_on_a_phantom(name, phantom):
    mask = phantom.labels > 0
    result = run_inference(phantom.series, name, mask=mask, device="cpu", t10_s=phantom.truth["T10"])
    assert set(result.maps) == {"Ktrans", "ve", "vp", "kep", "Ktrans_sd", "ve_sd", "vp_sd", "kep_sd", "status"}
    assert result.geometry.is_close(phantom.series.geometry)
    assert result.units["Ktrans"] == "1/min" and result.units["kep_sd"] == "1/min"
    assert result.uncertainty == "sd" and result.uncertainty_of("ve") is result.maps["ve_sd"]
    np.testing.assert_array_equal(result.status, np.where(mask, FitStatus.FITTED, FitStatus.MASKED))
    for key, value in result.maps.items():
        if key == "status":
            continue
        assert value.shape == phantom.series.spatial_shape, key
        assert np.all(np.isfinite(value[mask])), key
        assert np.all(value[~mask] == 0), key
    for key in ("Ktrans_sd", "ve_sd", "vp_sd", "kep_sd"):
        assert np.all(result.maps[key][mask] > 0), key
    assert abs(result.baseline_frames - phantom.protocol.baseline_frames) <= 1


@pytest.mark.parametrize("name", [n for n in SHIPPED
                                  if NETWORK_OF[n] in NETWORKS and NETWORKS[NETWORK_OF[n]].kind == "slice"])
def test_a_2d_network_reads_no_signal_outside_the_mask(name, phantom):
    """The margin around the mask enters as flat tissue at the slice's noise level, not as its own
    signal: another signal and T10 there (a strongly enhancing curve, no T10) change no map inside."""
    mask = phantom.labels > 0
    mask[:, :, 30:] = False                                    # tissue in the margin of the crop too
    t10 = phantom.truth["T10"].copy()
    kwargs = dict(mask=mask, device="cpu", baseline_frames=phantom.protocol.baseline_frames)
    margin = ~mask
    if model_mode(read_card(name)) == "aif_conditioned":
        # a population input function: an ROI's would change with the margin (its Rician correction
        # takes the noise from the background, by design)
        kwargs["input_function"] = InputFunctionSpec(population_aif="parker")
    plain = run_inference(phantom.series, name, t10_s=t10, **kwargs)
    signal = phantom.series.signal.copy()
    signal[margin] *= np.linspace(1.0, 3.0, signal.shape[-1])
    t10[margin] = np.nan
    other = run_inference(dataclasses.replace(phantom.series, signal=signal), name, t10_s=t10, **kwargs)
    for key in plain.maps:
        np.testing.assert_array_equal(other.maps[key], plain.maps[key], err_msg=key)
    assert np.all(plain.maps["ve"][mask] > 0) and np.all(plain.maps["Ktrans_sd"][mask] > 0)


def test_a_protocol_outside_the_training_ranges_is_said(phantom):
    card = read_card("hetero_encoder")
    assert card["simulator_ranges"]["n_frames"] == [30, 150]
    assert protocol_outside_training(np.arange(60) * 5.0, card) is None
    coarse = protocol_outside_training(np.arange(20) * 16.0, card)
    assert "20 frames (trained on 30-150)" in coarse
    assert "frame interval of 16 s over the first 40% of the frames (trained on 1.5-15 s)" in coarse
    fast = protocol_outside_training(np.arange(200) * 1.2, card)
    assert "200 frames" in fast and "1.2 s" in fast
    slow = protocol_outside_training(np.arange(60) * 16.0, card)
    assert "16 s" in slow and "60 frames" not in slow           # only what is outside is named
    # two-rate series were trained with the interval doubled after 40 % of the frames: 12 s then 24 s
    # (median of all intervals 24 s) is inside; 16 s then 32 s is not
    two_rate = lambda first_s: np.cumsum(np.r_[0.0, np.full(20, first_s), np.full(30, 2 * first_s)])
    assert protocol_outside_training(two_rate(12.0), card) is None
    assert "frame interval of 16 s" in protocol_outside_training(two_rate(16.0), card)
    result = run_inference(phantom.series, "hetero_encoder", device="cpu", t10_s=phantom.truth["T10"])
    assert not any("outside the training ranges" in note for note in result.messages)


def test_frame_times_outside_the_training_ranges_get_the_sd_recalibrated_to_them():
    """20 frames 16 s apart (both outside the training ranges): the recalibrated 90 % interval covers
    ~90 % of an independent simulated set with those frame times; run_inference applies exactly those
    factors to the SD and leaves the mean alone."""
    times = np.arange(20) * 16.0
    model, card = load_model("hetero_encoder")
    factors = training.calibrate_to_protocol(model, times)
    np.testing.assert_allclose(model.config["sd_scale"], np.multiply(card["network_config"]["sd_scale"], factors))
    assert read_card("hetero_encoder")["network_config"]["sd_scale"] == card["network_config"]["sd_scale"]
    cancelled = threading.Event()
    cancelled.set()
    before = list(model.config["sd_scale"])
    with pytest.raises(JobCancelledError):
        training.calibrate_to_protocol(model, times, cancel=cancelled)
    assert model.config["sd_scale"] == before
    independent = simulator.sample_voxels(np.random.default_rng(31337), 48, 64, times_s=times)
    mean, sd, truth, _ = training.predict_batch(model, training.to_torch(independent, "cpu"))
    coverage = np.mean(np.abs(mean - truth) <= 1.6448536 * sd, axis=0)
    np.testing.assert_allclose(coverage, 0.9, atol=0.03)     # with the card's factors: 0.85-0.86

    short = make_phantom(shape=(1, 32, 32), protocol=Protocol(n_frames=20, frame_time_s=16.0, baseline_frames=3),
                         seed=2)
    runs = {on: run_inference(short.series, "hetero_encoder", device="cpu", t10_s=short.truth["T10"],
                              protocol_calibration=on) for on in (True, False)}
    for on, result in runs.items():
        said = [note for note in result.messages if "outside the training ranges" in note]
        assert len(said) == 1 and ("recalibrated" in said[0]) == on and ("too small" in said[0]) != on
    mask = runs[True].estimated
    for name, factor in zip(("Ktrans", "ve", "vp"), factors):
        np.testing.assert_array_equal(runs[True].maps[name], runs[False].maps[name])
        np.testing.assert_allclose(runs[True].maps[f"{name}_sd"][mask], factor * runs[False].maps[f"{name}_sd"][mask],
                                   rtol=1e-5)


def test_a_chunk_of_background_with_no_t10_is_not_an_error(phantom):
    """T10 maps have no value (NaN or 0) outside the head; a chunk of only such voxels (small chunks,
    or a whole slice of air) must read as no contrast there (concentration 0, Ktrans ~ 0) and leave
    the maps as with one chunk."""
    everything = np.ones(phantom.series.spatial_shape, bool)
    t10 = phantom.truth["T10"]
    no_t10 = ~(t10 > 0)
    assert no_t10.any() and not no_t10.all()
    one = run_inference(phantom.series, "hetero_encoder", mask=everything, device="cpu", t10_s=t10)
    small = run_inference(phantom.series, "hetero_encoder", mask=everything, device="cpu", t10_s=t10,
                          batch_voxels=64)
    assert np.all(small.maps["Ktrans"][no_t10] < 0.01)
    for key in one.maps:
        np.testing.assert_allclose(small.maps[key], one.maps[key], rtol=1e-5, atol=1e-6, err_msg=key)
    with pytest.raises(DCEPKInputError, match="no positive finite"):
        run_inference(phantom.series, "hetero_encoder", device="cpu", t10_s=np.zeros_like(t10))
    with pytest.raises(DCEPKInputError, match="milliseconds"):
        run_inference(phantom.series, "hetero_encoder", device="cpu", t10_s=t10 * 1000)


def test_voxel_network_recovers_phantom_tissue_contrast(phantom):
    """Independent truth: the phantom's tumour rim has Ktrans ~0.12 /min, white matter ~0.001.

    Without an AIF the absolute scale of Ktrans is known only through the population prior
    (the AIF amplitude varies about 3x in training), so the rim must be within a factor 2."""
    result = run_inference(phantom.series, "hetero_encoder", mask=phantom.labels > 0, device="cpu",
                           t10_s=phantom.truth["T10"], r1_per_mM_s=phantom.protocol.r1_per_mM_s)
    rim, wm = phantom.labels == TUMOUR_RIM, phantom.labels == WHITE_MATTER
    k_rim = np.median(result.maps["Ktrans"][rim])
    k_true = np.median(phantom.truth["Ktrans"][rim])
    assert 0.5 * k_true < k_rim < 2.0 * k_true
    assert np.median(result.maps["Ktrans"][wm]) < 0.3 * k_rim


def test_infer_command_writes_maps(tmp_path, phantom):
    series_path = write_dce_series(tmp_path / "series.nrrd", phantom.series)
    out = tmp_path / "maps"
    t10_path = write_maps(tmp_path / "t10", {"T10": phantom.truth["T10"]}, phantom.series.geometry)[0]
    args = [str(series_path), "--model", "hetero_encoder", "--out", str(out), "--device", "cpu", "--t10", str(t10_path),
            "--r1", str(phantom.protocol.r1_per_mM_s)]
    assert infer_main(args) == 0
    ktrans, geometry = read_volume(out / "Ktrans.nii.gz")
    assert ktrans.shape == phantom.series.spatial_shape and geometry.is_close(phantom.series.geometry, 1e-3)
    assert (out / "Ktrans_sd.nii.gz").is_file() and (out / "kep.nii.gz").is_file()
    with pytest.raises(DCEPKInputError, match="exist"):
        infer_main(args)
    t10_ms = write_maps(tmp_path / "t10_ms", {"T10": phantom.truth["T10"] * 1000}, phantom.series.geometry)[0]
    in_ms = [str(series_path), "--model", "hetero_encoder", "--out", str(tmp_path / "ms"), "--device", "cpu",
             "--t10", str(t10_ms), "--t10-unit", "ms", "--r1", str(phantom.protocol.r1_per_mM_s)]
    assert infer_main(in_ms) == 0                             # the same T10 in ms: the same maps
    np.testing.assert_allclose(read_volume(tmp_path / "ms" / "Ktrans.nii.gz")[0], ktrans, atol=1e-4)  # float32 map
    with pytest.raises(DCEPKInputError, match="T10 .*not known"):
        infer_main([str(series_path), "--out", str(tmp_path / "no_t10"), "--device", "cpu"])
    assert not (tmp_path / "no_t10").exists()


def test_auto_mask_and_cancel(phantom):
    result = run_inference(phantom.series, "hetero_encoder", device="cpu", t10_s=phantom.truth["T10"])
    brain = phantom.labels > 0
    assert (result.estimated & brain).sum() >= 0.9 * brain.sum()          # tissue kept
    assert (result.estimated & ~brain).sum() <= 0.02 * (~brain).sum()     # noise-only background dropped
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobCancelledError):
        run_inference(phantom.series, "hetero_encoder", device="cpu", cancel=cancel, t10_s=1.2)


def test_list_command(capsys):
    assert infer_main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in SHIPPED)
    map_networks = [c for c in list_models() if model_mode(c) != "aif_reader"]   # the reader makes no maps
    assert listed.count("trained on 30-150 frames, 1.5-15 s apart") == len(map_networks)   # the cards' ranges


def test_concentration_series_is_refused(phantom):
    series = phantom.series
    from DCEPKFittingLib.io import DCESeries
    conc = DCESeries(signal=series.signal, times_s=series.times_s, kind="concentration")
    with pytest.raises(DCEPKInputError, match="signal"):
        run_inference(conc, "hetero_encoder", t10_s=phantom.truth["T10"])


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    config = training.load_config("hetero_encoder")
    config["network_config"].update(members=2, width=4, hidden=8)
    config["training"].update(subjects_per_batch=2, voxels_per_subject=32, val_subjects=2,
                              val_voxels_per_subject=16, checkpoint_every=2, log_every=2)
    log = open("/dev/null", "w")
    straight = training.train("hetero_encoder", config, steps=4, device="cpu", out_dir=tmp_path / "a", log=log)

    class CancelAfterTwoSteps:  # the loop checks cancel once per step
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 2

    with pytest.raises(JobCancelledError):
        training.train("hetero_encoder", config, steps=4, device="cpu", out_dir=tmp_path / "b", log=log,
                       cancel=CancelAfterTwoSteps())
    partial = tmp_path / "b" / "hetero_encoder.checkpoint.pt"
    assert torch.load(partial, weights_only=True)["step"] == 2
    assert not (tmp_path / "b" / "hetero_encoder.safetensors").exists()   # cancelled: no weights
    resumed = training.train("hetero_encoder", config, steps=4, device="cpu", out_dir=tmp_path / "c",
                             resume=partial, log=log)
    a = load_file(str(tmp_path / "a" / "hetero_encoder.safetensors"))
    c = load_file(str(tmp_path / "c" / "hetero_encoder.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=1e-5, atol=1e-6)
    assert resumed["training"]["resumed_from_step"] == 2
    model, card = load_model("hetero_encoder", "cpu", tmp_path / "a")
    assert card["sha256"] == straight["sha256"] and card["training"]["steps"] == 4
    # a variant under its own name: the same run, in files and a card of that name beside the network's
    named = training.train("hetero_encoder", config, steps=4, device="cpu", out_dir=tmp_path / "a", log=log,
                           name="hetero_encoder_small")
    assert named["sha256"] == straight["sha256"] and named["name"] == "hetero_encoder_small"
    assert "--model hetero_encoder --name hetero_encoder_small --config" in named["retrain_command"]
    assert sorted(c["name"] for c in list_models(tmp_path / "a")) == ["hetero_encoder", "hetero_encoder_small"]
    assert load_model("hetero_encoder_small", "cpu", tmp_path / "a")[1]["network"] == "hetero_encoder"


def test_recalibration_covers_90_percent_of_a_set_it_was_not_fitted_on(tmp_path):
    config = training.load_config("hetero_encoder")
    config["network_config"].update(members=1, width=4, hidden=8, calibrate_sd=False)
    config["training"].update(subjects_per_batch=2, voxels_per_subject=32, val_subjects=8,
                              val_voxels_per_subject=64, log_every=2)
    trained = training.train("hetero_encoder", config, steps=2, device="cpu", out_dir=tmp_path,
                             log=open("/dev/null", "w"))
    assert trained["sd_calibration"] is None
    card = training.recalibrate("hetero_encoder", tmp_path, log=open("/dev/null", "w"))
    assert card["sha256"] == trained["sha256"]                       # the weights are untouched
    model, loaded = load_model("hetero_encoder", "cpu", tmp_path)
    assert loaded["network_config"]["sd_scale"] == card["sd_calibration"]["factors"]
    # coverage measured on fresh subjects of the same families, never on the calibration set itself
    fresh = training.to_torch(simulator.sample_voxels(np.random.default_rng(424_244), 128, 64), "cpu")
    mean, sd, truth, _ = training.predict_batch(model, fresh)
    coverage = np.mean(np.abs(mean - truth) <= 1.6448536 * sd, axis=0)
    assert np.all((coverage >= 0.85) & (coverage <= 0.95)), coverage
    model.config["sd_scale"] = [1.0, 1.0, 1.0]                      # the raw SD of a 2-step network does not
    mean, sd, truth, _ = training.predict_batch(model, fresh)
    assert np.any(np.abs(np.mean(np.abs(mean - truth) <= 1.6448536 * sd, axis=0) - 0.9) > 0.05)


def test_fine_tuning_starts_from_the_trained_weights_under_a_new_loss(tmp_path):
    config = training.load_config("hetero_encoder")
    config["network_config"].update(members=1, width=4, hidden=8, likelihood="laplace", nll_beta=0.0)
    config["training"].update(subjects_per_batch=2, voxels_per_subject=32, val_subjects=2,
                              val_voxels_per_subject=16, log_every=2)
    log = open("/dev/null", "w")
    first = training.train("hetero_encoder", config, steps=3, device="cpu", out_dir=tmp_path / "a", log=log)
    tuned_config = {**config, "network_config": {**config["network_config"], "likelihood": "gaussian",
                                                 "nll_beta": 1.0},
                    "training": {**config["training"], "lr": 0.0, "weight_decay": 0.0}}
    tuned = training.train("hetero_encoder", tuned_config, steps=2, device="cpu", out_dir=tmp_path / "b",
                           init_from=tmp_path / "a", log=log)
    a = load_file(str(tmp_path / "a" / "hetero_encoder.safetensors"))
    b = load_file(str(tmp_path / "b" / "hetero_encoder.safetensors"))
    assert a.keys() == b.keys()
    for key in a:   # learning rate 0: the fine-tuned weights are exactly the ones it started from
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert tuned["training"]["initialised_from"]["sha256"] == first["sha256"]
    assert tuned["training"]["initialised_from"]["likelihood"] == "laplace"
    assert tuned["network_config"]["likelihood"] == "gaussian"
    assert training_totals(tuned) == (3 + 2, pytest.approx(first["training"]["wall_s"] + tuned["training"]["wall_s"]))
    wider = {**config, "network_config": {**config["network_config"], "width": 6}}
    with pytest.raises(DCEPKInputError, match="another architecture"):
        training.train("hetero_encoder", wider, steps=1, device="cpu", out_dir=tmp_path / "c",
                       init_from=tmp_path / "a", log=log)
    with pytest.raises(DCEPKInputError, match="must match"):    # hidden may grow, width not with it
        training.train("hetero_encoder", {**wider, "network_config": {**wider["network_config"], "hidden": 12}},
                       steps=1, device="cpu", out_dir=tmp_path / "c", init_from=tmp_path / "a", log=log)
    with pytest.raises(DCEPKInputError, match="exclude each other"):
        training.train("hetero_encoder", config, steps=1, device="cpu", out_dir=tmp_path / "d",
                       init_from=tmp_path / "a", resume=tmp_path / "a" / "hetero_encoder.checkpoint.pt", log=log)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_a_wider_hidden_layer_starts_from_the_same_function(tmp_path):
    """--init-from into a larger ``hidden``: the trained weights are embedded, the network's output
    is unchanged at the start (learning rate 0 here), and the new units are trainable."""
    config = training.load_config("hetero_encoder")
    config["network_config"].update(members=2, width=4, hidden=8)
    config["training"].update(subjects_per_batch=2, voxels_per_subject=32, val_subjects=2,
                              val_voxels_per_subject=16, log_every=2)
    log = open("/dev/null", "w")
    training.train("hetero_encoder", config, steps=3, device="cpu", out_dir=tmp_path / "a", log=log)
    grown_config = {"network_config": {**config["network_config"], "hidden": 12},
                    "training": {**config["training"], "lr": 0.0, "weight_decay": 0.0}}
    card = training.train("hetero_encoder", grown_config, steps=1, device="cpu", out_dir=tmp_path / "b",
                          init_from=tmp_path / "a", log=log)
    assert card["training"]["initialised_from"]["grown"] == {"hidden": [8, 12]}
    narrow, _ = load_model("hetero_encoder", "cpu", tmp_path / "a")
    wide, _ = load_model("hetero_encoder", "cpu", tmp_path / "b")
    assert wide.members[0].mlp[3].weight.shape == (12, 24)
    batch = training.check_batch("voxel")
    with torch.no_grad():
        outputs = [model(batch["curves"], batch["valid"], batch["protocol"]) for model in (narrow, wide)]
    for (m_narrow, s_narrow), (m_wide, s_wide) in zip(*outputs):
        torch.testing.assert_close(m_wide, m_narrow, rtol=0, atol=1e-6)
        torch.testing.assert_close(s_wide, s_narrow, rtol=0, atol=1e-6)
    new_units = wide.members[0].mlp[3].weight[8:]
    assert torch.any(new_units != 0)                             # new units are live, not dead copies


def test_fine_tuning_can_add_the_aleatoric_head_and_keeps_every_trained_weight(tmp_path):
    config = training.load_config("tcn_punet")
    config["network_config"].update(tcn_channels=4, features=4, unet=4, latent=2, n_samples=2, calibrate_sd=False,
                                    aleatoric_head=False)
    config["training"].update(patches_per_batch=1, patch_size=16, val_patches=1, log_every=1)
    log = open("/dev/null", "w")
    first = training.train("tcn_punet", config, steps=1, device="cpu", out_dir=tmp_path / "a", log=log)
    with_head = {"network_config": {**config["network_config"], "aleatoric_head": True},
                 "training": {**config["training"], "lr": 0.0, "weight_decay": 0.0}}
    card = training.train("tcn_punet", with_head, steps=1, device="cpu", out_dir=tmp_path / "b",
                          init_from=tmp_path / "a", log=log)
    origin = card["training"]["initialised_from"]
    assert origin["sha256"] == first["sha256"] and origin["added"] == ["aleatoric_head"]
    assert "added Gaussian head" in card["uncertainty"] and "added Gaussian head" not in first["uncertainty"]
    a = load_file(str(tmp_path / "a" / "tcn_punet.safetensors"))
    b = load_file(str(tmp_path / "b" / "tcn_punet.safetensors"))
    new_keys = set(b) - set(a)
    assert new_keys and all(k.startswith("scale_head.") for k in new_keys) and set(a) <= set(b)
    for key in a:   # learning rate 0: every trained weight is the one it started from
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # the other way round, dropping a trained module, is another architecture
    with pytest.raises(DCEPKInputError, match="another architecture"):
        training.train("tcn_punet", config, steps=1, device="cpu", out_dir=tmp_path / "c",
                       init_from=tmp_path / "b", log=log)
    assert not (tmp_path / "c").exists()
