"""scripts/explain.py and its tracer: the lessons' counts are checked facts.

Every kernel is traced in Triton's interpreter (tools/trace.py records each program's loads and
stores with their masks, and its dots); the bytes and FLOPs it measures must equal, exactly, the
formulas of the kernel files' "lesson's counts" sections, at awkward shapes. Off-GPU only: the tracer
watches the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels._common import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="the tracer watches Triton's interpreter (CPU runs)")

if INTERPRET:
    from tools.explain import explain
    from tools.trace import TorchOpCounter

ROOT = Path(__file__).resolve().parent.parent
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def assert_matches(rep):
    assert rep.kernels, "no launch was traced"
    for k in rep.kernels:
        assert k.measured == k.formula, (k.label, k.measured, k.formula)
        assert k.flops == k.flops_formula, (k.label, k.flops, k.flops_formula)


# ----------------------------------------------------------------------------------------------
# the tracer itself, on a kernel small enough to count by hand
# ----------------------------------------------------------------------------------------------
def test_tracer_counts_unmasked_lanes_dots_and_programs():
    import triton
    import triton.language as tl

    from tools.trace import trace

    @triton.jit
    def copy_and_square(X, Y, A, C, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n, other=0.0)
        tl.store(Y + offs, x, mask=offs < n)
        r = tl.arange(0, 16)
        a = tl.load(A + r[:, None] * 16 + r[None, :])  # no mask: all 256 lanes
        tl.store(C + r[:, None] * 16 + r[None, :], tl.dot(a, a, input_precision="ieee"))

    n = 37
    x, y = torch.randn(n), torch.empty(n)
    a, c = torch.randn(16, 16, dtype=torch.float64).float(), torch.empty(16, 16)
    with trace() as launches:
        copy_and_square[(3,)](x, y, a, c, n, BLOCK=16)
    (launch,) = launches
    assert launch.grid == (3, 1, 1) and launch.args["BLOCK"] == 16
    assert sorted(launch.programs) == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    assert launch.bytes() == {"X": {"read": n * 4, "written": 0}, "Y": {"read": 0, "written": n * 4},
                              "A": {"read": 3 * 256 * 4, "written": 0}, "C": {"read": 0, "written": 3 * 256 * 4}}
    assert launch.distinct_bytes()["A"] == {"read": 256 * 4, "written": 0}
    assert launch.flops() == 3 * 2 * 16 * 16 * 16
    last = [e for e in launch.programs[(2, 0, 0)] if e.arg == "X"][0]
    assert (last.lanes, last.active) == (16, n - 32) and last.index.tolist() == list(range(32, n))
    assert torch.equal(y, x)  # the kernel still ran


# ----------------------------------------------------------------------------------------------
# flash attention
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype,causal", [
    ((1, 2, 37, 37, 24), F32, True),  # ragged tiles, a head dim padded to 32
    ((2, 1, 5, 71, 16), BF16, True),  # a prefill: 5 queries against 71 keys
    ((1, 1, 130, 130, 64), F16, True),  # one key tile past the last full one
    ((1, 1, 33, 50, 32), F32, False),
])
def test_flash_attention_counts_equal_the_lesson(shape, dtype, causal):
    rep = explain("flash_attention", shape, dtype, backward=True, causal=causal, prefill=shape[2] // 2 or 1)
    assert_matches(rep)
    labels = [k.label for k in rep.kernels]
    assert labels[:4] == ["fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"]
    tiles = rep.extra["visited_tiles"]
    assert tiles["traced"] == tiles["closed_form"]
    if not causal:
        assert tiles["traced"] == tiles["non_causal"]
    # Each input is read (at least) once and each output written once: the distinct elements touched.
    fwd = rep.kernels[0]
    B, H, Tq, Tk, D = shape
    e = torch.tensor([], dtype=dtype).element_size()
    assert fwd.distinct["Q"]["read"] == B * H * Tq * D * e
    assert fwd.distinct["K"]["read"] == B * H * Tk * D * e
    assert fwd.distinct["O"]["written"] == B * H * Tq * D * e


def test_fused_dq_counts_equal_the_lesson():
    """A configuration whose one key tile holds every key: the dK/dV launch writes dQ too (one more
    dot per tile pair) and no dQ launch follows. The lesson's counts with fused_dq=True."""
    from kernels import flash_attention as fa
    from tools.explain import KernelCount, _fa_counts
    from tools.trace import trace

    B, H, Tq, Tk, D = 1, 2, 45, 70, 24
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(B, H, Tq, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H, Tk, D, generator=g) for _ in range(2))
    config = {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
    o, lse = fa.flash_attention_forward(q, k, v, True, 0.2, config=config)
    with trace() as launches:
        fa.flash_attention_backward(do, q, k, v, o, lse, True, 0.2, config=config)
    counts: list[KernelCount] = _fa_counts(fa, launches, B, H, Tq, Tk, D, 4, True)
    assert [c.label for c in counts] == ["bwd_preprocess", "bwd_dkdv"]
    assert counts[1].blocks["FUSED_DQ"] and counts[1].measured["DQ"]["written"] == B * H * Tq * D * 4
    for c in counts:
        assert c.measured == c.formula, (c.label, c.measured, c.formula)
        assert c.flops == c.flops_formula, (c.label, c.flops, c.flops_formula)


@pytest.mark.parametrize("Tq,Tk", [(128, 128), (256, 256), (64, 192)])
def test_causal_tiles_visited_equal_the_closed_form(Tq, Tk):
    """With BLOCK_M = r BLOCK_N dividing Tq (n query tiles): r n (n + 1) / 2 + n cdiv(Tk - Tq, BLOCK_N)."""
    rep = explain("flash_attention", (1, 1, Tq, Tk, 16), F32, prefill=Tq)
    fwd = rep.kernels[0]
    bm, bn = fwd.blocks["BLOCK_M"], fwd.blocks["BLOCK_N"]
    if Tq % bm or bm % bn:
        pytest.skip(f"the interpreter's blocks {bm}, {bn} do not tile this shape evenly")
    n, r = Tq // bm, bm // bn
    closed = r * n * (n + 1) // 2 + n * -(-(Tk - Tq) // bn)
    assert rep.extra["visited_tiles"]["traced"] == closed
    assert rep.extra["visited_tiles"]["traced"] < rep.extra["visited_tiles"]["non_causal"] or n == 1


@pytest.mark.parametrize("shape,dtype,row", [((1, 1, 150, 150, 32), F32, 149), ((1, 1, 40, 90, 16), BF16, 17)])
def test_online_softmax_ends_at_the_saved_log_sum_exp(shape, dtype, row):
    rep = explain("flash_attention", shape, dtype, row=row, prefill=0)
    state = rep.extra["online_softmax"]
    assert state["row"] == row and len(state["steps"]) >= 1
    assert state["end"] == pytest.approx(state["saved_lse2"], abs=2e-6 * max(1.0, abs(state["saved_lse2"])))
    ms = [s["m"] for s in state["steps"]]
    assert ms == sorted(ms), "the running max never decreases"
    assert all(0.0 <= s["alpha"] <= 1.0 for s in state["steps"])
    assert state["steps"][-1]["masked"], "the diagonal tile is the masked one"


# ----------------------------------------------------------------------------------------------
# decode attention
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,lens,dtype", [
    ((2, 3, 1, 70, 24), [70, 5], F32),
    ((2, 1, 3, 100, 64), [37, 100], BF16),  # the padded tl.dot path
    ((1, 2, 16, 50, 80), [40], F16),  # a head dim padded to 128
])
def test_decode_attention_counts_equal_the_lesson(shape, lens, dtype):
    rep = explain("decode_attention", shape, dtype, seq_lens=lens)
    assert_matches(rep)
    splits = rep.extra["splits"]
    for b, ranges in splits["formula_ranges"].items():
        for s, r in enumerate(ranges):
            assert splits["ranges"][f"{b}.s{s}"] == (tuple(r) if r else None)
    assert rep.extra["combine"]["max_abs_diff_vs_kernel"] < (1e-5 if dtype == F32 else 1e-2)
    assert sum(rep.extra["combine"]["weights"]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# the row-wise kernels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,shape,dtype", [
    ("layer_norm", (37, 100), F32),
    ("layer_norm", (5, 1000), BF16),
    ("add_layer_norm", (13, 77), F16),
    ("bias_gelu", (29, 300), F32),
    ("bias_gelu", (3, 17), BF16),
    ("cross_entropy", (7, 131), F32),
    ("cross_entropy", (5, 4500), BF16),  # two chunks of the vocabulary
    ("linear_cross_entropy", (11, 16, 131), F32),
])
@pytest.mark.parametrize("backward", [False, True])
def test_rowwise_counts_equal_the_lesson(op, shape, dtype, backward):
    rep = explain(op, shape, dtype, backward=backward)
    assert_matches(rep)


