"""What a training job hands the loop: its data, its loss, its evaluation. See `model.engine`."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Job(Protocol):
    """A training job, as `model.engine.fit` calls it. Pretraining is `model.pretrain.PretrainJob`."""

    name: str  # "pretrain", "classify", "instruct": shown in messages and plot titles

    def n_train(self) -> int:
        """Number of training examples. The loop draws each epoch's order as a permutation of
        range(n_train()) from (seed, epoch) alone, which is what makes --resume exact."""

    def batch(self, idx: torch.Tensor, device: torch.device) -> Any:
        """One micro-batch (anything `loss` and `tokens` understand) from example indices, on `device`."""

    def loss(self, model, batch) -> torch.Tensor:
        """Scalar mean loss of one micro-batch. `model` may be a DDP or torch.compile wrapper: call
        it for the forward (so DDP sees every parameter used); `unwrap(model)` is the bare module."""

    def tokens(self, batch) -> int:
        """Tokens in the micro-batch, for the tokens/sec figure."""

    def evaluate(self, model, device: torch.device, autocast) -> dict[str, float]:
        """Metrics of the current model, e.g. {"eval_train_loss", "val_loss", "val_accuracy"}. The loop
        calls it under torch.no_grad(), model.eval() and torch.random.fork_rng (on rank 0 only), so
        it may draw random numbers freely. `autocast()` is the run's precision context."""

    def sample(self, model, device: torch.device) -> str | None:
        """Optional showcase text (None: nothing to show); same conditions as `evaluate`."""

    def describe(self) -> str:
        """The job's lines in the run header (model, data sizes, how validation was split)."""

    def config(self) -> dict:
        """Optional: the job's settings, saved in the checkpoint as "job_config" (to rebuild the model
        later, or just for the record)."""

    def resume_key(self) -> dict:
        """Job settings that fix which examples each step sees (data file, split, lengths...), by flag
        name: saved in the checkpoint, and --resume refuses when one differs."""


def unwrap(model) -> torch.nn.Module:
    """The bare module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
