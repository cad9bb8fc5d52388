"""Compile what the launchers launch at GPT-2's shapes, for real GPUs (sm_80, sm_90), without one.

The interpreter (TRITON_INTERPRET=1) checks what a kernel computes, not whether it fits a GPU: a
block size that needs more shared memory than an SM has, or so many live values that registers
spill to (slow, off-chip) local memory, only shows up when Triton compiles for a real target. The
compiler needs no GPU for that, only for running the result: `triton.compile` lowers a kernel
through Triton IR -> TritonGPU IR -> LLVM IR -> PTX, and the `ptxas` in Triton's wheel turns the PTX
into a cubin for any architecture we name.

What gets compiled: what the JIT would compile
----------------------------------------------
`kernel[grid](*args)` does not compile "the kernel": it compiles one *variant* per specialisation
of its arguments, which Triton's launcher (triton/runtime/jit.py, `create_function_from_signature`
and the native `specialize_impl`; the same rules in Triton 3.6 and 3.9) derives from each call:

* a tensor becomes a pointer of its dtype, marked 16-byte aligned ("D") when its data_ptr is;
* an int equal to 1 becomes the constant 1 (a unit stride folds away: the loads along it are
  contiguous and can vectorise); any other int becomes i32 (i64 past 2^31), marked divisible by 16
  ("D") when it is, which lets the compiler prove that rows start 16-byte aligned;
* floats and bools are never specialised; constexprs and launch options (num_warps, num_stages)
  are part of the variant.

Those marks decide whether loads become 16-byte vectors and whether the pipeliner can use
`cp.async`, and so the registers a kernel needs. So the check does not declare signatures by hand:
every kernel file lists, in COMPILE_SPECS, *calls of its public op or launchers at GPT-2's shapes*
(the model's own layouts: q, k, v as strided views of one fused QKV tensor, the KV cache, bf16
activations with fp32 parameters, ...). A worker runs each call on CPU tensors of those shapes with
the JIT's launch intercepted: an autotuned kernel yields one launch per config its pruner keeps
(exactly the list the autotuner would time), and each launch is bound and specialised by Triton's
own binder, for the target, and compiled, as `JITFunction.run` would. Shapes that specialise alike
(GPT-2 124M and 355M attention: every int divisible by 16 either way) compile once and list both.

What is read from each compiled variant
---------------------------------------
* shared memory: `metadata.shared` (Triton's dynamic shared memory) plus the cubin's static
  shared memory. Must fit one block's limit: 166,912 B on sm_80, 232,448 B on sm_90.
* registers and spills: `cuobjdump --dump-resource-usage` on the cubin (bundled with Triton) prints
  REG, STACK (where ptxas puts spilled registers) and LOCAL; "spills" is STACK + LOCAL bytes per
  thread. Must be 0, and one block's registers (REG x 32 x num_warps) must fit the 64K register file.
  (`CompiledKernel.n_regs` exists only after loading on a GPU, hence the cubin.)
* residency, as Triton's fused-softmax tutorial computes occupancy: blocks per SM = the least of
  64K / (REG x 32 x num_warps), the SM's shared memory / the block's, and 64 warps / num_warps
  (and at most 32 blocks); warps per SM = blocks x num_warps. (The hardware also rounds registers
  up to 256 per warp; this counts as the tutorial does.)
* the instruction mix, counted statically in the PTX and the SASS (`cuobjdump -sass`): tensor-core
  MMAs (`mma.sync` / HMMA, `wgmma.mma_async` / HGMMA on sm_90), asynchronous copies (`cp.async` /
  LDGSTS, TMA `cp.async.bulk.tensor` / UTMALDG), and global loads by width (`ld.global.v4` is
  16 bytes per thread; LDG.E.128 in SASS). A 16-bit attention, decode or linear-cross-entropy
  variant with a `tt.dot` but no tensor-core instruction is flagged, with the reason where the IR
  shows one (an fp32 `input_precision="ieee"` dot is an FMA loop by design).
* compile_s: seconds `triton.compile` took (cold when the Triton cache is; the report script uses a
  fresh cache): the budget mode of scripts/gpu_session.py estimates its compile cost from these.

Why worker processes. Whether `@triton.jit` builds a compilable `JITFunction` or an interpreter
object is decided when each kernel is *defined*, from TRITON_INTERPRET; the workers start with
TRITON_INTERPRET=0, so every kernel module imports as it would on a GPU machine (kernels/__init__.py
imports nothing, so each lesson imports alone, and a broken one is reported on its own). That also
keeps a compiler crash from taking the caller down. Workers pull jobs from the parent one at a time.

A kernel module that fails to import, lists no COMPILE_SPECS, or whose calls raise is a failure row
(status IMPORT ERROR / NO SPECS / LAUNCH ERROR), never a crash. Every `@triton.jit` kernel a lesson
defines must be launched by one of its specs (status NOT LAUNCHED otherwise).

Use it as `python scripts/compile_report.py` (a table, --json), or `run_check()` from Python.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
KERNELS_DIR = _ROOT / "kernels"
NOT_LESSONS = {"reference"}  # kernels/*.py that hold no Triton kernels (and _private helpers)


def kernel_modules() -> tuple:
    """Every lesson file in kernels/: a new one must list COMPILE_SPECS or the check fails."""
    return tuple(sorted(p.stem for p in KERNELS_DIR.glob("*.py")
                        if not p.stem.startswith("_") and p.stem not in NOT_LESSONS))


KERNEL_MODULES = kernel_modules()


@dataclass(frozen=True)
class Target:
    arch: int
    shared_per_block: int  # bytes a block may use with the opt-in carve-out
    shared_per_sm: int


TARGETS = {
    "sm_80": Target(80, 166912, 167936),  # A100: 163 KB per block, 164 KB per SM
    "sm_90": Target(90, 232448, 233472),  # H100/H200: 227 KB per block, 228 KB per SM
}
REGISTERS_PER_SM = 65536  # 64K 32-bit registers on both
MAX_REGISTERS_PER_THREAD = 255
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# Kernels whose 16-bit variants must run their dots on tensor cores (issue 9).
TENSOR_CORE_MODULES = ("flash_attention", "decode_attention", "linear_cross_entropy")

# Static counts in the PTX text and the SASS listing (not executed counts).
PTX_PATTERNS = {
    "mma": r"\bmma\.sync\.aligned\.",
    "wgmma": r"\bwgmma\.mma_async\.",
    "cp_async": r"\bcp\.async\.c[ag]\.shared",
    "tma": r"\bcp\.async\.bulk\.tensor\.",
    "ld_global": r"\bld\.global\.",
    "ld_global_v4": r"\bld\.global\.(?:[A-Za-z0-9_:]+\.)*v4\.",
    "ld_global_v2": r"\bld\.global\.(?:[A-Za-z0-9_:]+\.)*v2\.",
    "st_global_v4": r"\bst\.global\.(?:[A-Za-z0-9_:]+\.)*v4\.",
}
SASS_PATTERNS = {
    "HMMA": r"\bHMMA\.",
    "HGMMA": r"\bHGMMA\.",
    "LDGSTS": r"\bLDGSTS\b",
    "UTMALDG": r"\bUTMALDG\b",
    "LDG": r"\bLDG\.",
    "LDG.128": r"\bLDG\.E\.(?:[A-Z0-9_]+\.)*128\b",
    "FFMA": r"\bFFMA\b",
}


@dataclass
class Result:
    """One compiled (variant, target), or one module-level problem (config and target empty)."""

    kernel: str  # the @triton.jit function's name, or the module for a module-level problem
    config: str  # "BLOCK_M=64 BLOCK_N=64 w4 s2" (the constexprs the launch passed, and the options)
    target: str  # "sm_80" / "sm_90"
    module: str = ""
    dtype: str = ""  # the first pointer argument's element type: "bf16"
    specs: list = field(default_factory=list)  # the COMPILE_SPECS calls that launch this variant
    specialisation: dict = field(default_factory=dict)  # int argument -> "i32", "i32:16", "=1", "i64"
    num_warps: int | None = None
    registers: int | None = None
    spills: int | None = None  # bytes of local memory per thread; 0 = no spills
    shared: int | None = None  # bytes of shared memory per block (dynamic + static)
    blocks_per_sm: int | None = None
    warps_per_sm: int | None = None
    limited_by: str = ""  # registers / shared / warps / blocks
    dots: int | None = None  # tt.dot ops in the Triton IR
    ptx: dict = field(default_factory=dict)
    sass: dict = field(default_factory=dict)
    tensor_cores: str = ""  # "wgmma", "mma", "none" ("" when the kernel has no dot)
    note: str = ""  # why a dot does not use tensor cores (or the sm_90 one not wgmma)
    compile_s: float | None = None
    status: str = "FAIL"  # OK, FAIL, IMPORT ERROR, NO SPECS, LAUNCH ERROR, NOT LAUNCHED
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@dataclass
class Report:
    results: list = field(default_factory=list)
    modules: dict = field(default_factory=dict)  # module -> number of specs (None: a problem)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failures


# ----------------------------------------------------------------------------------------------
# Capturing launches: run a spec's call with the JIT intercepted.
# ----------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One `kernel[grid](*args, **kwargs)` call, as JITFunction.run would receive it."""

    fn: object  # the JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.fn.__name__


