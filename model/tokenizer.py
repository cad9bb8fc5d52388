"""GPT-2's byte-pair encoding (chapter 2 of the book), built from files shipped with this package.

tiktoken's `get_encoding("gpt2")` downloads GPT-2's two BPE files on first use, which fails on a
machine without network. The same two files (OpenAI's, byte-identical to the ones tiktoken pins by
sha256) ship in `model/gpt2_bpe/`, and the `tiktoken.Encoding` is built from them here, so the
tokenizer needs no download, no cache and no environment variable:

    encoder.json  token string -> id, for all 50,257 tokens (50,256 merged byte strings + <|endoftext|>)
    vocab.bpe     the 50,000 merges, highest priority first: token 256 + i is merge i

Both spell bytes as printable characters (GPT-2's trick to keep the files plain text): the 188 bytes
that print as themselves (not space, not control) keep their character, and the other 68 become
chr(256), chr(257), ... in byte order, so that b" " is "Ġ" = chr(288) and b"\\n" is "Ċ" = chr(266).
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources

EOT = "<|endoftext|>"
EOT_ID = 50256  # the last id: GPT-2 appended <|endoftext|> after its 50,000 merges and 256 bytes

BPE_DIR = "gpt2_bpe"  # inside the `model` package (setup.py's package_data)
# sha256 of the files, as tiktoken pins them: a truncated or edited copy fails loudly, not subtly.
BPE_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# How GPT-2 splits text into pieces before BPE (merges never cross a piece): contractions, a word
# with its leading space, a number, a run of punctuation, and whitespace, keeping the last space of
# a run for the word after it. tiktoken's own copy is the same pattern written with possessive
# quantifiers (faster on long runs of spaces); use it where this tiktoken has it.
try:
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN
except ImportError:  # older tiktoken: GPT-2's original spelling
    GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def read_bpe_file(name: str) -> bytes:
    """One of the shipped files, checked against its sha256."""
    path = resources.files("model") / BPE_DIR / name
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as e:
        raise FileNotFoundError(
            f"GPT-2's tokenizer file {name} is missing from this install of the `model` package "
            f"(expected at {path}); reinstall with `pip install -e .` from a full checkout"
        ) from e
    if hashlib.sha256(data).hexdigest() != BPE_FILES[name]:
        raise ValueError(f"GPT-2's tokenizer file {path} is corrupted (its sha256 is not OpenAI's); restore it from git")
    return data


def byte_alphabet() -> dict[str, int]:
    """The files' character for each byte -> that byte (see the module docstring)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def mergeable_ranks() -> dict[bytes, int]:
    """byte string -> rank (= token id) for every token but <|endoftext|>, as tiktoken wants it.

    BPE merges the adjacent pair of lowest rank first, so a token's rank must be its merge's priority:
    the 256 single bytes first (in the alphabet's order), then merge i as 256 + i. encoder.json gives
    the ids GPT-2 was trained with; the two must agree, which is checked rather than assumed."""
    alphabet = byte_alphabet()

    def to_bytes(s: str) -> bytes:
        return bytes(alphabet[c] for c in s)

    ranks = {bytes([b]): i for i, b in enumerate(alphabet.values())}
    merges = read_bpe_file("vocab.bpe").decode("utf-8").split("\n")[1:]  # line 0: "#version: 0.2"
    for line in filter(None, merges):
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)

    ids = {to_bytes(s): i for s, i in json.loads(read_bpe_file("encoder.json")).items() if s != EOT}
    if ranks != ids:
        raise ValueError(f"{BPE_DIR}/vocab.bpe and {BPE_DIR}/encoder.json disagree: not GPT-2's files")
    return ranks


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """GPT-2's tokenizer as a `tiktoken.Encoding`: the same ids as `tiktoken.get_encoding("gpt2")`."""
    import tiktoken

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=mergeable_ranks(),
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=EOT_ID + 1,
    )


def encode(text: str) -> list[int]:
    return get_tokenizer().encode(text, allowed_special={EOT})


def decode(ids) -> str:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return get_tokenizer().decode(list(ids))
