"""Causal attention at GPT-2's shape (12 heads of 64), 16k tokens per batch, T from 512 to 8192.

Implementations: our Triton flash-attention kernel, PyTorch's `scaled_dot_product_attention`
(FlashAttention-2 on CUDA: the best built-in and the baseline), the book's math in eager PyTorch
(it materializes the (T, T) scores), and `torch.compile` of the book's math.
Metric: TFLOP/s of the causal math (forward 2*B*H*T^2*D, backward 2.5x that).
"""

import pytest
import torch
import torch.nn.functional as F

from bench_util import Compiled, attention_flops, kernel_bench, triton_kernel
from kernels import reference

pytestmark = pytest.mark.gpu

TOKENS = 16 * 1024  # B * T, fixed: longer sequences mean fewer of them
SEQ_LENS = [512, 1024, 2048, 4096, 8192]
H, D = 12, 64


def _book(q, k, v):
    return reference.attention(q, k, v, causal=True)


_flash = triton_kernel("flash_attention")

IMPLS = {
    "triton": lambda q, k, v: _flash(q, k, v, causal=True),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "eager": _book,
    "compile": Compiled(_book),
}


@pytest.mark.parametrize("T", SEQ_LENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention(benchmark, cuda, timings, impl, pass_, T):
    B = TOKENS // T
    q, k, v = (torch.randn(B, H, T, D, device=cuda, dtype=torch.bfloat16) for _ in range(3))
    kernel_bench(
        benchmark, timings, kernel="attention", pass_=pass_, impls=IMPLS, impl=impl,
        baselines=("sdpa", "eager"), inputs=(q, k, v), grad_argnums=(0, 1, 2),
        x_label="T", size=T, metric="TFLOP/s", amount=attention_flops(B, H, T, T, D, True, pass_),
        info={"shape": f"B={B} H={H} T={T} D={D} causal"},
    )