class _Capture:
    """While active: JITFunction.run records its call instead of compiling and launching, and an
    Autotuner runs its pruning exactly as on a GPU, then records one launch per surviving config
    (the ones it would benchmark) instead of timing them. Kernels do not run, so outputs stay
    uninitialised: the calls only need the right shapes, strides and dtypes."""

    def __init__(self):
        self.launches: list[Launch] = []

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        capture = self
        self._saved = (JITFunction.run, Autotuner.run)

        def jit_run(fn, *args, grid, warmup, **kwargs):
            capture.launches.append(Launch(fn, args, dict(kwargs)))
            return None

        def autotuner_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            for config in configs:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            tuner.nargs = None

        JITFunction.run, Autotuner.run = jit_run, autotuner_run
        return self

    def __exit__(self, *exc):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        JITFunction.run, Autotuner.run = self._saved
        return False


# What a launcher sees of the GPU it runs on: the SM count sizes persistent grids and split counts,
# and through them some int arguments (rows per program, splits), whose specialisation can differ.
SM_COUNTS = {"sm_80": 108, "sm_90": 132}  # A100; H100 SXM and H200


def _stand_in_for_gpu(target_name: str) -> list[str]:
    """Make the lessons' launchers accept CPU tensors as if they were on a GPU of `target_name`:
    the device check lets CPU tensors through, and the SM-count helpers answer that GPU's count.
    Returns what was patched (recorded in the report)."""
    import kernels._common as common

    sms = SM_COUNTS[target_name]
    if not hasattr(common, "_original_check_device"):
        common._original_check_device = common.check_device
    original = common._original_check_device

    def check_device(*tensors, op):
        if all(t.device.type == "cpu" for t in tensors):
            return tensors[0].device
        return original(*tensors, op=op)

    def num_programs(device, per_sm):
        return per_sm * sms

    def sm_count(device):
        return sms

    patched = []
    for name, mod in sorted(sys.modules.items()):
        if not (name == "kernels._common" or name.startswith("kernels.")):
            continue
        for attr, new in (("check_device", check_device), ("num_programs", num_programs), ("_sm_count", sm_count)):
            if callable(getattr(mod, attr, None)):
                setattr(mod, attr, new)
                patched.append(f"{name}.{attr}")
    return patched


