"""Training: the CLI end to end, exact resume, bad input, DDP on gloo, the schedule, gradient accumulation.

Everything runs the `tiny` preset cut to a 32-token context on small corpora written here, and writes
only under pytest's tmp dirs. Most runs call `main([...])` in-process (no interpreter start-up); the
end-to-end test and one bad-input case go through `python scripts/train.py` in a subprocess.
"""

import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import GPTConfig, GPTModel
from model.cli import run
from model.engine import RunConfig, forward_backward, lr_at, micro_batches, param_groups
from model.pretrain import DEFAULT_STEPS, PretrainConfig, plan, pretrain

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "scripts" / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)
SENTENCES = [
    "Every effort moves you forward, one small step at a time.",
    "The cat sat on the mat and looked at the door.",
    "A stitch in time saves nine, said the old tailor.",
    "He painted the picture of the sea in the morning light.",
]
# Tied embeddings halve the parameters (the 50257-row embedding dominates the tiny preset): faster steps.
MICRO = ["--model", "tiny", "--context-length", "32", "--tie-weights", "--batch-size", "2", "--eval-batches", "2",
         "--sample-tokens", "4", "--no-progress"]


def write_corpus(path: Path, repeats: int = 12) -> Path:
    """A tiny repetitive corpus: ~50 tokens per cycle, so `repeats` cycles ~ 50 x repeats tokens."""
    path.write_text(" ".join(SENTENCES * repeats), encoding="utf-8")
    return path


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict:
    """Every file's name -> (inode, size, mtime): a rewrite, an atomic replace or a removal changes it."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def run_main(args) -> str | None:
    """scripts/train.py's main(args) in-process, through model.cli.run as the script ends; returns the
    error line it printed (exit status 2), or None when it succeeded."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run(train_cli.main, [str(a) for a in args])
        except SystemExit as e:
            if e.code in (0, None):
                return None
            assert e.code == 2, (e.code, err.getvalue())
            return err.getvalue().strip()
    return None


# ----------------------------------------------------------------------------------------------
# End to end through the command line (the run is shared with the bad-input tests)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = write_corpus(tmp / "corpus.txt", repeats=20)
    out = tmp / "run"
    cmd = [sys.executable, "scripts/train.py", *MICRO[:-1], "--data", corpus, "--steps", "30", "--lr", "3e-3",
           "--eval-every", "15", "--out", out]
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "corpus": corpus, "stdout": proc.stdout, "stderr": proc.stderr}


