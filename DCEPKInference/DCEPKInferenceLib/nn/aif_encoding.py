"""The AIF-conditioned networks' input: each voxel's extended-Tofts profile likelihood given the input
function, over a fixed bank of kep values (pure torch, float64 inside, any frame times).

Why this encoding and not the curves: for a fixed kep the extended Tofts curve
C(t) = Ktrans/60 E_k(t) + vp cp(t), E_k = cp (*) exp(-k t), is linear in (Ktrans, vp). The data's
Gaussian likelihood over (Ktrans, vp) at that kep is therefore fully described by the least-squares
solution, its covariance and the residual sum of squares SSR; over a bank of kep values these are
a lossless summary of the likelihood on the bank. Amplitude and shape of the input function enter
exactly (scaling the AIF by s divides every Ktrans_j and vp_j by s), so the network only has to
learn prior x likelihood -> posterior, never the deconvolution. ``E_k`` is the core's exact
piecewise-linear ``tk_models.exp_convolution`` on the series' own frame times.

Per voxel the encoder returns:

* ``features`` (N, ``FEATURE_COUNT``): per kep_j the LS Ktrans_j and vp_j (asinh-compressed), the
  standardised profile log1p(dSSR_j / sigma^2) (clipped at 200), log SE(Ktrans_j), log SE(vp_j) and
  their correlation; the grid posterior's means; the anchor and log posterior SDs; and globals
  (log baseline noise SD, log of the fit's noise over it, duration, frame count, baseline share);
* ``anchor`` (N, 3): the profile minimum refined by a parabola in log kep through the *unclipped*
  profile and re-solved at that kep (Ktrans, ve, vp within the output bounds); on noise-free data
  it is the least-squares solution, so a head anchored on it reproduces a noise-free phantom;
* ``posterior_sd`` (N, 3): SDs of Ktrans, ve, vp under the grid posterior
  w_j ~ exp(-dSSR_j / 2) SE(Ktrans_j) SE(vp_j) sqrt(1 - rho_j^2) (flat prior on Ktrans, vp;
  log-uniform on kep), which sets the width of the anchored head's band.

The noise sigma^2 is the best SSR / (T_used - 3), floored at ``SIGMA_FLOOR_MM`` so that noise-free
phantoms stay finite. Frames with weight 0 (an undefined SPGR inversion) are left out: a weighted
least squares, the same as dropping them.
"""

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from DCEPKFittingLib.kinetics import tk_models, varpro

from .input_definitions import (DSSR_CLIP, ENCODING, ENCODING_VERSION, FEATURE_COUNT, GLOBAL_FEATURES,  # noqa: F401
                                KEP_BANK_PER_MIN, N_BANK, PER_KEP_FEATURES, SIGMA_FLOOR_MM)
from .networks import PARAM_UPPER

VE_FLOOR = 0.005                 # the anchor's ve where Ktrans / kep falls below it
ANCHOR_ITERATIONS = 6            # variable-projection steps of the core's NLLS from its grid start
BLOCK_VOXELS = 16384


@dataclass
class SeriesBasis:
    """What the encoding needs of one series, shared by all its voxels: frame times (s), plasma input
    function (mM), the bank's convolutions ``E`` (J, T) in mM s, and their Gram terms."""

    times_s: torch.Tensor
    plasma_mM: torch.Tensor
    conv: torch.Tensor
    ee: torch.Tensor
    ec: torch.Tensor
    cc: torch.Tensor
    baseline_frames: int


@dataclass
class ProfileEncoding:
    features: torch.Tensor        # (N, FEATURE_COUNT) float32
    anchor: torch.Tensor          # (N, 3) Ktrans (1/min), ve, vp; float32
    posterior_sd: torch.Tensor    # (N, 3) same units; float32
    no_leakage: torch.Tensor      # (N,) bool: BIC prefers y = vp cp to the bank's best curve (``plasma_only_choice``)
    plasma_vp: torch.Tensor       # (N,) the plasma-only vp; float32


