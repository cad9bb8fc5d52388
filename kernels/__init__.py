"""Hand-written Triton kernels for the GPT's hot ops, each a drop-in for a PyTorch op.

Reading order (each file is a lesson: math and memory traffic, kernel, launcher, autograd wrapper):
  1. bias_gelu.py        elementwise fusion: one read, one write
  2. layer_norm.py       a row reduction, and a race-free backward for dW/dB
  3. cross_entropy.py    an online softmax over a 50,257-wide vocabulary, gradient in the same pass
  4. flash_attention.py  tiling + online softmax + causal block skipping, and the recomputing backward
  5. decode_attention.py flash-decoding: one query token against a long KV cache, split across programs

Importing a kernel imports Triton; on a machine without CUDA, `kernels._common` switches on Triton's
interpreter first. `kernels.reference` is plain PyTorch and imports no Triton.
"""

import importlib

_EXPORTS = {
    "flash_attention": "flash_attention",
    "layer_norm": "layer_norm",
    "bias_gelu": "bias_gelu",
    "cross_entropy": "cross_entropy",
    "decode_attention": "decode_attention",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    # Lazy, so that `import kernels.reference` (or the PyTorch path of the model) needs no Triton.
    if name in _EXPORTS:
        module = importlib.import_module(f"kernels.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
