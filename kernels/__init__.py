"""Hand-written Triton kernels for the GPT's hot ops, each a drop-in for a PyTorch op.

Reading order (each file is a lesson: math and memory traffic, kernel, launcher, autograd wrapper):
  1. bias_gelu.py        elementwise fusion: one read, one write
  2. layer_norm.py       a row reduction, and a race-free backward for dW/dB; add_layer_norm fuses in
                         the residual add before it
  3. cross_entropy.py    an online softmax over a 50,257-wide vocabulary, gradient in the same pass
  4. flash_attention.py  tiling + online softmax + causal block skipping, and the recomputing backward
  5. decode_attention.py flash-decoding: one query token against a long KV cache, split across programs

Importing `kernels` imports Triton; on a machine without CUDA, `kernels._common` switches on Triton's
interpreter first. `kernels/reference.py` is the same math in plain PyTorch.
"""

from kernels.bias_gelu import bias_gelu
from kernels.cross_entropy import cross_entropy
from kernels.decode_attention import decode_attention
from kernels.flash_attention import flash_attention
from kernels.layer_norm import add_layer_norm, layer_norm

# Each public function has the name of its file, so these imports replace the package attributes
# that point at the submodules: `kernels.layer_norm` is the function. Reach a module's other pieces
# with `from kernels.layer_norm import LayerNormFunction`.
__all__ = ["flash_attention", "layer_norm", "add_layer_norm", "bias_gelu", "cross_entropy", "decode_attention"]
