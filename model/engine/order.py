"""Which examples each optimizer step sees: a pure function of (seed, epoch, batch), for exact resume.

One optimizer step sees one *global batch* of `batch_size x grad_accum x world_size` examples. The
order of epoch e is a permutation drawn from (seed, e) alone, so the position in the data is just
(epoch, batch): that is all a checkpoint needs to continue the same stream.
"""

from __future__ import annotations

import hashlib

import torch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled example order of one epoch, a function of (seed, epoch) only (hashed, so that
    nearby seeds and epochs give unrelated orders)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


class BatchOrder:
    """Global batches of `global_batch` example indices, epoch after epoch, dropping the remainder.
    The whole state is (epoch, batch): that is what a checkpoint keeps."""

    def __init__(self, n_examples: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n_examples, global_batch, seed
        self.steps_per_epoch = n_examples // global_batch
        self.epoch, self.batch = 0, 0
        self._order = None  # (epoch, permutation) cache

    def next(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(self.n, self.seed, self.epoch))
        s = self.batch * self.global_batch
        idx = self._order[1][s : s + self.global_batch]  # (global_batch,)
        self.batch += 1
        if self.batch == self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def micro_batches(idx: torch.Tensor, batch_size: int, grad_accum: int, rank: int, world_size: int):
    """This rank's `grad_accum` slices of one global batch: micro-step m of rank r takes slice
    m * world_size + r, so the union over ranks and micro-steps is the global batch, in order."""
    return [idx[(m * world_size + rank) * batch_size : (m * world_size + rank + 1) * batch_size]
            for m in range(grad_accum)]
