"""Softmax cross-entropy over GPT-2's vocabulary (V = 50,257) for N = 2k ... 16k rows, bf16 logits.

Implementations: our Triton kernel (an online softmax, the gradient written in the same pass),
`F.cross_entropy` (the baseline), the book's log-softmax + gather in eager PyTorch (it writes the
full (N, V) log-probabilities), and `torch.compile` of the book's version.
Metric: GB/s of the fewest bytes that must move. Forward: read the logits once (plus the targets).
Forward + backward: read the logits once and write their gradient once (2 N V): a kernel that
re-reads the logits in the backward pays for it here.
"""

import pytest
import torch
import torch.nn.functional as F

from bench_util import Compiled, kernel_bench, triton_kernel
from kernels import reference

pytestmark = pytest.mark.gpu

V = 50257
ROWS = [2048, 4096, 8192, 16384]

IMPLS = {
    "triton": triton_kernel("cross_entropy"),
    "F.cross_entropy": F.cross_entropy,
    "eager": reference.cross_entropy,
    "compile": Compiled(reference.cross_entropy),
}


def cross_entropy_bytes(N: int, V: int, elem: int, pass_: str) -> int:
    fwd = N * V * elem + N * 8  # logits, int64 targets
    return {"fwd": fwd, "fwd+bwd": fwd + N * V * elem}[pass_]


@pytest.mark.parametrize("N", ROWS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_cross_entropy(benchmark, cuda, timings, impl, pass_, N):
    logits = torch.randn(N, V, device=cuda, dtype=torch.bfloat16)
    target = torch.randint(0, V, (N,), device=cuda)
    kernel_bench(
        benchmark, timings, kernel="cross_entropy", pass_=pass_, impls=IMPLS, impl=impl,
        baselines=("F.cross_entropy", "eager"), inputs=(logits, target), grad_argnums=(0,),
        x_label="N", size=N, metric="GB/s", amount=cross_entropy_bytes(N, V, logits.element_size(), pass_),
        info={"shape": f"N={N} V={V}"},
    )
