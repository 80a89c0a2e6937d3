"""
RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w over the last dimension.

(Placeholder: the PyTorch twin only. The Triton kernel arrives with the kernels issue.)
"""
import torch

from kernels import use_triton


def rmsnorm_torch(x, weight, eps):
    """The twin: statistics in fp32, output in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rmsnorm(x, weight, eps=1e-5):
    if use_triton("rmsnorm", x, weight):
        raise NotImplementedError("Triton RMSNorm not written yet")
    return rmsnorm_torch(x, weight, eps)
