"""What the optimizer is told: the learning rate of each step and which weights decay.

Learning rate (the book's appendix D): linear warmup from ~0 to `lr` over `warmup_steps`, then a
half cosine down to `min_lr` at the last step. `warmup_steps 0` and `min_lr == lr` give the book's
constant rate of chapter 5.
"""

from __future__ import annotations

import math

import torch.nn as nn


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    Warmup climbs as lr * (step + 1) / (warmup_steps + 1), so the first step already moves (a rate
    of exactly 0 would waste it) and step `warmup_steps` is the first at the full rate. The cosine
    then spans the remaining steps, reaching min_lr at the last one (step total_steps - 1).
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    decay_steps = total_steps - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters (requires_grad): decay the matmul weights (every
    nn.Linear.weight), nothing else.

    Weight decay is a prior that keeps the projections small; it is not wanted on
    - biases and LayerNorm scale/shift: a handful of numbers each, which set offsets and gains, not
      capacity; pulling LayerNorm's scale toward 0 would just fight the normalization;
    - embeddings (token and position): AdamW decays every row at every step, but a token's row only
      gets a gradient when that token is in the batch, so decay would steadily erase rare tokens.
    With --tie-weights the output head *is* the token embedding, so it follows the embedding rule.
    Frozen parameters (fine-tuning) are left out: AdamW keeps no state for them.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matmuls = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if id(p) in matmuls else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
