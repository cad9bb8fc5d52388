"""Fused causal attention (FlashAttention-2): tiling, an online softmax, and a backward that recomputes.

The math
--------
For one (batch, head), with q: (Tq, D), k and v: (Tk, D) and scale = 1/sqrt(D):

    S = scale * q k^T            (Tq, Tk)  scores
    P = softmax(S + mask)        (Tq, Tk)  row-wise; the causal mask puts -inf where key j > i + (Tk - Tq)
    O = P v                      (Tq, D)

The causal mask is aligned bottom-right: when a prompt of Tq tokens is continued against a KV cache
of Tk >= Tq keys, query i sits at absolute position i + (Tk - Tq) and sees every key up to there.
With Tq == Tk this is the ordinary lower triangle.

Why fuse: the (T, T) matrices never touch HBM
----------------------------------------------
Written op by op, attention materialises S and P in GPU memory. For GPT-2 124M at T = 1024, D = 64
in bf16, per (sequence, head):

    unfused: write S (T^2 * 2 B = 2 MiB), softmax reads S and writes P (4 MiB), P v reads P (2 MiB)
             -> at least 8 MiB of HBM traffic, O(T^2), plus 2 MiB of P kept alive for backward
    fused:   read q, k, v and write O (4 * T * D * 2 B = 512 KiB), write the log-sum-exp (4 KiB)
             -> O(T * D); only the 4 KiB log-sum-exp is kept for backward

A forward pass of the whole model at batch 8 runs 8 * 12 layers * 12 heads = 1152 of these: about
9 GiB of traffic unfused against about 0.6 GiB fused (at 2 TB/s, ~4.7 ms against ~0.3 ms), and
2.25 GiB of saved probabilities against 4.5 MiB of log-sum-exps. Each program instance owns a
BLOCK_M-row tile of queries and streams BLOCK_N-row tiles of k and v past it through SRAM; q, the
running statistics and the output accumulator stay in registers. k and v are re-read by every query
tile that sees them ((T / BLOCK_M + 1) / 2 times on average under the causal mask: 8.5 with 64-row
tiles), but one head's k and v are 256 KiB, so those re-reads are served by L2.

Causal block skipping
---------------------
A query tile [m0, m0 + BLOCK_M) sees keys up to min(m0 + BLOCK_M, Tq) - 1 + (Tk - Tq). Key tiles past
that bound are never loaded: the loop stops there, which halves the work of causal attention. Of
the tiles it does visit, those entirely at or below the diagonal (and inside Tk) need no mask at
all, so the loop runs in two stages: an unmasked stage over full tiles, then a masked stage over the
few tiles that straddle the diagonal or the end of the sequence. The stage boundaries are computed
from m0, BLOCK_M, BLOCK_N and Tk - Tq, so they are right for any pair of block sizes.

The online softmax (derived above the forward's inner loop) keeps per query row a running max, a
running sum and an unnormalised output, and saves one log-sum-exp per row; the backward (derived
above its kernels) rebuilds P from it instead of storing P.

Dtypes: fp32 inputs use input_precision="ieee" dots (a GPU would otherwise use TF32 and miss fp32
PyTorch by ~1e-3); Triton runs those as FMA loops, which only fit the registers with small tiles
(see _CONFIGS_FP32). fp16/bf16 feed tl.dot in their own dtype with fp32 accumulation, casting P and
dS down to the input dtype before their dots, as FlashAttention does. Triton's interpreter cannot
multiply bf16 tiles, so there (only) bf16 tiles are widened to fp32 first (DOT_FP32).

Reading order: configurations (the GPU's autotuned tiles, the interpreter's), the lesson's counts,
the building blocks every kernel shares (tile loads, scores, P, the causal bounds, the dropout
mask), the forward with the online softmax derived above it, the backward with its derivation,
the launchers (`flash_attention_forward`, `flash_attention_backward`), the custom ops and the
autograd.Function, the public `flash_attention`, and the compile specs.
"""

from __future__ import annotations

import math

import torch

from kernels._common import (
    DTYPE_NAMES,
    GPT2_CONTEXT,
    GPT2_PRESETS,
    INTERPRET,
    INTERPRETER_TILE,
    LOG2E,
    TRAIN_DTYPES,
    CompileSpec,
    autotune,
    backward_of,
    check_device,
    check_dtype,
    check_ndim,
    device_guard,
    interpreter_configs,
    next_power_of_2,
)

import triton  # noqa: E402  (after kernels._common, which may switch on the interpreter)
import triton.language as tl  # noqa: E402

OP = "flash_attention"
_LOG2E = tl.constexpr(LOG2E)  # kernels read globals only as constexprs
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128  # tl.dot needs K >= 16; D > 128 would need smaller tiles than these


# ----------------------------------------------------------------------------------------------
# Launch configurations: autotuned on a GPU; the interpreter's own (INTERPRETER_MAX_BLOCK) off-GPU.
# ----------------------------------------------------------------------------------------------
def _config(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Per kernel, per dtype class; every one compiles for sm_80 and sm_90 at D = 64 and 128 with no
# register spills (tools/compile_check.py), which is what rules most larger tiles out: the
# backward keeps more tiles live than the forward (k, v, dK, dV, and P, dP, dS).
_CONFIGS_16BIT = {  # fp16 / bf16: tensor-core dots
    "fwd": [_config(64, 64, 4, 2), _config(64, 64, 4, 3), _config(128, 64, 8, 2)],
    "dkdv": [_config(64, 64, 8, 3)],
    "dq": [_config(64, 32, 4, 2), _config(64, 32, 4, 3)],
}
# fp32 with input_precision="ieee" is an FMA loop that holds whole rows of both operands in
# registers: at 64 x 64 it spills 7-14 KB per thread, so fp32 gets small tiles (a correctness path;
# fast attention is fp16/bf16).
_CONFIGS_FP32 = {
    "fwd": [_config(16, 16, 8, 2)],
    "dkdv": [_config(16, 16, 8, 2)],
    "dq": [_config(16, 16, 4, 2)],
}
# What each autotuner holds: the 16-bit list, then the fp32 one; _pruner keeps the list for the
# dtype at hand.
_FWD_CONFIGS = _CONFIGS_16BIT["fwd"] + _CONFIGS_FP32["fwd"]
_DKDV_CONFIGS = _CONFIGS_16BIT["dkdv"] + _CONFIGS_FP32["dkdv"]
_DQ_CONFIGS = _CONFIGS_16BIT["dq"] + _CONFIGS_FP32["dq"]
_PRE_BLOCK_M = 64  # the preprocess kernel is a plain row reduction: no tuning needed
# Triton's interpreter runs the programs of a launch one after another in Python, and each tile
# operation costs about a millisecond of bookkeeping whatever its size: a kernel's time there is
# (programs x operations per program), not FLOPs. So off-GPU every kernel gets one configuration
# with tiles as large as the sequence (up to this side): one program per (batch, head) and one loop
# step at T <= 256, about 10x faster than the GPU's 64 x 64 tiles. The kernel code is the same.
INTERPRETER_MAX_BLOCK = 256
# Dropout seeds are drawn below 2^31: a 32-bit kernel argument, like every other integer here.
DROPOUT_SEED_BOUND = 2**31 - 1
# Retune when the head dim, the dtype (Triton adds tensor dtypes to the key), causality or the
# sequence length's power-of-two bucket changes; not for every distinct length.
_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "SEQ_BUCKET"]
SMEM_SM80 = 163 * 1024  # shared memory a block may use on an A100 (sm_90 has 227 KiB)


