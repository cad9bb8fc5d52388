"""Hand-written Triton kernels for the GPT's hot ops, each a drop-in for a PyTorch op.

Reading order (each file is a lesson: math and memory traffic, kernel, launcher, autograd wrapper):
  1. bias_gelu.py        elementwise fusion: one read, one write
  2. layer_norm.py       a row reduction, and a race-free backward for dW/dB; add_layer_norm fuses in
                         the residual add before it
  3. cross_entropy.py    an online softmax over a 50,257-wide vocabulary, gradient in the same pass
  4. flash_attention.py  tiling + online softmax + causal block skipping, and the recomputing backward
  5. decode_attention.py flash-decoding: one query token against a long KV cache, split across programs

Import each op from its lesson: `from kernels.layer_norm import layer_norm`. This package imports
nothing itself, so `kernels.layer_norm` is always the module, never a function of the same name, and
importing one lesson does not import (and compile) the others. On a machine without CUDA,
`kernels._common` switches on Triton's interpreter before any kernel is defined.
`kernels/reference.py` is the same math in plain PyTorch.
"""
