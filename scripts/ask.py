"""Ask an instruction-tuned model (scripts/finetune_instruct.py) one instruction, in the book's prompt.

    python scripts/ask.py --checkpoint runs/instruct --instruction "Convert 45 kilometers to meters."
    python scripts/ask.py --checkpoint runs/instruct --instruction "Rewrite in passive voice." --input "The cat ate it."

Prints the response alone (greedy, KV cache, up to --max-new-tokens, stopping at <|endoftext|>).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from model.cli import run  # noqa: E402
from model.instruct import MAX_NEW_TOKENS, generate_responses  # noqa: E402
from model.weights import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ask.py", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the --out folder of scripts/finetune_instruct.py (or any model)")
    ap.add_argument("--instruction", required=True)
    ap.add_argument("--input", default="", help="the entry's input, if the task has one")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    ap.add_argument("--fused", action="store_true", help="run on the Triton kernels")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model = load_model(args.checkpoint, fused=args.fused)
    entry = {"instruction": args.instruction, "input": args.input}
    print(generate_responses(model, [entry], max_new_tokens=args.max_new_tokens)[0])
    return 0


if __name__ == "__main__":
    run(main)
