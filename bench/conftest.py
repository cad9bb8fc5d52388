"""Fixtures of the benchmark suites (`pytest bench/ --benchmark-only`; see bench/results/README.md).

The kernel benches need CUDA and skip without it; the end-to-end benches run the PyTorch paths on
whatever device there is, at sizes that suit it (small on a CPU, smaller still with
--benchmark-disable, which CI uses to check that every bench still runs).
"""

import pytest
import torch

from bench_util import skip_without_cuda


@pytest.fixture
def cuda() -> torch.device:
    """The GPU, or a skip that says why the Triton benches do not run here."""
    return skip_without_cuda()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def timings() -> dict:
    """Median times measured in this session, keyed by (op, pass, size, implementation, ...): the
    baselines every ratio is taken against, each measured once."""
    return {}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the numbers were measured on and with, in the --benchmark-json output."""
    machine_info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
