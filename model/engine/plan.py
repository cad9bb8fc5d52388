"""Everything checked before a run writes anything: device, processes, output folder, run length,
any checkpoint to resume, and whether the run can fit this machine at all.

`prepare(run_config, job, ...)` returns a `Plan` or raises ValueError / FileNotFoundError with one
line that says what to do (model/cli.py prints it and exits 2). It reads the checkpoint but writes
nothing, so a refused run leaves the folder exactly as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.engine.config import RunConfig, flag
from model.engine.run_files import CHECKPOINT, CHECKPOINT_FORMAT, METRICS, PLOT, load_checkpoint
from model.ops import INTERPRETER_NOTICE

# bfloat16 autocast on a CPU without bf16 instructions (no AVX512_BF16 / AMX: its bf16 matmuls are
# emulated): one training step of the tiny preset (batch 8 x 128 tokens, forward + backward + AdamW)
# took 190-220 s against 11.4-11.9 s in float32 on this project's 2-core AMD EPYC (AVX2), interleaved.
CPU_BF16_SLOWDOWN = 17
# fp32 weights (4 bytes) for every parameter; a gradient and AdamW's two moments (12 bytes) for each
# trainable one. Activations come on top.
BYTES_PER_PARAM, BYTES_PER_TRAINABLE = 4, 12


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
class Plan:
    """A checked run: what `fit` needs besides the job and the model."""

    rc: RunConfig
    dist: Dist
    device: torch.device
    out: Path
    total_steps: int
    warmup_steps: int
    min_lr: float
    steps_per_epoch: int
    global_batch: int
    mode: str  # "fresh" (nothing to keep in out), "resume", "replace" (--overwrite of a run)
    checkpoint: dict | None = None
    model_config: dict | None = None
    notes: list[str] = field(default_factory=list)


def resolve_device(name: str, dist: Dist) -> torch.device:
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
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (Linux's flags; False where unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what) of the memory a run on `device` lives in."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def training_memory(n_params: int, n_trainable: int) -> int:
    """Lower bound of a training run's memory: weights + gradients + AdamW states (no activations)."""
    return BYTES_PER_PARAM * n_params + BYTES_PER_TRAINABLE * n_trainable


def check_memory(n_params: int, n_trainable: int, device: torch.device, what: str = "the model") -> str | None:
    """Refuse a run whose weights, gradients and optimizer states alone exceed the machine's memory;
    a note when they take more than half of it. Returns the note, or None."""
    need = training_memory(n_params, n_trainable)
    have, where = machine_memory(device)
    figure = (f"{what} needs at least {need / 1e9:.1f} GB for weights, gradients and AdamW states "
              f"({n_params / 1e6:,.0f}M parameters x {BYTES_PER_PARAM} bytes + {n_trainable / 1e6:,.0f}M trainable x "
              f"{BYTES_PER_TRAINABLE} bytes), before activations; {where} is {have / 1e9:.1f} GB")
    if need > have:
        raise ValueError(f"{figure}: it cannot train here (choose a smaller --model or a machine with more memory)")
    if need > have / 2:
        return f"note: {figure}; activations may not fit (lower --batch-size, or raise --grad-accum)"
    return None


