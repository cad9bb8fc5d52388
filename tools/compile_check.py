"""Compile every kernel configuration for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter (TRITON_INTERPRET=1) checks what a kernel computes, not whether it fits a GPU: a
block size that needs more shared memory than an SM has, or so many live values that registers
spill to (slow, off-chip) local memory, only shows up when Triton compiles for a real target. The
compiler does not need a GPU for that, only for running the result: `triton.compile` lowers a
kernel through Triton IR -> TritonGPU IR -> LLVM IR -> PTX, and the `ptxas` shipped in Triton's wheel
turns the PTX into a cubin for any architecture we name. So this check compiles, for every
`CompileSpec` in every kernel module, every configuration its launcher can pick, for each target:

    triton.compile(ASTSource(fn=kernel, signature=spec.signature, constexprs=<config's constexprs>),
                   target=GPUTarget("cuda", 80 | 90, 32), options={num_warps, num_stages})

and reads what the kernel would use on the device:

* shared memory: the compiled kernel's `metadata.shared` (Triton's dynamic shared memory, where its
  pipelined loads, layout conversions and reductions live) plus any static shared memory the cubin
  declares. Must fit one block's limit: 166,912 bytes (163 KB) on sm_80, 232,448 (227 KB) on sm_90.
* registers and spills: `cuobjdump --dump-resource-usage` on the cubin (the cuobjdump bundled in
  Triton's wheel) prints REG (registers per thread), STACK (the per-thread stack frame, which is
  where ptxas puts spilled registers: `ptxas -v`'s "N bytes spill stores" land there) and LOCAL
  (other per-thread local memory). Triton kernels keep no arrays in local memory, so the column
  "spills" is STACK + LOCAL bytes per thread, the same thing Triton's own `n_spills` counts in
  words (the driver's local-memory size / 4); `CompiledKernel.n_regs`/`n_spills` exist only after
  the kernel is *loaded* on a GPU, which is why we read the cubin. Must be 0, and one block's
  registers (REG * 32 * num_warps) must fit an SM's 64K register file.

What a launch specialises on. Triton's launcher compiles each call for what it sees: every
pointer 16-byte aligned (PyTorch's allocator guarantees it), every int argument divisible by 16
marked so, and every int argument equal to 1 turned into the constant 1. Those decide whether loads
vectorise, and so the registers a kernel needs: the same kernel compiled without them can need
twice the registers and spill. So the check assumes aligned pointers, and a spec states the rest:
"i32:16" in a signature (Triton's own notation) for an int that is a multiple of 16 in the launches
the config stands for, and {"stride_xd": 1} in a config for an int that is 1 (a unit stride).

Why a subprocess. Whether `@triton.jit` builds a compilable `JITFunction` or an interpreter-only
`InterpretedFunction` is decided when each kernel is *defined*, from TRITON_INTERPRET. Wrapping an
InterpretedFunction's Python function (`.fn`, in Triton 3.6 and 3.9) in a fresh JITFunction works for
a lone kernel, but not for one that calls other `@triton.jit` helpers: those stay interpreter
objects that the code generator cannot inline. So the check runs in worker processes started with
TRITON_INTERPRET=0 (`kernels._common` only sets the variable when it is unset), where every kernel
module imports as it would on a GPU machine; that also keeps a compiler crash (LLVM aborts kill
the process) from taking the caller down. Workers pull jobs one at a time from the parent, so two
workers share the slow kernels evenly; default 2 workers (this project's CI machine has 2 cores).

Caching. `triton.compile` caches each compiled kernel under ~/.triton/cache (or TRITON_CACHE_DIR),
keyed by the kernel's source, its signature, constexprs, options, target and Triton version; a rerun
with unchanged kernels skips LLVM and ptxas entirely and costs only imports and cuobjdump calls.

A kernel module that does not exist, fails to import, or lists no COMPILE_SPECS is reported as a
failure row (kernel "<module>", status MISSING / IMPORT ERROR / NO SPECS), never as a crash.

Use it as `python scripts/compile_report.py` (a table; exits non-zero on any failure), or
`run_check()` from Python; `tests/test_compile.py` runs the whole matrix.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

KERNEL_MODULES = ("flash_attention", "layer_norm", "bias_gelu", "cross_entropy", "decode_attention")

# name -> (compute capability, max shared memory per block in bytes with the opt-in carve-out)
TARGETS = {
    "sm_80": (80, 166912),
    "sm_90": (90, 232448),
}
REGISTERS_PER_SM = 65536  # 64K 32-bit registers on both sm_80 and sm_90
MAX_REGISTERS_PER_THREAD = 255
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # config keys that are not constexprs

_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """One (spec, config, target) compile, or one module-level problem (config and target empty)."""

    kernel: str  # the spec's name, or the module name for a module-level problem
    config: str  # "BLOCK_N=64 BLOCK_D=64 w4 s2"
    target: str  # "sm_80" / "sm_90"
    module: str = ""
    registers: int | None = None
    spills: int | None = None  # bytes of local memory per thread (spill space); 0 = no spills
    shared: int | None = None  # bytes of shared memory per block (dynamic + static)
    status: str = "FAIL"  # OK, FAIL, MISSING, IMPORT ERROR, NO SPECS
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@dataclass
class Report:
    results: list = field(default_factory=list)
    modules: dict = field(default_factory=dict)  # module -> number of specs it contributed (None: problem)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failures


# ----------------------------------------------------------------------------------------------
# Worker side: runs with TRITON_INTERPRET=0, imports the kernel modules, compiles.
# ----------------------------------------------------------------------------------------------
def _config_label(config: dict) -> str:
    consts = " ".join(f"{k}={v}" for k, v in config.items() if k not in LAUNCH_OPTIONS)
    launch = f"w{config.get('num_warps', 4)} s{config.get('num_stages', 3)}"
    return f"{consts} {launch}".strip()


def _selected(module: str, spec_name: str | None, kernel_filter: str | None) -> bool:
    if not kernel_filter:
        return True
    return kernel_filter in module or (spec_name is not None and kernel_filter in spec_name)


def _plan(modules, kernel_filter, targets, first_config_only=False):
    """Import the kernel modules; return (module problems as Results, module spec counts, jobs).

    A job is (module, spec index, config index, target), the same list in every worker (the order is
    deterministic), so the parent can hand out indices into it.
    """
    problems, counts, jobs = [], {}, []
    for module in modules:
        name = f"kernels.{module}"
        if importlib.util.find_spec(name) is None:
            counts[module] = None
            if _selected(module, None, kernel_filter):
                problems.append(Result(module, "", "", module, status="MISSING",
                                       error=f"kernels/{module}.py does not exist"))
            continue
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  (any import failure is a finding to report)
            counts[module] = None
            if _selected(module, None, kernel_filter):
                problems.append(Result(module, "", "", module, status="IMPORT ERROR",
                                       error=f"{type(e).__name__}: {e}"))
            continue
        specs = getattr(mod, "COMPILE_SPECS", None)
        if not specs:
            counts[module] = None
            if _selected(module, None, kernel_filter):
                problems.append(Result(module, "", "", module, status="NO SPECS",
                                       error=f"{name} defines no COMPILE_SPECS"))
            continue
        counts[module] = len(specs)
        for i, spec in enumerate(specs):
            if not _selected(module, spec.name, kernel_filter):
                continue
            if not spec.configs:
                problems.append(Result(spec.name, "", "", module, error="the spec lists no configs"))
            for j in range(min(len(spec.configs), 1) if first_config_only else len(spec.configs)):
                for target in targets:
                    jobs.append((module, i, j, target))
    return problems, counts, jobs


def _jit_function(kernel):
    """The JITFunction inside whatever the spec holds (a JITFunction, an Autotuner/Heuristics
    wrapping one, or, when run in the interpreter by mistake, an InterpretedFunction)."""
    from triton.runtime.jit import JITFunction

    obj = kernel
    for _ in range(8):
        if isinstance(obj, JITFunction):
            return obj
        if type(obj).__name__ == "InterpretedFunction":
            return JITFunction(obj.fn)  # fine for a kernel that calls no other @triton.jit function
        if not hasattr(obj, "fn"):
            break
        obj = obj.fn
    raise TypeError(f"{kernel!r} is not a @triton.jit kernel")


def _cuobjdump() -> str | None:
    import triton

    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001  (older/newer Triton without this knob: fall through)
        pass
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes, kernel_name: str) -> dict:
    """{'REG': .., 'SHARED': .., 'LOCAL': .., 'STACK': ..} for `kernel_name` in a cubin."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither in Triton's wheel nor on PATH): cannot read registers")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    return parse_resource_usage(out, kernel_name)


