"""layer_norm and add_layer_norm against the float64 book formula, by FlashAttention's rule: forward,
dX (and dResidual), dW and dB, every dtype, awkward widths and row counts, non-contiguous inputs, and
bad input."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from kernels._common import as_rows
from kernels.layer_norm import (
    COMPILE_SPECS,
    MAX_N,
    launch_config,
    layer_norm_backward,
    layer_norm_forward,
    add_layer_norm,
    layer_norm,
)
from accuracy import assert_close_to_reference, assert_compiles_like_eager, launch_configs, poison_, seeded  # noqa: F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _leaf(t):
    return t.detach().requires_grad_()  # keeps t's strides: a view stays a view


def _fwd_bwd(fn, x, w, b, dy):
    x, w, b = _leaf(x), _leaf(w), _leaf(b)
    y = fn(x, w, b)
    y.backward(dy)
    return y, x.grad, w.grad, b.grad


def _torch_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w.to(x.dtype), b.to(x.dtype))


def _check(x, w, b, dy=None):
    """Kernel vs float64 reference vs PyTorch in x's dtype, for y, dX, dW and dB."""
    if dy is None:
        dy = torch.randn(x.shape, dtype=x.dtype)
    got = _fwd_bwd(layer_norm, x, w, b, dy)
    exact = _fwd_bwd(reference.layer_norm, x.double(), w.double(), b.double(), dy.double())
    torch_ = list(_fwd_bwd(_torch_layer_norm, x, w, b, dy))
    if w.dtype != x.dtype:
        # Mixed precision (fp32 parameters, 16-bit activations): the baseline for the parameters'
        # gradients is PyTorch's fp32 computation, not one cast down to 16 bits.
        torch_[2:] = _fwd_bwd(_torch_layer_norm, x.float(), w, b, dy.float())[2:]
    for name, g, e, t in zip(("y", "dx", "dw", "db"), got, exact, torch_):
        assert_close_to_reference(f"layer_norm {name} {x.dtype}", g, e, t, atol=None)
    assert got[0].dtype == x.dtype and got[1].dtype == x.dtype
    assert got[2].dtype == w.dtype and got[3].dtype == b.dtype
    assert got[1].shape == x.shape


def _params(N, dtype, seed=0):
    g = seeded(seed)
    return (1 + 0.5 * torch.randn(N, generator=g)).to(dtype), (0.5 * torch.randn(N, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 100),  # one row, one group
        (7, 777),  # odd width; 7 rows in 4 groups of 2, 2, 2, 1
        (2, 5, 1600),  # 3-D, GPT-2 1558M's width
        (3, 4096),  # MAX_N: the widest row, 16 warps
    ],
)
def test_matches_reference(launch_configs, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    _check(x, *_params(shape[-1], dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_params_with_half_input(dtype):
    """The model's case: activations in fp16/bf16, weight and bias fp32 parameters (grads stay fp32)."""
    torch.manual_seed(1)
    _check(torch.randn(7, 777, dtype=dtype), *_params(777, torch.float32))


def test_large_mean_rows():
    """Rows far from 0 (mean 1000, spread 1): a one-pass E[x^2] - E[x]^2 variance would cancel away."""
    torch.manual_seed(2)
    _check(torch.randn(5, 300) + 1000, *_params(300, torch.float32))


def test_non_contiguous_inputs(launch_configs):
    torch.manual_seed(3)
    w, b = _params(100, torch.float32)
    _check(torch.randn(9, 1000)[:, 100:877], *_params(777, torch.float32))  # column slice: rows 1000 apart
    _check(torch.randn(14, 100)[::2], w, b)  # every other row: row stride 200, no copy
    _check(torch.randn(100, 13).t(), w, b)  # transposed: columns strided, copied once
    _check(torch.randn(5, 3, 100).transpose(0, 1), w, b)  # permuted 3-D: rows unevenly spaced
    _check(torch.randn(7, 100), torch.randn(200)[::2], torch.randn(300)[::3])  # strided weight and bias
    _check(torch.randn(6, 100), w, b, dy=torch.randn(100, 6).t())  # strided gradient


def test_broadcast_gradient():
    """y.sum().backward() hands backward an expanded gradient whose strides are all 0."""
    torch.manual_seed(4)
    x, (w, b) = torch.randn(3, 4, 50), _params(50, torch.float32)
    got = _fwd_bwd(lambda *a: layer_norm(*a).mul(torch.arange(50.0)).sum(), x, w, b, None)
    exact = _fwd_bwd(lambda *a: reference.layer_norm(*a).mul(torch.arange(50.0)).sum(),
                     x.double(), w.double(), b.double(), None)
    torch_ = _fwd_bwd(lambda *a: _torch_layer_norm(*a).mul(torch.arange(50.0)).sum(), x, w, b, None)
    for name, g, e, t in zip(("loss", "dx", "dw", "db"), got, exact, torch_):
        assert_close_to_reference(f"layer_norm {name}", g, e, t, atol=None)


def test_every_output_element_is_written(launch_configs):
    """Launchers into NaN-filled buffers: an element a program forgets shows up as NaN."""
    torch.manual_seed(5)
    M, N = 7, 777
    x, dy, (w, b) = torch.randn(M, N), torch.randn(M, N), _params(N, torch.float32)
    y, dx = poison_(torch.empty(M, N)), poison_(torch.empty(M, N))
    mean, rstd = poison_(torch.empty(M)), poison_(torch.empty(M))
    layer_norm_forward(as_rows(x, N), w, b, 1e-5, y, mean, rstd)
    dw, db = layer_norm_backward(as_rows(dy, N), as_rows(x, N), w, mean, rstd, dx, w.dtype, b.dtype)
    exact = _fwd_bwd(reference.layer_norm, x.double(), w.double(), b.double(), dy.double())
    torch_ = _fwd_bwd(_torch_layer_norm, x, w, b, dy)
    for name, g, e, t in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), exact, torch_):
        assert_close_to_reference(name, g, e, t, atol=None)
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(-1, unbiased=False) + 1e-5))


