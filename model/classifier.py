"""A GPT turned into a text classifier: the book's chapter 6.

The LM head (emb_dim -> 50,257 token scores) is replaced by `Linear(emb_dim, n_classes)`; the
class scores of a text are those at one position:

- "last-real" (the default): the text's last real token. Causal attention makes it the only
  position that has seen the whole text, and the padding after it never changes it.
- "last" (the book's): the last position of the padded window. For a text shorter than the window
  that position is an <|endoftext|> pad that has read the text; it works, but less well (the book's
  own bonus experiments: 95.00% vs 98.33% test accuracy on SMS spam for the change above).

`--trainable` picks what learns: "last-block" (the book's: the last transformer block, the final
LayerNorm and the new head), "all", "head" (the new head alone, a linear probe), or "lora" (only
the LoRA adapters of model/lora.py, the head's included: appendix E).

A fine-tuned classifier is saved as a folder: `classifier.json` (the labels, the pooling, the
padded length, the model config), `classifier.safetensors` (every weight, adapters merged) and, with
LoRA, `adapters.safetensors` (the adapters alone, to put on the same base model again).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from model.gpt import GPTConfig, GPTModel
from model.finetune_data import eot_id
from model.lora import ADAPTERS_NAME, apply_lora, lora_layers, merge_lora, save_adapters

POOLINGS = ("last-real", "last")
TRAINABLE = ("last-block", "all", "head", "lora")
CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS = "classifier.json", "classifier.safetensors"
CLASSIFIER_FORMAT = 1


def to_classifier(model: GPTModel, n_classes: int) -> GPTModel:
    """Replace the LM head by Linear(emb_dim, n_classes) (with a bias, as the book's), in place."""
    if n_classes < 2:
        raise ValueError(f"a classifier needs 2 or more classes, got {n_classes}")
    w = model.out_head.weight
    model.out_head = nn.Linear(model.cfg.emb_dim, n_classes, device=w.device, dtype=w.dtype)
    return model


def set_trainable(model: GPTModel, trainable: str, lora_rank: int | None = None, lora_alpha: float | None = None):
    """Freeze all but what `trainable` names; with a LoRA rank, add adapters (trainable) on every Linear."""
    if trainable not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if trainable == "lora" and not lora_rank:
        raise ValueError("--trainable lora needs --lora-rank")
    model.requires_grad_(trainable == "all")
    if trainable == "last-block":
        for m in (model.blocks[-1], model.final_norm, model.out_head):
            m.requires_grad_(True)
    elif trainable == "head":
        model.out_head.requires_grad_(True)
    if lora_rank:
        frozen = {id(p) for p in model.parameters() if not p.requires_grad}
        keep = [p for p in model.parameters() if id(p) not in frozen]
        apply_lora(model, lora_rank, lora_alpha if lora_alpha is not None else lora_rank)  # freezes all
        for p in keep:  # what --trainable names stays trainable next to the adapters
            p.requires_grad_(True)
    return model


def pool(scores: torch.Tensor, lengths: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """scores (B, T, K) -> (B, K) at each text's last real token, or at the last position."""
    if pooling == "last" or lengths is None:
        return scores[:, -1, :]  # (B, K)
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, lengths.to(scores.device) - 1]  # (B, K)


def class_scores(model: GPTModel, x: torch.Tensor, lengths: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, n_classes) scores for token ids x (B, T)."""
    return pool(model(x), lengths, pooling)


# ----------------------------------------------------------------------------------------------
# Saving and loading a fine-tuned classifier
# ----------------------------------------------------------------------------------------------
def save_classifier(model: GPTModel, folder, *, labels: list[str], pooling: str, max_length: int,
                    extra: dict | None = None) -> Path:
    """Write the classifier folder. With LoRA, the adapters alone too, then the merged weights."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if lora_layers(model):
        save_adapters(model, folder / ADAPTERS_NAME)
        model = merge_lora(_copy(model))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / CLASSIFIER_WEIGHTS), metadata={"format": "pt"})
    meta = {"format": CLASSIFIER_FORMAT, "labels": labels, "pooling": pooling, "max_length": max_length,
            "model_config": model.cfg.to_dict(), **(extra or {})}
    (folder / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder


def _copy(model: GPTModel) -> GPTModel:
    import copy

    return copy.deepcopy(model)


def load_classifier(folder, *, fused: bool = False) -> tuple[GPTModel, dict]:
    """(model in eval mode, its classifier.json) from a folder `save_classifier` wrote."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_file = folder / CLASSIFIER_CONFIG
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} is not a fine-tuned classifier (no {CLASSIFIER_CONFIG}); "
                                "scripts/finetune_classifier.py writes one into its --out")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: not JSON: {e}") from e
    if meta.get("format") != CLASSIFIER_FORMAT or "labels" not in meta:
        raise ValueError(f"{meta_file} is not a classifier config of this project")
    model = to_classifier(GPTModel(GPTConfig(**meta["model_config"])), len(meta["labels"]))
    weights = folder / CLASSIFIER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no {CLASSIFIER_WEIGHTS} in {folder}")
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ValueError(f"{weights} does not fit {meta_file}: {str(e).splitlines()[0]}") from e
    return model.use_fused_kernels(fused).eval(), meta


@torch.no_grad()
def predict(model: GPTModel, meta: dict, texts: list[str], batch_size: int = 16):
    """[(label, probability)] for each text, as the saved classifier pools and pads."""
    from model.tokenizer import encode

    out = []
    L = min(meta["max_length"], model.cfg.context_length)
    device = next(model.parameters()).device
    pad = eot_id()
    for s in range(0, len(texts), batch_size):
        ids = [encode(t)[:L] or [pad] for t in texts[s : s + batch_size]]
        lengths = torch.tensor([len(t) for t in ids])
        # "last" pools at the padded window's end: pad to the length the classifier was trained on.
        T = L if meta["pooling"] == "last" else int(lengths.max())
        x = torch.tensor([t + [pad] * (T - len(t)) for t in ids], device=device)  # (B, T)
        probs = class_scores(model, x, lengths, meta["pooling"]).float().softmax(-1)  # (B, K)
        p, k = probs.max(-1)
        out += [(meta["labels"][int(i)], float(q)) for i, q in zip(k, p)]
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_split(model, data, pooling: str, batch_size: int, device, autocast=None, max_batches: int | None = None):
    """{"loss", "accuracy", "confusion"} over `data` (the first `max_batches` batches of an evenly
    spread, fixed selection, or all of it). confusion[i][j]: examples of class i predicted as j."""
    import contextlib

    autocast = autocast or contextlib.nullcontext
    n = len(data) if max_batches is None else min(len(data), batch_size * max_batches)
    idx = torch.linspace(0, len(data) - 1, n).round().long()  # (n,)
    K = len(data.labels)
    confusion = torch.zeros(K, K, dtype=torch.long)
    total_loss = 0.0
    for chunk in idx.split(batch_size):
        x, lengths, y = batch_for(data, chunk, pooling, device)
        with autocast():
            scores = class_scores(model, x, lengths, pooling).float()  # (B, K)
        total_loss += torch.nn.functional.cross_entropy(scores, y, reduction="sum").item()
        pred = scores.argmax(-1)
        confusion += torch.bincount((y * K + pred).cpu(), minlength=K * K).view(K, K)
    return {"loss": total_loss / n, "accuracy": confusion.diag().sum().item() / n, "confusion": confusion.tolist()}


def batch_for(data, idx, pooling: str, device):
    """(x, lengths, y) on device. The book's "last" pooling reads the padded window's end: keep the
    whole padded length; "last-real" needs no more than the batch's longest text."""
    x, lengths, y = data.batch(idx)
    if pooling == "last":
        x = data.x[idx]
    return x.to(device), lengths.to(device), y.to(device)


# ----------------------------------------------------------------------------------------------
# The job (model.engine.Job)
# ----------------------------------------------------------------------------------------------
class ClassifierJob:
    """Classification fine-tuning: cross-entropy of the pooled class scores against the labels."""

    name = "classify"

    def __init__(self, train, val, test, *, pooling: str, batch_size: int, eval_batches: int, source: str,
                 settings: dict):
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.train, self.val, self.test = train, val, test
        self.pooling, self.batch_size, self.eval_batches = pooling, batch_size, eval_batches
        self.source, self.settings = source, settings

    def n_train(self) -> int:
        return len(self.train)

    def batch(self, idx, device):
        return batch_for(self.train, idx, self.pooling, device)

    def loss(self, model, batch):
        x, lengths, y = batch
        from model.engine import unwrap

        scores = pool(model(x), lengths, self.pooling)  # (B, K)
        return unwrap(model).ops.cross_entropy(scores, y)

    def tokens(self, batch) -> int:
        return batch[0].numel()

    def evaluate(self, model, device, autocast) -> dict[str, float]:
        tr = evaluate_split(model, self.train, self.pooling, self.batch_size, device, autocast, self.eval_batches)
        va = evaluate_split(model, self.val, self.pooling, self.batch_size, device, autocast, self.eval_batches)
        return {"eval_train_loss": tr["loss"], "val_loss": va["loss"],
                "train_accuracy": tr["accuracy"], "val_accuracy": va["accuracy"]}

    def sample(self, model, device):
        return None

    def describe(self) -> str:
        counts = {label: int((self.train.y == i).sum()) for i, label in enumerate(self.train.labels)}
        return (f"data {self.source}: {len(self.train)} training / {len(self.val)} validation / {len(self.test)} "
                f"test texts, classes {counts} in training; padded to {self.train.max_length} tokens; "
                f"pooling at the {'last real token' if self.pooling == 'last-real' else 'last position (the book)'}")

    def config(self) -> dict:
        return {**self.settings, "labels": self.train.labels, "pooling": self.pooling,
                "max_length": self.train.max_length}

    def resume_key(self) -> dict:
        return {k: self.settings[k] for k in ("data", "balance", "max_length", "label_column", "text_column")}


def plot_classifier(rows: list[dict], path, title: str = "") -> None:
    """accuracy.png: train/val accuracy (left) and loss (right) at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in rows if "val_accuracy" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in evals]
    a1.plot(steps, [r["train_accuracy"] for r in evals], "o-", label="train")
    a1.plot(steps, [r["val_accuracy"] for r in evals], "s-", label="validation")
    a1.set_ylabel("accuracy")
    a2.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], lw=0.8, alpha=0.5, label="train (per step)")
    a2.plot(steps, [r["val_loss"] for r in evals], "s-", label="validation")
    a2.set_ylabel("cross-entropy loss")
    for a in (a1, a2):
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
