"""Generation throughput of gpt2-124M, greedy: no cache, the KV cache, and (on CUDA) the KV cache with
each decode step replayed as a CUDA graph; PyTorch vs fused.

Without the cache every new token re-runs the model on the whole prefix (O(T^2) work for T
tokens); with it the prompt is run once and each step runs one token against the cached keys and
values (the fused path then uses the flash-decoding kernel). tokens/s counts new tokens of the
whole batch over the whole call (prefill included).

On a GPU: bf16 weights, a 64-token prompt and 512 new tokens, batch 1 and 8. On a CPU: fp32,
batch 1, an 8-token prompt and 200 new tokens, PyTorch only. The cache's speedup over no cache is
measured in the same session and reported as extra_info["vs_no_cache"], the CUDA graph's over the plain
cached loop as extra_info["vs_kv_cache"] (issue 4's H100 target: 3,000 tokens/s at batch 1, bf16,
with CUDA graphs). On a 2-core CPU the
no-cache run dominates the suite: 200 full forward passes over a growing prefix take minutes.
"""

import pytest
import torch

from bench_util import FUSED_NEEDS_CUDA, device_name, peak_memory, sig, time_call
from model import GPTConfig, GPTModel
from model.generate import generate

PRESET = "gpt2-124M"
BATCHES = [1, 8] if torch.cuda.is_available() else [1]


def shape(device: torch.device, quick: bool) -> tuple[int, int]:
    """(prompt tokens, new tokens); smaller with --benchmark-disable (one untimed run)."""
    if device.type == "cuda":
        return (8, 16) if quick else (64, 512)
    return (4, 8) if quick else (8, 200)


@pytest.fixture(scope="module")
def gpt2(device):
    """One gpt2-124M for every generation bench (weights do not change speed); the tests switch it
    between the PyTorch path and the kernels."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = GPTModel(GPTConfig.from_preset(PRESET))
    return model.to(dtype).eval()


DECODES = {  # name -> (use_cache, cuda_graph)
    "no_cache": (False, False),
    "kv_cache": (True, False),
    "cuda_graph": (True, True),
}


def measure_generate(model, impl, decode, batch, device, quick, benchmark=None) -> dict:
    use_cache, cuda_graph = DECODES[decode]
    model.use_fused_kernels(impl == "fused")
    n_prompt, n_new = shape(device, quick)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, n_prompt), device=device)

    def run():
        return generate(model, prompt, max_new_tokens=n_new, temperature=0.0, use_cache=use_cache,
                        cuda_graph=cuda_graph)

    out = run() if device.type == "cuda" and not quick else None  # first call: autotune, allocator
    if out is not None and out.shape != (batch, n_prompt + n_new):
        raise AssertionError(f"generate returned {tuple(out.shape)}, expected {(batch, n_prompt + n_new)}")
    mem = peak_memory(run, device) if device.type == "cuda" else {}
    cpu_rounds = 1 if not use_cache else 2
    rounds, warmup = (3, 0) if device.type == "cuda" else (cpu_rounds, 0)  # (warmed up above)
    secs = time_call(run, device, rounds=rounds, warmup_rounds=warmup, benchmark=benchmark)
    return {
        "bench": "generate",
        "impl": impl,
        "kv_cache": use_cache,
        "cuda_graph": cuda_graph,
        "model": PRESET,
        "batch": batch,
        "prompt_tokens": n_prompt,
        "new_tokens": n_new,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": device_name(device),
        "quick": quick,
        "seconds": sig(secs),
        "tokens_per_s": sig(batch * n_new / secs),
        **mem,
    }


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("decode", list(DECODES))
@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_generate(benchmark, gpt2, device, timings, impl, decode, batch):
    if impl == "fused" and device.type != "cuda":
        pytest.skip(FUSED_NEEDS_CUDA)
    if decode == "cuda_graph" and device.type != "cuda":
        pytest.skip("no CUDA device: CUDA graphs need one")
    quick = benchmark.disabled
    benchmark.group = f"generate {PRESET} B={batch}"
    info = measure_generate(gpt2, impl, decode, batch, device, quick, benchmark)
    timings[("generate", impl, decode, batch, device.type, quick)] = info["seconds"]

    def baseline(b_impl, b_decode):
        key = ("generate", b_impl, b_decode, batch, device.type, quick)
        if key not in timings:  # not run yet in this session: measure it now
            timings[key] = measure_generate(gpt2, b_impl, b_decode, batch, device, quick)["seconds"]
        return sig(timings[key] / info["seconds"])

    if decode != "no_cache":
        info["vs_no_cache"] = baseline(impl, "no_cache")
    if decode == "cuda_graph":
        info["vs_kv_cache"] = baseline(impl, "kv_cache")
    if impl == "fused":
        info["vs_torch"] = baseline("torch", decode)
    benchmark.extra_info.update(info)
