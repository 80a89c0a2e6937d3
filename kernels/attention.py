"""
Causal grouped-query attention.

(Placeholder: the PyTorch twin only. The Triton flash-attention kernel arrives with the attention issue.)
"""
import torch.nn.functional as F

from kernels import use_triton


def attention_torch(q, k, v, causal=True, scale=None):
    """q (B, Hq, T, D), k and v (B, Hkv, T, D), Hq a multiple of Hkv. SDPA, no repeated K/V."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention(q, k, v, causal=True, scale=None):
    if use_triton("attention", q, k, v):
        raise NotImplementedError("Triton attention not written yet")
    return attention_torch(q, k, v, causal, scale)
