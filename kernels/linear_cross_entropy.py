"""The LM head and the loss together (lesson 3b, after cross_entropy.py): never holding the (N, V) logits.

The cross-entropy kernel (lesson 3) still needs the logits: at N = 8192, V = 50,257 that is 823 MB of bf16 (1.6 GB if
the head runs in fp32), plus as much again for their gradient, for the one op of a GPT-2 that has
the vocabulary in it. But each row's loss and gradient need only that row's logits, so the
LM-head matmul and the loss can walk the rows in chunks: logits_c = x_c W^T, the kernel writes
d loss / d logits_c, which is turned at once into this chunk's share of the input gradients,
    d x_c = g_c W        and        d W += g_c^T x_c,
and dropped. Only one chunk of logits (and its gradient) is ever alive. The default chunk makes
a chunk's logits about as large as x itself: for C = 768, 125 rows of 50,257 (12.6 MB in bf16).
The matmuls are torch's (cuBLAS): nothing to gain writing them here.

"mean" and "sum" compute the input gradients during forward, like the kernel (backward scales
them by grad_output). "none" cannot: its per-row grad_output reaches d W only through the sum
over rows, so for "none" forward computes the losses only and backward runs the chunks again.
Both passes are custom ops, like the kernel's, for torch.compile: the chunk loop launches the
kernel, checks the targets and fills its buffers in place, none of which a graph can trace.

How to read this file: the cross-entropy kernel and its online softmax are lesson 3's
(kernels/cross_entropy.py), launched here once per chunk through `cross_entropy_forward`; what is new
is the chunk loop (`linear_cross_entropy_forward`), the two custom ops around it and the autograd
function.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels._common import (
    DTYPE_NAMES,
    GPT2_VOCAB,
    INTERPRETER_TILE,
    TRAIN_DTYPES,
    CompileSpec,
    check_device,
    check_dtype,
    check_ndim,
    interpreter_configs,
)
from kernels.cross_entropy import (  # lesson 3: the kernel, its launcher and the loss's bookkeeping
    _check_args,
    _check_target,
    _checked_target,
    _fake_loss,
    _reduce,
    _times_grad_output,
    cross_entropy_forward,
    interpreter_config,
)
from kernels.cross_entropy import memory_traffic as cross_entropy_memory_traffic

_OP = "linear_cross_entropy"


# ----------------------------------------------------------------------------------------------
# The lesson's counts: the docstring's traffic and FLOPs as code (checked against a trace by
# tests/test_explain.py)
# ----------------------------------------------------------------------------------------------
# The chunk loop's torch matmuls (cuBLAS on a GPU: counted as eager ops, each reading its operands
# and writing its result) and its launches of the kernel above, for "mean" or "sum".
def memory_traffic(N: int, C: int, V: int, x_bytes: int, n_valid: int, chunk_size: int,
                   want_grad: bool = True) -> dict:
    """{"matmul": (read, written) over the chunk loop's matmuls, "add_": the same for its fp32 dW
    accumulation, and each kernel argument summed over the chunks' launches}. Per chunk of n rows:
    logits = x_c W^T reads x_c and W, writes n x V; with the gradient also d x_c = g W (reads g and W,
    writes n x C) and g^T x_c (reads g and x_c, writes V x C), which `grad_w +=` adds into the fp32
    (V, C) accumulator (reads both, writes it). So W is read 3 times and dW read and written once per
    chunk: the price of never holding all the logits, and with chunks of about V / C rows (the
    default) it is most of the traffic."""
    e, chunks = x_bytes, -(-N // chunk_size)
    read, written = N * C * e + chunks * V * C * e, N * V * e  # logits
    acc = (0, 0)
    if want_grad:
        read += (N * V * e + chunks * V * C * e) + (N * V * e + N * C * e)
        written += N * C * e + chunks * V * C * e
        acc = (chunks * V * C * (4 + e), chunks * V * C * 4)
    return {"matmul": (read, written), "add_": acc, **cross_entropy_memory_traffic("fwd", N, V, e, n_valid, want_grad)}


def flops(N: int, C: int, V: int, want_grad: bool = True) -> int:
    """2 N V C for the logits, as much again for each of d x and d W with the gradient."""
    return 2 * N * V * C * (3 if want_grad else 1)


# ----------------------------------------------------------------------------------------------
# Launchers: the chunk loop (its kernel is cross_entropy.py's; its matmuls are torch's)
# ----------------------------------------------------------------------------------------------
def linear_cross_entropy_forward(x, weight, target, ignore_index, scale, chunk_size, grad_x=None, grad_w=None, row_weight=None):
    """Per-row fp32 losses (N,), chunk by chunk. With grad buffers given, also fill grad_x (N, C) and
    accumulate into grad_w (V, C, fp32) the gradient of sum_i row_weight[i] * scale * loss_i."""
    N = x.shape[0]
    loss_rows = torch.empty(N, dtype=torch.float32, device=x.device)
    want_grad = grad_x is not None or grad_w is not None
    for start in range(0, N, chunk_size):
        rows = slice(start, min(start + chunk_size, N))
        x_c = x[rows]
        logits = x_c @ weight.t()  # (n, V) in x's dtype, as F.linear would give
        loss_rows[rows], g = cross_entropy_forward(logits, target[rows], ignore_index, scale, want_grad)
        if not want_grad:
            continue
        if row_weight is not None:
            g.mul_(row_weight[rows].unsqueeze(1))  # g is this call's own buffer: in place is safe
        if grad_x is not None:
            grad_x[rows] = g @ weight
        if grad_w is not None:
            # The matmul runs in the input dtype (fp32 accumulation inside); the sum over chunks in fp32.
            grad_w += g.t() @ x_c
    return loss_rows


def _check_linear_inputs(x, weight, target, ignore_index, reduction, chunk_size):
    """Validate shapes, dtypes and devices (the targets' values are checked inside the op); return
    the chunk size."""
    _check_args(ignore_index, reduction, _OP)
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, target)):
        raise TypeError(f"{_OP}: x, weight and target must be tensors")
    check_ndim(x, "x", _OP, 2, "(N, C)")
    check_ndim(weight, "weight", _OP, 2, "(V, C)")
    check_dtype(x, "x", _OP)
    if weight.dtype != x.dtype:
        raise TypeError(f"{_OP}: weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    (N, C), (V, C_w) = x.shape, weight.shape
    if C_w != C or V == 0:
        raise ValueError(f"{_OP}: weight must be (V, C) with V > 0 and C = x.shape[1] = {C}, got {tuple(weight.shape)}")
    check_device(x, weight, target, op=_OP)
    _check_target(target, N, _OP)
    if chunk_size is None:
        if interpreter_configs(x.device):
            # Few chunks, few launches: logits of about 16 tiles (64 MB in fp32), in whole programs of
            # the kernel (a chunk's last, part-empty program would cost the interpreter a full one).
            rows = interpreter_config(N, V)["BLOCK_ROWS"]
            return max(1, min(N, max(rows, 16 * INTERPRETER_TILE // V // rows * rows)))
        return max(1, -(-N // -(-V // max(C, 1))))  # ceil(N / ceil(V / C)): chunk logits ~ x in size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _new_grad_buffers(x, weight, want_grad_x, want_grad_w):
    """(N, C) for x, an fp32 (V, C) accumulator for weight; None where no gradient is wanted."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_grad_x else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_grad_w else None
    return grad_x, grad_w


def _fake_grads(x, weight, want_grad_x, want_grad_w):
    return x.new_empty(x.shape) if want_grad_x else None, weight.new_empty(weight.shape) if want_grad_w else None


# ----------------------------------------------------------------------------------------------
# torch.library custom ops and the autograd.Function
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "gpt_triton::linear_cross_entropy_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor target, int ignore_index, str reduction, int chunk_size,"
    " bool want_grad_x, bool want_grad_w) -> (Tensor, Tensor?, Tensor?)",
)
def _linear_cross_entropy_fwd_op(x, weight, target, ignore_index, reduction, chunk_size, want_grad_x, want_grad_w):
    """The reduced loss and the gradients wanted, for grad_output = 1 ("mean" and "sum" only)."""
    target, n_valid = _checked_target(target, weight.shape[0], ignore_index, _OP)
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    grad_x, grad_w = _new_grad_buffers(x, weight, want_grad_x, want_grad_w)
    loss_rows = linear_cross_entropy_forward(x, weight, target, ignore_index, scale, chunk_size, grad_x, grad_w)
    return _reduce(loss_rows, n_valid, reduction), grad_x, None if grad_w is None else grad_w.to(weight.dtype)


@_linear_cross_entropy_fwd_op.register_fake
def _(x, weight, target, ignore_index, reduction, chunk_size, want_grad_x, want_grad_w):
    return _fake_loss(x, reduction), *_fake_grads(x, weight, want_grad_x, want_grad_w)


@torch.library.custom_op(
    "gpt_triton::linear_cross_entropy_bwd", mutates_args=(),
    schema="(Tensor grad_output, Tensor x, Tensor weight, Tensor target, int ignore_index, int chunk_size,"
    " bool want_grad_x, bool want_grad_w) -> (Tensor?, Tensor?)",
)
def _linear_cross_entropy_bwd_op(grad_output, x, weight, target, ignore_index, chunk_size, want_grad_x, want_grad_w):
    """reduction="none": the chunks again, each row's gradient weighted by its grad_output. The forward
    op has checked the targets."""
    grad_x, grad_w = _new_grad_buffers(x, weight, want_grad_x, want_grad_w)
    target = target.to(torch.int64).contiguous()
    linear_cross_entropy_forward(x, weight, target, ignore_index, 1.0, chunk_size, grad_x, grad_w, row_weight=grad_output)
    return grad_x, None if grad_w is None else grad_w.to(weight.dtype)


@_linear_cross_entropy_bwd_op.register_fake
def _(grad_output, x, weight, target, ignore_index, chunk_size, want_grad_x, want_grad_w):
    return _fake_grads(x, weight, want_grad_x, want_grad_w)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, ignore_index=-100, reduction="mean", chunk_size=None):
        chunk_size = _check_linear_inputs(x, weight, target, ignore_index, reduction, chunk_size)
        ctx.reduction, ctx.ignore_index, ctx.chunk_size = reduction, ignore_index, chunk_size
        if reduction == "none":  # the losses only; backward runs the chunks again
            ctx.save_for_backward(x, weight, target)
            return _linear_cross_entropy_fwd_op(x, weight, target, ignore_index, reduction, chunk_size, False, False)[0]
        loss, grad_x, grad_w = _linear_cross_entropy_fwd_op(
            x, weight, target, ignore_index, reduction, chunk_size, *ctx.needs_input_grad[:2]
        )
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            grad_x, grad_w = _linear_cross_entropy_bwd_op(
                grad_output, *ctx.saved_tensors, ctx.ignore_index, ctx.chunk_size, *ctx.needs_input_grad[:2]
            )
        else:
            grad_x, grad_w = _times_grad_output(grad_output, *ctx.saved_tensors)
        return grad_x, grad_w, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------