def kep_bank(device=None) -> torch.Tensor:
    return torch.tensor(KEP_BANK_PER_MIN, dtype=torch.float64, device=device)


def series_basis(times_s, plasma_mM, baseline_frames: int, device=None) -> SeriesBasis:
    """The bank's convolutions of the plasma input function on the frame times (seconds)."""
    t = torch.as_tensor(np.asarray(times_s, dtype=np.float64), device=device)
    cp = torch.as_tensor(np.asarray(plasma_mM, dtype=np.float64), device=device)
    k = kep_bank(device) / 60.0
    conv = tk_models.exp_convolution(t, cp.expand(k.shape[0], -1).contiguous(), k)
    return SeriesBasis(t, cp, conv, (conv * conv).sum(1), conv @ cp, cp @ cp, int(baseline_frames))


def encode(conc_mM, basis: SeriesBasis, noise_sd_mM, weights=None, block_voxels: int = BLOCK_VOXELS
           ) -> ProfileEncoding:
    """Encode concentration curves (N, T) mM on the basis' frame times. ``noise_sd_mM`` (N,): the
    baseline noise SD; ``weights`` (N, T) 0/1 or None: frames to use (0 where the inversion failed)."""
    y = torch.as_tensor(conc_mM).to(device=basis.times_s.device)
    noise = torch.as_tensor(noise_sd_mM).to(device=basis.times_s.device)
    w = None if weights is None else torch.as_tensor(weights).to(device=basis.times_s.device)
    parts = [_encode_block(y[s:s + block_voxels], basis, noise[s:s + block_voxels],
                           None if w is None else w[s:s + block_voxels])
             for s in range(0, y.shape[0], block_voxels)]
    if not parts:
        empty = torch.zeros((0, 3), dtype=torch.float32, device=y.device)
        return ProfileEncoding(torch.zeros((0, FEATURE_COUNT), dtype=torch.float32, device=y.device), empty, empty,
                               torch.zeros(0, dtype=torch.bool, device=y.device), empty[:, 0])
    return ProfileEncoding(*(torch.cat([getattr(q, f.name) for q in parts]) for f in fields(ProfileEncoding)))


@dataclass
class _Profile:
    """Least squares at every kep of the bank for a block of voxels (float64, (N, J) unless said)."""

    ktrans: torch.Tensor      # 1/min
    vp: torch.Tensor
    ssr: torch.Tensor
    sigma2: torch.Tensor      # (N,)
    se_k: torch.Tensor        # 1/min
    se_v: torch.Tensor
    rho: torch.Tensor
    no_leakage: torch.Tensor  # (N,) bool: BIC prefers the plasma-only curve y = vp cp (1 parameter) to the best
    plasma_vp: torch.Tensor   # (N,)     of the bank (3 parameters: Ktrans, kep, vp), as the fit's model choice


def _profile(y, basis: SeriesBasis, w) -> _Profile:
    """The bank's least squares; with frame weights ``w`` the Gram terms are per voxel."""
    if w is None:
        ee, ec, cc = basis.ee[None], basis.ec[None], basis.cc.reshape(1, 1)
        used = torch.full((y.shape[0],), float(y.shape[1]), dtype=y.dtype, device=y.device)
        yw = y
    else:
        ee, ec = w @ (basis.conv ** 2).T, w @ (basis.conv * basis.plasma_mM).T
        cc = (w @ basis.plasma_mM ** 2)[:, None]
        used, yw = w.sum(1), y * w
    ye, yc, yy = yw @ basis.conv.T, yw @ basis.plasma_mM, (yw * y).sum(1)
    det = (ee * cc - ec * ec).clamp_min(1e-300)
    a = (ye * cc - yc[:, None] * ec) / det
    v = (yc[:, None] * ee - ye * ec) / det
    ssr = (yy[:, None] - a * ye - v * yc[:, None]).clamp_min(0.0)
    sigma2 = (ssr.min(1).values / (used - 3.0).clamp_min(1.0)).clamp_min(SIGMA_FLOOR_MM ** 2)
    se_k = 60.0 * torch.sqrt(sigma2[:, None] * cc / det)
    se_v = torch.sqrt(sigma2[:, None] * ee / det)
    rho = (-ec / torch.sqrt(ee * cc).clamp_min(1e-300)).expand_as(a)
    plasma_vp = (yc / cc[:, 0]).clamp_min(0.0)
    ssr_plasma = (yy - 2 * plasma_vp * yc + plasma_vp * plasma_vp * cc[:, 0]).clamp_min(1e-300)
    no_leakage = used * torch.log(ssr_plasma / ssr.min(1).values.clamp_min(1e-300)) <= 2.0 * torch.log(used)
    return _Profile(60.0 * a, v, ssr, sigma2, se_k, se_v, rho, no_leakage, plasma_vp)


