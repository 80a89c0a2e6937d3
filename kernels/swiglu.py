"""
SwiGLU in Triton: c = silu(a) * b, forward and backward, with its PyTorch twin.

The math (elementwise; s = sigmoid(a) = 1 / (1 + exp(-a))):

    silu(a) = a * s
    c       = silu(a) * b
    d silu / d a = s + a * s * (1 - s) = s * (1 + a * (1 - s))
    da      = dc * b * s * (1 + a * (1 - s))
    db      = dc * silu(a)

The backward recomputes s and silu(a) from a instead of saving them (or c): one exp per element is free
next to the memory traffic, and not saving c spares an F-wide activation per token. Everything is computed
in fp32 and rounded once to the output dtype.

Traffic in bf16: forward reads a, b and writes c (6 bytes/element), backward reads dc, a, b and writes da,
db (10 bytes/element). Nothing to reuse, so the only goal is to stream at copy bandwidth: big tiles, wide
loads, no wasted bytes.

The packed form. The MLP computes gate and up with one matmul into h = [a | b] of width 2F. Slicing it into
two tensors and calling .contiguous() would copy 2F columns per token; instead the kernel reads a and b as
strided views into h (row stride 2F, b starting F elements later), and the backward writes da and db
straight into the two halves of one [..., 2F] gradient, which is exactly what the matmul's backward wants.

How the kernels are laid out: a tensor is seen as rows (..., F) -> (M, F) with a row stride (a view when
the leading dims flatten, a copy otherwise; the last dimension must be contiguous or is copied). The grid
is 1-D over [BLOCK_M, BLOCK_F] tiles of ~2K elements; row offsets are int64 (M * stride passes 2^31 on big
activations). A 1-D grid avoids the 65535 limit on the second grid dimension for long (M) tensors.

Wiring (kernels/__init__.py says why this pattern): the launches are the operators nanoforge::swiglu_fwd /
_bwd and nanoforge::swiglu_packed_fwd / _bwd, triton_ops that torch.compile replaces by the kernels themselves,
called from one torch.autograd.Function.
"""
import torch
import torch.nn.functional as F

from kernels import HAS_TRITON, as_rows, launcher, op, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------
# The PyTorch twins
# ----------------------------------------------------------------------------------------------------------
def swiglu_torch(a, b):
    return F.silu(a) * b


def swiglu_packed_torch(ab):
    """ab is the fused gate/up projection [..., 2F]: gate a = ab[..., :F], up b = ab[..., F:]."""
    a, b = ab.chunk(2, dim=-1)
    return swiglu_torch(a, b)


