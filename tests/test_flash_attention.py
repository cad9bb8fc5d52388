"""flash_attention forward and backward against float64, by FlashAttention's rule: the kernel's error
must be within 2x PyTorch's error computing the same attention in the same dtype.

Every input is made inside its test on the test device (accuracy.DEVICE: the GPU when there is one,
else the CPU and Triton's interpreter), never at collection time. On a GPU, fp32 runs as in the
interpreter: the kernels' fp32 dots are input_precision="ieee" (never TF32) and PyTorch's fp32 matmul
is IEEE by default, so one tolerance holds both ways; tl.exp2 is approximate on a GPU (a few ulp),
so no test expects a kernel's result to equal PyTorch's exactly, only a kernel's own other runs.
"""

import math

import pytest
import torch

from kernels import reference
from kernels.flash_attention import (
    COMPILE_SPECS,
    _DKDV_CONFIGS,
    _DQ_CONFIGS,
    _FWD_CONFIGS,
    _pruner,
    flash_attention,
    dropout_mask,
    dropout_seed,
    flash_attention_backward,
    flash_attention_forward,
)
from accuracy import (  # noqa: F401  (launch_configs: a fixture)
    DEVICE,
    assert_close_to_reference,
    assert_compiles_like_eager,
    forward_backward,
    launch_configs,
    poison_,
    seeded,
)


def _fwd_bwd(fn, q, k, v, do, **kw):
    """(o, dq, dk, dv) of fn on fresh leaves that keep q, k, v's strides."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _check_against_float64(q, k, v, do, causal, sm_scale=None):
    ours = _fwd_bwd(flash_attention, q, k, v, do, causal=causal, sm_scale=sm_scale)
    exact = _fwd_bwd(reference.attention, q.double(), k.double(), v.double(), do.double(),
                     causal=causal, sm_scale=sm_scale)
    torch_same_dtype = _fwd_bwd(reference.attention, q, k, v, do, causal=causal, sm_scale=sm_scale)
    for name, got, want, base, inp in zip(("o", "dq", "dk", "dv"), ours, exact, torch_same_dtype, (q, q, k, v)):
        assert got.dtype == q.dtype and got.shape == inp.shape, name
        assert_close_to_reference(name, got, want, base)


def _qkvdo(B, H, Tq, Tk, D, dtype, seed=0):
    g = seeded(seed)
    q, do = (torch.randn(B, H, Tq, D, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, H, Tk, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, do


# Each case adds at least one feature: T = 1, primes, exact and ragged tiles, Tk > Tq (bottom-right
# causal), Tq > Tk (non-causal), non-power-of-2 D (padded BLOCK_D), D from 16 to 128, every dtype,
# batch and heads > 1, and large scores (sm_scale = 2) for the online softmax's rescaling.
CASES = [
    # dtype,        B, H,  Tq,  Tk,   D, causal, sm_scale
    (torch.float32, 2, 2, 1, 1, 16, True, None),
    (torch.float16, 2, 3, 7, 7, 32, True, None),
    (torch.bfloat16, 1, 2, 64, 64, 64, True, None),
    (torch.float32, 1, 1, 129, 129, 80, True, None),
    (torch.float16, 1, 1, 129, 257, 64, True, None),
    (torch.bfloat16, 1, 1, 1, 257, 96, True, None),
    (torch.float32, 1, 1, 257, 257, 128, True, 2.0),
    (torch.bfloat16, 1, 1, 7, 129, 128, False, None),
    (torch.float16, 1, 1, 129, 7, 80, False, None),
    (torch.float32, 1, 2, 64, 129, 16, False, None),
]


@pytest.mark.parametrize("dtype,B,H,Tq,Tk,D,causal,sm_scale", CASES)
def test_matches_float64(dtype, B, H, Tq, Tk, D, causal, sm_scale):
    q, k, v, do = _qkvdo(B, H, Tq, Tk, D, dtype)
    _check_against_float64(q, k, v, do, causal, sm_scale)


# exp2 of a masked score overflows before tl.where drops it, and the rows of dK/dV for the padded
# keys past Tk (never stored) meet inf * 0: NumPy (the interpreter) warns about both, a GPU computes
# them silently; either way the values are discarded.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
# The non-causal negative case runs in fp16: in fp32 at |LSE| ~ 170 the half-ulp rounding of the
# one saved LSE (5e-6 relative on a whole row of the recomputed P) is ~3x PyTorch's error, a known
# cost of recomputing P from a saved fp32 log-sum-exp (see the module docstring); the overflow
# hazard this case is about is the same in every dtype, since the kernel's arithmetic is fp32.
@pytest.mark.parametrize("sign,causal,dtype", [(1.0, True, torch.float32), (-1.0, True, torch.float32),
                                               (-1.0, False, torch.float16)])
def test_huge_scores_are_stable(sign, causal, dtype, launch_configs):
    """Every score near +-120 (e^120 overflows fp32): the online softmax must subtract the running
    max, and the backward must not let exp2(score - LSE) overflow in the padded keys of the ragged
    last tile (where it would meet a zero k row and give inf * 0 = NaN)."""
    T, D = 70, 16
    g = seeded(3)
    k = 1.0 + 0.1 * torch.randn(1, 1, T, D, generator=g)
    q = sign * 30.0 * (1.0 + 0.1 * torch.randn(1, 1, T, D, generator=g))  # q.k / sqrt(D) ~ sign * 120
    v, do = torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    _check_against_float64(q, k, v, do, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_of_one_qkv_tensor(dtype, launch_configs):
    """The model's call: q, k, v are permuted views of one (B, T, 3, H, D) projection, dO is
    non-contiguous, and the gradient lands in the fused tensor through PyTorch's view backward."""
    B, T, H, D = 2, 37, 2, 32
    g = seeded(1)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(dtype)
    do = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)  # (B, H, T, D), not contiguous

    def run(fn, x):
        x = x.detach().requires_grad_()
        q, k, v = x.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
        if fn is flash_attention:
            assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        o = fn(q, k, v, causal=True)
        o.backward(do.to(x.dtype))
        return o, x.grad

    ours, exact, base = run(flash_attention, qkv), run(reference.attention, qkv.double()), run(reference.attention, qkv)
    for name, i in (("o", 0), ("dqkv", 1)):
        assert_close_to_reference(name, ours[i], exact[i], base[i])


