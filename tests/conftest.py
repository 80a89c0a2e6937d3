"""
Shared test setup.

On a machine without CUDA we run every Triton kernel in Triton's CPU interpreter, so CI checks the real
kernels, not only their PyTorch twins. The variable must be set before any @triton.jit function is
defined, hence here, before the tests import kernels/.
GPU-only tests carry @pytest.mark.gpu and are skipped where there is no GPU.

Data: most tests run from what the repository ships (assets/: the OpenStax sample and gpt2's ranks), so a fresh
clone passes with no network and no ../shared. Tests that need the larger offline data in ../shared carry
@pytest.mark.shared and are skipped, with the reason, where that folder is absent.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from device import shared_dir  # noqa: E402

SHARED = os.path.dirname(shared_dir())  # $NANOFORGE_SHARED, else ../shared beside the checkout (offline data)
HAVE_SHARED = os.path.isdir(os.path.join(SHARED, "data"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if HAVE_SHARED:  # tiktoken's cache for cl100k_base & co; without it gpt2 still loads from assets/ (tokenizer.py)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "data", "tokenizers", "tiktoken_cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: longer CPU test (end to end)")
    config.addinivalue_line("markers", "shared: needs the offline data in ../shared (skipped without it)")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_shared = pytest.mark.skip(reason=f"needs the offline data in {SHARED} (absent)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "shared" in item.keywords and not HAVE_SHARED:
            item.add_marker(no_shared)


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory):
    """Token shards (gpt2) of the OpenStax sample that ships in assets/: 20k validation tokens, then 230k train
    tokens. Shared by every test that needs real data; prepared once per test session (under a second)."""
    import prepare_fineweb
    out = str(tmp_path_factory.mktemp("data") / "openstax_gpt2")
    prepare_fineweb.main(["--local", prepare_fineweb.SAMPLE, "--out_dir", out, "--tokenizer", "gpt2",
                          "--val_tokens", "20000", "--max_tokens", "230000", "--workers", "1"])
    return out


# A model small enough that a CPU step takes milliseconds; every architectural feature of the presets is on.
TINY_TEST_MODEL = ["--n_layer=2", "--n_embd=64", "--n_head=4", "--n_kv_head=2", "--ffn_hidden=128",
                   "--block_size=64", "--batch_size=4", "--total_batch_tokens=256", "--compile=False",
                   "--log_interval=1", "--eval_iters=2", "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4"]


@pytest.fixture
def force_triton():
    """Run the Triton kernels (the interpreter on CPU) whatever NANOFORGE_KERNELS says; restore it afterwards."""
    from kernels import backend_as
    with backend_as("triton"):
        yield


def encoding_or_skip(name):
    """A tiktoken encoding, or a skip naming why: gpt2 always loads (assets/), others such as cl100k_base need
    tiktoken's cache, which ../shared provides offline."""
    from tokenizer import get_encoding
    try:
        return get_encoding(name)
    except Exception as e:
        pytest.skip(f"tokenizer {name} unavailable offline without {SHARED}: {str(e).splitlines()[0][:120]}")
