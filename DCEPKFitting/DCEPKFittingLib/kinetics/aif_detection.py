"""Automatic arterial / venous input detection: which voxels of a DCE signal series hold blood.

Deterministic (no random start: hierarchical clustering) and transparent: it returns the voxels it
chose as a mask the user can inspect and edit (1 = artery, 2 = vein), with notes naming how many,
their time to peak and peak enhancement. The curve is then made from the mask exactly as from an ROI
the user drew (``aif.aif_from_roi_signal``, ``pipeline.input_function``).

Steps (after Mouridsen et al., MRM 2006;55:524, with the reproducibility argument for hierarchical
clustering of Yin et al., PLoS One 2014;9:e112575):

1. domain: voxels whose baseline signal stands above the noise and 10 % of its 90th percentile
   (the body), eroded by one voxel in-plane; with 8 slices or more, the two slices at each slab edge are left
   out (inflow is strongest where blood enters the slab);
2. per voxel, on the relative enhancement RE(t) = (S - S0) / S0 (no T10 needed): peak, CNR
   (peak / noise SD), time to peak, first moment of the first pass, and the roughness of what
   follows it, mean((second difference)^2) / peak^2 (Mouridsen's roughness, taken after the first
   pass: at frame intervals of seconds the bolus itself is sharp; noise is rough everywhere);
3. candidates: CNR > 5 (noise SD from the curve's frame-to-frame differences), peak RE over 30 % and in
   the top 2 % of the domain (at least 20 voxels, at most 2000 by peak), less the roughest 25 % (noise
   spikes);
4. Ward clustering of the area-normalised curves (shape only) into 5 clusters; the artery cluster is,
   of those whose mean curve peaks at half the highest cluster peak or more, the one whose mean curve
   has the earliest first-pass moment; it is clustered once more into 2 and its earlier half kept
   where the halves' first moments differ by a quarter frame or more (Mouridsen's second pass);
5. partial volume and inflow: inside it, voxels whose curve correlates > 0.95 with the cluster's
   mean, whose enhancement (area) reaches 80 % of the cluster's 90th percentile (partial volume
   lowers the amplitude, not the shape; the area, not the peak, so that noise does not choose), and
   whose baseline S0 is under 1.5x the cluster's median (an inflow-brightened baseline under-reads
   the concentration); a flattened peak (T2* or saturation) or a frame past the signal's
   range is rejected too;
6. veins: of the other clusters, the one peaking 2-10 s (at least one frame) after the artery, with
   the largest peak enhancement, kept where it forms a connected group of 6 voxels or more.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from scipy import ndimage
from scipy.cluster.hierarchy import fcluster, linkage

from ..core.errors import DCEPKInputError
from ..signal.rician import estimate_noise_sigma

ARTERY, VEIN = 1, 2
KINDS = ("artery", "vein", "either")
DOMAIN_FRACTION = 0.10          # body: baseline signal above this fraction of its 90th percentile
AIR_NOISE_SDS = 2.5             # ... and above this many noise SDs
EDGE_SLICES = 2                 # slices left out at each slab edge (series of MIN_SLICES_FOR_EDGES or more)
MIN_SLICES_FOR_EDGES = 8
MIN_CNR = 5.0
MIN_PEAK_RE = 0.3               # blood enhances by far more than 30 % (arteries: several hundred %)
TOP_PEAK_FRACTION = 0.02
MIN_CANDIDATES, MAX_CANDIDATES = 20, 2000
ROUGHEST_DROPPED = 0.25
CLUSTERS = 5
HIGH_PEAK_SHARE = 0.5           # a cluster may hold the artery if its mean peak is this share of the highest
MIN_CORRELATION = 0.95
FULL_LUMEN_SHARE = 0.8          # partial volume: less than this share of the full-lumen enhancement
SPLIT_MIN_FRAMES = 0.25         # the second split keeps the earlier half only if it is this many frames earlier
INFLOW_S0_RATIO = 1.5
VEIN_DELAY_S = (2.0, 10.0)
MIN_VEIN_VOXELS = 6
CLUSTER_POINTS = 128            # curves are resampled to at most this many points for clustering
BLOCK = 65536
NO_CANDIDATE = ("no arterial candidate: no voxel enhances early, strongly and cleanly enough; place an ROI "
                "(--aif-roi) or use a population AIF (--population-aif)")


@dataclass
class AutoInputFunction:
    """The detected blood voxels: ``label_map`` uint8 [k, j, i] (1 artery, 2 vein), the voxels whose
    curve makes the input function (``chosen``, bool), which kind they are, and what was found."""

    label_map: np.ndarray
    chosen: np.ndarray
    kind: str
    notes: List[str] = field(default_factory=list)
    summary: Dict = field(default_factory=dict)

    @property
    def artery_mask(self) -> np.ndarray:
        return self.label_map == ARTERY

    @property
    def vein_mask(self) -> np.ndarray:
        return self.label_map == VEIN


@dataclass
class _Candidates:
    index: np.ndarray        # flat voxel indices
    re: np.ndarray           # (n, T) relative enhancement
    s0: np.ndarray           # (n,)
    peak: np.ndarray
    ttp_s: np.ndarray


def body_domain(signal: np.ndarray, baseline_frames: int, noise_sigma: Optional[float] = None) -> np.ndarray:
    """[k, j, i] voxels whose baseline signal exceeds 2.5 noise SDs (air reads ~1.25 SD: Rician) and 10 %
    of the 90th percentile of those (a few very bright voxels, e.g. burnt-in text, do not set the
    level), eroded in-plane by one voxel."""
    s0 = _baseline_mean(signal, baseline_frames)
    finite = np.isfinite(s0)
    if not finite.any() or np.nanmax(s0) <= 0:
        raise DCEPKInputError("the baseline signal is zero or negative everywhere: give the signal series")
    sigma = (estimate_noise_sigma(signal, baseline_frames) if noise_sigma is None else noise_sigma) or 0.0
    above_noise = finite & (s0 > AIR_NOISE_SDS * sigma)
    if not above_noise.any():
        raise DCEPKInputError("no voxel's baseline signal stands above the noise: check the series")
    body = above_noise & (s0 > DOMAIN_FRACTION * np.percentile(s0[above_noise], 90))
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(body, structure=structure, border_value=1)


def _baseline_mean(signal, baseline_frames):
    flat = signal.reshape(-1, signal.shape[-1])
    out = np.empty(flat.shape[0])
    for start in range(0, flat.shape[0], BLOCK):
        out[start:start + BLOCK] = np.asarray(flat[start:start + BLOCK, :baseline_frames], np.float64).mean(-1)
    return out.reshape(signal.shape[:-1])


def _screen(signal, domain, baseline_frames):
    """Flat indices, peak RE and CNR of the domain's voxels with a finite curve, block by block."""
    flat = signal.reshape(-1, signal.shape[-1])
    index = np.flatnonzero(domain.ravel())
    peaks, cnrs = np.empty(index.size), np.empty(index.size)
    for start in range(0, index.size, BLOCK):
        part = np.asarray(flat[index[start:start + BLOCK]], dtype=np.float64)
        s0 = part[:, :baseline_frames].mean(-1, keepdims=True)
        re = part / np.where(s0 > 0, s0, np.nan) - 1.0
        # noise SD from the frame-to-frame differences of the whole curve (robust: a bolus moves few of
        # them), where a handful of baseline frames would often make it look small by chance
        noise = 1.4826 * np.median(np.abs(np.diff(re, axis=-1)), axis=-1) / np.sqrt(2.0)
        with np.errstate(invalid="ignore"):
            peaks[start:start + BLOCK] = np.max(re[:, baseline_frames:], axis=-1)
            floor = np.maximum(noise, 1e-3 * np.abs(peaks[start:start + BLOCK]))
            cnrs[start:start + BLOCK] = peaks[start:start + BLOCK] / floor
    usable = np.isfinite(peaks) & np.isfinite(cnrs)
    return index[usable], peaks[usable], cnrs[usable]