def prepare(rc: RunConfig, job, *, model_config: dict | None = None, n_params: int | None = None,
            n_trainable: int | None = None, model_name: str = "the model",
            default_out: str | Path | None = None, fused: bool = False) -> Plan:
    """Check the run before anything is written. `model_config` (a dict) is compared with a resumed
    checkpoint's; `n_params` / `n_trainable` feed the memory check (a model built on the meta device
    counts them for free), whose message names `model_name`; `fused` runs on a CPU get the
    interpreter notice."""
    rc.check()
    dist = Dist.from_env()
    device = resolve_device(rc.device, dist)
    out = Path(rc.out if rc.out is not None else (default_out or Path("runs") / job.name))
    notes = []

    # The folder: a checkpoint is a run, never touched unless told to continue it or to replace it.
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    has_run = (out / CHECKPOINT).is_file()
    leftovers = [f for f in (METRICS, PLOT) if (out / f).exists()]
    if rc.resume and not has_run:
        if not leftovers:
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out} to resume from")
        notes.append(f"note: nothing to resume in {out}: {', '.join(leftovers)} but no {CHECKPOINT} (the run "
                     "stopped before its first checkpoint); starting from step 0")
    elif has_run and not (rc.resume or rc.overwrite):
        raise ValueError(
            f"output folder {out} already holds a run ({CHECKPOINT}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --out"
        )
    elif leftovers and not has_run:
        notes.append(f"note: replacing {', '.join(leftovers)} in {out}, left by a run that stopped before its "
                     "first checkpoint")
    mode = "resume" if rc.resume and has_run else "replace" if rc.overwrite and has_run else "fresh"

    # The run's length.
    global_batch = rc.batch_size * rc.grad_accum * dist.world_size
    n_train = job.n_train()
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training split holds {n_train} examples, fewer than one global batch of {global_batch} "
            "(--batch-size x --grad-accum x processes); lower them, or give more data"
        )
    if rc.epochs is not None:
        total_steps = rc.epochs * steps_per_epoch
    else:
        total_steps = rc.steps if rc.steps is not None else steps_per_epoch
    warmup = rc.warmup_steps if rc.warmup_steps is not None else total_steps // 10
    if warmup > total_steps:
        raise ValueError(f"--warmup-steps {warmup} is more than the run's {total_steps} steps")
    min_lr = rc.min_lr if rc.min_lr is not None else rc.lr / 10

    # Slow or impossible on this machine: say so with the figure.
    if rc.dtype == "bfloat16" and device.type == "cpu" and not cpu_has_bf16():
        notes.append(f"note: --dtype bfloat16 on a CPU without bf16 instructions is about {CPU_BF16_SLOWDOWN}x slower "
                     "than float32 (measured: a tiny-preset training step, 200 s vs 11.5 s on 2 cores); "
                     "bfloat16 pays off on a GPU, use float32 here")
    if n_params is not None:
        note = check_memory(n_params, n_params if n_trainable is None else n_trainable, device, model_name)
        if note:
            notes.append(note)

    checkpoint = None
    if mode == "resume":
        checkpoint = load_checkpoint(out / CHECKPOINT)
        _check_resumable(checkpoint, out / CHECKPOINT, rc, job, dist, model_config)
        if checkpoint["step"] >= total_steps:
            notes.append(f"note: the checkpoint is already at step {checkpoint['step']} of {total_steps}; "
                         "nothing to train")

    if fused and device.type == "cpu":
        notes.append(INTERPRETER_NOTICE)

    return Plan(rc, dist, device, out, total_steps, warmup, min_lr, steps_per_epoch, global_batch, mode,
                checkpoint, model_config, notes)


# Loop settings that fix which examples each step sees: resuming with other values would not continue the run.
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed")


def resume_key(rc: RunConfig, job) -> dict:
    return {**{k: getattr(rc, k) for k in RESUME_MUST_MATCH}, **job.resume_key()}


def _check_resumable(checkpoint, path: Path, rc: RunConfig, job, dist: Dist, model_config: dict | None) -> None:
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this trainer")
    if checkpoint.get("job", job.name) != job.name:
        raise ValueError(f"{path} is a {checkpoint['job']} run; this is a {job.name} run")
    saved_cfg = checkpoint.get("model_config")
    if model_config is not None and saved_cfg != model_config:
        diff = ", ".join(f"{k} {v} vs {model_config.get(k)}" for k, v in saved_cfg.items() if model_config.get(k) != v)
        raise ValueError(f"{path} is from another model config (checkpoint vs now): {diff}")
    saved = checkpoint.get("resume_key", {})
    now = resume_key(rc, job)
    diff = [f"--{flag(k)} {saved.get(k)} vs {v}" for k, v in now.items() if saved.get(k) != v]
    if checkpoint["world_size"] != dist.world_size:
        diff.append(f"{checkpoint['world_size']} vs {dist.world_size} processes")
    if diff:
        raise ValueError(
            f"cannot resume {path}: the data order depends on settings that differ "
            f"(checkpoint vs now): {', '.join(diff)}"
        )