def test_cli_end_to_end_writes_metrics_plot_checkpoint_and_learns(finished_run):
    out = finished_run["out"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = rows(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    for r in log:
        assert {"step", "train_loss", "lr", "tokens_per_sec"} <= r.keys() and r["tokens_per_sec"] > 0
    # every --eval-every 15 steps, at each epoch end (27 windows / batch 2 = 13 steps) and at the end
    assert [r["step"] for r in log if "val_loss" in r] == [13, 15, 26, 30]
    # The logged rates are the schedule's (default warmup 10% = 3 steps, min_lr = lr / 10).
    for r in log:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, lr=3e-3, min_lr=3e-4, warmup_steps=3, total_steps=30))
    first, last = [r["train_loss"] for r in log[:5]], [r["train_loss"] for r in log[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 3.0, (first, last)  # from ~10.9 (ln 50257) to far below
    assert log[-1]["val_loss"] < log[14]["val_loss"] < math.log(50257)

    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["model_config"]["context_length"] == 32  # --context-length overrides
    assert {"model", "optimizer", "data", "rng", "schedule", "run_config", "job_config", "resume_key"} <= ckpt.keys()
    assert ckpt["job"] == "pretrain" and ckpt["job_config"]["context_length"] == 32
    model = GPTModel(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    # The progress report: a sample at the end, and the loss lines.
    assert "sample (step 30): 'Every effort moves you" in finished_run["stdout"]
    assert "step 30: train loss" in finished_run["stdout"]
    assert "tok/s, lr" in finished_run["stderr"]  # the progress bar
    assert "eval:" in finished_run["stderr"] and "sample:" in finished_run["stderr"]  # it says what it is doing


# ----------------------------------------------------------------------------------------------
# Resume = uninterrupted
# ----------------------------------------------------------------------------------------------
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    # 10 training windows of 32 tokens, batch 3: 3 steps per epoch, so the stop at step 4 falls
    # inside the second epoch. Dropout on, so that the restored RNG states matter too.
    corpus = write_corpus(tmp_path / "c.txt", repeats=8)
    common = [*MICRO, "--batch-size", "3", "--data", corpus, "--steps", "8", "--dropout", "0.1",
              "--eval-every", "0", "--lr", "2e-3", "--warmup-steps", "2"]
    assert run_main([*common, "--out", tmp_path / "straight"]) is None
    assert run_main([*common, "--out", tmp_path / "split", "--stop-after", "4"]) is None
    assert [r["step"] for r in rows(tmp_path / "split")] == list(range(1, 5))
    assert run_main([*common, "--out", tmp_path / "split", "--resume"]) is None

    straight, split = rows(tmp_path / "straight"), rows(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 9))
    ckpt = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert ckpt["data"] == {"epoch": 2, "batch": 2, "seed": 123}  # 8 steps = 2 epochs of 3 + 2
    for a, b in zip(straight, split):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6, abs=1e-6), a["step"]
        assert b["lr"] == a["lr"]
    assert split[-1]["val_loss"] == pytest.approx(straight[-1]["val_loss"], rel=1e-6)
    ckpt_split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for name, w in ckpt["model"].items():
        torch.testing.assert_close(ckpt_split["model"][name], w, rtol=1e-6, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------------------------
# Bad input: a one-line message, a non-zero exit, nothing already there touched
# ----------------------------------------------------------------------------------------------
def test_bad_input_from_the_command_line_is_one_line_without_traceback(finished_run):
    out = finished_run["out"]
    before = snapshot(out)
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", *MICRO, "--data", str(finished_run["corpus"]), "--steps", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: output folder") and "--resume" in proc.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing data", ["--data", "{tmp}/nope.txt"], "not found"),
        ("empty data", ["--data", "{empty}"], "is empty"),
        ("corpus shorter than a window", ["--data", "{short}"], "shorter than one context window"),
        ("unknown preset", ["--model", "gpt5"], "unknown model preset 'gpt5'"),
        ("zero batch", ["--batch-size", "0"], "--batch-size must be positive"),
        ("negative steps", ["--steps", "-3"], "--steps must be positive"),
        ("zero context", ["--context-length", "0"], "--context-length must be positive"),
        ("context over the preset", ["--context-length", "129"], "exceeds the tiny preset's context length 128"),
        ("min-lr above lr", ["--min-lr", "1", "--lr", "1e-3"], "--min-lr must be in"),
        ("warmup longer than the run", ["--warmup-steps", "9"], "--warmup-steps 9 is more than"),
        ("resume from nothing", ["--resume"], "no checkpoint.pt"),
        # Against the finished run of the end-to-end test:
        ("another run in --out", ["--out", "{run}"], "already holds a run"),
        ("resume with another model", ["--out", "{run}", "--resume", "--model", "gpt2-124M", "--context-length", "32"],
         "from another model config"),
        ("resume with another batch", ["--out", "{run}", "--resume", "--batch-size", "3"], "--batch-size 2 vs 3"),
    ],
)
def test_bad_input_gets_a_clear_error_and_leaves_files_untouched(finished_run, tmp_path, case, extra, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Every effort moves you.")
    fmt = {"tmp": tmp_path, "empty": tmp_path / "empty.txt", "short": tmp_path / "short.txt",
           "run": finished_run["out"]}
    before = snapshot(finished_run["out"])
    args = [*MICRO, "--data", finished_run["corpus"], "--steps", "8", "--out", tmp_path / "fresh"]
    args += [a.format(**fmt) for a in extra]  # later flags win
    msg = run_main(args)
    assert msg is not None, f"{case}: no error"
    assert msg.startswith("error: ") and "\n" not in msg and message in msg, (case, msg)
    assert snapshot(finished_run["out"]) == before, case
    assert not (tmp_path / "fresh").exists(), case  # nothing created either


# ----------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------
def test_lr_schedule_warmup_cosine_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=25)
    lrs = [lr_at(s, **kw) for s in range(25)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # linear warmup, full rate at step 4
    assert lrs[-1] == pytest.approx(0.1)  # the last step is at min_lr
    assert lrs[4 + 10] == pytest.approx(0.55)  # half way down the cosine: the mean of lr and min_lr
    assert lrs[4 + 5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # strictly decreasing after warmup
    assert lr_at(100, **kw) == pytest.approx(0.1)  # past the end (a resumed, extended run): stays at min_lr
    # The book's chapter 5: no warmup, min_lr = lr -> constant.
    assert {lr_at(s, lr=4e-4, min_lr=4e-4, warmup_steps=0, total_steps=90) for s in range(90)} == {4e-4}
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=1) == 0.0  # one step: the end at once


def test_weight_decay_only_on_matmul_weights():
    for tie in (False, True):
        model = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                                   qkv_bias=True, tie_weights=tie))
        decay, no_decay = param_groups(model, 0.1)
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                    for n in [f"{n}.weight"]} - ({"out_head.weight"} if tie else set())
        assert decayed == expected  # every Linear weight, no bias / LayerNorm / embedding
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_micro_batches_partition_the_global_batch():
    idx = torch.arange(24)
    parts = [micro_batches(idx, 3, 4, r, 2) for r in range(2)]  # batch 3 x accum 4 x 2 ranks
    seen = torch.cat([mb for m in range(4) for r in range(2) for mb in [parts[r][m]]])
    assert torch.equal(seen, idx)


