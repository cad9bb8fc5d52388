"""Where fine-tuning starts from: model.weights.load_model reads every checkpoint kind the tests write."""

import pytest
import torch

from model import GPTConfig, GPTModel
from model.weights import load_model, save_pretrained

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=64, n_heads=1, n_layers=2)  # 64-wide heads: a bare .safetensors infers them


def _model():
    torch.manual_seed(0)
    return GPTModel(CFG).eval()


def _same(a, b):
    idx = torch.randint(0, CFG.vocab_size, (1, 9))
    torch.testing.assert_close(a(idx), b(idx), rtol=0, atol=0)


def test_every_kind_loads_the_same_model(tmp_path):
    m = _model()
    run = tmp_path / "run"
    run.mkdir()
    # What scripts/train.py writes (torch.compile's prefix on the names included).
    state = {f"_orig_mod.{k}": v for k, v in m.state_dict().items()}
    torch.save({"format": 1, "model": state, "model_config": CFG.to_dict(), "step": 3}, run / "checkpoint.pt")
    save_pretrained(m, tmp_path / "hf")
    for source in (run, run / "checkpoint.pt", tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        loaded = load_model(source)
        assert loaded.cfg == CFG
        _same(loaded, m)
    assert load_model(tmp_path / "hf", fused=True).fused


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(tmp_path)  # an empty folder
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "nowhere.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_model(tmp_path / "other.pt")
    torch.save({"model": {"x": torch.zeros(1)}, "model_config": CFG.to_dict()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_model(tmp_path / "bad.pt")