def _tensor_passes(fn, nbytes, backward=False, leaves=()):
    """(bytes read + written) / nbytes of an eager sequence, by TorchOpCounter."""
    with TorchOpCounter() as c:
        y = fn()
        if backward:
            with c.paused():  # the output gradient is the caller's, not the sequence's
                g = torch.ones_like(y)
            torch.autograd.grad(y, leaves, g)
    t = c.totals()
    return (t["read"] + t["written"]) / nbytes


def test_the_unfused_traffic_in_the_docstrings():
    """The lessons' "unfused" columns: (M, N)-tensor passes of each eager sequence."""
    from kernels import reference

    M, N = 64, 96
    x, w, b = torch.randn(M, N, requires_grad=True), torch.randn(N), torch.randn(N, requires_grad=True)
    T = M * N * 4
    assert 10 <= _tensor_passes(lambda: reference.layer_norm(x, w, b), T) < 10.2  # layer_norm.py: 10
    assert 20 <= _tensor_passes(lambda: reference.bias_gelu(x, b), T) < 20.1  # bias_gelu.py: 20
    gelu = lambda: torch.nn.functional.gelu(x + b, approximate="tanh")  # noqa: E731
    assert 4 <= _tensor_passes(gelu, T) < 4.1  # bias_gelu.py: 4
    assert 8 <= _tensor_passes(gelu, T, backward=True, leaves=[x, b]) < 8.1  # + backward 4 (dZ, then dBias)
    t = torch.randint(0, N, (M,))
    ce = lambda: torch.nn.functional.cross_entropy(x, t)  # noqa: E731
    assert 2 <= _tensor_passes(ce, T) < 2.1  # cross_entropy.py: 2
    assert 6 <= _tensor_passes(ce, T, backward=True, leaves=[x]) < 6.1  # + backward 4