def _smem_estimate(kernel: str, config, dtype_bytes: int, block_d: int) -> int:
    """An upper bound on the shared memory of one config, in bytes (checked against Triton 3.9's
    own numbers for sm_80 at D = 64 and 128). The software pipeliner keeps `num_stages - 1` copies
    of the two tiles a kernel streams through its loop (k and v for fwd and dQ; q and dO for dK/dV),
    the tiles loaded once stay in shared memory too, and P and dS pass through a scratch tile on
    their way from accumulator layout to dot-operand layout."""
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    streamed, resident = {"fwd": (bn, bm), "dkdv": (bm, 2 * bn), "dq": (bn, 2 * bm)}[kernel]
    row = block_d * dtype_bytes
    return row * (2 * max(stages - 1, 1) * streamed + resident) + 2 * bm * bn * dtype_bytes


def _configs_for(kernel: str, dtype, block_d: int, dropout: bool = False) -> list:
    """The configs the autotuner may pick for this kernel, dtype, (padded) head dim and dropout."""
    configs = (_CONFIGS_FP32 if dtype == torch.float32 else _CONFIGS_16BIT)[kernel]
    if dropout and kernel == "fwd" and dtype != torch.float32:
        # The Philox rounds take the 16-bit forward to 255 registers: at 64 x 64 with 4 warps it
        # spills 8 bytes a thread on sm_90 (bench/results/compile-report.json); 128 x 64 with 8 does not.
        configs = [c for c in configs if c.num_warps >= 8] or configs
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    return [c for c in configs if _smem_estimate(kernel, c, dtype_bytes, block_d) <= SMEM_SM80] or configs[:1]


def _pruner(kernel: str):
    """Autotuner hook: keep the configs of this dtype's list that fit its shared memory (and, with
    dropout, its registers)."""

    def key(c):  # by value: an autotuner may hold copies of our Config objects
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wanted = {key(c) for c in _configs_for(kernel, args["Q"].dtype, args["BLOCK_D"], bool(args.get("HAS_DROPOUT")))}
        return [c for c in configs if key(c) in wanted] or configs[:1]

    return prune


# ----------------------------------------------------------------------------------------------
# The lesson's counts: the docstring's traffic and FLOPs as code, for any shape and block sizes.
# tests/test_explain.py checks them against a trace of every load, store and dot in the interpreter;
# `python scripts/explain.py flash_attention` prints both. Bytes are what the programs request (k and
# v re-read once per query tile: on a GPU mostly from L2); FLOPs are those of the tile products,
# 2 * M * N * K per tl.dot, padding included (BLOCK_D = the head dim rounded up to a power of 2).
# ----------------------------------------------------------------------------------------------
def _block_d(D: int) -> int:
    return max(next_power_of_2(D), 16)


