"""The fused cross-entropy kernel against float64 book math, by FlashAttention's rule.

PyTorch's error is F.cross_entropy computed in the logits' own dtype; the kernel may be at most 2x as
far from the float64 answer (plus a small atol), for the loss and for the gradient.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import kernels.cross_entropy as ce  # the module, for its launcher (spied on) and launch_config
from kernels import reference
from kernels.cross_entropy import COMPILE_SPECS, CrossEntropyFunction, cross_entropy
from kernels.linear_cross_entropy import linear_cross_entropy
from accuracy import assert_close_to_reference, assert_compiles_like_eager, launch_configs, poison_, seeded  # noqa: F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors, so a loss or gradient element the kernel forgets
    to write shows up as NaN instead of as whatever the allocator left there."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return poison_(t) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def make_inputs(N, V, dtype, n_ignored=0, magnitude=1.0, ignore_index=-100, seed=0):
    g = seeded(seed)
    logits = (torch.randn(N, V, generator=g) * magnitude).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[torch.randperm(N, generator=g)[:n_ignored]] = ignore_index
    return logits, target


def grad_output_for(reduction, N, seed=1):
    """The loss's gradient (fp32, as the loss): 1 for "mean" (the loss.backward() path that hands the
    buffer on), 0.75 for "sum" (the path that multiplies), random per-row weights for "none", rounded
    to bf16 values so that every side of a comparison sees the same weights."""
    if reduction == "mean":
        return torch.tensor(1.0)
    if reduction == "sum":
        return torch.tensor(0.75)
    g = seeded(seed)
    return (torch.rand(N, generator=g) + 0.5).to(torch.bfloat16).float()


def check_against_reference(logits, target, reduction, ignore_index=-100, max_block_v=0):
    """Loss and gradient of the kernel vs float64 book math, with autocast's F.cross_entropy (fp32 math
    on the given logits) as the error to beat. Also: the loss is fp32, the gradient has the logits'
    dtype, and the logits are unchanged afterwards."""
    before = logits.clone()
    x = logits.requires_grad_()
    loss = CrossEntropyFunction.apply(x, target, ignore_index, reduction, max_block_v)
    go = grad_output_for(reduction, logits.shape[0])
    (grad,) = torch.autograd.grad(loss, x, go)

    xd = logits.detach().double().requires_grad_()
    exact = reference.cross_entropy(xd, target, ignore_index=ignore_index, reduction=reduction)
    (grad_exact,) = torch.autograd.grad(exact, xd, go.double())

    # PyTorch as autocast runs it: F.cross_entropy in fp32 on the 16-bit logits, the gradient cast
    # back to the logits' dtype. The kernel too accumulates in fp32 and returns an fp32 loss.
    xt = logits.detach().clone().requires_grad_()
    torch_loss = F.cross_entropy(xt.float(), target, ignore_index=ignore_index, reduction=reduction)
    (torch_grad,) = torch.autograd.grad(torch_loss, xt, go.float())

    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    assert_close_to_reference("loss", loss, exact, torch_loss, atol=None)
    assert_close_to_reference("grad", grad, grad_exact, torch_grad, atol=None)
    assert torch.equal(logits.detach(), before), "the logits were modified"
    return loss, grad


# (V, N, max_block_v): one chunk (V=5), many ragged chunks on a small vocabulary (1000 = 7 x 128 + 104),
# the launcher's own choice (0) for 1000 (one chunk of 1024), and for GPT-2's vocabulary: 12 x 4096 +
# 1105 with the GPU's configuration, one block of 65,536 holding all 3 rows with the interpreter's.
SHAPES = [(5, 17, 4096), (1000, 9, 128), (1000, 5, 0), (50257, 3, 0)]


@pytest.mark.parametrize("V,N,max_block_v", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(poisoned_empty, launch_configs, V, N, max_block_v, reduction, dtype):
    logits, target = make_inputs(N, V, dtype, n_ignored=max(1, N // 4), seed=V + N)
    check_against_reference(logits, target, reduction, max_block_v=max_block_v)


def test_running_max_rescaling(launch_configs):
    # A rising ramp makes every chunk raise the running max, so the rescale d * exp(m - m') is taken
    # at every step; a flat-then-spike row puts the whole mass in the last, ragged chunk; a row that
    # starts with -inf logits has no finite max for two chunks.
    N, V = 4, 1000
    ramp = torch.linspace(-20, 20, V)
    logits = ramp + 0.1 * torch.randn(N, V, generator=seeded(0))
    logits[2] = 0.0
    logits[2, -1] = 30.0
    logits[3, :300] = float("-inf")  # a masked-out stretch: the first two chunks are all -inf
    target = torch.tensor([V - 1, 0, V - 1, 517])
    for reduction in REDUCTIONS:
        check_against_reference(logits.clone(), target, reduction, max_block_v=128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_magnitude_logits(dtype):
    # Logits of magnitude 1e3: exp overflows without the max subtraction. Some rows target their
    # argmax, so the loss is a near-total cancellation of lse and x[t] (the loss is ~0 there).
    N, V = 6, 600
    logits, target = make_inputs(N, V, dtype, n_ignored=1, magnitude=1e3, seed=3)
    target[:3] = logits[:3].float().argmax(dim=1)
    for reduction in REDUCTIONS:
        loss, grad = check_against_reference(logits.clone(), target, reduction, max_block_v=256)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_rows_ignored(poisoned_empty, launch_configs, reduction, dtype):
    for N in (5, 0):  # no rows at all counts as every row ignored: 0, not 0/0
        logits, target = make_inputs(N, 131, dtype, n_ignored=N, ignore_index=-1)
        x = logits.requires_grad_()
        loss = cross_entropy(x, target, ignore_index=-1, reduction=reduction)
        loss.sum().backward()
        assert loss.shape == ((N,) if reduction == "none" else ())
        assert torch.equal(loss, torch.zeros_like(loss)), loss
        assert x.grad.shape == (N, 131) and torch.equal(x.grad, torch.zeros_like(x.grad))


def test_ignore_index_that_is_a_class_id():
    # ignore_index inside [0, V): rows targeting that class count for nothing, and are not "out of range".
    logits, target = make_inputs(13, 50, torch.float32, seed=4)
    target[::3] = 7
    for reduction in REDUCTIONS:
        check_against_reference(logits.clone(), target, reduction, ignore_index=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_logits_and_target(launch_configs, dtype):
    # A slice of a wider tensor (row stride 200 != V = 131, a prime) and a non-contiguous target.
    N, V = 6, 131
    g = seeded(5)
    wide = torch.randn(N, 200, generator=g).to(dtype).requires_grad_()
    target = torch.randint(0, V, (2 * N,), generator=g)[::2]
    target[1] = -100
    logits = wide[:, 40 : 40 + V]
    assert logits.stride(0) == 200 and not target.is_contiguous()
    cross_entropy(logits, target, reduction="sum").backward()

    exact_in = logits.detach().double().requires_grad_()
    reference.cross_entropy(exact_in, target, reduction="sum").backward()
    torch_in = logits.detach().clone().requires_grad_()
    F.cross_entropy(torch_in, target, reduction="sum").backward()
    assert_close_to_reference("grad", wide.grad[:, 40 : 40 + V], exact_in.grad, torch_in.grad, atol=None)
    assert torch.equal(wide.grad[:, :40], torch.zeros_like(wide.grad[:, :40]))
    assert torch.equal(wide.grad[:, 40 + V :], torch.zeros_like(wide.grad[:, 40 + V :]))

    # A transposed view (column stride != 1) goes through a contiguous copy, with the same answer.
    logits_t = logits.detach().t().contiguous().t()
    assert logits_t.stride(1) != 1
    check_against_reference(logits_t, target, "mean")


def test_logits_unchanged_and_backward_repeatable():
    # The gradient buffer is saved on ctx; backward must not scale it in place (a second backward
    # through a retained graph would then see it scaled twice) nor touch the logits.
    logits, target = make_inputs(9, 300, torch.float16, n_ignored=2, seed=6)
    before = logits.clone()
    x = logits.requires_grad_()
    for reduction in REDUCTIONS:
        loss = cross_entropy(x, target, reduction=reduction)
        go = grad_output_for(reduction, 9) * 3  # not 1: the multiplying path
        (g1,) = torch.autograd.grad(loss, x, go, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, x, go)
        assert torch.equal(g1, g2)
    assert torch.equal(logits.detach(), before)


def test_int32_target_and_no_grad_path(monkeypatch):
    logits, target = make_inputs(11, 77, torch.float32, n_ignored=3, seed=7)
    seen = []
    launch = ce.cross_entropy_forward

    def spy(*args, **kwargs):
        loss_rows, grad = launch(*args, **kwargs)
        seen.append(grad is not None)
        return loss_rows, grad

    monkeypatch.setattr(ce, "cross_entropy_forward", spy)
    with_grad = cross_entropy(logits.clone().requires_grad_(), target, reduction="none")
    no_grad_input = cross_entropy(logits, target.to(torch.int32), reduction="none")
    with torch.no_grad():
        no_grad_mode = cross_entropy(logits.clone().requires_grad_(), target, reduction="none")
    # The gradient buffer is allocated (and the second pass run) only when autograd will want it.
    assert seen == [True, False, False]
    assert torch.equal(with_grad.detach(), no_grad_input) and torch.equal(no_grad_input, no_grad_mode)
    exact = reference.cross_entropy(logits.double(), target, reduction="none")
    assert_close_to_reference("loss", no_grad_input, exact, F.cross_entropy(logits, target, reduction="none"), atol=None)


def test_bad_inputs_raise_clear_errors():
    logits, target = make_inputs(4, 10, torch.float32)
    cases = [
        ((logits[0], target[:1]), {}, ValueError, "2-D"),
        ((logits.view(2, 2, 10), target), {}, ValueError, "2-D"),
        ((logits, target.view(2, 2)), {}, ValueError, "1-D"),
        ((logits, target[:3]), {}, ValueError, "N = 4 rows"),
        ((logits[:, :0], target), {}, ValueError, "empty class"),
        ((logits, target.float()), {}, TypeError, "target has dtype"),
        ((logits.long(), target), {}, TypeError, "logits has dtype"),
        ((logits, target), {"reduction": "avg"}, ValueError, "unknown reduction"),
        ((logits, target), {"ignore_index": -100.0}, TypeError, "ignore_index"),
        ((logits.to("meta"), target), {}, ValueError, "one device"),
    ]
    for args, kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            cross_entropy(*args, **kwargs)
    for bad in (10, -1, 12345):  # V itself, a negative that is not ignore_index, far out
        t = target.clone()
        t[2] = bad
        with pytest.raises(ValueError, match=rf"outside \[0, 10\).*e\.g\. {bad}"):
            cross_entropy(logits, t)
    with pytest.raises(ValueError, match="max_block_v"):
        ce.cross_entropy_forward(logits, target, -100, 1.0, False, max_block_v=100)


def test_compile_specs_cover_every_launch_config():
    listed = {
        spec.signature["LOGITS"]: [(c["BLOCK_V"], c["num_warps"], c["num_stages"], c["HAS_GRAD"]) for c in spec.configs]
        for spec in COMPILE_SPECS
    }
    assert sorted(listed) == ["*bf16", "*fp16", "*fp32"]
    for V in [1, 5, 127, 128, 129, 1000, 2048, 4095, 4096, 4097, 50257, 10**6]:
        for max_block_v in [128, 1024, 4096]:
            cfg = ce.launch_config(V, max_block_v)
            for configs in listed.values():
                for has_grad in (True, False):
                    assert (cfg["BLOCK_V"], cfg["num_warps"], cfg["num_stages"], has_grad) in configs, (V, cfg)


def test_torch_compile_traces_without_graph_breaks():
    # The target check's host sync and the launch sit inside the custom op, so dynamo traces neither
    # (before the op it stopped at the sync, and behind it is the interpreter's NumPy). Backward under
    # compile always multiplies by grad_output; with grad_output 1 ("mean") that must give eager's bits.
    N, V = 7, 131
    logits, target = make_inputs(N, V, torch.bfloat16, n_ignored=2, seed=10)
    for reduction in REDUCTIONS:
        fn = functools.partial(cross_entropy, target=target, reduction=reduction)
        assert_compiles_like_eager(fn, (logits,), grad_output_for(reduction, N))
    all_ignored = torch.full((N,), -100)
    fn = functools.partial(cross_entropy, target=all_ignored)
    assert_compiles_like_eager(fn, (logits,), torch.tensor(1.0))

    # Without autograd (the op's no-gradient path), and a bad target: the check still runs, at run time.
    compiled = torch.compile(cross_entropy, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(logits, target), cross_entropy(logits, target))
    bad = target.clone()
    bad[0] = V
    with pytest.raises(ValueError, match=r"outside \[0, 131\)"):
        compiled(logits, bad)


def test_fused_gpt_loss_compiles():
    # GPTModel.loss through FusedOps, after a forward of the fused model, with the parameters' gradients.
    from model import GPTConfig, GPTModel

    cfg = GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=2, n_layers=1, qkv_bias=True)
    torch.manual_seed(12)
    model = GPTModel(cfg).use_fused_kernels(True)
    idx, targets = torch.randint(0, 101, (2, 2, 11)).unbind(0)
    targets[0, :3] = -100
    names, params = zip(*model.named_parameters())

    def loss(*params):
        logits = torch.func.functional_call(model, dict(zip(names, params)), (idx,))
        return model.loss(logits, targets)

    assert_compiles_like_eager(loss, [p.detach() for p in params], torch.tensor(1.0))


# ----------------------------------------------------------------------------------------------
# linear_cross_entropy: LM head + loss in chunks of rows, against the unfused F.linear + F.cross_entropy
# ----------------------------------------------------------------------------------------------
def make_head_inputs(N, C, V, dtype, n_ignored, seed=0):
    g = seeded(seed)
    x = torch.randn(N, C, generator=g).to(dtype)
    weight = (torch.randn(V, C, generator=g) * C**-0.5 * 3).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return x, weight, target


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_matches_unfused(reduction, dtype):
    # 21 rows in chunks of 8: two full chunks and a ragged one of 5.
    N, C, V = 21, 24, 300
    x, weight, target = make_head_inputs(N, C, V, dtype, n_ignored=4, seed=8)
    go = grad_output_for(reduction, N)

    xf, wf = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(xf, wf, target, reduction=reduction, chunk_size=8)
    grads = torch.autograd.grad(loss, (xf, wf), go)

    xd, wd = x.double().requires_grad_(), weight.double().requires_grad_()
    exact = reference.cross_entropy(xd @ wd.t(), target, reduction=reduction)
    exact_grads = torch.autograd.grad(exact, (xd, wd), go.double())

    # Unfused as autocast runs it: the head in x's dtype, the loss in fp32 on its logits.
    xt, wt = x.clone().requires_grad_(), weight.clone().requires_grad_()
    unfused = F.cross_entropy(F.linear(xt, wt).float(), target, reduction=reduction)
    unfused_grads = torch.autograd.grad(unfused, (xt, wt), go.float())

    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    assert_close_to_reference("loss", loss, exact, unfused, atol=None)
    for name, g, e, u in zip(("grad_x", "grad_w"), grads, exact_grads, unfused_grads):
        assert_close_to_reference(name, g, e, u, atol=None)
    assert torch.equal(xf.detach(), x) and torch.equal(wf.detach(), weight)


def test_linear_cross_entropy_default_chunks_frozen_head_and_no_grad(launch_configs):
    # Default chunks: on a GPU ceil(13 / ceil(257 / 32)) = 2 rows, 7 chunks; in the interpreter one chunk.
    N, C, V = 13, 32, 257
    x, weight, target = make_head_inputs(N, C, V, torch.float32, n_ignored=3, seed=9)
    exact = reference.cross_entropy(x.double() @ weight.double().t(), target)
    unfused = F.cross_entropy(F.linear(x, weight), target)

    # Frozen head: only x wants a gradient, and only x gets one.
    xf = x.clone().requires_grad_()
    loss = linear_cross_entropy(xf, weight, target)
    loss.backward()
    assert weight.grad is None
    xd = x.double().requires_grad_()
    reference.cross_entropy(xd @ weight.double().t(), target).backward()
    xt = x.clone().requires_grad_()
    F.cross_entropy(F.linear(xt, weight), target).backward()
    assert_close_to_reference("grad_x", xf.grad, xd.grad, xt.grad, atol=None)

    # Without autograd: the loss alone, the same as with it.
    with torch.no_grad():
        no_grad = linear_cross_entropy(x.clone().requires_grad_(), weight, target)
    assert torch.equal(no_grad, loss.detach())
    assert_close_to_reference("loss", no_grad, exact, unfused, atol=None)


def test_linear_cross_entropy_all_rows_ignored_and_bad_inputs():
    x, weight, target = make_head_inputs(6, 8, 50, torch.bfloat16, n_ignored=6)
    xf, wf = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(xf, wf, target, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and not xf.grad.any() and not wf.grad.any()

    target = torch.randint(0, 50, (6,))
    cases = [
        ((x, weight[:, :7], target), {}, ValueError, r"weight must be \(V, C\)"),
        ((x[0], weight, target), {}, ValueError, "x must be 2-D"),
        ((x, weight.float(), target), {}, TypeError, "must match"),
        ((x, weight, target[:5]), {}, ValueError, "N = 6 rows"),
        ((x, weight, target + 50), {}, ValueError, r"outside \[0, 50\)"),
        ((x, weight, target), {"chunk_size": 0}, ValueError, "chunk_size"),
        ((x, weight, target), {"reduction": "max"}, ValueError, "unknown reduction"),
    ]
    for args, kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            linear_cross_entropy(*args, **kwargs)


def test_linear_cross_entropy_compiles():
    # Both chunk loops (forward; "none"'s backward) are custom ops: 11 rows in chunks of 4, one ignored.
    N = 11
    x, weight, target = make_head_inputs(N, 16, 50, torch.float32, n_ignored=1, seed=13)
    for reduction in REDUCTIONS:
        fn = functools.partial(linear_cross_entropy, target=target, reduction=reduction, chunk_size=4)
        assert_compiles_like_eager(fn, (x, weight), grad_output_for(reduction, N))
