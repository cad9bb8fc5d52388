"""Text generation (chapter 5 of the book), with a KV cache.

Decoding samples one token at a time: run the model on the prompt, turn the logits of its last
position into a next token (greedy, or sampled with temperature / top-k / top-p), append it, repeat.

Without a cache (`use_cache=False`) every step re-runs the model on the whole prefix: O(T^2) work
for T tokens. With the cache (`model/kv_cache.py`) the prompt is run once ("prefill"), its keys and
values are kept, and each later step runs the model on the one new token only ("decode").

Prompts of different lengths share one batch by RIGHT padding: causal attention means a real token
never looks at the pads after it, so prefill needs no mask; each sequence's next token comes from
the logits at its own last real token, and every later step writes sequence b's token at its own
position lens[b]. Each prompt therefore gets exactly the tokens it would get alone.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from typing import Iterator

import torch
import torch.nn as nn

from model.kv_cache import KVCaches


# ----------------------------------------------------------------------------------------------
# Choosing the next token
# ----------------------------------------------------------------------------------------------
def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature  # (B, V)
    cand = None  # vocabulary ids of the candidates, when they are a sorted subset
    if top_k is not None and top_k < logits.shape[-1]:
        logits, cand = torch.topk(logits, top_k, dim=-1)  # (B, k), most likely first
    elif top_p is not None and top_p < 1.0:
        logits, cand = torch.sort(logits, dim=-1, descending=True)  # (B, V), most likely first
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probabilities sum to >= top_p;
        # a token goes when the ones before it already reach top_p (so the most likely always stays).
        probs = torch.softmax(logits, dim=-1)  # (B, k)
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))  # (B, k)
    probs = torch.softmax(logits, dim=-1)  # (B, k)
    # argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p (E_i / p_i ~ Exp(p_i), and the smallest of
    # independent exponentials is i with probability p_i / sum p): one pass, unlike torch.multinomial.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)  # (B, k)
    choice = (probs / noise).argmax(dim=-1)  # (B,)
    return choice if cand is None else cand.gather(-1, choice[:, None]).squeeze(-1)  # (B,)


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def _as_batch(idx, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, T) tensor or a list of 1-D token sequences -> right-padded (B, T) ids and lengths (B,)."""
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
            raise ValueError(f"idx must be non-empty (batch, seq_len) token ids, got shape {tuple(idx.shape)}")
        if idx.dtype.is_floating_point:
            raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        idx = idx.to(device=device, dtype=torch.long)
        return idx, torch.full((idx.shape[0],), idx.shape[1], dtype=torch.long, device=device)
    seqs = [torch.as_tensor(s, dtype=torch.long).flatten() for s in idx]
    if not seqs or any(s.numel() == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token, and there must be at least one prompt")
    lens = torch.tensor([s.numel() for s in seqs], dtype=torch.long, device=device)  # (B,)
    batch = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long, device=device)  # (B, T)
    for b, s in enumerate(seqs):
        batch[b, : s.numel()] = s.to(device)
    return batch, lens


def _prefill(model, tokens, lens, cache, chunk_size):
    """Run the right-padded prompts (B, T) through the model, filling the cache, and return the
    logits (B, V) at each sequence's own last real token, lens[b] - 1. In chunks of `chunk_size`
    tokens if given: the same result, with the activations of one chunk alive at a time."""
    T = tokens.shape[1]
    # The head runs on one position per sequence (logits_at): the other T - 1 rows' logits are not needed.
    if chunk_size is None or chunk_size >= T:
        return model(tokens, cache=cache, input_pos=0, logits_at=lens - 1)[:, 0]  # (B, V)
    last = None
    for s in range(0, T, chunk_size):
        chunk = tokens[:, s : s + chunk_size]  # (B, c)
        at = (lens - 1 - s).clamp(0, chunk.shape[1] - 1)  # (B,): the last real token, if in this chunk
        picked = model(chunk, cache=cache, input_pos=s, logits_at=at)[:, 0]  # (B, V)
        mine = (lens - 1 >= s) & (lens - 1 < s + chunk.shape[1])  # (B,): last token in this chunk
        last = picked if last is None else torch.where(mine[:, None], picked, last)  # (B, V)
    return last


