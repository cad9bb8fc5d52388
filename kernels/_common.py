"""What every kernel file shares: where kernels run, input checks, launch configs, compile specs; and
what the row-wise kernels (bias_gelu, layer_norm) share: row views and a race-free column sum.

Import this module before any `@triton.jit` kernel is defined. Triton decides at *decoration* time
whether a kernel is compiled for a GPU or run by its interpreter (`TRITON_INTERPRET=1`), so on a
machine without CUDA we switch the interpreter on here, once, before any kernel module is loaded.
The interpreter executes each program instance with NumPy: slow, but bit-for-bit the same kernel
code, which is how CI checks the kernels on a CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# Imported already (torch imports Triton for a fused optimizer or torch.compile), Triton built its
# language's own @triton.jit functions (tl.sum, tl.max, tl.rand, ...) for the compiler: see below.
_TRITON_BEFORE_US = "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (must come after the environment switch above)
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _language_for_the_interpreter() -> None:
    """Rebuild the @triton.jit functions of triton.language for the interpreter, as an import after
    the switch would have built them: a kernel that calls tl.sum would otherwise fail with "Cannot
    call @triton.jit'd outside of the scope of a kernel" (say, after `torch.optim.AdamW(...,
    fused=True)` imported Triton first)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    rebuilt = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction):
                if id(obj) not in rebuilt:
                    rebuilt[id(obj)] = InterpretedFunction(obj.fn)
                setattr(module, attr, rebuilt[id(obj)])


if INTERPRET and _TRITON_BEFORE_US:
    _language_for_the_interpreter()


# ----------------------------------------------------------------------------------------------
# Six pieces of the interpreter's own work that cost time and change no result (none touches a
# kernel; a GPU build never sees them).
# 1. A call to a @triton.jit helper. Triton 3.9's interpreter re-patches
# triton.language for *every* call of a helper from inside a kernel (an `inspect.getmembers` walk over
# the language modules, several milliseconds), though the launch patched them already for the whole
# grid; the lessons share their building blocks as helpers, so a launch pays that per helper per
# program. Off-GPU we patch once per launch and set of language modules instead: the same kernel
# code, run the same way, minus the repeated bookkeeping. A GPU build never sees this.
# ----------------------------------------------------------------------------------------------
def _patch_helper_calls_once() -> None:
    import inspect

    try:
        from triton.runtime import interpreter as _interp

        grid_call, helper_call = _interp.GridExecutor.__call__, _interp.InterpretedFunction.__call__
        patch_lang, interpreter_error = _interp._patch_lang, _interp.InterpreterError
    except (ImportError, AttributeError):  # another Triton: keep its own behaviour
        return
    if getattr(helper_call, "_patched_once", False):
        return
    langs_patched = []  # a stack: the language modules patched by the launch in progress

    langs_by_fn = {}  # a kernel's or helper's module never swaps its language modules: look once

    def langs_of(fn):
        langs = langs_by_fn.get(fn)
        if langs is None:
            langs = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
            langs_by_fn[fn] = langs
        return langs

    def run_grid(self, *args, **kwargs):
        langs_patched.append(set(langs_of(self.fn)))
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            langs_patched.pop()

    def call_helper(self, *args, **kwargs):
        langs = langs_of(self.fn)
        if not langs_patched or not langs <= langs_patched[-1]:
            patch_lang(self.fn)
            if langs_patched:
                langs_patched[-1] |= langs
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter_error(repr(e)) from e

    call_helper._patched_once = True
    _interp.GridExecutor.__call__ = run_grid
    _interp.InterpretedFunction.__call__ = call_helper

    # 2. Every int32 +, -, * also computes its int64 twin and two range comparisons for an overflow
    # assert, which `device_assert` then drops: it fires only with options.debug, never set in the
    # interpreter. Skipping that dead work changes no result and saves ~40% of an attention launch.
    builder = _interp.interpreter_builder
    if not builder.options.debug and builder.options.sanitize_overflow:
        import dataclasses

        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)

    # 3. The interpreter maps a Triton dtype to a NumPy one by building a dict of every dtype, afresh on
    # each of its ~40,000 calls in a training step of the tiny model (about a second in all). The map
    # never changes: look each dtype up once.
    np_dtype, np_dtypes = _interp._get_np_dtype, {}

    def np_dtype_once(tt_dtype):
        try:
            return np_dtypes[tt_dtype]
        except KeyError:
            np_dtypes[tt_dtype] = found = np_dtype(tt_dtype)
            return found
        except TypeError:  # an unhashable type: the original lookup
            return np_dtype(tt_dtype)

    _interp._get_np_dtype = np_dtype_once


# And one cost that is not the interpreter's own but lands on it: its tl.dot is NumPy's matmul, on
# tiles of a few hundred rows, one program after another. NumPy's BLAS (OpenBLAS) wakes its threads
# for every product, and on a busy CPU, or next to torch's own OpenMP threads in a training step, each
# wake-up costs milliseconds: a 128 x 32 by 32 x 128 product measured 15.7 ms with OpenBLAS's 2
# threads and 0.057 ms with one (2 cores, load 2).
# Nothing runs beside a program in the interpreter, so one thread loses nothing. Only NumPy's BLAS
# is limited (torch's matmuls keep their threads: its MKL is its own).
def _numpy_blas_on_one_thread() -> None:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # an install without it: the interpreter is only slower
        return
    ThreadpoolController().select(user_api="blas", internal_api="openblas").limit(limits=1)


# 4. Loads and stores. Triton 3.9's interpreter moves every element of a tl.load / tl.store through a
# C++ loop (one checked, dtype-dispatched memcpy per element, masked lanes included): 25-40 ns an
# element measured here, most of the time of a kernel that streams data (cross-entropy's passes over
# 50,257 logits a row). A NumPy gather / scatter over the same addresses does the same work in a
# third of the time: a load's pointers all point into one tensor (base + offsets, each a whole number
# of elements), so a NumPy view from the lowest to the highest address requested reads exactly the
# elements the loop would read (the view is only a window; nothing outside the addresses given is
# touched). Masked-off lanes take `other`, as before. A store writes each address in order, so
# repeated addresses end with the last value, as the loop's do.
class _NumpyMemory:
    """Stands in for the interpreter's C++ `load`/`store` (everything else is the original)."""

    def __init__(self, native):
        self._native = native

    def __getattr__(self, name):
        return getattr(self._native, name)

    @staticmethod
    def _window(ptrs, dtype):
        """(ptrs - lowest) / itemsize as indices and a NumPy view of [lowest, highest] as dtype, or None
        for an odd case (no pointer, a misaligned one, a dtype size not a power of 2): the C++ loop."""
        item = dtype.itemsize
        if ptrs.size == 0 or ptrs.dtype != np.uint64 or item & (item - 1):
            return None
        lo, hi = int(ptrs.min()), int(ptrs.max())
        if lo == 0 or lo % item:
            return None
        raw = (ctypes.c_char * (hi - lo + item)).from_address(lo)
        index = (ptrs - np.uint64(lo)) >> np.uint64(item.bit_length() - 1)
        # As intp (the same bits: an index is below 2^63): NumPy indexes 4x faster with its own type.
        return index.view(np.intp), np.frombuffer(raw, np.uint8).view(dtype)

    def load(self, ptrs, mask, other, dtype):
        mask = np.broadcast_to(mask, ptrs.shape)
        full = bool(mask.all())
        window = self._window(ptrs if full else ptrs[mask], np.dtype(dtype))
        if window is None:
            return self._native.load(ptrs, mask, other, dtype)
        index, memory = window
        if full:
            return np.take(memory, index)
        out = np.array(np.broadcast_to(other, ptrs.shape), dtype=dtype)
        out[mask] = np.take(memory, index)
        return out

    def store(self, ptrs, value, mask):
        mask = np.broadcast_to(mask, ptrs.shape)
        value = np.broadcast_to(value, ptrs.shape)
        full = bool(mask.all())
        window = self._window(ptrs if full else ptrs[mask], value.dtype)
        if window is None:
            return self._native.store(ptrs, value, mask)
        index, memory = window
        memory[index] = value if full else value[mask]


def _numpy_loads_and_stores() -> None:
    try:
        from triton.runtime import interpreter as _interp

        native = _interp._interpreter
        native.load, native.store  # noqa: B018  (another Triton: keep its own)
    except (ImportError, AttributeError):
        return
    if not isinstance(native, _NumpyMemory):
        _interp._interpreter = _NumpyMemory(native)


# 5. The frontend's bookkeeping per tile value. Every tl.* call makes new `tl.tensor` and
# `tl.block_type` objects, and their constructors re-derive the same facts each time: a tensor
# rebuilds its shape (a Triton tuple of constexprs, whose constructor types every element) and its
# element count from its type; a block type unwraps, re-validates and re-types its shape. In
# attention, where tiles are small and calls many, that is about 30% of a launch. Now a tensor takes
# both from its type, derived once per type object, and a block type takes its shape, count and name
# from a table keyed by the shape's ints (validated by the original the first time). Anything else takes the
# original path, and the originals stay if they build anything different from these (another Triton).
def _lighter_tensor_objects() -> None:
    import triton.language.core as core

    tensor_init, block_init, constexpr = core.tensor.__init__, core.block_type.__init__, core.constexpr
    if getattr(tensor_init, "_once", False):
        return
    shapes = {}  # shape as plain ints -> (Triton tuple, numel, name part, what a tensor of it holds)

    def for_tensors(shape):  # (shape as constexprs, numel as a constexpr), as the original computes them
        return core.tuple([constexpr(d) for d in shape]), constexpr(math.prod(shape))

    def tensor_init_once(self, handle, type):
        self.handle, self.type = handle, type
        try:
            self.shape, self.numel = type.__dict__["_for_tensors"]
        except KeyError:
            type._for_tensors = self.shape, self.numel = for_tensors(type.shape if type.is_block() else ())
        self.dtype = type.scalar

    def block_init_once(self, element_ty, shape):
        if shape.__class__ is not list and not isinstance(shape, core.tuple):
            return block_init(self, element_ty, shape)  # what the original accepts, or its error
        try:
            key = tuple(d.value if d.__class__ is constexpr else d for d in shape)
            tl_shape, numel, text, tensors = shapes[key]
        except (KeyError, TypeError):
            block_init(self, element_ty, shape)  # the original validates it
            if not all(d.__class__ is int for d in self.shape):
                return
            key = tuple(self.shape)
            shapes[key] = tl_shape, numel, text, tensors = self.shape, self.numel, str(self.shape), for_tensors(key)
        self.element_ty, self.shape, self.numel = element_ty, tl_shape, numel
        self.name = f"<{text}, {element_ty}>"
        self._for_tensors = tensors

    def same(a, b):
        a, b = ({k: v for k, v in vars(x).items() if k != "_for_tensors"} for x in (a, b))
        return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and repr(a[k]) == repr(b[k]) for k in a)

    # Keep the originals unless these build the same objects (another Triton: its own constructors).
    want_ty = core.block_type(core.float32, [2, 4])
    want = core.tensor(None, want_ty)
    got_ty, got = core.block_type.__new__(core.block_type), core.tensor.__new__(core.tensor)
    for _ in range(2):  # the first fills the table, the second reads it
        block_init_once(got_ty, core.float32, [2, 4])
    tensor_init_once(got, None, core.block_type(core.float32, [2, 4]))
    if not (same(got_ty, want_ty) and same(got, want)):
        return
    tensor_init_once._once = True
    tensor_init_once._original, block_init_once._original = tensor_init, block_init  # for the tests
    core.tensor.__init__, core.block_type.__init__ = tensor_init_once, block_init_once


# 6. Masks combined with & | ^. Triton 3.9's interpreter computes every op on two int1 (bool) tiles
# in int8 and truncates back to one bit (so that int1 + int1 wraps as on a GPU, where NumPy's bool
# + saturates): four passes over the tile instead of one. For & | ^ there is nothing to wrap, and
# NumPy's bitwise op on bools gives those very bits. The cross-entropy kernel ANDs a row mask with a
# column mask over every (256 x 2,048) tile: this alone took 14% of its time.
def _bool_logic_in_one_pass() -> None:
    try:
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

        InterpreterBuilder.create_and, InterpreterBuilder.binary_op  # noqa: B018  (another Triton: keep its own)
    except (ImportError, AttributeError):
        return
    if getattr(InterpreterBuilder.create_and, "_one_pass", False):
        return

    def logic(np_op):
        def create(self, lhs, rhs):
            if lhs.data.dtype == np.bool_ and rhs.data.dtype == np.bool_:
                return TensorHandle(np_op(lhs.data, rhs.data), lhs.dtype.scalar)
            return self.binary_op(lhs, rhs, np_op)  # integers: the original

        create._one_pass = True
        return create

    InterpreterBuilder.create_and, InterpreterBuilder.create_or, InterpreterBuilder.create_xor = (
        logic(np.bitwise_and), logic(np.bitwise_or), logic(np.bitwise_xor))


if INTERPRET:
    _patch_helper_calls_once()
    _numpy_loads_and_stores()
    _numpy_blas_on_one_thread()
    _lighter_tensor_objects()
    _bool_logic_in_one_pass()

# Dtypes every kernel accepts. Loads are cast to fp32 before arithmetic (the interpreter cannot do
# bf16 math, and fp32 accumulation is what makes the results accurate); stores cast back.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# log2(e): the attention kernels work in base 2, exp(x) = exp2(x * LOG2E) (one hardware instruction).
LOG2E = 1.4426950408889634


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
def autotune(configs: list, key: list[str], prune_configs_by: dict | None = None, **kwargs):
    """`triton.autotune` on a GPU; on the interpreter only the first config (autotuning several
    configs needs a driver, and timing the interpreter would mean nothing anyway).

    GPT_TRITON_MAX_CONFIGS=n (read at import) keeps the first n configs of what the kernel's own
    pruner keeps (its list's order is the preference order): the budget mode of
    scripts/gpu_session.py sets it so that compiling and autotuning fit a short run."""
    configs = configs if not INTERPRET else configs[:1]
    limit = int(os.environ.get("GPT_TRITON_MAX_CONFIGS", "0") or 0)
    if limit > 0:
        prune = dict(prune_configs_by or {})
        early = prune.get("early_config_prune")

        def first_n(cfgs, named_args, **kw):
            return (early(cfgs, named_args, **kw) if early else list(cfgs))[:limit]

        prune["early_config_prune"] = first_n
        prune_configs_by = prune
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune_configs_by, **kwargs)


# ----------------------------------------------------------------------------------------------
# Compile specs: every kernel file lists calls of its op at GPT-2's shapes (COMPILE_SPECS, at the
# bottom); tools/compile_check.py runs each on CPU tensors with Triton's launch intercepted, and
# compiles every variant the JIT would build from those calls for sm_80 and sm_90.
# ----------------------------------------------------------------------------------------------
@dataclass
class CompileSpec:
    name: str  # "<op>.<case>.<dtype>...", e.g. "flash_attention.train.bf16.d64"
    launch: Callable[[], object]  # runs the op (forward, and backward where training runs it)
    shape: str = ""  # what the call stands for: "gpt2-124M training, B x 1024 tokens"


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


# ----------------------------------------------------------------------------------------------
# Row-wise launches: what bias_gelu and layer_norm (and their backward reductions) share.
# ----------------------------------------------------------------------------------------------
NUM_STAGES = 3  # Triton's default on NVIDIA, stated so that COMPILE_SPECS builds what we launch
# Off-GPU the number of row groups of a race-free column sum is arbitrary; a handful keeps the
# interpreter fast and still exercises the reduction (several groups, the last one short).
INTERPRETER_PROGRAMS = 4


def num_programs(device: torch.device, per_sm: int) -> int:
    """per_sm programs for every SM of device's GPU; off-GPU one program with the interpreter's
    configurations (no second, reducing launch), INTERPRETER_PROGRAMS with the GPU's."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 1 if interpreter_configs(device) else INTERPRETER_PROGRAMS


# The interpreter's launch configurations. It runs the programs of a grid one after another, and every
# tl.* call of every program is a NumPy call with a Python overhead that dwarfs the arithmetic on the
# small tiles a GPU wants (a 128-wide LayerNorm row costs as much as a 4096-wide one). So off-GPU the
# launchers pick few, large programs (many rows per program, a whole vocabulary per block) and skip
# launches that only a many-program grid needs: the same kernel code, other constexpr values. A tile
# of INTERPRETER_TILE fp32 elements is 4 MB per live array: large enough that the overhead stops
# mattering, small enough for a laptop. Tests set INTERPRETER_CONFIGS = False to run the GPU's
# configurations in the interpreter too.
INTERPRETER_CONFIGS = INTERPRET
INTERPRETER_TILE = 2**20


def interpreter_rows_per_step(M: int) -> int:
    """Rows per step of a backward's walk in the interpreter, about sqrt(M). The walk adds its steps
    into the accumulator one after another, and the interpreter's tl.sum over the accumulator's rows
    is a NumPy sum down axis 0, sequential too: M/BLOCK_M + BLOCK_M additions deep, least at sqrt(M),
    as shallow as the GPU's walk (a few dozen) and so as accurate; one tile of all M rows would be M
    deep."""
    return next_power_of_2(math.isqrt(max(M - 1, 0)) + 1)


def interpreter_configs(device: torch.device) -> bool:
    """True when a launch on `device` runs in the interpreter and should use its configurations."""
    return device.type == "cpu" and INTERPRETER_CONFIGS



def as_rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride and any row stride. `reshape` is a view whenever
    the rows are evenly spaced (a contiguous tensor, a column slice of a wider one, an expanded
    gradient); it copies only when they are not (e.g. a permuted 3-D tensor). Columns must be unit
    stride for coalesced, vectorized loads; a tensor whose last dim is strided is copied once."""
    t2 = t.reshape(-1, N)
    return t2 if t2.stride(1) == 1 or N == 1 else t2.contiguous()


# Column sums without atomics (taught in bias_gelu.py): each program of a backward writes its group
# of rows' partial sums as one row of an (n_groups, N) fp32 buffer, and this kernel adds the rows up
# in a fixed order, so the answer is the same bit for bit on every run. (The compile check builds it
# from the bias_gelu and layer_norm backward calls that launch it.)
@triton.jit
def _sum_partials_kernel(
    PARTIAL,  # (n_groups, N) fp32, contiguous
    OUT,  # (N,) any float dtype
    n_groups,
    N,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per BLOCK_N columns, walking down all n_groups rows: a fixed order, so a fixed answer.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g in range(0, n_groups, BLOCK_G):
        grp = g + tl.arange(0, BLOCK_G)
        mask = (grp[:, None] < n_groups) & col_ok[None, :]
        acc += tl.load(PARTIAL + grp[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, cast_for_store(tl.sum(acc, axis=0), OUT.dtype.element_ty), mask=col_ok)


# 32 groups x 128 columns per step, 8 warps.
_SUM_PARTIALS_CONFIG = {"BLOCK_G": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": NUM_STAGES}


def sum_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n_groups, N) fp32 -> (N,) column sums in `dtype`."""
    n_groups, N = partial.shape
    if n_groups == 1:  # one group did everything (small M, or the interpreter): no launch to add it up
        return partial[0].to(dtype, copy=True)
    out = torch.empty(N, dtype=dtype, device=partial.device)
    with device_guard(partial.device):
        _sum_partials_kernel[(triton.cdiv(N, _SUM_PARTIALS_CONFIG["BLOCK_N"]),)](
            partial, out, n_groups, N, **_SUM_PARTIALS_CONFIG
        )
    return out


# ----------------------------------------------------------------------------------------------
# GPT-2's shapes, for the COMPILE_SPECS calls at the bottom of every kernel file.
# ----------------------------------------------------------------------------------------------
GPT2_PRESETS = {"gpt2-124M": (768, 12), "gpt2-355M": (1024, 16), "gpt2-774M": (1280, 20), "gpt2-1558M": (1600, 25)}
GPT2_VOCAB, GPT2_CONTEXT = 50257, 1024
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (activation dtype, parameter dtype) as the model runs them: training under bf16/fp16 autocast
# (fp32 parameters), and fp32; bf16 first, so that each lesson's first spec (what CI compiles) is
# the speed path.
TRAIN_DTYPES = ((torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float16, torch.float32))


def backward_of(out: torch.Tensor) -> None:
    """Run the backward of `out` with an uninitialised gradient: a compile-spec call needs the
    launches' shapes, strides and dtypes, never their values."""
    out.backward(torch.empty_like(out))
