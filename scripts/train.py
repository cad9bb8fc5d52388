"""Pretrain the GPT: `python scripts/train.py --help`. The job is model/pretrain.py, the loop model/engine/.

    python scripts/train.py                                    # tiny model, built-in corpus, CPU, minutes
    python scripts/train.py --fused                            # the same on the Triton kernels
    torchrun --nproc_per_node 2 scripts/train.py --device cpu  # DistributedDataParallel (gloo on CPU)
    # the book's chapter 5 (constant lr 4e-4 on the-verdict.txt, 10 epochs, train loss < 1):
    python scripts/train.py --model gpt2-124M --data ../shared/data/the-verdict.txt --context-length 256 \\
        --batch-size 2 --epochs 10 --lr 4e-4 --weight-decay 0.1 --dropout 0.1 --stride 256 \\
        --warmup-steps 0 --min-lr 4e-4 --grad-clip 0 --out runs/chapter5

Exit status: 0 done, 2 a mistake the message explains (nothing written), 130 / 143 after Ctrl-C /
SIGTERM (with a checkpoint at the step it stopped: add --resume to continue exactly).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from model.cli import run, terminate_as_exception  # noqa: E402
from model.engine import HelpFormatter, RunConfig, add_run_arguments, fit  # noqa: E402
from model.gpt import PRESETS  # noqa: E402
from model.pretrain import DEFAULT_STEPS, PretrainConfig, build_model, plan  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    ap = argparse.ArgumentParser(
        prog="train.py",
        description="Pretrain the GPT (the book's chapter 5, appendix D's schedule). Runs under torchrun for DDP.",
        formatter_class=HelpFormatter,
    )
    g = ap.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"preset: {', '.join(PRESETS)}")
    g.add_argument("--context-length", type=int, help="at most the preset's (default: the preset's)")
    g.add_argument("--dropout", type=float, help="drop_rate (default: the preset's)")
    g.add_argument("--tie-weights", action="store_true", help="share the token embedding with the output head")
    g.add_argument("--qkv-bias", action="store_true", help="biases in the q/k/v projection")
    g.add_argument("--init", choices=("gpt2", "book"), default=d.init,
                   help="weight init: gpt2 (N(0, 0.02)) or book (PyTorch's init, as in the book's code)")
    g.add_argument("--fused", action="store_true", help="run on the Triton kernels (interpreted, slowly, on a CPU)")
    g = ap.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="a text file, a folder of .txt files, or builtin:pydoc")
    g.add_argument("--stride", type=int, help="tokens between window starts (default: context length)")
    g.add_argument("--val-ratio", type=float, default=d.val_ratio,
                   help="share held out for validation: whole documents spread through a corpus of several, "
                        "the last part of a single file")
    g = ap.add_argument_group("samples")
    g.add_argument("--sample-prompt", default=d.sample_prompt, help="the text the samples continue")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens, help="new tokens per sample")
    g.add_argument("--sample-temperature", type=float, default=d.sample_temperature,
                   help="sampling temperature (0: greedy), with a fixed seed (--seed)")
    g.add_argument("--sample-top-k", type=int, default=d.sample_top_k, help="sample among the k likeliest tokens")
    add_run_arguments(ap, steps_help=f"optimizer steps (default: {DEFAULT_STEPS} unless --epochs)",
                      out_help="output folder (default: runs/<model>, runs/<model>-fused with --fused)")
    return ap


def configs(argv: list[str] | None = None) -> tuple[PretrainConfig, RunConfig]:
    args = build_parser().parse_args(argv)
    pc = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig) if hasattr(args, f.name)})
    rc = RunConfig.from_args(args)
    if rc.steps is None and rc.epochs is None:
        rc.steps = DEFAULT_STEPS
    return pc, rc


def main(argv: list[str] | None = None) -> int:
    terminate_as_exception()
    pc, rc = configs(argv)
    job, p = plan(pc, rc)  # every check; writes nothing
    fit(p, job, build_model(pc, rc.seed))
    return 0


if __name__ == "__main__":
    run(main)
