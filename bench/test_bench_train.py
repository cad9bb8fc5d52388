"""Training throughput of gpt2-124M: one optimizer step (forward, loss, backward, AdamW) per call.

Implementations: the PyTorch path (SDPA, F.layer_norm, ... : the baseline), the same model on our
Triton kernels (`fused=True`), and `torch.compile` of the PyTorch path. On a GPU: bf16 autocast,
8 sequences of 1024 tokens. On a CPU: fp32 and a short sequence, PyTorch only (the kernels would
run in Triton's interpreter, and compiling with inductor on a CPU takes minutes).

extra_info: tokens/s, MFU (model FLOPs per second over the device's dense bf16 peak, from the one
table in bench_util.PEAK_BF16_TFLOPS; left out where the device is not in it), peak memory, and the
speedup over the PyTorch path measured in this session.

And on a CPU only, `test_fused_cpu_step_vs_torch`: what `python scripts/train.py --fused` costs there,
the tiny preset's step on the kernels in Triton's interpreter against the same model's PyTorch step
(batch 8 x 128, fp32), in interleaved pairs: `fused_over_torch` is how many times slower it is.
"""

import contextlib

import pytest
import torch

from bench_util import (FUSED_NEEDS_CUDA, device_name, gpt_train_flops, interleaved, load_avg, peak_bf16_tflops,
                        peak_memory, sig, sync, time_call)
from model import GPTConfig, GPTModel

PRESET = "gpt2-124M"
IMPLS = ["torch", "fused", "compile"]


def shape(device: torch.device, quick: bool) -> tuple[int, int]:
    """(batch, seq_len): GPT-2's full context on a GPU; on a CPU a size one step of which takes
    seconds. With --benchmark-disable (one untimed run, to check the bench works) smaller still."""
    if device.type == "cuda":
        return (2, 256) if quick else (8, 1024)
    return (1, 32) if quick else (1, 128)


def measure_train(impl: str, device: torch.device, quick: bool, benchmark=None) -> dict:
    B, T = shape(device, quick)
    cfg = GPTConfig.from_preset(PRESET)
    with torch.device(device):
        model = GPTModel(cfg, fused=impl == "fused")
    cuda = device.type == "cuda"
    # fused AdamW: one pass over the parameters (on a CPU ~10x faster than the per-op default).
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def loss_fn(x, y):
        return model(x, targets=y)  # fused: the LM loss through linear_cross_entropy, no (B*T, V) logits stored

    if impl == "compile":
        torch._dynamo.reset()
        loss_fn = torch.compile(loss_fn)
    x, y = (torch.randint(0, cfg.vocab_size, (B, T), device=device) for _ in range(2))

    def step():
        with amp():
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if not quick:
        step()  # compile, autotune, allocate the optimizer's state: untimed
        sync(device)
    mem = peak_memory(step, device)
    rounds = (10, 2) if cuda else (3, 0)
    secs = time_call(step, device, rounds=rounds[0], warmup_rounds=rounds[1], benchmark=benchmark)
    flops = gpt_train_flops(model, B, T)
    info = {
        "bench": "train",
        "impl": impl,
        "model": PRESET,
        "batch": B,
        "seq_len": T,
        "dtype": "bf16 autocast" if cuda else "fp32",
        "device": device_name(device),
        "quick": quick,
        "step_ms": sig(secs * 1e3),
        "tokens_per_s": sig(B * T / secs),
        "model_tflops": sig(flops / secs / 1e12),
        **mem,
    }
    peak = peak_bf16_tflops(device_name(device)) if cuda else None
    if peak is not None:
        info["mfu"] = sig(flops / secs / (peak * 1e12))
        info["peak_bf16_tflops"] = peak
    return info


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, device, timings, impl):
    if impl == "fused" and device.type != "cuda":
        pytest.skip(FUSED_NEEDS_CUDA)
    if impl == "compile" and device.type != "cuda":
        pytest.skip("no CUDA device: torch.compile on a CPU spends minutes building C++; the CPU bench keeps to eager")
    quick = benchmark.disabled
    benchmark.group = f"train {PRESET}"
    info = measure_train(impl, device, quick, benchmark)
    timings[("train", impl, device.type, quick)] = info["step_ms"]
    if impl != "torch":
        key = ("train", "torch", device.type, quick)
        if key not in timings:  # the baseline did not run yet in this session: measure it now
            timings[key] = measure_train("torch", device, quick)["step_ms"]
        info["vs_torch"] = sig(timings[key] / info["step_ms"])
    benchmark.extra_info.update(info)


def test_fused_cpu_step_vs_torch(benchmark, device):
    if device.type == "cuda":
        pytest.skip("on a GPU the kernels are compiled: test_train_step compares the fused step there")
    quick = benchmark.disabled
    B, T = (1, 16) if quick else (8, 128)
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny")
    model = GPTModel(cfg)  # one model, one optimizer: the two paths differ only in their ops
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    x, y = (torch.randint(0, cfg.vocab_size, (B, T)) for _ in range(2))

    def step(fused: bool):
        model.use_fused_kernels(fused)
        model(x, targets=y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if not quick:
        step(True), step(False)  # first calls: the kernels' first launches, allocation
    pairs = 1 if quick else 4
    s_fused, s_torch = interleaved(lambda: step(True), lambda: step(False), pairs, device, benchmark)
    benchmark.group = "fused on a CPU (Triton's interpreter) vs PyTorch"
    benchmark.extra_info.update({
        "bench": "fused_cpu_vs_torch", "impl": "fused (interpreted)", "model": "tiny", "batch": B, "seq_len": T,
        "dtype": "fp32", "quick": quick, "pairs": pairs, "step_ms": sig(s_fused * 1e3),
        "torch_step_ms": sig(s_torch * 1e3), "fused_over_torch": sig(s_fused / s_torch),
        "tokens_per_s": sig(B * T / s_fused), "device": device_name(device), "threads": torch.get_num_threads(),
        "load_avg": load_avg(),
    })
