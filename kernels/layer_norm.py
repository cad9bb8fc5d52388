"""LayerNorm: a row reduction in the forward, and a backward whose weight gradients need no atomics;
then the same kernels with the residual add that precedes a pre-LN block's LayerNorm fused in.

The math
--------
For one row x of width N (the embedding, C = 768 ... 1600 in GPT-2), with learned weight w and bias b:

    mean = (1/N) sum_j x_j,    var = (1/N) sum_j (x_j - mean)^2,    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd,  y = xhat * w + b

A whole row (N <= MAX_N = 4096) fits in one program's registers, so the forward reads x once,
computes the mean, then the variance from the centred values already in registers (two-pass, exact;
the one-pass E[x^2] - E[x]^2 cancels catastrophically for rows with a large mean), and writes y. It
also writes mean and rstd (fp32, 8 bytes a row) so that the backward need not reduce the row again.

The backward, derived
---------------------
Let g = dY * w (elementwise). y depends on x through xhat, and every xhat_j depends on every x_i
through mean and rstd:

    d xhat_j / d x_i = rstd * ([i == j] - 1/N - xhat_i xhat_j / N)

(the 1/N from the mean, the xhat_i xhat_j / N from rstd: d rstd / d x_i = -rstd^2 xhat_i / N). So

    dX_i = sum_j g_j d xhat_j / d x_i = rstd * (g_i - c2 - xhat_i c1),
    c1 = (1/N) sum_j g_j xhat_j,   c2 = (1/N) sum_j g_j

two row reductions, then an elementwise update: one program per row again. The parameter gradients
sum over rows instead:

    dW = sum over rows of dY * xhat,     dB = sum over rows of dY.

dW and dB without races
-----------------------
Every row contributes to every column of dW, so row-programs cannot all add into one (N,) vector
without atomics (or the Triton tutorial's locks), and fp32 atomics make the rounding depend on
which program got there first. Here each program owns a contiguous group of rows, keeps its running
dY * xhat and dY in fp32 registers while it walks them, and writes one row of a (n_groups, 2N) fp32
buffer (dW partials, then dB partials). `_common._sum_partials_kernel` then adds the n_groups rows
up in a fixed order: deterministic, and the extra traffic is 2 x n_groups x 2N x 4 B.

Memory traffic (GPT-2 124M, B*T = 8192 rows, C = 768, bf16: one (8192, 768) tensor = 12.6 MB)
-------------------------------------------------------------------------------------------------
    the book's formula, eager (mean, var, x - mean, / sqrt, * w, + b): six kernels over the row tensor,
        10 reads/writes of (M, C)                                         forward 10 x 12.6 MB = 126 MB
    fused (this file, and PyTorch's own F.layer_norm, which is fused too)
        read x, write y (+ 64 KB of mean/rstd)                            forward  2 x 12.6 MB =  25 MB
        read x and dY, write dX; partial sums 2 x 264 x 1536 x 4 B        backward 3 x 12.6 MB + 3.2 MB
        (264 groups = 2 per SM on a 132-SM H100)                                               =  41 MB
(w and b, 2 x 3 KB in fp32, are loaded by every row's program: 8192 x 6 KB = 50 MB requested, but
from L2, not HBM; `python scripts/explain.py layer_norm` counts both.)
The book's formula's backward is worse still: autograd keeps x - mean, the (M, 1) statistics and
xhat alive and walks each elementwise op backwards. GPT-2 124M runs 25 LayerNorms per forward (two per
block and the final one), so fused LayerNorm moves 0.6 GB a forward instead of 3.2 GB.

The residual add, fused: add_layer_norm
---------------------------------------
A pre-LN block adds each branch's output r to the residual stream x, then normalizes the updated
stream for the next branch:

    h = x + r,     y = LayerNorm(h)        (h: the new residual stream, which the block keeps)

Unfused, the add writes h and LayerNorm reads it straight back. `add_layer_norm` runs both in the
same one-row program (a HAS_RESIDUAL variant of the two kernels below, so the LayerNorm is written
once): load x and r, add in fp32, store h, and normalize the fp32 sum still in registers. (In fp16
and bf16 that sum is normalized before h is rounded: y is one rounding away from the exact answer,
not two.)

h has two uses, the LayerNorm and whatever reads the stream later (the MLP's residual), so its
gradient is the sum of both, and h = x + r hands that sum to x and r unchanged:

    dH = dh + LN-backward(dY),      dX = dR = dH       (dh: the gradient from h's other uses)

The backward kernel adds dh into each row's dX before its one store, and the same tensor is
returned as the gradient of both x and r: dH is written once. LN-backward needs the normalized
input, h: it is saved for the backward instead of x and r (the block keeps h alive anyway).

Traffic of one add + LayerNorm, with T = one (8192, 768) bf16 tensor = 12.6 MB (as above):
    unfused: x + r, then F.layer_norm
        forward: the add reads x, r, writes h; LayerNorm reads h, writes y        5 T =  63 MB
        backward: LayerNorm's reads h, dY, writes its part of dH; autograd then
                  adds dh to it (reads both, writes dH), handed to x and r as is   6 T =  75 MB
    fused (add_layer_norm)
        forward: read x, r; write h, y                                          4 T =  50 MB
        backward: read h, dY, dh; write dH                                       4 T =  50 MB
(plus, either way, LayerNorm's mean/rstd and partial sums). GPT-2 runs one such add before each
block's second LayerNorm: 138 MB become 101 MB per block, 0.45 GB a training step over 124M's 12.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels._common import (  # must precede the @triton.jit kernels (switches on the interpreter)
    INTERPRETER_TILE,
    NUM_STAGES,
    DTYPE_NAMES,
    GPT2_CONTEXT,
    GPT2_PRESETS,
    TRAIN_DTYPES,
    CompileSpec,
    backward_of,
    as_rows,
    cast_for_store,
    check_device,
    check_dtype,
    device_guard,
    interpreter_configs,
    interpreter_rows_per_step,
    next_power_of_2,
    num_programs,
    sum_partials,
)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_OP = "layer_norm"
_ADD_OP = "add_layer_norm"


# ----------------------------------------------------------------------------------------------
# Configurations: block sizes, the GPU's and the interpreter's
# ----------------------------------------------------------------------------------------------
# On a GPU one program holds a whole row (BLOCK_M = 1): BLOCK_N = next power of 2 >= N, with the warps
# growing with the row (BLOCK_N / 256, at most 16). Register budget: at BLOCK_N = 8192 the backward
# holds x, dY, w and the two dW/dB accumulators, 16 fp32 values each per thread, at the 128-register
# cap of a 16-warp program, and the compile check (kernels/compile_check.py) finds it spilling 24-96
# bytes per thread on sm_80 and sm_90. So MAX_N = 4096, 2.5x GPT-2's widest row (1600); a wider row
# is refused rather than silently slowed by spills. In the interpreter a forward program takes as many
# rows as fill INTERPRETER_TILE (all 1,024 rows of the tiny preset's batch: one program), and the
# backward is one program walking the rows 32 at a time (no second, reducing launch).
MIN_BLOCK_N, MAX_N = 16, 4096
# Row groups for dW/dB: 2 per SM (264 on an H100), fewer than bias_gelu's 4, because each group
# costs a 2N-wide fp32 row of partial sums written and read back, and a LayerNorm row is short.
GROUPS_PER_SM = 2


def launch_config(N: int, has_residual: bool = False) -> dict:
    """The GPU's configuration: one row per program (per step of the backward's walk)."""
    block_n = max(next_power_of_2(N), MIN_BLOCK_N)
    return {
        "BLOCK_M": 1, "BLOCK_N": block_n, "HAS_RESIDUAL": has_residual,
        "num_warps": min(max(block_n // 256, 1), 16), "num_stages": NUM_STAGES,
    }


def _config(M: int, N: int, has_residual: bool, device: torch.device, backward: bool = False) -> dict:
    """The GPU's configuration, or the interpreter's: the forward takes as many rows as fill the tile,
    the backward walks its one group about 4 sqrt(M) rows at a time. Each step of the walk costs a
    fixed few milliseconds of Python, and sqrt(M) rows (`interpreter_rows_per_step`, the shallowest
    sum) would take 4x the steps; 4 sqrt(M) sums about 2x deeper, and its weight and bias gradients
    still measured 0.2-0.6x PyTorch's own error against float64 (1,024 x 128 to 8,192 x 768; PyTorch's
    CPU LayerNorm backward sums its rows one by one). bias_gelu keeps sqrt(M): its bias gradient is
    compared with PyTorch's tree-summed `grad.sum(0)`."""
    cfg = launch_config(N, has_residual)
    if interpreter_configs(device):
        rows = 4 * interpreter_rows_per_step(M) if backward else next_power_of_2(M)
        cfg.update(BLOCK_M=min(max(INTERPRETER_TILE // cfg["BLOCK_N"], 1), rows), num_warps=1)
    return cfg


# ----------------------------------------------------------------------------------------------
# The lesson's counts: the docstring's traffic as code, for any shape, dtypes and row grouping (checked
# against a trace of the interpreter by tests/test_explain.py; printed by `python scripts/explain.py
# layer_norm`). Bytes are what the programs request: w and b are re-read by every row's program
# (N values each, from L2 on a GPU). No tl.dot here: FLOPs are a few per element, never the bound.
# ----------------------------------------------------------------------------------------------
def memory_traffic(kernel: str, M: int, N: int, x_bytes: int, w_bytes: int, residual: bool = False,
                   n_groups: int = 1) -> dict:
    """{kernel argument: (bytes read, bytes written)} of one launch of `kernel`: "fwd" (one program
    per row), "bwd" (n_groups programs, each a group of rows) or "sum_partials" (its dW/dB reduction).
    x_bytes: x's (and dY's) element size; w_bytes: the weight's and bias's; residual: add_layer_norm."""
    t, f = M * N * x_bytes, 4
    if kernel == "fwd":
        out = {"X": (t, 0), "W": (M * N * w_bytes, 0), "B": (M * N * w_bytes, 0), "Y": (0, t),
               "MEAN": (0, M * f), "RSTD": (0, M * f)}
        if residual:
            out.update(R=(t, 0), H=(0, t))
        return out
    if kernel == "bwd":
        out = {"X": (t, 0), "W": (n_groups * N * w_bytes, 0), "DY": (t, 0), "DX": (0, t),
               "MEAN": (M * f, 0), "RSTD": (M * f, 0), "PARTIAL": (0, n_groups * 2 * N * f)}
        if residual:
            out["DH"] = (t, 0)
        return out
    if kernel == "sum_partials":  # the (n_groups, 2N) fp32 partials -> dW and dB, fp32
        return {"PARTIAL": (n_groups * 2 * N * f, 0), "OUT": (0, 2 * N * f)}
    raise ValueError(f"unknown kernel {kernel!r}")


def flops(kernel: str, *args, **kwargs) -> int:
    """FLOPs of tl.dots: LayerNorm has none (its ~10 FLOPs per element are free next to its bytes)."""
    if kernel not in ("fwd", "bwd", "sum_partials"):
        raise ValueError(f"unknown kernel {kernel!r}")
    return 0


# ----------------------------------------------------------------------------------------------
# Forward kernel: the math is in the module docstring; step markers name each formula
# ----------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) fp32/fp16/bf16, row stride stride_x_row, unit column stride
    R,  # (M, N) X's dtype, row stride stride_r_row: the residual branch (read only if HAS_RESIDUAL)
    W,  # (N,) fp32 or X's dtype
    B,  # (N,) fp32 or X's dtype
    H,  # (M, N) X's dtype, contiguous: X + R (written only if HAS_RESIDUAL)
    Y,  # (M, N) X's dtype, contiguous
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    stride_x_row,
    stride_r_row,
    M,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: 1 on a GPU, many in the interpreter
    BLOCK_N: tl.constexpr,
):
    # int64: M * N passes 2^31 at 524,288 rows of width 4096
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # -- h = x + r, stored; the fp32 sum is what gets normalized --
        x += tl.load(R + rows[:, None] * stride_r_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(H + rows[:, None] * N + cols[None, :], cast_for_store(x, H.dtype.element_ty), mask=mask)
    # -- mean, then var from the centred values (two-pass) --
    mean = tl.sum(x, axis=1) / N
    # Padding lanes loaded 0, but 0 - mean is not 0: zero them before they enter the variance.
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    # -- y = xhat * w + b --
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], cast_for_store(y, Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward kernel: the derivation is in the module docstring
# ----------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_bwd_kernel(
    X,  # (M, N) the forward's normalized input (H if HAS_RESIDUAL), row stride stride_x_row
    W,  # (N,)
    DY,  # (M, N) row stride stride_dy_row (0 for a broadcast gradient)
    DH,  # (M, N) row stride stride_dh_row: the gradient from H's other uses (read only if HAS_RESIDUAL)
    DX,  # (M, N) X's dtype, contiguous: dX (= dH = dX = dR of add_layer_norm if HAS_RESIDUAL)
    MEAN,  # (M,) fp32, from the forward
    RSTD,  # (M,) fp32, from the forward
    PARTIAL,  # (n_groups, 2N) fp32, contiguous: [g, :N] = sum of dY * xhat, [g, N:] = sum of dY over group g
    stride_x_row,
    stride_dy_row,
    stride_dh_row,
    M,
    N,
    rows_per_group,  # a multiple of BLOCK_M
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per step of the walk: 1 on a GPU, many in the interpreter
    BLOCK_N: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)  # loaded once for all the group's rows
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = group.to(tl.int64) * rows_per_group
    # Walk this group's rows BLOCK_M at a time, stopping at M; rows past M in the last step load dY = 0
    # and so add 0.
    for m in range(0, tl.minimum(rows_per_group, M - row_start), BLOCK_M):
        rows = row_start + m + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        # -- dX = rstd * (g - c2 - xhat * c1), g = dY * w, c1 = mean(g * xhat), c2 = mean(g) --
        g = dy * w[None, :]  # 0 on padding lanes (dy loaded 0 there)
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        if HAS_RESIDUAL:
            # -- dH = dh + LN-backward(dY): H's two gradients meet in fp32, before the one rounding --
            dx += tl.load(DH + rows[:, None] * stride_dh_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * N + cols[None, :], cast_for_store(dx, DX.dtype.element_ty), mask=mask)
        # -- this group's share of dW = sum dY * xhat and dB = sum dY --
        dw += dy * xhat
        db += dy
    tl.store(PARTIAL + group * (2 * N) + cols, tl.sum(dw, axis=0), mask=col_ok)
    tl.store(PARTIAL + group * (2 * N) + N + cols, tl.sum(db, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers: checks, grid, launch
# ----------------------------------------------------------------------------------------------
def layer_norm_forward(x2, weight, bias, eps, y, mean, rstd, r2=None, h=None) -> None:
    """y (M, N) contiguous, mean and rstd (M,) fp32 <- LayerNorm of x2's rows; with a residual r2
    (x2's shape and dtype, any row stride), h (M, N) contiguous <- x2 + r2 too, and y normalizes
    that sum. Inputs checked."""
    M, N = x2.shape
    if M == 0:
        return
    has_residual = r2 is not None
    if not has_residual:
        r2, h = x2, y  # placeholders: the kernel neither reads R nor writes H
    cfg = _config(M, N, has_residual, x2.device)
    with device_guard(x2.device):
        _layer_norm_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            x2, r2, weight, bias, h, y, mean, rstd, x2.stride(0), r2.stride(0), M, N, eps, **cfg,
        )


def layer_norm_backward(dy2, x2, weight, mean, rstd, dx, weight_dtype, bias_dtype, dh2=None):
    """dx (M, N) contiguous <- dX, plus dh2 (the gradient from h's other uses) when given; returns
    (dW, dB), (N,) each in the given dtypes."""
    M, N = x2.shape
    if M == 0:
        return torch.zeros(N, dtype=weight_dtype, device=x2.device), torch.zeros(N, dtype=bias_dtype, device=x2.device)
    has_residual = dh2 is not None
    cfg = _config(M, N, has_residual, x2.device, backward=True)
    n_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    want_groups = max(1, min(n_tiles, num_programs(x2.device, GROUPS_PER_SM)))
    tiles_per_group = triton.cdiv(n_tiles, want_groups)
    n_groups = triton.cdiv(n_tiles, tiles_per_group)  # no empty group at the end
    partial = torch.empty((n_groups, 2 * N), dtype=torch.float32, device=x2.device)
    if not has_residual:
        dh2 = dy2  # placeholder: the kernel does not read DH
    with device_guard(x2.device):
        _layer_norm_bwd_kernel[(n_groups,)](
            x2, weight, dy2, dh2, dx, mean, rstd, partial, x2.stride(0), dy2.stride(0), dh2.stride(0),
            M, N, tiles_per_group * cfg["BLOCK_M"], **cfg,
        )
    dwdb = sum_partials(partial, torch.float32)  # (2N,): one reduction launch for both gradients
    # copy=True: two separate tensors, not views of one buffer (a custom op's outputs may not alias).
    return dwdb[:N].to(weight_dtype, copy=True), dwdb[N:].to(bias_dtype, copy=True)


def _check_inputs(x, weight, bias, eps, residual=None, op=_OP):
    """layer_norm's inputs; for op = add_layer_norm also the residual, which must match x exactly
    (shape, dtype, device; its strides are free)."""
    tensors = {"x": x, "residual": residual} if op == _ADD_OP else {"x": x}
    tensors.update(weight=weight, bias=bias)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        check_dtype(t, name, op)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    if op == _ADD_OP:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual has dtype {residual.dtype}, expected x's {x.dtype}")
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (N,):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected ({N},) = x.shape[-1]")
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{op}: {name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    if not 1 <= N <= MAX_N:
        raise ValueError(f"{op}: the normalized dim must have 1 to {MAX_N} elements, got shape {tuple(x.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive number, got {eps!r}")
    check_device(*tensors.values(), op=op)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops and the autograd.Function
# ----------------------------------------------------------------------------------------------
# The launchers as PyTorch custom ops, as in flash_attention: torch.compile cannot trace into a
# Triton launch, but it can treat an op it knows only by its output shapes (the fake implementations)
# as opaque, so a compiled model runs LayerNormFunction without a graph break.
@torch.library.custom_op(
    "gpt_triton::layer_norm_fwd", mutates_args=(),
    schema="(Tensor x2, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)",
)
def _layer_norm_fwd_op(x2, weight, bias, eps):
    y = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    layer_norm_forward(x2, weight, bias, eps, y, mean, rstd)
    return y, mean, rstd


@_layer_norm_fwd_op.register_fake
def _(x2, weight, bias, eps):
    M = x2.shape[0]
    return x2.new_empty(x2.shape), x2.new_empty(M, dtype=torch.float32), x2.new_empty(M, dtype=torch.float32)


@torch.library.custom_op(
    "gpt_triton::layer_norm_bwd", mutates_args=(),
    schema="(Tensor dy2, Tensor x2, Tensor weight, Tensor mean, Tensor rstd, ScalarType bias_dtype,"
    " Tensor? dh2=None) -> (Tensor, Tensor, Tensor)",
)
def _layer_norm_bwd_op(dy2, x2, weight, mean, rstd, bias_dtype, dh2=None):
    dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    dw, db = layer_norm_backward(dy2, x2, weight, mean, rstd, dx, weight.dtype, bias_dtype, dh2)
    return dx, dw, db


@_layer_norm_bwd_op.register_fake
def _(dy2, x2, weight, mean, rstd, bias_dtype, dh2=None):
    N = x2.shape[1]
    return x2.new_empty(x2.shape), weight.new_empty(N), weight.new_empty(N, dtype=bias_dtype)


# add_layer_norm's forward has one more input and one more output; its backward is layer_norm_bwd
# with dh2, whose one dX output the autograd function hands to both x and the residual.
@torch.library.custom_op(
    "gpt_triton::add_layer_norm_fwd", mutates_args=(),
    schema="(Tensor x2, Tensor r2, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _add_layer_norm_fwd_op(x2, r2, weight, bias, eps):
    h = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    y = torch.empty_like(h)
    mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    layer_norm_forward(x2, weight, bias, eps, y, mean, rstd, r2, h)
    return h, y, mean, rstd


@_add_layer_norm_fwd_op.register_fake
def _(x2, r2, weight, bias, eps):
    M = x2.shape[0]
    return (x2.new_empty(x2.shape), x2.new_empty(x2.shape),
            x2.new_empty(M, dtype=torch.float32), x2.new_empty(M, dtype=torch.float32))


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps=1e-5):
        _check_inputs(x, weight, bias, eps)
        x2 = as_rows(x, x.shape[-1])
        weight, bias = weight.contiguous(), bias.contiguous()
        y, mean, rstd = _layer_norm_fwd_op(x2, weight, bias, float(eps))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.x_shape, ctx.bias_dtype = x.shape, bias.dtype
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = as_rows(dy, x2.shape[1])
        dx, dw, db = _layer_norm_bwd_op(dy2, x2, weight, mean, rstd, ctx.bias_dtype)
        return dx.view(ctx.x_shape), dw, db, None


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps=1e-5):
        _check_inputs(x, weight, bias, eps, residual, op=_ADD_OP)
        N = x.shape[-1]
        weight, bias = weight.contiguous(), bias.contiguous()
        h, y, mean, rstd = _add_layer_norm_fwd_op(as_rows(x, N), as_rows(residual, N), weight, bias, float(eps))
        ctx.save_for_backward(h, weight, mean, rstd)  # h, the LayerNorm's input: not x and residual
        ctx.x_shape, ctx.bias_dtype = x.shape, bias.dtype
        # A gradient that does not reach one output arrives as None, not as a tensor of zeros to read.
        ctx.set_materialize_grads(False)
        return h.view(x.shape), y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, dy):
        h2, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # only h was used: dX = dR = dh, and the LayerNorm's parameters get no gradient
            return dh, dh, None, None, None
        N = h2.shape[1]
        dh2 = None if dh is None else as_rows(dh, N)
        dx, dw, db = _layer_norm_bwd_op(as_rows(dy, N), h2, weight, mean, rstd, ctx.bias_dtype, dh2)
        dx = dx.view(ctx.x_shape)
        return dx, dx, dw, db, None  # h = x + residual: one gradient, the same tensor for both


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm(x, (N,), weight, bias, eps) over the last dim N of x (any leading shape, any
    strides, 1 <= N <= 4096). weight and bias are (N,), fp32 or x's dtype; the output has x's dtype;
    statistics and accumulation are fp32. Gradients flow to x, weight and bias, each in its own dtype."""
    return LayerNormFunction.apply(x, weight, bias, eps)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y) with h = x + residual and y = layer_norm(h, weight, bias, eps), in one pass: a pre-LN
    block's residual add and the LayerNorm that follows it. residual has x's shape and dtype (any
    strides, both); h and y come out contiguous in x's shape and dtype. y normalizes the fp32 sum,
    before h is rounded to x's dtype. Gradients may flow into h, y or both; x and residual receive
    the same gradient tensor, dh + the LayerNorm's dX."""
    return AddLayerNormFunction.apply(x, residual, weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# Compile specs: the block's calls at every GPT-2 width, forward and backward: layer_norm (norm1,
# the final norm) and add_layer_norm (the residual add + norm2), x (B, T, C) with fp32 weight and
# bias in the dtypes the model trains in; tools/compile_check.py compiles what they launch (the
# dW/dB column sum included).
# ----------------------------------------------------------------------------------------------
def _spec_call(C: int, dtype, param_dtype, residual: bool):
    def call():
        x, r = (torch.empty(1, GPT2_CONTEXT, C, dtype=dtype, requires_grad=True) for _ in range(2))  # (B, T, C)
        w, b = (torch.empty(C, dtype=param_dtype, requires_grad=True) for _ in range(2))
        if residual:
            h, y = add_layer_norm(x, r, w, b)
            torch.autograd.backward([h, y], [torch.empty_like(h), torch.empty_like(y)])
        else:
            backward_of(layer_norm(x, w, b))

    return call


COMPILE_SPECS = [
    CompileSpec(f"{op}.train.{DTYPE_NAMES[dt]}.{preset}", _spec_call(C, dt, pdt, op == _ADD_OP),
                f"{preset}, B x {GPT2_CONTEXT} tokens, x {DTYPE_NAMES[dt]}, weight and bias {DTYPE_NAMES[pdt]}")
    for op in (_OP, _ADD_OP)
    for dt, pdt in TRAIN_DTYPES
    for preset, (C, _) in GPT2_PRESETS.items()
]