def capture(spec) -> list[Launch]:
    """The launches of one CompileSpec's call (a worker with TRITON_INTERPRET=0 only)."""
    import torch

    with _Capture() as cap, torch.no_grad() if getattr(spec, "no_grad", False) else _nullcontext():
        spec.launch()
    return cap.launches


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _backend(target_name: str):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", TARGETS[target_name].arch, 32)
    return target, make_backend(target)


def specialise(launch: Launch, target_name: str):
    """(target, signature, constexprs, attrs, options) of a launch, derived as JITFunction.run does:
    Triton's own binder (the specialisation rules above), then its `_pack_args`."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target, backend = _backend(target_name)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return target, specialization, signature, constexprs, attrs, options


def variant_key(launch: Launch, target_name: str) -> str:
    """What the JIT's kernel cache keys on (the specialisation and the options), plus the kernel."""
    _, specialization, _, _, _, options = specialise(launch, target_name)
    return f"{launch.fn.fn.__module__}.{launch.fn.fn.__qualname__}|{specialization}|{options.num_warps}|{options.num_stages}"


def describe(launch: Launch) -> tuple[str, str, dict]:
    """(config label, dtype, specialisation of each non-constexpr int argument) of a launch."""
    _, specialization, _, _, _, options = specialise(launch, "sm_90")
    names = [p.name for p in launch.fn.params]
    consts, spec, dtype = [], {}, ""
    for p, (ty, attr) in zip(launch.fn.params, specialization):
        if p.is_constexpr:
            if p.name in launch.kwargs:
                consts.append(f"{p.name}={launch.kwargs[p.name]}")
            continue
        if ty == "constexpr":  # an int the launcher turned into a constant (== 1)
            spec[p.name] = "=1"
        elif ty.startswith("*"):
            dtype = dtype or ty[1:]
        elif ty in ("i32", "i64", "u64"):
            spec[p.name] = ty + (":16" if attr == "D" else "")
    del names
    label = " ".join(consts + [f"w{options.num_warps}", f"s{options.num_stages}"])
    return label, dtype, spec