# ----------------------------------------------------------------------------------------------
# time bounds, pictures, the script
# ----------------------------------------------------------------------------------------------
def test_time_bounds_say_which_binds():
    rep = explain("bias_gelu", (8, 64), F32)
    for which in ("measured", "minimum"):
        for gpu in ("H100", "H200"):
            bound = rep.bounds[which][gpu]
            assert bound["binds"] == "memory" and bound["compute_s"] == 0
    tot = rep.measured_totals()
    assert rep.bounds["measured"]["H100"]["memory_s"] == pytest.approx((tot["read"] + tot["written"]) / 3.35e12)


def test_pictures_are_written_and_small(tmp_path):
    paths = []
    paths += explain("flash_attention", (1, 1, 80, 80, 16), F32, backward=True, out=str(tmp_path)).pictures
    paths += explain("decode_attention", (2, 1, 1, 150, 16), F32, seq_lens=[150, 40], out=str(tmp_path)).pictures
    paths += explain("layer_norm", (9, 40), F32, out=str(tmp_path)).pictures
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["decode_attention_splits.png", "flash_attention_backward.png", "flash_attention_online_softmax.png",
                     "flash_attention_tiles.png", "layer_norm_bytes.png"]
    for p in paths:
        assert 5_000 < os.path.getsize(p) < 200_000, p