def visited_tiles(Tq: int, Tk: int, BLOCK_M: int, BLOCK_N: int, causal: bool = True) -> int:
    """(query tile, key tile) pairs the forward (and the dQ kernel) computes per (batch, head):
    sum over query tiles i of cdiv(min((i + 1) BLOCK_M, Tq) + Tk - Tq, BLOCK_N) when causal. When
    BLOCK_M = r BLOCK_N and BLOCK_M divides Tq (n query tiles), that is r n (n + 1) / 2 + n cdiv(Tk - Tq,
    BLOCK_N): about half of the n_q * n_k pairs of non-causal attention when Tq == Tk."""
    n_k = -(-Tk // BLOCK_N)
    if not causal:
        return -(-Tq // BLOCK_M) * n_k
    return sum(-(-(min(m0 + BLOCK_M, Tq) + Tk - Tq) // BLOCK_N) for m0 in range(0, Tq, BLOCK_M))


def _dkdv_query_start(start_n: int, Tq: int, Tk: int, BLOCK_M: int, causal: bool) -> int:
    """The first query row the dK/dV program of key tile start_n loads (lo in the kernel)."""
    return (max(start_n - (Tk - Tq), 0) // BLOCK_M) * BLOCK_M if causal else 0


def memory_traffic(kernel: str, B: int, H: int, Tq: int, Tk: int, D: int, dtype_bytes: int,
                   BLOCK_M: int, BLOCK_N: int, causal: bool = True, fused_dq: bool = False) -> dict:
    """{kernel argument: (bytes read, bytes written)} of one launch of `kernel` ("fwd",
    "bwd_preprocess", "bwd_dkdv", "bwd_dq"); LSE and DELTA are fp32, the rest dtype_bytes. fused_dq:
    the dK/dV launch also writes dQ (see fuses_dq), and no "bwd_dq" launch follows."""
    e, f = dtype_bytes, 4

    def keys_loaded(m0):  # key rows a query tile loads: every visited tile, cut at Tk
        hi = min(m0 + BLOCK_M, Tq) + (Tk - Tq) if causal else Tk
        return min(-(-hi // BLOCK_N) * BLOCK_N, Tk)

    bh = B * H
    if kernel == "fwd":
        kv = bh * sum(keys_loaded(m0) for m0 in range(0, Tq, BLOCK_M)) * D * e
        q = bh * Tq * D * e
        return {"Q": (q, 0), "K": (kv, 0), "V": (kv, 0), "O": (0, q), "LSE": (0, bh * Tq * f)}
    if kernel == "bwd_preprocess":
        return {"O": (bh * Tq * D * e, 0), "DO": (bh * Tq * D * e, 0), "DELTA": (0, bh * Tq * f)}
    if kernel == "bwd_dkdv":
        # Each key tile walks the query tiles from the first that sees it to the end.
        q_rows = bh * sum(Tq - _dkdv_query_start(n0, Tq, Tk, BLOCK_M, causal) for n0 in range(0, Tk, BLOCK_N))
        kv = bh * Tk * D * e
        return {"Q": (q_rows * D * e, 0), "K": (kv, 0), "V": (kv, 0), "DO": (q_rows * D * e, 0),
                "DK": (0, kv), "DV": (0, kv), "LSE": (q_rows * f, 0), "DELTA": (q_rows * f, 0),
                **({"DQ": (0, q_rows * D * e)} if fused_dq else {})}
    if kernel == "bwd_dq":
        kv = bh * sum(keys_loaded(m0) for m0 in range(0, Tq, BLOCK_M)) * D * e
        q = bh * Tq * D * e
        return {"Q": (q, 0), "K": (kv, 0), "V": (kv, 0), "DO": (q, 0), "DQ": (0, q),
                "LSE": (bh * Tq * f, 0), "DELTA": (bh * Tq * f, 0)}
    raise ValueError(f"unknown kernel {kernel!r}")


def flops(kernel: str, B: int, H: int, Tq: int, Tk: int, D: int, BLOCK_M: int, BLOCK_N: int,
          causal: bool = True, fused_dq: bool = False) -> int:
    """FLOPs of the tl.dots of one launch: per visited tile pair, 2 dots in the forward (q k^T, P v),
    4 in dK/dV (q k^T, P^T dO, dO v^T, dS^T q; 5 with fused_dq: + dS k), 3 in dQ (q k^T, dO v^T,
    dS k), each 2 BLOCK_M BLOCK_N BLOCK_D."""
    tile = 2 * BLOCK_M * BLOCK_N * _block_d(D)
    if kernel == "fwd":
        return B * H * visited_tiles(Tq, Tk, BLOCK_M, BLOCK_N, causal) * 2 * tile
    if kernel == "bwd_preprocess":
        return 0
    if kernel == "bwd_dkdv":
        n_q = -(-Tq // BLOCK_M)
        pairs = sum(n_q - _dkdv_query_start(n0, Tq, Tk, BLOCK_M, causal) // BLOCK_M for n0 in range(0, Tk, BLOCK_N))
        return B * H * pairs * (5 if fused_dq else 4) * tile
    if kernel == "bwd_dq":
        return B * H * visited_tiles(Tq, Tk, BLOCK_M, BLOCK_N, causal) * 3 * tile
    raise ValueError(f"unknown kernel {kernel!r}")


# ----------------------------------------------------------------------------------------------
# The building blocks, named once: the forward and both backward kernels call these, so that the
# tiles they load, the scores they compute, the probabilities they rebuild, the loop bounds they
# skip by and the dropout mask they draw are the same code, not copies that could drift. In
# particular the backward's scores are the forward's bit for bit by construction: one helper
# computes q @ kT for all three, the same operands in the same order.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, offs, n, stride_t, stride_d, offs_d, HEAD_DIM: tl.constexpr, ROW_MASK: tl.constexpr,
               DOT_FP32: tl.constexpr):
    """Rows `offs` of a (T, D) slice as a (rows, BLOCK_D) tile; rows >= n masked when ROW_MASK (a
    ragged or out-of-range tile). DOT_FP32: widened for the interpreter's dot."""
    d_ok = offs_d < HEAD_DIM
    ptrs = base + offs[:, None] * stride_t + offs_d[None, :] * stride_d
    if ROW_MASK:
        x = tl.load(ptrs, mask=(offs[:, None] < n) & d_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_rows_T(base, offs, n, stride_t, stride_d, offs_d, HEAD_DIM: tl.constexpr, ROW_MASK: tl.constexpr,
                 DOT_FP32: tl.constexpr):
    """The same rows loaded already transposed, (BLOCK_D, rows): the right operand of q @ kT and
    dO @ vT, with no shuffle in registers."""
    d_ok = offs_d < HEAD_DIM
    ptrs = base + offs[None, :] * stride_t + offs_d[:, None] * stride_d
    if ROW_MASK:
        x = tl.load(ptrs, mask=d_ok[:, None] & (offs[None, :] < n), other=0.0)
    else:
        x = tl.load(ptrs, mask=d_ok[:, None], other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _scores(q, kT):
    """Raw scores q . k_j of one tile, (BLOCK_M, BLOCK_N) fp32: the product every kernel computes."""
    return tl.dot(q, kT, input_precision="ieee")


@triton.jit
def _exp2_scores(qk, qk_scale, shift):
    """exp2(qk * qk_scale - shift) per row, with one rounding (an fma): the forward's running
    probabilities (shift = the running max m) and the backward's P (shift = the saved LSE2)."""
    return tl.exp2(tl.fma(qk, qk_scale, -shift[:, None]))


@triton.jit
def _causal(keep, offs_m, offs_n, diag, CAUSAL: tl.constexpr):
    """keep, and (when CAUSAL) key j <= query i + diag: the mask aligned bottom-right."""
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
    return keep


@triton.jit
def _key_range(start_m, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_hi, hi): query tile start_m visits key tiles [0, full_hi) unmasked, then [full_hi, hi)
    masked, and none past hi (the forward and the dQ kernel)."""
    if CAUSAL:
        diag = Tk - Tq
        # Stop at the last key the tile's last real row can see: the skipped tiles are never loaded.
        hi = tl.minimum(start_m + BLOCK_M, Tq) + diag
        # Tiles ending at or before the tile's first row's diagonal (and inside Tk) need no mask.
        full_hi = tl.minimum((start_m + diag + 1) // BLOCK_N, Tk // BLOCK_N) * BLOCK_N
    else:
        hi = Tk
        full_hi = (Tk // BLOCK_N) * BLOCK_N
    return full_hi, hi


@triton.jit
def _query_range(start_n, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(lo, full_lo, full_hi, hi): key tile start_n is seen by query tiles [lo, hi): masked in
    [lo, full_lo) (the diagonal) and [full_hi, hi) (the ragged last tile), unmasked between; the
    tiles above lo are skipped (the dK/dV kernel)."""
    hi = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        diag = Tk - Tq
        # First query tile with a row that sees this tile's first key: everything above is skipped.
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        # First query tile whose every row sees this tile's last key: unmasked from there on.
        full_lo = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, hi)
    else:
        lo = 0
        full_lo = 0
    full_hi = tl.maximum((Tq // BLOCK_M) * BLOCK_M, full_lo)  # the ragged last query tile is masked
    return lo, full_lo, full_hi, hi


@triton.jit
def _dropout_keep(seed, rng_row0, offs_m, offs_n, Tk, dropout_p):
    """The dropout mask of one (BLOCK_M, BLOCK_N) tile: True where P_ij is kept. A counter-based
    generator (Philox, tl.rand) maps (seed, the element's flat index (bh * Tq + i) * Tk + j) to a
    uniform number in [0, 1), so the forward and both backward kernels regenerate the very same mask
    from the seed alone, whatever their tiles: it is never stored."""
    offsets = (rng_row0 + offs_m[:, None]).to(tl.int64) * Tk + offs_n[None, :]
    return tl.rand(seed, offsets) >= dropout_p


# ----------------------------------------------------------------------------------------------
# Forward. The online softmax:
#
# A row of P needs the max and the sum over *all* keys, but the kernel sees the keys one tile at a
# time. It keeps, per query row, the running max m, the running sum l = sum_j exp(s_j - m) and the
# unnormalised output acc = sum_j exp(s_j - m) v_j. When a new tile raises the max to m', everything
# accumulated so far was scaled by exp(-m) and must be scaled by exp(-m') instead, so
#
#     alpha = exp(m - m');   l <- alpha * l + sum_j exp(s_j - m');   acc <- alpha * acc + exp(s - m') v
#
# and at the end O = acc / l. All of this is in fp32 whatever the input dtype. We work in base 2:
# exp(x) = exp2(x * log2(e)), and log2(e) is folded into the scale once (qk_scale = scale * log2 e),
# so each score costs one fma, qk * qk_scale - m, and one exp2 (a single hardware instruction). The
# fma matters for accuracy, not only speed: a score of 100 rounded on its own is off by ~4e-6, which
# exp turns into a 4e-6 relative error; inside the fma only m is rounded, and m is common to the row.
# The only statistic saved for backward is the log-sum-exp per row, in the same base-2 units:
# LSE2 = m + log2(l) = log2 sum_j 2^(qk_scale q.k_j) (= torch.logsumexp(S, -1) * log2 e), so that the
# backward rebuilds P = exp2(qk * qk_scale - LSE2) with one fma and no conversion.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,  # acc: (BLOCK_M, BLOCK_D) fp32, l_i/m_i: (BLOCK_M,) fp32, q: (BLOCK_M, BLOCK_D)
    K, V,  # K/V: this (batch, head)'s (Tk, D) slice, any strides
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi, Tk, diag, qk_scale,
    seed, rng_row0, dropout_p, dropout_scale,  # dropout: see _dropout_keep
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr, DOT_FP32: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # -- load k (transposed) and v; scores q.k, masked past Tk and above the diagonal --
        kT = _load_rows_T(K, offs_n, Tk, stride_kt, stride_kd, offs_d, HEAD_DIM, MASKED, DOT_FP32)
        v = _load_rows(V, offs_n, Tk, stride_vt, stride_vd, offs_d, HEAD_DIM, MASKED, DOT_FP32)
        qk = _scores(q, kT)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            qk = tl.where(_causal(offs_n[None, :] < Tk, offs_m, offs_n, diag, CAUSAL), qk, float("-inf"))
        # -- the new running max m', and alpha = exp2(m - m') --
        # Every row has seen key 0 by the end of its first tile, so m_new is finite and
        # exp2(-inf - m_new) = 0 handles both the initial m_i = -inf and the masked scores.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # log2 units (qk_scale > 0 keeps the argmax)
        alpha = tl.exp2(m_i - m_new)
        # One fma per score: qk * qk_scale is never rounded on its own, so the only rounding of a
        # large score is in m_new, which is common to the whole row and cancels in acc / l.
        p = _exp2_scores(qk, qk_scale, m_new)
        # -- rescale l by alpha, add this tile's sum --
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax's sum: before dropout
        if HAS_DROPOUT:
            # -- drop P after the softmax: P_ij * Z_ij / (1 - p), Z the kept mask --
            kept = _dropout_keep(seed, rng_row0, offs_m, offs_n, Tk, dropout_p)
            p = tl.where(kept, p * dropout_scale, 0.0)
        # -- rescale acc by alpha, add p v --
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@autotune(_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _flash_attention_fwd_kernel(
    Q, K, V, O, LSE,  # Q/O: (B, H, Tq, D), K/V: (B, H, Tk, D), any strides; LSE: (B, H, Tq) fp32 contiguous
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    Tq, Tk, SEQ_BUCKET, sm_scale,  # SEQ_BUCKET: only an autotuning key
    dropout_p, seed,  # attention dropout (HAS_DROPOUT): the probability and the mask's seed
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), H, B): one program per query tile of one (batch, head)
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += (b * tl.num_programs(1) + h) * Tq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q, offs_m, Tq, stride_qt, stride_qd, offs_d, HEAD_DIM, True, DOT_FP32)
    qk_scale = sm_scale * _LOG2E  # fold log2(e) in: exp(x) = exp2(x * log2 e)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    rng_row0 = (b * tl.num_programs(1) + h) * Tq  # this (batch, head)'s first row in the mask's numbering
    dropout_scale = 1.0 / (1.0 - dropout_p)

    diag = Tk - Tq  # bottom-right alignment: query i sees keys j <= i + diag
    full_hi, hi = _key_range(start_m, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, 0, full_hi, Tk, diag, qk_scale,
                               seed, rng_row0, dropout_p, dropout_scale,
                               HEAD_DIM, BLOCK_N, CAUSAL, False, DOT_FP32, HAS_DROPOUT)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, full_hi, hi, Tk, diag, qk_scale,
                               seed, rng_row0, dropout_p, dropout_scale,
                               HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_FP32, HAS_DROPOUT)

    o = acc * (1.0 / l_i)[:, None]  # BLOCK_M divisions, not BLOCK_M x BLOCK_D
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=row_ok)  # log2 units


# ----------------------------------------------------------------------------------------------
# Backward: recompute instead of store.
#
# With dO the incoming gradient and Delta_i = sum_j P_ij dP_ij = dO_i . O_i (one dot per row):
#
#     dV = P^T dO        dP = dO v^T        dS = P * (dP - Delta)        dQ = scale dS k        dK = scale dS^T q
#
# P is never stored: each tile of it is rebuilt from q, k and the saved LSE2 as exp2(qk_scale q k^T -
# LSE2), which costs recomputing q k^T but saves reading T^2 probabilities back from HBM. The rebuilt
# P must match the forward's closely: where a row of P is nearly one-hot, a score off by 1e-5 makes a
# 1e-5 relative error in every gradient. So both backward kernels compute q @ k^T exactly as the
# forward did (same operands, same order, same fma), which makes the fp32 P bit-identical. What
# remains is the rounding of the saved LSE2 itself, half an ulp of |LSE2|, a relative error common to
# a whole row of P: below 5e-7 for ordinary scores (|LSE2| < 16), but 5e-6 when scores reach +-120,
# where fp32 gradients land ~3x further from exact than PyTorch's unfused softmax (which normalises
# each row to 6e-8). That is the price of saving one fp32 number per row instead of T^2. Three
# kernels, as in FlashAttention-2, none with atomics:
#   1. preprocess: Delta = rowsum(dO * O), (B, H, Tq) fp32.
#   2. dK/dV: one program per key tile; it loops over the query tiles that can see it (from the
#      diagonal down, so causal skipping again) and owns its rows of dK and dV outright. It needs
#      P^T and dS^T, and transposes the (BLOCK_M, BLOCK_N) tiles in registers rather than computing
#      k @ q^T directly, which could round differently (see above).
#   3. dQ: one program per query tile; it loops over the key tiles it can see and owns its rows of dQ.
# Splitting dQ from dK/dV costs the recomputation of P twice but makes every output row belong to
# exactly one program, which is what makes atomics unnecessary. The exception: when one key tile holds
# all Tk keys (FUSED_DQ, see fuses_dq), the dK/dV program of a (batch, head) sees every key of every
# query row, so it owns dQ as well: it finishes each query tile's dQ = scale dS k as it goes, and the
# dQ kernel (P rebuilt a second time, another launch) is skipped. In the interpreter, where tiles are
# as long as the sequence, that is every T <= INTERPRETER_MAX_BLOCK.
#
# Attention dropout (HAS_DROPOUT) drops P after the softmax: O = P_d v with P_d = P * Z / (1 - p), Z
# the kept mask (the forward's l still sums the undropped P). Then dV = P_d^T dO, the gradient
# reaching P is dP = (dO v^T) * Z / (1 - p), and Delta_i = sum_j P_ij dP_ij = sum_j P_d,ij (dO_i . v_j)
# = dO_i . O_i still: the preprocess kernel is unchanged, and both backward kernels redraw Z from the
# seed (_dropout_keep) rather than read it.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _flash_attention_bwd_preprocess_kernel(
    O, DO, DELTA,  # O/DO: (B, H, Tq, D), any strides; DELTA: (B, H, Tq) fp32 contiguous
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), H, B)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + (b * tl.num_programs(1) + h) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, kT, vT,  # dk/dv: (BLOCK_N, BLOCK_D) fp32 accumulators; kT/vT: (BLOCK_D, BLOCK_N) this program's keys
    Q, DO, DQ, LSE, DELTA,  # this (batch, head)'s Q/DO/DQ (Tq, D) slices and LSE/DELTA (Tq,) rows
    stride_qt, stride_qd, stride_dot, stride_dod, stride_dqt, stride_dqd,
    offs_n, offs_d, lo, hi, Tq, Tk, diag, qk_scale, sm_scale,
    seed, rng_row0, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr, DOT_FP32: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSED_DQ: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # -- load q, dO and the rows' LSE2 and Delta --
        q = _load_rows(Q, offs_m, Tq, stride_qt, stride_qd, offs_d, HEAD_DIM, MASKED, DOT_FP32)
        do = _load_rows(DO, offs_m, Tq, stride_dot, stride_dod, offs_d, HEAD_DIM, MASKED, DOT_FP32)
        if MASKED:
            lse2 = tl.load(LSE + offs_m, mask=offs_m < Tq, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=offs_m < Tq, other=0.0)
        else:
            lse2 = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        # Recompute this tile of P from q, k and the saved log-sum-exp, with the very dot and fma
        # the forward used (q @ kT, not k @ qT): the same sums in the same order give bit-identical
        # scores, so in fp32 the recomputed P is the forward's P. Computing k @ qT instead would save
        # the two transposes below but lets the rounding differ (NumPy's BLAS, the interpreter's
        # matmul, does differ), and with P nearly one-hot exp2 turns a 1e-5 score difference into a
        # 1e-5 relative error in every gradient.
        # -- P = exp2(q.k * qk_scale - LSE2), the forward's scores rebuilt --
        p = _exp2_scores(_scores(q, kT), qk_scale, lse2)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            # A masked score may exceed the row's LSE by any amount: exp2 can overflow, so zero it.
            p = tl.where(_causal(offs_m[:, None] < Tq, offs_m, offs_n, diag, CAUSAL), p, 0.0)
        if HAS_DROPOUT:
            # -- the forward's mask, regenerated: O = (P * Z / (1 - p)) V --
            kept = _dropout_keep(seed, rng_row0, offs_m, offs_n, Tk, dropout_p)
            pd = tl.where(kept, p * dropout_scale, 0.0)
        else:
            pd = p
        # -- dV += P^T dO; dP = dO v^T; dS = P (dP - Delta); dK += dS^T q --
        dv = tl.dot(tl.trans(pd.to(do.dtype)), do, dv, input_precision="ieee")  # += P_dropped^T dO
        dp = tl.dot(do, vT, input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:  # dP = dP_dropped * Z / (1 - p)
            dp = tl.where(kept, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision="ieee")  # += dS^T q
        if FUSED_DQ:
            # -- dQ = scale dS k, final: this program holds every key of these query rows --
            # The dQ kernel's product, on the same dS (keys past Tk zeroed: their P is never masked
            # here and may overflow, and inf * a zero key would be NaN).
            ds = tl.where(offs_n[None, :] < Tk, ds, 0.0)
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision="ieee")
            dq_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
            tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
                     (dq * sm_scale).to(DQ.dtype.element_ty), mask=dq_mask)
    return dk, dv


@autotune(_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit(do_not_specialize=["seed"])
def _flash_attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DQ, LSE, DELTA,  # Q/DO/DQ: (B, H, Tq, D), K/V/DK/DV: (B, H, Tk, D), any strides;
    # LSE/DELTA: (B, H, Tq) fp32 contiguous; DQ is written only with FUSED_DQ
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    Tq, Tk, SEQ_BUCKET, sm_scale,
    dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, FUSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tk, BLOCK_N), H, B): one program per key tile; it alone writes those rows of dK, dV
    # (and, with FUSED_DQ, where one key tile covers all Tk keys, every row of dQ).
    start_n = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += (b * tl.num_programs(1) + h) * Tq
    DELTA += (b * tl.num_programs(1) + h) * Tq

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
    # Loaded once, already transposed (BLOCK_D, BLOCK_N): the operands of q @ kT and dO @ vT.
    kT = _load_rows_T(K, offs_n, Tk, stride_kt, stride_kd, offs_d, HEAD_DIM, True, DOT_FP32)
    vT = _load_rows_T(V, offs_n, Tk, stride_vt, stride_vd, offs_d, HEAD_DIM, True, DOT_FP32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    rng_row0 = (b * tl.num_programs(1) + h) * Tq
    dropout_scale = 1.0 / (1.0 - dropout_p)
    qk_scale = sm_scale * _LOG2E  # as in the forward

    # Query rows i see key j iff j <= i + diag. Keys past Tk need no mask here: row j of dK/dV
    # depends only on key j, and rows past Tk are never stored.
    diag = Tk - Tq
    lo, full_lo, full_hi, hi = _query_range(start_n, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    dk, dv = _bwd_dkdv_inner(dk, dv, kT, vT, Q, DO, DQ, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                             stride_dqt, stride_dqd, offs_n, offs_d, lo, full_lo, Tq, Tk, diag, qk_scale, sm_scale,
                             seed, rng_row0, dropout_p, dropout_scale,
                             HEAD_DIM, BLOCK_M, CAUSAL, True, DOT_FP32, HAS_DROPOUT, FUSED_DQ)
    dk, dv = _bwd_dkdv_inner(dk, dv, kT, vT, Q, DO, DQ, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                             stride_dqt, stride_dqd, offs_n, offs_d, full_lo, full_hi, Tq, Tk, diag, qk_scale, sm_scale,
                             seed, rng_row0, dropout_p, dropout_scale,
                             HEAD_DIM, BLOCK_M, CAUSAL, False, DOT_FP32, HAS_DROPOUT, FUSED_DQ)
    dk, dv = _bwd_dkdv_inner(dk, dv, kT, vT, Q, DO, DQ, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                             stride_dqt, stride_dqd, offs_n, offs_d, full_hi, hi, Tq, Tk, diag, qk_scale, sm_scale,
                             seed, rng_row0, dropout_p, dropout_scale,
                             HEAD_DIM, BLOCK_M, CAUSAL, True, DOT_FP32, HAS_DROPOUT, FUSED_DQ)

    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta,  # dq: (BLOCK_M, BLOCK_D) fp32; q/do: (BLOCK_M, BLOCK_D); lse2/delta: (BLOCK_M,)
    K, V,  # this (batch, head)'s K/V (Tk, D) slices
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi, Tk, diag, qk_scale,
    seed, rng_row0, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr, DOT_FP32: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # -- load k and v (transposed); P = exp2(q.k * qk_scale - LSE2), the forward's scores rebuilt --
        kT = _load_rows_T(K, offs_n, Tk, stride_kt, stride_kd, offs_d, HEAD_DIM, MASKED, DOT_FP32)
        vT = _load_rows_T(V, offs_n, Tk, stride_vt, stride_vd, offs_d, HEAD_DIM, MASKED, DOT_FP32)
        p = _exp2_scores(_scores(q, kT), qk_scale, lse2)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            p = tl.where(_causal(offs_n[None, :] < Tk, offs_m, offs_n, diag, CAUSAL), p, 0.0)
        # -- dP = dO v^T; dS = P (dP - Delta); dQ += dS k --
        dp = tl.dot(do, vT, input_precision="ieee")
        if HAS_DROPOUT:  # dP = dP_dropped * Z / (1 - p), Z regenerated as in the forward
            kept = _dropout_keep(seed, rng_row0, offs_m, offs_n, Tk, dropout_p)
            dp = tl.where(kept, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision="ieee")
    return dq


@autotune(_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit(do_not_specialize=["seed"])
def _flash_attention_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,  # Q/DO/DQ: (B, H, Tq, D), K/V: (B, H, Tk, D), any strides;
    # LSE/DELTA: (B, H, Tq) fp32 contiguous
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    Tq, Tk, SEQ_BUCKET, sm_scale,
    dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), H, B): one program per query tile; it alone writes those rows of dQ.
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += (b * tl.num_programs(1) + h) * Tq
    DELTA += (b * tl.num_programs(1) + h) * Tq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = _load_rows(Q, offs_m, Tq, stride_qt, stride_qd, offs_d, HEAD_DIM, True, DOT_FP32)
    do = _load_rows(DO, offs_m, Tq, stride_dot, stride_dod, offs_d, HEAD_DIM, True, DOT_FP32)
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * _LOG2E  # as in the forward
    rng_row0 = (b * tl.num_programs(1) + h) * Tq
    dropout_scale = 1.0 / (1.0 - dropout_p)

    # The same key range and the same two stages as the forward pass.
    diag = Tk - Tq
    full_hi, hi = _key_range(start_m, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_m, offs_d, 0, full_hi, Tk, diag, qk_scale,
                       seed, rng_row0, dropout_p, dropout_scale,
                       HEAD_DIM, BLOCK_N, CAUSAL, False, DOT_FP32, HAS_DROPOUT)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_m, offs_d, full_hi, hi, Tk, diag, qk_scale,
                       seed, rng_row0, dropout_p, dropout_scale,
                       HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_FP32, HAS_DROPOUT)

    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers: flash_attention_forward, flash_attention_backward (checks, grid, launch)
# ----------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, causal: bool) -> None:
    device = check_device(q, k, v, op=OP)  # noqa: F841  (raises on a bad device)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_ndim(t, name, OP, 4, "(B, H, T, D)")
        check_dtype(t, name, OP)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, H, Tq, D), (Bk, Hk, Tk, Dk) = q.shape, k.shape
    if (B, H, D) != (Bk, Hk, Dk):
        raise ValueError(
            f"{OP}: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, heads and head dim"
        )
    if Tq < 1 or Tk < 1:
        raise ValueError(f"{OP}: sequence lengths must be >= 1, got Tq={Tq}, Tk={Tk}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim {D} is not supported; it must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if causal and Tk < Tq:
        raise ValueError(
            f"{OP}: causal attention needs Tk >= Tq (the queries are the last Tq of the Tk positions), "
            f"got Tq={Tq}, Tk={Tk}"
        )


def _meta(q, k, causal, dropout_p):
    """The launch arguments that are not tensors or strides, shared by the fwd/dkdv/dq kernels."""
    D = q.shape[-1]
    return dict(
        HEAD_DIM=D,
        BLOCK_D=max(next_power_of_2(D), 16),
        CAUSAL=bool(causal),
        # The interpreter's tl.dot cannot multiply bf16 tiles; widen them there. A GPU keeps bf16.
        DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
        HAS_DROPOUT=dropout_p > 0.0,  # p = 0 compiles the kernels without a line of dropout
    )


def _interpreter_config(Tq: int, Tk: int) -> dict:
    """The interpreter's one configuration: a query tile and a key tile each as long as its sequence
    (a power of 2, at least 16 for tl.dot, at most INTERPRETER_MAX_BLOCK)."""
    def side(T):
        return min(max(next_power_of_2(T), 16), INTERPRETER_MAX_BLOCK)

    return {"BLOCK_M": side(Tq), "BLOCK_N": side(Tk), "num_warps": 4, "num_stages": 2}


def _launch(kernel, grid, args, meta, config):
    """Autotuned launch, or one explicit block configuration (tests; the interpreter's)."""
    if config is None:
        kernel[grid](*args, **meta)
    else:
        config = dict(config)
        warps, stages = config.pop("num_warps", 4), config.pop("num_stages", 2)
        kernel.fn[grid](*args, **meta, **config, num_warps=warps, num_stages=stages)


def _check_dropout(dropout_p: float) -> float:
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def dropout_seed() -> int:
    """A seed for the dropout mask, drawn from torch's default (CPU) generator: torch.manual_seed
    makes a run's masks reproducible, and drawing needs no device synchronisation."""
    return int(torch.randint(0, DROPOUT_SEED_BOUND, (), dtype=torch.int64).item())


def flash_attention_forward(q, k, v, causal: bool, sm_scale: float, dropout_p: float = 0.0, seed: int = 0,
                            out=None, lse=None, config=None):
    """Returns (o, lse): o (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32 in log2 units (LSE2 above).

    dropout_p > 0: P is dropped with the mask of `seed` (dropout_mask(seed, ...) returns it).
    `out`/`lse`, optional: buffers to write into (tests poison them to check every element is
    written). `config`, optional: {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} instead of autotuning.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device) if lse is None else lse
    if q.numel() == 0:
        return o, lse
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (B, H, Tq) and lse.is_contiguous()
    if config is None and interpreter_configs(q.device):
        config = _interpreter_config(Tq, Tk)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), H, B)  # noqa: E731
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            Tq, Tk, next_power_of_2(max(Tq, Tk)), float(sm_scale), float(dropout_p), int(seed))
    with device_guard(q.device):
        _launch(_flash_attention_fwd_kernel, grid, args, _meta(q, k, causal, dropout_p), config)
    return o, lse


def _one_head(t):
    """(B, H, T, D) -> the same memory as (1, 1, B*H*T, D), or None when its strides do not allow it."""
    try:
        return t.view(1, 1, -1, t.shape[-1])
    except RuntimeError:
        return None


def _launch_preprocess(o, do, delta, block_d: int, interpreter_block_m):
    """Delta = rowsum(dO * O) into delta (B, H, Tq). A row-wise reduction: in the interpreter the rows of
    every (batch, head) are taken as one head's when O and dO allow the view (one or a few programs
    instead of B * H: the interpreter's cost is per program); a GPU keeps one program per tile of a head.
    interpreter_block_m: the interpreter's query tile (None on a GPU)."""
    B, H, Tq, D = o.shape
    block_m = _PRE_BLOCK_M if interpreter_block_m is None else interpreter_block_m
    if interpreter_block_m is not None and (o1 := _one_head(o)) is not None and (do1 := _one_head(do)) is not None:
        o, do, B, H, Tq = o1, do1, 1, 1, B * H * Tq
        block_m = min(next_power_of_2(Tq), max(INTERPRETER_TILE // block_d, 16))
    _flash_attention_bwd_preprocess_kernel[(triton.cdiv(Tq, block_m), H, B)](
        o, do, delta, *o.stride(), *do.stride(), Tq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m,
    )


def fuses_dq(Tk: int, config) -> bool:
    """Whether the backward computes dQ inside the dK/dV kernel: when a known configuration's one key
    tile covers all Tk keys (the interpreter's tiles up to T = INTERPRETER_MAX_BLOCK; an explicit GPU
    config for short sequences). The autotuner picks BLOCK_N only at launch, so it keeps the dQ kernel."""
    return config is not None and Tk <= config["BLOCK_N"]


def flash_attention_backward(do, q, k, v, o, lse, causal: bool, sm_scale: float, dropout_p: float = 0.0,
                             seed: int = 0, grads=None, config=None):
    """Returns (dq, dk, dv), each in its input's shape and dtype. dO may have any strides (it is read
    through its own strides, never copied). dropout_p and seed: the forward's. `grads`, optional:
    (dq, dk, dv) buffers to write into."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if grads is None:
        grads = (torch.empty_like(q, memory_format=torch.contiguous_format),
                 torch.empty_like(k, memory_format=torch.contiguous_format),
                 torch.empty_like(v, memory_format=torch.contiguous_format))
    dq, dk, dv = grads
    if q.numel() == 0:
        return dq, dk, dv
    meta = _meta(q, k, causal, dropout_p)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    bucket = next_power_of_2(max(Tq, Tk))
    interpreter = interpreter_configs(q.device)
    if config is None and interpreter:
        config = _interpreter_config(Tq, Tk)
    rng = (float(sm_scale), float(dropout_p), int(seed))
    with device_guard(q.device):
        _launch_preprocess(o, do, delta, meta["BLOCK_D"], config["BLOCK_M"] if interpreter else None)
        grid_kv = lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), H, B)  # noqa: E731
        fused_dq = fuses_dq(Tk, config)
        args = (q, k, v, do, dk, dv, dq, lse, delta,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *dq.stride(),
                Tq, Tk, bucket, *rng)
        _launch(_flash_attention_bwd_dkdv_kernel, grid_kv, args, {**meta, "FUSED_DQ": fused_dq}, config)
        if not fused_dq:  # else the dK/dV programs wrote dQ
            grid_q = lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), H, B)  # noqa: E731
            args = (q, k, v, do, dq, lse, delta,
                    *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                    Tq, Tk, bucket, *rng)
            _launch(_flash_attention_bwd_dq_kernel, grid_q, args, meta, config)
    return dq, dk, dv


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(MASK, seed, dropout_p, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(Tq, BLOCK_M), cdiv(Tk, BLOCK_N), B * H); MASK: (B, H, Tq, Tk) int8, contiguous
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rng_row0 = tl.program_id(2).to(tl.int64) * Tq
    kept = _dropout_keep(seed, rng_row0, offs_m, offs_n, Tk, dropout_p)
    ptrs = MASK + (rng_row0 + offs_m[:, None]) * Tk + offs_n[None, :]
    tl.store(ptrs, kept.to(tl.int8), mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


def dropout_mask(seed: int, B: int, H: int, Tq: int, Tk: int, dropout_p: float, device=None) -> torch.Tensor:
    """The debug path: (B, H, Tq, Tk) bool, True where the kernels keep P_ij for this seed and p
    (the same @triton.jit helper draws it, so it is the kernels' mask by construction)."""
    mask = torch.empty((B, H, Tq, Tk), dtype=torch.int8, device=device)
    if mask.numel():
        with device_guard(mask.device):
            _dropout_mask_kernel[(triton.cdiv(Tq, 64), triton.cdiv(Tk, 64), B * H)](
                mask, int(seed), float(dropout_p), Tq, Tk, BLOCK_M=64, BLOCK_N=64)
    return mask.bool()


# ----------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------
# The launchers as PyTorch custom ops: opaque to torch.compile, which then traces through
# FlashAttentionFunction without a graph break (it cannot trace into a Triton launch itself; the
# fake implementations tell it the output shapes instead). With dropout the forward op draws its
# seed itself, inside the op (a draw from the generator traced by torch.compile would break the
# graph), and returns it as a 0-d CPU tensor that the backward op reads.
@torch.library.custom_op(
    "gpt_triton::flash_attention_fwd", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, bool causal, float sm_scale, float dropout_p)"
    " -> (Tensor, Tensor, Tensor)",
)
def _flash_attention_fwd_op(q, k, v, causal, sm_scale, dropout_p):
    seed = dropout_seed() if dropout_p > 0.0 else 0
    o, lse = flash_attention_forward(q, k, v, causal, sm_scale, dropout_p, seed)
    return o, lse, torch.tensor(seed, dtype=torch.int64)


@_flash_attention_fwd_op.register_fake
def _(q, k, v, causal, sm_scale, dropout_p):
    B, H, Tq, D = q.shape
    return (q.new_empty((B, H, Tq, D)), q.new_empty((B, H, Tq), dtype=torch.float32),
            torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op(
    "gpt_triton::flash_attention_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor seed, bool causal,"
    " float sm_scale, float dropout_p) -> (Tensor, Tensor, Tensor)",
)
def _flash_attention_bwd_op(do, q, k, v, o, lse, seed, causal, sm_scale, dropout_p):
    return flash_attention_backward(do, q, k, v, o, lse, causal, sm_scale, dropout_p, int(seed.item()))


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, seed, causal, sm_scale, dropout_p):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float, dropout_p: float):
        o, lse, seed = _flash_attention_fwd_op(q, k, v, causal, sm_scale, dropout_p)
        # O(T * D) per head: no (T, T) matrix is kept, not even the dropout mask (the seed is)
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.causal, ctx.sm_scale, ctx.dropout_p = causal, sm_scale, dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = _flash_attention_bwd_op(do, q, k, v, o, lse, seed, ctx.causal, ctx.sm_scale, ctx.dropout_p)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal: bool = True, sm_scale: float | None = None, dropout_p: float = 0.0):
    """softmax(q k^T * sm_scale + causal mask) v, fused; differentiable.

    q: (B, H, Tq, D), k/v: (B, H, Tk, D), any strides (views of one fused QKV tensor work without a
    copy), fp32/fp16/bf16, 16 <= D <= 128. causal=True aligns the mask bottom-right (needs Tk >= Tq):
    query i sees keys j <= i + (Tk - Tq). sm_scale defaults to 1/sqrt(D). dropout_p > 0 drops
    attention probabilities as nn.Dropout would (kept ones scaled by 1 / (1 - p)), with a mask drawn
    in the kernels from a seed of torch's generator. Returns (B, H, Tq, D) in q's dtype.
    """
    _check_inputs(q, k, v, causal)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    sm_scale = float(sm_scale)
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"{OP}: sm_scale must be finite and > 0, got {sm_scale}")
    return FlashAttentionFunction.apply(q, k, v, bool(causal), sm_scale, _check_dropout(dropout_p))


# ----------------------------------------------------------------------------------------------
# Compile specs: the model's calls (model/gpt.py): q, k, v strided views of the fused QKV
# projection, (B, H, T, D). Training: forward and backward at T = 1024, every GPT-2 preset (all of
# head dim 64), and GPT-2-like widths whose head dims the launcher pads (80, 96 -> BLOCK_D 128; 128).
# Generation: a 7-token prompt against the KV cache (k, v views of the (B, H, 1024, D) buffers),
# forward only. tools/compile_check.py compiles every variant the autotuner may pick for these.
# ----------------------------------------------------------------------------------------------
_SPEC_HEADS = [(preset, H, C // H) for preset, (C, H) in GPT2_PRESETS.items()] + [
    ("1280-wide/16 heads", 16, 80), ("768-wide/8 heads", 8, 96), ("1536-wide/12 heads", 12, 128)]


def _spec_train(H: int, D: int, dtype, dropout_p: float = 0.0):
    def call():
        T = GPT2_CONTEXT
        qkv = torch.empty(1, T, 3, H, D, dtype=dtype, requires_grad=True)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
        y = flash_attention(q, k, v, causal=True, dropout_p=dropout_p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(1, T, H * D)  # (B, T, C)
        backward_of(y)

    return call


def _spec_prefill(H: int, D: int, dtype, T: int = 7):
    def call():
        qkv = torch.empty(1, T, 3, H, D, dtype=dtype)  # (B, T, 3, H, D)
        q = qkv.permute(2, 0, 3, 1, 4)[0]  # (B, H, T, D)
        k_cache, v_cache = (torch.empty(1, H, GPT2_CONTEXT, D, dtype=dtype) for _ in range(2))
        flash_attention(q, k_cache[:, :, :T], v_cache[:, :, :T], causal=True)

    return call


def _spec_train_short(H: int, D: int, dtype, T: int = 64):
    """Training at a short T with 32 x T tiles, whose one key tile holds all T keys: the FUSED_DQ
    variant (a GPU runs it only when a caller passes such a config). 64 x 64 with 8 warps spills on
    sm_80 here (72 B): the dQ tile is one more accumulator live."""
    def call():
        config = {"BLOCK_M": 32, "BLOCK_N": T, "num_warps": 4, "num_stages": 2}
        qkv = torch.empty(1, T, 3, H, D, dtype=dtype)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
        o, lse = flash_attention_forward(q, k, v, True, D ** -0.5, config=config)
        flash_attention_backward(torch.empty_like(o), q, k, v, o, lse, True, D ** -0.5, config=config)

    return call


COMPILE_SPECS = [
    CompileSpec(f"{OP}.train.{DTYPE_NAMES[dt]}.d{D}.{label}", _spec_train(H, D, dt),
                f"{label} training, B x {GPT2_CONTEXT} tokens, {H} heads of {D}, {DTYPE_NAMES[dt]}")
    for dt, _ in TRAIN_DTYPES
    for label, H, D in _SPEC_HEADS
] + [
    # The book's chapter 5 setting (dropout 0.1): the HAS_DROPOUT variants, gpt2-124M's heads.
    CompileSpec(f"{OP}.train_dropout.{DTYPE_NAMES[dt]}.d64", _spec_train(12, 64, dt, dropout_p=0.1),
                f"gpt2-124M training with attention dropout 0.1, {DTYPE_NAMES[dt]}")
    for dt in (torch.bfloat16, torch.float16)
] + [
    CompileSpec(f"{OP}.train_fused_dq.bf16.d64", _spec_train_short(12, 64, torch.bfloat16),
                "training at T = 64 with one 64-key tile (dQ fused into dK/dV), 12 heads of 64, bf16")
] + [
    # The debug path that returns the dropout mask the kernels draw (tests use it; it must build too).
    CompileSpec(f"{OP}.dropout_mask", lambda: dropout_mask(0, 1, 12, GPT2_CONTEXT, GPT2_CONTEXT, 0.1),
                "the dropout mask of gpt2-124M's heads at T = 1024, p = 0.1")
] + [
    CompileSpec(f"{OP}.prefill.{DTYPE_NAMES[dt]}.d64", _spec_prefill(12, 64, dt),
                f"gpt2-124M generation: a 7-token prompt into the KV cache, {DTYPE_NAMES[dt]}")
    for dt in (torch.float32, torch.bfloat16, torch.float16)
]
