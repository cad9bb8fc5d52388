"""A KV cache for generation, in the style of gpt-fast: fixed buffers written in place.

During decoding, the keys and values of every past token are the same at every step, so each
layer keeps them in two preallocated (B, H, max_len, D) buffers and only computes the new token's.
Preallocating (rather than `torch.cat`-ing a growing tensor) means no reallocation and no copy of
the whole past per step, and shapes that never change (what a CUDA graph needs).

Positions are given by `input_pos`, the position of the first of the T new tokens:
  * an int, the same for every sequence (prefill, or a batch of equal-length prompts): the new keys
    go to [input_pos, input_pos + T) and attention is plain bottom-right causal over the first
    input_pos + T keys;
  * a (B,) tensor, per sequence (decoding a right-padded batch): sequence b's keys go to
    [input_pos[b], input_pos[b] + T) and its query t sees keys <= input_pos[b] + t.
Whatever sits past a sequence's own length (pads written by a right-padded prefill, or stale
entries) is never attended to, and is overwritten as the sequence grows.

    cache = KVCaches.for_model(model, batch_size=B, max_len=T_prompt + n_new)
    logits = model(prompt, cache=cache, input_pos=0)                 # prefill: (B, T_prompt, V)
    logits = model(next_tok[:, None], cache=cache, input_pos=lens)   # decode:  (B, 1, V)
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _capturing() -> bool:
    # Checks that read a tensor value on the host would break a CUDA-graph capture.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class KVCache(nn.Module):
    """One layer's keys and values: two (B, H, max_len, D) buffers."""

    def __init__(self, batch_size: int, n_heads: int, max_len: int, head_dim: int, dtype=None, device=None):
        super().__init__()
        shape = (batch_size, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, input_pos):
        """Write the new k, v (B, H, T, D) at input_pos; return the buffers' live part to attend over:
        the first input_pos + T keys for an int input_pos, the whole buffer for per-sequence ones."""
        if k.dtype != self.k.dtype:
            raise TypeError(f"KV cache holds {self.k.dtype} but the model produced {k.dtype} keys; "
                            "build the cache with the model's dtype")
        T = k.shape[2]
        if isinstance(input_pos, int):
            self.k[:, :, input_pos : input_pos + T] = k  # (B, H, T, D) into (B, H, L, D)
            self.v[:, :, input_pos : input_pos + T] = v  # (B, H, T, D) into (B, H, L, D)
            return self.k[:, :, : input_pos + T], self.v[:, :, : input_pos + T]  # 2 x (B, H, pos+T, D)
        B, H, _, D = k.shape
        pos = input_pos.long()[:, None] + torch.arange(T, device=k.device)  # (B, T): each row its own offset
        index = pos[:, None, :, None].expand(B, H, T, D)  # (B, H, T, D)
        self.k.scatter_(2, index, k)  # (B, H, L, D): k[b, h, t] lands at position pos[b, t]
        self.v.scatter_(2, index, v)  # (B, H, L, D)
        return self.k, self.v  # 2 x (B, H, L, D): the attention masks each row at its own length


class KVCaches(nn.Module):
    """The caches of every layer of a model, and the checks that keep writes inside them."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype=None, device=None):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_len", max_len), ("n_layers", n_layers)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KV cache {name} must be a positive int, got {value!r}")
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = nn.ModuleList(
            KVCache(batch_size, n_heads, max_len, head_dim, dtype, device) for _ in range(n_layers)
        )

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> "KVCaches":
        """Caches shaped for `model` (dtype and device default to the model's parameters'). max_len
        defaults to the context length, and may not exceed it (the position embedding ends there)."""
        cfg = model.cfg
        max_len = cfg.context_length if max_len is None else max_len
        if isinstance(max_len, int) and max_len > cfg.context_length:
            raise ValueError(
                f"KV cache max_len {max_len} exceeds the model's context length {cfg.context_length}"
            )
        p = next(model.parameters())
        return cls(cfg.n_layers, batch_size, cfg.n_heads, max_len, cfg.head_dim,
                   dtype=dtype or p.dtype, device=device or p.device)

    def check(self, B: int, T: int, input_pos):
        """Validate a forward of T new tokens for B sequences at input_pos; raise a clear error."""
        if B != self.batch_size:
            raise ValueError(f"batch of {B} sequences but the KV cache was built for {self.batch_size}")
        if isinstance(input_pos, bool) or not isinstance(input_pos, (int, torch.Tensor)):
            raise TypeError(f"input_pos must be an int or a (batch,) tensor, got {type(input_pos).__name__}")
        if isinstance(input_pos, torch.Tensor):
            if input_pos.shape != (B,) or input_pos.dtype.is_floating_point or input_pos.dtype == torch.bool:
                raise ValueError(
                    f"input_pos must be a ({B},) integer tensor, got shape {tuple(input_pos.shape)} "
                    f"and dtype {input_pos.dtype}"
                )
            if _capturing():
                return
            lo, hi = torch.stack([input_pos.min(), input_pos.max()]).tolist()  # one host sync per step
        else:
            lo = hi = input_pos
        if lo < 0:
            raise ValueError(f"input_pos must be >= 0, got {lo}")
        if hi + T > self.max_len:
            raise ValueError(
                f"KV cache overflow: writing {T} token(s) at position {hi} needs {hi + T} slots but the "
                f"cache holds {self.max_len}; build it with a larger max_len (at most the context length)"
            )
