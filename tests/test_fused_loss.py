"""model(idx, targets=...) on the fused path: the LM loss through linear_cross_entropy (no logits
stored) gives the PyTorch path's loss and every gradient, with ignored targets and with LoRA on the head."""

import copy

import pytest
import torch

from model import GPTConfig, GPTModel
from model.lora import apply_lora, lora_layers

# V = 101 is prime, T = 13 is prime, head dim 16 (the kernels' smallest).
CFG = GPTConfig(vocab_size=101, context_length=32, emb_dim=32, n_heads=2, n_layers=2)


def _pair(lora: bool):
    torch.manual_seed(0)
    ref = GPTModel(CFG)
    if lora:
        apply_lora(ref, rank=2, alpha=4)
        with torch.no_grad():
            for m in lora_layers(ref).values():
                m.B.normal_(std=0.1)
    return ref, copy.deepcopy(ref).use_fused_kernels(True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fused_loss_and_every_gradient_match_pytorch(lora):
    ref, fused = _pair(lora)
    idx = torch.randint(0, CFG.vocab_size, (2, 13))
    targets = torch.randint(0, CFG.vocab_size, (2, 13))
    targets[0, :4] = -100  # ignored positions (the instruction collate's padding and prompt)
    targets[1, -2:] = -100
    loss_ref = ref(idx, targets=targets)
    loss_fused = fused(idx, targets=targets)
    # The PyTorch path is unchanged: model(idx, targets=) is model.loss(model(idx), targets).
    torch.testing.assert_close(loss_ref, ref.loss(ref(idx), targets), rtol=0, atol=0)
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-5, atol=1e-6)
    loss_ref.backward()
    loss_fused.backward()
    n = 0
    for (name, p_ref), (_, p_fused) in zip(ref.named_parameters(), fused.named_parameters()):
        if not p_ref.requires_grad:
            assert p_fused.grad is None and p_ref.grad is None, name
            continue
        n += 1
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert n > 0
    if lora:
        assert fused.out_head.B.grad.abs().sum() > 0  # the head's adapter learns on the fused path too


def test_fused_loss_never_calls_the_head_module():
    """The fused loss reads the head's weight; running the head (the (N, V) logits) would defeat it."""
    torch.manual_seed(0)
    model = GPTModel(CFG, fused=True)
    calls = []
    model.out_head.register_forward_hook(lambda *a: calls.append(1))
    idx = torch.randint(0, CFG.vocab_size, (1, 5))
    model(idx, targets=idx)
    assert calls == []
    model(idx)
    assert calls == [1]