def test_no_rows():
    x = torch.randn(0, 64, requires_grad=True)
    w, b = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    y = layer_norm(x, w, b)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(64)) and torch.equal(b.grad, torch.zeros(64))


def n8(dtype=torch.float32):
    return torch.ones(8, dtype=dtype)


# Each case builds its tensors inside the test (a lambda), on the test's device: built at collection
# time they would be CPU tensors, and on a GPU the device check would fire before the check under test.
@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: (torch.randn(4, 8), torch.ones(9), n8()), {}, ValueError, r"weight has shape \(9,\), expected \(8,\)"),
        (lambda: (torch.randn(4, 8), n8(), torch.ones(1, 8)), {}, ValueError, r"bias has shape \(1, 8\), expected \(8,\)"),
        (lambda: (torch.randn(()), torch.ones(1), torch.ones(1)), {}, ValueError, "at least one dimension"),
        (lambda: (torch.randn(2, 0), torch.ones(0), torch.ones(0)), {}, ValueError, "1 to 4096 elements"),
        (lambda: (torch.empty(1, MAX_N + 1), torch.ones(MAX_N + 1), torch.ones(MAX_N + 1)), {}, ValueError, "1 to 4096"),
        (lambda: (torch.ones(4, 8, dtype=torch.int64), n8(), n8()), {}, TypeError, "x has dtype torch.int64"),
        (lambda: (torch.randn(4, 8), n8(torch.float64), n8()), {}, TypeError, "weight has dtype torch.float64"),
        (lambda: (torch.randn(4, 8, dtype=torch.bfloat16), n8(torch.half), n8()), {}, TypeError,
         "weight must be float32 or x's"),
        (lambda: (torch.randn(4, 8), n8(), torch.ones(8, device="meta")), {}, ValueError, "one device"),
        (lambda: (torch.randn(4, 8), n8(), n8()), {"eps": 0.0}, ValueError, "eps must be a positive number"),
        (lambda: (torch.randn(4, 8), n8(), None), {}, TypeError, "bias must be a tensor"),
    ],
)
def test_bad_input(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        layer_norm(*make(), **kwargs)


def test_compile_specs_cover_every_launch():
    """Every width the launchers accept picks a config that COMPILE_SPECS lists, for both kernels, with
    and without the residual, every dtype, and each signature names exactly the kernel's arguments."""
    for spec in COMPILE_SPECS:
        kernel = getattr(spec.kernel, "fn", spec.kernel)
        assert list(spec.signature) == list(inspect.signature(kernel).parameters), spec.name
    variants = {(s.name.split(".")[0], s.name.split(".")[1], s.signature["X"]) for s in COMPILE_SPECS}
    assert variants == {
        (op, pass_, ty) for op in ("layer_norm", "add_layer_norm") for pass_ in ("fwd", "bwd")
        for ty in ("*fp32", "*fp16", "*bf16")
    }
    assert len(variants) == len(COMPILE_SPECS)
    for N in [1, 15, 16, 17, 37, 100, 768, 777, 1024, 1025, 1600, 2049, MAX_N]:
        for spec in COMPILE_SPECS:
            has_residual = spec.name.startswith("add_layer_norm.")
            assert launch_config(N, has_residual) in spec.configs, (spec.name, N)


def test_torch_compile_traces_without_graph_breaks():
    g = seeded(5)
    x = torch.randn(3, 8, 37, generator=g).to(torch.bfloat16)[:, 1::2]  # strided rows, 3-D
    w, b = _params(37, torch.float32, seed=5)
    dy = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    assert_compiles_like_eager(layer_norm, (x, w, b), dy)


# ----------------------------------------------------------------------------------------------
# add_layer_norm: h = x + residual, y = layer_norm(h); gradients flow into both h and y.
# ----------------------------------------------------------------------------------------------
def _add_fwd_bwd(fn, x, r, w, b, dh, dy):
    """(h, y, dX, dResidual, dW, dB) of fn on fresh leaves; dh or dy None: that output is unused (a
    gradient that nothing reaches is None)."""
    leaves = [_leaf(t) for t in (x, r, w, b)]
    h, y = fn(*leaves)
    outs, grads = zip(*[(o, g) for o, g in ((h, dh), (y, dy)) if g is not None])
    return (h, y, *torch.autograd.grad(outs, leaves, grads, allow_unused=True))


def _torch_add_layer_norm(x, r, w, b):
    h = x + r
    return h, _torch_layer_norm(h, w, b)


def _check_add(x, r, w, b, dh="randn", dy="randn"):
    """add_layer_norm vs the float64 reference vs PyTorch's add then F.layer_norm in x's dtype, for h,
    y, dX, dResidual, dW and dB. dh / dy: a gradient, "randn" for a fresh one, None for no gradient."""
    dh = torch.randn(x.shape, dtype=x.dtype) if isinstance(dh, str) else dh
    dy = torch.randn(x.shape, dtype=x.dtype) if isinstance(dy, str) else dy
    got = _add_fwd_bwd(add_layer_norm, x, r, w, b, dh, dy)
    exact = _add_fwd_bwd(reference.add_layer_norm, *(t.double() for t in (x, r, w, b)),
                         *(None if g is None else g.double() for g in (dh, dy)))
    torch_ = list(_add_fwd_bwd(_torch_add_layer_norm, x, r, w, b, dh, dy))
    if w.dtype != x.dtype and dy is not None:
        # Mixed precision: the parameters' baseline is PyTorch's fp32 LayerNorm, as in _check, of h
        # as autocast has it: x + r added in x's dtype (rounded). The kernel's dW and dB see that
        # rounded h too: it is what the forward saves for the backward.
        def add_then_fp32_ln(x, r, w, b):
            h = x + r
            return h, _torch_layer_norm(h.float(), w, b)

        torch_[4:] = _add_fwd_bwd(add_then_fp32_ln, x, r, w, b, dh, None if dy is None else dy.float())[4:]
    for name, g, e, t in zip(("h", "y", "dx", "dresidual", "dw", "db"), got, exact, torch_):
        if e is None:
            assert g is None, f"add_layer_norm {name}: a gradient where PyTorch has none"
            continue
        assert_close_to_reference(f"add_layer_norm {name} {x.dtype}", g, e, t, atol=None)
    h, y, dx, dr, dw, db = got
    assert h.dtype == y.dtype == dx.dtype == dr.dtype == x.dtype
    assert h.shape == y.shape == dx.shape == dr.shape == x.shape
    assert h.is_contiguous() and y.is_contiguous()
    assert torch.equal(dx, dr)  # h = x + residual: one gradient for both
    if dw is not None:
        assert dw.dtype == w.dtype and db.dtype == b.dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, param_dtype",
    [
        ((13, 37), None),  # 13 rows (prime), width 37; weight and bias in x's dtype
        ((1, 7, 768), torch.float32),  # GPT-2 124M's width, 7 rows; fp32 parameters (the model's case)
    ],
)
def test_add_matches_reference(launch_configs, dtype, shape, param_dtype):
    torch.manual_seed(10)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    r = torch.randn(shape, dtype=dtype)
    _check_add(x, r, *_params(shape[-1], param_dtype or dtype, seed=10))


