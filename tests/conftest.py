"""
Shared test setup.

On a machine without CUDA we run every Triton kernel in Triton's CPU interpreter, so CI checks the real
kernels, not only their PyTorch twins. The variable must be set before any @triton.jit function is
defined, hence here, before the tests import kernels/.
GPU-only tests carry @pytest.mark.gpu and are skipped where there is no GPU.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")  # ../shared beside the checkout (tests' offline data)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "data", "tokenizers", "tiktoken_cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: longer CPU test (end to end)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
