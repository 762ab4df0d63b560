"""Smooth random fields for synthetic tissue texture: the phantom's maps and the training simulator's
patches draw their spatial variation here."""

from typing import Sequence, Union

import numpy as np
from scipy.ndimage import gaussian_filter


def smooth_random_field(rng: np.random.Generator, shape: Sequence[int], sigma_voxels: Union[float, Sequence[float]],
                        mode: str = "reflect", zero_mean: bool = False) -> np.ndarray:
    """White Gaussian noise of ``shape`` smoothed with a Gaussian of ``sigma_voxels`` (one value, or one
    per axis) and scaled to unit SD (and to zero mean with ``zero_mean``). ``mode`` is the edge rule of
    ``scipy.ndimage.gaussian_filter``: 'reflect' for a volume, 'wrap' for a patch that tiles."""
    field = gaussian_filter(rng.standard_normal(tuple(shape)), sigma=sigma_voxels, mode=mode)
    if zero_mean:
        field = field - field.mean()
    sd = field.std()
    return field / sd if sd > 0 else field
