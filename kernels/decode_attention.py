"""Flash-decoding: a few new query tokens against a long KV cache, the key axis split across programs.

Generation with a KV cache (model/kv_cache.py, model/generate.py) runs the model on one new token
per step (or a handful, for speculative / chunked steps). Each layer's attention then computes, for
every (sequence b, head h),

    o_t = softmax(q_t K^T * scale + mask) V        q_t: (D,), K, V: (L, D), t < Tq (Tq = 1 .. 16)

where K and V are the first L = seq_lens[b] rows of a preallocated cache of L_max rows. Rows past
seq_lens[b] are garbage (stale tokens of a finished sequence, or never written) and must not leak.
Query t sits at absolute position seq_lens[b] - Tq + t (its own key is already in the cache) and
sees keys j <= that position: the causal mask aligned bottom-right, per sequence.

Why decode is memory-bound
--------------------------
Take gpt2-124M (12 layers, 12 heads of D = 64, d_model = 768) at 1024 tokens of context, fp16.
Per generated token each layer reads its whole K and V cache once:

    bytes  = 12 layers * 2 (K and V) * 1024 * 768 * 2 B           = 37.7 MB per token
    FLOPs  = 12 layers * 2 (q.k and p.v) * 2 * 1024 * 768          = 37.7 MFLOP per token

one FLOP per byte. An H100 does ~990 TFLOP/s of fp16 tensor-core math but moves ~3.35 TB/s, so it
needs ~300 FLOPs per byte to keep its math units busy; decode attention offers 1. Its time is the
time to stream the cache, ~11 us per token here, no matter how the arithmetic is done. So this
kernel does its arithmetic in plain fp32 (no tensor cores needed for Tq = 1), reads each cache byte
exactly once, and the only thing that matters is keeping enough memory requests in flight.

Why one program per (b, h) is not enough
----------------------------------------
The training kernel (flash_attention.py) parallelises over (b, h, query block). At decode time there
is one query block, so that gives B * H programs: 12 at batch 1 for gpt2-124M, on a GPU with 132
SMs (H100; 108 on an A100). 120 of the 132 SMs sit idle, and one SM alone cannot pull more than a
small fraction of the HBM bandwidth. Flash-decoding (Dao et al., 2023) also splits the *key* axis
into NUM_SPLITS chunks, one program each: grid = (B * H, NUM_SPLITS). The launcher picks NUM_SPLITS
so that there are about 2 programs per SM (capped, and never more splits than key blocks). The
combine kernel merges the splits exactly (derived above it). In Triton's interpreter, where each
program costs Python time, the launcher takes one split (nothing to combine: no second launch).

Memory traffic: the split kernel reads K and V once (2 * L * D elements per (b, h)) and writes
NUM_SPLITS * Tq * (D + 1) fp32 partials; the combine reads those back and writes Tq * D outputs.
For gpt2-124M at batch 1 and 1024 tokens (16 splits) that is 256 KB of cache per head against
16 * 65 * 4 B = 4 KB of partials per query, written once and read once: ~3 % more traffic, and one
more (tiny) launch.

Implementation notes
--------------------
* The softmax runs in fp32 with exp2/log2 (scores scaled by sm_scale * log2(e)); the partial lse is
  in base 2, and so is the combine's arithmetic.
* Tq == 1 (BLOCK_T = 1): scores and p.V are broadcast-multiply-and-sum in fp32, exactly the FLOPs
  needed and no tensor cores. 1 < Tq <= 16 (BLOCK_T = 16): tl.dot padded to 16 rows (a dot needs
  M >= 16; the waste is compute, which decode has to spare), in the inputs' own dtype with fp32
  accumulation and P cast down to it for P.V, as FlashAttention does; fp32 inputs use
  input_precision="ieee" (no TF32). Triton's interpreter cannot multiply bf16 tiles, so there (only)
  bf16 tiles are widened to fp32 first (DOT_FP32); P is still rounded to bf16 before the widening,
  so the interpreter computes what the GPU does. (Widening every dtype to fp32 instead makes the
  dot an FMA loop that needs ~255 registers and spills: tools/compile_check.py showed it.)
* D is a compile-time constant: with D == BLOCK_D (64, 128) the head-dim mask folds away and K/V
  rows load as 16-byte vectors; other head dims (e.g. 80) are padded to BLOCK_D and masked.
* seq_lens is validated on the host (one device-to-host sync per call): a bad length would otherwise
  read garbage silently. Strided cache views are fine (all strides are passed).
* Inference only: there is no backward (generation never differentiates through the cache), so
  there is no autograd.Function, and inputs that require grad are refused with a clear error.

Reading order: configurations (block sizes, the split heuristic), the lesson's counts, the split
kernel, the combine kernel with its derivation, the launchers (checks; split + combine), the public
`decode_attention`, and the compile specs.
"""

