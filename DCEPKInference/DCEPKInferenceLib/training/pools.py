"""Training data pools refreshed through a run: ``chunks`` chunks of simulated data, one chunk replaced
by a new one every ``refresh_every`` steps (fresh data through a long run at a bounded cost).

Deterministic: chunk c is always built from the same seed, and the pool at step s holds chunks
``latest - chunks + 1 .. latest`` with ``latest = chunks - 1 + s // refresh_every``, so a resumed run
rebuilds exactly the pool it stopped with."""

from typing import Callable, Dict, Optional

import torch


class RefreshedPool:
    """``build_chunk(c) -> {name: tensor}`` (equal first dimensions); ``at_step`` brings the pool to a step."""

    def __init__(self, build_chunk: Callable[[int], Dict[str, torch.Tensor]], chunks: int, refresh_every: int):
        self.build_chunk, self.chunks, self.refresh_every = build_chunk, max(int(chunks), 1), int(refresh_every)
        self.data: Optional[Dict[str, torch.Tensor]] = None
        self.built_chunk = -1
        self.rows = 0

    def at_step(self, step: int) -> Dict[str, torch.Tensor]:
        latest = self.chunks - 1 + step // self.refresh_every
        if self.data is None or latest < self.built_chunk:
            slots = [None] * self.chunks
            for chunk in range(max(latest - self.chunks + 1, 0), latest + 1):
                slots[chunk % self.chunks] = self.build_chunk(chunk)
            self.rows = len(next(iter(slots[0].values())))
            self.data = {k: torch.cat([s[k] for s in slots]) for k in slots[0]}
        else:
            for chunk in range(self.built_chunk + 1, latest + 1):
                rows = slice((chunk % self.chunks) * self.rows, (chunk % self.chunks + 1) * self.rows)
                for key, value in self.build_chunk(chunk).items():
                    self.data[key][rows] = value
        self.built_chunk = latest
        return self.data

    def batch(self, rng, size: int) -> Dict[str, torch.Tensor]:
        index = torch.as_tensor(rng.integers(0, len(next(iter(self.data.values()))), size))
        return {k: v[index] for k, v in self.data.items()}