def test_add_non_contiguous_inputs(launch_configs):
    torch.manual_seed(11)
    w, b = _params(37, torch.float32, seed=11)
    x = torch.randn(9, 100)[:, 20:57]  # column slice: rows 100 apart
    r = torch.randn(37, 9).t()  # transposed: columns strided, copied once
    _check_add(x, r, w, b, dh=torch.randn(37, 9).t(), dy=torch.randn(18, 37)[::2])  # strided gradients
    x3 = torch.randn(5, 3, 37).transpose(0, 1)  # permuted 3-D: rows unevenly spaced
    _check_add(x3, torch.randn(3, 10, 37)[:, ::2], w, b)


def test_add_gradient_into_one_output():
    """Only y used (dh = None: the kernel reads no dh), or only h (the LayerNorm is no part of the
    loss: dX = dResidual = dh, and weight and bias get no gradient, as with PyTorch's add)."""
    torch.manual_seed(12)
    x, r, (w, b) = torch.randn(7, 37), torch.randn(7, 37), _params(37, torch.float32)
    _check_add(x, r, w, b, dh=None)
    _check_add(x, r, w, b, dy=None)


def test_add_every_output_element_is_written(launch_configs):
    """The launchers with a residual, into NaN-filled buffers."""
    torch.manual_seed(13)
    M, N = 7, 37
    x, r, dh, dy = (torch.randn(M, N) for _ in range(4))
    w, b = _params(N, torch.float32)
    h, y, dx = (poison_(torch.empty(M, N)) for _ in range(3))
    mean, rstd = poison_(torch.empty(M)), poison_(torch.empty(M))
    layer_norm_forward(x, w, b, 1e-5, y, mean, rstd, r, h)
    dw, db = layer_norm_backward(dy, h, w, mean, rstd, dx, w.dtype, b.dtype, dh)
    exact = _add_fwd_bwd(reference.add_layer_norm, *(t.double() for t in (x, r, w, b, dh, dy)))
    torch_ = _add_fwd_bwd(_torch_add_layer_norm, x, r, w, b, dh, dy)
    for name, g, e, t in zip(("h", "y", "dx", "dw", "db"), (h, y, dx, dw, db), exact[:3] + exact[4:],
                             torch_[:3] + torch_[4:]):
        assert_close_to_reference(name, g, e, t, atol=None)
    torch.testing.assert_close(mean, (x + r).mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt((x + r).var(-1, unbiased=False) + 1e-5))


