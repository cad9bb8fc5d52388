"""decode_attention (flash-decoding) against float64 book math, per sequence, by FlashAttention's rule.

Every case fills the cache past each sequence's length with NaN / inf garbage: one leaked element
would turn the output non-finite. Lengths include the extremes (seq_len == Tq: the query sees only
its own keys; seq_len == L_max: the full cache). Head dim 80 is not a power of 2 (masked to 128).
Inputs, bad ones too, are made inside each test on the test device (see test_flash_attention.py).
"""

import math

import pytest
import torch

from kernels.decode_attention import (
    MAX_SPLITS,
    MAX_TQ,
    PROGRAMS_PER_SM,
    choose_splits,
    decode_attention,
    decode_attention_forward,
)
from kernels.reference import attention
from accuracy import assert_close_to_reference, launch_configs, seeded  # noqa: F401  (a fixture)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _make(B, H, Tq, D, L_max, seq_lens, dtype, seed=0):
    g = seeded(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, H, L_max, D, generator=g).to(dtype)
    v = torch.randn(B, H, L_max, D, generator=g).to(dtype)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int64)
    _poison_past_lengths(k, v, seq_lens)
    return q, k, v, seq_lens


def _poison_past_lengths(k, v, seq_lens):
    """Garbage where the kernel must not look: NaN keys, +-inf values."""
    for b, n in enumerate(seq_lens.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("inf")
        v[b, :, n + 1 :: 2] = float("-inf")


def _check(name, out, q, k, v, seq_lens, sm_scale=None):
    """Each sequence on its own, with only its valid keys: float64 truth and PyTorch in q's dtype."""
    for b, n in enumerate(seq_lens.tolist()):
        qb, kb, vb = q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        exact = attention(qb.double(), kb.double(), vb.double(), sm_scale=sm_scale)
        torch_out = attention(qb, kb, vb, sm_scale=sm_scale)
        assert_close_to_reference(f"{name}[b={b}, len={n}]", out[b : b + 1], exact, torch_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Tq, D", [(1, 64), (3, 80)])
def test_matches_reference(dtype, Tq, D, launch_configs):
    L_max = 67  # prime: the last key block is partial
    q, k, v, seq_lens = _make(3, 2, Tq, D, L_max, [Tq, L_max, 29], dtype)
    out = decode_attention(q, k, v, seq_lens)
    assert out.dtype == dtype and out.shape == q.shape
    _check(f"decode {dtype} Tq={Tq} D={D}", out, q, k, v, seq_lens)


def test_unchecked_lengths_give_the_same_answer():
    """check_lengths=False (the KV cache validated them) skips only the host-side range check."""
    q, k, v, seq_lens = _make(2, 2, 1, 64, 40, [1, 33], torch.float32)
    torch.testing.assert_close(
        decode_attention(q, k, v, seq_lens, check_lengths=False), decode_attention(q, k, v, seq_lens), rtol=0, atol=0
    )


@pytest.mark.parametrize("Tq", [1, 3])
def test_split_counts_give_the_same_answer(Tq):
    """One split (nothing to combine), several (uneven: 3 blocks over 2), more splits than key blocks
    (some own no block at all), and splits past the short sequence's end."""
    L_max = 150
    q, k, v, seq_lens = _make(2, 1, Tq, 64, L_max, [L_max, 5], torch.float32, seed=1)  # BLOCK_N = 64: 3 blocks
    for num_splits in (1, 2, 5):
        out = decode_attention_forward(q, k, v, seq_lens, 1.0 / math.sqrt(64), num_splits=num_splits)
        _check(f"num_splits={num_splits}", out, q, k, v, seq_lens)


def test_batch_one_long_cache_uses_many_splits_and_int32_lengths():
    """Batch 1, one head: the heuristic splits the cache into every key block it has."""
    L_max = 300
    q, k, v, seq_lens = _make(1, 1, 1, 64, L_max, [263], torch.float16, seed=2)
    assert choose_splits(L_max, 1, 64, 132) == 5
    seq_lens = seq_lens.to(torch.int32)
    _check("batch 1", decode_attention(q, k, v, seq_lens), q, k, v, seq_lens)


def test_strided_views_and_custom_scale():
    """The cache as a slice of a bigger (L, B, H, D) buffer, q a transposed (B, Tq, H, D) projection."""
    B, H, Tq, D, L_max = 2, 3, 3, 64, 40
    g = seeded(3)
    buf = torch.randn(2, L_max + 5, B, H, D, generator=g).to(torch.bfloat16)
    k = buf[0, 2 : L_max + 2].permute(1, 2, 0, 3)  # (B, H, L_max, D), no stride is contiguous order
    v = buf[1, 2 : L_max + 2].permute(1, 2, 0, 3)
    q = torch.randn(B, Tq, H, D, generator=g).to(torch.bfloat16).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    seq_lens = torch.tensor([L_max, 17])
    _poison_past_lengths(k, v, seq_lens)
    out = decode_attention(q, k, v, seq_lens, sm_scale=0.3)
    _check("strided", out, q, k, v, seq_lens, sm_scale=0.3)


def testchoose_splits():
    for L_max in (1, 63, 64, 65, 1024, 4099, 32768):
        for BH in (1, 12, 48, 300, 5000):
            for block_n in (32, 64):
                n = choose_splits(L_max, BH, block_n, 132)
                n_blocks = -(-L_max // block_n)
                assert 1 <= n <= min(MAX_SPLITS, n_blocks)  # no split is empty
                # the GPU is filled unless the keys (or the cap) run out first
                assert BH * n >= PROGRAMS_PER_SM * 132 or n in (n_blocks, MAX_SPLITS)
    assert choose_splits(1024, 12, 64, 132) == 16  # gpt2-124M, batch 1: 12 * 16 programs


def test_refuses_inputs_that_require_grad():
    q, k, v, seq_lens = _make(1, 1, 1, 64, 8, [4], torch.float32)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        decode_attention(q, k, v, seq_lens)
    with torch.no_grad():
        out = decode_attention(q, k, v, seq_lens)
    _check("no_grad", out, q.detach(), k, v, seq_lens)


def test_bad_inputs():
    q, k, v, seq_lens = _make(2, 2, 3, 64, 16, [3, 16], torch.float32)
    cases = [
        ((q, k, v, torch.tensor([3, 17])), ValueError, "out of range"),  # longer than the cache
        ((q, k, v, torch.tensor([2, 16])), ValueError, "out of range"),  # fewer keys than queries
        ((q, k, v, torch.tensor([3])), ValueError, "entries"),
        ((q, k, v, torch.tensor([3.0, 16.0])), TypeError, "seq_lens"),
        ((q.half(), k, v, seq_lens), TypeError, "dtype"),
        ((q.int(), k.int(), v.int(), seq_lens), TypeError, "dtype"),
        ((q, k, v[..., :32], seq_lens), ValueError, "differ in shape"),
        ((q[..., :32], k, v, seq_lens), ValueError, "must match"),
        ((q[:, :1], k, v, seq_lens), ValueError, "must match"),
        ((q[0], k, v, seq_lens), ValueError, "4-D"),
        ((q, k, v, seq_lens[None]), ValueError, "1-D"),
        ((torch.zeros(2, 2, MAX_TQ + 1, 64), k, v, seq_lens), ValueError, "Tq"),
        ((torch.zeros(1, 1, 1, 256), torch.zeros(1, 1, 4, 256), torch.zeros(1, 1, 4, 256), torch.tensor([1])),
         ValueError, "head dim"),
        ((q, k, v, [3, 16]), TypeError, "torch.Tensor"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            decode_attention(*args)
    with pytest.raises(ValueError, match="device"):
        decode_attention(q, k, v, seq_lens.to("meta"))
    with pytest.raises(ValueError, match="finite"):
        decode_attention(q, k, v, seq_lens, sm_scale=float("nan"))
