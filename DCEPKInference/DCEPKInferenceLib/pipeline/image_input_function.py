"""Image-only mode: the input function read from the image by the shipped reader network
(``nn.aif_reader``), then used by an AIF-conditioned network exactly as one the user gives.

The reader was trained on single slices; a volume is read slice by slice and the slices' attention
is joined into one softmax over the whole body (each slice's softmax weighted by its share of the
total, which is what one softmax over every voxel gives), so the vessels of any slice can carry the
answer and memory stays one slice's worth. The body is the voxels whose baseline signal stands
above 10 % of its 99th percentile (``inference.auto_mask``), not the user's tissue mask: the vessels
are rarely inside the tumour.

What the user sees: the curve, and the voxels that carry ``ATTENTION_SHARE`` of the reader's
attention as a mask (label 1), like an automatic detection's.
"""

import numpy as np
import torch

from DCEPKFittingLib.core.jobs import raise_if_cancelled
from DCEPKFittingLib.pipeline.input_function import SignalInputFunction

from ..data import canonical_grid as cg
from ..nn.aif_reader import pixel_descriptors
from ..nn.input_definitions import READ_LABEL, READER_MODEL
from ..nn.model_store import load_model

ATTENTION_SHARE = 0.8     # the voxels shown: the fewest that carry this share of the reader's attention


def _slice_inputs(signal_2d, times_s, baseline_frames, fa_deg, tr_s, r1_per_mM_s, body_2d):
    """The reader's image inputs for one slice's body bounding box: descriptors (1, D, h, w), curves
    (1, G, h, w) and body (1, 1, h, w) as float32 tensors, with the box (j0, j1, i0, i1)."""
    rows, cols = np.flatnonzero(body_2d.any(1)), np.flatnonzero(body_2d.any(0))
    j0, j1, i0, i1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = body_2d[j0:j1, i0:i1]
    h, w = box.shape
    found = pixel_descriptors(np.asarray(signal_2d[j0:j1, i0:i1][box], dtype=np.float64), times_s, baseline_frames,
                              fa_deg, tr_s, r1_per_mM_s)
    descriptors = np.empty((h * w, found["descriptors"].shape[1]), np.float32)
    descriptors[:] = np.median(found["descriptors"], axis=0)   # outside the body: a typical body voxel
    descriptors[box.ravel()] = found["descriptors"]
    curves = np.zeros((h * w, found["curves"].shape[1]), np.float32)
    curves[box.ravel()] = found["curves"]
    image = lambda a: torch.from_numpy(np.ascontiguousarray(a.T.reshape(1, -1, h, w)))  # noqa: E731
    return image(descriptors), image(curves), torch.from_numpy(box[None, None].astype(np.float32)), \
        (j0, j1, i0, i1), found["valid"]


@torch.no_grad()
def read_input_function(series, body, baseline_frames: int, *, fa_deg, tr_s, r1_per_mM_s, device="cpu",
                        models_dir=None, cancel=None, reader: str = READER_MODEL):
    """(plasma input function (T,) mM on the frame times, ``SignalInputFunction`` with the voxels that
    carry ``ATTENTION_SHARE`` of the attention as ``label_map`` and notes) for ``series`` (signal)."""
    model, card = load_model(reader, device, models_dir)
    model.eval()
    slices = [k for k in range(series.spatial_shape[0]) if body[k].any()]
    if not slices:
        raise ValueError("read_input_function needs a body mask with voxels")
    per_slice = []   # (log-sum-exp of the logits, softmax-weighted curve and descriptors, weights, box)
    valid = None
    for k in slices:
        raise_if_cancelled(cancel)
        descriptors, curves, box_body, box, valid = _slice_inputs(series.signal[k], series.times_s, baseline_frames,
                                                                  fa_deg, tr_s, r1_per_mM_s, body[k])
        logits, x = model.logits(descriptors.to(device), box_body.to(device))
        weights = torch.softmax(logits, dim=1)
        per_slice.append((torch.logsumexp(logits, dim=1), weights @ curves.flatten(2).to(device).transpose(1, 2),
                          weights @ x.flatten(2).transpose(1, 2), weights.cpu().numpy()[0], box))
    share = torch.softmax(torch.cat([p[0] for p in per_slice]), dim=0)              # each slice's share
    shape = sum(s * p[1][0] for s, p in zip(share, per_slice))                       # (1, G)
    pooled = sum(s * p[2][0] for s, p in zip(share, per_slice))                      # (1, D)
    plasma_grid, log_sd = model.amplitude_corrected(shape, pooled)
    plasma_grid = plasma_grid[0].cpu().numpy().astype(np.float64)
    attention = np.zeros(series.spatial_shape, np.float64)
    for k, s, (_, _, _, weights, (j0, j1, i0, i1)) in zip(slices, share.cpu().numpy(), per_slice):
        attention[k, j0:j1, i0:i1] = float(s) * weights.reshape(j1 - j0, i1 - i0)
    order = np.argsort(attention, axis=None)[::-1]
    top = order[:int(np.searchsorted(np.cumsum(attention.ravel()[order]), ATTENTION_SHARE)) + 1]
    label_map = np.zeros(series.spatial_shape, np.uint8)
    label_map.ravel()[top] = READ_LABEL
    grid = cg.grid_times_s()[valid > 0]
    relative = series.times_s - series.times_s[0]
    plasma = np.interp(relative, grid, plasma_grid[valid > 0])
    notes = [f"input function read from the image by {card.get('name', reader)}: {top.size} voxels carry "
             f"{ATTENTION_SHARE:.0%} of its attention in {len(slices)} slice(s); amplitude uncertain by a factor "
             f"{float(torch.exp(log_sd[0])):.2f} (1 SD)"]
    if relative[-1] > cg.grid_times_s()[-1] + cg.GRID_STEP_S:
        notes.append(f"the reader sees the first {cg.grid_times_s()[-1]:.0f} s: the input function after that is "
                     "held at its last value")
    return plasma, SignalInputFunction(blood_mM=None, label_map=label_map, notes=notes)