# Every (BLOCK_M, BLOCK_N) the autotuner may pick (only the first runs in the interpreter without an
# override), plus oblong pairs both ways round: the stage bounds must hold for any pair.
BLOCK_PAIRS = sorted(
    {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _FWD_CONFIGS + _DKDV_CONFIGS + _DQ_CONFIGS}
    | {(16, 32), (32, 16), (64, 128), (128, 64), (64, 256)}  # 64 x 256: one key tile, dQ fused into dK/dV
)


@pytest.mark.parametrize("causal", [True, False])
def test_every_block_shape_writes_every_output(causal):
    """Each block shape, launched explicitly into NaN-poisoned outputs: the causal stage bounds with
    a bottom-right offset (Tk - Tq = 70, a multiple of no block size) must be right for every pair,
    and no element of O, LSE, dQ, dK, dV may be left unwritten."""
    B, H, Tq, Tk, D = 1, 1, 131, 201, 16
    q, k, v, do = _qkvdo(B, H, Tq, Tk, D, torch.float32, seed=2)
    exact = _fwd_bwd(reference.attention, q.double(), k.double(), v.double(), do.double(), causal=causal)
    base = _fwd_bwd(reference.attention, q, k, v, do, causal=causal)

    def lse_of(q, k):  # the log-sum-exp of each row of masked scores, what the forward saves
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        if causal:
            scores = scores.masked_fill(~torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq), float("-inf"))
        return torch.logsumexp(scores, dim=-1)

    log2e = 1.0 / math.log(2.0)  # the kernel saves the log-sum-exp in log2 units
    exact_lse, base_lse = lse_of(q.double(), k.double()) * log2e, lse_of(q, k) * log2e
    sm_scale = 1.0 / math.sqrt(D)
    for bm, bn in BLOCK_PAIRS:
        config = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 2}
        o, lse = poison_(torch.empty_like(q)), poison_(torch.empty(B, H, Tq))
        flash_attention_forward(q, k, v, causal, sm_scale, out=o, lse=lse, config=config)
        assert_close_to_reference(f"o {bm}x{bn}", o, exact[0], base[0])
        assert_close_to_reference(f"lse {bm}x{bn}", lse, exact_lse, base_lse)
        grads = tuple(poison_(torch.empty_like(t)) for t in (q, k, v))
        flash_attention_backward(do, q, k, v, o, lse, causal, sm_scale, grads=grads, config=config)
        for name, got, want, ref in zip(("dq", "dk", "dv"), grads, exact[1:], base[1:]):
            assert_close_to_reference(f"{name} {bm}x{bn}", got, want, ref)


