"""LayerNorm, and the residual add fused into it, over GPT-2's widths (768: 124M ... 1600: 1558M),
8192 rows (B*T), bf16.

LayerNorm implementations: our Triton kernel, `F.layer_norm` (the baseline), the book's math in eager PyTorch
(mean, var, normalize, scale, shift: one kernel each), and `torch.compile` of the book's math.
Metric: GB/s of the fewest bytes that must move. Forward: read x, write y (2 N C elements, plus
the weight and bias). Forward + backward: that, then read x and dy, write dx (3 N C more; the
per-row mean and rstd are 2 N floats, negligible, and may be recomputed), and the parameters and
their gradients (6 C).

add_layer_norm (h = x + r, y = LayerNorm(h)): our Triton kernel against eager PyTorch, `x + r` then
`F.layer_norm` (the baseline), and `torch.compile` of the same. Gradients reach both outputs, as in
a block (h also feeds the MLP's residual). Forward: read x and r, write h and y (4 N C, plus the
weight and bias). Forward + backward: that, then read h, dy and dh, write dh + LayerNorm's dX once,
which is the gradient of x and r alike (4 N C more), and the parameters and their gradients.
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


# ----------------------------------------------------------------------------------------------
# add_layer_norm
# ----------------------------------------------------------------------------------------------
class _GradToH(torch.autograd.Function):
    """y unchanged; in the backward, y's gradient passes through and dh (an input, not differentiated)
    goes to h. kernel_bench differentiates one output: this gives h, the residual stream, its own
    gradient as a block's later use of it would, without an op that moves any bytes."""

    @staticmethod
    def forward(ctx, h, y, dh):
        ctx.dh = dh
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return ctx.dh, dy, None


_add_ln = triton_kernel("add_layer_norm", module="layer_norm")


def _with_grad_to_h(fn):
    return lambda x, r, w, b, dh: _GradToH.apply(*fn(x, r, w, b), dh)


def _add_then_layer_norm(x, r, w, b):
    h = x + r
    return h, F.layer_norm(h, (h.shape[-1],), w, b, EPS)


class _CompiledWithGradToH(Compiled):
    """torch.compile of the add and F.layer_norm alone; the gradient plumbing stays outside the graph."""

    def __call__(self, x, r, w, b, dh):
        return _GradToH.apply(*super().__call__(x, r, w, b), dh)


ADD_IMPLS = {
    "triton": _with_grad_to_h(lambda x, r, w, b: _add_ln(x, r, w, b, EPS)),
    "eager": _with_grad_to_h(_add_then_layer_norm),
    "compile": _CompiledWithGradToH(_add_then_layer_norm),
}


def add_layer_norm_bytes(N: int, C: int, elem: int, pass_: str) -> int:
    fwd = (4 * N * C + 2 * C) * elem
    return {"fwd": fwd, "fwd+bwd": fwd + (4 * N * C + 4 * C) * elem}[pass_]


@pytest.mark.parametrize("C", WIDTHS, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(ADD_IMPLS))
def test_add_layer_norm(benchmark, cuda, timings, impl, pass_, C):
    dtype = torch.bfloat16
    x, r, dh = (torch.randn(ROWS, C, device=cuda, dtype=dtype) for _ in range(3))
    w = 1 + 0.1 * torch.randn(C, device=cuda, dtype=dtype)
    b = 0.1 * torch.randn(C, device=cuda, dtype=dtype)
    kernel_bench(
        benchmark, timings, kernel="add_layer_norm", pass_=pass_, impls=ADD_IMPLS, impl=impl,
        baselines=("eager", "compile"), inputs=(x, r, w, b, dh), grad_argnums=(0, 1, 2, 3),
        x_label="C", size=C, metric="GB/s", amount=add_layer_norm_bytes(ROWS, C, x.element_size(), pass_),
        info={"shape": f"N={ROWS} C={C}"},
    )
