"""Generation: the KV cache against full forwards, sampling, eos, batching, limits, and the CLI."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accuracy import assert_close_to_reference, seeded
from model import GPTConfig, GPTModel, generate, stream_generate
from model.generate import (DECODE_LAYOUT_MAX_BATCH, DECODE_LAYOUT_MIN_TOKENS, DecodeThreads, decode_weights,
                            release_decode_weights, sample_next)
from model.kv_cache import KVCaches
from model.ops import TorchOps
from model.weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
SMALL = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
# Fused runs go through Triton's interpreter: one layer, two heads, a handful of tokens.
TINY = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=2, n_layers=1)
# SMALL with head dim 16, the smallest flash_attention takes: the CUDA-graph test's fused half runs it.
GRAPHED = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)
PROMPTS = [[5, 17, 3, 88, 41, 9, 2], [64], [11, 30, 30, 7]]  # lengths 7, 1, 4


def make_model(cfg=SMALL, fused=False, seed=0):
    torch.manual_seed(seed)
    return GPTModel(cfg, fused=fused).eval()


# ----------------------------------------------------------------------------------------------
# The cache against full forwards
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_sequence_pos", [False, True])
@torch.no_grad()
def test_prefill_then_decode_logits_equal_full_forward(per_sequence_pos):
    m = make_model()
    idx = torch.randint(0, 97, (2, 13))
    full = m(idx)  # (2, 13, V)
    cache = KVCaches.for_model(m, batch_size=2, max_len=13)
    parts = [m(idx[:, :5], cache=cache, input_pos=0)]
    for t in range(5, 13):
        pos = torch.full((2,), t) if per_sequence_pos else t
        parts.append(m(idx[:, t : t + 1], cache=cache, input_pos=pos))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_chunked_prefill_equals_whole_prefill():
    m = make_model()
    idx = torch.randint(0, 97, (3, 11))
    whole = m(idx, cache=KVCaches.for_model(m, 3, 11), input_pos=0)
    torch.testing.assert_close(whole, m(idx), atol=1e-5, rtol=1e-5)
    for chunk in (1, 4):
        cache = KVCaches.for_model(m, 3, 11)
        parts = [m(idx[:, s : s + chunk], cache=cache, input_pos=s) for s in range(0, 11, chunk)]
        torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)
    # and through generate: chunked prefill picks the same tokens
    assert generate(m, PROMPTS, 6, prefill_chunk_size=3) == generate(m, PROMPTS, 6)


@torch.no_grad()
def test_ragged_decode_positions_per_sequence():
    """Right-padded batch: each row's decode logits equal that row run alone through a full forward."""
    m = make_model()
    lens = torch.tensor([6, 2, 4])
    seqs = [torch.randint(0, 97, (int(n) + 3,)) for n in lens]  # prompt, then 3 decoded tokens
    prompt = torch.zeros(3, 6, dtype=torch.long)
    for b, n in enumerate(lens):
        prompt[b, :n] = seqs[b][:n]
    prompt[1, 2:] = 96  # pads: garbage that must never be seen
    cache = KVCaches.for_model(m, 3, 9)
    logits = m(prompt, cache=cache, input_pos=0)
    steps = [logits[torch.arange(3), lens - 1]]
    for i in range(3):
        tok = torch.stack([seqs[b][lens[b] + i] for b in range(3)])[:, None]  # (3, 1)
        steps.append(m(tok, cache=cache, input_pos=lens + i)[:, -1])
    for b in range(3):
        alone = m(seqs[b][None])[0]  # (n + 3, V)
        want = alone[int(lens[b]) - 1 :]
        torch.testing.assert_close(torch.stack([s[b] for s in steps]), want, atol=1e-5, rtol=1e-5)


def test_greedy_with_cache_equals_without():
    m = make_model()
    x = torch.randint(0, 97, (2, 5))
    a = generate(m, x, 12)
    assert a.shape == (2, 17) and torch.equal(a[:, :5], x)
    assert torch.equal(a, generate(m, x, 12, use_cache=False))
    assert torch.equal(generate(m, x[:1], 12), a[:1])
    assert generate(m, PROMPTS, 10) == generate(m, PROMPTS, 10, use_cache=False)


