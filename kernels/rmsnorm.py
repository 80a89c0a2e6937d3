"""
RMSNorm in Triton: forward and backward, with its PyTorch twin.

The math (one row x of length N, weight w, eps > 0; all statistics in fp32):

    r      = rsqrt(mean(x^2) + eps)              "rstd", one fp32 number per row, saved for backward
    x_hat  = x * r                               the normalised row
    y      = x_hat * w

Backward, given dy = dL/dy. Write g = dy * w (the gradient reaching x_hat). Because r depends on every
element of the row, each dx_i collects a term from every y_j:

    d r / d x_i = -r^3 * x_i / N
    dx    = r * (g - x_hat * mean(g * x_hat))    (one extra row reduction: c = mean(g * x_hat))
    dw    = sum over rows of dy * x_hat          (a reduction over *rows*: every row touches all of w)

Memory traffic is the whole story: per element the forward reads x and writes y, the backward reads x and
dy and writes dx (r is one float per row, w is tiny and stays in L2). That is 10 bytes per element in
bf16 for forward + backward, and the benchmark scores us against the GPU's copy bandwidth on that count.

How the kernels are laid out, and why:
  * Forward: a program normalises a tile of BLOCK_M rows x BLOCK_N columns, BLOCK_N = next power of two
    >= N, so a whole row sits in registers and x is read exactly once. Small N get several rows per tile so
    that every program still moves a few KB (a 128-wide row alone would leave the GPU waiting on latency).
  * Backward: dw sums over all rows. Atomics would make it non-deterministic, and one program per row would
    need an (M, N) buffer of partial products. Instead the grid is *persistent*: a few programs per SM,
    each looping over rows pid, pid + G, pid + 2G, ... and keeping its own fp32 dw partial in registers.
    Each program writes one partial row of a (G, N) fp32 buffer; a small second kernel sums the G partials
    in a fixed order (each of its programs owns a strip of columns and reads the partials in [128, 32]
    tiles, so it costs a few microseconds, not G memory latencies in a row) and casts to w's dtype. Same
    inputs, same G (it depends only on the GPU and the shape) -> bitwise the same dw, every run. A
    persistent loop has one weakness: while a program reduces its current rows, it has no loads in flight.
    So it is software-pipelined by hand: each iteration first issues the loads of its *next* rows, then
    computes on the current ones.
  * Row offsets are computed in int64: row * stride overflows int32 beyond 2^31 elements.
  * Strides: the kernels take the stride between rows, so a view whose last dimension is contiguous (a
    slice of a bigger activation, a transposed batch that still flattens) is read in place. Anything else
    (last-dimension stride != 1, leading dims that do not flatten to one stride) is copied once by
    reshape/contiguous: a clear rule rather than a silent slow path inside the kernel.
  * Rows up to 65536 wide (a row must fit in registers); wider rows are refused with a clear error.

Output dtype: y is in x's dtype, except under autocast, where it is the autocast dtype (output_dtype() says
why: the consumers are matmuls that would cast it anyway, so writing bf16 directly saves traffic).

Wiring (kernels/__init__.py says why this pattern): the forward and backward are the operators
nanoforge::rmsnorm_fwd / _bwd, triton_ops that torch.compile replaces by the kernels themselves, called from
a torch.autograd.Function.

THE SECOND LESSON: fused residual add + RMSNorm. A pre-norm transformer block does, twice per layer,

    h = x + branch              (the residual stream picks up an attention or MLP output)
    y = rmsnorm(h)              (the next sub-layer's input)

Apart, that is: read x, read branch, write h; read h again, write y. Fused, one kernel reads x and branch and
writes h (the stream goes on) and y: for a bf16 stream 8 bytes per element instead of 10, and one launch
instead of two. The backward has the same shape. h's gradient arrives from two places: the norm (dy, through
the formula above) and the residual stream itself (dh, from the layers after):

    dh_total = rmsnorm_backward(dy) + dh        and   dx = dbranch = dh_total    (h = x + branch)

so the backward kernel takes dh as one more input and adds it to dx in registers: one pass instead of a
backward and a separate add. The kernels below are the plain ones with that switched on (HAS_RESIDUAL in the
forward: h is stored, then normalised as stored, i.e. rounded to its dtype, exactly like the twin; HAS_DH in
the backward). The forward saves h, not x and branch. A model would use it for every norm after the first (each
norm fusing the residual add just before it, the last block's folded into the final norm); model.py keeps the
textbook Block instead, x = x + attn(norm(x)), unless bench/e2e.py shows the fusion paying end to end.
"""
import functools
from typing import Optional

