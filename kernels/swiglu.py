"""
SwiGLU: c = silu(a) * b.

(Placeholder: the PyTorch twin only. The Triton kernel arrives with the kernels issue.)
"""
import torch.nn.functional as F

from kernels import use_triton


def swiglu_torch(a, b):
    return F.silu(a) * b


def swiglu(a, b):
    if use_triton("swiglu", a, b):
        raise NotImplementedError("Triton SwiGLU not written yet")
    return swiglu_torch(a, b)


def swiglu_packed_torch(ab):
    """ab is the fused gate/up projection [..., 2F]: gate a = ab[..., :F], up b = ab[..., F:]."""
    a, b = ab.chunk(2, dim=-1)
    return swiglu_torch(a, b)


def swiglu_packed(ab):
    if use_triton("swiglu", ab):
        raise NotImplementedError("Triton SwiGLU not written yet")
    return swiglu_packed_torch(ab)