@pytest.mark.slow
def test_script_end_to_end(tmp_path):
    out, js = tmp_path / "png", tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "explain.py"), "flash_attention", "--shape", "1,1,40,40,16",
           "--backward", "--out", str(out), "--json", str(js)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    assert "trace == lesson" in res.stdout and "binds" in res.stdout
    rep = json.loads(js.read_text())
    assert all(k["matches_formula"] for k in rep["kernels"])
    assert set(rep["bounds"]["measured"]) == {"H100", "H200"}
    assert len(list(out.glob("*.png"))) == 3
    bad = subprocess.run([*cmd[:3], "--shape", "1,2"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_the_docstrings_examples_follow_from_the_formulas():
    """The numbers the lessons quote for GPT-2 124M, from the same formulas the trace checks."""
    from kernels import bias_gelu, cross_entropy, decode_attention, flash_attention, layer_norm

    # flash_attention.py: T = 1024, D = 64, bf16, 64 x 64 tiles: q, k, v, O are 4 T D 2 B = 512 KiB,
    # and each key tile is read (T / BLOCK_M + 1) / 2 = 8.5 times on average under the causal mask.
    fa = flash_attention.memory_traffic("fwd", 1, 1, 1024, 1024, 64, 2, 64, 64, causal=True)
    assert fa["Q"][0] + fa["O"][1] + 2 * 1024 * 64 * 2 == 512 * 1024
    assert fa["K"][0] / (1024 * 64 * 2) == 8.5
    assert fa["LSE"][1] == 4 * 1024
    # decode_attention.py: one layer of gpt2-124M at 1024 tokens, fp16: 2 x 1024 x 768 x 2 B of cache;
    # 16 splits write 16 x 65 x 4 B of partials per query.
    da = decode_attention.memory_traffic("fwd", 12, 1, 64, 2, [1024], 16)
    assert (da["K"][0] + da["V"][0]) * 12 == pytest.approx(37.7e6, rel=2e-3)
    assert (da["O_part"][1] + da["LSE_part"][1]) / 12 == 16 * 65 * 4
    # layer_norm.py: B*T = 8192 rows of C = 768 in bf16 (T = 12.6 MB), 264 row groups.
    T = 8192 * 768 * 2
    fwd = layer_norm.memory_traffic("fwd", 8192, 768, 2, 4)
    assert fwd["X"][0] + fwd["Y"][1] == 2 * T and fwd["MEAN"][1] + fwd["RSTD"][1] == 64 * 1024
    assert fwd["W"][0] + fwd["B"][0] == pytest.approx(50.3e6, rel=1e-3)
    bwd = layer_norm.memory_traffic("bwd", 8192, 768, 2, 4, n_groups=264)
    red = layer_norm.memory_traffic("sum_partials", 8192, 768, 2, 4, n_groups=264)
    assert bwd["X"][0] + bwd["DY"][0] + bwd["DX"][1] == 3 * T
    assert bwd["PARTIAL"][1] + red["PARTIAL"][0] == pytest.approx(3.2e6, rel=0.02)
    add = layer_norm.memory_traffic("fwd", 8192, 768, 2, 4, residual=True)
    assert sum(add[a][0] + add[a][1] for a in ("X", "R", "H", "Y")) == 4 * T
    # bias_gelu.py: 8192 rows of 4C = 3072 in bf16 (50.3 MB); BLOCK_M = 8 rows per tile.
    T = 8192 * 3072 * 2
    bg = bias_gelu.memory_traffic("fwd", 8192, 3072, 2, 4, BLOCK_M=8)
    assert bg["X"][0] + bg["Y"][1] == 2 * T and bg["BIAS"][0] == pytest.approx(12.6e6, rel=1e-2)
    bgb = bias_gelu.memory_traffic("bwd", 8192, 3072, 2, 4, n_groups=43)
    assert bgb["X"][0] + bgb["DY"][0] + bgb["DX"][1] == 3 * T
    # cross_entropy.py: 8192 x 50,257 bf16 logits (823 MB): read twice, the gradient written once
    # (and each row's target element once more).
    ce = cross_entropy.memory_traffic("fwd", 8192, 50257, 2, 8192)
    L = 8192 * 50257 * 2
    assert ce["LOGITS"][0] == 2 * L + 8192 * 2 and ce["GRAD"][1] == L + 8192 * 2 and L == pytest.approx(823e6, rel=1e-3)
