"""The book's math for the ops the Triton kernels replace, in plain PyTorch.

These are the test oracle (run them in float64) and the readable baseline: each is written the way
the book derives it, step by step, with no fused built-ins. They are not fast: `attention` builds
the full (T, T) score matrix, `cross_entropy` the full log-softmax.
"""

from __future__ import annotations

import math

import torch


def attention(q, k, v, causal: bool = True, sm_scale: float | None = None, seq_lens=None):
    """softmax(q k^T * scale + mask) v.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D). With Tk > Tq (a prompt continued against a KV cache)
    the causal mask is aligned bottom-right: query i sits at absolute position i + (Tk - Tq) and
    sees keys j <= i + (Tk - Tq). seq_lens (B,), optional: only the first seq_lens[b] keys of
    sequence b exist (the rest of a preallocated cache is garbage and must be masked out).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.tril(keep, diagonal=Tk - Tq)  # bottom-right aligned
    keep = keep.expand(q.shape[0], 1, Tq, Tk)
    if seq_lens is not None:
        key_pos = torch.arange(Tk, device=q.device)
        keep = keep & (key_pos[None, None, None, :] < seq_lens.view(-1, 1, 1, 1))
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    weights = torch.nan_to_num(weights)  # a query with no visible key gets zeros, not NaN
    return weights @ v  # (B, H, Tq, D)


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance, as the book)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-5):
    """(h, layer_norm(h)) with h = x + residual: a pre-LN block adds a branch's output to the residual
    stream, then normalizes the updated stream for the next branch."""
    h = x + residual
    return h, layer_norm(h, weight, bias, eps)


def gelu_tanh(x):
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def bias_gelu(x, bias):
    """GELU(x + bias), bias broadcast over the last dim: the MLP's first linear layer, unfused."""
    return gelu_tanh(x + bias)


def cross_entropy(logits, target, ignore_index: int = -100, reduction: str = "mean"):
    """-log softmax(logits)[target] per row; rows whose target is ignore_index count for nothing.

    logits: (N, V), target: (N,). "mean" divides by the number of rows that are not ignored and
    gives 0 (not NaN) when every row is ignored.
    """
    logprobs = torch.log_softmax(logits, dim=-1)  # (N, V)
    valid = target != ignore_index  # (N,)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    loss = -logprobs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)  # (N,)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"cross_entropy: unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