import torch

from kernels import HAS_TRITON, as_rows, interpreting, launcher, op, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_N = 65536


# ----------------------------------------------------------------------------------------------------------
# The PyTorch twin: the reference in tests, the fallback on CPU. Statistics in fp32, output in x's dtype.
# ----------------------------------------------------------------------------------------------------------
def rmsnorm_torch(x, weight, eps):
    """The twin: statistics in fp32 (fp64 for fp64 input, so it can serve as the reference), output in x's
    dtype, or in the autocast dtype under autocast (output_dtype below)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(compute)).to(output_dtype(x))


def add_rmsnorm_torch(x, residual, weight, eps):
    """The fused lesson's twin: (h, y) with h = x + residual, y = rmsnorm_torch(h)."""
    h = x + residual
    return h, rmsnorm_torch(h, weight, eps)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. HAS_RESIDUAL / HAS_DH switch on the second lesson (the fused residual add, at the end of the
# docstring); with them off, the kernels are plain RMSNorm and the compiler drops the unused branches.
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rmsnorm_fwd_kernel(X, R, H, W, Y, RSTD, M, N, stride_xm, stride_rm, stride_ym, eps,
                            HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # this program's tile: rows [pid*BLOCK_M, pid*BLOCK_M + BLOCK_M), all N columns (masked past N / M)
        eps = tl.cast(eps, tl.float32)  # inductor passes a Python float as fp64: keep the math in fp32
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)  # row * stride can pass 2^31 on big tensors

        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:  # h = x + r, stored (H is contiguous), then normalised *as stored*, like the twin
            r = tl.load(R + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = (x + r).to(H.dtype.element_ty)
            tl.store(H + rows64[:, None] * N + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        # masked lanes hold 0, so they add nothing to sum(x^2); divide by the true N
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        y = x * rstd[:, None] * w[None, :]  # same order as the twin: (x * r) * w
        tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_rows(X, DY, DH, RSTD, rows, cols, col_ok, M, stride_xm, stride_dym, stride_dhm,
                   HAS_DH: tl.constexpr):
        # x, dy (and dh) of a tile of rows (kept in their storage dtype until used), and the rows' rstd
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)  # row * stride can pass 2^31 on big tensors
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
        dh = 0.0
        if HAS_DH:
            dh = tl.load(DH + rows64[:, None] * stride_dhm + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        return x, dy, dh, rstd

    @triton.jit
    def _rmsnorm_bwd_kernel(DY, X, DH, W, RSTD, DX, DW_PARTIAL, M, N, stride_dym, stride_xm, stride_dhm, stride_dxm,
                            HAS_DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # persistent: program pid handles row tiles pid, pid + G, pid + 2G, ... (G = number of programs)
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK_M
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)  # loaded once, reused for every row
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # this program's share of dw, in registers
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        x, dy, dh, rstd = _load_rows(X, DY, DH, RSTD, rows, cols, col_ok, M, stride_xm, stride_dym, stride_dhm,
                                     HAS_DH)
        for _ in range(pid * BLOCK_M, M, step):
            # software pipelining by hand: start loading this program's next tile now, so those bytes are in
            # flight while this tile's reductions run (past the last row the loads are masked: no traffic)
            x_next, dy_next, dh_next, rstd_next = _load_rows(X, DY, DH, RSTD, rows + step, cols, col_ok, M,
                                                             stride_xm, stride_dym, stride_dhm, HAS_DH)
            x_hat = x.to(tl.float32) * rstd[:, None]
            dyf = dy.to(tl.float32)
            g = dyf * w[None, :]
            c = tl.sum(g * x_hat, axis=1) / N  # mean(g * x_hat), one per row
            dx = (g - x_hat * c[:, None]) * rstd[:, None]
            if HAS_DH:  # fused residual: h's gradient also arrives along the residual stream
                dx += dh.to(tl.float32)
            mask = (rows < M)[:, None] & col_ok[None, :]
            tl.store(DX + rows.to(tl.int64)[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty),
                     mask=mask)
            dw_acc += dyf * x_hat  # masked rows/cols are 0 * 0: no contribution
            x, dy, dh, rstd, rows = x_next, dy_next, dh_next, rstd_next, rows + step
        # one fp32 partial row per program, summed over its rows in a fixed order
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)

    @triton.jit
    def _dw_reduce_kernel(DW_PARTIAL, DW, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
        # second stage of the two-stage reduction: dw[j] = sum_p partial[p, j]. A program owns BLOCK_N columns
        # and reads the G partial rows BLOCK_G at a time, so each load is a whole [BLOCK_G, BLOCK_N] tile:
        # a loop of G single-row loads would wait out one memory latency per row (hundreds of microseconds
        # for G ~ 264, more than the backward kernel itself). The order of the additions is fixed (lane-wise
        # over the tiles, then tl.sum's tree), so dw is still bitwise reproducible.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            mask = (g < G)[:, None] & col_ok[None, :]
            acc += tl.load(DW_PARTIAL + g[:, None] * N + cols[None, :], mask=mask, other=0.0)
        tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration: fixed rules of thumb (no autotuning, so dw's reduction order never changes)
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _num_sms(device_index):
    if interpreting() or not torch.cuda.is_available():
        return 4  # the interpreter runs programs one after another: a few are enough to exercise the loop
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fwd_config(M, N):
    """(BLOCK_M, BLOCK_N, num_warps): tiles of ~4K elements, ~16 elements per thread (two 16-byte loads
    of bf16 per thread keep enough bytes in flight without spilling registers)."""
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_M = min(triton.next_power_of_2(max(M, 1)), max(1, 4096 // BLOCK_N))
    num_warps = min(32, max(1, BLOCK_M * BLOCK_N // 512))
    return BLOCK_M, BLOCK_N, num_warps


def _bwd_config(M, N, device_index):
    """(BLOCK_M, BLOCK_N, num_warps, G). Measured on an H200 (bench/kernels.py --sweep, N = 768 / 2048 / 4096,
    bf16 and fp32 x): the best configs all give a thread 16 elements of the tile and an SM 16 warps of
    resident programs, with tiles as small as a row allows (>= 2048 elements). So: tiles of max(N, 2048)
    elements, BLOCK_M * BLOCK_N / 512 warps (16 elements a thread), G = 16 / num_warps programs per SM.
    A program holds x, dy, the next tile's x and dy, w and its dw partial in registers; 16 resident warps
    leave each thread up to 128 registers, enough for those 16-element slices without spilling."""
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_M = min(triton.next_power_of_2(max(M, 1)), max(1, 2048 // BLOCK_N))
    num_warps = min(32, max(1, BLOCK_M * BLOCK_N // 512))
    per_sm = max(1, 16 // num_warps)
    G = max(1, min(per_sm * _num_sms(device_index), triton.cdiv(M, BLOCK_M)))
    return BLOCK_M, BLOCK_N, num_warps, G


# ----------------------------------------------------------------------------------------------------------
# The operators (kernels/__init__.py's one wiring): each allocates its outputs and launches the kernels
# ----------------------------------------------------------------------------------------------------------
def _forward(x, residual, weight, eps, out_dtype):
    """(h or None, y in out_dtype, rstd fp32 per row); with a residual, h = x + residual is what is normalised."""
    N = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype),
                                                  device=x.device)
    x2, weight = as_rows(x, N), weight.contiguous()
    r2 = x2 if residual is None else as_rows(residual, N)  # (not read without a residual)
    M = x2.shape[0]
    if M > 0:
        BLOCK_M, BLOCK_N, num_warps = _fwd_config(M, N)
        launcher(_rmsnorm_fwd_kernel)[(triton.cdiv(M, BLOCK_M),)](
            x2, r2, y if h is None else h, weight, y, rstd, M, N, x2.stride(0), r2.stride(0), N, eps,
            HAS_RESIDUAL=h is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    return h, y, rstd


@op("rmsnorm_fwd")
def _rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    _, y, rstd = _forward(x, None, weight, eps, out_dtype)
    return y, rstd


@op("add_rmsnorm_fwd")
def _add_rmsnorm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, residual, weight, eps, out_dtype)


@op("rmsnorm_bwd")
def _rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dh: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dw in weight's dtype); dy may have another dtype than x (autocast: bf16 dy, fp32 x).
    dh: the gradient reaching x along the residual stream (the fused add), added to dx; None: plain RMSNorm."""
    N = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    x2, dy2, weight = as_rows(x, N), as_rows(dy, N), weight.contiguous()
    dh2 = dy2 if dh is None else as_rows(dh, N)  # (not read without dh)
    M = x2.shape[0]
    if M == 0:
        return dx, dw.zero_()
    BLOCK_M, BLOCK_N, num_warps, G = _bwd_config(M, N, x.device.index)
    dw_partial = torch.empty((G, N), dtype=torch.float32, device=x.device)
    launcher(_rmsnorm_bwd_kernel)[(G,)](
        dy2, x2, dh2, weight, rstd.reshape(-1), dx, dw_partial, M, N, dy2.stride(0), x2.stride(0), dh2.stride(0),
        N, HAS_DH=dh is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    _reduce_partials(dw_partial, dw)
    return dx, dw


def _reduce_partials(dw_partial, dw):
    """dw = dw_partial.sum(0) in a fixed order, cast to dw's dtype. [128, 32] fp32 tiles: 16 KB per load, and
    32 columns = one 128-byte line of each partial row."""
    G, N = dw_partial.shape
    launcher(_dw_reduce_kernel)[(triton.cdiv(N, 32),)](dw_partial, dw, G, N, BLOCK_G=128, BLOCK_N=32, num_warps=4)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        y, rstd = _rmsnorm_fwd(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rmsnorm_bwd(dy, x, weight, rstd, None)
        return dx, dw, None, None


class _AddRMSNorm(torch.autograd.Function):
    """h = x + residual, y = rmsnorm(h). Saves h (not x and residual): the backward needs only the normalised
    row. dh, h's gradient from the rest of the residual stream, joins dx inside the backward kernel, and that
    sum is the gradient of both x and residual (d h / d x = d h / d residual = 1)."""
    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype):
        h, y, rstd = _add_rmsnorm_fwd(x, residual, weight, eps, out_dtype)
        ctx.save_for_backward(h, weight, rstd)
        ctx.dtypes = (x.dtype, residual.dtype)
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, rstd = ctx.saved_tensors  # (an output the loss never used arrives as zeros: autograd's default)
        dx, dw = _rmsnorm_bwd(dy, h, weight, rstd, dh)
        return dx.to(ctx.dtypes[0]), dx.to(ctx.dtypes[1]), dw, None, None


# ----------------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------------
def _check(x, weight):
    """Refuse what the kernel does not do, in words, before anything is launched."""
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"rmsnorm (Triton): x and weight must be float32/bfloat16/float16, "
                        f"got x {x.dtype}, weight {weight.dtype} (NANOFORGE_KERNELS=rmsnorm=torch runs the twin)")
    if x.dim() < 1 or x.shape[-1] == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rmsnorm: weight must be 1-D of size x.shape[-1] > 0; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"rmsnorm: x on {x.device} but weight on {weight.device}")
    if x.shape[-1] > MAX_N:
        raise ValueError(f"rmsnorm (Triton): rows of {x.shape[-1]} > {MAX_N} do not fit one tile; "
                         f"use NANOFORGE_KERNELS=rmsnorm=torch")


def output_dtype(x):
    """x's dtype, except under autocast: then the autocast dtype (bf16 / fp16).

    Under autocast the residual stream is fp32 and every consumer of a norm's output is a matmul that autocast
    casts to bf16 anyway. Writing y in bf16 straight from the kernel gives the same numbers (one rounding of
    the same fp32 value) with half the write traffic and no separate cast kernel (read 4 + write 2 bytes per
    element, again in the backward for dy). Both implementations follow this rule, so they stay twins."""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype  # (other device types: 'meta' has no autocast state to ask)


def rmsnorm(x, weight, eps=1e-5):
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight; Triton on CUDA (see kernels/__init__.py), else the twin.
    y is in x's dtype, or in the autocast dtype under autocast (see output_dtype)."""
    if use_triton("rmsnorm", x, weight):
        _check(x, weight)
        return _RMSNorm.apply(x, weight, float(eps), output_dtype(x))
    return rmsnorm_torch(x, weight, eps)


def add_rmsnorm(x, residual, weight, eps=1e-5):
    """(h, y): h = x + residual (in their promoted dtype) and y = rmsnorm(h, weight, eps), in one pass over
    memory: the second lesson of this file (see the docstring). y's dtype follows rmsnorm's rule."""
    if use_triton("rmsnorm", x, residual, weight):
        _check(x, weight)
        if residual.shape != x.shape or residual.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"add_rmsnorm: residual must be float32/bfloat16/float16 of x's shape "
                             f"{tuple(x.shape)}; got {tuple(residual.shape)} {residual.dtype}")
        return _AddRMSNorm.apply(x, residual, weight, float(eps), output_dtype(x))
    return add_rmsnorm_torch(x, residual, weight, eps)
