"""What the two fine-tuning jobs share: where they start from, and their model flags (declared once).

`--init-from` takes any checkpoint `model.weights.load_model` reads: a `scripts/train.py` run folder
or its checkpoint.pt, a `save_pretrained` folder, a Hugging Face GPT-2 folder or .safetensors file.
Without it the model is a fresh one of `--model` (allowed, and said: fine-tuning random weights is
training from scratch on a small data set).
"""

from __future__ import annotations

import argparse

import torch

from model.engine import prepare
from model.gpt import PRESETS, GPTConfig, GPTModel
from model.lora import count_trainable
from model.weights import load_model


def add_model_arguments(ap: argparse.ArgumentParser, *, lora_help: str = "") -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--init-from", metavar="PATH",
                   help="the pretrained model: a scripts/train.py run folder or its checkpoint.pt, a save_pretrained "
                        "folder, a Hugging Face GPT-2 folder or .safetensors file (default: fresh weights of --model)")
    g.add_argument("--model", default="tiny", help=f"preset for fresh weights without --init-from: {', '.join(PRESETS)}")
    g.add_argument("--dropout", type=float, help="drop_rate while fine-tuning (default: the checkpoint's)")
    g.add_argument("--fused", action="store_true", help="run on the Triton kernels (interpreted, slowly, on a CPU)")
    g.add_argument("--lora-rank", type=int, metavar="R",
                   help="put rank-R LoRA adapters on every Linear layer, the head's included" + lora_help)
    g.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA scale alpha (default: the rank; y += alpha/R (xA)B)")


def check_model_arguments(args) -> None:
    if args.lora_rank is not None and args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be positive, got {args.lora_rank}")
    if args.lora_alpha is not None and args.lora_rank is None:
        raise ValueError("--lora-alpha needs --lora-rank")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError(f"--lora-alpha must be positive, got {args.lora_alpha}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.init_from is None and args.model not in PRESETS:
        raise ValueError(f"unknown model preset {args.model!r} (--model); choose one of: {', '.join(PRESETS)}")


def load_base(init_from: str | None, preset: str, *, dropout: float | None, fused: bool, seed: int):
    """(model, note): the pretrained model, or fresh weights of `preset` with a note saying so."""
    torch.manual_seed(seed)
    if init_from is None:
        cfg = GPTConfig.from_preset(preset)
        note = (f"note: no --init-from: fine-tuning fresh random weights of the {preset!r} preset "
                "(training from scratch; pass a pretrained model for the book's results)")
        model = GPTModel(cfg)
    else:
        model, note = load_model(init_from), None
    if dropout is not None:
        # Dropout is a config field: rebuild the config, keep the weights (its modules read it at build).
        # Either path honours it: the fused attention kernel drops inside the kernel.
        model = _with_dropout(model, dropout)
    return model.use_fused_kernels(fused).train(), note


def plan_finetune(rc, job, model: GPTModel, *, note: str | None, trainable: str, default_out: str):
    """(plan, n_trainable): the engine's checks of a fine-tuning run, with its notes: where the
    weights come from, and how many of them learn."""
    n_trainable = count_trainable(model)
    plan = prepare(rc, job, model_config=model.cfg.to_dict(), n_params=sum(p.numel() for p in model.parameters()),
                   n_trainable=n_trainable, default_out=default_out, fused=model.fused)
    if note:
        plan.notes.insert(0, note)
    plan.notes.append(f"trainable parameters: {n_trainable:,} ({trainable})")
    return plan, n_trainable


def _with_dropout(model: GPTModel, rate: float) -> GPTModel:
    from dataclasses import replace

    cfg = replace(model.cfg, drop_rate=rate)
    with torch.device("meta"):
        fresh = GPTModel(cfg)
    fresh = fresh.to_empty(device="cpu")
    fresh.load_state_dict(model.state_dict())
    if cfg.tie_weights:
        fresh.out_head.weight = fresh.tok_emb.weight
    for m_new, m_old in zip(fresh.modules(), model.modules()):
        if hasattr(m_old, "eps"):
            m_new.eps = m_old.eps
    return fresh