# ----------------------------------------------------------------------------------------------
# Decode-ready weights: the layout a CPU streams fastest at batch 1
# ----------------------------------------------------------------------------------------------
# At batch 1 a decode step is a chain of matrix-vector products: every weight is read once per token
# for 2 FLOPs per 4 bytes (fp32), so a step lasts about (weight bytes) / (the bandwidth the products
# reach). On a CPU that bandwidth depends on how the weights sit in memory, in two ways (measured at
# M = 1, fp32, one thread, on a 2-core EPYC with AVX2 and MKL 2024.2):
#   * Layout. x W^T with W (out, in) row-major, as nn.Linear keeps it, runs as an "NT" gemm; with W
#     column-major (W^T contiguous, shape (in, out)) as an "NN" gemm, and when out > in the latter
#     streams much faster. GB/s row-major -> column-major: LM head 50257 x 768 10.5 -> 18.5,
#     mlp.fc 3072 x 768 14.0 -> 21.2, attn.qkv 2304 x 768 21.8 -> 26.8; mlp.proj 768 x 3072 (out < in)
#     goes the other way (18.1 -> 15.7) and stays row-major, the square attn.out_proj is the same.
#   * Pages. 494 MB streamed through 4 KB pages is 120k pages, each a TLB miss and a restart of the
#     hardware prefetcher (which stops at a page boundary). In 2 MB pages (Linux's transparent huge
#     pages, which a program asks for with madvise) the twelve blocks' linears take 20.7 ms a token
#     instead of 24.1, the head 7.4 ms instead of 8.2.
#   * Threads. MKL runs an M = 1 product on one thread, and one core does not draw all the bandwidth
#     there is. With torch on n > 1 threads each copy is cut into n row chunks, (n, ceil(out / n), in),
#     and its product runs as one batched product over them (torch.baddbmm, the bias inside), which
#     PyTorch spreads over its threads (`_RowChunked`). GB/s on 2 threads with the other core free,
#     one thread -> two (12 copies of each weight, read in turn as a step reads them): attn.qkv 11.7 ->
#     17.6, mlp.fc 13.6 -> 15.7, mlp.proj 14.7 -> 19.7, the head 16.7 -> 20.0; a step's products
#     36 -> 28 ms. When another process holds a core, every product waits for a descheduled thread
#     (10.5 tokens/s on 2 threads, 22.7 on one): `DecodeThreads` times the steps and runs them on the
#     faster count.
# So decoding runs every plain Linear on a copy of its weight, in its faster layout, all of them in
# one buffer of huge pages in the order a step reads them. The same numbers, summed in another order:
# the logits agree to fp32 rounding. The cost: the weights once more in memory (gpt2-124M: +494 MB,
# the tied head's transpose included) and the time to copy them, made on first use and cached on
# the model, rebuilt when a weight changes (its data_ptr or version counter moves: an optimizer step,
# load_state_dict, `.to()`; a write through `.data` moves neither, so call
# `release_decode_weights(model)` after one; that call also frees the memory). The copy pays for
# itself after ~30 tokens (gpt2-124M: it takes 0.3-0.5 s, about 1 s with a process's first
# huge-page faults, and saves ~10 ms a token), so `generate` makes it only when asked for at least
# DECODE_LAYOUT_MIN_TOKENS new tokens, and uses a still-valid cached copy for any length. Batches of
# 2 and 4 still gain (MKL then makes about one pass over the weights per row). Only in fp32: a
# bfloat16 product on a CPU (oneDNN, not MKL) runs 6x slower on column-major weights (head 15.7 ->
# 103 ms). Not used on a GPU (not measured there), on the fused path, or for batches above
# DECODE_LAYOUT_MAX_BATCH.
DECODE_LAYOUT_MAX_BATCH = 4
DECODE_LAYOUT_MIN_TOKENS = 32
_HUGE_PAGE = 2 << 20  # bytes


