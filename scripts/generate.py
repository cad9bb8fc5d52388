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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import torch  # noqa: E402

from model import PRESETS, GPTConfig, GPTModel  # noqa: E402
from model.generate import stream_generate  # noqa: E402
from model.tokenizer import EOT, decode, encode, get_tokenizer  # noqa: E402
from model.weights import CONFIG_NAME, WEIGHTS_NAME, load_pretrained  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(checkpoint: str | None, preset: str) -> GPTModel:
    """A model on the CPU in float32, from any checkpoint kind --checkpoint accepts."""
    if checkpoint is None:
        print(f"warning: no --checkpoint: fresh random weights of the {preset!r} preset (gibberish)", file=sys.stderr)
        return GPTModel(GPTConfig.from_preset(preset))
    path = Path(checkpoint)
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"  # a training run's folder
    if path.is_dir() or path.suffix == ".safetensors":
        return load_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    config = ckpt.get("model_config", ckpt.get("config")) if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is not a training checkpoint: expected a dict with 'model' and 'model_config' "
                         f"(or a folder with {CONFIG_NAME} + {WEIGHTS_NAME}, or a .safetensors file)")
    model = GPTModel(GPTConfig(**config))
    # torch.compile / DistributedDataParallel wrappers prefix the names; the weights are the same.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        prompts = ["Every effort moves you"]  # the book's running example
    return prompts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--checkpoint", help="training checkpoint .pt / run folder, save_pretrained or HF folder, or .safetensors")
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="preset for random weights (no --checkpoint)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--ignore-eos", action="store_true", help=f"keep going past {EOT}")
    p.add_argument("--fused", action="store_true", help="run on the Triton kernels")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole prefix every step (no KV cache)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each decode step as one CUDA graph (needs CUDA and the KV cache)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = load_model(args.checkpoint, args.model)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval().use_fused_kernels(args.fused)
    try:
        prompts = read_prompts(args)
        ids = [encode(p) for p in prompts]
    except (OSError, RuntimeError) as e:  # an unreadable --prompt-file, or no tiktoken vocabulary offline
        print(f"error: {e}", file=sys.stderr)
        return 2
    vocab = model.cfg.vocab_size
    if max(max(s, default=0) for s in ids) >= vocab:
        print(f"error: the prompt has GPT-2 token ids the model's vocabulary of {vocab} cannot embed", file=sys.stderr)
        return 2
    eos = get_tokenizer().eot_token
    eos_id = None if args.ignore_eos or eos >= vocab else eos

    start = time.perf_counter()
    try:
        steps = stream_generate(
            model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            eos_id=eos_id, use_cache=not args.no_cache, seed=args.seed, cuda_graph=args.cuda_graph,
        )
    except ValueError as e:  # bad settings, or prompt + max_new_tokens past the context length
        print(f"error: {e}", file=sys.stderr)
        return 2
    stream = len(prompts) == 1
    new = [[] for _ in prompts]
    shown = ""
    if stream:
        print(prompts[0], end="", flush=True)
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
    if args.device.startswith("cuda"):
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
    sys.exit(main())