def test_batch_of_different_lengths_equals_each_alone():
    m = make_model()
    together = generate(m, PROMPTS, 10)
    assert [len(s) for s in together] == [len(p) + 10 for p in PROMPTS]
    assert together == [generate(m, [p], 10)[0] for p in PROMPTS]
    assert together == generate(m, PROMPTS, 10, use_cache=False)


def test_stream_yields_the_tokens_of_generate():
    m = make_model()
    steps = list(stream_generate(m, PROMPTS, 5))
    assert len(steps) == 5 and all(s.shape == (3,) for s in steps)
    out = generate(m, PROMPTS, 5)
    assert [p + [int(s[b]) for s in steps] for b, p in enumerate(PROMPTS)] == out


def test_generate_restores_training_mode_and_leaves_no_grad():
    m = make_model().train()
    generate(m, [[1, 2]], 3)
    assert m.training
    assert all(p.grad is None for p in m.parameters())


@torch.no_grad()
def test_logits_at_picks_rows_of_the_full_forward():
    m = make_model()
    idx = torch.randint(0, 97, (3, 9))
    at = torch.tensor([8, 0, 5])
    picked = m(idx, logits_at=at)  # (3, 1, V)
    assert picked.shape == (3, 1, 97)
    # (to fp32 rounding: BLAS may sum a 3-row product in another order than a 27-row one)
    torch.testing.assert_close(picked[:, 0], m(idx)[torch.arange(3), at], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Decode-ready weights: column-major copies of the wide Linears (batch-1 decode on a CPU)
# ----------------------------------------------------------------------------------------------
# Wider than SMALL, so that the sums of the products have some length to round over.
WIDE = GPTConfig(vocab_size=501, context_length=48, emb_dim=96, n_heads=4, n_layers=2, qkv_bias=True, tie_weights=True)


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}-threads")
def threads(request):
    """torch's thread count for the test: the decode copies are cut into that many row chunks."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@torch.no_grad()
def test_decode_weights_give_the_logits_to_fp32_rounding(threads):
    """Prefill + decode on the decode copies: against float64, within 2x the plain weights' fp32 error."""
    m = make_model(WIDE)
    exact = copy.deepcopy(m).double()
    weights = decode_weights(m)
    # Every Linear, the (tied) head included: column-major when out > in (head, qkv, mlp.fc), else as is.
    assert sorted(weights) == sorted(["out_head.weight"] + [f"blocks.{i}.{n}.weight" for i in range(2)
                                                              for n in ("attn.qkv", "attn.out_proj", "mlp.fc", "mlp.proj")])
    for name, w in weights.items():
        p = m.get_parameter(name)
        out, inp = p.shape
        assert torch.equal(w, p), name  # same numbers
        chunks = w.chunks_t.transpose(1, 2) if threads > 1 else w[None]  # (n, out_n, in)
        assert chunks.shape[0] == threads and chunks.stride()[1:] == ((1, chunks.shape[1]) if out > inp else (inp, 1)), name
        assert torch.equal(chunks.flatten(0, 1)[:out], p) and not chunks.flatten(0, 1)[out:].any(), name
    idx = torch.randint(0, 501, (1, 12))

    def run(model, params=None):
        call = model if params is None else lambda *a, **k: torch.func.functional_call(model, params, a, k, tie_weights=False)
        cache = KVCaches.for_model(model, 1, 12)
        parts = [call(idx[:, :5], cache=cache, input_pos=0)]
        parts += [call(idx[:, t : t + 1], cache=cache, input_pos=t) for t in range(5, 12)]
        return torch.cat(parts, dim=1)  # (1, 12, V)

    want = run(exact)
    assert_close_to_reference("decode-layout logits", run(m, weights), want, run(m), atol=None)
    # and greedy picks the same tokens as the plain weights, alone and in a small batch
    prompts = [[5, 17, 3, 88], [64], [11, 30, 30, 7, 200]]
    assert generate(m, prompts, 12, decode_layout=True) == generate(m, prompts, 12, decode_layout=False)


