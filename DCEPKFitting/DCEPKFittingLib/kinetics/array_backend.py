"""One array interface over numpy and torch, so that the forward models and the fitting engine are written
once: numpy on the CPU (no torch import: 1.4 s of a short fit), torch on a GPU (or on a torch.device given).

``array_ops(x)`` gives the ``ArrayOps`` of an array. What numpy and torch spell alike (``exp``, ``where``,
``stack``, ``cumsum``, ``amax``, ``full_like`` ...) passes straight through to the library; the methods
below are the few places where they differ (creation on a device, dtypes, linear algebra, searching,
gathering). Methods of the arrays themselves are used only where both libraries agree (``.sum(-1)``,
``.all(-1)``, ``.any()``, ``.argmin(1)``, ``.argsort(1)``, ``.reshape``, ``.T`` on 2-D, ``@``, ``.tolist()``).
"""

import sys

import numpy as np

_PASS_THROUGH = frozenset((
    "exp", "expm1", "log", "sqrt", "abs", "isfinite", "where", "maximum", "minimum", "nan_to_num", "round",
    "broadcast_to", "moveaxis", "stack", "cumsum", "amax", "zeros_like", "empty_like", "full_like"))


def _is_tensor(x) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch: a tensor exists only once torch is loaded."""
    module = sys.modules.get("torch")
    return module is not None and isinstance(x, module.Tensor)


class ArrayOps:
    """numpy or torch (``is_torch``) behind the names the engine uses; arrays are created like ``like``
    (its float dtype and, for torch, its device) unless a dtype ('bool', 'uint8', 'int64') is named."""

    def __init__(self, module):
        self.xp = module
        self.is_torch = module.__name__ == "torch"

    def __getattr__(self, name):
        if name in _PASS_THROUGH:
            return getattr(self.xp, name)
        raise AttributeError(name)

    # ----------------------------------------------------------------- creation and conversion
    def dtype(self, name, like):
        if name is None:
            return like.dtype
        return getattr(self.xp, {"bool": "bool" if self.is_torch else "bool_"}.get(name, name))

    def _where(self, like):
        return {"device": like.device} if self.is_torch else {}

    def asarray(self, values, like=None, dtype=None):
        if like is None:
            return self.xp.asarray(values, dtype=self.xp.float64)
        if self.is_torch:   # a tensor of that dtype and device is itself (its autograd graph kept)
            return self.xp.as_tensor(values, dtype=self.dtype(dtype, like), device=like.device)
        return np.asarray(values, dtype=self.dtype(dtype, like))

    def zeros(self, shape, like, dtype=None):
        return self.xp.zeros(shape, dtype=self.dtype(dtype, like), **self._where(like))

    def empty(self, shape, like, dtype=None):
        return self.xp.empty(shape, dtype=self.dtype(dtype, like), **self._where(like))

    def full(self, shape, value, like, dtype=None):
        return self.xp.full(shape, value, dtype=self.dtype(dtype, like), **self._where(like))

    def arange(self, n, like):
        return self.xp.arange(n, dtype=self.xp.int64, **self._where(like))

    def eye(self, n, like):
        return self.xp.eye(n, dtype=like.dtype, **self._where(like))

    def logspace(self, start, stop, num, like):
        return self.xp.logspace(start, stop, num, dtype=like.dtype, **self._where(like))

    def astype(self, x, name):
        return x.to(self.dtype(name, x)) if self.is_torch else x.astype(self.dtype(name, x))

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().cpu().numpy() if self.is_torch else x

    def copy(self, x):
        return x.clone() if self.is_torch else x.copy()

    def contiguous(self, x):
        return x.contiguous() if self.is_torch else np.ascontiguousarray(x)

    def numel(self, x) -> int:
        return x.numel() if self.is_torch else x.size

    # ----------------------------------------------------------------- element-wise and shape
    def clamp(self, x, min=None, max=None):
        return self.xp.clamp(x, min, max) if self.is_torch else np.clip(x, min, max)

    def concat(self, arrays, axis=-1):
        return self.xp.cat(arrays, axis) if self.is_torch else np.concatenate(arrays, axis)

    def broadcast_arrays(self, *arrays):
        return self.xp.broadcast_tensors(*arrays) if self.is_torch else np.broadcast_arrays(*arrays)

    def multiply(self, a, b, out):
        return self.xp.mul(a, b, out=out) if self.is_torch else np.multiply(a, b, out=out)

    def add(self, a, b, out):
        return self.xp.add(a, b, out=out) if self.is_torch else np.add(a, b, out=out)

    def subtract(self, a, b, out):
        return self.xp.sub(a, b, out=out) if self.is_torch else np.subtract(a, b, out=out)

    def swap_last(self, x):
        """The last two axes swapped (a batch of matrices transposed)."""
        return x.transpose(-1, -2) if self.is_torch else np.swapaxes(x, -1, -2)

    def diagonal(self, x):
        """The diagonals of a batch of matrices (..., n)."""
        return x.diagonal(dim1=-2, dim2=-1) if self.is_torch else np.diagonal(x, axis1=-2, axis2=-1)

    def diag_embed(self, v):
        """Diagonal matrices (..., n, n) from (..., n)."""
        if self.is_torch:
            return self.xp.diag_embed(v)
        out = np.zeros(v.shape + v.shape[-1:], dtype=v.dtype)
        index = np.arange(v.shape[-1])
        out[..., index, index] = v
        return out

    # ----------------------------------------------------------------- searching and gathering
    def nonzero(self, mask):
        """Positions of the True entries of a 1-D mask."""
        return self.xp.nonzero(mask)[:, 0] if self.is_torch else np.flatnonzero(mask)

    def searchsorted(self, sorted_1d, values):
        if self.is_torch:
            return self.xp.searchsorted(sorted_1d, values.contiguous(), right=True)
        return np.searchsorted(sorted_1d, values, side="right")

    def take_along(self, x, index, axis):
        return self.xp.take_along_dim(x, index, axis) if self.is_torch else np.take_along_axis(x, index, axis)

    def take_last(self, x, index):
        """x[..., index] with ``index`` (..., m) per row; a 1-D ``x`` is shared by all rows."""
        if x.ndim == 1:
            return x[index]
        return self.take_along(self.broadcast_to(x, tuple(index.shape[:-1]) + tuple(x.shape[-1:])), index, -1)

    # ----------------------------------------------------------------- small batched linear algebra
    def solve(self, matrices, vectors):
        """Solutions x of A x = b for a batch (..., n, n), (..., n), and where each succeeded (...,)."""
        if self.is_torch:
            x, info = self.xp.linalg.solve_ex(matrices, vectors[..., None])
            return x[..., 0], info == 0
        return _numpy_batched(np.linalg.solve, matrices, vectors[..., None], lambda x: x[..., 0])

    def inv(self, matrices):
        """Inverses of a batch (..., n, n), and where each succeeded (...,)."""
        if self.is_torch:
            inverse, info = self.xp.linalg.inv_ex(matrices)
            return inverse, info == 0
        return _numpy_batched(np.linalg.inv, matrices, None, lambda x: x)


def _numpy_batched(function, matrices, rhs, finish):
    """numpy's batched solve / inverse, which refuses the whole batch for one singular matrix: then each
    matrix on its own, NaN and a failure flag for the singular ones (as torch's ``*_ex`` report them)."""
    args = (matrices,) if rhs is None else (matrices, rhs)
    ok = np.ones(matrices.shape[:-2], dtype=bool)
    try:
        with np.errstate(all="ignore"):
            return finish(function(*args)), ok
    except np.linalg.LinAlgError:
        pass
    flat = matrices.reshape((-1,) + matrices.shape[-2:])
    flat_rhs = None if rhs is None else rhs.reshape((-1,) + rhs.shape[-2:])
    out = np.full(flat.shape if rhs is None else flat_rhs.shape, np.nan)
    flat_ok = ok.reshape(-1)
    for i in range(flat.shape[0]):
        try:
            out[i] = function(flat[i]) if rhs is None else function(flat[i], flat_rhs[i])
        except np.linalg.LinAlgError:
            flat_ok[i] = False
    return finish(out.reshape(matrices.shape if rhs is None else rhs.shape)), ok


NUMPY_OPS = ArrayOps(np)
_TORCH_OPS = []


def torch_ops() -> ArrayOps:
    """The torch ``ArrayOps`` (imports torch on first use)."""
    if not _TORCH_OPS:
        import torch
        _TORCH_OPS.append(ArrayOps(torch))
    return _TORCH_OPS[0]


def array_ops(x) -> ArrayOps:
    """The ops of an array: torch for tensors, numpy otherwise."""
    return torch_ops() if _is_tensor(x) else NUMPY_OPS
