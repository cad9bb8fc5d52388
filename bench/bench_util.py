"""What every benchmark shares: the peak-FLOP/s table, a synchronizing timer, FLOP and byte counts,
and `kernel_bench`, which times one implementation of one op and records what it buys.

How a number is made (and why):
  * CUDA work is asynchronous: a timer that does not wait for the GPU measures the launch, not the
    kernel. Every timed call here ends in a synchronization (or is bracketed by CUDA events).
  * The first call compiles (`torch.compile`) or autotunes (Triton): it is run, untimed, first.
  * A kernel bench times with CUDA events, one event pair per call, after wiping L2 (a 256 MB
    write), and takes the median, as `triton.testing.do_bench` does; otherwise an op whose inputs
    fit in H100's 50 MB L2 would report a bandwidth HBM cannot deliver.
  * Ratios ("vs_sdpa", "vs_eager") are against baselines timed in the same pytest session, on the
    same inputs: medians are kept in a session-wide dict, and a baseline missing from it is timed
    on the spot.
  * Throughput counts only the work that must be done: FLOPs of the math (causal attention skips
    the masked half), bytes of the fewest tensors that must move through HBM. An implementation that
    moves more is charged for it as a lower GB/s.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from typing import Callable, Sequence

import pytest
import torch

# ----------------------------------------------------------------------------------------------
# The peak table (the one place MFU takes its denominator from)
# ----------------------------------------------------------------------------------------------
# Dense bf16 tensor-core TFLOP/s from the vendors' datasheets (without 2:4 sparsity). Patterns are
# matched against torch.cuda.get_device_name() in order; the first match wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),  # SXM5; its device name reads "NVIDIA H100 80GB HBM3"
    (r"H200", 989.0),  # GH200 too: the same Hopper tensor cores
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
]


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for a device name, or None when the table does not know it (MFU is then not
    reported rather than guessed)."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


# ----------------------------------------------------------------------------------------------
# Work counts
# ----------------------------------------------------------------------------------------------
def attention_flops(B: int, H: int, Tq: int, Tk: int, D: int, causal: bool, pass_: str) -> float:
    """FLOPs of softmax(q k^T) v as FlashAttention counts them.

    Forward: two matmuls of 2*Tq*Tk*D each per head, halved when causal (the masked triangle is
    skipped). Backward: 2.5x the forward (five matmuls against two: dV, dP, dS->dQ, dS->dK, plus the
    recomputed P = q k^T).
    """
    fwd = 2 * 2 * B * H * Tq * Tk * D
    if causal:
        fwd /= 2
    return {"fwd": fwd, "fwd+bwd": 3.5 * fwd}[pass_]


def gpt_train_flops(model, B: int, T: int) -> float:
    """Model FLOPs of one training step (forward + backward) of a GPTModel on B x T tokens.

    6 N per token for the matmul weights (2 forward, 4 backward: N excludes the embedding tables,
    which are lookups, not matmuls, unless the token embedding is tied to the output head, which is
    one; LayerNorm and bias parameters are counted too, a 0.1% overestimate not worth a special
    case), plus the attention scores and their use: causal forward 2*B*H*T^2*D per layer, backward
    twice that (model FLOPs, as MFU counts them: a recomputation is not useful work).
    """
    cfg = model.cfg
    n_matmul = model.num_params() - model.pos_emb.weight.numel()
    if not cfg.tie_weights:
        n_matmul -= model.tok_emb.weight.numel()
    attn = 3 * cfg.n_layers * attention_flops(B, cfg.n_heads, T, T, cfg.head_dim, causal=True, pass_="fwd")
    return 6 * n_matmul * B * T + attn


def sig(x: float, digits: int = 4) -> float:
    """x rounded to a few significant digits (a timing is not known to more)."""
    return float(f"{x:.{digits}g}")


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda_ms(fn: Callable[[], object], quick: bool = False, budget_ms: float = 200.0,
                 device: torch.device | None = None) -> list[float]:
    """Per-call times (ms) of fn on `device` (default: the current CUDA device): CUDA events around
    each call, L2 wiped before each. The caller has already run fn once (compilation, autotuning)."""
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        return _time_cuda_ms(fn, quick, budget_ms)


def _time_cuda_ms(fn, quick, budget_ms):
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # on the device selected above
    # Estimate one call, then choose how many to time so that the whole thing takes ~budget_ms.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    n_warmup, n_rep = (1, 2) if quick else (max(1, int(25 / est)), min(max(int(budget_ms / est), 10), 1000))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    del flush
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def median_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> float:
    """Median milliseconds of fn: CUDA events on a GPU; elsewhere the wall clock (the kernel benches
    skip off-GPU, but the bench code itself can then be exercised on a CPU)."""
    if device.type == "cuda":
        return statistics.median(time_cuda_ms(fn, quick=quick, device=device))
    return 1e3 * time_call(fn, device, rounds=1 if quick else 5)


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak CUDA memory of one call: max_memory_allocated after a reset, in MiB; also the part of it
    above what was already allocated (the inputs), i.e. what the op itself needs."""
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mem_mb": round(peak / 2**20, 1), "peak_extra_mb": round((peak - before) / 2**20, 1)}