def _clamped(ktrans, ve, vp) -> torch.Tensor:
    upper = PARAM_UPPER
    return torch.stack([ktrans.clamp(0.0, upper[0]), ve.clamp(VE_FLOOR, upper[1]), vp.clamp(0.0, upper[2])], 1)


def _varpro_anchor(y, basis: SeriesBasis) -> torch.Tensor:
    """(N, 3) Ktrans, ve, vp: the core's extended-Tofts variable projection (its grid start, then
    ``ANCHOR_ITERATIONS`` Gauss-Newton / secant steps in log kep), clamped to the output bounds."""
    x = varpro.varpro_tofts(tk_models.get_model("etofts"), y, basis.times_s, basis.plasma_mM, ANCHOR_ITERATIONS)[0]
    x = torch.nan_to_num(x, nan=0.0)
    return _clamped(x[:, 0], x[:, 1], x[:, 2])


def _refined_anchor(y, basis: SeriesBasis, w, dssr) -> torch.Tensor:
    """(N, 3) Ktrans, ve, vp at the profile minimum refined by a parabola in log kep (unclipped
    profile) and re-solved there; for frame-weighted voxels, which the core's projection does not take."""
    bank = kep_bank(y.device)
    j = dssr.argmin(1).clamp(1, N_BANK - 2)
    rows = torch.arange(y.shape[0], device=y.device)
    s_m, s_0, s_p = dssr[rows, j - 1], dssr[rows, j], dssr[rows, j + 1]
    curvature = s_m - 2 * s_0 + s_p
    offset = torch.where(curvature > 0, 0.5 * (s_m - s_p) / curvature.clamp_min(1e-12), torch.zeros_like(s_0))
    kep = torch.exp(torch.log(bank[j]) + offset.clamp(-1.0, 1.0) * math.log(bank[1].item() / bank[0].item()))
    cp = basis.plasma_mM.expand(y.shape[0], -1).contiguous()
    e = tk_models.exp_convolution(basis.times_s, cp, kep / 60.0)
    if w is not None:
        e_w, y_w, c_w = e * w, y * w, cp * w
    else:
        e_w, y_w, c_w = e, y, cp
    ee, ec, cc = (e_w * e).sum(1), (e_w * cp).sum(1), (c_w * cp).sum(1)
    ye, yc = (y_w * e).sum(1), (y_w * cp).sum(1)
    det = (ee * cc - ec * ec).clamp_min(1e-300)
    a, v = (ye * cc - yc * ec) / det, (yc * ee - ye * ec) / det
    # on a bound (no leakage, or no plasma term) the other coefficient is re-solved alone
    no_leak, no_plasma = a < 0, (v < 0) & (a >= 0)
    a = torch.where(no_leak, torch.zeros_like(a), torch.where(no_plasma, ye / ee.clamp_min(1e-300), a))
    v = torch.where(no_leak, yc / cc.clamp_min(1e-300), torch.where(no_plasma, torch.zeros_like(v), v))
    return _clamped(60.0 * a, 60.0 * a / kep, v)


