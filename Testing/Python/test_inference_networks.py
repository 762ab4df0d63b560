"""Inference core without shipped weights: canonical grid, simulator physics, the four networks."""

import numpy as np
import pytest
import torch

from DCEPKFittingLib import signal as signal_models
from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.kinetics import tk_models
from DCEPKInferenceLib.data import canonical_grid as cg
from DCEPKInferenceLib.data import simulator
from DCEPKInferenceLib.nn.networks import NETWORKS, PARAM_UPPER, build_network, compress, count_parameters, nll
from DCEPKInferenceLib.training import compute_loss, temporal_shift, tracer_kinetic_loss

torch.set_num_threads(1)


def _nonuniform_times(n, rng, span_s=300.0):
    steps = rng.uniform(0.5, 1.5, n - 1)
    return np.concatenate([[0.0], np.cumsum(steps / steps.sum() * span_s)])


# ------------------------------------------------------------------------------ canonical grid
def test_resampling_reproduces_a_linear_curve_exactly_inside_the_span():
    times = np.array([0.0, 1.5, 7.0, 20.0, 33.3, 60.0, 95.0, 150.0, 200.0, 260.0, 300.0])
    w, valid = cg.resampling_matrix(times)
    curve = 2.0 + 0.01 * times
    g = cg.grid_times_s()
    inside = valid & (g >= cg.GRID_STEP_S / 2) & (g <= times[-1] - cg.GRID_STEP_S / 2)
    np.testing.assert_allclose((w @ curve)[inside], 2.0 + 0.01 * g[inside], rtol=0, atol=1e-12)
    assert valid.sum() == 1 + int(300 // cg.GRID_STEP_S)       # grid points 0..300 s
    assert np.all(w[~valid] == 0)
    np.testing.assert_allclose(w[valid].sum(1), 1.0, atol=1e-12)  # each valid row is an average


def test_resampling_of_a_fast_series_is_the_cell_mean():
    # 0.5 s frames of a cosine with an 8 s period: the grid value must be its mean over the 4 s cell
    times = np.arange(0, 200.0, 0.5)
    omega = 2 * np.pi / 8.0
    curve = np.cos(omega * times)
    w, valid = cg.resampling_matrix(times)
    g = cg.grid_times_s()[valid][1:-1]
    half = cg.GRID_STEP_S / 2
    analytic = (np.sin(omega * (g + half)) - np.sin(omega * (g - half))) / (omega * cg.GRID_STEP_S)
    np.testing.assert_allclose((w @ curve)[valid][1:-1], analytic, atol=0.02)
    # a 4 s cell holds half a period: point sampling would alias to cos(omega g) = +-1
    assert np.max(np.abs(analytic - np.cos(omega * g))) > 0.3


def test_concentration_input_inverts_the_spgr_signal_and_flags_the_ceiling():
    t10, fa, tr, r1 = 1.2, 20.0, 0.004, 4.0
    conc = np.array([[0.0, 0.0, 0.0, 0.5, 2.0, 1.0], [0.0, 0.0, 0.0, 0.1, 0.2, 0.3]])
    signal = signal_models.spgr_signal(1000.0, 1 / t10 + r1 * conc, fa, tr)
    signal[1, :3] *= [1.0, 1.02, 0.98]                       # baseline noise on the second voxel
    signal[0, 5] = 1e6                                        # past the SPGR ceiling (q >= 1)
    out, noise, s0 = cg.tissue_concentration(signal, 3, fa, tr, t10, r1)
    np.testing.assert_allclose(out[0, :5], conc[0, :5], atol=1e-9)
    assert out[0, 5] == cg.CONC_CLIP_MM[1]
    np.testing.assert_allclose(s0, signal[:, :3].mean(axis=1))
    assert noise[0] < 1e-9 and noise[1] > 1e-3               # the baseline SD follows the noise
    features = cg.protocol_features(noise, np.array([0.0, 2.0, 4.0, 8.0]))
    np.testing.assert_allclose(features[:, 0], np.log10(np.maximum(noise, 1e-3)), rtol=1e-6)
    np.testing.assert_allclose(features[:, 1], 0.5)          # median interval 2 s / 4 s
    for missing in ("fa_deg", "tr_s", "t10_s", "r1_per_mM_s"):
        kwargs = {**dict(fa_deg=fa, tr_s=tr, t10_s=t10, r1_per_mM_s=r1), missing: None}
        with pytest.raises(DCEPKInputError, match="not known: the networks convert"):
            cg.to_canonical(np.repeat(signal, 2, axis=1), np.arange(12.0), 3, **kwargs)
    with pytest.raises(DCEPKInputError, match="at least"):
        cg.resampling_matrix(np.arange(5.0))


def test_canonical_curves_are_the_resampled_true_concentration():
    """More voxels than one conversion block, a T10 map: the curves are W @ the true concentration."""
    rng = np.random.default_rng(5)
    n, times = cg.BLOCK_VOXELS + 900, np.arange(40) * 6.0
    conc = np.where(times >= 30.0, 1.0, 0.0) * rng.uniform(0.0, 2.0, (n, 1)) * (1 - np.exp(-(times - 30.0) / 60.0))
    t10 = rng.uniform(0.8, 2.0, n)
    signal = signal_models.spgr_signal(1000.0, 1 / t10[:, None] + 4.0 * conc, 15.0, 0.004)
    kwargs = dict(fa_deg=15.0, tr_s=0.004, t10_s=t10, r1_per_mM_s=4.0)
    canonical = cg.to_canonical(signal, times, 5, **kwargs)
    w, _ = cg.resampling_matrix(times)
    # float32 conversion (the networks' input): within the core's documented 1e-4 mM
    np.testing.assert_allclose(canonical.curves, conc @ w.T, atol=1e-4)


# ------------------------------------------------------------------------------ simulator
def test_simulated_curves_are_the_core_forward_models():
    rng = np.random.default_rng(7)
    subject = simulator.sample_subject(rng)
    params = simulator.sample_tissue_params(rng, 50)
    t10 = rng.uniform(0.8, 2.0, 50)
    m0 = np.full(50, 1234.0)
    conc, signal = simulator.noise_free(subject, params, t10, m0)
    np.testing.assert_array_equal(conc, tk_models.concentration("etofts", params, subject.times_s, subject.cp_mM))
    expected = signal_models.spgr_signal(m0[:, None], 1 / t10[:, None] + subject.r1_per_mM_s * conc,
                                         subject.fa_deg, subject.tr_s)
    np.testing.assert_array_equal(signal, expected)
    # and the noise-free signal inverts back to the same concentration through the core
    back, ok = signal_models.signal_to_concentration(signal, t10, subject.fa_deg, subject.tr_s,
                                                     subject.r1_per_mM_s, baseline_frames=1)
    assert ok.all()
    np.testing.assert_allclose(back, conc, atol=1e-7)


def test_simulator_ranges_and_noise_level():
    rng = np.random.default_rng(3)
    p = simulator.sample_tissue_params(rng, 20000)
    assert p[:, 0].min() >= 0 and p[:, 0].max() <= 1.5
    assert p[:, 1].min() >= 0.02 and p[:, 1].max() <= 0.8 + 1e-12
    assert p[:, 2].max() <= 0.3
    assert np.all(p[:, 0] / p[:, 1] <= simulator.KEP_MAX + 1e-9)
    assert 0.08 < np.mean((p[:, 0] == 0) & (p[:, 2] == 0)) < 0.16        # non-enhancing fraction
    # Rician noise: at high SNR the SD of the magnitude is sigma
    signal = np.full((20000, 1), 500.0)
    noisy = simulator.add_rician_noise(rng, signal, np.full(20000, 10.0))
    assert abs(noisy.std() - 10.0) < 0.3
    times = [simulator.sample_times(rng) for _ in range(200)]
    assert min(t.size for t in times) >= 30 and max(t.size for t in times) <= 150
    dts = np.concatenate([np.diff(t) for t in times])
    assert dts.min() > 1.5 * 0.8 - 1e-9 and dts.max() <= 2 * 15.0 * 1.2


def test_patch_batch_shapes_and_truth():
    batch = simulator.sample_patches(np.random.default_rng(0), 2, 32)
    assert batch.curves.shape == (2, cg.GRID_POINTS, 32, 32)
    assert batch.protocol.shape == (2, cg.N_PROTOCOL, 32, 32)
    assert batch.params.shape == (2, 3, 32, 32)
    assert np.all(batch.params[:, 0] <= 1.5) and np.all(batch.params[:, 1] >= 0.02)
    # the network input is the true tissue concentration on the grid (here at a very high SNR)
    patch = simulator.simulate_patch(np.random.default_rng(1), 16, (2000.0, 2000.0))
    w, _ = cg.resampling_matrix(patch["subject"].times_s)
    expected = patch["conc"] @ w.T
    assert np.max(np.abs(patch["canonical"].curves - expected)) < 0.01 * np.max(expected)


# ------------------------------------------------------------------------------ networks
def _voxel_inputs(n_frames, rng, n=32):
    subject = simulator.sample_subject(rng, _nonuniform_times(n_frames, rng))
    params = simulator.sample_tissue_params(rng, n)
    canonical, *_ = simulator.simulate_subject_voxels(rng, subject, params)
    return canonical, params


NETWORK_VARIANTS = [(name, {}) for name in sorted(NETWORKS)] + [(name, {"aleatoric_head": True})
                                                                 for name in ("fcsa_net", "tcn_punet", "ulas_cnn")]


@pytest.mark.parametrize("name, config", NETWORK_VARIANTS, ids=[n + "".join(f"-{k}" for k in c)
                                                               for n, c in NETWORK_VARIANTS])
@pytest.mark.parametrize("n_frames", [20, 45, 97])
def test_network_forward_backward_any_frame_count(name, config, n_frames):
    rng = np.random.default_rng(n_frames)
    torch.manual_seed(0)
    model = build_network(name, config)
    assert count_parameters(model) * 4 < 20e6            # weights well under 20 MB
    canonical, params = _voxel_inputs(n_frames, rng, n=64)
    if model.kind == "voxel":
        batch = {"curves": torch.from_numpy(canonical.curves),
                 "valid": torch.from_numpy(np.broadcast_to(canonical.valid, canonical.curves.shape).copy()),
                 "protocol": torch.from_numpy(canonical.protocol), "params": torch.tensor(params, dtype=torch.float32)}
        mean, sd = model.predict(batch["curves"], batch["valid"], batch["protocol"])
        assert mean.shape == (64, 3)
    else:
        side = 8
        to_img = lambda a: torch.from_numpy(np.ascontiguousarray(a.T.reshape(1, -1, side, side)))
        batch = {"curves": to_img(canonical.curves), "valid": torch.from_numpy(canonical.valid[None]),
                 "protocol": to_img(canonical.protocol), "params": to_img(params.astype(np.float32)),
                 "tissue": torch.ones(1, 1, side, side), "cp_grid": torch.ones(1, cg.GRID_POINTS)}
        mean, sd = model.predict(batch["curves"], batch["valid"], batch["protocol"], batch["tissue"])
        assert mean.shape == (1, 3, side, side)
    upper = torch.tensor(PARAM_UPPER).view((1, 3) + (1,) * (mean.dim() - 2))
    assert torch.all(mean >= 0) and torch.all(mean <= upper)        # bounded activations
    assert torch.all(sd > 0) and torch.all(torch.isfinite(sd))
    model.train()
    loss = compute_loss(model, batch, {"temporal_shift_max": 2}, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss)
    assert sum(int(g is not None and torch.any(g != 0)) for g in grads) >= 0.8 * len(grads)


def test_tcn_punet_sd_adds_the_aleatoric_variance_to_the_latent_spread():
    """Law of total variance: SD^2 = variance over the latent draws + the aleatoric variance. The
    aleatoric head is set to a known constant scale softplus(b) + 1e-3 to have an analytic value."""
    torch.manual_seed(0)
    model = build_network("tcn_punet", {"aleatoric_head": True}).eval()
    last = model.scale_head[-1]
    bias = torch.tensor([0.3, -1.0, -2.0])
    last.weight.data.zero_()
    last.bias.data.copy_(bias)
    aleatoric = (torch.nn.functional.softplus(bias) + 1e-3) * torch.tensor(PARAM_UPPER)
    canonical, _ = _voxel_inputs(45, np.random.default_rng(3), n=64)
    to_img = lambda a: torch.from_numpy(np.ascontiguousarray(a.T.reshape(1, -1, 8, 8)))
    inputs = (to_img(canonical.curves), torch.from_numpy(canonical.valid[None]), to_img(canonical.protocol),
              torch.ones(1, 1, 8, 8))

    def predict(aleatoric_head, log_sigma_shift):
        """log_sigma_shift widens (> 0) or removes (-50: every draw is the prior mean) the latent spread."""
        model.config["aleatoric_head"] = aleatoric_head
        hook = model.prior.register_forward_hook(lambda module, args, out: (out[0], out[1] + log_sigma_shift))
        torch.manual_seed(7)
        out = model.predict(*inputs, n_samples=6)
        hook.remove()
        return out

    mean_both, sd_both = predict(True, 3.0)
    mean_latent, sd_latent = predict(False, 3.0)
    torch.testing.assert_close(mean_both, mean_latent)                  # the head leaves the mean alone
    floor = 1e-3 * torch.tensor(PARAM_UPPER).view(1, 3, 1, 1)
    assert torch.all(sd_latent > 2 * floor)                             # spread above the floor: the sum is exact
    expected = torch.sqrt(sd_latent ** 2 + aleatoric.view(1, 3, 1, 1) ** 2)
    torch.testing.assert_close(sd_both, expected, rtol=1e-4, atol=1e-6)
    _, sd_no_spread = predict(True, -50.0)
    torch.testing.assert_close(sd_no_spread, aleatoric.view(1, 3, 1, 1).expand_as(sd_no_spread), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["fcsa_net", "ulas_cnn"])
def test_a_2d_network_with_the_aleatoric_head_keeps_its_mean_and_takes_the_scale_from_the_head(name):
    torch.manual_seed(0)
    plain = build_network(name).eval()
    headed = build_network(name, {"aleatoric_head": True}).eval()
    missing, unexpected = headed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("scale_head.") for k in missing)
    headed.scale_head[-1].weight.data.zero_()
    headed.scale_head[-1].bias.data.fill_(-1.0)
    canonical, _ = _voxel_inputs(45, np.random.default_rng(4), n=64)
    to_img = lambda a: torch.from_numpy(np.ascontiguousarray(a.T.reshape(1, -1, 8, 8)))
    inputs = (to_img(canonical.curves), torch.from_numpy(canonical.valid[None]), to_img(canonical.protocol),
              torch.ones(1, 1, 8, 8))
    with torch.no_grad():
        out_plain, out_headed = plain(*inputs), headed(*inputs)
    torch.testing.assert_close(out_headed["mean_n"], out_plain["mean_n"])
    expected = torch.nn.functional.softplus(torch.tensor(-1.0)) + 1e-3
    torch.testing.assert_close(out_headed["scale_n"], torch.full((1, 3, 8, 8), float(expected)))
    assert not torch.allclose(out_plain["scale_n"], out_headed["scale_n"])


