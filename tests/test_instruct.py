"""Chapter 7: the prompt, the book's collation, the split, responses, the judge client (against a
server the test starts on 127.0.0.1), and scripts/finetune_instruct.py + scripts/ask.py end to end."""

import http.server
import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch

from model import GPTConfig, GPTModel
from model.finetune_data import (IGNORE_INDEX, Tokenized, collate_instructions, format_prompt, read_instructions,
                                 split_instructions)
from model.judge import JudgeUnavailable, judge_prompt, parse_score, score_responses
from model.weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=1)
PAD = 50256


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_prompt_is_the_books_alpaca_format():
    with_input = format_prompt({"instruction": "Convert to passive.", "input": "The cat ate it.", "output": "x"})
    assert with_input == ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\nConvert to passive.\n\n### Input:\n"
                          "The cat ate it.\n\n### Response:\n")
    assert "### Input:" not in format_prompt({"instruction": "Name a color.", "input": "", "output": "red"})


def test_collate_is_the_books_with_prompt_mask_truncation_and_an_all_ignored_error():
    a = Tokenized(ids=[1, 2, 3, 4, 5], prompt_len=3, index=0)
    b = Tokenized(ids=[6, 7], prompt_len=1, index=1)
    x, y = collate_instructions([a, b], pad_id=PAD)
    # The book's example: inputs padded with <|endoftext|>; targets shifted, the first pad kept, the rest -100.
    assert x.tolist() == [[1, 2, 3, 4, 5], [6, 7, PAD, PAD, PAD]]
    assert y.tolist() == [[2, 3, 4, 5, PAD], [7, PAD, -100, -100, -100]]
    x, y = collate_instructions([a, b], pad_id=PAD, mask_prompt=True)
    assert y.tolist() == [[-100, -100, 4, 5, PAD], [7, PAD, -100, -100, -100]]  # prompt targets ignored too
    x, y = collate_instructions([a, b], pad_id=PAD, max_length=3)
    assert x.shape == (2, 3) and y.tolist() == [[2, 3, 4], [7, PAD, -100]]
    long_prompt = Tokenized(ids=list(range(10, 20)), prompt_len=9, index=7)
    with pytest.raises(ValueError, match=r"entries \[7\] is ignored"):
        collate_instructions([long_prompt], pad_id=PAD, mask_prompt=True, max_length=4)


def test_split_is_85_10_5_seeded(tmp_path):
    data = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(1100)]
    train, test, val = split_instructions(data, seed=1)
    assert (len(train), len(test), len(val)) == (935, 110, 55)  # the book's
    assert split_instructions(data, seed=1)[0] == train and split_instructions(data, seed=2)[0] != train
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="entry 0 has no string 'output'"):
        read_instructions(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        read_instructions(tmp_path / "junk.json")


# ----------------------------------------------------------------------------------------------
# The judge, against a fake Ollama on 127.0.0.1
# ----------------------------------------------------------------------------------------------
class _FakeOllama(http.server.BaseHTTPRequestHandler):
    replies: list = []
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        content = type(self).replies[(len(type(self).requests) - 1) % len(type(self).replies)]
        if content == "STREAM":  # Ollama's streamed form: one JSON object per line
            payload = "".join(json.dumps({"message": {"content": c}, "done": i == 1}) + "\n"
                              for i, c in enumerate(["7", "3"]))
        else:
            payload = json.dumps({"message": {"role": "assistant", "content": content}, "done": True})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeOllama)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeOllama.requests = []
    yield server, f"http://127.0.0.1:{server.server_port}/api/chat"
    server.shutdown()
    server.server_close()


def test_judge_client_speaks_ollama_and_averages(judge):
    _, url = judge
    _FakeOllama.replies = ["85", "Score: 40", "STREAM", "no idea"]
    entries = [{"instruction": f"Say {k}.", "input": "", "output": str(k), "model_response": f"r{k}"} for k in range(4)]
    result = score_responses(entries, url, model="llama3")
    assert result["scores"] == [85, 40, 73, None] and result["n_scored"] == 3
    assert result["mean_score"] == pytest.approx((85 + 40 + 73) / 3)
    path, body = _FakeOllama.requests[0]
    assert path == "/api/chat" and body["model"] == "llama3" and body["messages"][0]["role"] == "user"
    assert body["options"]["temperature"] == 0
    assert body["messages"][0]["content"] == judge_prompt(entries[0], "r0")
    assert "score the model response `r0` on a scale from 0 to 100" in judge_prompt(entries[0], "r0")
    assert parse_score("I'd say 250 or 90") == 90


def test_unreachable_judge_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeUnavailable, match=f"no judge answers at http://127.0.0.1:{port}"):
        score_responses([{"instruction": "x", "input": "", "output": "y", "model_response": "z"}],
                        f"http://127.0.0.1:{port}/api/chat", timeout=5)


