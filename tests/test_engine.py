"""The training engine's pieces that need no training run: the checks of `prepare`, the run files,
the RNG states, the document split. (tests/test_train.py runs the loop end to end.)"""

import os
from pathlib import Path

import pytest
import torch

import model.engine.plan as plan_mod
from model.data import split_documents
from model.engine import RunConfig, check_memory, load_checkpoint, training_memory
from model.engine.run_files import read_metrics, rng_state, save_checkpoint, set_rng_state
from model.gpt import GPTConfig, GPTModel
from model.pretrain import PretrainConfig, plan
from model.tokenizer import encode


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "c.txt"
    path.write_text("Every effort moves you forward, one small step at a time. " * 60, encoding="utf-8")
    return path


def test_bfloat16_on_a_cpu_is_announced_with_its_slowdown(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_mod, "cpu_has_bf16", lambda: False)
    pc = PretrainConfig(data=str(corpus(tmp_path)), context_length=16)
    _, p = plan(pc, RunConfig(dtype="bfloat16", device="cpu", steps=2, out=str(tmp_path / "r")))
    note = [n for n in p.notes if "bfloat16" in n]
    assert len(note) == 1 and f"{plan_mod.CPU_BF16_SLOWDOWN}x slower than float32" in note[0]
    _, p = plan(pc, RunConfig(device="cpu", steps=2, out=str(tmp_path / "r")))
    assert not [n for n in p.notes if "bfloat16" in n]


def test_a_preset_too_big_for_the_machine_is_refused_with_the_estimate(tmp_path, monkeypatch):
    """gpt2-1558M (1.64B parameters with its separate head) on a 24 GB machine: 16 bytes a parameter,
    26 GB before any activation."""
    monkeypatch.setattr(plan_mod, "machine_memory", lambda device: (24 * 10**9, "RAM"))
    pc = PretrainConfig(model="gpt2-1558M", data=str(corpus(tmp_path)), context_length=16)
    refusal = r"--model gpt2-1558M needs at least 26\.\d GB .* RAM is 24\.0 GB: it cannot train here"
    with pytest.raises(ValueError, match=refusal):
        plan(pc, RunConfig(device="cpu", steps=2, out=str(tmp_path / "r")))
    # Over half the memory: a note with the figure, not a refusal.
    with torch.device("meta"):
        n = sum(p.numel() for p in GPTModel(GPTConfig.from_preset("gpt2-124M")).parameters())
    assert training_memory(n, n) == 16 * n
    note = check_memory(n, n, torch.device("cpu"))  # 2.6 GB on this machine: nothing to say
    monkeypatch.setattr(plan_mod, "machine_memory", lambda device: (4 * 10**9, "RAM"))
    assert "activations may not fit" in check_memory(n, n, torch.device("cpu")) and note is None
    assert check_memory(n, 0, torch.device("cpu")) is None  # frozen weights need no gradient or AdamW state
    assert not (tmp_path / "r").exists()


def test_a_corrupted_checkpoint_gets_one_line_that_does_not_advise_unsafe_loading(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"step": 3, "w": torch.ones(1000)})
    assert load_checkpoint(good)["step"] == 3
    data = good.read_bytes()
    cases = {"random": os.urandom(2048), "truncated": data[: len(data) // 2], "empty": b""}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(content)
        with pytest.raises(ValueError) as e:
            load_checkpoint(bad)
        msg = str(e.value)
        assert str(bad) in msg and "\n" not in msg and "weights_only" not in msg, (name, msg)
    # A real pickle of arbitrary objects: refused, and said why, again without the unsafe advice.
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": Path("x")}, unsafe)
    with pytest.raises(ValueError, match="beyond tensors") as e:
        load_checkpoint(unsafe)
    assert "weights_only" not in str(e.value)


def test_a_torn_last_metrics_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]


def test_rng_state_keeps_only_this_rank_s_gpu(monkeypatch):
    """Each rank saves and restores its own device's CUDA generator, never every visible GPU's."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(3))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("read every GPU's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("set every GPU's state"))
    dev = torch.device("cuda", 1)
    state = rng_state(dev)
    set_rng_state(state, dev)
    assert calls == [("get", dev), ("set", dev)]
    calls.clear()
    set_rng_state({**state, "cuda": [torch.zeros(3), torch.ones(3)]}, dev)  # an older checkpoint: one per GPU
    assert calls == [("set", dev)]
    cpu = rng_state(torch.device("cpu"))
    assert cpu["cuda"] is None and not calls[1:]


def test_validation_documents_are_held_out_throughout_the_corpus():
    docs = [f"Document {i} talks about topic {i}. " * (5 + i % 7) for i in range(40)]
    train, val = split_documents(docs, 0.1)
    assert len(train) + len(val) == sum(len(encode(d + "<|endoftext|>")) for d in docs)
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13
    from model.tokenizer import decode

    text = decode(val)
    held = [i for i in range(40) if f"Document {i} talks" in text]
    assert held and min(held) < 10 and max(held) >= 30  # spread from the start to the end, not a tail
    assert not any(f"Document {i} talks" in decode(train) for i in held)  # whole documents


def test_fused_with_dropout_is_left_to_the_model(tmp_path):
    """The training config no longer refuses --fused with dropout: the model's kernels decide."""
    pc = PretrainConfig(data=str(corpus(tmp_path)), context_length=16, fused=True, dropout=0.1)
    job, p = plan(pc, RunConfig(device="cpu", steps=2, out=str(tmp_path / "r")))
    assert job.cfg.drop_rate == 0.1 and p.out == tmp_path / "r"
