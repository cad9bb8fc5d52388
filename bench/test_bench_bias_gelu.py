"""bias + GELU (tanh form) on the MLP's hidden layer: 4x GPT-2's widths (3072 ... 6400), 8192 rows, bf16.

Implementations: our Triton kernel (one read of x, one write), PyTorch's `F.gelu(x + bias,
approximate="tanh")` (the baseline: two kernels, x + bias is written out and read back), the book's
GELU formula in eager PyTorch (a kernel per operation), and `torch.compile` of the book's formula.
Metric: GB/s of the fewest bytes that must move. Forward: read x, write y (2 N C, plus the bias).
Forward + backward: that, then read x (GELU' needs it) and dy, write dx (3 N C more), plus the
bias and its gradient.
"""

import pytest
import torch
import torch.nn.functional as F

from bench_util import Compiled, kernel_bench, triton_kernel
from kernels import reference

pytestmark = pytest.mark.gpu

ROWS = 8192
WIDTHS = [3072, 4096, 5120, 6400]

IMPLS = {
    "triton": triton_kernel("bias_gelu"),
    "F.gelu": lambda x, b: F.gelu(x + b, approximate="tanh"),
    "eager": reference.bias_gelu,
    "compile": Compiled(reference.bias_gelu),
}


def bias_gelu_bytes(N: int, C: int, elem: int, pass_: str) -> int:
    fwd = (2 * N * C + C) * elem
    return {"fwd": fwd, "fwd+bwd": fwd + (3 * N * C + 2 * C) * elem}[pass_]


@pytest.mark.parametrize("C", WIDTHS, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bias_gelu(benchmark, cuda, timings, impl, pass_, C):
    x = torch.randn(ROWS, C, device=cuda, dtype=torch.bfloat16)
    bias = 0.1 * torch.randn(C, device=cuda, dtype=torch.bfloat16)
    kernel_bench(
        benchmark, timings, kernel="bias_gelu", pass_=pass_, impls=IMPLS, impl=impl,
        baselines=("F.gelu", "eager"), inputs=(x, bias), grad_argnums=(0, 1),
        x_label="C", size=C, metric="GB/s", amount=bias_gelu_bytes(ROWS, C, x.element_size(), pass_),
        info={"shape": f"N={ROWS} C={C}"},
    )
