from pathlib import Path

import pytest
import torch

from accuracy import DEVICE

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_data():
    """../shared/data beside the checkout (the book's texts); tests that need it skip without it."""
    d = SHARED / "data"
    if not d.is_dir():
        pytest.skip("../shared/data is not present")
    return d


# The tests that run the kernels build their inputs with the default device: the CPU (kernels in
# Triton's interpreter) here and in CI, the GPU (kernels compiled) on a machine that has one.
ON_DEVICE = {"test_bias_gelu", "test_layer_norm", "test_cross_entropy", "test_flash_attention",
             "test_decode_attention", "test_fused_model", "test_generate"}


@pytest.fixture(autouse=True)
def _default_device(request):
    if request.module.__name__.rpartition(".")[2] in ON_DEVICE and DEVICE.type != "cpu":
        with torch.device(DEVICE):
            yield
    else:
        yield