def test_inference_shortcuts_give_the_plain_layers_results():
    """The CPU speed-ups (unused grid patches folded into a bias, cache-sized voxel blocks, dilated
    conv as shifted taps, stem without the invalid grid points, asinh by log1p) against the plain layers."""
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    canonical, _ = _voxel_inputs(20, rng, n=64)               # 300 s: the grid after it is invalid
    reps = 5000 // 64 + 1                                     # more voxels than one CPU block
    curves = torch.from_numpy(np.tile(canonical.curves, (reps, 1)) * rng.uniform(0.5, 1.5, (64 * reps, 1)))
    curves = curves.float()
    protocol = torch.from_numpy(np.tile(canonical.protocol, (reps, 1)))
    valid = torch.from_numpy(canonical.valid)
    assert 0 < valid.sum() < cg.GRID_POINTS - 8
    hetero = build_network("hetero_encoder").eval()
    for p in hetero.parameters():                             # non-trivial biases everywhere
        p.data += 0.1 * torch.randn_like(p)
    with torch.no_grad():
        plain = torch.stack([m for m, _ in hetero(curves, valid.expand_as(curves), protocol)]).mean(0)
        mean, _ = hetero.predict(curves, valid, protocol)
    assert torch.allclose(mean, plain * torch.tensor(PARAM_UPPER), atol=1e-5)

    tcn_net = build_network("tcn_punet").eval()
    tcn = tcn_net.tcn
    h = torch.randn(7, 32, tcn.blocks[0].in_features // 3)
    for d, block in zip(tcn.dilations, tcn.blocks):
        hp = torch.nn.functional.pad(h, (0, 0, d, d))
        expected = block(torch.cat([hp[:, :-2 * d], h, hp[:, 2 * d:]], dim=-1))
        assert torch.allclose(tcn._dilated(block, h, d), expected, atol=1e-5)
    side = 50                                                  # 2500 tissue voxels: several TCN blocks
    img = lambda a: a[: side * side].T.reshape(1, -1, side, side).contiguous()
    with torch.no_grad():
        feat = tcn_net.features(img(curves), valid[None], img(protocol), torch.ones(1, 1, side, side))
        direct = tcn(curves[: side * side], valid.expand(side * side, -1), protocol[: side * side])
    assert torch.allclose(feat[0].reshape(feat.shape[1], -1).T, direct, atol=1e-5)

    x = torch.cat([-torch.logspace(-6, 2, 50), torch.zeros(1), torch.logspace(-6, 2, 50)])
    assert torch.allclose(compress(x), torch.asinh(x / 0.5), rtol=0, atol=5e-7)
    x.requires_grad_(True)
    compress(x * 1.0).sum().backward()                         # the training path differentiates
    assert torch.allclose(x.grad, 2.0 / torch.sqrt(1.0 + (2.0 * x.detach()) ** 2), rtol=1e-5)
    stem = build_network("fcsa_net").stem
    x = torch.cat([torch.asinh(img(curves) / 0.5) * valid[None, :, None, None], img(protocol)], dim=1)
    with torch.no_grad():
        expected = torch.nn.functional.gelu(stem.conv(x) + stem.valid_bias(valid[None])[:, :, None, None])
        assert torch.allclose(stem(img(curves), valid[None], img(protocol)), expected, atol=1e-5)


def test_tracer_kinetic_loss_is_zero_only_for_the_true_parameters():
    rng = np.random.default_rng(1)
    subject = simulator.sample_subject(rng)
    cp = torch.tensor(simulator.cp_on_grid(subject), dtype=torch.float64)[None]
    truth = torch.tensor([0.2, 0.3, 0.05], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    valid = torch.ones(1, cg.GRID_POINTS, dtype=torch.float64)
    assert tracer_kinetic_loss(truth.clone(), truth, cp, valid).item() == pytest.approx(0.0, abs=1e-12)
    wrong = truth.clone()
    wrong[:, 0] *= 1.5
    assert tracer_kinetic_loss(wrong, truth, cp, valid).item() > 1e-3



def test_tracer_kinetic_loss_stays_finite_where_ve_is_zero():
    """A clamped prediction or a non-enhancing truth has ve = 0 (kep = Ktrans / ve): the loss and its
    gradient stay finite (a NaN here ended the first ulas_cnn_aif training run), and a non-enhancing
    pixel predicted as non-enhancing costs nothing."""
    rng = np.random.default_rng(2)
    cp = torch.tensor(simulator.cp_on_grid(simulator.sample_subject(rng)), dtype=torch.float64)[None]
    valid = torch.ones(1, cg.GRID_POINTS, dtype=torch.float64)
    truth = torch.tensor([[0.2, 0.0], [0.3, 0.0], [0.05, 0.0]], dtype=torch.float64).view(1, 3, 1, 2)
    pred = torch.tensor([[0.1, 0.0], [0.0, 0.0], [0.05, 0.0]], dtype=torch.float64).view(1, 3, 1, 2)
    pred.requires_grad_(True)
    loss = tracer_kinetic_loss(pred, truth, cp, valid)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 1e-3 and torch.isfinite(pred.grad).all()
    assert tracer_kinetic_loss(truth.clone(), truth, cp, valid).item() == pytest.approx(0.0, abs=1e-12)

def test_temporal_shift_delays_the_curve():
    curves = torch.arange(10.0).repeat(3, 1)
    valid = torch.ones(3, 10)
    shifted, _ = temporal_shift(curves, valid, 3, torch.Generator().manual_seed(5))
    for row in shifted:
        s = int((row == 0).sum()) - 1
        assert 0 <= s <= 3
        torch.testing.assert_close(row[s:], torch.arange(10.0 - s))


def test_beta_nll_gives_the_mean_a_squared_error_gradient_and_keeps_the_variance_optimum():
    target = torch.tensor([[0.1, 0.5, 0.9]], dtype=torch.float64)
    mean = torch.tensor([[0.3, 0.2, 0.6]], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([[0.05, 0.4, 1.5]], dtype=torch.float64, requires_grad=True)
    plain = nll(target, mean, scale, "gaussian")
    assert plain.item() == pytest.approx(float(torch.distributions.Normal(mean, scale).log_prob(target).mean().neg().detach()))
    nll(target, mean, scale, "gaussian", beta=1.0).backward()
    # beta = 1: d/dmean = (mean - target) / n whatever sigma, i.e. the gradient of half the mean squared error
    torch.testing.assert_close(mean.grad, (mean - target).detach() / 3)
    # d/dsigma = sigma^2 (1/sigma - r^2/sigma^3) / n: zero exactly at sigma = |r|, as for the plain NLL
    r = (target - mean).detach()
    torch.testing.assert_close(scale.grad, (scale - r ** 2 / scale).detach() / 3)
    with pytest.raises(DCEPKInputError, match="gaussian"):
        nll(target, mean, scale, "laplace", beta=1.0)


def test_group_bootstrap_interval_of_a_mean_is_the_analytic_interval():
    from DCEPKInferenceLib.analysis.metrics import Z90, group_bootstrap_interval
    rng = np.random.default_rng(5)
    # 400 subjects of 50 voxels that share a subject offset (SD 1) plus voxel noise (SD 0.5):
    # the subject mean has SD sqrt(1 + 0.25/50); the interval must follow the subjects, not the 20,000 voxels
    values = rng.normal(size=(400, 1)) + 0.5 * rng.normal(size=(400, 50))
    low, high = group_bootstrap_interval(lambda idx: values[idx].mean(), 400, draws=4000)
    half_width = Z90 * values.mean(1).std() / np.sqrt(400)
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.1 * half_width)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
