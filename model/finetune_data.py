"""Fine-tuning data: labelled texts (chapter 6) and instruction/response pairs (chapter 7).

Classification: a file of `label<TAB>text` lines (the UCI SMS Spam Collection's layout) or a CSV
whose header names the label and text columns. The labels are whatever strings the file holds
(two classes or more), numbered in sorted order. The book's preparation: undersample every class
to the smallest one's size (`balance`), shuffle with a seed, split 70/10/20, and pad every text
with <|endoftext|> to the longest training text (or cut at `max_length`).

Instructions: a JSON list of {"instruction", "input", "output"} entries, shown to the model in the
Alpaca prompt of the book, split 85/10/5 into train/test/validation. The collation (`collate_instructions`)
is the book's: append <|endoftext|>, pad with it to the batch's longest, shift by one for targets,
and ignore (-100) every padding target but the first, which teaches the model to stop.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.tokenizer import encode, get_tokenizer

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


def eot_id() -> int:
    return get_tokenizer().eot_token  # 50256 in GPT-2's vocabulary


def seeded_permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def split_by_fractions(items: list, fractions: tuple[float, ...], seed: int | None) -> list[list]:
    """Shuffle (when seed is not None) and cut into len(fractions) consecutive parts: the first
    ones take int(fraction * n) items each, the last one the rest (the book's rule)."""
    if seed is not None:
        items = [items[i] for i in seeded_permutation(len(items), seed)]
    parts, start = [], 0
    for frac in fractions[:-1]:
        end = start + int(frac * len(items))
        parts.append(items[start:end])
        start = end
    parts.append(items[start:])
    return parts


# ----------------------------------------------------------------------------------------------
# Chapter 6: labelled texts
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    label: str
    text: str
    where: str  # "file:line", for messages


def read_labelled(path, label_column: str = "label", text_column: str = "text") -> list[Example]:
    """Read `label<TAB>text` lines, or a .csv file with a header naming `label_column` and
    `text_column`. A bad row is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    text = path.read_text(encoding="utf-8")
    examples = []
    if path.suffix.lower() == ".csv":
        reader = csv.reader(text.splitlines())
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty CSV file (expected a header naming the columns)")
        for col in (label_column, text_column):
            if col not in header:
                raise ValueError(f"{path}:1: the header {header} has no column {col!r} "
                                 "(choose the columns with --label-column / --text-column)")
        li, ti = header.index(label_column), header.index(text_column)
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            examples.append(_example(row[li], row[ti], f"{path}:{line}"))
    else:
        for line, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            label, tab, body = raw.partition("\t")
            if not tab:
                raise ValueError(f"{path}:{line}: expected 'label<TAB>text', found no tab: {raw[:60]!r}")
            examples.append(_example(label, body, f"{path}:{line}"))
    if not examples:
        raise ValueError(f"{path}: no examples")
    if len({e.label for e in examples}) < 2:
        raise ValueError(f"{path}: every example has the label {examples[0].label!r}; a classifier needs 2 or more")
    return examples


def _example(label: str, text: str, where: str) -> Example:
    label, text = label.strip(), text.strip()
    if not label:
        raise ValueError(f"{where}: empty label")
    if not text:
        raise ValueError(f"{where}: empty text")
    return Example(label, text, where)


def balance(examples: list[Example], seed: int) -> list[Example]:
    """Undersample every class to the size of the smallest (the book's chapter 6 does this for spam)."""
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    n = min(len(v) for v in by_label.values())
    out = []
    for i, label in enumerate(sorted(by_label)):
        items = by_label[label]
        out += [items[j] for j in sorted(seeded_permutation(len(items), seed + i)[:n])]
    return out


class ClassificationData:
    """Texts as token ids padded with <|endoftext|> to one length; `lengths` keeps each text's real
    length, for pooling at its last real token."""

    def __init__(self, examples: list[Example], labels: list[str], max_length: int | None = None,
                 pad_id: int | None = None):
        self.labels = labels
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted({e.label for e in examples} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} were not in the training data ({labels})")
        ids = [encode(e.text) for e in examples]
        self.max_length = max_length if max_length is not None else max((len(t) for t in ids), default=1)
        pad = eot_id() if pad_id is None else pad_id
        ids = [t[: self.max_length] for t in ids]
        self.lengths = torch.tensor([max(len(t), 1) for t in ids])  # (N,)
        self.x = torch.tensor([t + [pad] * (self.max_length - len(t)) for t in ids], dtype=torch.long)  # (N, L)
        self.y = torch.tensor([index[e.label] for e in examples], dtype=torch.long)  # (N,)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (B, L), lengths (B,), y (B,)), cut to the batch's longest text (causal attention: the
        padding after a text never changes its tokens' states, so the shorter window is exact)."""
        lengths = self.lengths[idx]
        L = int(lengths.max())
        return self.x[idx, :L], lengths, self.y[idx]


def prepare_classification(path, *, seed: int = 123, balanced: bool = True, max_length: int | None = None,
                           context_length: int, label_column: str = "label", text_column: str = "text",
                           fractions=(0.7, 0.1, 0.2)):
    """(train, val, test) ClassificationData: read, balance, split with `seed`, pad to the longest
    training text (at most `max_length`, at most the model's context length)."""
    examples = read_labelled(path, label_column, text_column)
    if balanced:
        examples = balance(examples, seed)
    train, val, test = split_by_fractions(examples, fractions, seed)
    for name, part in (("training", train), ("validation", val), ("test", test)):
        if not part:
            raise ValueError(f"{path}: too few examples ({len(examples)}) for a non-empty {name} split")
    labels = sorted({e.label for e in train})
    if max_length is not None and max_length > context_length:
        raise ValueError(f"--max-length {max_length} exceeds the model's context length {context_length}")
    longest = max(len(encode(e.text)) for e in train)
    length = min(max_length or longest, context_length)
    return tuple(ClassificationData(part, labels, length) for part in (train, val, test))


# ----------------------------------------------------------------------------------------------
# Chapter 7: instructions
# ----------------------------------------------------------------------------------------------
PROMPT_HEAD = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")


def format_input(entry: dict) -> str:
    """The book's Alpaca-style instruction text; an '### Input:' section only when input is non-empty."""
    text = f"{PROMPT_HEAD}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_prompt(entry: dict) -> str:
    """What the model reads before its response: the instruction text, then '### Response:'."""
    return format_input(entry) + "\n\n### Response:\n"


def read_instructions(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no instruction file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from e
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{instruction, input, output}} entries")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i} is a {type(entry).__name__}, not an object")
        for key in ("instruction", "output"):
            if not isinstance(entry.get(key), str):
                raise ValueError(f"{path}: entry {i} has no string {key!r}")
        if not isinstance(entry.get("input", ""), str):
            raise ValueError(f"{path}: entry {i}: 'input' must be a string")
    return data


def split_instructions(data: list[dict], seed: int | None = 123, fractions=(0.85, 0.1, 0.05)):
    """(train, test, validation): the book's 85/10/5 (935/110/55 of its 1,100 entries)."""
    return tuple(split_by_fractions(data, fractions, seed))


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]  # prompt + response
    prompt_len: int
    index: int  # the entry's position in its split, for messages


