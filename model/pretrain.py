"""Pretraining as a job of the training engine: the book's chapter 5 (next-token prediction on a corpus).

The data is windows of `context_length` tokens every `stride` tokens (chapter 2's sliding window);
an example is one window, its target the window shifted by one token. Validation: on a corpus of
several documents (the built-in one, a folder of .txt files) whole documents held out throughout
the corpus, so the two losses compare; on a single file the book's split, its last `val_ratio`.

    pc = PretrainConfig(model="tiny"); rc = RunConfig(steps=150)
    result = pretrain(pc, rc)            # prepare + build the model + model.engine.fit

`scripts/train.py` is its command line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.data import DEFAULT_CORPUS, GPTDataset, load_documents, split_documents, train_val_split
from model.engine import RunConfig, fit, prepare
from model.gpt import PRESETS, GPTConfig, GPTModel
from model.tokenizer import decode, encode

# tiny preset, batch 8 x 128 tokens of the built-in corpus (~1.3 epochs): about 1 s a step on 2 idle
# CPU cores; the loss falls from ln(50257) = 10.8 to ~5.
DEFAULT_STEPS = 150


@dataclass
class PretrainConfig:
    """The pretraining job's knobs (the loop's are model.engine.RunConfig). `None` = derived."""

    model: str = "tiny"
    data: str = DEFAULT_CORPUS
    context_length: int | None = None  # default: the preset's
    stride: int | None = None  # default: context_length (no overlap, as in the book's chapter 5)
    val_ratio: float = 0.1
    dropout: float | None = None  # default: the preset's drop_rate
    tie_weights: bool = False
    qkv_bias: bool = False
    init: str = "gpt2"
    fused: bool = False
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 30
    # The showcase sample: temperature + top-k with a fixed seed. Greedy decoding of a small model on
    # an indented corpus collapses into whitespace; sampling shows the words it learned.
    sample_temperature: float = 0.8
    sample_top_k: int = 40

    def check(self) -> None:
        if self.model not in PRESETS:
            raise ValueError(f"unknown model preset {self.model!r} (--model); choose one of: {', '.join(PRESETS)}")
        for name in ("context_length", "stride", "sample_tokens", "sample_top_k"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not 0.0 < self.val_ratio < 1.0:
            raise ValueError(f"--val-ratio must be in (0, 1), got {self.val_ratio}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.sample_temperature < 0:
            raise ValueError(f"--sample-temperature must be >= 0 (0 = greedy), got {self.sample_temperature}")
        preset = PRESETS[self.model]
        if self.context_length is not None and self.context_length > preset.context_length:
            raise ValueError(
                f"--context-length {self.context_length} exceeds the {self.model} preset's context length "
                f"{preset.context_length} (its position embeddings have that many rows)"
            )

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

    def default_out(self) -> Path:
        """runs/<model>, or runs/<model>-fused: the two paths' runs never land in one folder."""
        return Path("runs") / (f"{self.model}-fused" if self.fused else self.model)


@torch.no_grad()
def estimate_loss(model: GPTModel, ds: GPTDataset, batch_size: int, max_batches: int, device, autocast) -> float:
    """Mean loss over at most `max_batches` batches of windows spread evenly over the whole set (the
    same windows every time, so successive estimates are comparable)."""
    n = min(len(ds), batch_size * max_batches)
    idx = torch.linspace(0, len(ds) - 1, n).round().long()  # (n,)
    total = 0.0
    for chunk in idx.split(batch_size):
        x, y = windows(ds, chunk, device)
        with autocast():
            total += model(x, targets=y).float().item() * len(chunk)  # fused: no logits stored
    return total / n


def windows(ds: GPTDataset, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zip(*(ds[int(i)] for i in idx))
    return torch.stack(x).to(device, non_blocking=True), torch.stack(y).to(device, non_blocking=True)  # (B, T) x2


def sample_text(model: GPTModel, prompt: str, max_new_tokens: int, device, *, temperature: float = 0.0,
                top_k: int | None = None, seed: int = 0) -> str:
    """`prompt` and `max_new_tokens` more tokens, sampled with a fixed seed (the same draws at every
    evaluation, so successive samples compare; the global RNG is not touched)."""
    from model.generate import generate, sample_next

    ctx = model.cfg.context_length
    ids = encode(prompt)
    top_k = top_k if temperature > 0 else None
    gen = torch.Generator(device=device).manual_seed(seed)
    if len(ids) + max_new_tokens <= ctx:  # the usual case: the KV cache
        # decode_layout=False: the weights change between samples, so decode-ready copies would be
        # remade (and held in memory) at every one.
        out = generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                       top_k=top_k, generator=gen, decode_layout=False)  # (1, len + n)
        return decode(out[0])
    # Longer than the context (a short --context-length): the book's chapter 4 loop, each step on the
    # last `ctx` tokens only.
    tokens = torch.tensor([ids], device=device)  # (1, len)
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -ctx:])[:, -1]  # (1, V)
        tokens = torch.cat([tokens, sample_next(logits, temperature, top_k, None, gen)[:, None]], dim=1)
    return decode(tokens[0])


