"""A run's files in its output folder, and the random-number state a checkpoint carries.

    checkpoint.pt   model, optimizer, data position, step, RNG states, configs (`torch.save`, read back
                    with weights_only=True: a checkpoint is data, never code to run)
    metrics.jsonl   one JSON row per optimizer step (evaluations and samples on the rows they happen)
    loss.png        the curves of metrics.jsonl

Every file is written whole (a temp file, then a rename) or not at all, so a run killed at any
moment leaves the previous version of each file readable. Which files make "a run" (and so block
another one in the same folder) is the checkpoint alone: metrics without a checkpoint are the
leftovers of a run that died before its first checkpoint, and hold nothing to resume.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from pathlib import Path

import torch

CHECKPOINT, METRICS, PLOT = "checkpoint.pt", "metrics.jsonl", "loss.png"
RUN_FILES = (CHECKPOINT, METRICS, PLOT)
CHECKPOINT_FORMAT = 1


def atomic_write(path: Path, write) -> None:
    """Call write(tmp) on a temp file beside `path`, then rename it onto `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True; a damaged or foreign file is a ValueError of one line."""
    path = Path(path)
    # torch.save writes a zip archive; anything else (random bytes, a truncated copy, a text file) is
    # not worth handing to the unpickler, whose message would suggest weights_only=False.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (the file is truncated, "
                         "corrupted, or another kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects beyond tensors, numbers and strings, so it is not a checkpoint "
            "of this project; it is not loaded (unpickling such objects can run code)"
        ) from e
    except Exception as e:  # e.g. a zip archive with a damaged member
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot read checkpoint {path} (corrupted?): {type(e).__name__}: {first}") from e


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (the process killed mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_metrics(rows: list[dict], path: Path, title: str = "") -> None:
    """loss.png: the per-step training loss with the evaluated losses on top; a second panel for
    any evaluated accuracy (`*_accuracy` keys)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    evals = [r for r in rows if any(k.endswith("_loss") and k != "train_loss" for k in r)]
    loss_keys = sorted({k for r in evals for k in r if k.endswith("_loss") and k != "train_loss"})
    acc_keys = sorted({k for r in rows for k in r if k.endswith("_accuracy")})
    fig, axes = plt.subplots(1, 2 if acc_keys else 1, figsize=(12 if acc_keys else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], lw=0.8, alpha=0.5, label="train (per step)")
    for key, marker in zip(loss_keys, "os^vD" * 4):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        ax.plot(*zip(*pts), f"{marker}-", label=key.removeprefix("eval_").replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if acc_keys:
        ax = axes[0][1]
        for key, marker in zip(acc_keys, "os^vD" * 4):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), f"{marker}-", label=key.removeprefix("eval_").replace("_", " "))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def rng_state(device: torch.device) -> dict:
    """This process's random streams: torch's CPU generator, its own GPU's (only that one: touching
    every visible GPU would open a context on each of them from every rank), Python's `random`."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints kept every visible GPU's state
        cuda = cuda[device.index or 0] if device.type == "cuda" and len(cuda) > (device.index or 0) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
