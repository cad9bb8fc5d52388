"""Fine-tune the GPT as a text classifier (the book's chapter 6): `python scripts/finetune_classifier.py --help`.

    # spam / ham on the UCI SMS Spam Collection, from a model pretrained by scripts/train.py:
    python scripts/finetune_classifier.py --data ../shared/data/SMSSpamCollection --init-from runs/tiny --out runs/spam
    python scripts/finetune_classifier.py ... --book               # the book's recipe exactly
    python scripts/finetune_classifier.py ... --lora-rank 16       # appendix E: LoRA adapters only
    python scripts/classify.py --checkpoint runs/spam --text "You won a prize! Call now"

Data: `label<TAB>text` lines, or a .csv whose header names --label-column and --text-column. The
classes are balanced by undersampling (--no-balance keeps them all), split 70/10/20 with --seed, and
padded with <|endoftext|> to the longest training text (or --max-length).

Writes to --out: metrics.json (train/val/test accuracy and loss, confusion matrices, trainable
parameters, seconds), accuracy.png (accuracy and loss), the classifier (classifier.json +
classifier.safetensors, and adapters.safetensors with LoRA), and the engine's metrics.jsonl,
loss.png and checkpoint.pt (--resume continues exactly).

--book: the book's recipe: pooling at the last position, --trainable last-block, AdamW lr 5e-5,
weight decay 0.1, 5 epochs of batch 8, a constant rate (no warmup, no decay), no gradient clipping.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from model.classifier import (POOLINGS, TRAINABLE, ClassifierJob, evaluate_split, plot_classifier,  # noqa: E402
                              save_classifier, set_trainable, to_classifier)
from model.cli import run, terminate_as_exception  # noqa: E402
from model.engine import HelpFormatter, RunConfig, add_run_arguments, fit  # noqa: E402
from model.finetune import add_model_arguments, check_model_arguments, load_base, plan_finetune  # noqa: E402
from model.finetune_data import prepare_classification  # noqa: E402

METRICS_JSON, ACCURACY_PLOT = "metrics.json", "accuracy.png"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="finetune_classifier.py", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    add_model_arguments(ap, lora_help=" (then --trainable defaults to lora: the adapters alone)")
    g = ap.add_argument_group("classifier")
    g.add_argument("--data", required=True, help="label<TAB>text file, or .csv with a header")
    g.add_argument("--label-column", default="label", help="CSV column of the labels")
    g.add_argument("--text-column", default="text", help="CSV column of the texts")
    g.add_argument("--no-balance", dest="balance", action="store_false",
                   help="keep every example (default: undersample every class to the smallest, as the book)")
    g.add_argument("--max-length", type=int, help="cut texts at this many tokens (default: the longest training text)")
    g.add_argument("--pooling", choices=POOLINGS, default="last-real",
                   help="where the class scores are read: the last real token, or the last position (the book)")
    g.add_argument("--trainable", choices=TRAINABLE,
                   help="what learns (default: last-block, the book's; lora with --lora-rank)")
    g.add_argument("--book", action="store_true", help="the book's recipe (see above); overrides those flags")
    add_run_arguments(ap, lr=5e-5, batch_size=8, eval_every=50, eval_batches=5, out="runs/classifier",
                      steps_help="optimizer steps (default: 5 epochs, the book's)")
    return ap


def main(argv: list[str] | None = None) -> int:
    terminate_as_exception()
    t0 = time.perf_counter()
    args = build_parser().parse_args(argv)
    check_model_arguments(args)
    if args.book:
        args.pooling, args.trainable = "last", args.trainable or "last-block"
        args.lr, args.weight_decay, args.batch_size = 5e-5, 0.1, 8
        args.warmup_steps, args.min_lr, args.grad_clip = 0, 5e-5, 0.0
    trainable = args.trainable or ("lora" if args.lora_rank else "last-block")
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max-length must be positive, got {args.max_length}")
    if args.steps is None and args.epochs is None:
        args.epochs = 5  # the book's
    rc = RunConfig.from_args(args)
    rc.check()

    model, note = load_base(args.init_from, args.model, dropout=args.dropout, fused=args.fused, seed=rc.seed)
    train, val, test = prepare_classification(
        args.data, seed=rc.seed, balanced=args.balance, max_length=args.max_length,
        context_length=model.cfg.context_length, label_column=args.label_column, text_column=args.text_column)
    settings = {"data": args.data, "balance": args.balance, "max_length": args.max_length,
                "label_column": args.label_column, "text_column": args.text_column, "init_from": args.init_from,
                "trainable": trainable, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "book": args.book}
    job = ClassifierJob(train, val, test, pooling=args.pooling, batch_size=rc.batch_size,
                        eval_batches=rc.eval_batches, source=args.data, settings=settings)
    to_classifier(model, len(train.labels))
    set_trainable(model, trainable, args.lora_rank, args.lora_alpha)
    plan, n_trainable = plan_finetune(rc, job, model, note=note, default_out="runs/classifier",
                                      trainable=trainable + (f", LoRA rank {args.lora_rank}" if args.lora_rank else ""))

    result = fit(plan, job, model)
    model, out = result["model"], plan.out
    if not plan.dist.main:
        return 0
    model.eval()
    final = {name: evaluate_split(model, data, args.pooling, rc.batch_size, plan.device)
             for name, data in (("train", train), ("val", val), ("test", test))}
    metrics = {
        **{f"{k}_accuracy": v["accuracy"] for k, v in final.items()},
        **{f"{k}_loss": v["loss"] for k, v in final.items()},
        "labels": train.labels,
        "confusion": {k: v["confusion"] for k, v in final.items()},
        "confusion_layout": "confusion[split][true][predicted]",
        "n_examples": {"train": len(train), "val": len(val), "test": len(test)},
        "trainable": trainable, "trainable_parameters": n_trainable, "pooling": args.pooling,
        "steps": result["step"], "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / METRICS_JSON).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    save_classifier(model, out, labels=train.labels, pooling=args.pooling, max_length=train.max_length,
                    extra={"trainable": trainable})
    plot_classifier(result["rows"], out / ACCURACY_PLOT, f"classifier on {Path(args.data).name}")
    print(f"accuracy: train {metrics['train_accuracy']:.2%}, validation {metrics['val_accuracy']:.2%}, "
          f"test {metrics['test_accuracy']:.2%} ({metrics['seconds']:.0f} s in all)")
    print(f"wrote {out / METRICS_JSON}, {out / ACCURACY_PLOT} and the classifier in {out} "
          f"(python scripts/classify.py --checkpoint {out} --text ...)")
    return 0


if __name__ == "__main__":
    run(main)