@pytest.mark.parametrize("causal,dropout_p", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_fused_dq_is_the_dq_kernels_result(causal, dropout_p, monkeypatch):
    """One key tile holding every key (Tk <= BLOCK_N): the dK/dV kernel also writes dQ, from the same
    dS and the same product as the dQ kernel, so the result is the dQ kernel's (bit for bit in the
    interpreter). Ragged query tiles, padded keys, a bottom-right diagonal, dropout."""
    import kernels.flash_attention as fa

    q, k, v, do = _qkvdo(2, 3, 45, 200, 32, torch.float32, seed=4)
    config = {"BLOCK_M": 32, "BLOCK_N": 256, "num_warps": 4, "num_stages": 2}
    assert fa.fuses_dq(200, config) and not fa.fuses_dq(257, config) and not fa.fuses_dq(200, None)
    o, lse = flash_attention_forward(q, k, v, causal, 0.3, dropout_p, seed=7, config=config)

    def grads():
        out = tuple(poison_(torch.empty_like(t)) for t in (q, k, v))
        return flash_attention_backward(do, q, k, v, o, lse, causal, 0.3, dropout_p, seed=7, grads=out, config=config)

    fused = grads()
    monkeypatch.setattr(fa, "fuses_dq", lambda Tk, config: False)
    split = grads()
    for name, a, b in zip(("dq", "dk", "dv"), fused, split):
        assert torch.isfinite(a).all(), name
        if DEVICE.type == "cpu":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_pruner_keeps_configs_that_fit():
    """What the autotuner may pick: the dtype's list, within shared memory; with dropout, the 16-bit
    forward keeps only its 8-warp config (the 4-warp 64 x 64 ones spill on sm_90)."""
    def kept(kernel, configs, dtype, block_d, dropout):
        q = torch.empty(0, dtype=dtype)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in _pruner(kernel)(configs, {"Q": q}, BLOCK_D=block_d, HAS_DROPOUT=dropout)}

    bf16_fwd = {(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)}
    assert kept("fwd", _FWD_CONFIGS, torch.bfloat16, 64, False) == bf16_fwd
    assert kept("fwd", _FWD_CONFIGS, torch.bfloat16, 64, True) == {(128, 64, 8, 2)}
    assert kept("fwd", _FWD_CONFIGS, torch.float32, 64, True) == {(16, 16, 8, 2)}
    assert kept("dkdv", _DKDV_CONFIGS, torch.float16, 64, True) == {(64, 64, 8, 3)}


def test_zero_batch_returns_empty():
    q = torch.randn(0, 2, 5, 16, requires_grad=True)
    o = flash_attention(q, q, q)
    assert o.shape == (0, 2, 5, 16)
    o.sum().backward()
    assert q.grad.shape == q.shape


def _bad(**overrides):
    """q, k, v of shape (1, 2, 8, 32) fp32 on the test device, with some shapes or dtypes overridden.
    Built inside each test, never at collection time: a CPU tensor handed to a GPU run would trip
    the device check first, and every other expected message would be wrong."""
    shapes = dict(q=(1, 2, 8, 32), k=(1, 2, 8, 32), v=(1, 2, 8, 32))
    dtypes = dict(q=torch.float32, k=torch.float32, v=torch.float32)
    for name, value in overrides.items():
        (dtypes if isinstance(value, torch.dtype) else shapes)[name] = value
    g = seeded(5)
    return [torch.randn(shapes[n], generator=g, device=DEVICE).to(dtypes[n]) for n in ("q", "k", "v")]


@pytest.mark.parametrize(
    "overrides,kwargs,error,match",
    [
        (dict(q=torch.int32, k=torch.int32, v=torch.int32), {}, TypeError, "dtype"),
        (dict(k=torch.float16), {}, TypeError, "one dtype"),
        (dict(q=(2, 8, 32)), {}, ValueError, "4-D"),
        (dict(v=(1, 2, 9, 32)), {}, ValueError, "same shape"),
        (dict(k=(1, 3, 8, 32), v=(1, 3, 8, 32)), {}, ValueError, "batch, heads and head dim"),
        (dict(q=(2, 2, 8, 32)), {}, ValueError, "batch, heads and head dim"),
        (dict(q=(1, 2, 0, 32)), {}, ValueError, ">= 1"),
        (dict(q=(1, 2, 8, 8), k=(1, 2, 8, 8), v=(1, 2, 8, 8)), {}, ValueError, "head dim 8"),
        (dict(q=(1, 2, 8, 256), k=(1, 2, 8, 256), v=(1, 2, 8, 256)), {}, ValueError, "head dim 256"),
        (dict(q=(1, 2, 9, 32)), {"causal": True}, ValueError, "Tk >= Tq"),
        (dict(), {"sm_scale": float("nan")}, ValueError, "sm_scale"),
    ],
)
def test_bad_inputs_raise(overrides, kwargs, error, match):
    args = _bad(**overrides)
    with pytest.raises(error, match=match):
        flash_attention(*args, **kwargs)