def huge_page_empty(numel: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """An empty (numel,) CPU tensor that starts on a 2 MB boundary, its pages asked to be huge ones
    (madvise before the first write: the kernel then backs each 2 MB with one page). Where that is
    not possible (not Linux, transparent huge pages off) the memory is plain, and only slower; on
    another device, a plain empty tensor there."""
    if device is not None and torch.device(device).type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    raw = torch.empty(numel + _HUGE_PAGE // dtype.itemsize, dtype=dtype)  # large: fresh, untouched pages from mmap
    skip = -raw.data_ptr() % _HUGE_PAGE // raw.element_size()  # elements up to the next 2 MB boundary
    buf = raw[skip : skip + numel]
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            length = -(-numel * buf.element_size() // _HUGE_PAGE) * _HUGE_PAGE
            libc.madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE
        except (OSError, AttributeError):
            pass
    return buf


class _RowChunked(torch.Tensor):
    """A weight W (out, in) that also holds a copy of itself as n row chunks, `.chunks_t` (n, in, out_n)
    (each chunk transposed: the right operand of a batched x W^T), out_n = ceil(out / n), the last
    chunk zero-padded: F.linear on it is one batched product over the chunks, a chunk per thread. Any
    other op sees the plain W (this tensor's own data)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            return _chunked_linear(*args, **(kwargs or {}))  # only plain tensors inside: no re-dispatch
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _chunked_linear(x, weight, bias=None):
    # x (..., in) @ W^T + b as one batched product over the n row chunks, a chunk per thread:
    # (n, M, in) @ (n, in, out_n) -> (n, M, out_n) -> (M, n * out_n) -> (M, out), the padding dropped.
    # A decode step (x (1, 1, in)) takes three ops, two of them views: each op costs microseconds of
    # dispatch, and a step makes 49 of these products.
    chunks_t, out = weight.chunks_t, weight.out_features
    n, _, out_n = chunks_t.shape
    one = x.dim() == 3 and x.shape[0] == 1  # one sequence: x (1, T, in) is already "rows"
    rows = (x if one else x.reshape(1, -1, x.shape[-1])).expand(n, -1, -1)  # (n, M, in)
    if bias is not None and n * out_n == out:
        y = torch.baddbmm(bias.view(n, 1, out_n), rows, chunks_t)  # the bias added inside the product
    else:
        y = torch.bmm(rows, chunks_t)  # (n, M, out_n)
        if bias is not None:
            y = y + torch.cat([bias, bias.new_zeros(n * out_n - out)]).view(n, 1, out_n)
    M = rows.shape[1]
    if M == 1 and n * out_n == out:
        return y.view(*x.shape[:-1], out)  # (n, 1, out_n) is (1, out) in memory
    y = y.transpose(0, 1).reshape(M, n * out_n)[:, :out]  # (M, out)
    return y.reshape(*x.shape[:-1], out)  # (..., out)


def _decode_linears(model) -> dict[str, nn.Linear]:
    # Every nn.Linear (a LoRA wrapper, model/lora.py, is not one, but its base is: the adapter then
    # adds its delta to the copy), in the order a step reads them: the modules' registration order.
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear}


def decode_weights(model) -> dict[str, torch.Tensor]:
    """{parameter name: copy} of every plain Linear's weight in the layout it streams fastest at batch 1
    on a CPU (column-major when out > in, a row chunk per thread; see above), put in place for each
    decode step (`_on_weights`). Built on first use, then cached on the model until one of those
    weights changes or torch's thread count does."""
    linears = _decode_linears(model)
    cached = _cached_decode_weights(model, linears)
    if cached is not None:
        return cached
    release_decode_weights(model)  # the stale copies go before the new ones are made
    n = _decode_chunks()
    weights = {}
    kinds = {(m.weight.dtype, m.weight.device) for m in linears.values()}  # one buffer for each
    with torch.no_grad():
        for dtype, device in kinds:
            mine = {name: m.weight for name, m in linears.items() if (m.weight.dtype, m.weight.device) == (dtype, device)}
            sizes = {name: n * -(-w.shape[0] // n) * w.shape[1] for name, w in mine.items()}  # padded to n chunks
            buf = huge_page_empty(sum(sizes.values()), dtype, device)
            start = 0
            for name, w in mine.items():
                seg = buf[start : start + sizes[name]]
                start += sizes[name]
                weights[f"{name}.weight"] = _decode_copy(w, seg, n)
    model.__dict__["_decode_weights"] = (_decode_key(linears), weights)  # a plain attribute: not in state_dict
    return weights


def _decode_chunks() -> int:
    return torch.get_num_threads()


def _decode_copy(w: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """W (out, in) copied into seg in its faster layout: column-major when out > in, else row-major;
    as n row chunks of out_n = ceil(out / n) rows (zero-padded), behind a _RowChunked, when n > 1."""
    out, inp = w.shape
    out_n = -(-out // n)
    if out > inp:  # W^T written contiguously (PyTorch's blocked transposing copy), read as W
        chunks = seg.view(n, inp, out_n).transpose(1, 2)  # (n, out_n, in), each chunk column-major
    else:
        chunks = seg.view(n, out_n, inp)  # (n, out_n, in), row-major
    if n * out_n > out:
        chunks[-1].zero_()  # the padding rows (the real ones are written next)
    for i, part in enumerate(w.split(out_n)):
        if out > inp:
            chunks[i, : part.shape[0]].t().copy_(part.t())  # contiguous (in, rows) <- part^T
        else:
            chunks[i, : part.shape[0]].copy_(part)
    if n == 1:
        return chunks[0]  # (out, in): a plain tensor, F.linear as usual
    chunked = torch.Tensor._make_subclass(_RowChunked, w.detach())  # W itself, for every other op
    chunked.chunks_t = chunks.transpose(1, 2)  # (n, in, out_n)
    chunked.out_features = out  # read without the subclass's dispatch (.shape would go through it)
    return chunked


def _decode_key(linears) -> tuple:
    # What changes when a weight does: its storage (data_ptr) or its in-place version counter; and the
    # number of threads the chunks were cut for.
    return (_decode_chunks(),) + tuple(
        (name, m.weight.data_ptr(), m.weight._version, m.weight.dtype) for name, m in linears.items()
    )


def _cached_decode_weights(model, linears=None) -> dict[str, torch.Tensor] | None:
    cached = model.__dict__.get("_decode_weights")
    if cached is None or cached[0] != _decode_key(_decode_linears(model) if linears is None else linears):
        return None
    return cached[1]


def release_decode_weights(model) -> None:
    """Drop the cached decode copies (their memory); the next decode builds them again."""
    model.__dict__.pop("_decode_weights", None)


def _wants_decode_layout(model, batch_size: int, max_new_tokens: int, decode_layout: bool | None) -> bool:
    if decode_layout is not None:
        return decode_layout
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or model.fused or batch_size > DECODE_LAYOUT_MAX_BATCH:
        return False
    return max_new_tokens >= DECODE_LAYOUT_MIN_TOKENS or _cached_decode_weights(model) is not None


# ----------------------------------------------------------------------------------------------
# The decoding loop
# ----------------------------------------------------------------------------------------------
def stream_generate(
    model,
    idx,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pad_id: int | None = None,
    prefill_chunk_size: int | None = None,
    cuda_graph: bool = False,
    decode_layout: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,) long, as soon as it is chosen.

    A sequence that has produced `eos_id` is finished: its later entries are `pad_id` (default:
    `eos_id`). The loop ends after `max_new_tokens` steps or when every sequence is finished.
    Arguments are those of `generate`; they are checked here, before any token is generated.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    tokens, lens = _as_batch(idx, device)  # (B, T), (B,)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= model.cfg.vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary [0, {model.cfg.vocab_size})")
    ctx = model.cfg.context_length
    longest = int(lens.max())
    if longest + max_new_tokens > ctx:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} "
            f"exceeds the model's context length {ctx}; shorten the prompt or ask for fewer tokens"
        )
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    if prefill_chunk_size is not None and (not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1):
        raise ValueError(f"prefill_chunk_size must be a positive int, got {prefill_chunk_size!r}")
    if cuda_graph and (device.type != "cuda" or not use_cache):
        raise ValueError(
            f"cuda_graph needs a CUDA device and the KV cache; got device={device.type}, use_cache={use_cache}"
        )
    if decode_layout is not None and not isinstance(decode_layout, bool):
        raise ValueError(f"decode_layout must be True, False or None (automatic), got {decode_layout!r}")
    decode_layout = use_cache and not cuda_graph and _wants_decode_layout(model, tokens.shape[0], max_new_tokens, decode_layout)
    return _steps(model, tokens, lens, max_new_tokens, temperature, top_k, top_p, eos_id, pad,
                  use_cache, generator, prefill_chunk_size, cuda_graph, decode_layout)


class DecodeThreads:
    """How many threads each decode step runs on, chosen by timing the steps themselves.

    The decode copies' products use every thread torch has (one row chunk each), and with the cores
    free that is the fastest way. On a shared machine it is the slowest: when another process holds a
    core, each of a step's ~50 parallel products waits for a descheduled thread (measured, 2 cores,
    one busy: 10.5 tokens/s on 2 threads, 22.7 on one). The load can come and go during a generation,
    so the choice is measured rather than guessed: step 0 runs on all n threads, step 1 on one, and
    the faster wins. The other is tried again after PROBE_EVERY steps, then, each time it loses, after
    four times as many, up to PROBE_MAX (a losing probe costs one slow step: at idle, 1-2% of a
    64-token run), and after PROBE_EVERY again when it wins. A step's result does not depend on the
    choice: each chunk's product is the same on any thread. The thread count is set for the decode
    call alone and put back after it (`run`), so the caller's code between two streamed tokens runs
    with its own."""

    PROBE_EVERY, PROBE_MAX = 8, 128

    def __init__(self, n: int):
        self.best, self.other = n, 1
        self.seconds = {}  # threads -> the latest few step times
        self.next_probe, self.wait = 1, self.PROBE_EVERY

    def for_step(self, step: int) -> int:
        return self.other if step == self.next_probe else self.best

    def run(self, step: int, decode_step):
        """decode_step() on this step's thread count, timed; the count set before it back afterwards."""
        k, own = self.for_step(step), torch.get_num_threads()
        torch.set_num_threads(k)
        t0 = time.perf_counter()
        try:
            out = decode_step()
        finally:
            torch.set_num_threads(own)
        self.record(step, k, time.perf_counter() - t0)
        return out

    def record(self, step: int, threads: int, seconds: float) -> None:
        self.seconds.setdefault(threads, []).append(seconds)
        self.seconds[threads] = self.seconds[threads][-3:]
        if step != self.next_probe:
            return
        recent = self.seconds.get(self.best)
        if not recent or seconds < statistics.median(recent):
            # the probe won: switch, and try the loser again at the base rate
            self.best, self.other, self.wait = threads, self.best, self.PROBE_EVERY
        else:
            self.wait = min(self.wait * 4, self.PROBE_MAX)
        self.next_probe = step + self.wait


def _on_weights(model, slots, args, kwargs):
    """model(*args, **kwargs) with each (Linear, copy) of `slots` running on its copy, put in place
    for the call and taken out after it: what torch.func.functional_call does, at a fraction of its
    cost per call (it resolves every name again; a decode step is only tens of milliseconds). Only
    the Linears' own entries change: a tied head's embedding keeps its table."""
    saved = [linear._parameters["weight"] for linear, _ in slots]
    try:
        for linear, w in slots:
            linear._parameters["weight"] = w
        return model(*args, **kwargs)
    finally:
        for (linear, _), w in zip(slots, saved):
            linear._parameters["weight"] = w


class _GraphedDecodeStep:
    """One decode step, `model(tok, cache, input_pos=lens)`, captured once as a CUDA graph and replayed.

    A decode step of a small model is dozens of tiny kernels whose launch overhead exceeds their
    run time; a graph replays them all with one launch. Everything a graph touches must keep its
    address, so the step reads its inputs from (and writes its logits to) static tensors, and the
    cache buffers are preallocated already. Nothing in the step may read a value on the host
    (`KVCaches.check` skips itself during the capture; the lengths were checked up front). That holds
    on both paths: the fused one's decode kernel leaves the length check to the cache
    (`FusedOps.decode_attention`), and its other kernels pick their launch configurations from
    shapes alone, so a replay launches the very kernels the capture recorded.
    """

    def __init__(self, model, cache, tok, lens):
        self.tok, self.pos = tok[:, None].clone(), lens.clone()  # (B, 1), (B,): static inputs
        # Warm up outside the capture (lazy initialisation, library handles) on a side stream, as
        # torch.cuda.graphs asks. It writes the keys of `tok` at `lens`: the slots the first real
        # step overwrites with the very same values, so the cache stays right.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(self.tok, cache=cache, input_pos=self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, does not run
            self.logits = model(self.tok, cache=cache, input_pos=self.pos)[:, -1]  # (B, V): static output

    def __call__(self, tok, lens):
        self.tok.copy_(tok[:, None])
        self.pos.copy_(lens)
        self.graph.replay()
        return self.logits  # (B, V), overwritten by the next replay


@torch.inference_mode()  # no autograd bookkeeping at all (no_grad still tracks versions and views)
def _steps(model, tokens, lens, max_new_tokens, temperature, top_k, top_p, eos_id, pad, use_cache,
           generator, prefill_chunk_size, cuda_graph, decode_layout):
    if max_new_tokens == 0:
        return
    decode, threads = model, None
    if decode_layout and torch.get_num_threads() > 1:
        threads = DecodeThreads(torch.get_num_threads())
    if decode_layout:
        slots = [(model.get_submodule(name.rpartition(".")[0]), w) for name, w in decode_weights(model).items()]

        def decode(*args, **kwargs):  # the model, on the decode-ready weights
            return _on_weights(model, slots, args, kwargs)
    B, longest = tokens.shape
    device = tokens.device
    was_training = model.training
    model.eval()
    try:
        # Room for every token: the prompt, right-padded, then the new tokens written at lens[b].
        buf = torch.full((B, longest + max_new_tokens), pad, dtype=torch.long, device=device)  # (B, L)
        buf[:, :longest] = tokens
        rows = torch.arange(B, device=device)  # (B,)
        finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
        # Every sequence as long as the longest (one prompt, or prompts of one length): the decode
        # positions are then one plain int, longest + step, known on the host. The PyTorch path then
        # writes the cache with a slice and attends over its filled part with no mask to build; the
        # fused path keeps the (B,) positions: its decode kernel skips the unfilled part itself.
        int_pos = not cuda_graph and not model.fused and bool((lens == longest).all())
        if use_cache:
            cache = KVCaches.for_model(model, B, max_len=longest + max_new_tokens)
            last = _prefill(decode, tokens, lens, cache, prefill_chunk_size)  # (B, V): own last real token
        for step in range(max_new_tokens):
            if not use_cache:
                # The plain loop: the whole prefix again; causal attention keeps each row's pads
                # (after its last real token) out of that token's logits.
                logits = model(buf[:, : longest + step])  # (B, T, V)
                last = logits[rows, lens - 1]  # (B, V)
            nxt = sample_next(last, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:  # (without an eos_id nothing ever finishes)
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)  # (B,)
            yield nxt
            if eos_id is not None:
                finished |= nxt == eos_id
                if bool(finished.all()):
                    return
            if step == max_new_tokens - 1:
                return  # the last token needs no forward
            if cuda_graph:
                if step == 0:
                    decode_step = _GraphedDecodeStep(model, cache, nxt, lens)
                last = decode_step(nxt, lens)  # (B, V)
            elif use_cache:
                # Decode: the one new token per sequence, at its own position lens[b].
                pos = longest + step if int_pos else lens

                def decode_step():
                    return decode(nxt[:, None], cache=cache, input_pos=pos)[:, -1]  # (B, V)

                last = decode_step() if threads is None else threads.run(step, decode_step)
            else:
                buf[rows, lens] = nxt
            lens = lens + 1
    finally:
        model.train(was_training)


def generate(
    model,
    idx,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pad_id: int | None = None,
    prefill_chunk_size: int | None = None,
    cuda_graph: bool = False,
    decode_layout: bool | None = None,
):
    """Continue each prompt by up to `max_new_tokens` tokens.

    idx: a (B, T) tensor of token ids, or a list of 1-D token sequences of different lengths.
    temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted to the
    `top_k` most likely tokens and/or the smallest set whose probability reaches `top_p`. `seed`
    (or a `generator`) makes sampling reproducible. A sequence stops at `eos_id` (kept in the
    output); in a tensor result the rest of its row is `pad_id` (default: `eos_id`).
    Raises ValueError if a prompt plus `max_new_tokens` would not fit the context length (nothing
    is cropped silently). `use_cache=False` re-runs the whole prefix every step (the reference);
    `prefill_chunk_size` runs the prompt through the cache in chunks; `cuda_graph` replays each
    decode step as one CUDA graph (CUDA and the KV cache; either path). `decode_layout` runs the
    cached decode on copies of the weights in the layout a CPU streams fastest (`decode_weights`):
    None decides (fp32 on a CPU, the PyTorch path, batch <= DECODE_LAYOUT_MAX_BATCH, and
    max_new_tokens >= DECODE_LAYOUT_MIN_TOKENS unless the copies are cached), True / False force it.

    Returns the same kind as `idx`: a (B, T + n) tensor (prompt then new tokens, n <= max_new_tokens),
    or a list of token-id lists (each prompt then its own new tokens, stopping at eos).
    """
    steps = list(
        stream_generate(
            model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_id=eos_id, use_cache=use_cache, seed=seed, generator=generator, pad_id=pad_id,
            prefill_chunk_size=prefill_chunk_size, cuda_graph=cuda_graph, decode_layout=decode_layout,
        )
    )
    if isinstance(idx, torch.Tensor):
        new = torch.stack(steps, dim=1) if steps else idx.new_zeros(idx.shape[0], 0)  # (B, n)
        return torch.cat([idx.to(new.device, torch.long), new], dim=1)  # (B, T + n)
    out = [list(map(int, torch.as_tensor(s).flatten().tolist())) for s in idx]
    for b, seq in enumerate(out):
        for step in steps:
            tok = int(step[b])
            seq.append(tok)
            if eos_id is not None and tok == eos_id:
                break
    return out
