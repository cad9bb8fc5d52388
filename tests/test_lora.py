"""LoRA (model/lora.py): the book's appendix E on our model, both paths."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from model import GPTConfig, GPTModel
from model.lora import (LoRALinear, apply_lora, count_trainable, load_adapters, lora_layers, merge_lora,
                        save_adapters)

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)


def _model(seed=0, fused=False):
    torch.manual_seed(seed)
    return GPTModel(CFG, fused=fused)


def _randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.1)


def test_init_is_the_books_and_b_zero_gives_the_base_model_exactly():
    base = _model()
    lora = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    idx = torch.randint(0, CFG.vocab_size, (2, 11))
    torch.testing.assert_close(lora(idx), base(idx), rtol=0, atol=0)  # bitwise: B = 0
    layer = lora.blocks[0].mlp.fc
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert torch.count_nonzero(layer.B) == 0
    # Kaiming-uniform with a = sqrt(5) on an (in, r) matrix: uniform in +-1/sqrt(r), and it uses the range
    bound = 1 / math.sqrt(4)
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.8 * bound


def test_every_linear_is_wrapped_and_qkv_gets_three_adapters():
    lora = apply_lora(_model(), rank=2, alpha=2)
    names = set(lora_layers(lora))
    want = {"out_head"} | {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.out_proj", "mlp.fc", "mlp.proj")}
    assert names == want
    assert lora.blocks[0].attn.qkv.groups == 3
    bases = {id(x.base) for x in lora_layers(lora).values()}
    assert all(id(m) in bases for m in lora.modules() if isinstance(m, nn.Linear))  # none left bare
    assert "out_head" not in lora_layers(apply_lora(_model(), 2, 2, include_head=False))
    with pytest.raises(ValueError, match="already"):
        apply_lora(lora, 2, 2)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_model(), 0, 2)


def test_grouped_qkv_adapter_is_three_separate_adapters():
    """groups=3 on the fused (C -> 3C) layer == the book's three (C -> C) layers, each with its adapter."""
    torch.manual_seed(0)
    fused = nn.Linear(6, 18)
    layer = LoRALinear(fused, rank=2, alpha=3, groups=3)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(5, 6)
    parts = [x @ fused.weight[g * 6:(g + 1) * 6].T + fused.bias[g * 6:(g + 1) * 6]
             + 1.5 * (x @ layer.A[g]) @ layer.B[g] for g in range(3)]
    torch.testing.assert_close(layer(x), torch.cat(parts, -1))
    torch.testing.assert_close(x @ layer.weight.T + layer.bias, layer(x), rtol=1e-5, atol=1e-6)


def test_trainable_parameter_count_is_the_books():
    """Appendix E: rank 16 on gpt2-124M with a 2-class head, separate q/k/v adapters: 2,666,528."""
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset("gpt2-124M"))
        model.out_head = nn.Linear(768, 2)
        apply_lora(model, rank=16, alpha=16)
    per_block = 3 * 16 * (768 + 768) + 16 * (768 + 768) + 2 * 16 * (768 + 3072)  # q, k, v, out_proj, fc, proj
    assert count_trainable(model) == 12 * per_block + 16 * (768 + 2) == 2_666_528


def test_merge_equals_unmerged():
    lora = apply_lora(_model(), rank=3, alpha=5)
    _randomize_b(lora)
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    before = lora(idx)
    assert not torch.allclose(before, _model()(idx), atol=1e-3)  # the adapters do act
    merged = merge_lora(lora)
    assert not lora_layers(merged) and all(p.requires_grad is False for p in merged.parameters())
    torch.testing.assert_close(merged(idx), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_only_adapters_get_gradients_the_heads_a_nonzero_one(fused):
    """Every adapter (the head's, and the MLP's fc, which the model reads as `.weight`) gets a
    non-zero gradient through the LM loss; nothing else gets one. On the fused path the loss goes
    through linear_cross_entropy, which reads the head's effective weight."""
    lora = apply_lora(_model(fused=fused), rank=2, alpha=4)
    _randomize_b(lora)  # with B = 0, A's gradient would be 0 by construction
    idx = torch.randint(0, CFG.vocab_size, (2, 7))
    targets = torch.randint(0, CFG.vocab_size, (2, 7))
    lora(idx, targets=targets).backward()
    for name, p in lora.named_parameters():
        if name.endswith((".A", ".B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert count_trainable(lora) == sum(m.A.numel() + m.B.numel() for m in lora_layers(lora).values())


def test_save_load_round_trip_and_mismatch(tmp_path):
    lora = apply_lora(_model(), rank=2, alpha=4)
    _randomize_b(lora)
    path = save_adapters(lora, tmp_path / "adapters.safetensors")
    assert path.stat().st_size < 40_000  # the adapters alone, not the model
    fresh = load_adapters(_model(), path)  # the same base: the same function
    idx = torch.randint(0, CFG.vocab_size, (1, 8))
    torch.testing.assert_close(fresh(idx), lora(idx), rtol=0, atol=0)

    other = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=48, n_heads=2, n_layers=2))
    with pytest.raises(ValueError, match="another base model"):
        load_adapters(other, path)
    deeper = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=3))
    with pytest.raises(ValueError, match="no adapter for blocks.2"):
        load_adapters(deeper, path)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapters(_model(), tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="safetensors"):
        load_adapters(_model(), tmp_path / "junk.safetensors")