def test_decode_threads_pick_the_faster_and_back_off():
    """Step 0 on n threads, step 1 on one; the faster is kept and the other tried again after 8, then
    32, then 128 steps (at most) while it loses; a probe that wins takes over."""
    t = DecodeThreads(2)
    ran = []

    def run(step, seconds_by_threads):
        k = t.for_step(step)
        ran.append(k)
        t.record(step, k, seconds_by_threads[k])

    for step in range(300):  # the other core busy: one thread is faster
        run(step, {2: 0.3, 1: 0.05})
    assert [s for s, k in enumerate(ran) if k == 2] == [0, 9, 41, 169, 297]  # after step 1: 8, 32, 128, 128
    for step in range(300, 430):  # the core is free again: the next probe of 2 threads (step 425) wins
        run(step, {2: 0.03, 1: 0.05})
    assert ran.index(2, 300) == 425 and ran[425:] == [2] * 5 and (t.best, t.other) == (2, 1)
    assert t.next_probe == 425 + 8  # and one thread is tried again 8 steps later
    assert DecodeThreads(2).for_step(0) == 2 and DecodeThreads(2).for_step(1) == 1


def test_decode_steps_run_on_the_chosen_threads_and_hand_back_the_callers(monkeypatch):
    """Streaming on 2 threads: a decode step may run on one, but the caller's code between two
    tokens always sees its own thread count; the tokens are those of the plain path."""
    gen = importlib.import_module("model.generate")  # the module (model.generate is also the function)
    m = make_model(WIDE)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    record = gen.DecodeThreads.record
    monkeypatch.setattr(gen.DecodeThreads, "record", lambda self, step, k, s: (seen.append(k), record(self, step, k, s)))
    try:
        tokens = []
        for nxt in stream_generate(m, [[3, 1, 4]], 20, decode_layout=True):
            assert torch.get_num_threads() == 2
            tokens.append(int(nxt))
    finally:
        torch.set_num_threads(before)
    assert seen[:2] == [2, 1] and len(seen) == 19  # every decode step timed; step 1 on one thread
    assert [[3, 1, 4] + tokens] == generate(m, [[3, 1, 4]], 20, decode_layout=False)


def test_decode_weights_are_cached_and_follow_weight_changes():
    m = make_model(WIDE)
    w = decode_weights(m)
    assert decode_weights(m) is w  # cached: built once
    before = generate(m, [[3, 1, 4]], 8)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m(torch.randint(0, 501, (2, 8)), targets=torch.randint(0, 501, (2, 8))).backward()
    opt.step()  # in place: the version counters move, so the copies are stale
    w2 = decode_weights(m)
    assert w2 is not w and torch.equal(w2["out_head.weight"], m.out_head.weight)
    after = generate(m, [[3, 1, 4]], 8)
    assert after == generate(m, [[3, 1, 4]], 8, decode_layout=False) and after != before
    m.load_state_dict(make_model(WIDE, seed=1).state_dict())  # copies in place too
    assert torch.equal(decode_weights(m)["blocks.0.mlp.fc.weight"], m.blocks[0].mlp.fc.weight)
    release_decode_weights(m)
    assert "_decode_weights" not in vars(m)


def test_decode_weights_under_lora_adapters():
    """A LoRA wrapper is no nn.Linear but its base is: the base gets a copy, the adapter still acts."""
    from model.lora import apply_lora

    m = apply_lora(make_model(WIDE), rank=2, alpha=4.0, include_head=False)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:  # the adapters: B starts at zero, make the update non-zero
                p.normal_(0.0, 0.5)
    assert "blocks.0.attn.qkv.base.weight" in decode_weights(m)
    prompts = [[5, 17, 3, 88], [64]]
    assert generate(m, prompts, 12, decode_layout=True) == generate(m, prompts, 12, use_cache=False)


