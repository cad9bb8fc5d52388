"""The lessons, run and counted: what `python scripts/explain.py KERNEL` does, as functions tests can call.

`explain(op, ...)` runs one launch of a kernel (its forward; with backward=True its backward kernels)
on a small shape in Triton's interpreter under `tools.trace.trace()`, and returns a `Report`:

  * per launch, the block sizes read from the launch, the bytes read and written per kernel argument
    and the FLOPs of its tl.dots, all *measured* from the trace, next to the lesson's formula for the
    same launch (the `memory_traffic` / `flops` functions of the kernel's file, given the shape and
    the block sizes the launch used);
  * the physical minimum: each input read once, each output written once, and the FLOPs of the math
    itself (real rows only, no padding, no recomputation);
  * the lower bound on time these imply on an H100 and an H200: bytes / bandwidth against FLOPs / peak,
    and which of the two binds (for the measured counts and for the minimum);
  * for the row-wise kernels, the same counts for the unfused PyTorch sequences (every ATen op
    reading its operands and writing its result, counted by `tools.trace.TorchOpCounter`);
  * the pictures (matplotlib PNGs), when an output folder is given.

Measured bytes are what the programs request from memory (see tools/trace.py): on a GPU, re-reads of a
small working set (k and v of one head, LayerNorm's weights) mostly hit L2, so the measured count is an
upper bound on HBM traffic and the physical minimum a lower one.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import kernels._common  # noqa: F401  (switches on the interpreter off-GPU, before any kernel is defined)
from tools.trace import TorchOpCounter, trace

OPS = ("flash_attention", "decode_attention", "layer_norm", "add_layer_norm", "bias_gelu", "cross_entropy",
       "linear_cross_entropy")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# (HBM bandwidth in bytes/s, dense bf16 tensor-core peak in FLOP/s)
HARDWARE = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}
DEFAULT_SHAPES = {
    "flash_attention": (1, 1, 256, 256, 64),  # B, H, Tq, Tk, D
    "decode_attention": (2, 2, 1, 300, 64),  # B, H, Tq, L_max, D
    "layer_norm": (64, 768),  # M rows, N
    "add_layer_norm": (64, 768),
    "bias_gelu": (64, 3072),  # M rows, N = 4C
    "cross_entropy": (16, 5000),  # N rows, V
    "linear_cross_entropy": (256, 64, 4000),  # N rows, C, V (V / C as in GPT-2: chunks of 5 rows)
}
SHAPE_NAMES = {
    "flash_attention": "B,H,Tq,Tk,D", "decode_attention": "B,H,Tq,L_max,D", "layer_norm": "M,N",
    "add_layer_norm": "M,N", "bias_gelu": "M,N", "cross_entropy": "N,V", "linear_cross_entropy": "N,C,V",
}
LOG2E = 1.4426950408889634


@dataclass
class KernelCount:
    label: str  # the lesson's name for the launch, e.g. "fwd", "bwd_dkdv"
    kernel: str  # the @triton.jit function
    grid: tuple
    blocks: dict  # the launch's block sizes (and other constexprs)
    measured: dict  # argument -> {"read", "written"} bytes, from the trace
    distinct: dict  # the same, counting each element once (a perfect cache)
    formula: dict  # argument -> {"read", "written"}, from the lesson's memory_traffic
    flops: int  # tl.dot FLOPs from the trace
    flops_formula: int  # from the lesson's flops

    @property
    def matches(self) -> bool:
        return self.measured == self.formula and self.flops == self.flops_formula

    def totals(self) -> dict:
        return {k: sum(v[k] for v in self.measured.values()) for k in ("read", "written")}


@dataclass
class Report:
    op: str
    shape: dict
    dtype: str
    backward: bool
    kernels: list = field(default_factory=list)  # [KernelCount]
    minimum: dict = field(default_factory=dict)  # {"read", "written", "flops"} of the op as a whole
    bounds: dict = field(default_factory=dict)  # {"measured"|"minimum": {gpu: {...}}}
    extra: dict = field(default_factory=dict)  # op-specific facts (visited tiles, online softmax, unfused ...)
    pictures: list = field(default_factory=list)

    def measured_totals(self) -> dict:
        tot = {"read": 0, "written": 0, "flops": 0}
        for k in self.kernels:
            if k.label.startswith("prefill."):  # a second case, for its picture: not part of this run's totals
                continue
            t = k.totals()
            tot["read"] += t["read"]
            tot["written"] += t["written"]
            tot["flops"] += k.flops
        for k in ("read", "written", "flops"):
            tot[k] += self.extra.get("torch_ops", {}).get(k, 0)
        return tot

    def to_json(self) -> dict:
        d = asdict(self)
        for k, kc in zip(d["kernels"], self.kernels):
            k["matches_formula"] = kc.matches
        d["measured_totals"] = self.measured_totals()
        return d


def time_bounds(nbytes: int, flops: int) -> dict:
    """{gpu: {"memory_s", "compute_s", "bound_s", "binds"}}: no kernel can beat moving its bytes at
    full bandwidth nor doing its FLOPs at full peak; the larger of the two is the lower bound. The
    peak is the dense bf16/fp16 tensor-core one, whatever the traced dtype: fp32 dots with
    input_precision="ieee" run on the FMA units, far slower, so for fp32 the compute bound is optimistic."""
    out = {}
    for gpu, (bw, peak) in HARDWARE.items():
        mem, comp = nbytes / bw, flops / peak
        out[gpu] = {"memory_s": mem, "compute_s": comp, "bound_s": max(mem, comp),
                    "binds": "memory" if mem >= comp else "compute"}
    return out


def _rw(d: dict) -> dict:
    return {a: {"read": int(r), "written": int(w)} for a, (r, w) in d.items()}


def _count(launch, label, formula: dict, flops_formula: int) -> KernelCount:
    names = set(formula)
    measured = {a: dict(v) for a, v in launch.bytes(names).items()}
    blocks = {k: v for k, v in launch.args.items() if isinstance(v, (int, bool)) and k.isupper()}
    return KernelCount(label, launch.kernel, launch.grid, blocks, measured, launch.distinct_bytes(names),
                       _rw(formula), launch.flops(), int(flops_formula))


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _gen(seed: int):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# flash attention
# ----------------------------------------------------------------------------------------------
_FA_LABELS = {"_flash_attention_fwd_kernel": "fwd", "_flash_attention_bwd_preprocess_kernel": "bwd_preprocess",
              "_flash_attention_bwd_dkdv_kernel": "bwd_dkdv", "_flash_attention_bwd_dq_kernel": "bwd_dq"}


def _fa_counts(fa, launches, B, H, Tq, Tk, D, e, causal, prefix=""):
    out = []
    for launch in launches:
        label = _FA_LABELS[launch.kernel]
        bm, bn = launch.args.get("BLOCK_M", 1), launch.args.get("BLOCK_N", 1)
        fused = {"fused_dq": bool(launch.args.get("FUSED_DQ", False))}
        out.append(_count(launch, prefix + label, fa.memory_traffic(label, B, H, Tq, Tk, D, e, bm, bn, causal, **fused),
                          fa.flops(label, B, H, Tq, Tk, D, bm, bn, causal, **fused)))
    return out


def _tile_of(event, T, D, block) -> int:
    """The tile index (along the sequence) of a load from a (B, H, T, D) tensor."""
    return int(((event.index // D) % T).min()) // block


def tile_schedule(launch, T_other: int, D: int, streamed: str, block_streamed: int, score_shape: tuple) -> dict:
    """Per program of (batch 0, head 0): the tiles of `streamed` ("K" or "Q") it visits, in order, each
    with whether a mask was applied to its score tile (a tl.where over a score-shaped condition between
    this tile's first dot and the next tile) and how many scores that mask removed.
    Returns {program tile index: [(streamed tile index, masked, masked-out lanes)]}."""
    sched = {}
    for pid, evs in launch.programs.items():
        if pid[1] or pid[2]:
            continue
        visits = []
        for e in evs:
            if e.kind == "load" and e.arg == streamed and e.active:
                visits.append([_tile_of(e, T_other, D, block_streamed), False, 0])
            elif e.kind == "where" and visits and e.shape == score_shape:
                visits[-1][1] = True
                visits[-1][2] += e.active
        sched[pid[0]] = [tuple(v) for v in visits]
    return sched


def online_softmax_trace(launch, row: int, Tq: int, Tk: int, D: int, sm_scale: float) -> dict:
    """Re-derive, from the traced score tiles of the forward program that owns query `row`, the
    online softmax state of that row after each key tile: the running max m, the running sum l and
    the rescale factor alpha (base 2, as in the kernel), and its end m + log2 l, next to the LSE2 the
    kernel stored. The tracer cannot see the kernel's registers, but it sees every dot's result and
    every tl.where's condition, which is all the state is made of."""
    bm, bn = launch.args["BLOCK_M"], launch.args["BLOCK_N"]
    evs = launch.programs[(row // bm, 0, 0)]
    r = row % bm
    qk_scale = np.float32(sm_scale * LOG2E)
    m, l = np.float32(-np.inf), np.float32(0.0)
    steps, tile, expect_scores = [], None, False
    pending = None
    for e in evs:
        if e.kind == "load" and e.arg == "K" and e.active:
            if pending is not None:
                steps.append(pending)
            tile, expect_scores, pending = _tile_of(e, Tk, D, bn), True, None
        elif e.kind == "dot" and expect_scores:
            pending = {"tile": tile, "scores": e.value[r].astype(np.float32), "keep": None}
            expect_scores = False
        elif e.kind == "where" and pending is not None and e.shape == (bm, bn) and pending["keep"] is None:
            pending["keep"] = e.value[r]
    if pending is not None:
        steps.append(pending)
    out = []
    for s in steps:
        qk = s["scores"] if s["keep"] is None else np.where(s["keep"], s["scores"], np.float32(-np.inf))
        m_new = np.maximum(m, np.float32(qk.max() * qk_scale))
        alpha = np.exp2(np.float32(m - m_new))
        # fma(qk, qk_scale, -m_new): the product of two fp32 numbers is exact in fp64, one rounding after
        p = np.exp2((qk.astype(np.float64) * np.float64(qk_scale) - np.float64(m_new)).astype(np.float32))
        l = np.float32(l * alpha + p.sum(dtype=np.float32))
        m = m_new
        out.append({"tile": s["tile"], "m": float(m), "l": float(l), "alpha": float(alpha),
                    "masked": s["keep"] is not None})
    lse = launch.args["LSE"].reshape(-1)[row].item()  # batch 0, head 0
    return {"row": row, "steps": out, "end": float(m + np.log2(l)), "saved_lse2": lse}


def _explain_flash_attention(shape, dtype, backward, out, seed, prefill=None, row=None, causal=True):
    from kernels import flash_attention as fa

    B, H, Tq, Tk, D = shape
    g = _gen(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, H, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, H, Tk, D, generator=g).to(dtype)
    e = q.element_size()
    sm_scale = 1.0 / math.sqrt(D)
    q.requires_grad_(backward)
    k.requires_grad_(backward)
    v.requires_grad_(backward)
    with trace(values=True) as fwd:
        o = fa.flash_attention(q, k, v, causal=causal)
    rep = Report("flash_attention", dict(zip(("B", "H", "Tq", "Tk", "D"), shape)), str(dtype).replace("torch.", ""),
                 backward)
    rep.shape["causal"] = causal
    rep.kernels += _fa_counts(fa, fwd, B, H, Tq, Tk, D, e, causal)
    launch = fwd[0]
    bm, bn = launch.args["BLOCK_M"], launch.args["BLOCK_N"]
    sched = tile_schedule(launch, Tk, D, "K", bn, (bm, bn))
    visited = sum(len(v) for v in sched.values())
    rep.extra["visited_tiles"] = {"traced": visited, "closed_form": fa.visited_tiles(Tq, Tk, bm, bn, causal),
                                  "non_causal": -(-Tq // bm) * -(-Tk // bn)}
    row = Tq - 1 if row is None else row
    rep.extra["online_softmax"] = online_softmax_trace(launch, row, Tq, Tk, D, sm_scale)
    pairs = sum(min(Tk, i + Tk - Tq + 1) for i in range(Tq)) if causal else Tq * Tk  # visible (query, key) pairs
    rep.extra["visible_pairs"] = pairs
    minimum = {"read": _nbytes(q, k, v), "written": _nbytes(o) + B * H * Tq * 4, "flops": B * H * 4 * D * pairs}
    schedules = {"fwd": (sched, Tq, Tk, bm, bn)}
    if backward:
        do = torch.randn(o.shape, generator=g).to(dtype)
        with trace() as bwd:
            o.backward(do)
        rep.kernels += _fa_counts(fa, bwd, B, H, Tq, Tk, D, e, causal)
        by = {launch.kernel: launch for launch in bwd}
        dkdv, dq = by["_flash_attention_bwd_dkdv_kernel"], by.get("_flash_attention_bwd_dq_kernel")
        schedules["dkdv"] = (tile_schedule(dkdv, Tq, D, "Q", dkdv.args["BLOCK_M"],
                                           (dkdv.args["BLOCK_M"], dkdv.args["BLOCK_N"])),
                             Tq, Tk, dkdv.args["BLOCK_M"], dkdv.args["BLOCK_N"])
        if dq is not None:  # else dQ came from the dK/dV programs (FUSED_DQ: one key tile holds every key)
            schedules["dq"] = (tile_schedule(dq, Tk, D, "K", dq.args["BLOCK_N"], (dq.args["BLOCK_M"], dq.args["BLOCK_N"])),
                               Tq, Tk, dq.args["BLOCK_M"], dq.args["BLOCK_N"])
        # backward: read q, k, v, o, dO, LSE; write dq, dk, dv; dV, dP, dQ, dK: 8 D FLOPs per visible pair
        minimum["read"] += _nbytes(o, do) + B * H * Tq * 4
        minimum["written"] += _nbytes(q, k, v)
        minimum["flops"] += B * H * 8 * D * pairs
    # A prompt of Tp < Tk queries against the Tk keys of a cache: the mask aligned bottom-right.
    Tp = prefill if prefill is not None else max(1, Tq // 2)
    if causal and 1 <= Tp <= Tk:  # prefill=0: no prefill case
        qp = torch.randn(B, H, Tp, D, generator=g).to(dtype)
        with trace() as pre:
            fa.flash_attention(qp, k.detach(), v.detach(), causal=True)
        rep.kernels += _fa_counts(fa, pre, B, H, Tp, Tk, D, e, True, prefix="prefill.")
        pl = pre[0]
        schedules["prefill"] = (tile_schedule(pl, Tk, D, "K", pl.args["BLOCK_N"], (pl.args["BLOCK_M"], pl.args["BLOCK_N"])),
                                Tp, Tk, pl.args["BLOCK_M"], pl.args["BLOCK_N"])
        rep.extra["prefill"] = {"Tq": Tp, "Tk": Tk, "visited_tiles": sum(len(v) for v in schedules["prefill"][0].values()),
                                "closed_form": fa.visited_tiles(Tp, Tk, pl.args["BLOCK_M"], pl.args["BLOCK_N"], True)}
    rep.minimum = minimum
    if out:
        from tools import explain_plots as plots

        rep.pictures.append(plots.attention_tiles(schedules, out))
        if backward:
            rep.pictures.append(plots.backward_orders(schedules, out))
        rep.pictures.append(plots.online_softmax(rep.extra["online_softmax"], out))
    return rep


# ----------------------------------------------------------------------------------------------
# decode attention
# ----------------------------------------------------------------------------------------------
def _explain_decode_attention(shape, dtype, backward, out, seed, seq_lens=None):
    from kernels import decode_attention as da

    if backward:
        raise ValueError("decode_attention is inference only: it has no backward kernels")
    B, H, Tq, L, D = shape
    lens = list(seq_lens) if seq_lens else [L - (b * (L // 2)) // max(B - 1, 1) for b in range(B)]
    if len(lens) != B or not all(Tq <= n <= L for n in lens):
        raise ValueError(f"--lens needs {B} lengths in [{Tq}, {L}], got {lens}")
    g = _gen(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, H, L, D, generator=g).to(dtype)
    v = torch.randn(B, H, L, D, generator=g).to(dtype)
    sl = torch.tensor(lens)
    with torch.no_grad(), trace() as launches:
        o = da.decode_attention(q, k, v, sl)
    rep = Report("decode_attention", dict(zip(("B", "H", "Tq", "L_max", "D"), shape), seq_lens=lens),
                 str(dtype).replace("torch.", ""), False)
    e = q.element_size()
    for launch in launches:
        label = {"_decode_attention_fwd_kernel": "fwd", "_decode_attention_combine_kernel": "combine"}[launch.kernel]
        a = launch.args
        ns = a["num_splits"]
        rep.kernels.append(_count(launch, label, da.memory_traffic(label, H, Tq, D, e, lens, ns),
                                  da.flops(label, H, Tq, D, lens, ns, L, a.get("BLOCK_T", 1), a.get("BLOCK_N", 1),
                                           a["BLOCK_D"])))
    split, combine = launches
    ns, bn = split.args["num_splits"], split.args["BLOCK_N"]
    # What each split program read of the cache (b, h = 0), from its K loads.
    reads = {}
    for pid, evs in split.programs.items():
        b, h = divmod(pid[0], H)
        if h:
            continue
        rows = [((ev.index // D) % L) for ev in evs if ev.kind == "load" and ev.arg == "K" and ev.active]
        rows = np.concatenate(rows) if rows else np.empty(0, np.int64)
        reads[(b, pid[1])] = (int(rows.min()), int(rows.max()) + 1) if rows.size else None
    # The exact combine, for (b, h, t) = (0, 0, 0): w_i = 2^(lse_i - max) / sum, o = sum_i w_i o_i.
    lse = split.args["LSE_part"][0, :, 0].double()
    o_part = split.args["O_part"][0, :, 0].double()
    w = torch.exp2(lse - lse.max())
    w = w / w.sum()
    combined = (w[:, None] * o_part).sum(0)
    rep.extra["splits"] = {"num_splits": ns, "BLOCK_N": bn, "ranges": {f"b{b}.s{s}": r for (b, s), r in reads.items()},
                           "formula_ranges": {f"b{b}": [r if r[1] > r[0] else None for r in da.split_ranges(L, n, bn, ns)]
                                              for b, n in enumerate(lens)}}
    rep.extra["combine"] = {"lse2": lse.tolist(), "weights": w.tolist(),
                            "max_abs_diff_vs_kernel": float((combined - o[0, 0, 0].double()).abs().max())}
    visible = sum(n - Tq + t + 1 for n in lens for t in range(Tq))  # keys each query sees
    rep.minimum = {"read": _nbytes(q) + 2 * H * sum(lens) * D * e, "written": _nbytes(o),
                   "flops": H * 4 * D * visible}
    if out:
        from tools import explain_plots as plots

        rep.pictures.append(plots.decode_splits(reads, lens, L, ns, bn, rep.extra["combine"], out))
    return rep


# ----------------------------------------------------------------------------------------------
# the row-wise kernels
# ----------------------------------------------------------------------------------------------
def _backward(y, counter, grad_of, leaves):
    """Gradients of the output(s) y for the leaves, with random output gradients made uncounted.
    torch.autograd.grad, not .backward(): the leaves' .grad accumulation (a copy when the gradient
    buffer is still referenced, as a fused kernel's saved gradient is) belongs to the driver, not the op."""
    outs = y if isinstance(y, tuple) else (y,)
    with counter.paused():
        grads = [torch.ones_like(t) if t.dim() == 0 else grad_of(t) for t in outs]
    torch.autograd.grad(outs, [t for t in leaves if t.requires_grad], grads)


def _count_torch(fn, backward: bool, grad_of, leaves):
    """Run fn() (and, with backward, its backward) under a TorchOpCounter, outside any trace: the eager
    PyTorch sequence's traffic."""
    with TorchOpCounter() as c:
        y = fn()
        if backward:
            _backward(y, c, grad_of, leaves)
    return c


def _unfused(rep, variants: dict, backward: bool, grad_of, leaves):
    rep.extra["unfused"] = {}
    for name, fn in variants.items():
        c = _count_torch(fn, backward, grad_of, leaves)
        rep.extra["unfused"][name] = {**c.totals(), "ops": len(c.ops)}


def _explain_rowwise(op, shape, dtype, backward, out, seed):
    from kernels import reference

    g = _gen(seed)
    rep = Report(op, dict(zip(SHAPE_NAMES[op].split(","), shape)), str(dtype).replace("torch.", ""), backward)

    def rand(*s, dt=dtype, req=backward):
        return torch.randn(*s, generator=g).to(dt).requires_grad_(req)

    def grad_of(y):
        return torch.randn(y.shape, generator=_gen(seed + 1)).to(y.dtype)

    torch_ops = TorchOpCounter()
    if op in ("layer_norm", "add_layer_norm"):
        from kernels import layer_norm as ln

        M, N = shape
        x, w, b = rand(M, N), rand(N, dt=torch.float32), rand(N, dt=torch.float32)
        r = rand(M, N) if op == "add_layer_norm" else None
        fused = (lambda: ln.add_layer_norm(x, r, w, b)) if r is not None else (lambda: ln.layer_norm(x, w, b))
        leaves = [x, w, b] + ([r] if r is not None else [])
        launches, y = _run_fused(fused, backward, grad_of, torch_ops, leaves)
        ng = next((la.grid[0] for la in launches if la.kernel == "_layer_norm_bwd_kernel"), 1)
        labels = {"_layer_norm_fwd_kernel": "fwd", "_layer_norm_bwd_kernel": "bwd", "_sum_partials_kernel": "sum_partials"}
        for la in launches:
            lab = labels[la.kernel]
            rep.kernels.append(_count(la, lab, ln.memory_traffic(lab, M, N, x.element_size(), w.element_size(),
                                                                 r is not None, ng), ln.flops(lab)))
        t, s = _nbytes(x), M * 4
        if r is None:
            rep.minimum = {"read": t + _nbytes(w, b), "written": t + 2 * s, "flops": 0}
            if backward:
                rep.minimum["read"] += 2 * t + 2 * s + _nbytes(w)  # x, dY, mean, rstd, w
                rep.minimum["written"] += t + _nbytes(w, b)  # dX, dW, dB
            variants = {"book formula (eager)": lambda: reference.layer_norm(x, w, b),
                        "PyTorch F.layer_norm": lambda: torch.nn.functional.layer_norm(x, (N,), w, b)}
        else:
            rep.minimum = {"read": 2 * t + _nbytes(w, b), "written": 2 * t + 2 * s, "flops": 0}
            if backward:
                rep.minimum["read"] += 3 * t + 2 * s + _nbytes(w)  # h, dY, dh, mean, rstd, w
                rep.minimum["written"] += t + _nbytes(w, b)  # dH (= dX = dR), dW, dB
            variants = {"x + r, then F.layer_norm": lambda: _add_then_ln(x, r, w, b)}
    elif op == "bias_gelu":
        from kernels import bias_gelu as bg

        M, N = shape
        x, b = rand(M, N), rand(N, dt=torch.float32)
        leaves = [x, b]
        launches, y = _run_fused(lambda: bg.bias_gelu(x, b), backward, grad_of, torch_ops, leaves)
        ng = next((la.grid[0] for la in launches if la.kernel == "_bias_gelu_bwd_kernel"), 1)
        labels = {"_bias_gelu_fwd_kernel": "fwd", "_bias_gelu_bwd_kernel": "bwd", "_sum_partials_kernel": "sum_partials"}
        for la in launches:
            lab = labels[la.kernel]
            rep.kernels.append(_count(la, lab, bg.memory_traffic(lab, M, N, x.element_size(), b.element_size(),
                                                                 la.args.get("BLOCK_M", 1), ng), bg.flops(lab)))
        t = _nbytes(x)
        rep.minimum = {"read": t + _nbytes(b), "written": t, "flops": 0}
        if backward:
            rep.minimum["read"] += 2 * t + _nbytes(b)
            rep.minimum["written"] += t + _nbytes(b)
        variants = {"book formula (eager)": lambda: reference.bias_gelu(x, b),
                    "PyTorch x + b, F.gelu": lambda: torch.nn.functional.gelu(x + b, approximate="tanh")}
    elif op == "cross_entropy":
        from kernels import cross_entropy as ce

        N, V = shape
        logits = rand(N, V, req=True)  # the gradient is written in the forward either way
        target = torch.randint(0, V, (N,), generator=g)
        target[N // 2] = -100  # one ignored row, to show it costs no logits read
        n_valid = int((target != -100).sum())
        leaves = [logits]
        launches, y = _run_fused(lambda: ce.cross_entropy(logits, target), backward, grad_of, torch_ops, leaves)
        for la in launches:
            rep.kernels.append(_count(la, "fwd", ce.memory_traffic("fwd", N, V, logits.element_size(), n_valid),
                                      ce.flops("fwd")))
        rep.minimum = {"read": n_valid * V * logits.element_size() + _nbytes(target), "written": N * 4 + _nbytes(logits),
                       "flops": 0}
        variants = {"PyTorch F.cross_entropy": lambda: torch.nn.functional.cross_entropy(logits, target)}
    elif op == "linear_cross_entropy":
        lce, lce_traffic, lce_flops = _linear_cross_entropy_lesson()
        N, C, V = shape
        x, W = rand(N, C, req=True), rand(V, C, req=True)
        target = torch.randint(0, V, (N,), generator=g)
        target[N // 2] = -100
        n_valid = int((target != -100).sum())
        leaves = [x, W]
        launches, y = _run_fused(lambda: lce(x, W, target), backward, grad_of, torch_ops, leaves)
        chunk = launches[0].grid[0] if launches else N
        fm = lce_traffic(N, C, V, x.element_size(), n_valid, chunk)
        kern = {a: v for a, v in fm.items() if a != "matmul"}
        tot = {}
        for la in launches:  # one launch per chunk: their sum against the formula's sum
            for a, rw in la.bytes(set(kern)).items():
                t = tot.setdefault(a, {"read": 0, "written": 0})
                t["read"] += rw["read"]
                t["written"] += rw["written"]
        mm, acc = torch_ops.totals(TorchOpCounter.MATMULS), torch_ops.totals(("add_",))
        tot["matmul"] = {"read": mm["read"], "written": mm["written"]}
        tot["add_"] = {"read": acc["read"], "written": acc["written"]}
        rep.kernels.append(KernelCount(f"fwd x {len(launches)} chunks + matmuls", launches[0].kernel if launches else "",
                                       launches[0].grid if launches else (), {"chunk_size": chunk}, tot, {},
                                       _rw(fm), mm["flops"], lce_flops(N, C, V)))
        e = x.element_size()
        rep.minimum = {"read": _nbytes(x, W, target), "written": N * 4 + _nbytes(x, W), "flops": 6 * N * V * C}
        variants = {"PyTorch F.linear, F.cross_entropy":
                    lambda: torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, W), target)}
        rep.extra["logits_bytes_never_held"] = N * V * e
    else:
        raise ValueError(f"unknown op {op!r}")
    # The torch ops around the kernels (checks, views' copies, reductions; not linear_cross_entropy's
    # matmuls and dW accumulation, which its count above holds): measured, added to the totals, in no lesson formula.
    counted = TorchOpCounter.MATMULS + (("add_",) if op == "linear_cross_entropy" else ())
    others = [o for o in torch_ops.ops if o["op"] not in counted]
    rep.extra["torch_ops"] = {k: sum(o[k] for o in others) for k in ("read", "written", "flops")}
    rep.extra["torch_ops"]["ops"] = len(others)
    _unfused(rep, variants, backward, grad_of, leaves)
    if out:
        from tools import explain_plots as plots

        rep.pictures.append(plots.rowwise_bytes(rep, out))
    return rep


def _linear_cross_entropy_lesson():
    """(the op, its memory_traffic, its flops): from kernels/linear_cross_entropy.py once it has a file
    (and counts) of its own, else from the section of kernels/cross_entropy.py that holds them."""
    from kernels import cross_entropy as ce

    try:
        from kernels import linear_cross_entropy as own
    except ImportError:
        own = None
    op = own.linear_cross_entropy if own is not None else ce.linear_cross_entropy
    if own is not None and hasattr(own, "memory_traffic"):
        return op, own.memory_traffic, own.flops
    return op, ce.linear_cross_entropy_memory_traffic, ce.linear_cross_entropy_flops


def _add_then_ln(x, r, w, b):
    h = x + r
    return h, torch.nn.functional.layer_norm(h, (x.shape[-1],), w, b)


def _run_fused(fn, backward, grad_of, counter, leaves):
    """fn() and, with backward, its backward, under a trace (the Triton launches) and a TorchOpCounter
    (the torch ops around them: checks, reductions, linear_cross_entropy's matmuls)."""
    with trace() as launches, counter:
        y = fn()
        if backward:
            _backward(y, counter, grad_of, leaves)
    return launches, y


# ----------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------
def explain(op: str, shape=None, dtype=torch.float32, backward: bool = False, out=None, seed: int = 0,
            **options) -> Report:
    """Run, trace and count one op (see the module docstring). shape: see SHAPE_NAMES (None: the
    default); out: a folder for the PNGs (None: no pictures); options: prefill=Tq and row=i for
    flash_attention, seq_lens=[...] for decode_attention."""
    if op not in OPS:
        raise ValueError(f"unknown kernel {op!r}; choose from {', '.join(OPS)}")
    shape = tuple(DEFAULT_SHAPES[op] if shape is None else shape)
    if len(shape) != len(SHAPE_NAMES[op].split(",")) or min(shape) < 1:
        raise ValueError(f"{op}: --shape is {SHAPE_NAMES[op]} (positive integers), got {','.join(map(str, shape))}")
    if out:
        os.makedirs(out, exist_ok=True)
    if op == "flash_attention":
        rep = _explain_flash_attention(shape, dtype, backward, out, seed, **options)
    elif op == "decode_attention":
        rep = _explain_decode_attention(shape, dtype, backward, out, seed, **options)
    else:
        if options:
            raise ValueError(f"{op} takes no options {sorted(options)}")
        rep = _explain_rowwise(op, shape, dtype, backward, out, seed)
    tot = rep.measured_totals()
    rep.bounds = {"measured": time_bounds(tot["read"] + tot["written"], tot["flops"]),
                  "minimum": time_bounds(rep.minimum["read"] + rep.minimum["written"], rep.minimum["flops"])}
    return rep


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.3f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


def format_report(rep: Report) -> str:
    """The report as text: one block per launch, then the totals, the minimum and the time bounds."""
    lines = [f"{rep.op}  shape {rep.shape}  dtype {rep.dtype}{'  (+ backward)' if rep.backward else ''}"]
    for k in rep.kernels:
        lines.append(f"\n[{k.label}] {k.kernel}  grid {tuple(k.grid)}  blocks "
                     + ", ".join(f"{n}={v}" for n, v in k.blocks.items()))
        lines.append(f"  {'tensor':<14}{'read (trace)':>14}{'read (lesson)':>15}{'written (trace)':>17}"
                     f"{'written (lesson)':>18}{'distinct r+w':>14}")
        for a in sorted(set(k.measured) | set(k.formula)):
            m, f = k.measured.get(a, {"read": 0, "written": 0}), k.formula.get(a, {"read": 0, "written": 0})
            d = k.distinct.get(a, {})
            lines.append(f"  {a:<14}{m['read']:>14,}{f['read']:>15,}{m['written']:>17,}{f['written']:>18,}"
                         f"{sum(d.values()) if d else '':>14}")
        lines.append(f"  dot FLOPs: trace {k.flops:,}, lesson {k.flops_formula:,}   "
                     + ("trace == lesson" if k.matches else "TRACE AND LESSON DIFFER"))
    for key, val in rep.extra.items():
        if key == "online_softmax":
            lines.append(f"\nonline softmax of query row {val['row']} (base 2), after each key tile:")
            for s in val["steps"]:
                lines.append(f"  key tile {s['tile']:>3}{' (masked)' if s['masked'] else '         '}  m = {s['m']:9.5f}"
                             f"  l = {s['l']:11.5f}  alpha = {s['alpha']:.6f}")
            lines.append(f"  m + log2 l = {val['end']:.6f};  the kernel saved LSE2 = {val['saved_lse2']:.6f}")
        elif key == "unfused":
            lines.append("\nunfused PyTorch sequences (each ATen op reads its operands and writes its result):")
            for name, t in val.items():
                lines.append(f"  {name:<34} {t['ops']:>3} ops  read {_fmt_bytes(t['read']):>10}  "
                             f"written {_fmt_bytes(t['written']):>10}")
        else:
            lines.append(f"\n{key}: {val}")
    tot = rep.measured_totals()
    lines.append(f"\nmeasured total: read {_fmt_bytes(tot['read'])}, written {_fmt_bytes(tot['written'])}, "
                 f"{tot['flops']:,} FLOPs (tl.dot{' + torch matmuls' if rep.op == 'linear_cross_entropy' else ''})")
    mn = rep.minimum
    lines.append(f"physical minimum: read {_fmt_bytes(mn['read'])}, written {_fmt_bytes(mn['written'])}, "
                 f"{mn['flops']:,} FLOPs (each input read once, each output written once, real rows only)")
    for which, b in rep.bounds.items():
        for gpu, t in b.items():
            lines.append(f"lower bound on time, {which:<8} on an {gpu}: {_fmt_time(t['bound_s'])} "
                         f"(memory {_fmt_time(t['memory_s'])}, compute {_fmt_time(t['compute_s'])}: {t['binds']} binds)")
    if rep.pictures:
        lines.append("\npictures: " + ", ".join(rep.pictures))
    return "\n".join(lines)
