"""The loop's knobs (`RunConfig`) and their command-line flags, declared once for every training script.

A job's own settings (model, data, labels, prompt format...) live with the job; what is here is what
the loop itself reads: length of the run, batch and optimizer, precision, evaluation cadence, the
output folder and its protocol. `add_run_arguments(parser, **defaults)` declares these flags (a
script passes its own defaults, e.g. the book's lr 5e-5 for fine-tuning) and
`RunConfig.from_args(args)` reads them back.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass
class RunConfig:
    """Every knob of the loop. `None` means "derived" (see `model.engine.plan`)."""

    steps: int | None = None  # a script's default when --epochs is not given either; else one epoch
    epochs: int | None = None
    batch_size: int = 8  # examples per micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # default: lr / 10
    warmup_steps: int | None = None  # default: 10% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 = no clipping (the book's chapter 5 does not clip)
    dtype: str = "float32"
    compile: bool = False
    seed: int = 123
    device: str = "auto"
    eval_every: int = 50  # 0 = only at epoch ends and at the end
    eval_batches: int = 10
    sample_every: int | None = None  # default: eval_every; 0 = only at the end
    out: str | None = None  # the script's default folder
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    progress: bool = True

    def check(self) -> None:
        """Raise ValueError, naming the flag, for any value that cannot work."""
        for name in ("steps", "epochs", "batch_size", "grad_accum", "eval_batches", "stop_after"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{flag(name)} must be positive, got {value}")
        for name in ("eval_every", "sample_every", "warmup_steps", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{flag(name)} must be >= 0, got {value}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr={self.lr}], got {self.min_lr}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; give one")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def flag(name: str) -> str:
    """A config field's command-line spelling: batch_size -> batch-size."""
    return name.replace("_", "-")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default after its help, unless the help already says it or the flag is a switch."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_run_arguments(ap: argparse.ArgumentParser, *, steps_help: str | None = None, out_help: str | None = None,
                      **defaults) -> None:
    """Declare the loop's flags on `ap` (groups "optimization" and "evaluation and output").

    `defaults` overrides RunConfig's defaults by field name (e.g. lr=5e-5, epochs=5, out="runs/spam");
    `steps_help` / `out_help` replace those flags' help where a script derives their defaults itself.
    """
    d = RunConfig(**defaults)
    g = ap.add_argument_group("optimization")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=d.steps,
                        help=steps_help or "optimizer steps (default: one epoch unless --epochs)")
    length.add_argument("--epochs", type=int, default=d.epochs,
                        help="passes over the training split"
                        + (" (default: --steps)" if d.epochs is None else f" (default: {d.epochs})"))
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=d.min_lr,
                   help="final learning rate of the cosine (default: lr / 10)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear warmup steps (default: 10%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay of matmul weights")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype,
                   help="bfloat16 = autocast (fast on a recent GPU, much slower than float32 on a CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the weights, the data order and dropout")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g = ap.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between evaluations and checkpoints (0: epoch ends and the end only)")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches, help="batches per evaluation estimate")
    g.add_argument("--sample-every", type=int, default=d.sample_every,
                   help="steps between text samples (default: --eval-every; 0: the end only)")
    g.add_argument("--out", default=d.out,
                   help=out_help or ("output folder" + (f" (default: {d.out})" if d.out else "")))
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out (the old one is kept until the new one's first checkpoint)")
    g.add_argument("--stop-after", type=int, metavar="STEP", default=d.stop_after,
                   help="end this session after STEP (with a checkpoint), as if interrupted; --resume continues "
                        "(default: run to the end)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
