"""scripts/generate.py as a user runs it: a mistake is one line and exit 2, never a traceback; Ctrl-C
and SIGTERM stop it cleanly; its text streams out while it is still generating.

Each case is a real process (the exit status and what reaches the terminal are the point), on a
checkpoint written here: a tiny model whose final LayerNorm is zeroed, so every logit is 0 and greedy
decoding picks token 0 ("!") at every step, the same on any machine.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import GPTConfig, GPTModel
from model.ops import INTERPRETER_NOTICE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate.py"
PROMPT = "Every effort moves you"
CFG = GPTConfig(context_length=1024, emb_dim=32, n_heads=2, n_layers=1, tie_weights=True)  # head dim 16

pytestmark = pytest.mark.slow  # every case starts an interpreter (and imports torch): seconds each


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPTModel(CFG)
    with torch.no_grad():
        model.final_norm.weight.zero_()
        model.final_norm.bias.zero_()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "model_config": CFG.to_dict()}, path)  # model/training.py's keys
    return path


def _env() -> dict:
    # No tiktoken cache variable: the shipped tokenizer files must be enough.
    return {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}


def generate(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _script():
    spec = importlib.util.spec_from_file_location("generate_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_one_line_refusal(status: int, stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def refused(*args, fragments=()) -> str:
    """A real process: the exit status and everything it printed."""
    res = generate(*args)
    return assert_one_line_refusal(res.returncode, res.stderr, *fragments)


def refused_in_process(capsys, *args, fragments=()) -> str:
    """The same through the script's own `run(main)` in this process: a process costs seconds."""
    module = _script()
    with pytest.raises(SystemExit) as exit_:
        module.run(module.main, [str(a) for a in args])
    return assert_one_line_refusal(exit_.value.code, capsys.readouterr().err, *fragments)


# ----------------------------------------------------------------------------------------------
# A user's mistakes: one line, exit status 2
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(ckpt):
    refused("--checkpoint", ckpt, "--device", "cuda", fragments=("no CUDA GPU", "--device cpu"))


def test_prompt_file_not_utf8(ckpt, tmp_path):
    bad = tmp_path / "latin1 prompts.txt"
    bad.write_bytes("café au lait\n".encode("latin-1"))
    line = refused("--checkpoint", ckpt, "--prompt-file", bad, fragments=(str(bad), "not UTF-8"))
    assert "0xe9" in line  # the offending byte, so that the user can find it


def test_damaged_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(os.urandom(4096))
    line = refused("--checkpoint", bad, fragments=(str(bad), "cannot read checkpoint"))
    assert "weights_only" not in line  # never advise running a damaged file's code


@pytest.mark.parametrize("damage", ["truncated", "foreign pickle", "empty", "missing", "another shape"])
def test_bad_checkpoint_in_process(ckpt, tmp_path, capsys, damage):
    bad = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        data = ckpt.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "foreign pickle":  # a pickle of something that is not data: weights_only refuses it
        torch.save({"model": {}, "model_config": {}, "fn": Path}, bad)
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "another shape":
        state = torch.load(ckpt, weights_only=True)
        state["model_config"]["emb_dim"] = 64
        torch.save(state, bad)
    line = refused_in_process(capsys, "--checkpoint", bad, fragments=(str(bad),))
    assert "weights_only" not in line
    if damage == "another shape":
        assert "do not fit its model_config" in line


def test_other_mistakes_in_process(ckpt, tmp_path, capsys):
    refused_in_process(capsys, "--checkpoint", ckpt, "--device", "tpu0", fragments=("--device 'tpu0'",))
    refused_in_process(capsys, "--checkpoint", ckpt, "--prompt-file", tmp_path / "none.txt",
                       fragments=("none.txt", "no such file"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    refused_in_process(capsys, "--checkpoint", ckpt, "--prompt-file", tmp_path / "blank.txt", fragments=("no prompt",))
    refused_in_process(capsys, "--checkpoint", ckpt, "--max-new-tokens", 2000, fragments=("exceeds the model's context",))
    refused_in_process(capsys, "--checkpoint", ckpt, "--top-k", 0, fragments=("top_k",))
    refused_in_process(capsys, "--checkpoint", ckpt, "--prompt", "", fragments=("at least one token",))


# ----------------------------------------------------------------------------------------------
# Streaming, Ctrl-C and SIGTERM
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_first_text_arrives_before_generation_ends(ckpt, sig, status, word):
    """Read the process's stdout as it comes; as soon as generated text (past the echoed prompt) has
    arrived, stop the process. Had the text been held back until the end, it would only arrive with
    the speed line that follows the last token, and the process would exit 0 instead of `status`.
    Without the cache the planned ~1,000 tokens take minutes; the first arrives in well under a second."""
    planned = CFG.context_length - 4  # the prompt is 4 tokens
    # SIGINT must reach Python's default handler even if this test runs where SIGINT is ignored
    # (a background job): a process inherits an ignored SIGINT, and Python then leaves it ignored.
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--checkpoint", str(ckpt), "--prompt", PROMPT, "--no-cache",
         "--max-new-tokens", str(planned), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        got = b""
        deadline = time.monotonic() + 300
        while len(got) <= len(PROMPT) and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:  # the process closed stdout: it ended
                break
            got += chunk
        first_text_at = time.monotonic()
        still_running = proc.poll() is None
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stopped_at = time.monotonic()
    out, err = (got + out).decode(), err.decode()
    assert still_running, f"the process had ended before any generated text arrived: {err}"
    assert out.startswith(PROMPT + "!"), out
    assert "new tokens in" not in err, "generation ended before the first text was read"
    assert proc.returncode == status, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == word, err
    generated = out[len(PROMPT):]
    assert generated.rstrip("\n") == "!" * len(generated.rstrip("\n")) and generated.endswith("\n")
    assert 1 <= len(generated.rstrip("\n")) < planned
    assert stopped_at >= first_text_at


def test_a_reader_that_stops_early_ends_it_quietly(ckpt):
    """`generate.py ... | head -c 30`: the reader closes the pipe while text is still coming. No
    BrokenPipeError traceback; the status a process killed by SIGPIPE has (141)."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--checkpoint", str(ckpt), "--prompt", PROMPT, "--no-cache",
         "--max-new-tokens", str(CFG.context_length - 4), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    try:
        os.read(proc.stdout.fileno(), 30)  # the first text, as `head -c 30` would take it
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 141, err


# ----------------------------------------------------------------------------------------------
# --fused on a CPU, --help
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --fused runs compiled, with no notice")
def test_fused_on_cpu_says_it_runs_in_the_interpreter(ckpt):
    res = generate("--checkpoint", ckpt, "--fused", "--max-new-tokens", 1, "--prompt", PROMPT)
    assert res.returncode == 0, res.stderr
    assert res.stdout == PROMPT + "!\n"
    assert res.stderr.splitlines().count(INTERPRETER_NOTICE) == 1


def test_help_shows_every_flag_with_its_help_and_default(capsys):
    parser = _script().make_parser()
    text = parser.format_help()
    flags = [a for a in parser._actions if a.dest != "help"]
    assert len(flags) >= 15
    for action in flags:
        assert action.help and action.option_strings[0] in text
    assert text.count("(default:") == len(flags)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0
