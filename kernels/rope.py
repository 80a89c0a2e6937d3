"""
Rotary position embedding (RoPE) in Triton, half-split convention, with its PyTorch twin.

The math. A head vector x of even size D is read as D/2 pairs (x1_i, x2_i) = (x[i], x[i + D/2]) (the
"half-split" or GPT-NeoX layout, not interleaved pairs). At position t, pair i is rotated by the angle
a(t, i) = t * theta^(-2i / D):

    out1 = x1 * cos(a) - x2 * sin(a)
    out2 = x2 * cos(a) + x1 * sin(a)

A rotation is orthogonal, so its Jacobian's transpose is its inverse: the backward pass rotates the
gradient by -a, i.e. the same formula with sin negated:

    dx1 = g1 * cos(a) + g2 * sin(a)
    dx2 = g2 * cos(a) - g1 * sin(a)

That is why one kernel serves both directions (a constexpr SIGN of +1 or -1 on sin), and why nothing but
the tables has to be saved for backward.

Shapes: q (B, T, Hq, D), k (B, T, Hkv, D) -- usually strided views cut out of one fused qkv projection, so
the last dimension is contiguous and the other strides are whatever the split left. cos, sin (T, D/2), the
tables already sliced at the current position offset (the KV cache passes cos[pos:pos + T]); fp32 is the
contract, other float dtypes are read and widened to fp32 inside the kernel. GQA means Hq != Hkv.

How the kernel is laid out, and why:
  * One program per token (b, t). It loads that position's D/2 cosines and sines once and then rotates
    every q head and every k head of the token: one launch for q and k, the tables read once per token
    rather than once per head. A program moves (Hq + Hkv) * D elements in and out -- 10 KB in bf16 for
    32 + 8 heads of 128 -- enough to keep memory busy, with 4 warps so that many tokens share an SM.
  * Heads are processed as [BLOCK_H, BLOCK_D] tiles (x1 and x2 halves loaded separately, each a contiguous
    run of D/2 elements per head), looping over head blocks when a token has many heads.
  * Inputs are read through their strides (batch, time, head; the last dimension may be any stride, Triton
    specialises the usual stride 1); outputs are new contiguous (B, T, H, D) tensors, so autograd never
    sees an input modified in place.
  * Token offsets are computed in int64: b * stride_b overflows int32 on big activations.

Wiring (kernels/__init__.py says why this pattern): the kernel is the operator nanoforge::rope, a triton_op
that torch.compile replaces by the kernel itself, called forward (inverse=False) and backward (inverse=True)
from a torch.autograd.Function.
"""
import torch