def test_decode_layout_is_automatic_on_a_cpu_for_small_batches_and_long_enough_runs():
    m = make_model(WIDE)
    n = DECODE_LAYOUT_MIN_TOKENS
    generate(m, [[1]] * (DECODE_LAYOUT_MAX_BATCH + 1), n)
    assert "_decode_weights" not in vars(m)  # a large batch: the products are no longer matrix-vector
    generate(m, [[1, 2]], n, use_cache=False)
    assert "_decode_weights" not in vars(m)  # no cache, no decode steps
    generate(m, [[1, 2]], n - 1)
    assert "_decode_weights" not in vars(m)  # too few tokens to pay for the copy
    half = make_model(WIDE).to(torch.bfloat16)
    generate(half, [[1, 2]], n)
    assert "_decode_weights" not in vars(half)  # bfloat16 streams slower column-major on a CPU
    generate(m, [[1, 2]], n)
    w = vars(m)["_decode_weights"]
    generate(m, [[1, 2]], 2)
    assert vars(m)["_decode_weights"] is w  # once made (and valid), used at any length
    with pytest.raises(ValueError, match="decode_layout"):
        generate(m, [[1, 2]], 2, decode_layout="yes")


# ----------------------------------------------------------------------------------------------
# The fused path (Triton interpreter): flash_attention for prefill, decode_attention for decode
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_fused_cache_matches_full_forward_and_greedy_without_cache():
    m = make_model(TINY, fused=True)
    idx = torch.randint(0, 61, (2, 7))
    full = m(idx)
    cache = KVCaches.for_model(m, 2, 7)
    parts = [m(idx[:, :4], cache=cache, input_pos=0)]
    parts.append(m(idx[:, 4:6], cache=cache, input_pos=4))  # a chunk continuing the cache
    parts.append(m(idx[:, 6:], cache=cache, input_pos=torch.tensor([6, 6])))  # the decode kernel
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, make_model(TINY)(idx), atol=1e-5, rtol=1e-5)  # same as PyTorch

    prompts = [[3, 14, 15, 9, 2], [26]]
    cached = generate(m, prompts, 4)
    assert cached == generate(m, prompts, 4, use_cache=False)
    assert cached == [generate(m, [p], 4)[0] for p in prompts]
    assert cached == generate(make_model(TINY), prompts, 4)  # the PyTorch path picks the same tokens


def test_decode_attention_ops_agree():
    """TorchOps.decode_attention (masked SDPA) against the plain book math, per-sequence lengths."""
    torch.manual_seed(0)
    B, H, L, D, Tq = 3, 2, 9, 8, 2
    q = torch.randn(B, H, Tq, D, dtype=torch.float64)
    k, v = torch.randn(B, H, L, D, dtype=torch.float64), torch.randn(B, H, L, D, dtype=torch.float64)
    lens = torch.tensor([9, 2, 5])
    out = TorchOps().decode_attention(q, k, v, lens)
    for b in range(B):
        n = int(lens[b])
        kb, vb = k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        scores = q[b : b + 1] @ kb.transpose(-2, -1) / D**0.5  # (1, H, Tq, n)
        scores = scores.masked_fill(~torch.ones(Tq, n, dtype=torch.bool).tril(n - Tq), float("-inf"))
        torch.testing.assert_close(out[b : b + 1], torch.softmax(scores, -1) @ vb)


# ----------------------------------------------------------------------------------------------
# Limits: clear errors, never a crash or a silent wrap
# ----------------------------------------------------------------------------------------------
def test_context_overflow_is_an_error_before_running():
    m = make_model()
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="exceeds the model's context length 32"):
            generate(m, torch.zeros(1, 30, dtype=torch.long), 3, use_cache=use_cache)
        with pytest.raises(ValueError, match="context length"):
            generate(m, [[1] * 25, [2]], 8, use_cache=use_cache)  # the longest prompt decides
    assert generate(m, torch.zeros(1, 30, dtype=torch.long), 2).shape == (1, 32)  # exactly full is fine


