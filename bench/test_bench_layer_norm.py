"""LayerNorm over GPT-2's widths (768: 124M ... 1600: 1558M), 8192 rows (B*T), bf16.

Implementations: our Triton kernel, `F.layer_norm` (the baseline), the book's math in eager PyTorch
(mean, var, normalize, scale, shift: one kernel each), and `torch.compile` of the book's math.
Metric: GB/s of the fewest bytes that must move. Forward: read x, write y (2 N C elements, plus
the weight and bias). Forward + backward: that, then read x and dy, write dx (3 N C more; the
per-row mean and rstd are 2 N floats, negligible, and may be recomputed), and the parameters and
their gradients (6 C).
"""

import pytest
import torch
import torch.nn.functional as F

from bench_util import Compiled, kernel_bench, triton_kernel
from kernels import reference

pytestmark = pytest.mark.gpu

ROWS = 8192
WIDTHS = [768, 1024, 1280, 1600]
EPS = 1e-5

_ln = triton_kernel("layer_norm")

IMPLS = {
    "triton": lambda x, w, b: _ln(x, w, b, EPS),
    "F.layer_norm": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS),
    "eager": lambda x, w, b: reference.layer_norm(x, w, b, EPS),
    "compile": Compiled(lambda x, w, b: reference.layer_norm(x, w, b, EPS)),
}


def layer_norm_bytes(N: int, C: int, elem: int, pass_: str) -> int:
    fwd = (2 * N * C + 2 * C) * elem
    return {"fwd": fwd, "fwd+bwd": fwd + (3 * N * C + 4 * C) * elem}[pass_]


@pytest.mark.parametrize("C", WIDTHS, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_layer_norm(benchmark, cuda, timings, impl, pass_, C):
    dtype = torch.bfloat16
    x = torch.randn(ROWS, C, device=cuda, dtype=dtype)
    w = 1 + 0.1 * torch.randn(C, device=cuda, dtype=dtype)
    b = 0.1 * torch.randn(C, device=cuda, dtype=dtype)
    kernel_bench(
        benchmark, timings, kernel="layer_norm", pass_=pass_, impls=IMPLS, impl=impl,
        baselines=("F.layer_norm", "eager"), inputs=(x, w, b), grad_argnums=(0, 1, 2),
        x_label="C", size=C, metric="GB/s", amount=layer_norm_bytes(ROWS, C, x.element_size(), pass_),
        info={"shape": f"N={ROWS} C={C}"},
    )