def test_add_no_rows():
    x, r = torch.randn(0, 64, requires_grad=True), torch.randn(0, 64, requires_grad=True)
    w, b = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    h, y = add_layer_norm(x, r, w, b)
    assert h.shape == y.shape == (0, 64)
    (h.sum() + y.sum()).backward()
    assert x.grad.shape == r.grad.shape == (0, 64)
    assert torch.equal(w.grad, torch.zeros(64)) and torch.equal(b.grad, torch.zeros(64))


def x48():
    return torch.randn(4, 8)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (x48(), torch.randn(4, 9), n8(), n8()), ValueError,
         r"add_layer_norm: residual has shape \(4, 9\), expected x's"),
        (lambda: (x48(), torch.randn(8), n8(), n8()), ValueError, r"residual has shape \(8,\)"),  # no broadcasting
        (lambda: (x48(), x48().bfloat16(), n8(), n8()), TypeError,
         "residual has dtype torch.bfloat16, expected x's torch.float32"),
        (lambda: (x48(), torch.ones(4, 8, dtype=torch.int32), n8(), n8()), TypeError,
         "residual has dtype torch.int32; supported"),
        (lambda: (x48(), None, n8(), n8()), TypeError, "add_layer_norm: residual must be a tensor"),
        (lambda: (x48(), torch.randn(4, 8, device="meta"), n8(), n8()), ValueError,
         "add_layer_norm: all inputs must be on one device"),
        (lambda: (x48(), x48(), torch.ones(9), n8()), ValueError, r"add_layer_norm: weight has shape \(9,\)"),
        (lambda: (torch.randn(4, 8, dtype=torch.half),) * 2 + (n8(torch.bfloat16), n8()), TypeError,
         "weight must be float32 or x's"),
        (lambda: (torch.randn(2, MAX_N + 1),) * 2 + (torch.ones(MAX_N + 1),) * 2, ValueError, "1 to 4096 elements"),
    ],
)
def test_add_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        add_layer_norm(*make())
    with pytest.raises(ValueError, match="add_layer_norm: eps must be a positive number"):
        add_layer_norm(x48(), x48(), n8(), n8(), eps=-1.0)


def test_add_torch_compile_traces_without_graph_breaks():
    """Both outputs in one (stacked) result, so that gradients reach h and y; strided bf16 inputs."""
    g = seeded(14)
    x = torch.randn(3, 8, 37, generator=g).to(torch.bfloat16)[:, 1::2]  # strided rows, 3-D
    r = torch.randn(3, 37, 4, generator=g).to(torch.bfloat16).transpose(1, 2)  # strided columns
    w, b = _params(37, torch.float32, seed=14)
    dout = torch.randn((2, *x.shape), generator=g).to(torch.bfloat16)
    assert_compiles_like_eager(lambda *a: torch.stack(add_layer_norm(*a)), (x, r, w, b), dout)
