"""model/tokenizer.py: GPT-2's BPE from the files shipped in the package, no download, no variable."""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from model import tokenizer
from model.tokenizer import EOT, decode, encode, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Chapter 2's examples and the ids the book prints for them.
BOOK = {
    "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.":
        [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
         34680, 27271, 13],
    "Akwirw ier": [33901, 86, 343, 86, 220, 959],  # exercise 2.1: unknown words become subword pieces
}
# Cases where a tokenizer built slightly wrong would part ways with GPT-2's: contractions, runs of
# spaces and newlines (the pattern keeps a run's last space for the next word), digits, punctuation
# runs, bytes outside ASCII (a character split over several tokens), the special token mid-word.
TRICKY = [
    "", " ", "\n", "  \n\n   x", "trailing spaces   ", "I'm sure they'll've done it, 'twas you'd",
    "    def f(x):\n        return x  # indented\n", "3.14159 + 2,718 = 12345678901234567890",
    "!!!???...---***", "naïve café, 日本語のテキスト, emoji 🤖🎉, Ünïcödé", "tab\tseparated\tvalues",
    "a<|endoftext|>b", "Ġ Ċ (the files' own spellings of space and newline, as text)", "\x00\x01\x7f\x80",
]


def test_book_examples():
    for text, ids in BOOK.items():
        assert encode(text) == ids
        assert decode(ids) == text
    assert get_tokenizer().n_vocab == 50257 and get_tokenizer().eot_token == 50256
    assert encode(EOT) == [50256]


def test_round_trip_of_awkward_text():
    for text in TRICKY:
        assert decode(encode(text)) == text


def test_byte_alphabet():
    """Every byte has one character; space and newline are GPT-2's famous Ġ and Ċ."""
    alphabet = tokenizer.byte_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n") and alphabet["a"] == ord("a")


def _tiktoken_cache() -> Path | None:
    """A folder holding tiktoken's cached gpt2 files (named by the sha1 of their URL), if any: then
    tiktoken.get_encoding("gpt2") works offline and the shipped tokenizer can be held against it."""
    urls = [f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{f}" for f in tokenizer.BPE_FILES]
    for d in filter(None, (os.environ.get("TIKTOKEN_CACHE_DIR"), SHARED / "tiktoken_cache")):
        if all((Path(d) / hashlib.sha1(u.encode()).hexdigest()).is_file() for u in urls):
            return Path(d)
    return None


def test_same_as_tiktoken_gpt2(monkeypatch):
    cache = _tiktoken_cache()
    if cache is None:
        pytest.skip("no cached copy of tiktoken's gpt2 files (and no network) to compare with")
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    theirs, ours = tiktoken.get_encoding("gpt2"), get_tokenizer()
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert ours._special_tokens == theirs._special_tokens
    assert ours._pat_str == theirs._pat_str
    texts = list(BOOK) + TRICKY
    verdict = SHARED / "data" / "the-verdict.txt"
    if verdict.is_file():
        texts.append(verdict.read_text(encoding="utf-8"))
    for text in texts:
        assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")


def test_damaged_files_are_named(monkeypatch):
    monkeypatch.setitem(tokenizer.BPE_FILES, "vocab.bpe", "0" * 64)
    with pytest.raises(ValueError, match=r"vocab\.bpe is corrupted"):
        tokenizer.mergeable_ranks()
    monkeypatch.undo()
    monkeypatch.setattr(tokenizer, "BPE_DIR", "no_such_folder")
    with pytest.raises(FileNotFoundError, match="encoder.json is missing from this install"):
        tokenizer.read_bpe_file("encoder.json")


# Run in a fresh interpreter with every network connection refused, so that a download attempt
# fails instead of quietly succeeding on a machine that has network.
NO_NETWORK_SNIPPET = """
import socket
def refuse(*a, **k):
    raise OSError("network use in an offline test")
socket.socket.connect = socket.create_connection = refuse
import model.tokenizer
from model.tokenizer import decode, encode
ids = encode({text!r})
assert decode(ids) == {text!r}
print(model.tokenizer.__file__)
print(ids)
"""


def _clean_env(home: Path, pythonpath: Path) -> dict:
    """No tiktoken cache variable, and HOME, the XDG folders and the temp folder (tiktoken's default
    cache) all pointing at one empty folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    for var in ("HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "TMPDIR", "TEMP", "TMP"):
        env[var] = str(home)
    env["PYTHONPATH"] = str(pythonpath)
    return env


def _tokenize_offline(tmp_path: Path, pythonpath: Path):
    home = tmp_path / "empty_home"
    home.mkdir()
    text = next(iter(BOOK))
    res = subprocess.run([sys.executable, "-c", NO_NETWORK_SNIPPET.format(text=text)],
                         env=_clean_env(home, pythonpath), cwd=home, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    where, ids = res.stdout.strip().splitlines()
    assert Path(where).is_relative_to(pythonpath), f"imported {where}, not the copy under test"
    assert ids == str(BOOK[text])
    assert list(home.iterdir()) == [], "the tokenizer wrote a cache somewhere it should not"


def test_tokenizes_with_no_cache_anywhere(tmp_path):
    _tokenize_offline(tmp_path, ROOT)


@pytest.mark.slow
def test_installed_package_ships_the_files(tmp_path):
    """A non-editable install (a wheel, as `pip install .` builds it) carries the two files and its
    tokenizer works offline from wherever it is installed."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "model", "kernels"):  # build outside the checkout: no build/ left in it
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"cannot build a wheel here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        sizes = {i.filename: i.file_size for i in z.infolist()}
    assert sizes["model/gpt2_bpe/encoder.json"] == 1_042_301 and sizes["model/gpt2_bpe/vocab.bpe"] == 456_318
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:  # what pip install does with a pure-Python wheel: unpack it
        z.extractall(site)
    _tokenize_offline(tmp_path, site)