def _first_pass(re, times, baseline_frames):
    """Time to peak (s), first moment of the first pass (s) and roughness, per curve (n, T)."""
    after = re[:, baseline_frames:]
    peak_at = baseline_frames + np.argmax(after, axis=1)
    peak = re[np.arange(len(re)), peak_at]
    t = times - times[0]
    frames = np.arange(re.shape[1])[None, :]
    # the first pass: from the baseline's end to where the curve falls under half its peak after it
    below = (re < 0.5 * peak[:, None]) & (frames > peak_at[:, None])
    end = np.where(below.any(1), np.argmax(below, axis=1), re.shape[1])
    window = (frames >= baseline_frames) & (frames < end[:, None])
    weight = np.where(window, np.clip(re, 0.0, None), 0.0)
    moment = (weight * t[None, :]).sum(1) / np.maximum(weight.sum(1), 1e-12)
    # roughness of what follows the first pass (a bolus is sharp, a clean washout smooth): noise
    tail = frames[:, 2:] > end[:, None]
    second = np.where(tail, np.diff(re, 2, axis=1), 0.0)
    roughness = (second ** 2).sum(1) / np.maximum(tail.sum(1), 1) / np.maximum(peak, 1e-12) ** 2
    return t[peak_at], moment, roughness


def _candidates(signal, times, baseline_frames, domain) -> Optional[_Candidates]:
    index, peaks, cnrs = _screen(signal, domain, baseline_frames)
    if index.size == 0:
        return None
    threshold = np.quantile(peaks, 1.0 - TOP_PEAK_FRACTION)
    keep = (cnrs > MIN_CNR) & (peaks > MIN_PEAK_RE) & (peaks >= threshold)
    if keep.sum() < MIN_CANDIDATES:   # a small field: the strongest MIN_CANDIDATES clean voxels
        clean = np.flatnonzero((cnrs > MIN_CNR) & (peaks > MIN_PEAK_RE))
        keep = np.zeros_like(keep)
        keep[clean[np.argsort(-peaks[clean], kind="stable")[:MIN_CANDIDATES]]] = True
    chosen = np.flatnonzero(keep)
    chosen = chosen[np.argsort(-peaks[chosen], kind="stable")[:MAX_CANDIDATES]]
    if chosen.size < 3:
        return None
    curves = np.asarray(signal.reshape(-1, signal.shape[-1])[index[chosen]], dtype=np.float64)
    s0 = curves[:, :baseline_frames].mean(-1)
    re = curves / s0[:, None] - 1.0
    ttp, _, roughness = _first_pass(re, times, baseline_frames)
    smooth = roughness <= np.quantile(roughness, 1.0 - ROUGHEST_DROPPED)
    return _Candidates(index[chosen][smooth], re[smooth], s0[smooth], peaks[chosen][smooth], ttp[smooth])


