"""GPT-2's byte-pair encoding, through tiktoken (chapter 2 of the book)."""

from __future__ import annotations

import functools
import os

EOT = "<|endoftext|>"


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = "gpt2"):
    """tiktoken's `gpt2` encoding. Its vocabulary is a download that tiktoken caches; offline, point
    TIKTOKEN_CACHE_DIR at a folder that holds it (this project's tests use ../shared/tiktoken_cache)."""
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises network errors of several kinds when it must download
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        raise RuntimeError(
            f"could not load the tiktoken '{name}' vocabulary ({type(e).__name__}: {e}). It is downloaded "
            f"on first use; offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached "
            f"files (currently TIKTOKEN_CACHE_DIR={cache})."
        ) from e


def encode(text: str) -> list[int]:
    return get_tokenizer().encode(text, allowed_special={EOT})


def decode(ids) -> str:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return get_tokenizer().decode(list(ids))
