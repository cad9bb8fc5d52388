"""Against Hugging Face: our PyTorch path vs transformers' `GPT2LMHeadModel` on the same weights, and
batch-1 decode against the memory-bandwidth bound. Skips without `transformers` (an optional
baseline: `pip install transformers`, or the package's `[hf]` extra).

The model: gpt2-124M's shape as OpenAI's checkpoint has it (tied head, qkv bias), random weights
saved by us and loaded by `GPT2LMHeadModel.from_pretrained`, so that both models hold the very same
numbers (greedy decoding then picks the same tokens, which the bench checks: the two did the same work).

  * training step: B=2, T=256, forward + loss + backward + fused AdamW (fp32 on a CPU, bf16
    autocast on a GPU);
  * decode: batch 1, greedy, with the KV cache, a 16-token prompt and 64 new tokens; our `generate`
    against HF's `generate`. tokens/s counts the new tokens over the whole call (prefill included).

The two are timed in interleaved pairs (ours, HF, ours, HF, ...; 7 pairs) and compared by their
medians: on a shared or throttling machine both see the same conditions. extra_info["vs_hf"] is
HF's median time over ours (> 1: we are faster); "load_avg" is the 1-minute load when the pairs ended.
For the training step on a CPU, "matmul_share" is the part of our step's op time spent in matrix
multiplies (torch.profiler, one step) and "best_possible_vs_hf" HF's step over our step's matmul
time: the ratio ours would reach if everything else took no time, since both run the same GEMMs.

The bound: at batch 1 each decode step streams every weight from memory once (494 MB in fp32 at
this size: all parameters but the position table, of which one row is read), so tokens/s can be
at most (matrix-vector bandwidth) / (weight bytes). The bandwidth is the best of several ways of
storing one 256 MiB matrix (`MatvecBandwidth`: row- or column-major, square or tall, 4 KB or 2 MB
pages, MKL's packed format, split by rows across torch's threads), each measured in every pair (median taken), with a matrix-vector
product, the op a decode step streams its weights with; "of_bound" is the decode's tokens/s as a
fraction of that bound, "matvec_gbs_by_way" every way's figure. "plain_layout_tokens_per_s" is our
decode on the weights as nn.Linear keeps them (`decode_layout=False`), timed in the same pairs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from bench_util import device_name, interleaved, load_avg, sig, sync
from model import GPTConfig, GPTModel
from model.generate import generate, huge_page_empty
from model.weights import save_pretrained

transformers = pytest.importorskip("transformers", reason="the Hugging Face baseline needs `pip install transformers`")

PRESET = "gpt2-124M"
PAIRS = 7


def _config() -> GPTConfig:
    return GPTConfig.from_preset(PRESET, tie_weights=True, qkv_bias=True)  # OpenAI's GPT-2 layout


@pytest.fixture
def models(device, tmp_path_factory):
    """(ours, HF's) on the same random weights, fp32; fresh for each test (training changes them)."""
    torch.manual_seed(0)
    with torch.device(device):
        ours = GPTModel(_config())
    folder = save_pretrained(ours, tmp_path_factory.mktemp("gpt2"))  # config.json + model.safetensors
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).to(device)
    hf.generation_config.eos_token_id = None  # random weights: never stop early, always 64 tokens
    hf.generation_config.pad_token_id = 0
    return ours, hf