# ----------------------------------------------------------------------------------------------
# The scripts, end to end
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    save_pretrained(GPTModel(TINY), d / "hf")
    data = [{"instruction": f"Name the number {k}.", "input": "" if k % 2 else "digits", "output": f"{k}"}
            for k in range(40)]
    (d / "data.json").write_text(json.dumps(data))
    return d


@pytest.mark.slow
def test_finetune_instruct_and_ask_end_to_end(base, tmp_path, judge, capsys):
    _, url = judge
    _FakeOllama.replies = ["60"]
    main = _script("finetune_instruct")
    out = tmp_path / "run"
    assert main(["--data", str(base / "data.json"), "--init-from", str(base / "hf"), "--out", str(out),
                 "--epochs", "2", "--lr", "3e-3", "--mask-prompt", "--max-new-tokens", "4", "--no-progress",
                 "--judge-url", url]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for k in ("train_loss", "val_loss", "test_loss"):
        assert m[k] > 0
    assert m["mean_score"] == 60 and m["n_entries"] == {"train": 34, "val": 2, "test": 4}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns
    entries = json.loads((out / "instruction-data-with-response.json").read_text())
    assert len(entries) == 4 and all(isinstance(e["model_response"], str) for e in entries)
    assert all(set(e) == {"instruction", "input", "output", "model_response"} for e in entries)
    for f in ("loss.png", "config.json", "model.safetensors", "checkpoint.pt"):
        assert (out / f).is_file(), f
    capsys.readouterr()
    assert _script("ask")(["--checkpoint", str(out), "--instruction", "Name the number 3.", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.slow
def test_unreachable_judge_keeps_the_results(base, tmp_path, capsys):
    main = _script("finetune_instruct")
    out = tmp_path / "run"
    assert main(["--data", str(base / "data.json"), "--init-from", str(base / "hf"), "--out", str(out),
                 "--steps", "1", "--batch-size", "4", "--eval-every", "0", "--eval-batches", "1", "--lora-rank", "2",
                 "--no-progress", "--max-new-tokens", "2", "--judge-url", "http://127.0.0.1:9/api/chat"]) == 0
    err = capsys.readouterr().err
    assert "no judge answers at http://127.0.0.1:9" in err and "other results are kept" in err
    m = json.loads((out / "metrics.json").read_text())
    assert "judge_error" in m and "test_loss" in m and "mean_score" not in m
    assert (out / "adapters.safetensors").is_file() and (out / "instruction-data-with-response.json").is_file()


@pytest.mark.slow
def test_fused_instruct_job_gives_the_pytorch_losses(tmp_path):
    """A few engine steps of the instruction job (LoRA on every Linear, the head's too, a masked
    prompt): the fused path (the LM loss through linear_cross_entropy) gives the PyTorch path's losses.
    A 101-token vocabulary keeps the kernels cheap in Triton's interpreter."""
    from model.engine import RunConfig, fit, prepare
    from model.instruct import InstructJob
    from model.lora import apply_lora

    cfg = GPTConfig(vocab_size=101, context_length=32, emb_dim=32, n_heads=2, n_layers=1)
    entries = [{"instruction": "x", "input": "", "output": "y"}] * 4
    g = torch.Generator().manual_seed(0)
    items = [Tokenized(torch.randint(0, 100, (int(n),), generator=g).tolist(), prompt_len=4, index=i)
             for i, n in enumerate(torch.randint(6, 20, (12,), generator=g))]
    losses = {}
    for fused in (False, True):
        job = InstructJob(entries, entries, entries, context_length=32, max_length=None, mask_prompt=True,
                          batch_size=4, eval_batches=1, source="synthetic", settings={}, pad_id=100)
        job.items = {"train": items, "val": items[:4], "test": items[:4]}
        job.sample = lambda model, device: None  # generating would need the GPT-2 vocabulary
        rc = RunConfig(steps=3, batch_size=4, eval_every=0, eval_batches=1, lr=1e-2, out=str(tmp_path / str(fused)),
                       progress=False, device="cpu")
        torch.manual_seed(0)
        model = apply_lora(GPTModel(cfg, fused=fused), rank=2, alpha=4)
        rows = fit(prepare(rc, job), job, model)["rows"]
        losses[fused] = torch.tensor([r["train_loss"] for r in rows] + [rows[-1]["val_loss"]])
    assert losses[False][2] < losses[False][0]  # it learns
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)


def test_real_instruction_file_splits_as_the_book(shared_data):
    path = shared_data / "instruction-data.json"
    if not path.is_file():
        pytest.skip("no instruction-data.json")
    train, test, val = split_instructions(read_instructions(path))
    assert (len(train), len(test), len(val)) == (935, 110, 55)
