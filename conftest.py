"""Test-session setup shared by tests/ and bench/ (pytest loads this before any test module)."""

import os

# Triton's interpreter runs each tile's matmul through NumPy: tiny products for which multithreaded
# BLAS costs far more in thread hand-offs than it saves (up to 1000x on a loaded 2-core machine).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

# Off-GPU, kernels run in Triton's interpreter; the switch must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
