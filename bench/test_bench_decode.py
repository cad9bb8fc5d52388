"""Decoding attention: one new query token per sequence against a KV cache of L keys (flash-decoding).

GPT-2's heads (12 of 64), a batch of 16 sequences, L from 512 to 8192 keys, bf16, forward only
(generation needs no gradients). A decode step does almost no math per byte: it is a read of the
cache, so the metric is GB/s of the fewest bytes that must move: the k and v caches up to each
sequence's length, plus q and the output.

Implementations: our Triton flash-decoding kernel (the cache split across programs), SDPA on the
live part of the cache (the baseline: the best built-in when every sequence has the same length),
the model's PyTorch path `TorchOps.decode_attention` (SDPA with a per-sequence length mask), the
book's math in eager PyTorch, and `torch.compile` of the book's math.
"""

import pytest
import torch
import torch.nn.functional as F

from bench_util import Compiled, kernel_bench, triton_kernel
from kernels import reference
from model.ops import TorchOps

pytestmark = pytest.mark.gpu

B, H, D = 16, 12, 64
CACHE_LENS = [512, 1024, 2048, 4096, 8192]


def _book(q, k, v, seq_lens):
    return reference.attention(q, k, v, causal=True, seq_lens=seq_lens)


_decode = triton_kernel("decode_attention")

IMPLS = {
    # As the model calls it (FusedOps.decode_attention): the KV cache validated the lengths once per
    # step, so no host-synchronising range check sits inside the timed call.
    "triton": lambda q, k, v, seq_lens: _decode(q, k, v, seq_lens, check_lengths=False),
    "sdpa": lambda q, k, v, seq_lens: F.scaled_dot_product_attention(q, k, v),
    "torch_ops": TorchOps().decode_attention,
    "eager": _book,
    "compile": Compiled(_book),
}


def decode_bytes(seq_lens: torch.Tensor, H: int, D: int, elem: int) -> int:
    cache = 2 * H * D * int(seq_lens.sum()) * elem  # k and v, each sequence up to its own length
    return cache + 2 * len(seq_lens) * H * D * elem + len(seq_lens) * 8  # q, out, the lengths


@pytest.mark.parametrize("L", CACHE_LENS, ids=lambda n: f"L{n}")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_decode_attention(benchmark, cuda, timings, impl, L):
    q = torch.randn(B, H, 1, D, device=cuda, dtype=torch.bfloat16)  # (B, H, 1, D): one new token each
    k, v = (torch.randn(B, H, L, D, device=cuda, dtype=torch.bfloat16) for _ in range(2))  # (B, H, L, D)
    seq_lens = torch.full((B,), L, device=cuda, dtype=torch.long)  # every cache full (what SDPA assumes)
    kernel_bench(
        benchmark, timings, kernel="decode_attention", pass_="fwd", impls=IMPLS, impl=impl,
        baselines=("sdpa", "eager"), inputs=(q, k, v, seq_lens), grad_argnums=(),
        x_label="L", size=L, metric="GB/s", amount=decode_bytes(seq_lens, H, D, q.element_size()),
        info={"shape": f"B={B} H={H} L={L} D={D}"},
    )