def run_pedantic(benchmark, fn: Callable[[], object], device: torch.device, rounds: int, warmup_rounds: int = 1) -> float:
    """Let pytest-benchmark time fn (which synchronizes); return the median call in seconds.

    With --benchmark-disable, pytest-benchmark runs fn once and keeps no statistics: that one call is
    timed here instead (it then includes any warm-up, and the caller marks the numbers "quick")."""

    def synced():
        out = fn()
        sync(device)
        return out

    if benchmark.disabled:
        t0 = time.perf_counter()
        benchmark.pedantic(synced, rounds=1, warmup_rounds=0)
        return time.perf_counter() - t0
    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return benchmark.stats.stats.median


# ----------------------------------------------------------------------------------------------
# The machine's ceilings, measured (what a kernel's figures are read against, besides its baselines)
# ----------------------------------------------------------------------------------------------
def copy_bandwidth_gbs(device: torch.device, mib: int = 1024) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and the bytes written (2 x
    the buffer), as the row-wise benches count theirs. The buffer is far larger than L2."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    ms = median_ms(lambda: dst.copy_(src), device)
    return sig(2 * src.numel() / (ms * 1e-3) / 1e9)


def matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """TFLOP/s of one (n, n) @ (n, n) matmul (2 n^3 FLOPs) in dtype: what the tensor cores deliver
    here, through cuBLAS."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # cuBLAS picks its algorithm
    ms = median_ms(lambda: a @ b, device)
    return sig(2 * n**3 / (ms * 1e-3) / 1e12)


# ----------------------------------------------------------------------------------------------
# Kernel benches
# ----------------------------------------------------------------------------------------------
def make_step(fn: Callable, inputs: Sequence, pass_: str, grad_argnums: Sequence[int]) -> Callable[[], object]:
    """A zero-argument call of fn on inputs: the forward alone (no autograd graph, as in inference),
    or forward + backward to the inputs listed in grad_argnums (torch.autograd.grad, so that no
    gradient accumulates into .grad between calls and no extra add is timed)."""
    if pass_ == "fwd":
        args = [t.detach() if isinstance(t, torch.Tensor) else t for t in inputs]

        def fwd():
            with torch.no_grad():
                return fn(*args)

        return fwd
    if pass_ != "fwd+bwd":
        raise ValueError(f"unknown pass {pass_!r}; use 'fwd' or 'fwd+bwd'")
    args = [
        t.detach().requires_grad_(i in grad_argnums) if isinstance(t, torch.Tensor) else t
        for i, t in enumerate(inputs)
    ]
    wrt = [args[i] for i in grad_argnums]
    out = fn(*args)
    grad_out = torch.randn_like(out) if out.dim() else torch.ones_like(out)  # (a scalar loss: d/d loss = 1)
    del out

    def fwd_bwd():
        out = fn(*args)
        return torch.autograd.grad(out, wrt, grad_out)

    return fwd_bwd


class Compiled:
    """torch.compile(fn), compiled on first call after `fresh()` from a clean slate. kernel_bench
    calls fresh() at the start of every test: each size and pass is its own test, and sharing one
    compiled function across them would hit dynamo's recompile limit (8), after which it silently
    runs eager."""

    def __init__(self, fn: Callable):
        self.fn, self.compiled = fn, None

    def fresh(self) -> None:
        self.compiled = None

    def __call__(self, *args):
        if self.compiled is None:
            torch._dynamo.reset()
            self.compiled = torch.compile(self.fn, dynamic=False)
        return self.compiled(*args)


def triton_kernel(name: str, module: str | None = None) -> Callable:
    """kernels.<module>.<name> (module defaults to name), imported when first called (so a missing
    kernel skips its rows only)."""
    module = module or name

    def call(*args, **kwargs):
        import importlib

        try:
            mod = importlib.import_module(f"kernels.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"kernels.{module}":
                raise
            pytest.skip(f"kernels/{module}.py is not there yet")
        return getattr(mod, name)(*args, **kwargs)

    return call


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def kernel_bench(
    benchmark,
    timings: dict,
    *,
    kernel: str,
    pass_: str,
    impls: dict[str, Callable],
    impl: str,
    baselines: Sequence[str],
    inputs: Sequence,
    grad_argnums: Sequence[int],
    x_label: str,
    size: int,
    metric: str,
    amount: float,
    info: dict | None = None,
) -> None:
    """Time impls[impl] on inputs (pass_ "fwd" or "fwd+bwd") and fill benchmark.extra_info.

    metric is "TFLOP/s" or "GB/s" and amount the FLOPs or bytes of one call. The ratios to each of
    `baselines` are median(baseline) / median(impl) on the same inputs in this session: > 1 means
    impl is faster. pytest-benchmark itself times the synchronized call as well (its own table);
    extra_info holds the CUDA-event numbers, which are free of launch and sync overhead.
    """
    device = inputs[0].device
    quick = benchmark.disabled
    for f in impls.values():
        if isinstance(f, Compiled):
            f.fresh()
    benchmark.group = f"{kernel} {pass_} {x_label}={size}"

    def measure(name: str) -> float | None:
        key = (kernel, pass_, x_label, size, name, quick)
        if key not in timings:
            try:
                step = make_step(impls[name], inputs, pass_, grad_argnums)
                step()  # compile / autotune, untimed
                timings[key] = median_ms(step, device, quick=quick)
            except RuntimeError as err:
                if not _is_oom(err):
                    raise
                timings[key] = None  # too big for this GPU: the ratio is left out, not invented
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return timings[key]

    try:
        step = make_step(impls[impl], inputs, pass_, grad_argnums)
        step()  # compile / autotune, untimed
        mem = peak_memory(step, device)
    except RuntimeError as err:
        if _is_oom(err):
            pytest.skip(f"{impl} runs out of GPU memory at {x_label}={size} ({pass_})")
        raise
    ms = measure(impl)
    if ms is None:  # it fit once above, but not alongside the timer's L2-wiping buffer
        pytest.skip(f"{impl} runs out of GPU memory at {x_label}={size} ({pass_}) while timed")
    scale = 1e12 if metric == "TFLOP/s" else 1e9
    extra = {
        "kernel": kernel,
        "pass": pass_,
        "impl": impl,
        "x_label": x_label,
        "size": size,
        "metric": metric,
        "value": sig(amount / (ms * 1e-3) / scale),
        "median_ms": sig(ms),
        "dtype": str(inputs[0].dtype).replace("torch.", ""),
        "device": device_name(device),
        "quick": quick,
        **(info or {}),
        **mem,
    }
    for base in baselines:
        base_ms = measure(base)
        if base_ms is not None:
            extra[f"vs_{base}"] = sig(base_ms / ms)
    benchmark.extra_info.update(extra)
    run_pedantic(benchmark, step, device, rounds=50, warmup_rounds=5)


# The end-to-end benches time the PyTorch path on a CPU too, but not the kernels: off-GPU they run in
# Triton's interpreter.
FUSED_NEEDS_CUDA = "no CUDA device: the fused path would run the kernels in Triton's interpreter, no speed path"


def skip_without_cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip(
            "no CUDA device: the kernel benches need a GPU. Off-GPU the Triton kernels run in Triton's "
            "interpreter, which checks correctness and is no speed path (its timings would mean nothing)"
        )
    return torch.device("cuda")


def time_call(fn: Callable[[], object], device: torch.device, rounds: int, warmup_rounds: int = 0, benchmark=None) -> float:
    """Median seconds of a synchronized call: timed by pytest-benchmark when a fixture is given (see
    run_pedantic), else here (a baseline measured for a ratio, outside its own test)."""
    if benchmark is not None:
        return run_pedantic(benchmark, fn, device, rounds=rounds, warmup_rounds=warmup_rounds)
    for _ in range(warmup_rounds):
        fn()
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(ours, theirs, pairs: int, device, benchmark, between=None) -> tuple[float, float]:
    """Median seconds of ours() and theirs(), run alternately `pairs` times (and between(), untimed,
    after each of theirs). pytest-benchmark times ours (its table); theirs runs as its setup, so each
    round is one pair."""
    times = {"ours": [], "theirs": []}

    def timed(name, fn):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times[name].append(time.perf_counter() - t0)

    def setup():
        timed("theirs", theirs)
        if between is not None:
            between()

    benchmark.pedantic(lambda: timed("ours", ours), setup=setup, rounds=pairs, warmup_rounds=0, iterations=1)
    return statistics.median(times["ours"]), statistics.median(times["theirs"])


def load_avg() -> float | None:
    """The 1-minute load average, where the system has one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