from __future__ import annotations

import math

import torch

from kernels._common import (
    DTYPE_NAMES,
    GPT2_CONTEXT,
    GPT2_PRESETS,
    INTERPRET,
    LOG2E,
    CompileSpec,
    check_device,
    check_dtype,
    check_ndim,
    device_guard,
    interpreter_configs,
    next_power_of_2,
)

import triton  # noqa: E402  (after kernels._common, which picks the interpreter when there is no GPU)
import triton.language as tl  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Configurations: block sizes and the number of splits, the GPU's and the interpreter's
# ----------------------------------------------------------------------------------------------
MAX_TQ = 16  # queries per step: 1 for plain decoding, a few for speculative / chunked steps
MAX_HEAD_DIM = 128
MAX_SPLITS = 128  # more splits than this only adds combine work: 128 * B * H programs fill any GPU
PROGRAMS_PER_SM = 2  # enough resident programs per SM to hide memory latency
COMBINE_BLOCK_S = 16  # splits the combine kernel merges per step
NUM_WARPS = 4
NUM_STAGES = 2
# Triton's interpreter runs programs one after another in Python, each tile operation costing about a
# millisecond whatever its size, so off-GPU a launch is fastest as few programs with long tiles: one
# split per (sequence, head), keys in steps of up to this many (the kernel code is the same).
INTERPRETER_MAX_BLOCK_N = 1024
# With the GPU's configurations off-GPU (the compile check, tests), pretend an H100's SM count so
# that a CPU run picks the splits a GPU would.
_NOMINAL_SM_COUNT = 132


def _block_config(Tq: int, D: int, L_max: int | None = None, interpreter: bool = False) -> dict:
    """The constexprs the launcher picks: the GPU's, or (interpreter=True) long key tiles."""
    block_d = max(64, next_power_of_2(D))
    block_t = 1 if Tq == 1 else 16
    if interpreter:
        block_n = min(max(next_power_of_2(L_max), 16), INTERPRETER_MAX_BLOCK_N)
    else:
        # Tq == 1: 4096-element K/V tiles, 32 fp32 registers per thread at 4 warps, for either head
        # dim. The dot path also holds a (16, BLOCK_N) score tile and dot-operand copies: half that
        # (fp32 at D = 128 with 32 keys needs 255 registers on sm_90 and spills).
        block_n = (4096 if block_t == 1 else 2048) // block_d
    return {"BLOCK_T": block_t, "BLOCK_N": block_n, "BLOCK_D": block_d}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _NOMINAL_SM_COUNT


