"""GPT-2 weights in Hugging Face's layout: files written here by hand, checked against a direct
computation from those very tensors; our own save/load round trip; every way a file can be wrong."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import PRESETS, GPTConfig, GPTModel
from model.weights import _config_from_hf, load_pretrained, save_pretrained

CFG = GPTConfig(vocab_size=53, context_length=12, emb_dim=24, n_heads=3, n_layers=2, qkv_bias=True, tie_weights=True)


def random_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    m = GPTModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped pair would show
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def hf_tensors(m: GPTModel, prefix: str = "") -> dict:
    """Our model's weights written the way Hugging Face's GPT2LMHeadModel stores them, by hand:
    Conv1D weights as (in, out), plus the attn.bias / attn.masked_bias buffers it saves."""
    L = m.cfg.context_length
    t = {prefix + "wte.weight": m.tok_emb.weight, prefix + "wpe.weight": m.pos_emb.weight,
         prefix + "ln_f.weight": m.final_norm.weight, prefix + "ln_f.bias": m.final_norm.bias}
    for i, blk in enumerate(m.blocks):
        h = f"{prefix}h.{i}."
        t[h + "ln_1.weight"], t[h + "ln_1.bias"] = blk.norm1.weight, blk.norm1.bias
        t[h + "attn.c_attn.weight"], t[h + "attn.c_attn.bias"] = blk.attn.qkv.weight.T, blk.attn.qkv.bias
        t[h + "attn.c_proj.weight"], t[h + "attn.c_proj.bias"] = blk.attn.out_proj.weight.T, blk.attn.out_proj.bias
        t[h + "ln_2.weight"], t[h + "ln_2.bias"] = blk.norm2.weight, blk.norm2.bias
        t[h + "mlp.c_fc.weight"], t[h + "mlp.c_fc.bias"] = blk.mlp.fc.weight.T, blk.mlp.fc.bias
        t[h + "mlp.c_proj.weight"], t[h + "mlp.c_proj.bias"] = blk.mlp.proj.weight.T, blk.mlp.proj.bias
        t[h + "attn.bias"] = torch.ones(L, L).tril().view(1, 1, L, L)
        t[h + "attn.masked_bias"] = torch.tensor(-1e4)
    return {k: v.detach().clone().contiguous() for k, v in t.items()}


def hf_config(cfg: GPTConfig, **extra) -> dict:
    return {"model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length,
            "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "resid_pdrop": 0.1, **extra}


def gpt2_logits(t: dict, idx: torch.Tensor, n_head: int, eps: float = 1e-5) -> torch.Tensor:
    """GPT-2's forward written directly on the Hugging Face tensors, in float64 (Conv1D: x @ W + b)."""
    t = {k.removeprefix("transformer."): v.double() for k, v in t.items()}
    T = idx.shape[1]

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"], eps)

    def conv1d(x, name):
        return x @ t[name + ".weight"] + t[name + ".bias"]

    x = t["wte.weight"][idx] + t["wpe.weight"][:T]
    n_layer = len({k.split(".")[1] for k in t if k.startswith("h.")})
    for i in range(n_layer):
        h = f"h.{i}."
        q, k, v = conv1d(ln(x, h + "ln_1"), h + "attn.c_attn").split(x.shape[-1], dim=-1)
        q, k, v = (z.unflatten(-1, (n_head, -1)).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(1, 2).flatten(2), h + "attn.c_proj")
        a = conv1d(ln(x, h + "ln_2"), h + "mlp.c_fc")
        a = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))  # gelu_new
        x = x + conv1d(a, h + "mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T  # the head tied to wte


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_layout_loads_and_matches_a_direct_computation(tmp_path, prefix):
    src = random_model()
    tensors = hf_tensors(src, prefix)
    idx = torch.randint(0, 53, (2, 9))
    want = gpt2_logits(tensors, idx, n_head=3)

    folder = tmp_path / "gpt2"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(CFG)))
    m = load_pretrained(folder)
    assert m.cfg == GPTConfig(**{**CFG.to_dict(), "drop_rate": 0.1})
    assert m.out_head.weight is m.tok_emb.weight
    torch.testing.assert_close(m(idx).double(), want, atol=1e-5, rtol=1e-5)

    # The bare file: the config comes from the shapes (n_heads from GPT-2's 64-wide heads, or given).
    bare = load_pretrained(folder / "model.safetensors", n_heads=3)
    assert bare.cfg == CFG
    torch.testing.assert_close(bare(idx).double(), want, atol=1e-5, rtol=1e-5)


