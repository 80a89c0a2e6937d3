"""
device.py — the machine a script runs on: which device, which precision, how fast its GPU can go at best, and
where its offline data is. One decision for every script (train.py, sft.py, distill.py, chat.py, eval.py).

    pick_device("auto")              -> cuda:LOCAL_RANK if there is a GPU, else cpu
    pick_dtype("auto", device)       -> bfloat16 on a GPU that has it, else float32
    autocast(device, dtype)          -> the `with` block the forward passes run under
    peak_flops(device)               -> the GPU's dense bf16 peak, what MFU divides by
    shared_dir("sft")                -> the offline data: $NANOFORGE_SHARED/data/sft, else ../shared/data/sft
"""
import os
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets: MFU divides by these.
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
                  "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def pick_device(name="auto", local_rank=0):
    """'auto' (the GPU if there is one) | 'cpu' | 'cuda' | 'cuda:N'. Asking for a GPU that is not there is an
    error, never a silent CPU run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and name.split(":")[0] != "cuda":
        raise ValueError(f"device='{name}': expected auto, cpu, cuda or cuda:N")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device='{name}' but no CUDA GPU is available here: use --device=cpu (or auto)")
    return torch.device(name if ":" in name else f"cuda:{local_rank}")


def pick_dtype(name, device, allowed=tuple(DTYPES), key="dtype"):
    """'auto' -> bfloat16 on a GPU that has it, else float32; otherwise one of `allowed`, or an error naming
    `key`. Training does not allow float16: it needs a loss scaler against underflowing gradients."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if name == "float16" and "float16" not in allowed:
        raise ValueError(f"{key}='float16': training in fp16 needs a gradient scaler, which nanoforge does not "
                         f"have; use bfloat16 (same speed on GPUs that have it) or float32")
    if name not in allowed:
        raise ValueError(f"{key}='{name}': expected auto, {', '.join(allowed)}")
    return DTYPES[name]


def autocast(device, dtype):
    """Mixed precision for the forward pass: matmuls in `dtype`, reductions and the master weights in fp32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def peak_flops(device):
    """The device's dense bf16 peak in FLOP/s, 0.0 where unknown (the CPU, an unlisted GPU: MFU is then nan)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)


def shared_dir(*parts):
    """A folder of the offline data (tokenizer caches, SFT and evaluation sets, the OpenStax text):
    $NANOFORGE_SHARED/data/..., else ../shared/data/... beside the checkout. It may not exist: the caller's error
    names the path."""
    shared = os.environ.get("NANOFORGE_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
    return os.path.join(shared, "data", *parts)