def _shapes(re, baseline_frames):
    """Area-normalised curves after the baseline, resampled to at most ``CLUSTER_POINTS`` points."""
    after = np.clip(re[:, baseline_frames:], 0.0, None)
    if after.shape[1] > CLUSTER_POINTS:
        edges = np.linspace(0, after.shape[1], CLUSTER_POINTS + 1).astype(int)
        after = np.add.reduceat(after, edges[:-1], axis=1) / np.diff(edges)[None, :]
    return after / np.maximum(after.sum(1, keepdims=True), 1e-12)


def _ward(shapes, clusters):
    if len(shapes) <= clusters:
        return np.arange(1, len(shapes) + 1)
    return fcluster(linkage(shapes, method="ward"), clusters, criterion="maxclust")


def _earliest(labels, re, times, baseline_frames):
    """Of the clusters whose mean curve peaks at half the highest cluster peak or more (blood enhances
    most), the one whose mean curve's first pass has the earliest first moment (Mouridsen's rule, on
    the cluster means: one voxel's first pass is too noisy to time)."""
    ids = np.unique(labels)
    means = np.stack([re[labels == i].mean(0) for i in ids])
    peaks = means[:, baseline_frames:].max(1)
    moments = _first_pass(means, times, baseline_frames)[1]
    return ids[np.argmin(np.where(peaks >= HIGH_PEAK_SHARE * peaks.max(), moments, np.inf))]


