"""Generate text with the GPT: `python scripts/generate.py --help`.

    python scripts/generate.py --checkpoint runs/tiny/checkpoint.pt --prompt "Every effort moves you"
    python scripts/generate.py --checkpoint path/to/gpt2 --temperature 0.8 --top-k 50 --seed 0 --fused
    python scripts/generate.py --checkpoint gpt2.safetensors --prompt "Hello" --prompt "The sky" # a batch

--checkpoint takes a training checkpoint of scripts/train.py (checkpoint.pt, or the run folder that
holds it), a folder written by `GPTModel.save_pretrained` or downloaded from Hugging Face's `gpt2*`
(config.json + model.safetensors), or a bare .safetensors file. Without it the model has fresh random
weights (of --model), which is only useful to time things.

Prompts: each --prompt is one sequence; --prompt-file holds one prompt per line (blank lines are
skipped; write a newline inside a prompt as a literal "\\n"). Several prompts run as one batch and
are printed whole at the end; a single prompt is streamed as it is generated. Generation stops at
<|endoftext|> unless --ignore-eos. The speed line (new tokens per second, prefill included) goes to
stderr, so stdout holds only the text.

A mistake (a flag, a file, a device this machine lacks) is one line `error: ...` and exit status 2;
Ctrl-C stops with 130, SIGTERM with 143 (model/cli.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import torch  # noqa: E402

from model import PRESETS, GPTConfig, GPTModel  # noqa: E402
from model.cli import Terminated, UsageError, run, terminate_as_exception  # noqa: E402
from model.generate import stream_generate  # noqa: E402
from model.ops import INTERPRETER_NOTICE  # noqa: E402
from model.tokenizer import EOT, EOT_ID, decode, encode  # noqa: E402
from model import weights  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_PROMPT = "Every effort moves you"  # the book's running example


def pick_device(name: str) -> torch.device:
    """--device as a torch.device this machine has; `auto` is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this machine has no CUDA GPU (or this torch is a CPU build); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def load_model(checkpoint: str | None, preset: str) -> GPTModel:
    """A model on the CPU in float32, from any checkpoint kind --checkpoint accepts."""
    if checkpoint is None:
        print(f"warning: no --checkpoint: fresh random weights of the {preset!r} preset (gibberish)", file=sys.stderr)
        return GPTModel(GPTConfig.from_preset(preset))
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
    return weights.load_model(path)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                             f"{e.start}); save it as UTF-8") from None
        lines = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"--prompt-file {path} holds no prompt (every line is blank)")
        prompts += lines
    return prompts or [DEFAULT_PROMPT]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's layout kept as written, and every flag's default shown."""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--checkpoint", help="training checkpoint .pt / run folder, save_pretrained or Hugging Face "
                                        "folder, or .safetensors file; unset: random weights of --model")
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="preset for random weights (no --checkpoint)")
    p.add_argument("--prompt", action="append", help=f"a prompt; repeat for a batch; unset: {DEFAULT_PROMPT!r}")
    p.add_argument("--prompt-file", help="a UTF-8 file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; higher is more random")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens; unset: all")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only from the most likely tokens whose probabilities reach p; unset: all")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible; unset: a fresh draw")
    p.add_argument("--ignore-eos", action="store_true", help=f"keep going past {EOT}")
    p.add_argument("--fused", action="store_true",
                   help="run on the Triton kernels (on a CPU: in Triton's interpreter, slow)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole prefix every step (no KV cache)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each decode step as one CUDA graph (needs CUDA and the KV cache)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: cuda when this machine has a GPU")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the weights' and activations' dtype")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    device = pick_device(args.device)  # before anything slow: a missing GPU is said at once
    prompts = read_prompts(args)
    ids = [encode(p) for p in prompts]
    model = load_model(args.checkpoint, args.model).to(device=device, dtype=DTYPES[args.dtype]).eval()
    try:
        model.use_fused_kernels(args.fused)
    except ImportError as e:
        raise UsageError(f"--fused: the Triton kernels cannot be imported ({e})") from None
    if args.fused and device.type == "cpu":
        print(INTERPRETER_NOTICE, file=sys.stderr)
    vocab = model.cfg.vocab_size
    if max(max(s, default=0) for s in ids) >= vocab:
        raise UsageError(f"the prompt has GPT-2 token ids that the model's vocabulary of {vocab} cannot embed")
    eos_id = None if args.ignore_eos or EOT_ID >= vocab else EOT_ID

    start = time.perf_counter()
    # Checks the settings (and prompt + max_new_tokens against the context) before any token.
    steps = stream_generate(
        model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_id=eos_id, use_cache=not args.no_cache, seed=args.seed, cuda_graph=args.cuda_graph,
    )
    stream = len(prompts) == 1
    new = [[] for _ in prompts]
    shown = ""
    if stream:
        print(prompts[0], end="", flush=True)
    try:
        for step in steps:
            for b, tok in enumerate(step.tolist()):
                if not (new[b] and new[b][-1] == eos_id):  # a finished sequence only pads
                    new[b].append(tok)
            if stream:
                # Decode the whole completion and print what is new: a character may span two
                # tokens, so hold back a trailing half-character (shown as U+FFFD) until it completes.
                text = decode(new[0])
                if not text.endswith("\ufffd") and text != shown:
                    print(text[len(shown):], end="", flush=True)
                    shown = text
    except (KeyboardInterrupt, Terminated):
        if stream:
            print(flush=True)  # end the half-printed line, so that the shell's prompt starts on its own
        raise
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if stream:
        print(decode(new[0])[len(shown):])
    else:
        for p, s in zip(prompts, new):
            print(p + decode(s))
            print()
    n = sum(len(s) for s in new)
    print(f"[{n} new tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s, batch {len(prompts)}, "
          f"{'fused' if args.fused else 'torch'}, {'no cache' if args.no_cache else 'KV cache'}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    terminate_as_exception()
    run(main)
