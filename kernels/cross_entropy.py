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
usual eager `loss.backward()` where grad_output is 1, just hands the buffer on. "mean" divides by the
number of rows whose target is not `ignore_index`, so that count is taken first (one reduction over
the (N,) targets) and 1/count is folded into the gradient as it is written. The count comes back to
the host together with the range check of the targets (an out-of-range target would make the kernel
read outside its row, so it must be refused before the launch, with an error that says which): one
host sync, which a device-side count could not save, since the check needs it anyway. It happens
inside a custom op (`gpt_triton::cross_entropy_fwd`), at run time, so torch.compile never sees it.

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
    backward  grad_output == 1 (eager): nothing; else read + write the gradient  0 (or 2) x 823 MB
    total                                                                        ~2.5 GB
Both keep one (N, V) tensor alive between forward and backward (log_softmax there, the gradient
here), so the saving is in traffic, not in memory. `linear_cross_entropy` (lesson 3b,
kernels/linear_cross_entropy.py) saves the memory too: it never holds more than a chunk of
rows of logits.

We do not overwrite the logits with their gradient (Liger-Kernel does, to save that one buffer): the
logits belong to autograd, and a caller that looks at them after backward would read gradients.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from kernels._common import (  # must precede the @triton.jit kernels (switches on the interpreter)
    DTYPE_NAMES,
    GPT2_CONTEXT,
    GPT2_VOCAB,
    TRAIN_DTYPES,
    CompileSpec,
    INTERPRETER_TILE,
    NUM_STAGES,
    cast_for_store,
    check_device,
    check_dtype,
    check_ndim,
    device_guard,
    interpreter_configs,
    next_power_of_2,
)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_OP = "cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------
# Configurations: block sizes, the GPU's and the interpreter's
# ----------------------------------------------------------------------------------------------
# On a GPU one program owns a row (BLOCK_ROWS = 1) and loops over it, so BLOCK_V only trades registers
# for loop trips: 4096 fp32 values over 16 warps is 8 per thread. Small vocabularies get one chunk
# that covers the row. In the interpreter every lane of a block costs the same, masked or not (each
# tl.* call is a NumPy operation over the whole tile), so the block is the power of 2 that pads the
# vocabulary least without making the loop long: 2,048 pads 50,257 to 51,200 (2%), where
# one 65,536-wide block pads it by 30%. A program takes as many rows as make INTERPRETER_ROWS_TILE
# elements (256 rows of 2,048), measured the fastest: large enough that the Python cost of each
# tl.* call stops mattering, small enough for the tile's pointer array (8 bytes an element) to stay
# in a CPU cache.
MIN_BLOCK_V, MAX_BLOCK_V = 128, 4096
INTERPRETER_BLOCK_V = 2048
INTERPRETER_MAX_BLOCK_V = 2**16  # the widest a caller may ask for (tests of the one-block row)
INTERPRETER_ROWS_TILE = INTERPRETER_TILE // 2
_BLOCK_V_CHOICES = [2**k for k in range(int(math.log2(MIN_BLOCK_V)), int(math.log2(INTERPRETER_MAX_BLOCK_V)) + 1)]
_GPU_BLOCK_V_CHOICES = [b for b in _BLOCK_V_CHOICES if b <= MAX_BLOCK_V]