class PretrainJob:
    """Next-token prediction on windows of a corpus (model.engine.Job)."""

    name = "pretrain"

    def __init__(self, pc: PretrainConfig, batch_size: int, eval_batches: int, seed: int):
        pc.check()
        self.pc, self.batch_size, self.eval_batches, self.seed = pc, batch_size, eval_batches, seed
        self.cfg = pc.model_config()
        T = self.cfg.context_length
        self.stride = pc.stride or T
        docs = load_documents(pc.data)
        if len(docs) > 1:
            train_ids, val_ids = split_documents(docs, pc.val_ratio)
            self.split = (f"validation: {len(docs)} documents, those held out spread through the corpus "
                          f"({len(val_ids) / (len(train_ids) + len(val_ids)):.0%} of the tokens)")
        else:
            train_ids, val_ids = train_val_split(encode(docs[0]), 1.0 - pc.val_ratio)
            self.split = f"validation: the file's last {pc.val_ratio:.0%} (the book's split)"
        n = len(train_ids) + len(val_ids)
        if n < T + 1:
            raise ValueError(
                f"corpus {pc.data} has {n} tokens, shorter than one context window "
                f"({T} + 1 tokens); use more text or a smaller --context-length"
            )
        for what, part in (("training", train_ids), ("validation", val_ids)):
            if len(part) < T + 1:
                raise ValueError(
                    f"the {what} split of {pc.data} has {len(part)} tokens, shorter than one context window "
                    f"({T} + 1 tokens); use more text, a smaller --context-length or another --val-ratio"
                )
        self.train_ds, self.val_ds = GPTDataset(train_ids, T, self.stride), GPTDataset(val_ids, T, self.stride)

    # -- the engine's Job interface --
    def n_train(self) -> int:
        return len(self.train_ds)

    def batch(self, idx, device):
        return windows(self.train_ds, idx, device)

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y)  # the mean LM loss; on the fused path the logits are never stored

    def tokens(self, batch) -> int:
        return batch[0].numel()

    def evaluate(self, model, device, autocast) -> dict[str, float]:
        def on(ds):
            return estimate_loss(model, ds, self.batch_size, self.eval_batches, device, autocast)

        return {"eval_train_loss": on(self.train_ds), "val_loss": on(self.val_ds)}

    def sample(self, model, device) -> str:
        return sample_text(model, self.pc.sample_prompt, self.pc.sample_tokens, device,
                           temperature=self.pc.sample_temperature, top_k=self.pc.sample_top_k, seed=self.seed)

    def describe(self) -> str:
        pc, cfg = self.pc, self.cfg
        return (f"model {pc.model}, context {cfg.context_length}, "
                f"{'fused Triton kernels' if pc.fused else 'PyTorch ops'}\n"
                f"data {pc.data}: {len(self.train_ds)} training / {len(self.val_ds)} validation windows of "
                f"{cfg.context_length} tokens; {self.split}")

    def config(self) -> dict:
        return asdict(self.pc)

    def resume_key(self) -> dict:
        return {"data": self.pc.data, "context_length": self.cfg.context_length, "stride": self.stride,
                "val_ratio": self.pc.val_ratio}


def build_model(pc: PretrainConfig, seed: int) -> GPTModel:
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    return GPTModel(pc.model_config(), fused=pc.fused)


def plan(pc: PretrainConfig, rc: RunConfig):
    """(job, plan): every check of a pretraining run, the data loaded; writes nothing."""
    if pc.fused:
        try:  # the kernels are separate modules: a missing one should fail here, not mid-run
            from kernels import bias_gelu, cross_entropy, flash_attention, layer_norm  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--fused: the Triton kernels cannot be imported ({e})") from e
    rc.check()
    job = PretrainJob(pc, rc.batch_size, rc.eval_batches, rc.seed)
    with torch.device("meta"):  # counts the parameters without allocating them
        n_params = sum(p.numel() for p in GPTModel(job.cfg).parameters())
    p = prepare(rc, job, model_config=job.cfg.to_dict(), n_params=n_params,
                model_name=f"--model {pc.model}", default_out=pc.default_out(), fused=pc.fused)
    return job, p


def pretrain(pc: PretrainConfig, rc: RunConfig) -> dict:
    """Check, build the model, train: model.engine.fit's result."""
    job, p = plan(pc, rc)
    return fit(p, job, build_model(pc, rc.seed))