def test_grad_accum_matches_one_big_batch():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
    a = GPTModel(cfg)
    b = copy.deepcopy(a)
    x, y = torch.randint(0, 97, (4, 13)), torch.randint(0, 97, (4, 13))
    loss_a = forward_backward(lambda xy: a.loss(a(xy[0]), xy[1]), [(x[:2], y[:2]), (x[2:], y[2:])])  # accum 2 x 2
    loss_b = forward_backward(lambda xy: b.loss(b(xy[0]), xy[1]), [(x, y)])  # batch 4
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_epochs_print_epoch_losses_with_a_constant_rate(tmp_path, capsys):
    """A miniature of the book's chapter 5 command (constant lr, dropout, stride = context)."""
    corpus = write_corpus(tmp_path / "c.txt", repeats=8)
    args = [*MICRO, "--batch-size", "4", "--data", corpus, "--epochs", "2", "--lr", "4e-4", "--min-lr", "4e-4",
            "--warmup-steps", "0", "--weight-decay", "0.1", "--dropout", "0.1", "--stride", "32", "--eval-every", "0",
            "--out", tmp_path / "ch5"]
    assert run_main(args) is None
    text = capsys.readouterr().out
    assert "epoch 1/2, step 2: train loss" in text and "epoch 2/2, step 4: train loss" in text
    assert {r["lr"] for r in rows(tmp_path / "ch5")} == {4e-4}