def launch_config(V: int, max_block_v: int = MAX_BLOCK_V) -> dict:
    """The GPU's configuration: one row per program."""
    block_v = min(max(next_power_of_2(V), MIN_BLOCK_V), max_block_v)
    return {"BLOCK_ROWS": 1, "BLOCK_V": block_v, "num_warps": min(max(block_v // 256, 1), 16), "num_stages": NUM_STAGES}


def interpreter_config(N: int, V: int, max_block_v: int = INTERPRETER_BLOCK_V) -> dict:
    """The interpreter's: blocks of up to INTERPRETER_BLOCK_V, as many rows as fill its tile."""
    block_v = min(max(next_power_of_2(V), MIN_BLOCK_V), max_block_v)
    rows = min(max(INTERPRETER_ROWS_TILE // block_v, 1), next_power_of_2(N))
    return {"BLOCK_ROWS": rows, "BLOCK_V": block_v, "num_warps": 1, "num_stages": NUM_STAGES}


# ----------------------------------------------------------------------------------------------
# The lesson's counts: the docstring's traffic as code, for any shape (checked against a trace of the
# interpreter by tests/test_explain.py; printed by `python scripts/explain.py cross_entropy`). Bytes
# are what the program of each row requests. No tl.dot here.
# ----------------------------------------------------------------------------------------------
def memory_traffic(kernel: str, N: int, V: int, x_bytes: int, n_valid: int, has_grad: bool = True) -> dict:
    """{kernel argument: (bytes read, bytes written)} of one launch of "fwd" over N rows of V logits,
    n_valid of them not ignored: each such row is read once for its log-sum-exp, once more for the
    gradient (with has_grad), plus its target logit; an ignored row reads nothing but its target and
    writes zeros. The gradient is written whole, then once more at each valid row's target (the
    one-hot's correction). Targets are int64, losses fp32."""
    if kernel != "fwd":
        raise ValueError(f"unknown kernel {kernel!r}")
    reads_per_row = V * (2 if has_grad else 1) + 1
    return {"LOGITS": (n_valid * reads_per_row * x_bytes, 0), "TARGET": (N * 8, 0), "LOSS": (0, N * 4),
            **({"GRAD": (0, (N * V + n_valid) * x_bytes)} if has_grad else {})}


def flops(kernel: str, *args, **kwargs) -> int:
    """FLOPs of tl.dots: none (a few per logit, free next to the bytes)."""
    if kernel != "fwd":
        raise ValueError(f"unknown kernel {kernel!r}")
    return 0


# ----------------------------------------------------------------------------------------------
# Forward kernel: the math is in the module docstring; step markers name each formula
# ----------------------------------------------------------------------------------------------
@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS,  # (N, V) fp32/fp16/bf16, row stride stride_row, unit column stride
    TARGET,  # (N,) int64
    LOSS,  # (N,) fp32: per-row loss, 0 on ignored rows
    GRAD,  # (N, V) logits' dtype, contiguous: (softmax - onehot) * scale; unused unless HAS_GRAD
    stride_row,
    N,
    V,
    ignore_index,
    scale,  # fp32: 1/count for "mean", 1 for "sum" and "none"
    BLOCK_ROWS: tl.constexpr,  # rows per program: 1 on a GPU, many in the interpreter
    BLOCK_V: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    # int64 row offsets: N * V passes 2^31 at N = 42,731 rows of a GPT-2 vocabulary.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_range = rows < N
    tgt = tl.load(TARGET + rows, mask=in_range, other=ignore_index)
    # An ignored row costs no read of its logits (its loads are masked off); its gradient is still
    # written (as zeros), since the buffer comes from torch.empty and backward hands every element on.
    valid = in_range & (tgt != ignore_index)
    logits_rows = LOGITS + rows[:, None] * stride_row  # (BLOCK_ROWS, 1) row pointers
    grad_rows = GRAD + rows[:, None] * V
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: online softmax. Masked lanes load -inf, so they add exp(-inf) = 0 to the sum and never
    # win the max. While the max is still -inf (the row so far is all -inf: a masked-out stretch of
    # vocabulary, or an ignored row) we subtract 0 instead of it, or exp(-inf - -inf) would be NaN.
    m = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    d = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(logits_rows + cols[None, :], mask=valid[:, None] & (cols < V)[None, :],
                    other=float("-inf")).to(tl.float32)
        # -- raise the running max, rescale d by exp(m - m'), add the chunk's exp(x - m') --
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
        m = m_new
    # Ignored rows end with m = -inf and d = 0: give them m = 0, log d = 0, so that nothing below
    # evaluates log 0 or -inf - -inf (their loss and gradient are set to 0 anyway).
    m = tl.where(valid, m, 0.0)
    log_d = tl.log(tl.where(valid, d, 1.0))

    # -- loss = lse - x[t], written as (m - x[t]) + log d --
    # Forming lse = m + log d first would round it at the magnitude of m (1e3 -> an error of 6e-5)
    # before the near-cancelling subtraction.
    x_t = tl.load(LOGITS + rows * stride_row + tgt, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + rows, tl.where(valid, (m - x_t) + log_d, 0.0), mask=in_range)

    if HAS_GRAD:
        # Pass 2: the gradient. exp(x - m - log d) is evaluated left to right, (x - m) first, for
        # the same reason as above. An ignored row loaded -inf with m = log d = 0: its p is exactly 0,
        # so its zeros need no select of their own.
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            col_ok = (cols < V)[None, :]
            x = tl.load(logits_rows + cols[None, :], mask=valid[:, None] & col_ok, other=float("-inf")).to(tl.float32)
            # -- d loss / d x_j = softmax_j * scale, for every j (the target's term comes below) --
            p = tl.exp(x - m[:, None] - log_d[:, None])
            tl.store(grad_rows + cols[None, :], cast_for_store(p * scale, GRAD.dtype.element_ty), mask=in_range[:, None] & col_ok)
        # -- the one-hot: d loss / d x_t = (softmax_t - 1) * scale, one element per row --
        # Subtracting [j == t] inside the loop would cost a compare, a select and a subtraction on
        # every logit for one element per row; instead the target's gradient is rewritten from x_t,
        # which the loss already loaded (the same formula as the loop, so the same rounding). The
        # barrier orders this store after the loop's store of the same element by another thread.
        tl.debug_barrier()
        p_t = tl.exp(x_t - m - log_d)
        tl.store(GRAD + rows * V + tgt, cast_for_store((p_t - 1.0) * scale, GRAD.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Launchers: checks, grid, launch
# ----------------------------------------------------------------------------------------------
def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    scale: float,
    compute_grad: bool,
    max_block_v: int = 0,
):
    """Per-row fp32 loss (N,) and, if compute_grad, the gradient (N, V) in the logits' dtype, scaled by
    `scale`. Inputs must already be checked (see `_check_inputs`). `max_block_v` (0: the launcher's
    choice, or a power of 2 in [MIN_BLOCK_V, 65,536]) lets tests force many chunks on a small vocabulary."""
    if max_block_v and max_block_v not in _BLOCK_V_CHOICES:
        raise ValueError(f"{_OP}: max_block_v must be 0 or a power of 2 in [{MIN_BLOCK_V}, {INTERPRETER_MAX_BLOCK_V}]")
    N, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # coalesced loads need the vocabulary contiguous; rows may be strided
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device) if compute_grad else None
    if N == 0:
        return loss, grad
    if interpreter_configs(logits.device):
        cfg = interpreter_config(N, V, max_block_v or INTERPRETER_BLOCK_V)
    else:
        cfg = launch_config(V, min(max_block_v or MAX_BLOCK_V, MAX_BLOCK_V))
    with device_guard(logits.device):
        _cross_entropy_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_ROWS"]),)](
            logits, target, loss, grad if compute_grad else logits,  # GRAD is never touched without HAS_GRAD
            logits.stride(0), N, V, ignore_index, scale, HAS_GRAD=compute_grad, **cfg,
        )
    return loss, grad


def _check_args(ignore_index, reduction, op):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_target(target, N, op):
    """The targets' dtype and shape; their values are checked by `_checked_target`, inside the ops."""
    check_dtype(target, "target", op, dtypes=(torch.int64, torch.int32))
    if target.dim() != 1 or target.shape[0] != N:
        raise ValueError(f"{op}: target must be 1-D (N,) with N = {N} rows, got shape {tuple(target.shape)}")


def _checked_target(target, V, ignore_index, op):
    """(target as contiguous int64, number of rows that are not ignored), refusing targets outside
    [0, V) that are not ignore_index. One host sync: the range check and the count come back together.
    Called only inside the custom ops, which torch.compile does not trace."""
    target = target.to(torch.int64).contiguous()  # the kernel reads TARGET + row
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= V))
    n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
    if n_bad:
        first = target[bad][0].item()
        raise ValueError(
            f"{op}: {n_bad} target(s) outside [0, {V}) that are not ignore_index={ignore_index}, e.g. {first}"
        )
    return target, n_valid


def _check_inputs(logits, target, ignore_index, reduction):
    _check_args(ignore_index, reduction, _OP)
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{_OP}: logits and target must be tensors")
    check_ndim(logits, "logits", _OP, 2, "(N, V)")
    check_dtype(logits, "logits", _OP)
    if logits.shape[1] == 0:
        raise ValueError(f"{_OP}: logits has an empty class dimension, shape {tuple(logits.shape)}")
    check_device(logits, target, op=_OP)
    _check_target(target, logits.shape[0], _OP)


def _reduce(loss_rows, n_valid, reduction):
    """(N,) fp32 per-row losses (0 on ignored rows) -> the loss F.cross_entropy returns, kept in fp32
    whatever the logits' dtype: the kernel accumulates in fp32, and rounding a loss near 10 to bf16
    would cost it 0.03-0.06 (autocast, too, runs cross-entropy in fp32)."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()  # fp32
    if reduction == "mean":
        total = total / max(n_valid, 1)  # every row ignored: 0, not 0/0
    return total


def _fake_loss(t, reduction):
    return t.new_empty(t.shape[:1] if reduction == "none" else (), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops and the autograd.Function
# ----------------------------------------------------------------------------------------------
# The launcher as a PyTorch custom op, as in layer_norm and flash_attention: torch.compile cannot
# trace into a Triton launch, nor past the target check's host sync, but it can treat an op it knows
# only by its output shapes (the fake implementation) as opaque, so a compiled model runs
# CrossEntropyFunction without a graph break. The op returns the loss already reduced, so the count
# of non-ignored rows (a value, which a traced graph could not carry as a Python number) stays inside.
@torch.library.custom_op(
    "gpt_triton::cross_entropy_fwd", mutates_args=(),
    schema="(Tensor logits, Tensor target, int ignore_index, str reduction, bool compute_grad, int max_block_v)"
    " -> (Tensor, Tensor?)",
)
def _cross_entropy_fwd_op(logits, target, ignore_index, reduction, compute_grad, max_block_v):
    target, n_valid = _checked_target(target, logits.shape[1], ignore_index, _OP)
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    loss_rows, grad = cross_entropy_forward(logits, target, ignore_index, scale, compute_grad, max_block_v)
    return _reduce(loss_rows, n_valid, reduction), grad


@_cross_entropy_fwd_op.register_fake
def _(logits, target, ignore_index, reduction, compute_grad, max_block_v):
    return _fake_loss(logits, reduction), logits.new_empty(logits.shape) if compute_grad else None


def _loss_and_grad(logits, target, ignore_index, reduction, compute_grad, max_block_v=0):
    """The reduced loss (fp32) and, if compute_grad, d loss / d logits for grad_output = 1."""
    _check_inputs(logits, target, ignore_index, reduction)
    return _cross_entropy_fwd_op(logits, target, ignore_index, reduction, compute_grad, max_block_v)


def _times_grad_output(grad_output, *grads):
    """Each gradient (or None) times a scalar loss's grad_output, out of place: the buffers are saved
    on ctx, and a second backward through a retained graph needs them unscaled.

    The usual loss.backward() passes 1, and in eager we read it back (a host sync) to hand the buffers
    on untouched: that saves a read and a write of each, 2 x 823 MB for GPT-2's logits. torch.compile
    cannot trace the read (grad_output's value is unknown while tracing; it would break the graph), so
    a compiled backward always multiplies, which costs that traffic but gives the same bits."""
    if not torch.compiler.is_compiling() and grad_output.item() == 1.0:
        return grads
    return tuple(None if g is None else g * grad_output for g in grads)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index=-100, reduction="mean", max_block_v=0):
        loss, grad = _loss_and_grad(logits, target, ignore_index, reduction, True, max_block_v)
        ctx.reduction = reduction
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            # (N, V) * (N, 1): the fp32 row weights would promote the product to fp32; written into a
            # buffer of the gradient's dtype instead, computed in fp32 and rounded once.
            grad = torch.mul(grad, grad_output.unsqueeze(1), out=torch.empty_like(grad))
        else:
            (grad,) = _times_grad_output(grad_output, grad)
        return grad, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------
def cross_entropy(logits, target, ignore_index: int = -100, reduction: str = "mean"):
    """F.cross_entropy(logits, target, ignore_index=..., reduction=...) for (N, V) logits and (N,)
    int64/int32 targets, fused: the gradient is written during the forward pass. The loss is fp32
    for every logits dtype (the kernel accumulates in fp32; autocast's F.cross_entropy is fp32 too);
    the gradient has the logits' dtype. Rows with target == ignore_index add 0 loss and 0 gradient;
    "mean" averages over the other rows and is 0 when there are none."""
    if isinstance(logits, torch.Tensor) and logits.requires_grad and torch.is_grad_enabled():
        return CrossEntropyFunction.apply(logits, target, ignore_index, reduction)
    # No gradient wanted (inference, evaluation, torch.no_grad): no (N, V) buffer, no second pass.
    # (Inside Function.forward grad mode is always off and ctx.needs_input_grad ignores no_grad,
    # so this decision is made out here.)
    return _loss_and_grad(logits, target, ignore_index, reduction, compute_grad=False)[0]


# ----------------------------------------------------------------------------------------------
# Compile specs: the model's loss over GPT-2's vocabulary, (B*T, V) logits in the dtypes it trains
# in: training (loss and gradient) and evaluation (the loss only). The LM head fused with the loss
# has its own specs, in kernels/linear_cross_entropy.py.
# ----------------------------------------------------------------------------------------------
def _spec_call(dtype, grad: bool):
    def call():
        target = torch.randint(0, GPT2_VOCAB, (GPT2_CONTEXT,))
        loss = cross_entropy(torch.empty(GPT2_CONTEXT, GPT2_VOCAB, dtype=dtype, requires_grad=grad), target)
        if grad:
            loss.backward()

    return call


COMPILE_SPECS = [
    CompileSpec(f"cross_entropy.{case}.{DTYPE_NAMES[dt]}", _spec_call(dt, case == "train"),
                f"{case}: {GPT2_CONTEXT} rows x {GPT2_VOCAB} classes, {DTYPE_NAMES[dt]}")
    for case in ("train", "eval")
    for dt, _ in TRAIN_DTYPES
]