@torch.no_grad()
def test_cache_overflow_and_misuse_are_errors():
    m = make_model()
    cache = KVCaches.for_model(m, batch_size=1, max_len=8)
    m(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow"):
        m(torch.zeros(1, 3, dtype=torch.long), cache=cache, input_pos=6)
    with pytest.raises(ValueError, match="KV cache overflow"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache, input_pos=torch.tensor([8]))
    with pytest.raises(ValueError, match=">= 0"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache, input_pos=-1)
    with pytest.raises(ValueError, match="built for 1"):
        m(torch.zeros(2, 1, dtype=torch.long), cache=cache, input_pos=0)
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache, input_pos=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="only meaningful with a KV cache"):
        m(torch.zeros(1, 1, dtype=torch.long), input_pos=3)
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        KVCaches.for_model(m, 1, max_len=33)
    with pytest.raises(TypeError, match="dtype"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=KVCaches.for_model(m, 1, 4, dtype=torch.float64))


def test_bad_generation_arguments():
    m = make_model()
    x = torch.zeros(1, 2, dtype=torch.long)
    for kwargs, msg in [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
                        ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ValueError, match=msg):
            generate(m, x, 2, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, x, -1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[1], []], 2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(m, [[3, 97]], 2)
    with pytest.raises(TypeError, match="integer token ids"):
        generate(m, x.float(), 2)
    assert torch.equal(generate(m, x, 0), x)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
            generate(m, x, 2, cuda_graph=True)