def test_defaults_are_the_documented_no_argument_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pc, rc = train_cli.configs([])
    job, p = plan(pc, rc)
    assert (pc.model, job.cfg.context_length, p.total_steps, p.device.type, p.out) == (
        "tiny", 128, DEFAULT_STEPS, "cuda" if torch.cuda.is_available() else "cpu", Path("runs/tiny"))
    assert plan(*train_cli.configs(["--fused"]))[1].out == Path("runs/tiny-fused")  # never the same folder
    assert not (tmp_path / "runs").exists()  # planning writes nothing


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel on CPU (gloo), 2 processes
# ----------------------------------------------------------------------------------------------
def _ddp_worker(rank, world_size, port, cfg_dict, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    pc, rc = cfg_dict
    result = pretrain(PretrainConfig(**pc), RunConfig(**rc))
    torch.save(result["model"].state_dict(), Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process_on_the_same_global_batch(tmp_path):
    """2 processes x batch 1 x grad-accum 2 (so no_sync is exercised) against one process x batch 2 x
    grad-accum 2: the same 4 windows in every step, the same mean loss, the same update."""
    import torch.multiprocessing as mp

    corpus = write_corpus(tmp_path / "c.txt", repeats=8)
    pc = dict(model="tiny", data=str(corpus), context_length=32, tie_weights=True, sample_tokens=2)
    base = dict(grad_accum=2, steps=3, lr=1e-3, eval_every=0, eval_batches=2, device="cpu", progress=False)
    ddp_out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), (pc, {**base, "batch_size": 1, "out": str(ddp_out)}),
                                str(tmp_path)), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name  # DDP keeps the replicas identical

    single = pretrain(PretrainConfig(**pc), RunConfig(**base, batch_size=2, out=str(tmp_path / "single")))
    losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(rows(ddp_out), rows(tmp_path / "single"), strict=True)]
    assert len(losses) == 3 and losses[0][0] != losses[-1][0]
    for a, b in losses:
        assert a == pytest.approx(b, rel=1e-5)
    for name, w in single["model"].state_dict().items():
        torch.testing.assert_close(w0[name], w, rtol=1e-4, atol=1e-5, msg=name)
    ckpt = torch.load(ddp_out / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2  # both ranks' random streams, for resume


def test_fused_training_matches_the_pytorch_run(tmp_path, capsys):
    """`--fused` trains on the Triton kernels (interpreted off-GPU) with the PyTorch run's losses."""
    corpus = write_corpus(tmp_path / "c.txt", repeats=8)
    common = [*MICRO, "--data", corpus, "--steps", "3", "--eval-every", "0", "--dropout", "0"]
    assert run_main([*common, "--out", tmp_path / "torch"]) is None
    assert run_main([*common, "--fused", "--out", tmp_path / "fused"]) is None
    # Off-GPU, the one-line notice that this path is slow; on a GPU the kernels are compiled, no notice.
    assert ("interpreter" in capsys.readouterr().out.lower()) == (not torch.cuda.is_available())
    ref, fused = rows(tmp_path / "torch"), rows(tmp_path / "fused")
    assert len(ref) == len(fused) == 3
    for r, f in zip(ref, fused):
        assert math.isclose(f["train_loss"], r["train_loss"], rel_tol=1e-4), (r, f)


# ----------------------------------------------------------------------------------------------
# Never a traceback, nothing lost, nothing stuck (issue 12)
# ----------------------------------------------------------------------------------------------
def test_a_diverging_loss_is_one_line_and_overwrite_keeps_the_old_run(finished_run, tmp_path):
    """--lr 1e6 diverges: one line (exit 2), no traceback. With --overwrite the old run is replaced only
    once the new one has written a checkpoint, so this failed replacement leaves it whole."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finished_run["out"], old)
    before = snapshot(old)
    msg = run_main([*MICRO, "--data", finished_run["corpus"], "--steps", "20", "--lr", "1e6", "--warmup-steps", "0",
                    "--eval-every", "0", "--overwrite", "--out", old])
    assert msg is not None and msg.startswith("error: the training loss is") and "--lr" in msg, msg
    assert "\n" not in msg and "Traceback" not in msg
    assert snapshot(old) == before  # metrics.jsonl, loss.png and checkpoint.pt of the old run, untouched


def test_overwrite_replaces_the_run_once_it_has_a_checkpoint(finished_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finished_run["out"], old)
    assert run_main([*MICRO, "--data", finished_run["corpus"], "--steps", "3", "--eval-every", "2",
                     "--overwrite", "--out", old]) is None
    assert [r["step"] for r in rows(old)] == [1, 2, 3]  # the new run's rows only
    assert torch.load(old / "checkpoint.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("resume", [False, True])
def test_leftover_metrics_without_a_checkpoint_do_not_block_a_rerun(tmp_path, resume):
    corpus = write_corpus(tmp_path / "c.txt", repeats=8)
    out = tmp_path / "crashed"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 10.9}\n{"step": 2, "train_lo')  # torn by a kill
    assert run_main([*MICRO, "--data", corpus, "--steps", "2", "--eval-every", "0", "--out", out,
                     *(["--resume"] if resume else [])]) is None
    assert [r["step"] for r in rows(out)] == [1, 2] and rows(out)[0]["train_loss"] != 10.9


def test_non_utf8_data_and_a_corrupted_checkpoint_are_named_in_one_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\u00e9 au lait, na\u00efve r\u00e9sum\u00e9. ".encode("latin-1") * 50)
    msg = run_main([*MICRO, "--data", bad, "--steps", "2", "--out", tmp_path / "a"])
    assert msg.startswith("error: ") and str(bad) in msg and "not UTF-8" in msg, msg

    corpus = write_corpus(tmp_path / "c.txt", repeats=8)
    for name, content in (("random", os.urandom(4096)), ("text", b"not a checkpoint\n")):
        out = tmp_path / name
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(content)
        msg = run_main([*MICRO, "--data", corpus, "--steps", "2", "--out", out, "--resume"])
        assert msg.startswith("error: cannot read checkpoint") and "not a PyTorch checkpoint" in msg, msg
        assert "weights_only" not in msg


def test_context_length_one_trains_and_samples(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt", repeats=2)
    args = [*MICRO, "--context-length", "1", "--data", corpus, "--steps", "2", "--out", tmp_path / "r"]
    assert run_main(args) is None
    assert "sample (step 2): 'Every effort moves you" in capsys.readouterr().out  # a bigram model's continuation
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_samples_and_evaluations_do_not_shift_the_training_stream(tmp_path):
    """Sampling (temperature + top-k, its own seeded generator) and evaluation at every step give the
    same losses as neither, with dropout on, so any draw from the training stream would show."""
    corpus = write_corpus(tmp_path / "c.txt", repeats=8)
    common = [*MICRO, "--data", corpus, "--steps", "4", "--dropout", "0.1", "--sample-tokens", "3"]
    assert run_main([*common, "--eval-every", "0", "--sample-every", "0", "--out", tmp_path / "quiet"]) is None
    assert run_main([*common, "--eval-every", "1", "--sample-every", "1", "--out", tmp_path / "busy"]) is None
    quiet, busy = rows(tmp_path / "quiet"), rows(tmp_path / "busy")
    assert [r["train_loss"] for r in quiet] == [r["train_loss"] for r in busy]
    assert all("sample" in r for r in busy) and "sample" in quiet[-1]
    assert busy[-1]["sample"] == quiet[-1]["sample"]  # the same seeded draws, whenever it runs


def test_the_final_checkpoint_is_written_before_the_end_of_run_evaluation(tmp_path):
    """An evaluation that fails at the end cannot lose the training: the checkpoint is already there."""
    from model.engine import fit
    from model.pretrain import build_model

    corpus = write_corpus(tmp_path / "c.txt", repeats=8)
    pc, rc = train_cli.configs([*MICRO, "--data", str(corpus), "--steps", "3", "--eval-every", "0",
                                "--out", str(tmp_path / "r")])
    job, p = plan(pc, rc)

    def broken(*args):
        raise RuntimeError("the evaluation broke")

    job.evaluate = broken
    with pytest.raises(RuntimeError, match="the evaluation broke"):
        fit(p, job, build_model(pc, rc.seed))
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] == 3
    # ... and --resume from it has nothing left to train, so the evaluation simply runs again.
    assert run_main([*MICRO, "--data", corpus, "--steps", "3", "--eval-every", "0", "--out", tmp_path / "r",
                     "--resume"]) is None


def _wait_for_rows(path: Path, n: int, proc, timeout: float = 600) -> None:
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.is_file() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {n} rows in {path} after {timeout} s")


SIGNAL_RUN = [*MICRO, "--batch-size", "3", "--steps", "30", "--dropout", "0.1", "--eval-every", "0", "--lr", "2e-3"]


@pytest.fixture(scope="module")
def straight_signal_run(tmp_path_factory):
    """The uninterrupted run the signalled ones are compared with (shared by both signals)."""
    tmp = tmp_path_factory.mktemp("straight")
    corpus = write_corpus(tmp / "c.txt", repeats=8)
    assert run_main([*SIGNAL_RUN, "--data", corpus, "--out", tmp / "run"]) is None
    return {"corpus": corpus, "rows": rows(tmp / "run")}


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_saves_a_checkpoint_and_resume_continues_exactly(straight_signal_run, tmp_path, sig, status):
    import signal

    common = [*SIGNAL_RUN, "--data", straight_signal_run["corpus"]]
    split = tmp_path / "split"
    proc = subprocess.Popen([sys.executable, "scripts/train.py", *map(str, common), "--out", str(split)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(split / "metrics.jsonl", 2, proc)
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr and "--resume" in stdout, (stdout, stderr)
    stopped = torch.load(split / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= stopped < 30 and [r["step"] for r in rows(split)] == list(range(1, stopped + 1))

    assert run_main([*common, "--out", split, "--resume"]) is None
    straight, resumed = straight_signal_run["rows"], rows(split)
    assert [r["step"] for r in resumed] == list(range(1, 31))
    for a, b in zip(straight, resumed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6, abs=1e-6), a["step"]


def test_help_gives_every_flag_a_help_and_its_default():
    import argparse

    parser = train_cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings
        text = train_cli.HelpFormatter("train.py")._get_help_string(action)
        switch = action.nargs == 0
        assert switch or "default" in text, (action.option_strings, text)
    assert {"--steps", "--resume", "--overwrite", "--fused", "--sample-temperature"} <= {
        s for a in parser._actions for s in a.option_strings}