def _clean_blood_voxels(c: _Candidates, members: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Of a cluster's ``members`` (bool over candidates), those with the cluster's shape (correlation
    with ``reference``), an enhancement (area under RE) of at least ``FULL_LUMEN_SHARE`` of the
    cluster's 90th percentile, no inflow-bright
    baseline and no flattened peak (more frames within 2 % of the peak than the cluster's typical
    voxel). The area, not the peak, ranks them: choosing the highest noisy peaks would bias the curve."""
    re = c.re[members]
    centred = re - re.mean(1, keepdims=True)
    ref = reference - reference.mean()
    correlation = centred @ ref / np.maximum(np.linalg.norm(centred, axis=1) * np.linalg.norm(ref), 1e-12)
    peak = c.peak[members]
    area = np.clip(re, 0.0, None).sum(1)   # ranks partial volume: its noise averages out, a peak's does not
    s0 = c.s0[members]
    plateau = (re >= 0.98 * peak[:, None]).sum(1)
    sharp = np.median(plateau)
    full = np.quantile(area, 0.9)   # the full-lumen enhancement; partial volume lowers it
    ok = ((correlation > MIN_CORRELATION) & (area >= FULL_LUMEN_SHARE * full) & (s0 < INFLOW_S0_RATIO * np.median(s0))
          & (plateau <= max(sharp, 1) + 1) & np.all(np.isfinite(re), axis=1))
    out = np.zeros(members.shape, dtype=bool)
    out[np.flatnonzero(members)[ok]] = True
    return out


def _artery(c: _Candidates, labels, times, baseline_frames):
    """(bool over candidates, cluster id) of the arterial voxels: earliest cluster, its earlier half."""
    first = _earliest(labels, c.re, times, baseline_frames)
    members = labels == first
    if members.sum() >= 4:
        halves = _ward(_shapes(c.re[members], baseline_frames), 2)
        earlier = _earliest(halves, c.re[members], times, baseline_frames)
        moments = [_first_pass(c.re[members][halves == h].mean(0)[None], times, baseline_frames)[1][0]
                   for h in np.unique(halves)]
        if np.ptp(moments) >= SPLIT_MIN_FRAMES * np.median(np.diff(times)):
            narrowed = np.zeros_like(members)
            narrowed[np.flatnonzero(members)[halves == earlier]] = True
            members = narrowed
    return _clean_blood_voxels(c, members, c.re[members].mean(0)), first


def _vein(c: _Candidates, labels, artery_cluster, artery_ttp_s, frame_s, spatial_shape):
    """Bool over candidates of the venous voxels, or None: the strongest later-peaking cluster whose
    voxels form a connected group of ``MIN_VEIN_VOXELS`` or more."""
    lo, hi = max(VEIN_DELAY_S[0], frame_s), VEIN_DELAY_S[1] + frame_s
    options = []
    for cluster in np.unique(labels):
        members = labels == cluster
        delay = np.median(c.ttp_s[members]) - artery_ttp_s
        if cluster != artery_cluster and lo <= delay <= hi:
            options.append((float(np.median(c.peak[members])), int(cluster)))
    for _, cluster in sorted(options, reverse=True):
        members = _clean_blood_voxels(c, labels == cluster, c.re[labels == cluster].mean(0))
        grid = np.zeros(int(np.prod(spatial_shape)), dtype=bool)
        grid[c.index[members]] = True
        groups, count = ndimage.label(grid.reshape(spatial_shape))
        if count == 0:
            continue
        sizes = np.bincount(groups.ravel())[1:]
        big = np.isin(groups.ravel()[c.index], np.flatnonzero(sizes >= MIN_VEIN_VOXELS) + 1) & members
        if big.any():
            return big
    return None


def _slab_domain(signal, baseline_frames, domain, noise_sigma=None):
    notes = []
    domain = body_domain(signal, baseline_frames, noise_sigma) if domain is None else np.asarray(domain, dtype=bool)
    if domain.shape != signal.shape[:-1]:
        raise DCEPKInputError(f"the search region has shape {domain.shape} but the series grid is {signal.shape[:-1]}")
    if signal.shape[0] >= MIN_SLICES_FOR_EDGES:
        domain = domain.copy()
        domain[:EDGE_SLICES] = domain[-EDGE_SLICES:] = False
        notes.append(f"the {EDGE_SLICES} slices at each slab edge were not searched (inflow)")
    return domain, notes


def detect_input_function(signal, times_s, baseline_frames: int, kind: str = "either", domain=None,
                          noise_sigma: Optional[float] = None) -> AutoInputFunction:
    """Arterial and venous voxels of a DCE signal series [k, j, i, t] (any magnitude units).

    ``kind``: the voxels whose curve makes the input function: 'artery', 'vein' or 'either' (the
    artery, else the vein). ``domain``: bool [k, j, i] where to search (default: the body, eroded;
    ``noise_sigma``, the series' noise SD if known, sets its floor).
    Raises ``DCEPKInputError`` naming the alternatives when nothing qualifies."""
    if kind not in KINDS:
        raise DCEPKInputError(f"unknown input kind {kind!r}: use one of {', '.join(KINDS)}")
    signal = np.asarray(signal)
    if signal.ndim != 4:
        raise DCEPKInputError(f"automatic input detection needs a 4-D series [k, j, i, t]; got shape {signal.shape}")
    times = np.asarray(times_s, dtype=np.float64)
    baseline_frames = int(baseline_frames)
    if not 2 <= baseline_frames < signal.shape[-1] - 2:
        raise DCEPKInputError(f"automatic input detection needs at least 2 baseline frames and 3 after them; got "
                              f"{baseline_frames} of {signal.shape[-1]}")
    searched, notes = _slab_domain(signal, baseline_frames, domain, noise_sigma)
    c = _candidates(signal, times, baseline_frames, searched)
    if c is None or len(c.index) < 3:
        raise DCEPKInputError(NO_CANDIDATE)
    labels = _ward(_shapes(c.re, baseline_frames), CLUSTERS)
    artery, artery_cluster = _artery(c, labels, times, baseline_frames)
    artery_ttp = float(np.median(c.ttp_s[artery])) if artery.any() else float(np.median(c.ttp_s))
    frame_s = float(np.median(np.diff(times)))
    vein = _vein(c, labels, artery_cluster, artery_ttp, frame_s, signal.shape[:-1])
    label_map = np.zeros(signal.shape[:-1], dtype=np.uint8)
    label_map.ravel()[c.index[artery]] = ARTERY
    if vein is not None:
        label_map.ravel()[c.index[vein & ~artery]] = VEIN
    use = "artery" if (kind == "artery" or (kind == "either" and artery.any())) else "vein"
    chosen = label_map == (ARTERY if use == "artery" else VEIN)
    if not chosen.any():
        raise DCEPKInputError(NO_CANDIDATE if kind != "vein" else
                              "no venous candidate (a vessel peaking 2-10 s after the arteries, 6 voxels or more): "
                              "use --auto-aif artery, place an ROI (--aif-roi) or use a population AIF")
    summary = _summary(c, artery, vein, times)
    notes.append(_describe(summary, use))
    return AutoInputFunction(label_map, chosen, use, notes, summary)


def _summary(c: _Candidates, artery, vein, times) -> Dict:
    out = {"candidates": int(len(c.index))}
    for name, members in (("artery", artery), ("vein", vein)):
        if members is not None and members.any():
            out[name] = {"voxels": int(members.sum()), "time_to_peak_s": float(np.median(c.ttp_s[members])),
                         "peak_relative_enhancement": float(np.median(c.peak[members]))}
    return out


def _describe(summary: Dict, use: str) -> str:
    parts = []
    for name in ("artery", "vein"):
        if name in summary:
            s = summary[name]
            parts.append(f"{s['voxels']} {name} voxels (time to peak {s['time_to_peak_s']:.1f} s, peak enhancement "
                         f"{100 * s['peak_relative_enhancement']:.0f} %)")
    return (f"automatic input detection: {'; '.join(parts)} of {summary['candidates']} candidates; the input "
            f"function is the {use}'s mean curve")