def test_inputs_on_two_devices_raise():
    q, k, v = _bad()
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, k.to("meta"), v)


def test_torch_compile_traces_without_graph_breaks():
    q, k, v, do = _qkvdo(1, 2, 37, 53, 32, torch.float32, seed=4)
    assert_compiles_like_eager(lambda q, k, v: flash_attention(q, k, v, causal=True), (q, k, v), do)


# ----------------------------------------------------------------------------------------------
# Attention dropout inside the kernels
# ----------------------------------------------------------------------------------------------
def _attention_with_mask(q, k, v, keep, p, causal):
    """The book's attention with nn.Dropout's arithmetic on the probabilities, for a given mask."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if causal:
        visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1) * keep / (1.0 - p)  # dropped after the softmax
    return weights.to(v.dtype) @ v


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p(p):
    """The kept fraction is 1 - p within 5 standard deviations, and the mask is not one pattern
    repeated over rows, heads or batches."""
    B, H, Tq, Tk = 2, 3, 100, 130
    keep = dropout_mask(dropout_seed(), B, H, Tq, Tk, p, device=DEVICE)
    n = keep.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), frac
    assert (keep[0, 0] != keep[0, 1]).any() and (keep[0] != keep[1]).any()
    assert (keep[0, 0, 0] != keep[0, 0, 1]).any()
    row_fracs = keep.float().mean(-1)  # each row's kept fraction, about 1 - p too
    assert (row_fracs - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / Tk)


DROPOUT_CASES = [
    # dtype,        B, H,  Tq,  Tk,  D, causal
    (torch.float32, 1, 2, 100, 100, 32, True),
    (torch.bfloat16, 2, 1, 37, 100, 64, True),
    (torch.float16, 1, 1, 50, 77, 16, False),
]


@pytest.mark.parametrize("dtype,B,H,Tq,Tk,D,causal", DROPOUT_CASES)
def test_dropout_matches_reference_with_the_same_mask(dtype, B, H, Tq, Tk, D, causal, launch_configs):
    """Output and gradients equal the float64 reference applied with the kernels' own mask (by the
    2x-PyTorch rule), whatever tiles the forward and the two backward kernels use: each regenerates
    the mask from the seed, none stores it."""
    p = 0.2
    q, k, v, do = _qkvdo(B, H, Tq, Tk, D, dtype, seed=8)
    torch.manual_seed(11)
    keep = dropout_mask(dropout_seed(), B, H, Tq, Tk, p, device=DEVICE)
    torch.manual_seed(11)  # the op draws the same seed from torch's generator
    ours = _fwd_bwd(flash_attention, q, k, v, do, causal=causal, dropout_p=p)

    def ref(q, k, v):
        return _attention_with_mask(q, k, v, keep, p, causal)

    exact = _fwd_bwd(ref, q.double(), k.double(), v.double(), do.double())
    base = _fwd_bwd(ref, q, k, v, do)
    for name, got, want, torch_out in zip(("o", "dq", "dk", "dv"), ours, exact, base):
        assert_close_to_reference(f"dropout {name}", got, want, torch_out)


def test_dropout_same_seed_same_result_and_p0_is_no_dropout():
    q, k, v, do = _qkvdo(1, 2, 70, 70, 16, torch.float32, seed=9)

    def run(seed, p):
        torch.manual_seed(seed)
        return _fwd_bwd(flash_attention, q, k, v, do, dropout_p=p)

    first, again, other = run(3, 0.3), run(3, 0.3), run(4, 0.3)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    # p = 0: the kernels without a line of dropout (HAS_DROPOUT=False), and no draw from the generator
    state = torch.get_rng_state()
    for a, b in zip(_fwd_bwd(flash_attention, q, k, v, do, dropout_p=0.0), _fwd_bwd(flash_attention, q, k, v, do)):
        assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_bad_dropout_raises(p):
    q, k, v = _bad()
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attention(q, k, v, dropout_p=p)


def test_torch_compile_with_dropout():
    """The seed is drawn inside the custom op, so torch.compile traces dropout without a graph break,
    and, seeded alike, compiled and eager runs use one mask."""
    q, k, v, do = _qkvdo(1, 2, 37, 53, 32, torch.float32, seed=4)

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, dropout_p=0.25)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    got = forward_backward(compiled, (q, k, v), do)
    torch.manual_seed(5)
    want = forward_backward(fn, (q, k, v), do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