# ----------------------------------------------------------------------------------------------
# Compiling one variant and reading it
# ----------------------------------------------------------------------------------------------
def _tool(name: str) -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    return shutil.which(name)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = _tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither in Triton's wheel nor on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        env = dict(os.environ)
        env["PATH"] = str(Path(tool).parent) + os.pathsep + env.get("PATH", "")  # -sass runs nvdisasm
        return subprocess.run([tool, *flags, path], capture_output=True, text=True, check=True, env=env).stdout
    finally:
        os.unlink(path)


def resource_usage(cubin: bytes, kernel_name: str) -> dict:
    """{'REG': .., 'SHARED': .., 'LOCAL': .., 'STACK': ..} for `kernel_name` in a cubin."""
    return parse_resource_usage(_cuobjdump(cubin, "--dump-resource-usage"), kernel_name)


def parse_resource_usage(text: str, kernel_name: str) -> dict:
    """Parse cuobjdump's `Function <name>:` block, e.g. `REG:40 STACK:0 SHARED:0 LOCAL:0 ...`."""
    for name, line in re.findall(r"Function ([^\s:]+):\s*\n\s*(.*)", text):
        if name == kernel_name:
            usage = {key: int(val) for key, val in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            missing = {"REG", "SHARED", "LOCAL"} - set(usage)
            if missing:
                raise RuntimeError(f"cuobjdump printed no {sorted(missing)} for {kernel_name}: {line!r}")
            return usage
    raise RuntimeError(f"cuobjdump printed no resource usage for {kernel_name}; got:\n{text}")


def count_instructions(text: str, patterns: dict) -> dict:
    return {name: len(re.findall(rx, text)) for name, rx in patterns.items()}


def residency(registers: int, shared: int, num_warps: int, target_name: str) -> tuple[int, str]:
    """(blocks per SM, what limits it), as Triton's fused-softmax tutorial computes occupancy."""
    limits = {"registers": REGISTERS_PER_SM // max(registers * 32 * num_warps, 1)}
    if shared:
        limits["shared"] = TARGETS[target_name].shared_per_sm // shared
    limits.update(warps=MAX_WARPS_PER_SM // num_warps, blocks=MAX_BLOCKS_PER_SM)
    by = min(limits, key=lambda k: limits[k])  # the first of equals: registers, shared, warps, blocks
    return limits[by], by


def judge(usage: dict, dynamic_shared: int, num_warps: int, target_name: str):
    """(registers, spill bytes, shared bytes, problems) from cuobjdump's numbers and Triton's
    dynamic shared memory; problems is empty when the kernel fits `target_name`."""
    shared_limit = TARGETS[target_name].shared_per_block
    registers = usage["REG"]
    spills = usage["LOCAL"] + usage.get("STACK", 0)
    shared = dynamic_shared + usage["SHARED"]
    problems = []
    if shared > shared_limit:
        problems.append(f"shared memory {shared} B > {shared_limit} B per block on {target_name}")
    if spills:
        problems.append(f"{spills} B of local memory per thread (stack frame {usage.get('STACK', 0)} B, "
                        f"local {usage['LOCAL']} B): registers spill")
    if registers > MAX_REGISTERS_PER_THREAD or registers * 32 * num_warps > REGISTERS_PER_SM:
        problems.append(f"{registers} registers x {32 * num_warps} threads > {REGISTERS_PER_SM} per SM")
    return registers, spills, shared, problems


def tensor_core_verdict(ttir: str, ptx: dict, target_name: str) -> tuple[str, str]:
    """(tensor cores used: "wgmma" / "mma" / "none" / "" without dots, why not where the IR says)."""
    if "tt.dot" not in ttir:
        return "", "no tl.dot in this variant"
    if ptx["wgmma"]:
        return "wgmma", ""
    if ptx["mma"]:
        note = "" if target_name == "sm_80" else "mma.sync (Ampere MMA), not wgmma"
        return "mma", note
    # Triton 3.9 prints input_precision="ieee" (the default for fp32 operands it is asked for) as no
    # attribute at all, and "tf32"/"tf32x3" as `inputPrecision = ...`.
    dots = re.findall(r"tt\.dot .*", ttir)
    ieee = [d for d in dots if "inputPrecision" not in d or "ieee" in d]
    if dots and len(ieee) == len(dots) and all("xf32> *" in d.split("->")[0] for d in dots):
        return "none", "fp32 dots with input_precision='ieee' are FMA loops (exact fp32, no TF32) by design"
    return "none", "tt.dot lowered to FMA, not tensor cores"


def compile_one(launch: Launch, target_name: str, module: str = "", specs=()) -> Result:
    """Compile one launch's variant for one target and read its resources and instruction mix."""
    import triton

    res = Result(launch.name, "", target_name, module, specs=list(specs))
    try:
        res.config, res.dtype, res.specialisation = describe(launch)
        target, _, signature, constexprs, attrs, options = specialise(launch, target_name)
        res.num_warps = options.num_warps
        src = triton.compiler.ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        t0 = time.perf_counter()
        compiled = triton.compile(src, target=target, options=options.__dict__)
        res.compile_s = round(time.perf_counter() - t0, 2)
        cubin, name = compiled.asm["cubin"], compiled.metadata.name
        usage = resource_usage(cubin, name)
        res.ptx = count_instructions(compiled.asm["ptx"], PTX_PATTERNS)
        res.sass = count_instructions(_cuobjdump(cubin, "-sass"), SASS_PATTERNS)
        ttir = compiled.asm.get("ttir", "")
        res.dots = len(re.findall(r"\btt\.dot\b", ttir))
    except Exception as e:  # noqa: BLE001  (a compile error is a result, not a crash)
        res.error = _short_error(e)
        return res

    res.registers, res.spills, res.shared, problems = judge(usage, compiled.metadata.shared,
                                                           compiled.metadata.num_warps, target_name)
    res.blocks_per_sm, res.limited_by = residency(res.registers, res.shared, res.num_warps, target_name)
    res.warps_per_sm = res.blocks_per_sm * res.num_warps
    res.tensor_cores, res.note = tensor_core_verdict(ttir, res.ptx, target_name)
    wants_tensor_cores = module in TENSOR_CORE_MODULES and res.dtype in ("fp16", "bf16")
    if wants_tensor_cores and res.tensor_cores in ("none", ""):
        res.note = f"16-bit {module} without tensor cores: {res.note}"
    elif not res.dots:
        res.note = ""
    res.status = "FAIL" if problems else "OK"
    res.error = "; ".join(problems)
    return res


def _short_error(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[:6])[:800]


# ----------------------------------------------------------------------------------------------
# Worker side: TRITON_INTERPRET=0; imports the lessons, captures their launches, compiles.
# ----------------------------------------------------------------------------------------------
def _selected(module: str, spec_name: str | None, kernel_filter: str | None) -> bool:
    if not kernel_filter:
        return True
    return kernel_filter in module or (spec_name is not None and kernel_filter in spec_name)


def _jit_kernels(mod) -> list[str]:
    """Names of the @triton.jit kernels a module defines that are launched, not called from other
    kernels: those whose name ends in "_kernel" (the project's convention)."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    names = []
    for obj in vars(mod).values():
        while isinstance(obj, (Autotuner, Heuristics)):
            obj = obj.fn
        if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__ and obj.fn.__name__.endswith("_kernel"):
            names.append(obj.fn.__name__)
    return sorted(set(names))


def plan(modules, targets=tuple(TARGETS), kernel_filter=None, first_spec_only=False):
    """Import the lessons and capture their launches as on a GPU of each target: (problems, spec
    counts, variants), a variant being {"module", "target", "key", "launch", "specs"}, in a
    deterministic order (every worker builds the same list, so the parent hands out indices)."""
    problems, counts, variants, index = [], {}, [], {}
    imported = {}
    for module in modules:
        name = f"kernels.{module}"
        try:
            imported[module] = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  (any import failure is a finding to report)
            counts[module] = None
            if _selected(module, None, kernel_filter):
                problems.append(Result(module, "", "", module, status="IMPORT ERROR", error=_short_error(e)))
    chosen = {}
    for module, mod in imported.items():
        specs = getattr(mod, "COMPILE_SPECS", None)
        if not specs:
            counts[module] = None
            if _selected(module, None, kernel_filter):
                problems.append(Result(module, "", "", module, status="NO SPECS",
                                       error=f"kernels.{module} defines no COMPILE_SPECS"))
            continue
        counts[module] = len(specs)
        chosen[module] = [s for s in specs if _selected(module, s.name, kernel_filter)]
        if first_spec_only:
            chosen[module] = chosen[module][:1]
    for target in targets:
        _stand_in_for_gpu(target)
        for module, specs in chosen.items():
            launched = set()
            for spec in specs:
                try:
                    launches = capture(spec)
                except Exception as e:  # noqa: BLE001
                    where = traceback.format_exc(limit=-1).strip().splitlines()
                    problems.append(Result(spec.name, "", target, module, specs=[spec.name], status="LAUNCH ERROR",
                                           error=_short_error(e) + " | " + " ".join(where[-3:-1])))
                    continue
                if not launches:
                    problems.append(Result(spec.name, "", target, module, specs=[spec.name], status="LAUNCH ERROR",
                                           error="the spec's call launched no Triton kernel"))
                for launch in launches:
                    launched.add(launch.name)
                    try:
                        key = target + "|" + variant_key(launch, target)
                    except Exception as e:  # noqa: BLE001
                        problems.append(Result(launch.name, "", target, module, specs=[spec.name],
                                               status="LAUNCH ERROR", error=f"cannot specialise: {_short_error(e)}"))
                        continue
                    if key in index:
                        if spec.name not in variants[index[key]]["specs"]:
                            variants[index[key]]["specs"].append(spec.name)
                        continue
                    index[key] = len(variants)
                    variants.append({"module": module, "target": target, "key": key, "launch": launch,
                                     "specs": [spec.name]})
            if not kernel_filter and not first_spec_only and target == targets[0]:
                for kernel in sorted(set(_jit_kernels(imported[module])) - launched - _launched_elsewhere(variants)):
                    problems.append(Result(kernel, "", "", module, status="NOT LAUNCHED",
                                           error=f"no COMPILE_SPECS call of kernels.{module} launches {kernel}"))
    return problems, counts, variants


def _launched_elsewhere(variants) -> set:
    return {v["launch"].name for v in variants}


def _worker(modules, kernel_filter, targets, first_spec_only=False) -> None:
    """Protocol on stdin/stdout, one JSON object per line. Out: {"plan": ...} first; then for each job
    index read from stdin, {"job": i, "result": {...}}. Stdin closing ends the worker."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a kernel module prints must not corrupt the protocol
    problems, counts, variants = plan(modules, tuple(targets), kernel_filter, first_spec_only)
    jobs = [(v, variants[v]["target"]) for v in range(len(variants))]
    labels = [(variants[v]["launch"].name, variants[v]["module"], variants[v]["key"], *describe(variants[v]["launch"]),
               variants[v]["specs"]) for v, _ in jobs]
    msg = {"problems": [asdict(p) for p in problems], "counts": counts, "jobs": jobs, "labels": labels}
    print(json.dumps({"plan": msg}), file=out, flush=True)
    for line in sys.stdin:
        i = int(line)
        v, target = jobs[i]
        variant = variants[v]
        _stand_in_for_gpu(target)
        try:
            res = compile_one(variant["launch"], target, variant["module"], variant["specs"])
        except Exception:  # noqa: BLE001
            res = Result(variant["launch"].name, "", target, variant["module"], error=traceback.format_exc(limit=3))
        print(json.dumps({"job": i, "result": asdict(res)}), file=out, flush=True)


# ----------------------------------------------------------------------------------------------
# Parent side: start workers with TRITON_INTERPRET=0, hand out jobs, collect results.
# ----------------------------------------------------------------------------------------------
_WORKER_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from tools.compile_check import _main; _main(sys.argv[2:])"


def _worker_command(modules, kernel, targets, first_spec_only, env):
    modules = tuple(modules) if modules is not None else kernel_modules()
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; known: {list(TARGETS)}")
    wenv = dict(os.environ, TRITON_INTERPRET="0", **(env or {}))
    wenv.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the project's setting (and silences Triton 3.9's warning)
    cmd = [sys.executable, "-c", _WORKER_BOOT, str(_ROOT), "--worker", "--targets", *targets, "--modules", *modules]
    if kernel:
        cmd += ["--kernel", kernel]
    if first_spec_only:
        cmd += ["--first-spec-only"]
    return cmd, wenv


def list_variants(modules=None, kernel: str | None = None, targets=tuple(TARGETS), env: dict | None = None) -> dict:
    """What run_check would compile, without compiling: {"problems": [Result...], "counts": ...,
    "variants": [{"kernel", "module", "target", "config", "dtype", "specialisation", "specs"}]}.
    env as for run_check (GPT_TRITON_MAX_CONFIGS=1: what the budget mode compiles)."""
    cmd, wenv = _worker_command(modules, kernel, targets, False, env)
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=_ROOT, env=wenv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=err, text=True, bufsize=1)
    proc.err_file = err
    msg = _read_json(proc)
    tail = _stop(proc)
    if msg is None or "plan" not in msg:
        raise RuntimeError(f"compile_check: the worker did not start:\n{tail}")
    p = msg["plan"]
    variants = [{"kernel": lab[0], "module": lab[1], "target": job[1], "key": lab[2], "config": lab[3],
                 "dtype": lab[4], "specialisation": lab[5], "specs": lab[6]} for job, lab in zip(p["jobs"], p["labels"])]
    return {"problems": [Result(**r) for r in p["problems"]], "counts": p["counts"], "variants": variants}


def run_check(modules=None, kernel: str | None = None, targets=tuple(TARGETS), workers: int = 2,
              first_spec_only: bool = False, timeout: float | None = 300.0, on_result=None,
              env: dict | None = None) -> Report:
    """Compile every selected (variant, target) in `workers` processes.

    kernel: keep the specs whose module or spec name contains it. first_spec_only: each module's
    first spec only (a quick partial check: CI). timeout: seconds one compile may take before its
    worker is killed (and replaced) and the job reported as a failure. on_result(Result): called as
    results arrive. env: extra environment for the workers (e.g. a fresh TRITON_CACHE_DIR, or
    GPT_TRITON_MAX_CONFIGS to see what the budget mode compiles).
    """
    cmd, wenv = _worker_command(modules, kernel, targets, first_spec_only, env)

    def start():
        """(process, plan) of a fresh worker, or (None, stderr) if it did not come up."""
        err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker must never block on it
        proc = subprocess.Popen(cmd, cwd=_ROOT, env=wenv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, bufsize=1)
        proc.err_file = err
        msg = _read_json(proc)
        if msg is None or "plan" not in msg:
            return None, _stop(proc)
        return proc, msg["plan"]

    first, plan_ = start()
    if first is None:
        raise RuntimeError(f"compile_check: the compile worker did not start:\n{plan_}")
    report = Report(modules=dict(plan_["counts"]))
    report.results.extend(Result(**r) for r in plan_["problems"])
    jobs, labels = [tuple(j) for j in plan_["jobs"]], plan_["labels"]

    lock = threading.Lock()
    pending = list(range(len(jobs)))[::-1]
    results: dict[int, Result] = {}

    def record(i, res):
        with lock:
            results[i] = res
        if on_result:
            on_result(res)

    def failed(i, why):
        name, module, _, config, dtype, specialisation, specs = labels[i]
        return Result(name, config, jobs[i][1], module, dtype=dtype, specs=specs, specialisation=specialisation,
                      error=why)

    def drive(proc):
        while True:
            with lock:
                if not pending:
                    break
                i = pending.pop()
            if proc is None:  # the last worker died or was killed: start another
                proc, plan_or_err = start()
                if proc is None or plan_or_err["jobs"] != plan_["jobs"] or plan_or_err["labels"] != labels:
                    record(i, failed(i, f"compile worker did not restart: {str(plan_or_err)[-600:]}"))
                    if proc is not None:
                        _stop(proc)
                    return
            timed_out = threading.Event()

            def kill(p=proc, flag=timed_out):
                flag.set()
                p.kill()

            killer = threading.Timer(timeout, kill) if timeout else None
            try:
                if killer:
                    killer.start()
                proc.stdin.write(f"{i}\n")
                proc.stdin.flush()
                msg = _read_json(proc)
            except OSError:
                msg = None
            finally:
                if killer:
                    killer.cancel()
            if msg is not None and msg.get("job") == i:
                record(i, Result(**msg["result"]))
                continue
            err = _stop(proc)
            if timed_out.is_set():
                why = f"compile took longer than {timeout:g} s (killed); registers spilling by kilobytes?"
            else:
                why = f"compile worker died (exit {proc.returncode}): {err[-600:]}"
            record(i, failed(i, why))
            proc = None

        if proc is not None:
            _stop(proc)

    procs = [first] + [None] * (max(1, workers) - 1)  # the others start inside their threads, in parallel
    threads = [threading.Thread(target=drive, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(jobs)):  # left over when no worker could be restarted
        if i not in results:
            results[i] = failed(i, "not compiled: no compile worker left")
    report.results.extend(results[i] for i in range(len(jobs)))
    return report


def _read_json(proc):
    """Next protocol line from a worker, skipping anything that is not JSON; None at end of output."""
    while True:
        line = proc.stdout.readline()
        if not line:
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue


def _stop(proc) -> str:
    """Close a worker and return the tail of its stderr."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        proc.err_file.seek(0)
        text = proc.err_file.read()[-4000:]
        proc.err_file.close()
        return text
    except (AttributeError, OSError, ValueError):
        return ""


# ----------------------------------------------------------------------------------------------
# Table and JSON
# ----------------------------------------------------------------------------------------------
COLUMNS = ("kernel", "dtype", "config", "target", "regs", "spills", "smem", "blocks/SM", "warps/SM",
           "limit", "tensor cores", "cp.async", "ld.v4", "compile s", "status")
_NUMERIC = {4, 5, 6, 7, 8, 11, 12, 13}


def _fmt(v) -> str:
    return "-" if v is None or v == "" else str(v)


def rows(report: Report) -> list[list[str]]:
    out = []
    for r in report.results:
        async_copies = (r.ptx.get("cp_async", 0) + r.ptx.get("tma", 0)) if r.ptx else None
        out.append([r.kernel, r.dtype, r.config, r.target, _fmt(r.registers), _fmt(r.spills), _fmt(r.shared),
                    _fmt(r.blocks_per_sm), _fmt(r.warps_per_sm), r.limited_by, r.tensor_cores or "-",
                    _fmt(async_copies), _fmt(r.ptx.get("ld_global_v4") if r.ptx else None), _fmt(r.compile_s),
                    r.status])
    return out


def format_table(report: Report, markdown: bool = False) -> str:
    header, body = list(COLUMNS), rows(report)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    out = []
    for row in [header, *body]:
        cells = [c.rjust(w) if i in _NUMERIC else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def to_json(report: Report, **meta) -> dict:
    import triton

    return {
        "triton": triton.__version__,
        "targets": {k: asdict(v) for k, v in TARGETS.items()},
        "modules": report.modules,
        **meta,
        "results": [asdict(r) for r in report.results],
    }


def summarise(results) -> list[str]:
    """One line per (kernel, dtype, target): the range of registers, smem and residency over its
    configs; what the README's resource paragraph is written from. `results`: Result or dicts."""
    groups: dict = {}
    for r in results:
        r = r if isinstance(r, dict) else asdict(r)
        if r["status"] != "OK":
            continue
        groups.setdefault((r["module"], r["kernel"], r["dtype"], r["target"]), []).append(r)
    lines = []
    for (module, kernel, dtype, target), rs in sorted(groups.items()):
        def span(key):
            vals = sorted({x[key] for x in rs})
            return str(vals[0]) if len(vals) == 1 else f"{vals[0]}-{vals[-1]}"
        tc = sorted({x["tensor_cores"] for x in rs if x["tensor_cores"]}) or ["-"]
        lines.append(f"{kernel} {dtype} {target}: {len(rs)} variant(s), {span('registers')} regs, "
                     f"{span('shared')} B smem, {span('blocks_per_sm')} block(s) x {span('num_warps')} warps/SM "
                     f"({span('warps_per_sm')} warps, by {'/'.join(sorted({x['limited_by'] for x in rs}))}), "
                     f"tensor cores: {'/'.join(tc)}")
    return lines


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="compile_check worker (use scripts/compile_report.py)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--modules", nargs="+", default=None)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--first-spec-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.worker:
        ap.error("this entry point is the worker; run scripts/compile_report.py for the report")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile_check worker: TRITON_INTERPRET=1 would build interpreter kernels; unset it")
    _worker(args.modules or kernel_modules(), args.kernel, args.targets, args.first_spec_only)


if __name__ == "__main__":
    _main()