from kernels import HAS_TRITON, launcher, op, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rope_tables(head_dim, max_pos, theta, device=None):
    """cos, sin of shape (max_pos, head_dim // 2) in fp32: angle[t, i] = t * theta^(-2i / head_dim).

    Computed in fp64 and rounded once: at position 100k the angle is ~1e5 radians, and fp32 arithmetic on
    it would lose the digits that matter after the modulo 2*pi inside cos/sin."""
    if head_dim % 2:
        raise ValueError(f"rope_tables: head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


# ----------------------------------------------------------------------------------------------------------
# The PyTorch twin
# ----------------------------------------------------------------------------------------------------------
def _rotate(x, cos, sin):
    d = x.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32 math for bf16/fp16, fp64 stays fp64
    x1, x2 = x[..., :d].to(compute), x[..., d:].to(compute)
    cos, sin = cos[:, None, :].to(compute), sin[:, None, :].to(compute)  # (T, 1, D/2) broadcasts over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_torch(q, k, cos, sin):
    """q (B, T, Hq, D), k (B, T, Hkv, D); cos, sin (T, D/2) fp32. Returns rotated (q, k)."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


# ----------------------------------------------------------------------------------------------------------
# The Triton kernel
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rotate_heads(X, stride_xh, stride_xd, OUT, H, HALF, cos, sin, d, d_ok,
                      BLOCK_H: tl.constexpr):
        # X, OUT point at head 0, element 0 of one token; OUT is contiguous (H, 2*HALF)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = (h < H)[:, None] & d_ok[None, :]
            x_ptr = X + h[:, None] * stride_xh + d[None, :] * stride_xd
            x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
            o_ptr = OUT + h[:, None] * (2 * HALF) + d[None, :]
            tl.store(o_ptr, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
            tl.store(o_ptr + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, COS, SIN, T, Hq, Hkv, HALF,
                     stride_qb, stride_qt, stride_qh, stride_qd,
                     stride_kb, stride_kt, stride_kh, stride_kd,
                     stride_ct, stride_cd, stride_st, stride_sd,
                     SIGN: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)  # one (b, t) per program
        b = token // T
        t = token % T
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HALF
        cos = tl.load(COS + t * stride_ct + d * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(SIN + t * stride_st + d * stride_sd, mask=d_ok, other=0.0).to(tl.float32) * SIGN
        # outputs are contiguous (B, T, H, D): token's heads start at token * H * D
        _rotate_heads(Q + b * stride_qb + t * stride_qt, stride_qh, stride_qd, QO + token * Hq * 2 * HALF,
                      Hq, HALF, cos[None, :], sin[None, :], d, d_ok, BLOCK_HQ)
        _rotate_heads(K + b * stride_kb + t * stride_kt, stride_kh, stride_kd, KO + token * Hkv * 2 * HALF,
                      Hkv, HALF, cos[None, :], sin[None, :], d, d_ok, BLOCK_HK)


def _config(Hq, Hkv, D):
    """(BLOCK_HQ, BLOCK_HK, BLOCK_D, num_warps): head tiles of up to ~2K elements per half, i.e. all 32
    heads x 64 pairs in one step for D = 128, and 4 warps. Measured on an H200 (bench/kernels.py --sweep):
    4 warps beat 8 by 12% at 32 heads x 128 and by 28% at 12 heads x 64 (more small programs per SM keep
    more tokens' loads in flight), and 2 warps are no better."""
    BLOCK_D = triton.next_power_of_2(D // 2)
    cap = max(1, 2048 // BLOCK_D)
    BLOCK_HQ = min(triton.next_power_of_2(Hq), cap)
    BLOCK_HK = min(triton.next_power_of_2(Hkv), cap)
    return BLOCK_HQ, BLOCK_HK, BLOCK_D, 4


# ----------------------------------------------------------------------------------------------------------
# The operator (kernels/__init__.py's one wiring) and its autograd: the backward is the same operator with
# inverse=True (rotating by -a undoes the rotation by a)
# ----------------------------------------------------------------------------------------------------------
@op("rope")
def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qo = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, T, Hkv, D), dtype=k.dtype, device=k.device)
    if B * T == 0:
        return qo, ko
    BLOCK_HQ, BLOCK_HK, BLOCK_D, num_warps = _config(Hq, Hkv, D)
    launcher(_rope_kernel)[(B * T,)](
        q, k, qo, ko, cos, sin, T, Hq, Hkv, D // 2,
        *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
        SIGN=-1.0 if inverse else 1.0, BLOCK_HQ=BLOCK_HQ, BLOCK_HK=BLOCK_HK, BLOCK_D=BLOCK_D,
        num_warps=num_warps)
    return qo, ko


def _fill_missing(dq, dk, shapes):
    """A gradient autograd did not supply (an output the loss never used) is zero."""
    like = dk if dq is None else dq
    dq = torch.zeros(shapes[0], dtype=like.dtype, device=like.device) if dq is None else dq
    dk = torch.zeros(shapes[1], dtype=like.dtype, device=like.device) if dk is None else dk
    return dq, dk


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (q.shape, k.shape)
        return _rope(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _fill_missing(dq, dk, ctx.shapes)
        dq_in, dk_in = _rope(dq, dk, cos, sin, True)
        return dq_in, dk_in, None, None  # no gradient for the tables: they are constants


# ----------------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------------
def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (B, T, H, D); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, T or D")
    if D % 2:
        raise ValueError(f"apply_rope: head dim must be even, got {D}")
    if cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(f"apply_rope: cos/sin must be (T, D/2) = ({T}, {D // 2}) (slice the tables at the "
                         f"position offset); got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"apply_rope (Triton): {name} must be float32/bfloat16/float16, got {t.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"apply_rope (Triton): q is {q.dtype} but k is {k.dtype}")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError(f"apply_rope: tensors on different devices: q {q.device}, k {k.device}, "
                         f"cos {cos.device}, sin {sin.device}")


def apply_rope(q, k, cos, sin):
    """Rotate q (B, T, Hq, D) and k (B, T, Hkv, D) by the angles in cos, sin (T, D/2); returns new (q, k)."""
    if use_triton("rope", q, k, cos, sin):
        _check(q, k, cos, sin)
        return _Rope.apply(q, k, cos, sin)
    return apply_rope_torch(q, k, cos, sin)