def linear_cross_entropy(x, weight, target, ignore_index: int = -100, reduction: str = "mean", chunk_size=None):
    """cross_entropy(x @ weight.T, target, ...) without ever materializing the (N, V) logits.

    x: (N, C) final hidden states, weight: (V, C) the LM head (nn.Linear's layout, no bias), target:
    (N,). Rows are processed chunk_size at a time (default: chunks whose logits are about the size
    of x). Same reductions, ignore_index rule and output dtype as `cross_entropy`."""
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad
    ):
        return LinearCrossEntropyFunction.apply(x, weight, target, ignore_index, reduction, chunk_size)
    chunk_size = _check_linear_inputs(x, weight, target, ignore_index, reduction, chunk_size)
    return _linear_cross_entropy_fwd_op(x, weight, target, ignore_index, reduction, chunk_size, False, False)[0]


# ----------------------------------------------------------------------------------------------
# Compile specs: the LM head fused with the loss at GPT-2 124M's width, in the dtypes the model
# trains in. Its matmuls are torch's; what compiles is the kernel it runs on each chunk of logits.
# One row is enough: the row count only sizes the grid and the chunk loop (the matmuls run on the
# CPU here).
# ----------------------------------------------------------------------------------------------
def _spec_call(dtype, C: int = 768):
    def call():
        target = torch.randint(0, GPT2_VOCAB, (1,))
        x = torch.empty(1, C, dtype=dtype, requires_grad=True)  # (N, C)
        w = torch.empty(GPT2_VOCAB, C, dtype=dtype, requires_grad=True)  # (V, C)
        linear_cross_entropy(x, w, target).backward()

    return call


COMPILE_SPECS = [
    CompileSpec(f"linear_cross_entropy.train.{DTYPE_NAMES[dt]}", _spec_call(dt),
                f"LM head + loss: 1 row x {GPT2_VOCAB} classes, C = 768, {DTYPE_NAMES[dt]}")
    for dt, _ in TRAIN_DTYPES
]