def _grid_posterior(prof: _Profile, dssr):
    """Posterior means and SDs (N, 3) of Ktrans, ve, vp over the bank (within-kep Gaussian SEs)."""
    log_w = -0.5 * dssr + torch.log(prof.se_k * prof.se_v * torch.sqrt((1 - prof.rho ** 2).clamp_min(1e-12)))
    w = torch.softmax(log_w, dim=1)
    bank = kep_bank(dssr.device)[None]
    means, sds = [], []
    for value, se in ((prof.ktrans, prof.se_k), (prof.ktrans / bank, prof.se_k / bank), (prof.vp, prof.se_v)):
        mean = (w * value).sum(1)
        means.append(mean)
        sds.append(torch.sqrt(((w * (se ** 2 + value ** 2)).sum(1) - mean ** 2).clamp_min(0.0)) + 1e-4)
    return torch.stack(means, 1), torch.stack(sds, 1)


def _compress(ktrans_ve_vp):
    return torch.stack([torch.asinh(ktrans_ve_vp[:, 0] / 0.1), torch.asinh(ktrans_ve_vp[:, 1] / 0.1),
                        torch.asinh(ktrans_ve_vp[:, 2] / 0.05)], 1)


def _encode_block(y, basis: SeriesBasis, noise, w) -> ProfileEncoding:
    y = y.to(torch.float64)
    w = None if w is None else w.to(torch.float64)
    prof = _profile(y, basis, w)
    dssr = (prof.ssr - prof.ssr.min(1, keepdim=True).values) / prof.sigma2[:, None]
    anchor = _varpro_anchor(y, basis) if w is None else _refined_anchor(y, basis, w, dssr)
    post_mean, post_sd = _grid_posterior(prof, dssr)
    n_t = float(y.shape[1])
    noise = noise.to(torch.float64).clamp_min(SIGMA_FLOOR_MM)
    globals_ = torch.stack([torch.log(noise), 0.5 * torch.log(prof.sigma2 / noise ** 2),
                            torch.full_like(noise, float(basis.times_s[-1] - basis.times_s[0]) / 600.0),
                            torch.full_like(noise, math.log(n_t) / 5.0),
                            torch.full_like(noise, basis.baseline_frames / n_t)], 1)
    features = torch.cat([torch.asinh(prof.ktrans / 0.1), torch.asinh(prof.vp / 0.05),
                          torch.log1p(dssr.clamp(0.0, DSSR_CLIP)), torch.log(prof.se_k), torch.log(prof.se_v),
                          prof.rho, _compress(post_mean), _compress(anchor), torch.log(post_sd), globals_], 1)
    return ProfileEncoding(features.to(torch.float32), anchor.to(torch.float32), post_sd.to(torch.float32),
                           prof.no_leakage, prof.plasma_vp.to(torch.float32))


def plasma_only_choice(conc_mM, basis: SeriesBasis, weights=None):
    """(no leakage (N,) bool, the plasma-only vp (N,)) of curves without their encoding: where BIC prefers
    y = vp cp (1 parameter) to the best extended Tofts curve of the bank (3 parameters), as the fit's model
    choice does (``encode`` returns the same as ``no_leakage`` and ``plasma_vp``). A tissue without leakage is
    matched as well by a fast-exchanging space that mimics part of vp, an ambiguity the network's prior
    resolves towards leakage (white matter read as Ktrans ~0.1 /min)."""
    y = torch.as_tensor(conc_mM).to(device=basis.times_s.device, dtype=torch.float64)
    w = None if weights is None else torch.as_tensor(weights).to(device=y.device, dtype=torch.float64)
    prof = _profile(y, basis, w)
    return prof.no_leakage.cpu().numpy(), prof.plasma_vp.to(torch.float32).cpu().numpy()


def with_plasma_only_choice(mean, no_leakage, plasma_vp):
    """A network's (N, 3) Ktrans, ve, vp with Ktrans 0 and the plasma-only vp where BIC finds no leakage
    (``plasma_only_choice``); ve is kept (undefined there, as the fit's NaN, but a network map has a value)."""
    no_leakage, plasma_vp = np.asarray(no_leakage, dtype=bool), np.asarray(plasma_vp)
    mean = np.array(mean, copy=True)
    mean[no_leakage, 0], mean[no_leakage, 2] = 0.0, plasma_vp[no_leakage]
    return mean
