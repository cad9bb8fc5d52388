"""What every kernel file shares: where kernels run, input checks, launch configs, compile specs.

Import this module before any `@triton.jit` kernel is defined. Triton decides at *decoration* time
whether a kernel is compiled for a GPU or run by its interpreter (`TRITON_INTERPRET=1`), so on a
machine without CUDA we switch the interpreter on here, once, before any kernel module is loaded.
The interpreter executes each program instance with NumPy: slow, but bit-for-bit the same kernel
code, which is how CI checks the kernels on a CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (must come after the environment switch above)
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Dtypes every kernel accepts. Loads are cast to fp32 before arithmetic (the interpreter cannot do
# bf16 math, and fp32 accumulation is what makes the results accurate); stores cast back.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Input checks: a clear error instead of a silent wrong answer or an illegal memory access.
# ----------------------------------------------------------------------------------------------
def check_device(*tensors: torch.Tensor, op: str) -> torch.device:
    """All tensors on one device, and a device the kernels can run on. Returns that device."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op}: all inputs must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return device
    if device.type == "cpu" and INTERPRET:
        return device
    if device.type == "cpu":
        raise ValueError(
            f"{op}: Triton kernels need CUDA tensors; got a CPU tensor. On a machine without a GPU, "
            "set TRITON_INTERPRET=1 before importing `kernels` to run them in Triton's interpreter."
        )
    raise ValueError(f"{op}: unsupported device {device}; Triton kernels run on CUDA (or the interpreter on CPU)")


def check_dtype(t: torch.Tensor, name: str, op: str, dtypes=FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: {allowed}")


def check_ndim(t: torch.Tensor, name: str, op: str, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def device_guard(device: torch.device):
    """Launch on the tensors' own GPU, not on whatever `torch.cuda.current_device()` happens to be."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------------------------
# Launch configurations: autotuned on a GPU, one fixed configuration in the interpreter.
# ----------------------------------------------------------------------------------------------
def autotune(configs: list, key: list[str], **kwargs):
    """`triton.autotune` on a GPU; on the interpreter only the first config (autotuning several
    configs needs a driver, and timing the interpreter would mean nothing anyway)."""
    return triton.autotune(configs=configs if not INTERPRET else configs[:1], key=key, **kwargs)


# ----------------------------------------------------------------------------------------------
# Compile specs: every kernel file lists, for each of its kernels, the argument types and every
# block configuration its launcher can pick, so that `kernels.compile_check` can compile all of
# them for sm_80 and sm_90 on a machine without a GPU and report registers, spills and shared memory.
# ----------------------------------------------------------------------------------------------
@dataclass
class CompileSpec:
    name: str  # a short label, e.g. "flash_attention.fwd"
    kernel: object  # the @triton.jit function (a JITFunction, or an InterpretedFunction wrapping one)
    signature: dict  # argument name -> Triton type string ("*fp16", "i32", "fp32", "constexpr")
    configs: list = field(default_factory=list)  # list of dicts: constexpr values + num_warps/num_stages


# ----------------------------------------------------------------------------------------------
# Stores: Triton's interpreter (3.9) casts fp32 -> bf16 by dropping the low 16 bits (round toward
# zero), a GPU rounds to nearest even; a truncated 4.7812 lands on 4.75, a whole bf16 ulp off. In the
# interpreter round by hand first, so that the cast that follows is exact. Compiled away on a GPU.
# ----------------------------------------------------------------------------------------------
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def cast_for_store(x, DTYPE: tl.constexpr):
    """fp32 x -> DTYPE, rounded to nearest even on the GPU and in the interpreter alike."""
    if _ROUND_BF16_BY_HAND and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # round half to even at bit 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
