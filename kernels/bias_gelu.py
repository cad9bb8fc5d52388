"""Fused bias + GELU: the MLP's first activation in one read and one write, and its backward in one pass.

The math
--------
GPT-2's MLP computes h = GELU(x W^T + b). The matmul is cuBLAS's business; this file takes its output
x (rows of width N = 4C) and the bias b (N,) and applies, elementwise with z = x + b,

    GELU(z) = 0.5 z (1 + tanh(u)),     u = k0 (z + k1 z^3),   k0 = sqrt(2/pi),  k1 = 0.044715

(the "tanh approximation", `F.gelu(z, approximate="tanh")`). Triton's interpreter has no tanh, and a
naive tanh(u) = (e^u - e^-u) / (e^u + e^-u) overflows to inf/inf = NaN once |u| > 88.7 in fp32, and
the cube gets u there by |z| = 13. The identity that saves us is

    0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + e^(-2u))      so      GELU(z) = z * sigmoid(2u).

We evaluate the sigmoid with only e^(-2|u|), which lies in (0, 1] and cannot overflow:

    a = exp(-2|u|);   sigmoid(2|u|) = 1 / (1 + a);   sigmoid(-2|u|) = a / (1 + a)

and pick by the sign of u. Both s = sigmoid(2u) and its complement 1 - s come out of this without
a subtraction, so neither tail loses precision to cancellation.

The backward, derived
---------------------
With s = sigmoid(2u), 1 + tanh(u) = 2s and 1 - tanh(u)^2 = (1 - t)(1 + t) = 4 s (1 - s), hence

    dGELU/dz = 0.5 (1 + t) + 0.5 z (1 - t^2) du/dz
             = s + 2 z s (1 - s) k0 (1 + 3 k1 z^2).

dz/dx = 1 and dz/db = 1, so dX = dY * GELU'(z) and dBias = sum over rows of dX: the bias gradient is
a column sum of the very values the kernel is writing. The backward needs z, and z = x + b is one add
away from the input x, which autograd keeps anyway: we save x (not the output, not z) and recompute
z, u and s in registers. Recomputing costs a few dozen FLOPs per element; the alternative, saving an
extra (M, N) activation, costs memory and a read.

dBias without races
-------------------
Many programs own the same columns (different rows), so they cannot all add into one (N,) vector
without atomics, and fp32 atomics make the sum's rounding depend on scheduling (non-deterministic).
Instead each program sums its own group of rows into a row of a (n_groups, N) fp32 buffer, and a
second, tiny kernel (`_sum_partials_kernel`, in `_common.py`) adds up the n_groups rows in a fixed
order. The answer is the same bit for bit on every run. `layer_norm.py` reuses it for dW and dB.

Memory traffic (GPT-2 124M, B*T = 8192 rows, N = 4C = 3072, bf16: one (8192, 3072) tensor = 50.3 MB)
-----------------------------------------------------------------------------------------------------
Elementwise ops are pure memory traffic: the FLOPs are free, every pass over memory is not.
    the book's formula, eager (z = x + b, z**3, *k1, +z, *k0, tanh, 1+, 0.5*z, *):
        9 kernels, 20 tensor reads/writes                         forward  20 x 50.3 MB = 1007 MB
    PyTorch, x + b then F.gelu(approximate="tanh"): 2 kernels    forward   4 x 50.3 MB =  201 MB
                                                                  backward  4 x 50.3 MB =  201 MB
        (gelu_backward reads z and dY and writes dZ; the bias gradient reads dZ once more)
    fused (this file)                                             forward   2 x 50.3 MB =  101 MB
        (read x, write GELU)                                      backward  3 x 50.3 MB =  151 MB
        (read x and dY, write dX; dBias from registers, plus n_groups x N x 4 B of partial sums,
         about 0.5 MB on an H100)
Per layer and training step 403 MB become 252 MB; over GPT-2 124M's 12 layers, 4.8 GB become 3.0 GB.
Both versions keep one (M, N) tensor alive for backward (z for PyTorch, x here). (The bias slice is
loaded once per tile, M / BLOCK_M times: 12.6 MB requested in fp32, served by L2.)
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from kernels._common import (  # must precede the @triton.jit kernels (switches on the interpreter)
    INTERPRETER_TILE,
    NUM_STAGES,
    SUM_PARTIALS_COMPILE_SPECS,
    CompileSpec,
    as_rows,
    cast_for_store,
    check_device,
    check_dtype,
    check_ndim,
    device_guard,
    interpreter_configs,
    interpreter_rows_per_step,
    next_power_of_2,
    num_programs,
    sum_partials,
)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_OP = "bias_gelu"
# The tanh approximation's constants, as constexprs so that the kernels fold them in.
K0 = tl.constexpr(math.sqrt(2.0 / math.pi))
K1 = tl.constexpr(0.044715)


# ----------------------------------------------------------------------------------------------
# Configurations: block sizes, the GPU's and the interpreter's
# ----------------------------------------------------------------------------------------------
# A tile of TILE elements per program, BLOCK_N following the width up to MAX_BLOCK_N and BLOCK_M
# filling the rest, so a narrow row is not padded to 256 columns. 2048 elements over 8 warps is 8
# per thread: ptxas (sm_80) gives the backward 70 registers, 3 programs per SM; a 4096 tile needed
# 155 (1 program per SM, too few warps in flight to hide memory latency), and over 4 warps it spilled.
TILE = 2048
MIN_BLOCK_N, MAX_BLOCK_N = 16, 256
NUM_WARPS = 8
# Row groups for a race-free column sum: enough programs to keep every SM busy a few times over, few
# enough that the (n_groups, N) fp32 buffer of partial sums stays a small fraction of the traffic.
PROGRAMS_PER_SM = 4


def launch_config(N: int) -> dict:
    """The GPU's configuration."""
    block_n = min(max(next_power_of_2(N), MIN_BLOCK_N), MAX_BLOCK_N)
    return {"BLOCK_M": TILE // block_n, "BLOCK_N": block_n, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES}


def _config(M: int, N: int, device: torch.device, backward: bool = False) -> dict:
    """The interpreter's is a tile of up to INTERPRETER_TILE elements as wide as the row: in the
    forward a whole (1024, 512) MLP activation of the tiny preset, one program; the backward walks
    its one group of rows about sqrt(M) rows at a time (see `interpreter_rows_per_step`). Else the GPU's."""
    if not interpreter_configs(device):
        return launch_config(N)
    block_n = min(max(next_power_of_2(N), MIN_BLOCK_N), INTERPRETER_TILE)
    block_m = min(INTERPRETER_TILE // block_n, interpreter_rows_per_step(M) if backward else next_power_of_2(M))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 1, "num_stages": NUM_STAGES}


# ----------------------------------------------------------------------------------------------
# The lesson's counts: the docstring's traffic as code, for any shape, dtypes and blocks (checked
# against a trace of the interpreter by tests/test_explain.py; printed by `python scripts/explain.py
# bias_gelu`). Bytes are what the programs request: the bias slice is re-read by every row tile.
# No tl.dot here: the GELU's ~20 FLOPs per element are free next to its bytes.
# ----------------------------------------------------------------------------------------------
def memory_traffic(kernel: str, M: int, N: int, x_bytes: int, bias_bytes: int, BLOCK_M: int = 1,
                   n_groups: int = 1) -> dict:
    """{kernel argument: (bytes read, bytes written)} of one launch of `kernel`: "fwd" (one program
    per BLOCK_M x BLOCK_N tile), "bwd" (n_groups row groups x the column blocks) or "sum_partials"
    (its dBias reduction, written in the bias's dtype)."""
    t, f = M * N * x_bytes, 4
    if kernel == "fwd":
        return {"X": (t, 0), "BIAS": (-(-M // BLOCK_M) * N * bias_bytes, 0), "Y": (0, t)}
    if kernel == "bwd":
        return {"X": (t, 0), "BIAS": (n_groups * N * bias_bytes, 0), "DY": (t, 0), "DX": (0, t),
                "DBIAS_PARTIAL": (0, n_groups * N * f)}
    if kernel == "sum_partials":
        return {"PARTIAL": (n_groups * N * f, 0), "OUT": (0, N * bias_bytes)}
    raise ValueError(f"unknown kernel {kernel!r}")


def flops(kernel: str, *args, **kwargs) -> int:
    """FLOPs of tl.dots: none."""
    if kernel not in ("fwd", "bwd", "sum_partials"):
        raise ValueError(f"unknown kernel {kernel!r}")
    return 0


# ----------------------------------------------------------------------------------------------
# Forward kernel: the math is in the module docstring; step markers name each formula
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gelu_sigmoid(z):
    """s = sigmoid(2u) and 1 - s, u = k0 (z + k1 z^3), from exp(-2|u|) only (never overflows)."""
    u = K0 * (z + K1 * z * z * z)
    a = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]; z^3 may be inf for |z| > 1e12: then a = 0, still fine
    big = 1.0 / (1.0 + a)  # sigmoid(2|u|), in [0.5, 1]
    small = a * big  # sigmoid(-2|u|) = 1 - big, computed without the subtraction
    pos = u >= 0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # (M, N) fp32/fp16/bf16, row stride stride_x_row, unit column stride
    BIAS,  # (N,) fp32 or X's dtype
    Y,  # (M, N) X's dtype, contiguous
    stride_x_row,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A 2-D tile of rows x columns: the bias slice is loaded once per tile and broadcast down its rows.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows[:, None] < M) & col_ok[None, :]
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = x + b[None, :]  # fp32: the add is not rounded to bf16 before the GELU, unlike `x + b` in eager
    s, _ = _gelu_sigmoid(z)
    tl.store(Y + rows[:, None] * N + cols[None, :], cast_for_store(z * s, Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward kernel: the derivation is in the module docstring
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bias_gelu_bwd_kernel(
    X,  # (M, N) as in the forward: row stride stride_x_row
    BIAS,  # (N,)
    DY,  # (M, N) row stride stride_dy_row (0 for a broadcast gradient)
    DX,  # (M, N) X's dtype, contiguous
    DBIAS_PARTIAL,  # (n_groups, N) fp32, contiguous: row g = sum of dX over the rows of group g
    stride_x_row,
    stride_dy_row,
    M,
    N,
    rows_per_group,  # a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = group.to(tl.int64) * rows_per_group
    # Walk this group's row tiles, keeping the column sums of dX in registers; out-of-range rows load
    # dY = 0 and so add 0.
    for m in range(0, rows_per_group, BLOCK_M):
        rows = row_start + m + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = x + b[None, :]  # recomputed, exactly as the forward computed it
        s, one_minus_s = _gelu_sigmoid(z)
        # The second term is z s (1 - s) times a polynomial in z. Once |z| > 20, s (1 - s) <= e^-600
        # is exactly 0 in fp32, but z^2 overflows for |z| > 1.8e19 and 0 * inf = NaN (PyTorch's own
        # gelu_backward returns NaN there). Clamping z inside the term changes nothing below |z| = 20.
        zc = tl.minimum(tl.maximum(z, -20.0), 20.0)
        # -- GELU'(z) = s + 2 z s (1 - s) k0 (1 + 3 k1 z^2) --
        dgelu = s + 2.0 * zc * s * one_minus_s * K0 * (1.0 + 3.0 * K1 * zc * zc)
        dx = dy * dgelu
        tl.store(DX + rows[:, None] * N + cols[None, :], cast_for_store(dx, DX.dtype.element_ty), mask=mask)
        acc += dx  # the fp32 dX, before it is rounded to X's dtype
    tl.store(DBIAS_PARTIAL + group * N + cols, tl.sum(acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers: checks, grid, launch
# ----------------------------------------------------------------------------------------------
def bias_gelu_forward(x2: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> None:
    """y (M, N) contiguous <- GELU(x2 + bias). x2 from `as_rows`, inputs checked."""
    M, N = x2.shape
    if M == 0:
        return
    cfg = _config(M, N, x2.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    with device_guard(x2.device):
        _bias_gelu_fwd_kernel[grid](x2, bias, y, x2.stride(0), M, N, **cfg)


def bias_gelu_backward(dy2: torch.Tensor, x2: torch.Tensor, bias: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """dx (M, N) contiguous <- dy2 * GELU'(x2 + bias); returns dBias (N,) in bias's dtype."""
    M, N = x2.shape
    if M == 0:
        return torch.zeros_like(bias)
    cfg = _config(M, N, x2.device, backward=True)
    n_col_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    n_row_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    want_groups = max(1, min(n_row_tiles, num_programs(x2.device, PROGRAMS_PER_SM) // n_col_blocks))
    tiles_per_group = triton.cdiv(n_row_tiles, want_groups)
    n_groups = triton.cdiv(n_row_tiles, tiles_per_group)  # no empty group at the end
    partial = torch.empty((n_groups, N), dtype=torch.float32, device=x2.device)
    with device_guard(x2.device):
        _bias_gelu_bwd_kernel[(n_groups, n_col_blocks)](
            x2, bias, dy2, dx, partial, x2.stride(0), dy2.stride(0), M, N,
            tiles_per_group * cfg["BLOCK_M"], **cfg,
        )
    return sum_partials(partial, bias.dtype)


def _check_inputs(x, bias):
    if not isinstance(x, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise TypeError(f"{_OP}: x and bias must be tensors")
    check_dtype(x, "x", _OP)
    check_dtype(bias, "bias", _OP)
    if bias.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{_OP}: bias must be float32 or x's dtype {x.dtype}, got {bias.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{_OP}: x must have at least one dimension, got a scalar")
    check_ndim(bias, "bias", _OP, 1, f"(N,) with N = x.shape[-1] = {x.shape[-1]}")
    if bias.shape[0] != x.shape[-1]:
        raise ValueError(f"{_OP}: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1]},) = x.shape[-1]")
    if x.shape[-1] == 0:
        raise ValueError(f"{_OP}: x has an empty last dimension, shape {tuple(x.shape)}")
    check_device(x, bias, op=_OP)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops and the autograd.Function
# ----------------------------------------------------------------------------------------------
# The launchers as PyTorch custom ops, as in flash_attention: torch.compile cannot trace into a
# Triton launch, but it can treat an op it knows only by its output shapes (the fake implementations)
# as opaque, so a compiled model runs BiasGeluFunction without a graph break.
@torch.library.custom_op("gpt_triton::bias_gelu_fwd", mutates_args=(), schema="(Tensor x2, Tensor bias) -> Tensor")
def _bias_gelu_fwd_op(x2, bias):
    y = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    bias_gelu_forward(x2, bias, y)
    return y


@_bias_gelu_fwd_op.register_fake
def _(x2, bias):
    return x2.new_empty(x2.shape)


@torch.library.custom_op(
    "gpt_triton::bias_gelu_bwd", mutates_args=(), schema="(Tensor dy2, Tensor x2, Tensor bias) -> (Tensor, Tensor)"
)
def _bias_gelu_bwd_op(dy2, x2, bias):
    dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    return dx, bias_gelu_backward(dy2, x2, bias, dx)


@_bias_gelu_bwd_op.register_fake
def _(dy2, x2, bias):
    return x2.new_empty(x2.shape), torch.empty_like(bias)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        _check_inputs(x, bias)
        x2 = as_rows(x, x.shape[-1])
        bias = bias.contiguous()
        y = _bias_gelu_fwd_op(x2, bias)
        ctx.save_for_backward(x2, bias)  # the input only: z, u and s are recomputed in backward
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        dx, dbias = _bias_gelu_bwd_op(as_rows(dy, x2.shape[1]), x2, bias)
        return dx.view(ctx.x_shape), dbias


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.gelu(x + bias, approximate="tanh") in one pass, bias (N,) broadcast over the last dim of x
    (any leading shape, any strides). The result has x's dtype (PyTorch's type promotion would give
    fp32 for bf16 x and an fp32 bias; the MLP wants its activations in the compute dtype). Arithmetic
    is fp32. Gradients flow to x and bias, each in its own dtype."""
    return BiasGeluFunction.apply(x, bias)


# ----------------------------------------------------------------------------------------------
# Compile specs: every configuration `launch_config` can return (BLOCK_N = 16 ... 256, BLOCK_M
# filling a 2048-element tile), per input dtype with an fp32 bias (the model's parameters are fp32).
# ----------------------------------------------------------------------------------------------
_CONFIGS = [launch_config(2**k) for k in range(int(math.log2(MIN_BLOCK_N)), int(math.log2(MAX_BLOCK_N)) + 1)]

COMPILE_SPECS = [
    spec
    for ty in ("fp32", "fp16", "bf16")
    for spec in (
        CompileSpec(
            name=f"bias_gelu.fwd.{ty}",
            kernel=_bias_gelu_fwd_kernel,
            signature={
                "X": f"*{ty}", "BIAS": "*fp32", "Y": f"*{ty}", "stride_x_row": "i32", "M": "i32", "N": "i32",
                "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            },
            configs=_CONFIGS,
        ),
        CompileSpec(
            name=f"bias_gelu.bwd.{ty}",
            kernel=_bias_gelu_bwd_kernel,
            signature={
                "X": f"*{ty}", "BIAS": "*fp32", "DY": f"*{ty}", "DX": f"*{ty}", "DBIAS_PARTIAL": "*fp32",
                "stride_x_row": "i32", "stride_dy_row": "i32", "M": "i32", "N": "i32", "rows_per_group": "i32",
                "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            },
            configs=_CONFIGS,
        ),
    )
] + SUM_PARTIALS_COMPILE_SPECS  # the shared dBias/dW reduction (kernels/_common.py), listed here once
