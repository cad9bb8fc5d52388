"""Text in, (input, target) token windows out: chapter 2's sliding-window dataset and loaders.

Corpora: a text file, a folder of .txt files, or the built-in default that needs no download (the
documentation that ships inside Python's standard library, `pydoc_data.topics`: ~140k GPT-2 tokens
of English prose and code about Python, on every Python installation). A corpus of several
documents (the built-in one, a folder) is split by documents held out throughout it
(`split_documents`); a single file as the book does, its last part for validation (`train_val_split`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from model.tokenizer import EOT, encode

DEFAULT_CORPUS = "builtin:pydoc"


def builtin_documents() -> list[str]:
    """The built-in corpus as documents: one per pydoc topic (keyword, statement, data model...)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def builtin_corpus() -> str:
    return f"\n\n{EOT}".join(builtin_documents())


def read_utf8(path: Path) -> str:
    """A file's text; a file that is not UTF-8 is a ValueError that names it and the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def load_documents(source: str | Path = DEFAULT_CORPUS) -> list[str]:
    """A corpus as a list of documents: the built-in topics, each .txt file of a folder, or one file."""
    if str(source) == DEFAULT_CORPUS:
        return builtin_documents()
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"data folder {path} holds no .txt files")
        docs = [read_utf8(f) for f in files]
    elif path.is_file():
        docs = [read_utf8(path)]
    else:
        raise FileNotFoundError(f"data file or folder not found: {path}")
    if not "".join(docs).strip():
        raise ValueError(f"data source {path} is empty")
    return docs


def load_text(source: str | Path = DEFAULT_CORPUS) -> str:
    """Read a corpus: `builtin:pydoc`, a text file, or a folder of .txt files (joined with <|endoftext|>)."""
    if str(source) == DEFAULT_CORPUS:
        return builtin_corpus()
    return EOT.join(load_documents(source))


def split_documents(docs: list[str], val_ratio: float, sep: str = EOT) -> tuple[list[int], list[int]]:
    """Token ids of (train, validation), validation being whole documents held out *throughout* the
    corpus: a document goes to validation when that brings validation's share of the tokens seen so
    far closer to `val_ratio` (it is below the ratio by more than half the document). So both splits
    sample the same mix of topics and their losses compare (a tail split of a sorted corpus would
    validate on its last topics only)."""
    if not 0.0 < val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in (0, 1), got {val_ratio}")
    train, val, seen = [], [], 0
    for doc in docs:
        ids = encode(doc + sep)
        seen += len(ids)
        (val if len(val) + len(ids) / 2 < val_ratio * seen else train).extend(ids)
    return train, val


class GPTDataset(Dataset):
    """Windows of max_length tokens every `stride` tokens; the target is the input shifted by one."""

    def __init__(self, token_ids: list[int] | torch.Tensor, max_length: int, stride: int):
        if max_length <= 0 or stride <= 0:
            raise ValueError(f"max_length and stride must be positive, got {max_length} and {stride}")
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if len(ids) < max_length + 1:
            raise ValueError(
                f"corpus of {len(ids)} tokens is shorter than one training window "
                f"({max_length} tokens + 1 target); use more text or a shorter context length"
            )
        self.ids, self.max_length = ids, max_length
        self.starts = range(0, len(ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        s = self.starts[i]
        chunk = self.ids[s : s + self.max_length + 1]  # (max_length + 1,)
        return chunk[:-1], chunk[1:]  # input (max_length,), target (max_length,)


def create_dataloader(
    text_or_ids, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True, num_workers=0, generator=None
) -> DataLoader:
    ids = encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    ds = GPTDataset(ids, max_length, stride)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers, generator=generator
    )


def train_val_split(ids: list[int], train_ratio: float = 0.9) -> tuple[list[int], list[int]]:
    """Split a token stream at one point, as the book does (chapter 5): first 90% train, rest validation."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    cut = int(train_ratio * len(ids))
    return ids[:cut], ids[cut:]