class MatvecBandwidth:
    """The fastest this machine streams a matrix through a matrix-vector product, the op a batch-1
    decode step streams its weights with: GB/s of x (1, k) @ W^T over one `mib` MiB matrix (far larger
    than any cache), the bytes of W over the median time, in every way we know to store W, the best
    one being the bound's bandwidth. The ways: row-major (as nn.Linear keeps it) or column-major
    (how `model.generate.decode_weights` keeps the wide ones), each square and tall (head-like, k =
    768); on a CPU also in 2 MB pages (as the decode copies are), in MKL's packed format, and split by
    rows across torch's threads (ways the decode does not use: the bound is not limited to what we do)."""

    def __init__(self, device, dtype=torch.float32, mib: int = 256):
        n = mib * 2**20 // dtype.itemsize
        cpu = device.type == "cpu"
        pages = {"4k": torch.randn(n, device=device, dtype=dtype)}
        if cpu:
            pages["2M"] = huge_page_empty(n, dtype).copy_(pages["4k"])
        self.x, self.ways, self.split = {}, {}, {}
        for rows, k in (("square", int(n**0.5)), ("tall", 768)):
            m = n // k
            self.x[rows] = torch.randn(1, k, device=device, dtype=dtype)
            for page, buf in pages.items():
                self.ways[f"{rows}/row-major/{page}"] = (rows, buf[: m * k].view(m, k))  # (m, k)
                self.ways[f"{rows}/column-major/{page}"] = (rows, buf[: m * k].view(k, m).t())  # (m, k)
        # Split by rows across the threads torch may use, one call each (torch releases the GIL): MKL
        # runs an M = 1 product on one thread, and one core may not draw all the bandwidth there is.
        threads = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        if self.pool is not None:
            for rows in ("square", "tall"):
                for layout in ("row-major", "column-major"):
                    w = self.ways[f"{rows}/{layout}/{'2M' if cpu else '4k'}"][1]
                    self.split[f"{rows}/{layout}/{threads}-thread-split"] = (rows, w, w.chunk(threads, dim=0))
        self.packed = {}
        if cpu and dtype == torch.float32 and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
            for rows in ("square", "tall"):
                w = self.ways[f"{rows}/row-major/4k"][1]
                self.packed[f"{rows}/mkl-packed"] = (rows, w, torch.ops.mkl._mkl_reorder_linear_weight(w, 1))
        self.gbs = {name: [] for name in [*self.ways, *self.split, *self.packed]}

    def measure(self, reps: int = 5) -> None:
        """Time every way once more (reps calls, median), under the conditions of this moment."""
        for name, (rows, w) in self.ways.items():
            self.gbs[name].append(self._gbs(lambda: F.linear(self.x[rows], w), w.numel() * w.element_size(), reps))
        for name, (rows, w, parts) in self.split.items():
            x = self.x[rows]
            fn = lambda: [f.result() for f in [self.pool.submit(F.linear, x, part) for part in parts]]  # noqa: E731
            self.gbs[name].append(self._gbs(fn, w.numel() * w.element_size(), reps))
        for name, (rows, w, packed) in self.packed.items():
            fn = lambda: torch.ops.mkl._mkl_linear(self.x[rows], packed, w, None, 1)  # noqa: E731
            self.gbs[name].append(self._gbs(fn, w.numel() * w.element_size(), reps))

    def _gbs(self, fn, nbytes, reps):
        fn()
        times = []
        for _ in range(reps):
            sync(self.x["tall"].device)
            t0 = time.perf_counter()
            fn()
            sync(self.x["tall"].device)
            times.append(time.perf_counter() - t0)
        return nbytes / statistics.median(times) / 1e9

    def medians(self) -> dict[str, float]:
        """Each way's median GB/s; the threads of the split way end here."""
        if self.pool is not None:
            self.pool.shutdown()
        return {name: statistics.median(v) for name, v in self.gbs.items()}


def streamed_bytes(model: GPTModel) -> int:
    """Bytes of the weights one batch-1 decode step reads: every parameter once (a tied head once),
    except the position table, of which it reads one row."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - model.pos_emb.weight.numel() * model.pos_emb.weight.element_size()



def _machine(device) -> dict:
    return {"device": device_name(device), "threads": torch.get_num_threads(), "load_avg": load_avg()}


def test_train_step_vs_hf(benchmark, models, device):
    ours, hf = models
    quick = benchmark.disabled
    B, T = (1, 32) if quick else (2, 256)
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    x, y = (torch.randint(0, ours.cfg.vocab_size, (B, T), device=device) for _ in range(2))
    ours.train(), hf.train()
    opts = {m: torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.1, fused=True) for m in (ours, hf)}

    def step(m, loss_fn):
        def run():
            with amp():
                loss = loss_fn()
            loss.backward()
            opts[m].step()
            opts[m].zero_grad(set_to_none=True)

        return run

    ours_step = step(ours, lambda: ours.loss(ours(x), y))
    # HF shifts the labels itself (logits at t against labels[t + 1]): labels=x is its next-token
    # loss, the same work (logits at every position, the last one's loss ignored).
    hf_step = step(hf, lambda: hf(x, labels=x, use_cache=False).loss)
    if not quick:
        ours_step(), hf_step()  # allocate the optimizers' state, untimed
    s_ours, s_hf = interleaved(ours_step, hf_step, 1 if quick else PAIRS, device, benchmark)
    # How fast ours could be at all: both models run the same matrix multiplies (the same FLOPs, the
    # same BLAS), so even if everything else in our step took no time, ours would take its matmuls'
    # time. HF's step over that is the most this comparison can show (Amdahl); on a CPU only (the
    # profiler's CPU times are a GPU's launch costs, not its work).
    bound = {}
    if not cuda:
        mm_ours, all_ours = matmul_seconds(ours_step)
        mm_hf, all_hf = matmul_seconds(hf_step)
        bound = {"matmul_share": sig(mm_ours / all_ours), "hf_matmul_share": sig(mm_hf / all_hf),
                 "best_possible_vs_hf": sig(s_hf / (s_ours * mm_ours / all_ours))}
    benchmark.group = f"vs Hugging Face: train {PRESET}"
    benchmark.extra_info.update({
        "bench": "train_vs_hf", "model": PRESET, "tie_weights": True, "qkv_bias": True, "batch": B, "seq_len": T,
        "dtype": "bf16 autocast" if cuda else "fp32", "quick": quick, "pairs": 1 if quick else PAIRS,
        "step_ms": sig(s_ours * 1e3), "hf_step_ms": sig(s_hf * 1e3), "vs_hf": sig(s_hf / s_ours), **bound,
        "transformers": transformers.__version__, **_machine(device),
    })


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_seconds(step) -> tuple[float, float]:
    """(CPU seconds in matrix multiplies, CPU seconds in all ops) of one call of step, from
    torch.profiler's self times."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6, total / 1e6


