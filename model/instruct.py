"""Instruction fine-tuning: the book's chapter 7, as a job of the training engine.

The model learns to continue the Alpaca prompt of each entry (model/finetune_data.py) with its
output and then <|endoftext|>; the loss is the LM loss of `model(x, targets=y)`, so on the fused
path the (tokens x 50,257) logits are never stored. After training, `generate_responses` answers
each test entry greedily with the KV cache (stopping at <|endoftext|>, at most 256 new tokens) and
the answers can be scored by a judge model (model/judge.py).
"""

from __future__ import annotations

import torch

from model.finetune_data import collate_instructions, eot_id, format_prompt, tokenize_instructions
from model.tokenizer import decode, encode

MAX_NEW_TOKENS = 256


class InstructJob:
    """Next-token loss on prompt + response (+ <|endoftext|>), the book's collation (model.engine.Job)."""

    name = "instruct"

    def __init__(self, train, val, test, *, context_length: int, max_length: int | None, mask_prompt: bool,
                 batch_size: int, eval_batches: int, source: str, settings: dict, pad_id: int | None = None):
        if max_length is not None and max_length > context_length:
            raise ValueError(f"--max-length {max_length} exceeds the model's context length {context_length}")
        self.max_length = max_length or context_length  # longer sequences are cut (the book: 1024)
        self.mask_prompt = mask_prompt
        self.pad_id = eot_id() if pad_id is None else pad_id  # <|endoftext|>: the book pads with it
        self.splits = {"train": train, "val": val, "test": test}
        self.items = {k: tokenize_instructions(v) for k, v in self.splits.items()}
        for name, part in self.splits.items():
            if not part:
                raise ValueError(f"{source}: too few entries for a non-empty {name} split")
        self.batch_size, self.eval_batches, self.source, self.settings = batch_size, eval_batches, source, settings

    def _collate(self, items, device):
        return collate_instructions(items, pad_id=self.pad_id, max_length=self.max_length,
                                    mask_prompt=self.mask_prompt, device=device)

    def n_train(self) -> int:
        return len(self.items["train"])

    def batch(self, idx, device):
        return self._collate([self.items["train"][int(i)] for i in idx], device)

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y)  # the fused path never stores the logits

    def tokens(self, batch) -> int:
        return batch[0].numel()

    @torch.no_grad()
    def split_loss(self, model, split: str, device, autocast=None, max_batches: int | None = None) -> float:
        """Mean of the batches' mean losses over a fixed, evenly spread selection (or all) of a split."""
        import contextlib

        autocast = autocast or contextlib.nullcontext
        items = self.items[split]
        n = len(items) if max_batches is None else min(len(items), self.batch_size * max_batches)
        idx = torch.linspace(0, len(items) - 1, n).round().long()
        losses = []
        for chunk in idx.split(self.batch_size):
            x, y = self._collate([items[int(i)] for i in chunk], device)
            with autocast():
                losses.append(model(x, targets=y).float().item())
        return sum(losses) / len(losses)

    def evaluate(self, model, device, autocast) -> dict[str, float]:
        return {"eval_train_loss": self.split_loss(model, "train", device, autocast, self.eval_batches),
                "val_loss": self.split_loss(model, "val", device, autocast, self.eval_batches)}

    def sample(self, model, device):
        """The book's check during training: the response to the first validation entry."""
        # The weights change between samples: decode-ready copies would be remade (and held) each time.
        return generate_responses(model, self.splits["val"][:1], max_new_tokens=35, decode_layout=False)[0]

    def describe(self) -> str:
        lens = [len(it.ids) for it in self.items["train"]]
        return (f"data {self.source}: {len(self.items['train'])} training / {len(self.items['val'])} validation / "
                f"{len(self.items['test'])} test entries; {min(lens)}-{max(lens)} tokens (prompt + response), "
                f"cut at {self.max_length}{'; prompt tokens masked from the loss' if self.mask_prompt else ''}")

    def config(self) -> dict:
        return dict(self.settings)

    def resume_key(self) -> dict:
        return {"data": self.source, "max_length": self.max_length, "mask_prompt": self.mask_prompt}


@torch.no_grad()
def generate_responses(model, entries: list[dict], max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8,
                       progress: bool = False, decode_layout: bool | None = None) -> list[str]:
    """Each entry's response: greedy decoding with the KV cache after its prompt, stopping at
    <|endoftext|> (at most max_new_tokens, and what the context length leaves), the prompt stripped.
    A prompt longer than the context keeps its last tokens. decode_layout: `generate`'s."""
    from tqdm.auto import tqdm

    from model.generate import generate

    was_training = model.training
    model.eval()
    eot, ctx = eot_id(), model.cfg.context_length
    prompts = [encode(format_prompt(e))[-(ctx - 1):] for e in entries]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    out = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="entry", disable=not progress)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        ids = [prompts[i] for i in chunk]
        n = min(max_new_tokens, ctx - max(len(p) for p in ids))
        seqs = generate(model, ids, n, temperature=0.0, eos_id=eot, decode_layout=decode_layout)  # lists
        for i, p, seq in zip(chunk, ids, seqs):
            new = seq[len(p):]
            if new and new[-1] == eot:
                new = new[:-1]
            out[i] = decode(new).strip()
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return out