def parse_resource_usage(text: str, kernel_name: str) -> dict:
    """Parse cuobjdump's `Function <name>:` block, e.g. `REG:40 STACK:0 SHARED:0 LOCAL:0 ...`."""
    blocks = re.findall(r"Function ([^\s:]+):\s*\n\s*(.*)", text)
    for name, line in blocks:
        if name == kernel_name:
            usage = {key: int(val) for key, val in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            missing = {"REG", "SHARED", "LOCAL"} - set(usage)
            if missing:
                raise RuntimeError(f"cuobjdump printed no {sorted(missing)} for {kernel_name}: {line!r}")
            return usage
    raise RuntimeError(f"cuobjdump printed no resource usage for {kernel_name}; got:\n{text}")


def compile_one(spec, config: dict, target_name: str, module: str = "") -> Result:
    """Compile one configuration of one spec for one target and check its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    res = Result(spec.name, _config_label(config), target_name, module)
    arch = TARGETS[target_name][0]
    try:
        fn = _jit_function(spec.kernel)
        constexprs = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
        options = {k: v for k, v in config.items() if k in LAUNCH_OPTIONS}
        signature, divisible = _checked_signature(fn, spec.signature, constexprs)
        target = GPUTarget("cuda", arch, 32)
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                        attrs=_divisibility_attrs(divisible, target))
        compiled = triton.compile(src, target=target, options=options)
        usage = resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    except Exception as e:  # noqa: BLE001  (a compile error is a result, not a crash)
        res.error = _short_error(e)
        return res

    res.registers, res.spills, res.shared, problems = judge(usage, compiled.metadata.shared,
                                                           compiled.metadata.num_warps, target_name)
    res.status = "FAIL" if problems else "OK"
    res.error = "; ".join(problems)
    return res


def judge(usage: dict, dynamic_shared: int, num_warps: int, target_name: str):
    """(registers, spill bytes, shared bytes, problems) from cuobjdump's numbers and Triton's
    dynamic shared memory; problems is empty when the kernel fits `target_name`."""
    shared_limit = TARGETS[target_name][1]
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


def _checked_signature(fn, signature: dict, constexprs: dict) -> tuple[dict, list]:
    """(signature in the kernel's argument order, indices of arguments divisible by 16), or a clear
    error if the spec, its config and the kernel disagree.

    Two things a launch on real tensors gets from Triton's launcher, which specialises on them, and
    which decide whether loads vectorise (and so the registers reported):
    * 16-byte alignment of every pointer argument (PyTorch's allocator gives it): assumed.
    * divisibility by 16 of an integer argument: declared in the spec by Triton's own notation
      "i32:16" (e.g. a row stride that is a multiple of the head dim), never assumed.
    And a config may pin an integer argument to 1 (e.g. {"stride_xd": 1}): the launcher compiles an
    int argument equal to 1 as the constant 1, which is what makes a unit-stride access contiguous.
    """
    names = list(fn.arg_names)
    missing = [n for n in names if n not in signature]
    extra = [n for n in signature if n not in names]
    if missing or extra:
        raise ValueError(f"signature does not match the kernel's arguments: missing {missing}, unknown {extra}")
    types, divisible = {}, []
    for i, n in enumerate(names):
        ty, _, div = str(signature[n]).partition(":")
        if div not in ("", "16") or (div and ty == "constexpr"):
            raise ValueError(f"signature of {n}: {signature[n]!r}; the only suffix understood is ':16'")
        types[n] = ty
        if div or ty.startswith("*"):
            divisible.append(i)
    const_args = [n for n in names if types[n] == "constexpr"]
    unset = [n for n in const_args if n not in constexprs]
    pinned = [n for n in constexprs if n in types and types[n] != "constexpr"]
    bad_pins = [n for n in pinned if not (types[n] in ("i32", "i64") and constexprs[n] == 1)]
    unknown = [n for n in constexprs if n not in types]
    if unset or bad_pins or unknown:
        raise ValueError(
            f"config does not match the signature: constexprs without a value {unset}, values for "
            f"non-constexpr arguments other than an int pinned to 1 {bad_pins}, unknown names {unknown}"
        )
    for n in pinned:
        types[n] = "constexpr"
    divisible = [i for i in divisible if types[names[i]] != "constexpr"]
    return types, divisible


def _divisibility_attrs(divisible: list, target) -> dict:
    """Triton's `tt.divisibility = 16` attribute for the given argument indices, in the format of the
    installed Triton version (the backend's own parser for its launcher's "D" specialisation)."""
    try:
        from triton.compiler.compiler import make_backend

        attr = make_backend(target).parse_attr("D")
    except Exception:  # noqa: BLE001
        attr = [["tt.divisibility", 16]]
    return {(i,): attr for i in divisible}


def _short_error(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[:6])[:800]


def _worker(modules, kernel_filter, targets, first_config_only=False) -> None:
    """Protocol on stdin/stdout, one JSON object per line. Out: {"plan": ...} first; then for each job
    index read from stdin, {"job": i, "result": {...}}. Stdin closing ends the worker."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a kernel module prints must not corrupt the protocol
    problems, counts, jobs = _plan(modules, kernel_filter, targets, first_config_only)
    specs = {m: importlib.import_module(f"kernels.{m}").COMPILE_SPECS for m, n in counts.items() if n}
    labels = [(specs[m][s].name, _config_label(specs[m][s].configs[c])) for m, s, c, _ in jobs]
    plan = {"problems": [asdict(p) for p in problems], "counts": counts, "jobs": jobs, "labels": labels}
    print(json.dumps({"plan": plan}), file=out, flush=True)
    for line in sys.stdin:
        i = int(line)
        module, s, c, target = jobs[i]
        spec = specs[module][s]
        try:
            res = compile_one(spec, spec.configs[c], target, module)
        except Exception:  # noqa: BLE001
            res = Result(spec.name, _config_label(spec.configs[c]), target, module, error=traceback.format_exc(limit=3))
        print(json.dumps({"job": i, "result": asdict(res)}), file=out, flush=True)


# ----------------------------------------------------------------------------------------------
# Parent side: start workers with TRITON_INTERPRET=0, hand out jobs, collect results.
# ----------------------------------------------------------------------------------------------
# The worker imports `kernels.<module>` without running kernels/__init__.py, which imports every
# kernel module: one missing or broken file must be reported on its own, not hide the others.
_WORKER_BOOT = (
    "import sys, types; root = sys.argv[1]; sys.path.insert(0, root); "
    "pkg = types.ModuleType('kernels'); pkg.__path__ = [root + '/kernels']; sys.modules['kernels'] = pkg; "
    "from kernels.compile_check import _main; _main(sys.argv[2:])"
)

def run_check(modules=KERNEL_MODULES, kernel: str | None = None, targets=tuple(TARGETS), workers: int = 2,
              first_config_only: bool = False, timeout: float | None = 300.0, on_result=None) -> Report:
    """Compile every selected (spec, config, target) in `workers` processes.

    kernel: keep the specs whose module or spec name contains it. first_config_only: each spec's
    first config only (the launcher's default; a quicker, partial check). timeout: seconds one
    compile may take before its worker is killed (and replaced) and the job reported as a failure:
    a kernel whose registers spill by kilobytes can keep ptxas busy for many minutes.
    on_result(Result): called as results arrive (progress output).
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; known: {list(TARGETS)}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the project's setting (and silences Triton 3.9's warning)
    cmd = [sys.executable, "-c", _WORKER_BOOT, str(_ROOT), "--worker", "--targets", *targets, "--modules", *modules]
    if kernel:
        cmd += ["--kernel", kernel]
    if first_config_only:
        cmd += ["--first-config-only"]

    def start():
        """(process, plan) of a fresh worker, or (None, stderr) if it did not come up."""
        err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker must never block on it
        proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, bufsize=1)
        proc.err_file = err
        msg = _read_json(proc)
        if msg is None or "plan" not in msg:
            return None, _stop(proc)
        return proc, msg["plan"]

    first, plan = start()
    if first is None:
        raise RuntimeError(f"compile_check: the compile worker did not start:\n{plan}")
    report = Report(modules=dict(plan["counts"]))
    report.results.extend(Result(**r) for r in plan["problems"])
    jobs, labels = [tuple(j) for j in plan["jobs"]], plan["labels"]

    lock = threading.Lock()
    pending = list(range(len(jobs)))[::-1]
    results: dict[int, Result] = {}

    def record(i, res):
        with lock:
            results[i] = res
        if on_result:
            on_result(res)

    def failed(i, why):
        module, _, _, target = jobs[i]
        return Result(labels[i][0], labels[i][1], target, module, error=why)

    def drive(proc):
        while True:
            with lock:
                if not pending:
                    break
                i = pending.pop()
            if proc is None:  # the last worker died or was killed: start another
                proc, plan_or_err = start()
                if proc is None or plan_or_err["jobs"] != plan["jobs"]:
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
# Table
# ----------------------------------------------------------------------------------------------
COLUMNS = ("kernel", "config", "target", "registers", "spills", "shared", "status")


def rows(report: Report) -> list[list[str]]:
    def fmt(v):
        return "-" if v is None else str(v)

    return [[r.kernel, r.config, r.target, fmt(r.registers), fmt(r.spills), fmt(r.shared), r.status]
            for r in report.results]


def format_table(report: Report, markdown: bool = False) -> str:
    header, body = list(COLUMNS), rows(report)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = {3, 4, 5}
    out = []
    for row in [header, *body]:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="compile_check worker (use scripts/compile_report.py)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--modules", nargs="+", default=list(KERNEL_MODULES))
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--first-config-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.worker:
        ap.error("this entry point is the worker; run scripts/compile_report.py for the report")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile_check worker: TRITON_INTERPRET=1 would build interpreter kernels; unset it")
    _worker(args.modules, args.kernel, args.targets, args.first_config_only)


if __name__ == "__main__":
    _main()
