"""Pretraining the GPT: chapter 5 of the book, with appendix D's schedule, resumable and multi-GPU.

One optimizer step sees one *global batch* of `batch_size x grad_accum x world_size` windows of
`context_length` tokens. It is cut into micro-batches of `batch_size` windows; each process runs
`grad_accum` of them (forward, backward, gradients summed), DistributedDataParallel averages the
gradients over the processes on the last micro-step only, then AdamW steps once:

    loss = (1 / (A * W)) * sum over micro-batches of mean-token cross-entropy

which is the mean cross-entropy over the whole global batch, so `grad_accum 2 x batch 2` and
`batch 4` (or 2 processes x batch 2) train the same model up to float rounding.

Learning rate (appendix D): linear warmup from ~0 to `lr` over `warmup_steps`, then a half cosine
down to `min_lr` at the last step. `warmup_steps 0` and `min_lr == lr` give the book's constant
rate of chapter 5.

Resuming is exact: the data order of epoch e is a permutation drawn from (seed, e) alone, so the
position in the data is just (epoch, batch); a checkpoint stores it with the model, the optimizer,
the step (which fixes the learning rate) and every random-number state (torch CPU and CUDA on every
rank, Python's `random`). Evaluation and sampling run under `torch.random.fork_rng`, so *when* they
run does not change the training stream either.

Layout: `TrainConfig` (every knob, with the CLI flag names) -> `prepare` (all checks, loads data and
any checkpoint, writes nothing) -> `fit` (the loop, writes metrics.jsonl, loss.png, checkpoint.pt).
`main` is the command line of `scripts/train.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from model.data import DEFAULT_CORPUS, GPTDataset, load_text, train_val_split
from model.gpt import PRESETS, GPTConfig, GPTModel
from model.tokenizer import decode, encode

CHECKPOINT, METRICS, PLOT = "checkpoint.pt", "metrics.jsonl", "loss.png"
RUN_FILES = (CHECKPOINT, METRICS, PLOT)
CHECKPOINT_FORMAT = 1
# Settings that fix which windows each step sees: resuming with other values would not continue the run.
RESUME_MUST_MATCH = ("data", "context_length", "stride", "batch_size", "grad_accum", "seed", "val_ratio")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every knob of a run. `None` means "derived": see `prepare` (and the CLI help)."""

    model: str = "tiny"
    data: str = DEFAULT_CORPUS
    steps: int | None = None  # default: DEFAULT_STEPS when --epochs is not given either
    epochs: int | None = None
    batch_size: int = 8
    context_length: int | None = None  # default: the preset's
    stride: int | None = None  # default: context_length (no overlap, as in the book's chapter 5)
    lr: float = 1e-3
    min_lr: float | None = None  # default: lr / 10
    warmup_steps: int | None = None  # default: 10% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 = no clipping (the book's chapter 5 does not clip)
    grad_accum: int = 1
    dtype: str = "float32"
    compile: bool = False
    eval_every: int = 50  # 0 = only at epoch ends and at the end
    eval_batches: int = 10
    sample_every: int | None = None  # default: eval_every; 0 = only at the end
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 30
    val_ratio: float = 0.1
    out: str | None = None  # default: runs/<model>
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    seed: int = 123
    device: str = "auto"
    fused: bool = False
    dropout: float | None = None  # default: the preset's drop_rate
    tie_weights: bool = False
    qkv_bias: bool = False
    init: str = "gpt2"
    progress: bool = True

    def check(self) -> None:
        """Raise ValueError, naming the flag, for any value that cannot work."""
        if self.model not in PRESETS:
            raise ValueError(f"unknown model preset {self.model!r} (--model); choose one of: {', '.join(PRESETS)}")
        for name in ("steps", "epochs", "batch_size", "context_length", "stride", "grad_accum",
                     "eval_batches", "sample_tokens", "stop_after"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{_flag(name)} must be positive, got {value}")
        for name in ("eval_every", "sample_every", "warmup_steps", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {value}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr={self.lr}], got {self.min_lr}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not 0.0 < self.val_ratio < 1.0:
            raise ValueError(f"--val-ratio must be in (0, 1), got {self.val_ratio}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        preset = PRESETS[self.model]
        if self.context_length is not None and self.context_length > preset.context_length:
            raise ValueError(
                f"--context-length {self.context_length} exceeds the {self.model} preset's context length "
                f"{preset.context_length} (its position embeddings have that many rows)"
            )
        if self.fused and (self.dropout if self.dropout is not None else preset.drop_rate) > 0:
            raise ValueError(
                "--fused needs --dropout 0: the fused attention kernel does not implement attention dropout"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; give one")

    def model_config(self) -> GPTConfig:
        overrides = {}
        if self.context_length is not None:
            overrides["context_length"] = self.context_length
        if self.dropout is not None:
            overrides["drop_rate"] = self.dropout
        if self.tie_weights:
            overrides["tie_weights"] = True
        if self.qkv_bias:
            overrides["qkv_bias"] = True
        return GPTConfig.from_preset(self.model, init=self.init, **overrides)


# tiny preset, batch 8 x 128 tokens of the built-in corpus (~1.2 epochs): about 1 s a step on 2 idle CPU
# cores; the loss falls from ln(50257) = 10.8 to ~5 (train) / ~4 (validation).
DEFAULT_STEPS = 150


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# The pieces: schedule, weight-decay groups, data order, one step's gradients, evaluation
# ----------------------------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    Warmup climbs as lr * (step + 1) / (warmup_steps + 1), so the first step already moves (a rate
    of exactly 0 would waste it) and step `warmup_steps` is the first at the full rate. The cosine
    then spans the remaining steps, reaching min_lr at the last one (step total_steps - 1).
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    decay_steps = total_steps - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the matmul weights (every nn.Linear.weight), nothing else.

    Weight decay is a prior that keeps the projections small; it is not wanted on
    - biases and LayerNorm scale/shift: a handful of numbers each, which set offsets and gains, not
      capacity; pulling LayerNorm's scale toward 0 would just fight the normalization;
    - embeddings (token and position): AdamW decays every row at every step, but a token's row only
      gets a gradient when that token is in the batch, so decay would steadily erase rare tokens.
    With --tie-weights the output head *is* the token embedding, so it follows the embedding rule.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matmuls = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if id(p) in matmuls else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled window order of one epoch, a function of (seed, epoch) only (hashed, so that
    nearby seeds and epochs give unrelated orders)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


class BatchOrder:
    """Global batches of `global_batch` window indices, epoch after epoch, dropping the remainder.
    The whole state is (epoch, batch): that is what a checkpoint keeps."""

    def __init__(self, n_windows: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n_windows, global_batch, seed
        self.steps_per_epoch = n_windows // global_batch
        self.epoch, self.batch = 0, 0
        self._order = None  # (epoch, permutation) cache

    def next(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(self.n, self.seed, self.epoch))
        s = self.batch * self.global_batch
        idx = self._order[1][s : s + self.global_batch]  # (global_batch,)
        self.batch += 1
        if self.batch == self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def micro_batches(idx: torch.Tensor, batch_size: int, grad_accum: int, rank: int, world_size: int):
    """This rank's `grad_accum` slices of one global batch: micro-step m of rank r takes slice
    m * world_size + r, so the union over ranks and micro-steps is the global batch, in order."""
    return [idx[(m * world_size + rank) * batch_size : (m * world_size + rank + 1) * batch_size]
            for m in range(grad_accum)]


def windows(ds: GPTDataset, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zip(*(ds[int(i)] for i in idx))
    return torch.stack(x).to(device, non_blocking=True), torch.stack(y).to(device, non_blocking=True)  # (B, T) x2


def forward_backward(model, loss_fn, batches, ddp=None, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over `batches` (a list of (x, y)) into .grad.

    Each micro-batch's loss is divided by their number, so the summed gradients are those of the
    mean. Under DDP the gradient all-reduce runs only in the last backward (`no_sync` on the others):
    one communication per optimizer step instead of one per micro-batch. Returns the mean loss (detached).
    """
    total = 0.0
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast():
                loss = loss_fn(model(x), y)
            (loss / len(batches)).backward()
        total = total + loss.detach().float()
    return total / len(batches)


@torch.no_grad()
def estimate_loss(model: GPTModel, ds: GPTDataset, batch_size: int, max_batches: int, device,
                  autocast=contextlib.nullcontext) -> float:
    """Mean loss over at most `max_batches` batches of windows spread evenly over the whole set (the
    same windows every time, so successive estimates are comparable)."""
    n = min(len(ds), batch_size * max_batches)
    idx = torch.linspace(0, len(ds) - 1, n).round().long()  # (n,)
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in idx.split(batch_size):
        x, y = windows(ds, chunk, device)
        with autocast():
            total += model.loss(model(x), y).float().item() * len(chunk)
    model.train(was_training)
    return total / n


def sample_text(model: GPTModel, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy continuation of `prompt` (deterministic, so samples of successive evals compare)."""
    from model.generate import generate

    ctx = model.cfg.context_length
    ids = encode(prompt)[-(ctx - 1):]  # leave room for at least one new token
    n = min(max_new_tokens, ctx - len(ids))
    out = generate(model, torch.tensor([ids], device=device), n, temperature=0.0)  # (1, len + n)
    return decode(out[0])


# ----------------------------------------------------------------------------------------------
# Checkpoints, metrics, plot: every file is written whole (temp file + rename) or not at all
# ----------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: list[dict]) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def plot_losses(rows: list[dict], path: Path, title: str = "") -> None:
    """loss.png: the per-step training loss, and the evaluated train/val estimates on top."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["train_loss"] for r in rows], lw=0.8, alpha=0.5, label="train (per step)")
    evals = [r for r in rows if "val_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_train_loss"] for r in evals], "o-", label="train (estimate)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "s-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------------
# Preparation: every check, before anything is written
# ----------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Dist":
        """torchrun (or any launcher) sets RANK, LOCAL_RANK and WORLD_SIZE."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Prepared:
    tc: TrainConfig
    cfg: GPTConfig
    dist: Dist
    device: torch.device
    out: Path
    train_ds: GPTDataset
    val_ds: GPTDataset
    total_steps: int
    warmup_steps: int
    min_lr: float
    steps_per_epoch: int
    checkpoint: dict | None = None
    notes: list[str] = field(default_factory=list)


def _resolve_device(name: str, dist: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device: {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dist.world_size > 1:
            device = torch.device("cuda", dist.local_rank)  # one GPU per process
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def prepare(tc: TrainConfig) -> Prepared:
    """Check everything that can be checked before training, load the data and any checkpoint.
    Raises ValueError / FileNotFoundError with a one-line message; writes nothing."""
    tc.check()
    dist = Dist.from_env()
    device = _resolve_device(tc.device, dist)
    cfg = tc.model_config()
    out = Path(tc.out if tc.out is not None else Path("runs") / tc.model)
    notes = []

    # Someone else's run is never touched: refuse unless told to continue it or to replace it.
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if tc.resume and not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out} to resume from")
    if existing and not (tc.resume or tc.overwrite):
        raise ValueError(
            f"output folder {out} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --out"
        )

    if tc.fused:
        try:  # the kernels are separate modules: a missing one should fail here, not mid-run
            from kernels import bias_gelu, cross_entropy, flash_attention, layer_norm  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--fused: the Triton kernels cannot be imported ({e})") from e
        if device.type == "cpu":
            notes.append("note: --fused on CPU runs the Triton kernels in Triton's interpreter: "
                         "slow, meant for checking")

    # Data: the book's split (first part train, the rest validation), windows of context_length + 1.
    T = cfg.context_length
    stride = tc.stride or T
    ids = encode(load_text(tc.data))
    if len(ids) < T + 1:
        raise ValueError(
            f"corpus {tc.data} has {len(ids)} tokens, shorter than one context window "
            f"({T} + 1 tokens); use more text or a smaller --context-length"
        )
    train_ids, val_ids = train_val_split(ids, 1.0 - tc.val_ratio)
    for name, part in (("training", train_ids), ("validation", val_ids)):
        if len(part) < T + 1:
            raise ValueError(
                f"the {name} split of {tc.data} has {len(part)} tokens, shorter than one context window "
                f"({T} + 1 tokens); use more text, a smaller --context-length or another --val-ratio"
            )
    train_ds, val_ds = GPTDataset(train_ids, T, stride), GPTDataset(val_ids, T, stride)

    global_batch = tc.batch_size * tc.grad_accum * dist.world_size
    steps_per_epoch = len(train_ds) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training split holds {len(train_ds)} windows, fewer than one global batch of {global_batch} "
            f"(--batch-size x --grad-accum x processes); lower them, or --stride for more windows"
        )
    if tc.epochs is not None:
        total_steps = tc.epochs * steps_per_epoch
    else:
        total_steps = tc.steps if tc.steps is not None else DEFAULT_STEPS
    warmup = tc.warmup_steps if tc.warmup_steps is not None else total_steps // 10
    if warmup > total_steps:
        raise ValueError(f"--warmup-steps {warmup} is more than the run's {total_steps} steps")
    min_lr = tc.min_lr if tc.min_lr is not None else tc.lr / 10

    checkpoint = None
    if tc.resume:
        checkpoint = load_checkpoint(out / CHECKPOINT)
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{out / CHECKPOINT} is not a checkpoint of this trainer")
        if checkpoint["model_config"] != cfg.to_dict():
            diff = {k: (v, cfg.to_dict().get(k)) for k, v in checkpoint["model_config"].items()
                    if cfg.to_dict().get(k) != v}
            raise ValueError(
                f"{out / CHECKPOINT} is from another model config (--model {checkpoint['train_config']['model']}); "
                "this run asks for --model " + tc.model + ": "
                + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
            )
        saved = checkpoint["train_config"]
        diff = [f"--{_flag(k)} {saved.get(k)} vs {getattr(tc, k)}" for k in RESUME_MUST_MATCH
                if saved.get(k) != getattr(tc, k)]
        if checkpoint["world_size"] != dist.world_size:
            diff.append(f"{checkpoint['world_size']} vs {dist.world_size} processes")
        if diff:
            raise ValueError(
                f"cannot resume {out / CHECKPOINT}: the data order depends on settings that differ "
                f"(checkpoint vs now): {', '.join(diff)}"
            )
        if checkpoint["step"] >= total_steps:
            notes.append(f"note: the checkpoint is already at step {checkpoint['step']} of {total_steps}; "
                         "nothing to train")

    return Prepared(tc, cfg, dist, device, out, train_ds, val_ds, total_steps, warmup, min_lr,
                    steps_per_epoch, checkpoint, notes)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def fit(p: Prepared) -> dict:
    """Train as prepared. Returns {"model": the trained GPTModel, "rows": this run's metric rows,
    "step": the last step}."""
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm.auto import tqdm

    tc, cfg, dist, device = p.tc, p.cfg, p.dist, p.device
    ddp_on = dist.world_size > 1
    if ddp_on:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _fit(p, ddp_on, torch_dist, DDP, tqdm)
    finally:
        if ddp_on:
            torch_dist.destroy_process_group()


def _fit(p: Prepared, ddp_on: bool, torch_dist, DDP, tqdm) -> dict:
    tc, cfg, dist, device = p.tc, p.cfg, p.dist, p.device
    say = (lambda msg: tqdm.write(msg)) if dist.main else (lambda msg: None)
    for note in p.notes:
        say(note)

    # Same seed on every rank for the initial weights (DDP would broadcast rank 0's anyway).
    torch.manual_seed(tc.seed)
    model = GPTModel(cfg, fused=tc.fused).to(device)
    # fused=True: one kernel over all parameters instead of a loop of small ops (10x faster on CPU).
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, fused=True)
    order = BatchOrder(len(p.train_ds), tc.batch_size * tc.grad_accum * dist.world_size, tc.seed)
    start = 0
    if p.checkpoint is not None:
        model.load_state_dict(p.checkpoint["model"])
        optimizer.load_state_dict(p.checkpoint["optimizer"])
        order.load_state_dict(p.checkpoint["data"])
        start = int(p.checkpoint["step"])
        _set_rng_state(p.checkpoint["rng"][dist.rank])
    else:
        # Dropout masks must differ between ranks (they see different data but share the seed).
        torch.manual_seed(tc.seed + dist.rank)
        random.seed(tc.seed + dist.rank)

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp_on else None
    forward = ddp if ddp is not None else model
    if tc.compile:
        forward = torch.compile(forward)
    amp = torch.bfloat16 if tc.dtype == "bfloat16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext

    out = p.out
    rows = []
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if tc.overwrite:
            for f in RUN_FILES:
                (out / f).unlink(missing_ok=True)
        # Keep the rows up to the checkpoint: a run killed after it may have logged steps beyond it.
        history = [r for r in read_metrics(out / METRICS) if r["step"] <= start] if p.checkpoint else []
        write_metrics(out / METRICS, history)
        say(
            f"{tc.model}: {model.num_params() / 1e6:.1f}M parameters, context {cfg.context_length}, "
            f"{'fused Triton kernels' if tc.fused else 'PyTorch ops'}, {tc.dtype} on {device}"
            + (f" x {dist.world_size} processes" if ddp_on else "")
        )
        say(
            f"data {tc.data}: {len(p.train_ds)} training / {len(p.val_ds)} validation windows; "
            f"{p.steps_per_epoch} steps per epoch of {order.global_batch} windows "
            f"({order.global_batch * cfg.context_length} tokens); {p.total_steps} steps"
            + (f", resuming after step {start}" if p.checkpoint else "")
        )

    tokens_per_step = order.global_batch * cfg.context_length
    sample_every = tc.sample_every if tc.sample_every is not None else tc.eval_every
    stop = min(p.total_steps, tc.stop_after or p.total_steps)
    fork_devices = [device] if device.type == "cuda" else []

    def evaluate() -> tuple[float, float]:
        with torch.random.fork_rng(devices=fork_devices):  # no draw here may shift the training stream
            return (estimate_loss(model, p.train_ds, tc.batch_size, tc.eval_batches, device, autocast),
                    estimate_loss(model, p.val_ds, tc.batch_size, tc.eval_batches, device, autocast))

    def checkpoint(step: int) -> None:
        rng = [_rng_state()]
        if ddp_on:  # every rank's own stream (dropout masks differ per rank)
            rng = [None] * dist.world_size
            torch_dist.all_gather_object(rng, _rng_state())
        if dist.main:
            save_checkpoint(out / CHECKPOINT, {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "data": order.state_dict(),
                "rng": rng,
                "schedule": {"step": step, "total_steps": p.total_steps, "warmup_steps": p.warmup_steps,
                             "lr": tc.lr, "min_lr": p.min_lr},
                "model_config": cfg.to_dict(),
                "train_config": asdict(tc),
                "world_size": dist.world_size,
            })

    bar = tqdm(total=stop, initial=start, disable=not (dist.main and tc.progress), dynamic_ncols=True,
               desc="train", unit="step")
    model.train()
    step = start
    while step < stop:
        lr = lr_at(step, lr=tc.lr, min_lr=p.min_lr, warmup_steps=p.warmup_steps, total_steps=p.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        idx = order.next()
        batches = [windows(p.train_ds, mb, device)
                   for mb in micro_batches(idx, tc.batch_size, tc.grad_accum, dist.rank, dist.world_size)]
        loss = forward_backward(forward, model.loss, batches, ddp, autocast)
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ddp_on:  # log the global batch's loss, not this rank's share (gloo has no AVG: sum, divide)
            torch_dist.all_reduce(loss, op=torch_dist.ReduceOp.SUM)
            loss /= dist.world_size
        train_loss = loss.item()  # waits for the device, so the time below is the step's
        step += 1
        tok_s = tokens_per_step / (time.perf_counter() - t0)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"the training loss is {train_loss} at step {step}; try a lower --lr")

        row = {"step": step, "epoch": round(step / p.steps_per_epoch, 4), "train_loss": train_loss,
               "lr": lr, "tokens_per_sec": round(tok_s, 1)}
        epoch_end = order.batch == 0
        last = step == stop
        periodic = tc.eval_every > 0 and step % tc.eval_every == 0
        if dist.main:
            if periodic or epoch_end or last:
                row["eval_train_loss"], row["val_loss"] = evaluate()
                where = f"epoch {order.epoch}{f'/{tc.epochs}' if tc.epochs else ''}, " if epoch_end else ""
                say(f"{where}step {step}: train loss {row['eval_train_loss']:.3f}, "
                    f"val loss {row['val_loss']:.3f}, lr {lr:.2e}")
            if (sample_every > 0 and step % sample_every == 0) or last:
                with torch.random.fork_rng(devices=fork_devices):
                    row["sample"] = sample_text(model, tc.sample_prompt, tc.sample_tokens, device)
                say(f"sample (step {step}): {row['sample']!r}")
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            bar.set_postfix_str(f"loss {train_loss:.3f}, {tok_s:,.0f} tok/s, lr {lr:.2e}", refresh=False)
            bar.update(1)
        if periodic or last:
            checkpoint(step)
            if dist.main:
                plot_losses(read_metrics(out / METRICS), out / PLOT, f"{tc.model} on {Path(tc.data).name}")
    bar.close()
    if dist.main and step > start:
        state = "stopped" if step < p.total_steps else "done"
        say(f"{state} at step {step}/{p.total_steps}: train loss {rows[-1]['eval_train_loss']:.3f}, "
            f"val loss {rows[-1]['val_loss']:.3f}; wrote {out / METRICS}, {out / PLOT}, {out / CHECKPOINT}")
    if ddp_on:
        torch_dist.barrier()  # rank 0 may still be writing
    return {"model": model, "rows": rows, "step": step}


def train(tc: TrainConfig) -> dict:
    return fit(prepare(tc))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it, or the flag is an on/off switch."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default is None:
            return text
        return super()._get_help_string(action)

def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    ap = argparse.ArgumentParser(
        prog="train.py",
        description="Pretrain the GPT (the book's chapter 5, appendix D's schedule). Runs under torchrun for DDP.",
        formatter_class=_HelpFormatter,
    )
    g = ap.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"preset: {', '.join(PRESETS)}")
    g.add_argument("--context-length", type=int, help="at most the preset's (default: the preset's)")
    g.add_argument("--dropout", type=float, help="drop_rate (default: the preset's)")
    g.add_argument("--tie-weights", action="store_true", help="share the token embedding with the output head")
    g.add_argument("--qkv-bias", action="store_true", help="biases in the q/k/v projection")
    g.add_argument("--init", choices=("gpt2", "book"), default=d.init,
                   help="weight init: gpt2 (N(0, 0.02), the default) or book (PyTorch's init, as in the book's code)")
    g.add_argument("--fused", action="store_true", help="run on the Triton kernels (needs --dropout 0)")
    g = ap.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="a text file, a folder of .txt files, or builtin:pydoc")
    g.add_argument("--stride", type=int, help="tokens between window starts (default: context length)")
    g.add_argument("--val-ratio", type=float, default=d.val_ratio, help="the last part held out for validation")
    g = ap.add_argument_group("optimization")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help=f"optimizer steps (default: {DEFAULT_STEPS} unless --epochs)")
    length.add_argument("--epochs", type=int, help="passes over the training split")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default: lr / 10)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 10%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay of matmul weights")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype, help="bfloat16 = autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g = ap.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between loss estimates and checkpoints (0: epoch ends and the end only)")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches, help="batches per loss estimate")
    g.add_argument("--sample-every", type=int, help="steps between text samples (default: --eval-every)")
    g.add_argument("--sample-prompt", default=d.sample_prompt)
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens)
    g.add_argument("--out", help="output folder (default: runs/<model>)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument("--stop-after", type=int, metavar="STEP",
                   help="end this session after STEP (with a checkpoint), as if interrupted; --resume continues")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    try:
        prepared = prepare(tc)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    fit(prepared)
    return 0