def choose_splits(L_max: int, BH: int, block_n: int, sm_count: int) -> int:
    """PROGRAMS_PER_SM programs per SM, but no more splits than key blocks (a split would be empty)
    nor than MAX_SPLITS. The kernel deals the blocks out evenly: each split gets
    floor or ceil(n_blocks / num_splits) of them, so any count tiles the cache."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(BH, 1))
    return max(1, min(wanted, MAX_SPLITS, triton.cdiv(L_max, block_n)))


# ----------------------------------------------------------------------------------------------
# The lesson's counts: the docstring's traffic and FLOPs as code, for any shape, lengths and blocks
# (checked against a trace of the interpreter by tests/test_explain.py; printed by
# `python scripts/explain.py decode_attention`). Bytes are what the programs request.
# ----------------------------------------------------------------------------------------------
def split_ranges(L_max: int, seq_len: int, BLOCK_N: int, num_splits: int) -> list:
    """The key range [lo, hi) each split of one sequence reads (hi <= lo: an empty split), as the
    split kernel deals the cdiv(L_max, BLOCK_N) key blocks out."""
    n_blocks = -(-L_max // BLOCK_N)
    return [((s * n_blocks // num_splits) * BLOCK_N, min(((s + 1) * n_blocks // num_splits) * BLOCK_N, seq_len))
            for s in range(num_splits)]


def memory_traffic(kernel: str, H: int, Tq: int, D: int, dtype_bytes: int, seq_lens: list,
                   num_splits: int) -> dict:
    """{kernel argument: (bytes read, bytes written)} of one launch of `kernel` ("fwd": the splits,
    "combine"). seq_lens: the B sequence lengths. The cache is read exactly once up to each length;
    each split program re-reads its Tq queries and its sequence's length, and writes fp32 partials."""
    e, f, B = dtype_bytes, 4, len(seq_lens)
    programs = B * H * num_splits
    if kernel == "fwd":
        cache = H * sum(seq_lens) * D * e
        return {"Q": (programs * Tq * D * e, 0), "K": (cache, 0), "V": (cache, 0), "SeqLens": (programs * 4, 0),
                "O_part": (0, programs * Tq * D * f), "LSE_part": (0, programs * Tq * f)}
    if kernel == "combine":
        return {"O_part": (programs * Tq * D * f, 0), "LSE_part": (programs * Tq * f, 0),
                "Out": (0, B * H * Tq * D * e)}
    raise ValueError(f"unknown kernel {kernel!r}")


