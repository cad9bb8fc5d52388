"""Classify texts with a classifier fine-tuned by scripts/finetune_classifier.py.

    python scripts/classify.py --checkpoint runs/spam --text "You are a winner! Claim your prize now"
    python scripts/classify.py --checkpoint runs/spam --file messages.txt     # one text per line

Prints one line per text: the predicted label, its probability, and the text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from model.classifier import load_classifier, predict  # noqa: E402
from model.cli import UsageError, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="classify.py", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the --out folder of scripts/finetune_classifier.py")
    ap.add_argument("--text", action="append", help="a text to classify (repeat for several)")
    ap.add_argument("--file", help="a file of texts, one per line (blank lines skipped)")
    ap.add_argument("--fused", action="store_true", help="run on the Triton kernels")
    args = ap.parse_args(argv)
    texts = list(args.text or [])
    if args.file:
        texts += [line for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UsageError("nothing to classify: give --text or --file")
    model, meta = load_classifier(args.checkpoint, fused=args.fused)
    for text, (label, prob) in zip(texts, predict(model, meta, texts)):
        print(f"{label}\t{prob:.3f}\t{text}")
    return 0


if __name__ == "__main__":
    run(main)