# ----------------------------------------------------------------------------------------------------------
# The Triton kernels: one forward, one backward; the packed form only passes other pointers and strides
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tile(M, F, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        # program id -> (row block, column block); rows as int64 for the offset arithmetic
        pid = tl.program_id(0)
        n_col_blocks = tl.cdiv(F, BLOCK_F)
        rows = (pid // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % n_col_blocks) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows < M)[:, None] & (cols < F)[None, :]
        return rows.to(tl.int64)[:, None], cols[None, :], mask

    @triton.jit
    def _swiglu_fwd_kernel(A, B, C, M, F, stride_am, stride_bm, stride_cm,
                           BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        rows, cols, mask = _tile(M, F, BLOCK_M, BLOCK_F)
        a = tl.load(A + rows * stride_am + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + rows * stride_bm + cols, mask=mask, other=0.0).to(tl.float32)
        c = a * tl.sigmoid(a) * b
        tl.store(C + rows * stride_cm + cols, c.to(C.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DC, A, B, DA, DB, M, F, stride_dcm, stride_am, stride_bm, stride_dam, stride_dbm,
                           BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        rows, cols, mask = _tile(M, F, BLOCK_M, BLOCK_F)
        dc = tl.load(DC + rows * stride_dcm + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + rows * stride_am + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + rows * stride_bm + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)  # recomputed, not saved
        da = dc * b * s * (1.0 + a * (1.0 - s))
        db = dc * (a * s)
        tl.store(DA + rows * stride_dam + cols, da.to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + rows * stride_dbm + cols, db.to(DB.dtype.element_ty), mask=mask)


def _grid_config(M, F):
    """Tiles of ~2K elements, 4 warps: 16 elements per thread, two 16-byte bf16 loads per tensor per thread."""
    BLOCK_F = min(triton.next_power_of_2(F), 1024)
    BLOCK_M = min(triton.next_power_of_2(M), max(1, 2048 // BLOCK_F))
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(F, BLOCK_F),)
    return grid, dict(BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=4)


def _fwd(a2, b2, c2):
    """c2 = silu(a2) * b2 on (M, F) views with unit column stride."""
    M, F_ = a2.shape
    grid, meta = _grid_config(M, F_)
    launcher(_swiglu_fwd_kernel)[grid](a2, b2, c2, M, F_, a2.stride(0), b2.stride(0), c2.stride(0), **meta)


def _bwd(dc2, a2, b2, da2, db2):
    M, F_ = a2.shape
    grid, meta = _grid_config(M, F_)
    launcher(_swiglu_bwd_kernel)[grid](dc2, a2, b2, da2, db2, M, F_, dc2.stride(0), a2.stride(0), b2.stride(0),
                                       da2.stride(0), db2.stride(0), **meta)


# ----------------------------------------------------------------------------------------------------------
# The operators (kernels/__init__.py's one wiring) and their autograd
# ----------------------------------------------------------------------------------------------------------
@op("swiglu_fwd")
def _swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    F_ = a.shape[-1]
    c = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if c.numel() > 0:
        _fwd(as_rows(a, F_), as_rows(b, F_), c.view(-1, F_))
    return c


@op("swiglu_bwd")
def _swiglu_bwd(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    F_ = a.shape[-1]
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    if da.numel() > 0:
        _bwd(as_rows(dc, F_), as_rows(a, F_), as_rows(b, F_), da.view(-1, F_), db.view(-1, F_))
    return da, db


@op("swiglu_packed_fwd")
def _swiglu_packed_fwd(ab: torch.Tensor) -> torch.Tensor:
    F_ = ab.shape[-1] // 2
    c = torch.empty((*ab.shape[:-1], F_), dtype=ab.dtype, device=ab.device)
    if c.numel() > 0:
        ab2 = as_rows(ab, 2 * F_)
        _fwd(ab2[:, :F_], ab2[:, F_:], c.view(-1, F_))  # views: row stride 2F, no copies
    return c


@op("swiglu_packed_bwd")
def _swiglu_packed_bwd(dc: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    F_ = ab.shape[-1] // 2
    dab = torch.empty(ab.shape, dtype=ab.dtype, device=ab.device)
    if dab.numel() > 0:
        ab2, dab2 = as_rows(ab, 2 * F_), dab.view(-1, 2 * F_)
        _bwd(as_rows(dc, F_), ab2[:, :F_], ab2[:, F_:], dab2[:, :F_], dab2[:, F_:])  # da, db: the two halves
    return dab


class _SwiGLU(torch.autograd.Function):
    """Both forms: saves the inputs (a, b or ab), never c; the backward recomputes what it needs from them."""
    @staticmethod
    def forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return _swiglu_fwd(*inputs) if len(inputs) == 2 else _swiglu_packed_fwd(*inputs)

    @staticmethod
    def backward(ctx, dc):
        inputs = ctx.saved_tensors
        return _swiglu_bwd(dc, *inputs) if len(inputs) == 2 else _swiglu_packed_bwd(dc, *inputs)


# ----------------------------------------------------------------------------------------------------------
# The public functions
# ----------------------------------------------------------------------------------------------------------
def _check_dtype(**tensors):
    for name, t in tensors.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"swiglu (Triton): {name} must be float32/bfloat16/float16, got {t.dtype} "
                            f"(NANOFORGE_KERNELS=swiglu=torch runs the twin)")


def swiglu(a, b):
    """c = silu(a) * b elementwise; Triton on CUDA (see kernels/__init__.py), else the twin."""
    if use_triton("swiglu", a, b):
        _check_dtype(a=a, b=b)
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"swiglu: a and b must match in shape, dtype and device; got a {tuple(a.shape)} "
                             f"{a.dtype} {a.device}, b {tuple(b.shape)} {b.dtype} {b.device}")
        return _SwiGLU.apply(a, b)
    return swiglu_torch(a, b)


def swiglu_packed(ab):
    """silu(ab[..., :F]) * ab[..., F:] for ab of width 2F, reading both halves in place."""
    if use_triton("swiglu", ab):
        _check_dtype(ab=ab)
        if ab.dim() < 1 or ab.shape[-1] % 2:
            raise ValueError(f"swiglu_packed: last dimension must be even (2F), got shape {tuple(ab.shape)}")
        return _SwiGLU.apply(ab)
    return swiglu_packed_torch(ab)
