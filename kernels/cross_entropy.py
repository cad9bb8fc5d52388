"""Fused softmax cross-entropy: the loss and its gradient from one kernel, over a 50,257-wide vocabulary.

The math
--------
For one row of logits x (length V) and its target class t,

    loss = -log softmax(x)[t] = logsumexp(x) - x[t],      logsumexp(x) = m + log(sum_j exp(x_j - m))

with m = max_j x_j subtracted so that no exp overflows (logits of magnitude 1e3 are fine). Its
derivative is the one fact that makes the fusion possible:

    d loss / d x_j = softmax(x)_j - [j == t]

It needs nothing but the logits, the target and the row's logsumexp. So once a kernel knows the LSE it
can write the gradient straight away, in the forward pass, and backward has nothing left to compute:
it multiplies by grad_output (a scalar for "mean"/"sum", one number per row for "none"), or, in the
usual `loss.backward()` where grad_output is 1, just hands the buffer on. "mean" divides by the number
of rows whose target is not `ignore_index`, so that count is taken first (one reduction over the
(N,) targets, on the host) and 1/count is folded into the gradient as it is written.

The online softmax
------------------
A 50,257-wide row does not fit in one block of registers, so one program walks its row in chunks of
BLOCK_V, keeping two fp32 scalars: the running max m and the running sum d = sum exp(x_j - m) over
the chunks seen so far. When a chunk raises the max to m', the old sum was measured against the wrong
reference and is rescaled: d' = d * exp(m - m') + sum_chunk exp(x_j - m'). After the last chunk,
logsumexp = m + log d: one read of the row, where the textbook needs two (a max pass, then a sum
pass). A second walk over the row then writes softmax - onehot = exp(x - m - log d) - onehot.

Memory traffic (N = 8192 rows, V = 50,257, bf16: one (N, V) tensor = 411,705,344 x 2 B = 823 MB)
-------------------------------------------------------------------------------------------------
PyTorch eager, F.cross_entropy = log_softmax + nll_loss:
    forward   read logits, write log_softmax (kept for backward)                  2 x 823 MB
    backward  nll_loss writes a dense one-hot gradient; log_softmax's backward
              reads it and the saved log_softmax and writes the logits' gradient  4 x 823 MB
    total                                                                        ~4.9 GB
Fused (this file):
    forward   read logits twice (LSE pass, gradient pass), write the gradient    3 x 823 MB
    backward  grad_output == 1: nothing; otherwise read + write the gradient     0 (or 2) x 823 MB
    total                                                                        ~2.5 GB
Both keep one (N, V) tensor alive between forward and backward (log_softmax there, the gradient
here), so the saving is in traffic, not in memory. `linear_cross_entropy` at the end of this file
saves the memory too: it never holds more than a chunk of rows of logits.

We do not overwrite the logits with their gradient (Liger-Kernel does, to save that one buffer): the
logits belong to autograd, and a caller that looks at them after backward would read gradients.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from kernels._common import (  # must precede the @triton.jit kernels (switches on the interpreter)
    CompileSpec,
    cast_for_store,
    check_device,
    check_dtype,
    check_ndim,
    device_guard,
    next_power_of_2,
)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_OP = "cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS,  # (N, V) fp32/fp16/bf16, row stride stride_row, unit column stride
    TARGET,  # (N,) int64
    LOSS,  # (N,) fp32: per-row loss, 0 on ignored rows
    GRAD,  # (N, V) logits' dtype, contiguous: (softmax - onehot) * scale; unused unless HAS_GRAD
    stride_row,
    V,
    ignore_index,
    scale,  # fp32: 1/count for "mean", 1 for "sum" and "none"
    BLOCK_V: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    # int64 row offsets: N * V passes 2^31 at N = 42,731 rows of a GPT-2 vocabulary.
    row = tl.program_id(0).to(tl.int64)
    logits_row = LOGITS + row * stride_row
    grad_row = GRAD + row * V
    offs = tl.arange(0, BLOCK_V)
    tgt = tl.load(TARGET + row)

    if tgt == ignore_index:
        # An ignored row costs no read of its logits; its gradient is still written (as zeros), since
        # the buffer comes from torch.empty and backward hands every element on.
        tl.store(LOSS + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(grad_row + cols, tl.zeros([BLOCK_V], dtype=GRAD.dtype.element_ty), mask=cols < V)
    else:
        # Pass 1: online softmax. Masked lanes load -inf, so they add exp(-inf) = 0 to the sum and
        # never win the max; every chunk has at least one real lane, so m is finite after chunk one
        # and exp(m - m_new) never sees -inf - (-inf).
        m = tl.full([], float("-inf"), dtype=tl.float32)
        d = tl.full([], 0.0, dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        log_d = tl.log(d)

        # loss = lse - x[t], written as (m - x[t]) + log d: forming lse = m + log d first would round
        # it at the magnitude of m (1e3 -> an error of 6e-5) before the near-cancelling subtraction.
        x_t = tl.load(logits_row + tgt).to(tl.float32)
        tl.store(LOSS + row, (m - x_t) + log_d)

        if HAS_GRAD:
            # Pass 2: the gradient. exp(x - m - log d) is evaluated left to right, (x - m) first, for
            # the same reason as above.
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                p = tl.exp(x - m - log_d)
                g = (p - tl.where(cols == tgt, 1.0, 0.0)) * scale
                tl.store(grad_row + cols, cast_for_store(g, GRAD.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
# One program owns a row and loops over it, so BLOCK_V only trades registers for loop trips: 4096
# fp32 values over 16 warps is 8 per thread. Small vocabularies get one chunk that covers the row.
MIN_BLOCK_V, MAX_BLOCK_V = 128, 4096
NUM_STAGES = 3  # Triton's default on NVIDIA, stated so that COMPILE_SPECS builds what we launch


def _launch_config(V: int, max_block_v: int = MAX_BLOCK_V) -> dict:
    block_v = min(max(next_power_of_2(V), MIN_BLOCK_V), max_block_v)
    return {"BLOCK_V": block_v, "num_warps": min(max(block_v // 256, 1), 16), "num_stages": NUM_STAGES}


def _cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    scale: float,
    compute_grad: bool,
    max_block_v: int = MAX_BLOCK_V,
):
    """Per-row fp32 loss (N,) and, if compute_grad, the gradient (N, V) in the logits' dtype, scaled by
    `scale`. Inputs must already be checked (see `_check_inputs`). `max_block_v` (a power of 2 in
    [MIN_BLOCK_V, MAX_BLOCK_V]) lets tests force many chunks on a small vocabulary."""
    if max_block_v not in [2**k for k in range(7, 13)]:
        raise ValueError(f"{_OP}: max_block_v must be a power of 2 in [{MIN_BLOCK_V}, {MAX_BLOCK_V}]")
    N, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # coalesced loads need the vocabulary contiguous; rows may be strided
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device) if compute_grad else None
    if N == 0:
        return loss, grad
    cfg = _launch_config(V, max_block_v)
    with device_guard(logits.device):
        _cross_entropy_fwd_kernel[(N,)](
            logits, target, loss, grad if compute_grad else logits,  # GRAD is never touched without HAS_GRAD
            logits.stride(0), V, ignore_index, scale,
            BLOCK_V=cfg["BLOCK_V"], HAS_GRAD=compute_grad,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return loss, grad


def _check_inputs(logits, target, ignore_index, reduction):
    """Validate, and return (target as int64, number of non-ignored rows). One host sync: the range
    check and the count come back together."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_OP}: unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{_OP}: logits and target must be tensors")
    check_ndim(logits, "logits", _OP, 2, "(N, V)")
    check_dtype(logits, "logits", _OP)
    check_dtype(target, "target", _OP, dtypes=(torch.int64, torch.int32))
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{_OP}: target must be 1-D (N,) with N = logits.shape[0] = {logits.shape[0]}, "
            f"got shape {tuple(target.shape)}"
        )
    if logits.shape[1] == 0:
        raise ValueError(f"{_OP}: logits has an empty class dimension, shape {tuple(logits.shape)}")
    check_device(logits, target, op=_OP)
    V = logits.shape[1]
    target = target.to(torch.int64).contiguous()  # the kernel reads TARGET + row
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= V))
    n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
    if n_bad:
        first = target[bad][0].item()
        raise ValueError(
            f"{_OP}: {n_bad} target(s) outside [0, {V}) that are not ignore_index={ignore_index}, "
            f"e.g. {first}"
        )
    return target, n_valid


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
def _loss_and_grad(logits, target, ignore_index, reduction, compute_grad, max_block_v=MAX_BLOCK_V):
    """The reduced loss (logits' dtype) and, if compute_grad, d loss / d logits for grad_output = 1."""
    target, n_valid = _check_inputs(logits, target, ignore_index, reduction)
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    loss_rows, grad = _cross_entropy_fwd(logits, target, ignore_index, scale, compute_grad, max_block_v)
    if reduction == "none":
        return loss_rows.to(logits.dtype), grad
    total = loss_rows.sum()  # fp32, ignored rows are 0
    if reduction == "mean":
        total = total / max(n_valid, 1)  # every row ignored: 0, not 0/0
    return total.to(logits.dtype), grad


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index=-100, reduction="mean", max_block_v=MAX_BLOCK_V):
        loss, grad = _loss_and_grad(logits, target, ignore_index, reduction, True, max_block_v)
        ctx.reduction = reduction
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad = grad * grad_output.unsqueeze(1)  # (N, V) * (N, 1)
        elif grad_output.item() != 1.0:
            # Out of place: the buffer is saved on ctx and may be needed again (retain_graph=True).
            # For the common loss.backward() grad_output is 1 and the buffer is handed on untouched.
            grad = grad * grad_output
        return grad, None, None, None, None