def flops(kernel: str, H: int, Tq: int, D: int, seq_lens: list, num_splits: int, L_max: int,
          BLOCK_T: int, BLOCK_N: int, BLOCK_D: int) -> int:
    """FLOPs of the tl.dots: none for Tq == 1 (BLOCK_T = 1: broadcast-multiply-and-sum, 4 L D FLOPs per
    query, no tensor cores); otherwise two (BLOCK_T x BLOCK_D) x (BLOCK_D x BLOCK_N) dots per key block
    a split visits, padding rows included."""
    if kernel == "combine" or BLOCK_T == 1:
        return 0
    blocks = sum(-(-(hi - lo) // BLOCK_N) for n in seq_lens
                 for lo, hi in split_ranges(L_max, n, BLOCK_N, num_splits) if hi > lo)
    return H * blocks * 2 * (2 * BLOCK_T * BLOCK_N * BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Forward kernels. 1. the splits: each an online softmax over its share of the cache (the same
# rescaling as flash_attention.py's forward, derived there), written as a normalised partial output
# and its log-sum-exp.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _decode_attention_fwd_kernel(
    Q,  # (B, H, Tq, D), any strides: the current step's queries
    K,  # (B, H, L_max, D), any strides: the key cache; rows >= seq_lens[b] are garbage
    V,  # (B, H, L_max, D), any strides: the value cache; rows >= seq_lens[b] are garbage
    SeqLens,  # (B,) int32: valid cache rows per sequence (the newest Tq are the queries' own keys)
    O_part,  # (B * H, num_splits, Tq, D) fp32 contiguous: each split's normalised partial output
    LSE_part,  # (B * H, num_splits, Tq) fp32 contiguous: each split's log2-sum-exp2 of its scores
    qk_scale,  # sm_scale * log2(e): scores come out in base 2, for exp2
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, Tq,
    n_blocks,  # cdiv(L_max, BLOCK_N): the key blocks the splits share out
    num_splits,
    D: tl.constexpr,  # head dim: a constant, so that when D == BLOCK_D its mask folds away and loads vectorise
    BLOCK_T: tl.constexpr,  # 1 (Tq == 1) or 16 (a padded tl.dot)
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,  # next power of 2 >= D (at least 64)
    DOT_FP32: tl.constexpr,  # widen bf16 tiles before tl.dot: only in the interpreter, which cannot multiply bf16
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    seq_len = tl.load(SeqLens + b)

    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < Tq
    d_mask = offs_d < D

    # int64 for the (b, h) offsets: a big cache (or a view into an all-layers buffer) can pass 2^31.
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_ptrs += offs_t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=t_mask[:, None] & d_mask[None, :], other=0.0)
    if BLOCK_T == 1 or DOT_FP32:
        q = q.to(tl.float32)
    # Query t's absolute position. Padding rows (t >= Tq) see every real key: harmless, never stored.
    q_pos = seq_len - Tq + offs_t

    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    # Split s owns key blocks [s * n_blocks // num_splits, (s + 1) * n_blocks // num_splits): an even
    # deal for any num_splits. A split past the sequence's end gets hi <= lo: no iterations, no loads.
    lo = (split * n_blocks // num_splits) * BLOCK_N
    hi = tl.minimum(((split + 1) * n_blocks // num_splits) * BLOCK_N, seq_len)

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)  # running max of the base-2 scores
    l_i = tl.zeros([BLOCK_T], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    for start_n in range(lo, hi, BLOCK_N):
        offs_kn = start_n + offs_n
        n_mask = offs_kn < hi  # masks the garbage past seq_len: it is never even loaded
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # -- scores s = q.k * sm_scale * log2(e): keys past the length or the causal position masked --
        k = tl.load(k_base + offs_kn[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if BLOCK_T == 1:
            s = tl.sum(q * k.to(tl.float32), axis=1)[None, :]  # (1, BLOCK_D) * (BLOCK_N, BLOCK_D) -> (1, BLOCK_N)
        else:
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_T, BLOCK_N), fp32 accumulation
        s = s * qk_scale
        visible = n_mask[None, :] & (offs_kn[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        # -- rescale l by alpha = exp2(m - m_new), add this block's p = exp2(s - m_new) --
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no visible key so far has m_new = -inf; shift by 0 instead so that
        # exp2(-inf - 0) = 0 rather than exp2(-inf - (-inf)) = NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        # -- acc <- alpha * acc + p v --
        v = tl.load(v_base + offs_kn[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if BLOCK_T == 1:
            pv = tl.sum(tl.trans(p) * v.to(tl.float32), axis=0)[None, :]  # (BLOCK_N, 1) * (BLOCK_N, BLOCK_D)
        else:
            p_in = p.to(v.dtype)  # P in the cache's dtype for the tensor cores, as FlashAttention does
            if DOT_FP32:
                p_in = p_in.to(tl.float32)
                v = v.to(tl.float32)
            pv = tl.dot(p_in, v, input_precision="ieee")  # (BLOCK_T, BLOCK_D)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # -- this split's normalised output o_i = acc / l and its lse_i = m + log2 l (base 2) --
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]  # no visible key: 0, not 0/0
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))

    part = pid_bh * num_splits + split
    o_ptrs = O_part + (part * Tq + offs_t[:, None]).to(tl.int64) * D + offs_d[None, :]
    tl.store(o_ptrs, out, mask=t_mask[:, None] & d_mask[None, :])
    tl.store(LSE_part + part * Tq + offs_t, lse, mask=t_mask)


# ----------------------------------------------------------------------------------------------
# 2. the combine. Why split + combine is exact:
#
# Let split i cover the key set S_i, with scores s_j (already scaled and masked). The split kernel
# returns its own softmax-normalised output and its log-sum-exp:
#
#     lse_i = log sum_{j in S_i} exp(s_j)              o_i = sum_{j in S_i} exp(s_j - lse_i) v_j
#
# (computed with the usual online softmax over blocks of BLOCK_N keys, in fp32). Since
# exp(lse_i) = sum_{j in S_i} exp(s_j), the softmax over all keys is
#
#     o = sum_j exp(s_j) v_j / sum_j exp(s_j) = sum_i exp(lse_i) o_i / sum_i exp(lse_i)
#       = sum_i w_i o_i,        w_i = exp(lse_i - lse_max) / sum_k exp(lse_k - lse_max)
#
# which is what the combine kernel computes (subtracting lse_max = max_i lse_i changes nothing
# mathematically and keeps every exp <= 1). No approximation: the only error is fp32 rounding.
# A split with no visible key (past the sequence's end, or past a query's causal position) has
# lse_i = -inf and weight exp(-inf - lse_max) = 0. Split 0 always holds key 0, which every query
# sees, so lse_max is finite and the combine never computes -inf - (-inf) = NaN.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _decode_attention_combine_kernel(
    O_part,  # (B * H, num_splits, Tq, D) fp32 contiguous: the splits' normalised partial outputs
    LSE_part,  # (B * H, num_splits, Tq) fp32 contiguous: the splits' base-2 log-sum-exp
    Out,  # (B, H, Tq, D), any strides, in q's dtype
    stride_ob, stride_oh, stride_ot, stride_od,
    H, Tq, num_splits,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits merged per step
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # one program per (b, h, t)
    bh = pid // Tq
    t = pid % Tq
    b = bh // H
    h = bh % H

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    # The same online merge as the split kernel, one level up: BLOCK_S partials per step.
    m = tl.full([], float("-inf"), tl.float32)
    denom = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_idx = s0 + offs_s
        s_mask = s_idx < num_splits
        row = (bh * num_splits + s_idx) * Tq + t  # (BLOCK_S,) index of (bh, split, t)
        lse = tl.load(LSE_part + row, mask=s_mask, other=float("-inf"))
        o = tl.load(O_part + row.to(tl.int64)[:, None] * D + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        # -- rescale denom and acc by alpha = exp2(m - m_new); add w_i = exp2(lse_i - m_new) and w_i o_i --
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        # Split 0 always sees key 0, so m_new is finite from the first step on; the guard only keeps
        # a would-be empty step (all -inf) from producing NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_shift)
        w = tl.exp2(lse - m_shift)  # 0 for empty splits
        denom = denom * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        m = m_new

    # -- o = sum_i w_i o_i / sum_i w_i --
    out = acc / tl.where(denom > 0.0, denom, 1.0)
    out_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + t * stride_ot + offs_d * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=d_mask)


# ----------------------------------------------------------------------------------------------
# Launchers: input checks, then split + combine
# ----------------------------------------------------------------------------------------------
_OP = "decode_attention"


def _check_inputs(q, k_cache, v_cache, seq_lens, check_lengths: bool = True) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("seq_lens", seq_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise RuntimeError(
            f"{_OP} is inference-only and has no backward: call it under torch.no_grad() (or "
            "torch.inference_mode()), or detach the inputs; use flash_attention to train"
        )
    check_device(q, k_cache, v_cache, seq_lens, op=_OP)
    check_ndim(q, "q", _OP, 4, "(B, H, Tq, D)")
    check_ndim(k_cache, "k_cache", _OP, 4, "(B, H, L_max, D)")
    check_ndim(v_cache, "v_cache", _OP, 4, "(B, H, L_max, D)")
    check_ndim(seq_lens, "seq_lens", _OP, 1, "(B,)")
    check_dtype(q, "q", _OP)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    check_dtype(seq_lens, "seq_lens", _OP, dtypes=(torch.int32, torch.int64))

    B, H, Tq, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{_OP}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    Bk, Hk, L_max, Dk = k_cache.shape
    if (Bk, Hk, Dk) != (B, H, D):
        raise ValueError(
            f"{_OP}: q is (B, H, Tq, D) = {tuple(q.shape)} but the cache is (B, H, L_max, D) = "
            f"{tuple(k_cache.shape)}; B, H and D must match"
        )
    if seq_lens.shape[0] != B:
        raise ValueError(f"{_OP}: seq_lens has {seq_lens.shape[0]} entries for a batch of {B}")
    if not 1 <= Tq <= MAX_TQ:
        raise ValueError(f"{_OP}: Tq = {Tq} queries per step; supported 1..{MAX_TQ} (use flash_attention for a prompt)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dim {D} is not supported; supported 1..{MAX_HEAD_DIM}")
    if B == 0 or H == 0 or not check_lengths:
        return
    lo, hi = torch.stack([seq_lens.min(), seq_lens.max()]).tolist()  # one device-to-host sync
    if lo < Tq or hi > L_max:
        bad = ((seq_lens < Tq) | (seq_lens > L_max)).nonzero()[0].item()
        raise ValueError(
            f"{_OP}: seq_lens[{bad}] = {int(seq_lens[bad])} is out of range: each sequence must hold its "
            f"Tq = {Tq} new keys and fit the cache, so Tq <= seq_lens[b] <= L_max = {L_max}"
        )


def decode_attention_forward(q, k_cache, v_cache, seq_lens, sm_scale: float, num_splits: int | None = None):
    """Split + combine on validated inputs (decode_attention checks them). `num_splits` overrides
    the heuristic (tests)."""
    B, H, Tq, D = q.shape
    L_max = k_cache.shape[2]
    interpreter = interpreter_configs(q.device)
    cfg = _block_config(Tq, D, L_max, interpreter)
    if num_splits is None:  # the interpreter: one split, so one long program per (sequence, head)
        num_splits = 1 if interpreter else choose_splits(L_max, B * H, cfg["BLOCK_N"], _sm_count(q.device))
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    o_part = torch.empty((B * H, num_splits, Tq, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B * H, num_splits, Tq), dtype=torch.float32, device=q.device)
    lens = seq_lens.to(torch.int32)
    with device_guard(q.device):
        _decode_attention_fwd_kernel[(B * H, num_splits)](
            q, k_cache, v_cache, lens, o_part, lse_part,
            sm_scale * LOG2E,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            H, Tq, triton.cdiv(L_max, cfg["BLOCK_N"]), num_splits, D,
            **cfg, DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
        if num_splits == 1:  # one split's output is already the softmax over every key: no combine
            return o_part.view(B, H, Tq, D).to(q.dtype)
        _decode_attention_combine_kernel[(B * H * Tq,)](
            o_part, lse_part, out, *out.stride(),
            H, Tq, num_splits, D,
            BLOCK_S=COMBINE_BLOCK_S, BLOCK_D=cfg["BLOCK_D"], num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return out


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------
def decode_attention(q, k_cache, v_cache, seq_lens, sm_scale=None, check_lengths: bool = True):
    """Causal attention of a few new queries against a KV cache, per-sequence lengths (inference only).

    q: (B, H, Tq, D) with 1 <= Tq <= 16; k_cache, v_cache: (B, H, L_max, D) (strided views are fine);
    seq_lens: (B,) int32/int64 on q's device. Sequence b's cache holds seq_lens[b] valid keys, the
    last Tq of them the queries' own; query t sits at position seq_lens[b] - Tq + t and sees keys
    j <= that position. Everything from seq_lens[b] on is ignored. sm_scale defaults to 1/sqrt(D).
    Returns (B, H, Tq, D) in q's dtype. Not differentiable: refuses inputs that require grad.

    check_lengths=False skips the range check of seq_lens, the one device-to-host sync here: for
    callers that validated the lengths already (the model's KV cache checks its positions once per
    step, not once per layer), so that a decode step can run without a sync (and inside a CUDA graph).
    """
    _check_inputs(q, k_cache, v_cache, seq_lens, check_lengths)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if not math.isfinite(scale):
        raise ValueError(f"{_OP}: sm_scale must be finite, got {sm_scale}")
    return decode_attention_forward(q, k_cache, v_cache, seq_lens, scale)


# ----------------------------------------------------------------------------------------------
# Compile specs: the model's decode step (model/gpt.py with per-sequence positions): q a strided
# view of the fused QKV projection, (B, H, Tq, D), against the whole (B, H, 1024, D) cache, lengths
# checked by the cache (check_lengths=False), batch 1 and 8, at every GPT-2 width (the head count H
# is a kernel argument: 16 heads specialise differently from 12); Tq = 4 stands for a chunked or
# speculative step (the tl.dot path). tools/compile_check.py compiles what these launch.
# ----------------------------------------------------------------------------------------------
def _spec_call(B: int, H: int, D: int, Tq: int, dtype):
    def call():
        qkv = torch.empty(B, Tq, 3, H, D, dtype=dtype)  # (B, Tq, 3, H, D), as the model's projection
        q = qkv.permute(2, 0, 3, 1, 4)[0]  # (B, H, Tq, D)
        k_cache, v_cache = (torch.empty(B, H, GPT2_CONTEXT, D, dtype=dtype) for _ in range(2))
        seq_lens = torch.full((B,), GPT2_CONTEXT // 2, dtype=torch.int64)
        decode_attention(q, k_cache, v_cache, seq_lens, check_lengths=False)

    return call


COMPILE_SPECS = [
    CompileSpec(f"decode_attention.step.{DTYPE_NAMES[dt]}.{preset}.b{B}.tq{Tq}", _spec_call(B, H, C // H, Tq, dt),
                f"{preset} decode, batch {B}, {Tq} new token(s) against a {GPT2_CONTEXT}-key cache, {DTYPE_NAMES[dt]}")
    for dt in (torch.bfloat16, torch.float32, torch.float16)
    for preset, (C, H) in GPT2_PRESETS.items()
    for B in (1, 8)
    for Tq in (1, 4)
]

__all__ = ["decode_attention", "decode_attention_forward", "choose_splits", "COMPILE_SPECS"]
