"""The seam between the model and its compute: the ops a GPT spends its time in.

`GPTModel` calls attention, layer norm (alone, or with the residual add before it: `add_layer_norm`),
bias+GELU and cross-entropy (alone, or with the LM head before it: `linear_cross_entropy`) only through an `Ops` object, so the same weights run on PyTorch's
fastest built-ins (`TorchOps`, the default) or on this project's Triton kernels (`FusedOps`) by
swapping one object: `GPTModel(cfg, fused=True)` or `model.use_fused_kernels(True)`. The plain book
math for the same ops is in `kernels/reference.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(Tq: int, Tk: int, device) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j: j <= i + (Tk - Tq) (bottom-right aligned,
    so that queries continuing a KV cache see the whole cached past)."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


class TorchOps:
    """PyTorch built-ins: `scaled_dot_product_attention` (flash/mem-efficient on CUDA), `F.layer_norm`, ..."""

    name = "torch"

    def attention(self, q, k, v, causal: bool = True, dropout_p: float = 0.0):
        # q: (B, H, Tq, D), k/v: (B, H, Tk, D) -> (B, H, Tq, D)
        Tq, Tk = q.shape[-2], k.shape[-2]
        if causal and Tq == 1:
            # One query after the cache's Tk - 1 keys (a decode step) sees every key: no mask to build.
            causal = False
        if causal and Tq != Tk:
            # SDPA's is_causal aligns the mask top-left; a cache continuation needs bottom-right.
            mask = causal_mask(Tq, Tk, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)

    def decode_attention(self, q, k_cache, v_cache, seq_lens, sm_scale=None):
        # q: (B, H, Tq, D), k/v_cache: (B, H, L, D), seq_lens: (B,) -> (B, H, Tq, D).
        # Sequence b holds seq_lens[b] keys, its Tq queries last: query t sits at seq_lens[b] - Tq + t.
        Tq, L = q.shape[-2], k_cache.shape[-2]
        q_pos = seq_lens[:, None] - Tq + torch.arange(Tq, device=q.device)  # (B, Tq)
        mask = torch.arange(L, device=q.device) <= q_pos[:, :, None]  # (B, Tq, L): key j <= query's position
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[:, None], scale=sm_scale)

    def layer_norm(self, x, weight, bias, eps: float = 1e-5):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def add_layer_norm(self, x, residual, weight, bias, eps: float = 1e-5):
        # (h, LayerNorm(h)) with h = x + residual, the updated residual stream
        h = x + residual
        return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

    def bias_gelu(self, x, bias):
        return F.gelu(x + bias, approximate="tanh")

    def linear_gelu(self, x, weight, bias):
        # GELU(x W^T + b): F.linear adds the bias inside the matmul (addmm), no pass of its own.
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")

    def cross_entropy(self, logits, target, ignore_index: int = -100):
        # logits: (N, V), target: (N,) -> scalar mean over non-ignored rows
        return F.cross_entropy(logits, target, ignore_index=ignore_index)

    def linear_cross_entropy(self, x, weight, target, ignore_index: int = -100):
        # x: (N, C), weight: (V, C), target: (N,) -> cross_entropy(x W^T): the (N, V) logits exist here
        return F.cross_entropy(F.linear(x, weight), target, ignore_index=ignore_index)


_KERNELS = None


def _kernels():
    # Imported here, not at the top: the PyTorch path needs no Triton. Built once (by FusedOps()), so
    # that torch.compile, tracing a fused forward, only reads a global (it cannot trace SimpleNamespace()).
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    from types import SimpleNamespace

    from kernels.bias_gelu import bias_gelu
    from kernels.cross_entropy import cross_entropy
    from kernels.decode_attention import decode_attention
    from kernels.flash_attention import flash_attention
    from kernels.layer_norm import add_layer_norm, layer_norm
    from kernels.linear_cross_entropy import linear_cross_entropy

    _KERNELS = SimpleNamespace(flash_attention=flash_attention, decode_attention=decode_attention, layer_norm=layer_norm,
                               add_layer_norm=add_layer_norm, bias_gelu=bias_gelu, cross_entropy=cross_entropy,
                               linear_cross_entropy=linear_cross_entropy)
    return _KERNELS


# What every script prints when --fused runs on a CPU (train.py, generate.py): one text, said once.
INTERPRETER_NOTICE = "note: --fused on CPU runs the Triton kernels in Triton's interpreter: slow, meant for checking"


class FusedOps:
    """The Triton kernels of `kernels/`. Imported lazily: the PyTorch path needs no Triton."""

    name = "fused"

    def __init__(self):
        _kernels()  # fail at the switch, not at the first forward, if Triton cannot be imported

    def attention(self, q, k, v, causal: bool = True, dropout_p: float = 0.0):
        # dropout_p > 0 only while training (the model passes 0 in eval): dropped inside the kernel
        return _kernels().flash_attention(q, k, v, causal=causal, dropout_p=dropout_p)

    def decode_attention(self, q, k_cache, v_cache, seq_lens, sm_scale=None):
        # The KV cache has checked the lengths once for this step: no device-to-host sync per layer.
        return _kernels().decode_attention(q, k_cache, v_cache, seq_lens, sm_scale=sm_scale, check_lengths=False)

    def layer_norm(self, x, weight, bias, eps: float = 1e-5):
        return _kernels().layer_norm(x, weight, bias, eps)

    def add_layer_norm(self, x, residual, weight, bias, eps: float = 1e-5):
        # Under autocast the residual stream stays fp32 while a branch's output comes out bf16: add in
        # the wider dtype, as `x + residual` would (the kernel takes one dtype for both).
        dtype = torch.promote_types(x.dtype, residual.dtype)
        return _kernels().add_layer_norm(x.to(dtype), residual.to(dtype), weight, bias, eps)

    def bias_gelu(self, x, bias):
        return _kernels().bias_gelu(x, bias)

    def linear_gelu(self, x, weight, bias):
        # The matmul without its bias, which the bias+GELU kernel adds in the same pass as the GELU.
        return self.bias_gelu(F.linear(x, weight), bias)

    def cross_entropy(self, logits, target, ignore_index: int = -100):
        return _kernels().cross_entropy(logits, target, ignore_index=ignore_index)

    def linear_cross_entropy(self, x, weight, target, ignore_index: int = -100):
        # The LM head and the loss chunk by chunk: the (N, V) logits are never stored.
        return _kernels().linear_cross_entropy(x, weight, target, ignore_index=ignore_index)


def get_ops(fused: bool):
    return FusedOps() if fused else TorchOps()
