import os

import pytest
import torch

import vlfuse  # noqa: F401  (loads the native library and registers the ops)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: set VLFUSE_SLOW=1 to run")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and os.environ.get("VLFUSE_SLOW") != "1":
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def devices():
    """CPU always; CUDA as a marked param (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
