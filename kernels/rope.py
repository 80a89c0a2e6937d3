"""
Rotary position embedding (RoPE), half-split convention.

(Placeholder: the PyTorch twin only. The Triton kernel arrives with the kernels issue.)
"""
import torch

from kernels import use_triton


def rope_tables(head_dim, max_pos, theta, device=None):
    """cos, sin of shape (max_pos, head_dim // 2) in fp32: angle[t, i] = t * theta^(-2i / head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _rotate(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2) broadcasts over (B, T, H, D/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_torch(q, k, cos, sin):
    """q (B, T, Hq, D), k (B, T, Hkv, D); cos, sin (T, D/2) fp32. Returns rotated (q, k)."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def apply_rope(q, k, cos, sin):
    if use_triton("rope", q, k):
        raise NotImplementedError("Triton RoPE not written yet")
    return apply_rope_torch(q, k, cos, sin)