@pytest.mark.slow
def test_graphed_model_runs_on_the_fused_kernels():
    """The CUDA-graph test's model is one the kernels take (head dim 16), checked where there is no GPU:
    its plain fused decode (flash_attention prefill, decode_attention steps) gives the PyTorch path's tokens."""
    m = make_model(GRAPHED, fused=True)
    assert generate(m, PROMPTS[1:], 2) == generate(make_model(GRAPHED), PROMPTS[1:], 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_cuda_graph_decode_gives_the_tokens_of_plain_decode(fused):
    """The graphed step replays the same kernels on the same cache: the same tokens, greedy and
    sampled, for a ragged batch (per-sequence positions read from the graph's static inputs)."""
    m = make_model(GRAPHED, fused=fused).cuda()
    for kwargs in ({}, {"temperature": 1.0, "top_k": 20, "seed": 3}):
        plain = generate(m, PROMPTS, 12, **kwargs)
        assert generate(m, PROMPTS, 12, cuda_graph=True, **kwargs) == plain


# ----------------------------------------------------------------------------------------------
# Sampling and stopping
# ----------------------------------------------------------------------------------------------
def test_sampling_controls():
    m = make_model()
    x = torch.randint(0, 97, (2, 4))
    greedy = generate(m, x, 8)
    assert torch.equal(generate(m, x, 8, temperature=1.5, top_k=1, seed=0), greedy)
    assert torch.equal(generate(m, x, 8, temperature=1.5, top_p=1e-6, seed=0), greedy)
    a = generate(m, x, 8, temperature=2.0, seed=1)
    assert torch.equal(a, generate(m, x, 8, temperature=2.0, seed=1))  # a seed reproduces the text
    assert torch.equal(a, generate(m, x, 8, temperature=2.0, generator=seeded(1)))
    assert not torch.equal(a, greedy) and not torch.equal(a, generate(m, x, 8, temperature=2.0, seed=2))


def test_sample_next_filters():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    g = seeded(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 3}
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {1, 3}  # 0.5 + 0.3 >= 0.7
    assert set(sample_next(logits, 1.0, top_p=0.85, generator=g).tolist()) == {1, 2, 3}
    free = sample_next(logits, 1.0, generator=g)
    torch.testing.assert_close(torch.bincount(free, minlength=4) / 4000.0, probs, atol=0.03, rtol=0)
    # a low temperature sharpens: token 1 (p = 0.5) takes nearly everything at T = 0.1
    assert (sample_next(logits, 0.1, generator=g) == 1).float().mean() > 0.98
    assert torch.equal(sample_next(logits[:2], 0.0), torch.tensor([1, 1]))


def test_eos_stops_each_sequence():
    m = make_model()
    free = generate(m, PROMPTS, 8)
    eos = free[0][len(PROMPTS[0]) + 2]  # the third token sequence 0 generates
    out = generate(m, PROMPTS, 8, eos_id=eos)
    for p, f, o in zip(PROMPTS, free, out):
        new = f[len(p):]
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert o == p + new[:stop]  # up to and including eos, then nothing
    # tensor in, tensor out: when every row is done the loop ends early; a finished row is padded
    n0 = free[0][len(PROMPTS[0]) :].index(eos) + 1  # 3, or fewer if eos also came earlier
    t = generate(m, torch.tensor([PROMPTS[0]]), 8, eos_id=eos)
    assert t[0].tolist() == free[0][: len(PROMPTS[0]) + n0]
    pair = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    alone = generate(m, pair, 8)
    both = generate(m, pair, 8, eos_id=eos, pad_id=0)
    row0 = both[0, len(PROMPTS[0]) :]
    assert row0[:n0].tolist() == free[0][len(PROMPTS[0]) :][:n0] and (row0[n0:] == 0).all()
    n1 = both.shape[1] - len(PROMPTS[0])
    assert n1 > n0 or eos in alone[1, len(PROMPTS[0]) :].tolist()
    assert both[1, : len(PROMPTS[0]) + n0].tolist() == alone[1, : len(PROMPTS[0]) + n0].tolist()


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def _cli_main():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_end_to_end(tmp_path, capsys):
    from model.tokenizer import decode, encode

    cfg = GPTConfig(context_length=32, emb_dim=16, n_heads=2, n_layers=1)  # the full GPT-2 vocabulary
    m = make_model(cfg)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": m.state_dict(), "model_config": cfg.to_dict()}, ckpt)  # model/training.py's keys
    prompts = ["Every effort moves you", "Hello"]
    want = [decode(s) for s in generate(m, [encode(p) for p in prompts], 6, eos_id=50256)]

    # A real process, as a user runs it: one prompt, streamed.
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint", str(ckpt),
                        "--prompt", prompts[0], "--max-new-tokens", "6"],
                       cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want[0].strip()  # streamed piece by piece, the same text
    assert "6 new tokens" in r.stderr and "tokens/s" in r.stderr

    # In-process from here on (a process costs seconds): a batch from a prompt file, HF-layout folder.
    main = _cli_main()
    save_pretrained(m, tmp_path / "hf")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    assert main(["--checkpoint", str(tmp_path / "hf"), "--prompt-file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "6", "--no-cache"]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(w + "\n\n" for w in want) and "tokens/s, batch 2" in err
    # A mistake raises; the script's run() (model/cli.py) turns it into one line and exit 2.
    with pytest.raises(ValueError, match="exceeds the model's context length 32"):  # 4 + 40 > 32
        main(["--checkpoint", str(ckpt), "--max-new-tokens", "40"])
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        main(["--checkpoint", str(tmp_path / "broken.pt")])


def test_training_samples_make_no_decode_copies():
    """The weights change between a training run's samples: copies made for one would be stale at the
    next and held in memory meanwhile, so the training loop's samples decode on the weights as they are."""
    from model.pretrain import sample_text

    m = make_model(GPTConfig(context_length=48, emb_dim=32, n_heads=2, n_layers=1, tie_weights=True))
    sample_text(m, "Every effort moves you", DECODE_LAYOUT_MIN_TOKENS, torch.device("cpu"))
    assert "_decode_weights" not in vars(m)
    generate(m, [[1, 2]], DECODE_LAYOUT_MIN_TOKENS)  # the same model outside training: copies made
    assert "_decode_weights" in vars(m)
