import pytest
import torch

from kernels import reference
from model import GPTConfig, GPTModel, PRESETS
from model.data import GPTDataset, builtin_corpus, create_dataloader, load_text, train_val_split
from model.ops import TorchOps
from model.tokenizer import decode, encode

SMALL = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2)


def test_param_counts_match_the_book():
    with torch.device("meta"):  # count without allocating 163M floats
        m = GPTModel(GPTConfig.from_preset("gpt2-124M"))
        assert m.num_params() == 163_009_536
        tied = GPTModel(GPTConfig.from_preset("gpt2-124M", tie_weights=True))
        assert tied.num_params() == 163_009_536 - 50257 * 768  # 124,412,160
        for name, (emb, layers, heads) in {
            "gpt2-355M": (1024, 24, 16), "gpt2-774M": (1280, 36, 20), "gpt2-1558M": (1600, 48, 25)
        }.items():
            cfg = PRESETS[name]
            assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length) == (emb, layers, heads, 1024)


def test_forward_shape_and_causality():
    torch.manual_seed(0)
    m = GPTModel(SMALL).eval()
    idx = torch.randint(0, 97, (3, 11))
    logits = m(idx)
    assert logits.shape == (3, 11, 97)
    # Changing a later token must not change earlier logits.
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % 97
    torch.testing.assert_close(m(idx2)[:, :7], logits[:, :7])
    assert not torch.allclose(m(idx2)[:, 7:], logits[:, 7:])


def test_bad_inputs_raise_clear_errors():
    m = GPTModel(SMALL)
    with pytest.raises(ValueError, match="context length"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        m(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, seq_len"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown model preset"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(emb_dim=30, n_heads=4)
    with pytest.raises(ValueError, match="positive"):
        GPTConfig(n_layers=0)


def test_torch_ops_match_book_math_in_float64():
    torch.manual_seed(0)
    ops = TorchOps()
    q, k, v = (torch.randn(2, 3, 9, 16, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v), reference.attention(q, k, v))
    # cache continuation: 4 queries against 9 keys, bottom-right causal
    torch.testing.assert_close(ops.attention(q[:, :, 5:], k, v), reference.attention(q[:, :, 5:], k, v))
    torch.testing.assert_close(ops.attention(q[:, :, 5:], k, v), reference.attention(q, k, v)[:, :, 5:])
    # a decode step: one query after the cache sees every key (no mask built on this path)
    torch.testing.assert_close(ops.attention(q[:, :, 8:], k, v), reference.attention(q, k, v)[:, :, 8:])
    x, w, b = torch.randn(5, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    torch.testing.assert_close(ops.layer_norm(x, w, b), reference.layer_norm(x, w, b))
    torch.testing.assert_close(ops.bias_gelu(x, b), reference.bias_gelu(x, b))
    w_fc = torch.randn(24, 24, dtype=torch.float64)  # (out, in), as nn.Linear holds it
    torch.testing.assert_close(ops.linear_gelu(x, w_fc, b), reference.bias_gelu(x @ w_fc.T, b))
    t = torch.tensor([1, -100, 3, 0, 23])
    torch.testing.assert_close(ops.cross_entropy(x, t), reference.cross_entropy(x, t))
    all_ignored = torch.full((5,), -100)
    assert reference.cross_entropy(x, all_ignored).item() == 0.0


def test_book_tokenizer_examples():
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = encode(text)
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250,
                   8812, 2114, 286, 617, 34680, 27271, 13]  # the book, chapter 2
    assert decode(ids) == text


def test_the_verdict_is_5145_tokens(shared_data):
    assert len(encode((shared_data / "the-verdict.txt").read_text(encoding="utf-8"))) == 5145


def test_sliding_window_dataset():
    ds = GPTDataset(list(range(20)), max_length=4, stride=4)
    x, y = ds[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8]
    assert len(ds) == 4  # starts 0, 4, 8, 12 (16 would need token 20)
    with pytest.raises(ValueError, match="shorter than one training window"):
        GPTDataset(list(range(4)), max_length=4, stride=1)
    dl = create_dataloader(list(range(100)), batch_size=3, max_length=8, stride=8, shuffle=False)
    xb, yb = next(iter(dl))
    assert xb.shape == yb.shape == (3, 8)
    assert torch.equal(xb[:, 1:], yb[:, :-1])
    tr, va = train_val_split(list(range(10)), 0.9)
    assert tr == list(range(9)) and va == [9]


def test_corpus_loaders(tmp_path):
    assert len(encode(builtin_corpus())) > 100_000  # the no-download default corpus
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert load_text(tmp_path) == "alpha<|endoftext|>beta"
    assert load_text(tmp_path / "a.txt") == "alpha"
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        load_text(tmp_path / "sub")
