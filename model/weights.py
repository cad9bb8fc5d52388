"""GPT-2 weights in Hugging Face's layout: load OpenAI's checkpoints, save (and reload) our own.

A Hugging Face GPT-2 checkpoint is a folder with `config.json` and `model.safetensors`. Its tensor
names and ours, per block i (the `transformer.` prefix is optional):

    wte.weight                  (V, C)    tok_emb.weight
    wpe.weight                  (L, C)    pos_emb.weight
    h.i.ln_1.{weight,bias}      (C,)      blocks.i.norm1.{weight,bias}
    h.i.attn.c_attn.weight      (C, 3C)   blocks.i.attn.qkv.weight      (3C, C)  transposed
    h.i.attn.c_attn.bias        (3C,)     blocks.i.attn.qkv.bias
    h.i.attn.c_proj.weight      (C, C)    blocks.i.attn.out_proj.weight          transposed
    h.i.attn.c_proj.bias        (C,)      blocks.i.attn.out_proj.bias
    h.i.ln_2.{weight,bias}      (C,)      blocks.i.norm2.{weight,bias}
    h.i.mlp.c_fc.weight         (C, 4C)   blocks.i.mlp.fc.weight        (4C, C)  transposed
    h.i.mlp.c_fc.bias           (4C,)     blocks.i.mlp.fc.bias
    h.i.mlp.c_proj.weight       (4C, C)   blocks.i.mlp.proj.weight      (C, 4C)  transposed
    h.i.mlp.c_proj.bias         (C,)      blocks.i.mlp.proj.bias
    ln_f.{weight,bias}          (C,)      final_norm.{weight,bias}
    lm_head.weight              (V, C)    out_head.weight   (GPT-2 ties it to wte; often absent)

The transposes: GPT-2 was written with a `Conv1D` module that stores its weight as (in, out), the
transpose of `nn.Linear`'s (out, in). The q, k, v order inside c_attn is the same as ours.
`h.i.attn.bias` / `h.i.attn.masked_bias` are the causal-mask buffers of Hugging Face's module, not
weights: they are skipped. Anything else unknown, missing or mis-shaped is an error that names it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from model.gpt import GPTConfig, GPTModel, LayerNorm

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def _hf_names(n_layers: int, qkv_bias: bool) -> dict[str, tuple[str, bool]]:
    """HF name -> (our parameter name, stored transposed?) for every weight of the body."""
    names = {"wte.weight": ("tok_emb.weight", False), "wpe.weight": ("pos_emb.weight", False),
             "ln_f.weight": ("final_norm.weight", False), "ln_f.bias": ("final_norm.bias", False)}
    for i in range(n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        for hf, ours, transposed in [
            ("ln_1.weight", "norm1.weight", False), ("ln_1.bias", "norm1.bias", False),
            ("attn.c_attn.weight", "attn.qkv.weight", True), ("attn.c_attn.bias", "attn.qkv.bias", False),
            ("attn.c_proj.weight", "attn.out_proj.weight", True), ("attn.c_proj.bias", "attn.out_proj.bias", False),
            ("ln_2.weight", "norm2.weight", False), ("ln_2.bias", "norm2.bias", False),
            ("mlp.c_fc.weight", "mlp.fc.weight", True), ("mlp.c_fc.bias", "mlp.fc.bias", False),
            ("mlp.c_proj.weight", "mlp.proj.weight", True), ("mlp.c_proj.bias", "mlp.proj.bias", False),
        ]:
            if hf == "attn.c_attn.bias" and not qkv_bias:
                continue
            names[h + hf] = (b + ours, transposed)
    return names


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"no weights file at {file}")
    try:
        raw = load_file(str(file))
    except Exception as e:  # safetensors raises several kinds on a truncated or foreign file
        raise ValueError(f"could not read {file} as a safetensors file: {e}") from e
    tensors = {}
    for key, t in raw.items():
        name = key.removeprefix("transformer.")
        if name in tensors:
            raise ValueError(f"{file}: {name!r} is stored twice (with and without the 'transformer.' prefix)")
        tensors[name] = t
    return tensors


def _read_config(folder: Path) -> dict | None:
    file = folder / CONFIG_NAME
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"could not parse {file} as JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _config_from_hf(hf: dict, source: Path, overrides: dict):
    def field(*names, default=None):
        for n in names:
            if hf.get(n) is not None:
                return hf[n]
        if default is None:
            raise ValueError(f"{source}: config has no {' / '.join(names)} field")
        return default

    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{source}: activation_function {act!r} is not supported (GPT-2's tanh GELU is 'gelu_new')")
    emb = field("n_embd")
    if hf.get("n_inner") not in (None, 4 * emb):
        raise ValueError(f"{source}: n_inner={hf['n_inner']} is not supported (the MLP is 4 * n_embd wide)")
    cfg = dict(
        vocab_size=field("vocab_size"),
        context_length=field("n_positions", "n_ctx"),
        emb_dim=emb,
        n_heads=field("n_head"),
        n_layers=field("n_layer"),
        drop_rate=field("resid_pdrop", default=0.0),
        qkv_bias=bool(hf.get("qkv_bias", True)),  # our extension: GPT-2 itself always has one
        tie_weights=bool(hf.get("tie_word_embeddings", True)),
    )
    cfg.update(overrides)
    return GPTConfig(**cfg), float(field("layer_norm_epsilon", default=1e-5))


def _config_from_shapes(tensors: dict, source: Path, overrides: dict):
    """Without config.json: everything but the head count shows in the shapes; GPT-2 uses 64-wide heads."""
    for key in ("wte.weight", "wpe.weight"):
        if key not in tensors:
            raise ValueError(f"{source}: missing key {key!r} (needed to infer the model's shape)")
    vocab, emb = tensors["wte.weight"].shape
    n_layers = len({int(m.group(1)) for k in tensors if (m := re.match(r"h\.(\d+)\.", k))})
    if "n_heads" not in overrides and emb % 64:
        raise ValueError(f"{source}: cannot infer n_heads for n_embd={emb}; pass n_heads=... or add a config.json")
    head = tensors.get("lm_head.weight")
    cfg = dict(
        vocab_size=vocab, context_length=tensors["wpe.weight"].shape[0], emb_dim=emb,
        n_heads=emb // 64, n_layers=n_layers, drop_rate=0.0,
        qkv_bias="h.0.attn.c_attn.bias" in tensors,
        tie_weights=head is None or torch.equal(head, tensors["wte.weight"]),
    )
    cfg.update(overrides)
    return GPTConfig(**cfg), 1e-5


def load_pretrained(path, *, device=None, dtype=None, fused: bool = False, **overrides):
    """A GPTModel from a Hugging Face GPT-2 folder (config.json + model.safetensors) or a bare
    .safetensors file (config inferred from shapes, n_heads = n_embd / 64 as in every GPT-2).
    `overrides` replace GPTConfig fields (e.g. drop_rate=0.0). Weights are copied in as `dtype`
    (default float32) onto `device` (default CPU)."""
    path = Path(path)
    if path.is_dir():
        file, hf = path / WEIGHTS_NAME, _read_config(path)
    elif path.exists():
        file, hf = path, None
    else:
        raise FileNotFoundError(f"no checkpoint at {path} (expected a folder with {WEIGHTS_NAME} or a .safetensors file)")
    tensors = _read_tensors(file)
    if hf is not None:
        cfg, eps = _config_from_hf(hf, path / CONFIG_NAME, overrides)
    else:
        cfg, eps = _config_from_shapes(tensors, file, overrides)

    names = _hf_names(cfg.n_layers, cfg.qkv_bias)
    if not cfg.tie_weights:
        names["lm_head.weight"] = ("out_head.weight", False)
    elif "lm_head.weight" in tensors:
        # A tied checkpoint may store the head too; it must then be wte itself, or we'd drop weights.
        if not torch.equal(tensors["lm_head.weight"], tensors.get("wte.weight", torch.empty(0))):
            raise ValueError(f"{file}: 'lm_head.weight' differs from 'wte.weight' but the config ties them")
        tensors.pop("lm_head.weight")
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(names) if not _BUFFERS.match(k))
    if missing:
        raise ValueError(f"{file}: missing key(s) {', '.join(missing)}")
    if unexpected:
        raise ValueError(f"{file}: unexpected key(s) {', '.join(unexpected)}")

    with torch.device("meta"):
        model = GPTModel(cfg)  # shapes only; real storage comes with the weights below
    model = model.to_empty(device=device or "cpu").to(dtype or torch.float32)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight  # leaving the meta device may untie them: tie again
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for hf_name, (ours, transposed) in names.items():
            t = tensors[hf_name]
            p = params[ours]
            want = tuple(p.shape[::-1]) if transposed else tuple(p.shape)
            if tuple(t.shape) != want:
                raise ValueError(f"{file}: {hf_name!r} has shape {tuple(t.shape)}, expected {want}")
            p.copy_(t.t() if transposed else t)
    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.eps = eps  # GPTConfig has no eps field: 1e-5 unless the checkpoint says otherwise
    model.use_fused_kernels(fused)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def save_pretrained(model, folder) -> Path:
    """Write `model` as config.json + model.safetensors in Hugging Face's GPT-2 layout (an untied
    head as lm_head.weight). Returns the folder."""
    from safetensors.torch import save_file

    cfg = model.cfg
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    names = _hf_names(cfg.n_layers, cfg.qkv_bias)
    if not cfg.tie_weights:
        names["lm_head.weight"] = ("out_head.weight", False)
    tensors = {}
    for hf_name, (ours, transposed) in names.items():
        t = params[ours].detach()
        tensors[hf_name] = (t.t() if transposed else t).contiguous().cpu()
    hf = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": model.final_norm.eps,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "tie_word_embeddings": cfg.tie_weights,
        "qkv_bias": cfg.qkv_bias,  # not a Hugging Face field: GPT-2 always has the bias
        "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


# ----------------------------------------------------------------------------------------------
# Any checkpoint this project reads: where fine-tuning (and generation) starts from
# ----------------------------------------------------------------------------------------------
TRAIN_CHECKPOINT = "checkpoint.pt"  # what scripts/train.py writes into its run folder


def load_training_checkpoint(path, *, fused: bool = False) -> GPTModel:
    """A GPTModel from a `scripts/train.py` checkpoint.pt (its "model" state and "model_config")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    from model.engine.run_files import load_checkpoint  # weights_only; one line for a damaged file

    ckpt = load_checkpoint(path)
    config = ckpt.get("model_config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is not a training checkpoint: expected a dict with 'model' and 'model_config' "
                         f"(or a folder with {CONFIG_NAME} + {WEIGHTS_NAME}, or a .safetensors file)")
    try:
        cfg = GPTConfig(**config)
    except TypeError as e:
        raise ValueError(f"{path}: its model_config does not fit this GPTConfig: {e}") from e
    model = GPTModel(cfg)
    # torch.compile / DistributedDataParallel wrappers prefix the names; the weights are the same.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit its model_config: {str(e).splitlines()[0]}") from e
    return model.use_fused_kernels(fused).eval()


def load_model(path, *, fused: bool = False) -> GPTModel:
    """A float32 GPTModel on the CPU from any checkpoint kind this project reads:

    - a `scripts/train.py` run folder, or the checkpoint.pt in it;
    - a folder written by `save_pretrained` (config.json + model.safetensors), or a Hugging Face
      GPT-2 folder of any size (gpt2, gpt2-medium, -large, -xl);
    - a bare .safetensors file in GPT-2's layout (config inferred from the shapes).
    """
    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file():
        if (path / TRAIN_CHECKPOINT).is_file():
            return load_training_checkpoint(path / TRAIN_CHECKPOINT, fused=fused)
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} (a saved model) nor {TRAIN_CHECKPOINT} "
                                "(a scripts/train.py run)")
    if path.is_dir() or path.suffix == ".safetensors":
        return load_pretrained(path, fused=fused)
    return load_training_checkpoint(path, fused=fused)