def test_decode_vs_hf_and_bandwidth_bound(benchmark, models, device):
    ours, hf = models
    quick = benchmark.disabled
    n_prompt, n_new = (4, 8) if quick else (16, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours, hf = ours.to(dtype).eval(), hf.to(dtype).eval()
    prompt = torch.randint(0, ours.cfg.vocab_size, (1, n_prompt), device=device)
    out = {}

    def run_ours():
        out["ours"] = generate(ours, prompt, max_new_tokens=n_new)

    @torch.inference_mode()
    def run_hf():
        out["hf"] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False)

    def run_plain():  # ours on the weights as they are (decode_layout=False): what the decode copies buy
        return generate(ours, prompt, max_new_tokens=n_new, decode_layout=False)

    if not quick:
        run_ours(), run_hf()  # first calls: allocator, lazy initialisation, the decode copies
    load_before = load_avg()
    bandwidth = MatvecBandwidth(device, dtype, mib=16 if quick else 256)
    plain = []  # seconds of run_plain, one per pair

    def between():  # untimed by the benchmark: the bandwidth and the plain-layout run, in every pair
        bandwidth.measure(reps=1 if quick else 5)
        sync(device)
        t0 = time.perf_counter()
        out["plain"] = run_plain()
        sync(device)
        plain.append(time.perf_counter() - t0)

    s_ours, s_hf = interleaved(run_ours, run_hf, 1 if quick else PAIRS, device, benchmark, between=between)
    if out["ours"].shape != (1, n_prompt + n_new) or out["hf"].shape != out["ours"].shape:
        raise AssertionError(f"generated {tuple(out['ours'].shape)} (ours) and {tuple(out['hf'].shape)} (HF) "
                             f"tokens, expected {(1, n_prompt + n_new)}")
    if not torch.equal(out["ours"], out["plain"]):
        raise AssertionError("the decode copies changed the greedy tokens")
    ways = bandwidth.medians()
    best = max(ways, key=ways.get)
    gbs = ways[best]
    nbytes = streamed_bytes(ours)
    bound = gbs * 1e9 / nbytes  # tokens/s if a step did nothing but stream its weights, the fastest way measured
    tps = n_new / s_ours
    benchmark.group = f"vs Hugging Face: decode {PRESET} B=1"
    benchmark.extra_info.update({
        "bench": "decode_vs_hf", "model": PRESET, "tie_weights": True, "qkv_bias": True, "batch": 1,
        "prompt_tokens": n_prompt, "new_tokens": n_new, "dtype": str(dtype).replace("torch.", ""),
        "quick": quick, "pairs": 1 if quick else PAIRS,
        "tokens_per_s": sig(tps), "hf_tokens_per_s": sig(n_new / s_hf), "vs_hf": sig(s_hf / s_ours),
        "plain_layout_tokens_per_s": sig(n_new / statistics.median(plain)),
        # same weights, greedy: the same tokens, unless two logits tie to within rounding
        "same_tokens": bool(torch.equal(out["ours"].cpu(), out["hf"].cpu())),
        "weight_mb": sig(nbytes / 1e6), "matvec_gbs": sig(gbs), "matvec_best_way": best,
        "matvec_gbs_by_way": {name: sig(v, 3) for name, v in ways.items()},
        "bound_tokens_per_s": sig(bound), "of_bound": sig(tps / bound), "hf_of_bound": sig(n_new / s_hf / bound),
        "transformers": transformers.__version__, "load_avg_before": load_before, **_machine(device),
    })
