"""LoRA, the book's appendix E: fine-tune a few low-rank matrices instead of the whole model.

A frozen Linear layer y = x W^T + b gets a trainable low-rank update,

    y = base(x) + (alpha / r) * (x A) B        A: (in, r), B: (r, out)

with A drawn as the book does (Kaiming-uniform, a = sqrt(5): uniform in +-1/sqrt(r)) and B = 0, so
training starts from the base model's function exactly and only A and B move: r * (in + out)
numbers per layer instead of in * out. `merge_lora` folds (alpha / r) (A B)^T into W for inference.

Our attention computes q, k and v with ONE Linear (C -> 3C). The book has three (W_query, W_key,
W_value), each with its own adapter; one adapter on the fused layer would be a different (smaller,
r * (C + 3C) vs 3 r * (C + C)) and coupled update. So a `groups=3` adapter gives each third of the
output its own A and B: exactly the book's three adapters, run on the fused projection. With rank 16
on gpt2-124M and a 2-class head that is the book's 2,666,528 trainable parameters.

Some code reads a Linear's `.weight` instead of calling it (the MLP hands `F.linear(x, fc.weight)`
to the fused bias+GELU; the fused LM loss passes `out_head.weight` to its kernel). For them a
`LoRALinear` exposes `.weight` as its *effective* weight W + (alpha / r) (A B)^T, a differentiable
tensor: the adapter acts on every path and gets its gradient on every path. (A peer combination of
LoRA and a fused linear cross-entropy trained the head's adapter as frozen: the kernel read the
base weight alone.)

Adapters save alone (`save_adapters`: safetensors, a few MB) with what they were made for (rank,
alpha, the base's layer shapes) and load onto a matching base model (`load_adapters`); any mismatch
is an error that names it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

ADAPTERS_NAME = "adapters.safetensors"
QKV_GROUPS = {"attn.qkv": 3}  # layer-name suffix -> adapters side by side (the book's separate q, k, v)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, groups: int = 1):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
        if base.out_features % groups:
            raise ValueError(f"{base.out_features} output features do not split into {groups} adapter groups")
        self.base, self.rank, self.alpha, self.groups = base, rank, float(alpha), groups
        self.scaling = self.alpha / rank
        base.requires_grad_(False)
        w = base.weight
        out_g = base.out_features // groups
        self.A = nn.Parameter(torch.empty(groups, base.in_features, rank, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(groups, rank, out_g, device=w.device, dtype=w.dtype))
        for g in range(groups):
            # The book's init of an (in, r) matrix: fan_in = r, so entries are uniform in +-1/sqrt(r).
            nn.init.kaiming_uniform_(self.A.data[g], a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """(alpha / r) (A B)^T, in W's (out, in) layout; group g fills rows g*out/G ... (g+1)*out/G."""
        AB = torch.einsum("gir,gro->goi", self.A, self.B)  # (G, out/G, in)
        return self.scaling * AB.reshape(self.out_features, self.in_features)  # (out, in)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + delta, for code that reads `.weight` rather than calling the layer."""
        return self.base.weight + self.delta()  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("...i,gir->...gr", x, self.A)  # (..., G, r): x A, group by group
        d = torch.einsum("...gr,gro->...go", z, self.B).flatten(-2)  # (..., out): (x A) B, groups side by side
        return self.base(x) + self.scaling * d  # (..., out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, groups={self.groups}"


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------
def _groups_for(name: str) -> int:
    return next((g for suffix, g in QKV_GROUPS.items() if name.endswith(suffix)), 1)


def apply_lora(model: nn.Module, rank: int, alpha: float, include_head: bool = True) -> nn.Module:
    """Freeze `model` and wrap every nn.Linear (the output head too unless include_head=False) in a
    LoRALinear, in place. The fused q/k/v projection gets the book's three separate adapters.
    Returns the model."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters")
    model.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and (include_head or name != "out_head")]
    if not targets:
        raise ValueError("the model has no nn.Linear layers to put adapters on")
    if getattr(getattr(model, "cfg", None), "tie_weights", False) and include_head:
        raise ValueError("LoRA on a head tied to the token embedding is not supported; pass include_head=False")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, rank, alpha, groups=_groups_for(name)))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (alpha / r) (A B)^T) and put the plain Linear
    back, in place: the same function, no extra matmuls. Returns the model."""
    for name, layer in lora_layers(model).items():
        with torch.no_grad():
            layer.base.weight += layer.delta().to(layer.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Adapters alone on disk
# ----------------------------------------------------------------------------------------------
def _layout(model: nn.Module) -> dict:
    """What the adapters were made for: per layer its base shape, rank, alpha and groups."""
    return {name: {"in": m.in_features, "out": m.out_features, "rank": m.rank, "alpha": m.alpha,
                   "groups": m.groups} for name, m in lora_layers(model).items()}


def save_adapters(model: nn.Module, path) -> Path:
    """Write only the adapters' A and B (safetensors) with their layout in the metadata."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in layers.items():
        tensors[f"{name}.A"] = m.A.detach().contiguous().cpu()
        tensors[f"{name}.B"] = m.B.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": "pt", "lora_layout": json.dumps(_layout(model))})
    return path


def read_adapter_layout(path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapters file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"could not read {path} as a safetensors file: {e}") from e
    if "lora_layout" not in meta:
        raise ValueError(f"{path} holds no LoRA adapters (no lora_layout metadata)")
    return json.loads(meta["lora_layout"])


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Put the adapters of `path` onto `model` (a base model without adapters, or one whose adapters
    have the same layout), in place. A base whose layers differ from the adapters' is an error."""
    from safetensors.torch import load_file

    layout = read_adapter_layout(path)
    if not lora_layers(model):
        ranks = {(v["rank"], v["alpha"]) for v in layout.values()}
        if len(ranks) != 1:
            raise ValueError(f"{path}: adapters of several ranks/alphas are not supported")
        (rank, alpha), = ranks
        apply_lora(model, rank, alpha, include_head="out_head" in layout)
    ours = _layout(model)
    missing, unexpected = sorted(set(ours) - set(layout)), sorted(set(layout) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{path}: the adapters do not fit this base model: "
                         + "; ".join(s for s in (f"no adapter for {', '.join(missing)}" if missing else "",
                                                  f"no layer {', '.join(unexpected)} in the model" if unexpected else "") if s))
    wrong = [f"{n} (adapters {layout[n]}, model {ours[n]})" for n in ours if layout[n] != ours[n]]
    if wrong:
        raise ValueError(f"{path}: the adapters were made for another base model: {'; '.join(wrong)}")
    tensors = load_file(str(path))
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            m.A.copy_(tensors[f"{name}.A"])
            m.B.copy_(tensors[f"{name}.B"])
    return model