def test_hf_file_with_lm_head_and_half_precision(tmp_path):
    src = random_model()
    tensors = hf_tensors(src, "transformer.")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()  # saved by some exporters
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / "w.safetensors"))
    m = load_pretrained(tmp_path / "w.safetensors", n_heads=3)
    assert m.cfg.tie_weights and next(m.parameters()).dtype == torch.float32
    idx = torch.randint(0, 53, (1, 12))
    want = gpt2_logits({k: v.to(torch.bfloat16) for k, v in tensors.items()}, idx, n_head=3)
    torch.testing.assert_close(m(idx).double(), want, atol=1e-4, rtol=1e-4)
    assert load_pretrained(tmp_path / "w.safetensors", n_heads=3, dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tie,qkv_bias", [(True, True), (False, False)])
def test_save_pretrained_round_trip(tmp_path, tie, qkv_bias):
    cfg = GPTConfig(**{**CFG.to_dict(), "tie_weights": tie, "qkv_bias": qkv_bias, "drop_rate": 0.2})
    m = random_model(cfg)
    save_pretrained(m, tmp_path / "ours")
    saved = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert ("lm_head.weight" in saved) == (not tie)
    assert ("h.0.attn.c_attn.bias" in saved) == qkv_bias
    torch.testing.assert_close(saved["h.1.mlp.c_fc.weight"], m.blocks[1].mlp.fc.weight.T, rtol=0, atol=0)
    hf = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (hf["n_embd"], hf["n_layer"], hf["n_head"], hf["n_positions"], hf["vocab_size"]) == (24, 2, 3, 12, 53)

    back = load_pretrained(tmp_path / "ours")
    assert back.cfg == cfg
    idx = torch.randint(0, 53, (2, 12))
    assert torch.equal(back(idx), m(idx))
    assert (back.out_head.weight is back.tok_emb.weight) == tie


def test_config_json_of_all_four_gpt2_sizes():
    sizes = {"gpt2-124M": (768, 12, 12), "gpt2-355M": (1024, 24, 16), "gpt2-774M": (1280, 36, 20),
             "gpt2-1558M": (1600, 48, 25)}
    for name, (n_embd, n_layer, n_head) in sizes.items():
        hf = {"vocab_size": 50257, "n_ctx": 1024, "n_positions": 1024, "n_embd": n_embd, "n_layer": n_layer,
              "n_head": n_head, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
              "resid_pdrop": 0.1, "n_inner": None}
        cfg, eps = _config_from_hf(hf, "config.json", {"drop_rate": 0.0})
        assert cfg == GPTConfig.from_preset(name, qkv_bias=True, tie_weights=True) and eps == 1e-5
        assert cfg.head_dim == 64 == n_embd // n_head  # what the bare-file loader assumes
    with pytest.raises(ValueError, match="n_inner"):
        _config_from_hf({**hf, "n_inner": 10}, "config.json", {})
    with pytest.raises(ValueError, match="activation_function"):
        _config_from_hf({**hf, "activation_function": "relu"}, "config.json", {})
    with pytest.raises(ValueError, match="n_head"):
        _config_from_hf({k: v for k, v in hf.items() if k != "n_head"}, "config.json", {})
    assert set(PRESETS) >= set(sizes)


def test_layer_norm_epsilon_is_honoured(tmp_path):
    src = random_model()
    tensors = hf_tensors(src)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(CFG, layer_norm_epsilon=0.5)))
    m = load_pretrained(tmp_path)
    idx = torch.randint(0, 53, (1, 5))
    torch.testing.assert_close(m(idx).double(), gpt2_logits(tensors, idx, 3, eps=0.5), atol=1e-5, rtol=1e-5)
    save_pretrained(m, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["layer_norm_epsilon"] == 0.5


def _write(folder, tensors, cfg=CFG):
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(cfg)))
    return folder


def test_bad_checkpoints_raise_errors_naming_the_key_or_file(tmp_path):
    good = hf_tensors(random_model())

    missing = {k: v for k, v in good.items() if k != "h.1.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"missing key\(s\) h\.1\.mlp\.c_fc\.bias"):
        load_pretrained(_write(tmp_path / "a", missing))

    with pytest.raises(ValueError, match=r"unexpected key\(s\) h\.0\.attn\.rotary"):
        load_pretrained(_write(tmp_path / "b", {**good, "h.0.attn.rotary": torch.zeros(2)}))

    with pytest.raises(ValueError, match=r"unexpected key\(s\) h\.2\.ln_1\.weight"):  # a layer too many
        load_pretrained(_write(tmp_path / "c", {**good, "h.2.ln_1.weight": torch.zeros(24)}))

    wrong = dict(good, **{"h.0.attn.c_attn.weight": good["h.0.attn.c_attn.weight"].T.contiguous()})  # not transposed
    with pytest.raises(ValueError, match=r"'h\.0\.attn\.c_attn\.weight' has shape \(72, 24\), expected \(24, 72\)"):
        load_pretrained(_write(tmp_path / "d", wrong))

    untied = dict(good, **{"lm_head.weight": torch.randn(53, 24)})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_pretrained(_write(tmp_path / "e", untied))

    twice = dict(good, **{"transformer.wte.weight": good["wte.weight"].clone()})
    with pytest.raises(ValueError, match="stored twice"):
        load_pretrained(_write(tmp_path / "f", twice))

    corrupt = _write(tmp_path / "g", good)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"could not read .*g/model\.safetensors"):
        load_pretrained(corrupt)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        load_pretrained(tmp_path / "junk.safetensors")

    (corrupt / "config.json").write_text("{n_embd: 24")
    with pytest.raises(ValueError, match=r"g/config\.json"):
        load_pretrained(corrupt)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/model\.safetensors"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="n_heads"):  # a bare file whose width is not 64-head friendly
        load_pretrained(_write(tmp_path / "h", good) / "model.safetensors")
