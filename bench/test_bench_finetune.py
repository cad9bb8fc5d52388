"""Fine-tuning throughput: one optimizer step of each fine-tuning job, on both paths.

- classify: chapter 6's step: the 2-class head on the pooled last real token, the book's
  `--trainable last-block` (the other weights frozen), batches of SMS-length texts;
- instruct: chapter 7's step: the LM loss of `model(x, targets=y)` over every weight; on the fused
  path the loss runs through linear_cross_entropy and never stores the (B*T, 50,257) logits;
- instruct-lora: the same with rank-16 LoRA adapters (appendix E) on every Linear, the head's too.

Implementations: the PyTorch path (the baseline) and the Triton kernels (`fused`, CUDA only: on a
CPU the kernels run in Triton's interpreter). On a GPU: gpt2-124M, bf16 autocast, 8 sequences of
120 (classify) / 256 (instruct) tokens. On a CPU: the tiny preset, fp32, shorter sequences.

extra_info: tokens/s, step time, peak memory, and the speedup over the PyTorch path measured in
this session.
"""

import contextlib

import pytest
import torch

from bench_util import FUSED_NEEDS_CUDA, device_name, peak_memory, sig, sync, time_call
from model import GPTConfig, GPTModel
from model.classifier import pool, set_trainable, to_classifier
from model.lora import apply_lora

JOBS = ["classify", "instruct", "instruct-lora"]
IMPLS = ["torch", "fused"]


def shape(job: str, device: torch.device, quick: bool) -> tuple[str, int, int]:
    """(preset, batch, seq_len)."""
    T = 120 if job == "classify" else 256  # the book's longest SMS; a typical Alpaca entry
    if device.type == "cuda":
        return "gpt2-124M", (2 if quick else 8), (32 if quick else T)
    return "tiny", (2 if quick else 8), (16 if quick else T // 4)


def build(job: str, impl: str, preset: str, device: torch.device):
    with torch.device(device):
        model = GPTModel(GPTConfig.from_preset(preset), fused=impl == "fused")
        if job == "classify":
            set_trainable(to_classifier(model, 2), "last-block")
        elif job == "instruct-lora":
            apply_lora(model, rank=16, alpha=16)
    return model


def measure(job: str, impl: str, device: torch.device, quick: bool, benchmark=None) -> dict:
    preset, B, T = shape(job, device, quick)
    model = build(job, impl, preset, device)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.1, fused=True)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    x = torch.randint(0, 50257, (B, T), device=device)
    if job == "classify":
        lengths = torch.randint(T // 2, T + 1, (B,), device=device)
        labels = torch.randint(0, 2, (B,), device=device)

        def loss_fn():
            return model.ops.cross_entropy(pool(model(x), lengths, "last-real"), labels)
    else:
        y = torch.randint(0, 50257, (B, T), device=device)
        y[:, : T // 3] = -100  # a masked prompt

        def loss_fn():
            return model(x, targets=y)

    def step():
        with amp():
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if not quick:
        step()  # autotune, allocate the optimizer's state: untimed
        sync(device)
    mem = peak_memory(step, device)
    rounds = (10, 2) if cuda else (3, 0)
    secs = time_call(step, device, rounds=rounds[0], warmup_rounds=rounds[1], benchmark=benchmark)
    return {
        "bench": "finetune", "job": job, "impl": impl, "model": preset, "batch": B, "seq_len": T,
        "dtype": "bf16 autocast" if cuda else "fp32", "device": device_name(device), "quick": quick,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_ms": sig(secs * 1e3), "tokens_per_s": sig(B * T / secs), **mem,
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("job", JOBS)
def test_finetune_step(benchmark, device, timings, job, impl):
    if impl == "fused" and device.type != "cuda":
        pytest.skip(FUSED_NEEDS_CUDA)
    quick = benchmark.disabled
    benchmark.group = f"finetune {job}"
    info = measure(job, impl, device, quick, benchmark)
    timings[("finetune", job, impl, device.type, quick)] = info["step_ms"]
    if impl != "torch":
        key = ("finetune", job, "torch", device.type, quick)
        if key not in timings:  # the baseline did not run yet in this session: measure it now
            timings[key] = measure(job, "torch", device, quick)["step_ms"]
        info["vs_torch"] = sig(timings[key] / info["step_ms"])
    benchmark.extra_info.update(info)
