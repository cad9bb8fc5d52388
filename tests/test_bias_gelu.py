"""bias_gelu against the float64 book formula, by FlashAttention's rule: forward, dX and dBias, every
dtype, awkward widths and row counts, non-contiguous inputs, large magnitudes, and bad input."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from kernels._common import as_rows
from kernels.bias_gelu import COMPILE_SPECS, bias_gelu, bias_gelu_backward, bias_gelu_forward, launch_config
from accuracy import assert_close_to_reference, assert_compiles_like_eager, launch_configs, poison_, seeded  # noqa: F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _leaf(t):
    return t.detach().requires_grad_()  # keeps t's strides: a view stays a view


def _fwd_bwd(fn, x, bias, dy):
    x, bias = _leaf(x), _leaf(bias)
    y = fn(x, bias)
    y.backward(dy)
    return y, x.grad, bias.grad


def _check(x, bias, dy=None):
    """Kernel vs float64 reference vs PyTorch in x's dtype, for y, dX and dBias."""
    if dy is None:
        dy = torch.randn(x.shape, dtype=x.dtype)
    got = _fwd_bwd(bias_gelu, x, bias, dy)
    exact = _fwd_bwd(reference.bias_gelu, x.double(), bias.double(), dy.double())
    gelu = lambda a, b: F.gelu(a + b, approximate="tanh")  # noqa: E731
    torch_ = list(_fwd_bwd(gelu, x, bias.to(x.dtype), dy))
    if bias.dtype != x.dtype:
        # Mixed precision (an fp32 bias, 16-bit activations): PyTorch computes the fp32 parameter's
        # gradient in fp32 (x + bias promotes), so that is the baseline for dbias, not a 16-bit one.
        torch_[2] = _fwd_bwd(gelu, x.float(), bias, dy.float())[2]
    for name, g, e, t in zip(("y", "dx", "dbias"), got, exact, torch_):
        assert_close_to_reference(f"bias_gelu {name} {x.dtype}", g, e, t, atol=None)
    assert got[0].dtype == x.dtype and got[1].dtype == x.dtype and got[2].dtype == bias.dtype
    assert got[1].shape == x.shape and got[2].shape == bias.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1),  # one element: a 16-wide block, 15 lanes masked
        (7, 777),  # odd width over 4 column blocks, a partial row tile
        (300, 100),  # 19 row tiles of 16 in 4 groups of 5, 5, 5, 4: the partial-sum reduction
        (2, 5, 3072),  # 3-D, GPT-2 124M's MLP width
    ],
)
def test_matches_reference(launch_configs, dtype, shape):
    torch.manual_seed(0)
    _check(torch.randn(shape, dtype=dtype) * 2, torch.randn(shape[-1], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_bias_with_half_input(dtype):
    """The model's case: activations in fp16/bf16, the bias an fp32 parameter (grad stays fp32)."""
    torch.manual_seed(1)
    _check(torch.randn(7, 777, dtype=dtype) * 2, torch.randn(777))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_magnitude(dtype):
    """|x| ~ 20: u = k0 (z + k1 z^3) reaches ~300, where exp(2u) overflows a naive tanh."""
    torch.manual_seed(2)
    _check(torch.randn(13, 200, dtype=dtype) * 20, torch.randn(200, dtype=dtype) * 5)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # NumPy, in the interpreter, on z^3: intended
def test_extreme_values_are_exact():
    """Far from 0 GELU is the identity (z > 0) or 0 (z < 0), and so is its slope. |z| = 1e20 overflows
    z^2 and z^3 in fp32 (PyTorch's own backward returns NaN there); the kernel must not."""
    z = torch.tensor([[30.0, -30.0, 1e4, -1e4, 1e13, -1e13, 1e20, -1e20, 3e38, -3e38]])
    bias = torch.zeros(z.shape[1])
    dy = torch.arange(1.0, z.shape[1] + 1).view(1, -1)
    y, dx, dbias = _fwd_bwd(bias_gelu, z, bias, dy)
    pos = z > 0
    assert torch.equal(y, torch.where(pos, z, torch.zeros_like(z)))
    assert torch.equal(dx, torch.where(pos, dy, torch.zeros_like(dy)))
    assert torch.equal(dbias, dx[0])


def test_non_contiguous_inputs(launch_configs):
    torch.manual_seed(3)
    wide = torch.randn(9, 1000)
    _check(wide[:, 100:877], torch.randn(777))  # column slice: rows 1000 apart, no copy
    _check(torch.randn(100, 13).t(), torch.randn(100))  # transposed: columns strided, copied once
    _check(torch.randn(5, 3, 100).transpose(0, 1), torch.randn(100))  # permuted 3-D: rows uneven
    _check(torch.randn(7, 100), torch.randn(200)[::2])  # strided bias
    _check(torch.randn(6, 100), torch.randn(100), dy=torch.randn(100, 6).t())  # strided gradient


def test_broadcast_gradient():
    """y.sum().backward() hands backward an expanded gradient whose strides are all 0."""
    torch.manual_seed(4)
    x, bias = torch.randn(3, 4, 50), torch.randn(50)
    got = _fwd_bwd(lambda a, b: bias_gelu(a, b).sum(), x, bias, None)
    exact = _fwd_bwd(lambda a, b: reference.bias_gelu(a, b).sum(), x.double(), bias.double(), None)
    torch_ = _fwd_bwd(lambda a, b: F.gelu(a + b, approximate="tanh").sum(), x, bias, None)
    for name, g, e, t in zip(("loss", "dx", "dbias"), got, exact, torch_):
        assert_close_to_reference(f"bias_gelu {name}", g, e, t, atol=None)


def test_every_output_element_is_written(launch_configs):
    """Launchers into NaN-filled buffers: an element a program forgets shows up as NaN."""
    torch.manual_seed(5)
    x, bias, dy = torch.randn(300, 100), torch.randn(100), torch.randn(300, 100)
    y, dx = poison_(torch.empty(300, 100)), poison_(torch.empty(300, 100))
    bias_gelu_forward(as_rows(x, 100), bias, y)
    dbias = bias_gelu_backward(as_rows(dy, 100), as_rows(x, 100), bias, dx)
    _, exact_dx, exact_db = _fwd_bwd(reference.bias_gelu, x.double(), bias.double(), dy.double())
    torch_ = _fwd_bwd(lambda a, b: F.gelu(a + b, approximate="tanh"), x, bias, dy)
    assert_close_to_reference("y", y, reference.bias_gelu(x.double(), bias.double()), torch_[0], atol=None)
    assert_close_to_reference("dx", dx, exact_dx, torch_[1], atol=None)
    assert_close_to_reference("dbias", dbias, exact_db, torch_[2], atol=None)


def test_no_rows():
    x, bias = torch.randn(0, 64, requires_grad=True), torch.randn(64, requires_grad=True)
    y = bias_gelu(x, bias)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert torch.equal(bias.grad, torch.zeros(64))


# Each case builds its tensors inside the test (a lambda), on the test's device: built at collection
# time they would be CPU tensors, and on a GPU the device check would fire before the check under test.
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(9)), ValueError, r"bias has shape \(9,\), expected \(8,\)"),
        (lambda: (torch.randn(4, 8), torch.randn(1, 8)), ValueError, "bias must be 1-D"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8)), ValueError, "bias must be 1-D"),
        (lambda: (torch.randn(()), torch.randn(1)), ValueError, "at least one dimension"),
        (lambda: (torch.randn(4, 0), torch.randn(0)), ValueError, "empty last dimension"),
        (lambda: (torch.ones(4, 8, dtype=torch.int32), torch.randn(8)), TypeError, "x has dtype torch.int32"),
        (lambda: (torch.randn(4, 8), torch.randn(8, dtype=torch.float64)), TypeError, "bias has dtype torch.float64"),
        (lambda: (torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.float16)), TypeError,
         "float32 or x's"),
        (lambda: (torch.randn(4, 8), torch.randn(8, device="meta")), ValueError, "one device"),
        (lambda: (torch.randn(4, 8), [0.0] * 8), TypeError, "must be tensors"),
    ],
)
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        bias_gelu(*make())


def test_compile_specs_cover_every_launch():
    """Every width picks a config that COMPILE_SPECS lists, for both kernels and every dtype, and each
    signature names exactly the kernel's arguments."""
    for spec in COMPILE_SPECS:
        kernel = getattr(spec.kernel, "fn", spec.kernel)
        assert list(spec.signature) == list(inspect.signature(kernel).parameters), spec.name
    elementwise = [spec for spec in COMPILE_SPECS if spec.name.startswith("bias_gelu.")]
    assert {spec.signature["X"] for spec in elementwise} == {"*fp32", "*fp16", "*bf16"}
    for N in [1, 15, 16, 17, 100, 256, 257, 777, 3072, 50257]:
        for spec in elementwise:
            assert launch_config(N) in spec.configs, (spec.name, N)


def test_torch_compile_traces_without_graph_breaks():
    g = seeded(5)
    x = torch.randn(3, 8, 37, generator=g).to(torch.bfloat16)[:, 1::2]  # strided rows, 3-D
    bias = torch.randn(37, generator=g)  # fp32 bias with bf16 x, as in the model
    dy = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    assert_compiles_like_eager(bias_gelu, (x, bias), dy)
