"""The GPT of *Build a Large Language Model (From Scratch)*, chapter 4, in one file.

token + position embeddings -> n_layers x [pre-LN causal self-attention, pre-LN MLP] -> LayerNorm -> head

Every compute-heavy op goes through `self.ops` (see `model/ops.py`): PyTorch built-ins by default,
the Triton kernels of `kernels/` after `use_fused_kernels(True)`, on the same weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from model.ops import get_ops


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = False  # the book trains without; OpenAI's GPT-2 weights have one
    tie_weights: bool = False  # the book keeps a separate LM head (163M params for "124M")
    # "gpt2": N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 n_layers) (GPT-2, nanoGPT).
    # "book": PyTorch's default init, as the book's code has it: N(0, 1) embeddings, Linear layers
    # uniform in +-1/sqrt(fan_in). Its larger embeddings memorize a small corpus much sooner
    # (chapter 5's 5,145-token run), while "gpt2" is the safer start for deep models on real data.
    init: str = "gpt2"

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if self.init not in ("gpt2", "book"):
            raise ValueError(f"GPTConfig.init must be 'gpt2' or 'book', got {self.init!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # Small enough to train in minutes on a 2-core CPU, still the GPT-2 vocabulary.
    "tiny": GPTConfig(context_length=128, emb_dim=128, n_heads=4, n_layers=4),
    "gpt2-124M": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-355M": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-774M": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-1558M": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),
}


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the book's "scale"
        self.bias = nn.Parameter(torch.zeros(dim))  # the book's "shift"

    def forward(self, x, ops):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add_and_forward(self, x, residual, ops):
        """(h, self(h)) with h = x + residual: the residual add and this norm in one op."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        # One fused projection for q, k and v: one matmul instead of three.
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_drop = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ops, cache=None, input_pos=None):
        B, T, C = x.shape  # (B, T, C)
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, D)
        # Strided views of one tensor, no copies: the kernels take any strides. Split along dim 2 (not
        # permute, then split along dim 0): backward then stacks the three gradients straight into
        # qkv's (B, T, 3, H, D) layout, one copy fewer per layer.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B, H, T, D)
        if cache is not None:
            # Generation (model/kv_cache.py): store this step's keys and values, attend over the past too.
            k, v = cache.update(k, v, input_pos)  # 2 x (B, H, Tk, D), Tk >= T
        if isinstance(input_pos, torch.Tensor):
            # Per-sequence positions: query t of sequence b sees keys <= input_pos[b] + t.
            y = ops.decode_attention(q, k, v, seq_lens=input_pos + T)  # (B, H, T, D)
        else:
            # Bottom-right causal: with a cache, the T queries see all input_pos earlier keys.
            y = ops.attention(q, k, v, causal=True, dropout_p=self.attn_drop if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_drop(self.out_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ops):
        # fc and GELU as one seam op: the PyTorch path adds the bias inside the matmul (addmm), the
        # fused path leaves it out of the matmul and adds it in the bias+GELU kernel.
        h = ops.linear_gelu(x, self.fc.weight, self.fc.bias)  # (B, T, 4C)
        return self.drop(self.proj(h))  # (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.mlp = MLP(cfg)

    def forward(self, x, ops, cache=None, input_pos=None):
        attn_out = self.attn(self.norm1(x, ops), ops, cache, input_pos)  # (B, T, C): pre-LN attention
        # The book's x = x + attn_out, then norm2(x), as one op: fused, the sum is not written and read back.
        h, n = self.norm2.add_and_forward(x, attn_out, ops)  # 2 x (B, T, C): residual around attention, norm2
        return h + self.mlp(n, ops)  # (B, T, C): residual around the MLP


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig, fused: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight  # GPT-2's weight tying: 38.6M fewer params
        if cfg.init == "gpt2":
            self._init_gpt2_weights()
        self.use_fused_kernels(fused)

    def _init_gpt2_weights(self):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two residual branches: shrink their output projections by
        # 1/sqrt(2 * n_layers) to keep the residual stream's variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def use_fused_kernels(self, fused: bool = True) -> "GPTModel":
        """Run attention, LayerNorm, bias+GELU and cross-entropy on the Triton kernels (or not)."""
        self.ops = get_ops(fused)
        return self

    @property
    def fused(self) -> bool:
        return self.ops.name == "fused"

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once
        if exclude_embeddings:
            n -= self.pos_emb.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, cache=None, input_pos=None, *, targets=None, ignore_index: int = -100,
                logits_at=None):
        """Logits (B, T, V) for token ids idx (B, T); with `targets` (B, T), the mean next-token loss
        instead (see `head_loss`: on the fused path the logits are then never materialized). With
        `logits_at` (B,) positions in [0, T), only those: (B, 1, V), row b at its position logits_at[b]
        (generation needs the last prompt token's alone; the head over all T would cost T times more).

        With a KV cache (`model.kv_cache.KVCaches`), idx holds the tokens that follow what the cache
        already holds: they sit at positions input_pos + t, where input_pos is an int (every
        sequence alike; default 0) or a (B,) tensor (each sequence its own length).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, seq_len) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape  # (B, T)
        if B == 0 or T == 0:
            raise ValueError(f"empty input: idx has shape {tuple(idx.shape)}")
        if T > self.cfg.context_length:
            raise ValueError(
                f"sequence length {T} exceeds the model's context length {self.cfg.context_length}"
            )
        if cache is None:
            if input_pos is not None:
                raise ValueError("input_pos is only meaningful with a KV cache (cache=...)")
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            input_pos = 0 if input_pos is None else input_pos
            cache.check(B, T, input_pos)  # a clear error on cache overflow, before any write
            if isinstance(input_pos, torch.Tensor):
                pos = input_pos[:, None] + torch.arange(T, device=idx.device)  # (B, T): per sequence
            else:
                pos = torch.arange(input_pos, input_pos + T, device=idx.device)  # (T,)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, self.ops, cache.layers[i] if cache is not None else None, input_pos)  # (B, T, C)
        x = self.final_norm(x, self.ops)  # (B, T, C)
        if targets is not None:
            return self.head_loss(x, targets, ignore_index)  # scalar
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, C)
        return self.out_head(x)  # (B, T, V), or (B, 1, V)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of given logits (B, T, V) against targets (B, T). To train
        without ever storing the logits, call `model(idx, targets=targets)` instead."""
        return self.ops.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of the head on final hidden states x (B, T, C) against targets (B, T).

        One seam op, `linear_cross_entropy`: the PyTorch path runs the head, then the loss; the fused
        path runs them chunk by chunk, so the (B*T, V) logits (1.6 GB in fp32 at B=8, T=1024) never
        exist. It reads `out_head.weight`; a LoRA-wrapped head (model/lora.py) gives there its effective
        weight W + (alpha/r) (A B)^T, so the adapter acts and gets its gradient through that tensor."""
        x, targets = x.flatten(0, 1), targets.flatten()  # (N, C), (N,)
        if getattr(self.out_head, "bias", None) is not None:  # not GPT-2's head: the plain way
            return self.ops.cross_entropy(self.out_head(x), targets, ignore_index=ignore_index)
        weight = self.out_head.weight  # (V, C)
        if torch.is_autocast_enabled(x.device.type):  # the head's matmul in autocast's dtype, as F.linear's
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        return self.ops.linear_cross_entropy(x, weight.to(x.dtype), targets, ignore_index=ignore_index)