def cross_entropy(logits, target, ignore_index: int = -100, reduction: str = "mean"):
    """F.cross_entropy(logits, target, ignore_index=..., reduction=...) for (N, V) logits and (N,)
    int64/int32 targets, fused: the gradient is written during the forward pass. The loss has the
    logits' dtype (accumulation is fp32). Rows with target == ignore_index add 0 loss and 0 gradient;
    "mean" averages over the other rows and is 0 when there are none."""
    if isinstance(logits, torch.Tensor) and logits.requires_grad and torch.is_grad_enabled():
        return CrossEntropyFunction.apply(logits, target, ignore_index, reduction)
    # No gradient wanted (inference, evaluation, torch.no_grad): no (N, V) buffer, no second pass.
    # (Inside Function.forward grad mode is always off and ctx.needs_input_grad ignores no_grad,
    # so this decision is made out here.)
    return _loss_and_grad(logits, target, ignore_index, reduction, compute_grad=False)[0]


# ----------------------------------------------------------------------------------------------
# Compile specs: every configuration `_launch_config` can return, with and without the gradient pass.
# ----------------------------------------------------------------------------------------------
_BLOCK_V_CHOICES = [2**k for k in range(int(math.log2(MIN_BLOCK_V)), int(math.log2(MAX_BLOCK_V)) + 1)]

COMPILE_SPECS = [
    CompileSpec(
        name=f"cross_entropy.fwd.{ty}",
        kernel=_cross_entropy_fwd_kernel,
        signature={
            "LOGITS": f"*{ty}", "TARGET": "*i64", "LOSS": "*fp32", "GRAD": f"*{ty}",
            "stride_row": "i32", "V": "i32", "ignore_index": "i32", "scale": "fp32",
            "BLOCK_V": "constexpr", "HAS_GRAD": "constexpr",
        },
        configs=[
            {**_launch_config(block_v, max_block_v=block_v), "HAS_GRAD": has_grad}
            for block_v in _BLOCK_V_CHOICES
            for has_grad in (True, False)
        ],
    )
    for ty in ("fp32", "fp16", "bf16")
]
