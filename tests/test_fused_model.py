"""The swap: the same weights on the Triton kernels give the PyTorch model's logits, loss and gradients."""

import copy

import pytest
import torch

from accuracy import seeded
from model import GPTConfig, GPTModel

# Awkward on purpose: head dim 24 is not a power of 2, T = 13 is prime, V = 101 is prime.
CFG = GPTConfig(vocab_size=101, context_length=32, emb_dim=48, n_heads=2, n_layers=2, qkv_bias=True)


def _pair(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    ref = GPTModel(cfg)
    fused = copy.deepcopy(ref).use_fused_kernels(True)
    return ref, fused


def test_fused_model_matches_pytorch_model():
    ref, fused = _pair()
    assert fused.fused and not ref.fused
    idx = torch.randint(0, CFG.vocab_size, (2, 13))
    targets = torch.randint(0, CFG.vocab_size, (2, 13))
    targets[0, :3] = -100  # some ignored positions

    logits_ref, logits_fused = ref(idx), fused(idx)
    torch.testing.assert_close(logits_fused, logits_ref, rtol=1e-4, atol=1e-5)
    loss_ref, loss_fused = ref.loss(logits_ref, targets), fused.loss(logits_fused, targets)
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-5, atol=1e-6)

    loss_ref.backward()
    loss_fused.backward()
    for (name, p_ref), (_, p_fused) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_use_fused_kernels_switches_back_and_forth():
    ref, fused = _pair()
    idx = torch.randint(0, CFG.vocab_size, (1, 7))
    fused.use_fused_kernels(False)
    torch.testing.assert_close(fused(idx), ref(idx), rtol=0, atol=0)  # same weights, same path: bitwise


def test_fused_attention_dropout_in_training():
    """Training drops attention probabilities inside the kernel (reproducibly under torch.manual_seed);
    eval does not drop, and then matches the PyTorch path."""
    cfg = GPTConfig(vocab_size=11, context_length=8, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.1)
    torch.manual_seed(0)
    ref = GPTModel(cfg)
    fused = copy.deepcopy(ref).use_fused_kernels(True)
    idx = torch.randint(0, cfg.vocab_size, (2, 8), generator=seeded(3))
    fused.train()
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(fused(idx))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.testing.assert_close(fused.eval()(idx), ref.eval()(idx), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_training_curves_match():
    """Twenty AdamW steps on the same data: the fused run's loss curve tracks the PyTorch run's."""
    ref, fused = _pair(seed=1)
    g = seeded(2)
    data = torch.randint(0, CFG.vocab_size, (2, 2, 17), generator=g)  # two batches, seen 10 times each
    curves = []
    for model in (ref, fused):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        losses = []
        for step in range(20):
            batch = data[step % 2]
            x, y = batch[:, :-1], batch[:, 1:]
            loss = model.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    ref_curve, fused_curve = curves
    assert ref_curve[-5:].mean() < ref_curve[:5].mean() - 0.5  # it learned something
    torch.testing.assert_close(fused_curve, ref_curve, rtol=2e-3, atol=2e-3)