def tokenize_instructions(data: list[dict]) -> list[Tokenized]:
    out = []
    for i, entry in enumerate(data):
        prompt = encode(format_prompt(entry))
        out.append(Tokenized(prompt + encode(entry["output"]), len(prompt), i))
    return out


def collate_instructions(items: list[Tokenized], *, pad_id: int | None = None, ignore_index: int = IGNORE_INDEX,
                         max_length: int | None = None, mask_prompt: bool = False, device=None):
    """The book's collate: each sequence + <|endoftext|>, padded with it to the batch's longest;
    inputs = all but the last token, targets = all but the first; every padding target except the
    first is ignored. `mask_prompt` ignores the targets inside the prompt too (the book's exercise
    7.2); `max_length` truncates. A batch whose targets are all ignored is an error naming its entries.
    Returns (inputs (B, T), targets (B, T))."""
    pad = eot_id() if pad_id is None else pad_id
    longest = max(len(it.ids) + 1 for it in items)
    xs, ys = [], []
    for it in items:
        seq = it.ids + [pad]
        padded = torch.tensor(seq + [pad] * (longest - len(seq)))  # (longest,)
        x, y = padded[:-1].clone(), padded[1:].clone()  # (longest - 1,) each
        y[len(seq) - 1 :] = ignore_index  # targets after the first <|endoftext|>: padding, ignored
        if mask_prompt:
            y[: it.prompt_len - 1] = ignore_index  # targets that are prompt tokens
        if max_length is not None:
            x, y = x[:max_length], y[:max_length]
        xs.append(x)
        ys.append(y)
    x, y = torch.stack(xs), torch.stack(ys)  # (B, T) x2
    if bool((y == ignore_index).all()):
        raise ValueError(f"every target of the batch of entries {[it.index for it in items]} is ignored "
                         "(their prompts fill --max-length); the loss would be empty: raise --max-length "
                         "or drop --mask-prompt")
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y
