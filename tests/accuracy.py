"""Checking a kernel the way FlashAttention does: against float64, relative to PyTorch's own error.

A kernel in bf16 cannot be compared with an absolute tolerance that is right for every shape: bf16
has 8 bits of mantissa, and how far any bf16 computation lands from the exact answer depends on the
shape and the values. So we compute the exact answer (float64 reference), measure how far PyTorch
lands from it computing the same thing in the same dtype, and require the kernel to land no more
than `factor` times as far (plus a small `atol` for results that are exact in both).
"""

from __future__ import annotations

import pytest
import torch

# Where the kernel tests run: natively on a GPU when there is one, else on the CPU through Triton's
# interpreter. tests/conftest.py makes it the default device of the kernel tests, so that the same
# test code runs both ways; a random generator must live on it too (`seeded`).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seeded(seed: int) -> torch.Generator:
    """A generator on DEVICE: `torch.randn(..., generator=seeded(0))` works under either default device."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def max_abs_err(x: torch.Tensor, exact: torch.Tensor) -> float:
    return (x.double() - exact.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_reference(
    name: str,
    kernel_out: torch.Tensor,
    exact: torch.Tensor,
    torch_out: torch.Tensor,
    factor: float = 2.0,
    atol: float | None = 1e-5,
) -> None:
    """kernel error <= factor * (PyTorch error) + atol, both against `exact`.

    atol is there for results that PyTorch gets exactly (its error 0). atol=None scales it to the
    answer: one fp32 unit in the last place at the reference's largest magnitude, eps_fp32 *
    max|exact|. The fixed default, 1e-5, dominates in fp32: at V = 50,257 a typical cross-entropy
    gradient entry is 2e-5, so most entries go unchecked, where the scaled atol holds an fp32 kernel
    to about factor x PyTorch's own fp32 error (in 16 bits PyTorch's error, half a unit of 2^-8 or
    2^-11, is far above either). The row-wise kernels' tests pass atol=None; the attention tests do
    not yet: under it some of their fp32 cases exceed 2x PyTorch's error (dV by 1.2x, a dQ that
    should be exactly 0 comes out 1.7e-7, one decode split), which the fixed 1e-5 absorbs.

    Also fails on NaN/Inf in the kernel output where the exact answer is finite (a poisoned output
    that was never written shows up here).
    """
    assert kernel_out.shape == exact.shape, f"{name}: shape {tuple(kernel_out.shape)} != {tuple(exact.shape)}"
    finite = torch.isfinite(exact)
    bad = finite & ~torch.isfinite(kernel_out)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the reference is finite"
    if atol is None:
        scale = exact[finite].abs().max().item() if finite.any() else 0.0
        atol = torch.finfo(torch.float32).eps * scale
    err = max_abs_err(kernel_out, exact)
    base = max_abs_err(torch_out, exact)
    assert err <= factor * base + atol, (
        f"{name}: kernel max error {err:.3e} > {factor} x PyTorch's {base:.3e} + {atol:.1e}"
    )


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel forgets to write is caught."""
    return t.fill_(float("nan"))


def forward_backward(fn, inputs, grad_out):
    """(output, *input grads) of fn on fresh leaves that keep the inputs' dtypes and strides."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


def assert_compiles_like_eager(fn, inputs, grad_out) -> None:
    """`torch.compile(fn, fullgraph=True)` traces with no graph break (a custom op keeps each Triton
    launch opaque) and, running the same kernels, gives bit-identical outputs and gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for got, want in zip(forward_backward(compiled, inputs, grad_out), forward_backward(fn, inputs, grad_out)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(params=["gpu_configs", "interpreter_configs"])
def launch_configs(request, monkeypatch):
    """Run a test under both launch configurations the launchers can pick off-GPU: the interpreter's
    (few, large programs) and the GPU's (what runs compiled). On a GPU both are the GPU's. Import it
    into a test module (`from accuracy import launch_configs`) and name it in a test's arguments."""
    if request.param == "gpu_configs":
        import kernels._common

        monkeypatch.setattr(kernels._common, "INTERPRETER_CONFIGS", False)
    return request.param
