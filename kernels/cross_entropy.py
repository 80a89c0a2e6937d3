"""
The language-model head and its loss in one op: cross-entropy of h @ W^T, without the (tokens x vocab) logits.

The math. h is (N, d): the final hidden state of N tokens; W is (V, d): the head (the embedding, when tied);
t is (N,): the target ids, -1 where a token does not count (SFT masks its prompts this way).

    z_n    = h_n W^T                                   the logits of token n, V numbers
    lse_n  = log sum_v exp(z_nv) = m_n + log sum_v exp(z_nv - m_n),   m_n = max_v z_nv  (no overflow)
    loss_n = lse_n - z_n,t_n                           = -log softmax(z_n)[t_n]
    L      = (1 / n) sum over counted n of loss_n      n = the number of counted tokens

and, because d lse_n / d z_nv = softmax(z_n)_v = p_nv:

    dL/dz_nv = (p_nv - [v == t_n]) / n                 (0 on a row that does not count)
    dL/dh    = dZ W           (N, d)                   dL/dW = dZ^T h     (V, d)

Why a fused op. V is large: 100,352 (cl100k, padded) or 128,256 (Llama 3). At N = 16,384 tokens a micro-batch,
the plain path (F.linear, .float(), F.cross_entropy) keeps the bf16 logits, their fp32 copy, and in the backward an
fp32 gradient of the same size: 16384 x 100352 x (2 + 4 + 4) bytes = 16 GB for one matrix product. None of it
is needed at once:

  * Chunks. Rows are independent, so the N tokens are processed C at a time (C x V logits at a time): the
    memory is C/N of the plain path's, and the matmuls stay large enough (C ~ 1-2K rows) to run at full speed.
  * Online log-sum-exp. A row of logits is read in blocks, with a running max m and a running sum s of
    exp(z - m), rescaled whenever the max grows: m' = max(m, max(block)), s' = s e^(m - m') + sum e^(z - m').
    One read gives lse; a second read writes p - onehot over the logits.
  * The gradient in the forward. The loss is the last operation of the model, so dL/dz is known the moment lse
    is: the upstream gradient is one number g (1, or 1/grad_accum), applied later. So each chunk's logits are
    overwritten in place by dZ, then dh_chunk = dZ W and dW += dZ^T h_chunk, and the chunk's memory is reused by
    the next one. What the backward does is a scale: dh *= g, dW *= g. (mgmalek/efficient_cross_entropy and
    Liger-Kernel do this; Apple's Cut Cross-Entropy instead recomputes the logits in the backward, one more
    N d V matmul: 8 N d V FLOPs instead of 6, and slower whenever cuBLAS runs the matmuls at full speed.)

The cost is then the three matmuls (6 N d V FLOPs, cuBLAS), the Triton kernel below (it reads each logit twice and
writes it once), and one read + write of the fp32 dW accumulator per chunk (V d 8 bytes): bigger chunks mean
fewer of those, at C V 2 bytes of memory. CHUNK_BYTES sets that trade (bench/kernels.py --cross_entropy measures).

Precision: the logits are the matmul's output in the compute dtype (bf16 under autocast), as in the plain path; the
log-sum-exp and the loss are fp32. dZ is stored in the compute dtype (the plain path rounds it there too, before its
own matmuls). dh_chunk is one matmul over all of V (fp32 inside cuBLAS, rounded once). dW sums over every chunk, so
it accumulates in an fp32 buffer and is rounded once, at the end, to W's dtype; when W is fp32 (train.py: fp32
weights under bf16 autocast) that buffer *is* W's gradient. For bf16 weights it costs V d 4 bytes beside the
gradient itself.

Semantics as in F.cross_entropy(ignore_index=-1): the mean is over counted tokens, counted on the GPU (no
.item(), so no host sync); with no counted token the loss is 0/0 = nan and the gradients are 0. Padded vocabulary
rows are ordinary rows of W: they take part in the softmax and receive gradient, as in the plain path. A target
outside [0, V) (other than -1) gives a nan loss rather than a read out of bounds: checking it on the host would
need a sync, and the shard loader already checks every token id.

torch.compile: the op is one torch.library.custom_op (nanoforge::linear_cross_entropy) with a fake (shape-only)
implementation and a registered backward; the backward's scale is a second custom op that scales the saved
gradients in place (nanoforge::linear_cross_entropy_scale_), so no (V, d) copy is made at the start of the
backward, the moment of peak memory in a training step. The custom op is opaque: inductor runs the chunk loop as
written (logits overwritten in place, dW accumulated in place) instead of functionalising those writes into copies.
Its host cost (tens of microseconds) is once per step, next to milliseconds of matmuls. Eager calls use the same op.
"""
import torch
import torch.nn.functional as F

from kernels import HAS_TRITON, interpreting, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK_BYTES = 256 * 2**20  # logits of one chunk, C x V in the compute dtype (bench/results/cross_entropy.md)
BLOCK_V = 4096             # logits per step of the kernel's loop over a row (16 per thread at 8 warps)
NUM_WARPS = 8


# ----------------------------------------------------------------------------------------------------------
# The PyTorch twin: today's path, and the reference in tests
# ----------------------------------------------------------------------------------------------------------
def linear_cross_entropy_torch(h, weight, targets, ignore_index=-1):
    """F.cross_entropy(h @ W^T) with the logits in fp32 (in bf16 the sum over 100k exponentials loses too much
    precision); materialises the (N, V) logits. fp64 inputs stay fp64, so it also serves as the reference."""
    logits = F.linear(h, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------------------
# The Triton kernel: one program per row of a chunk's logits -> loss, and dZ written over the logits
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _ce_rows_kernel(Z, TARGETS, LOSS, INV_N, V, stride_z, ignore_index,
                        BLOCK: tl.constexpr, GRAD: tl.constexpr):
        row = tl.program_id(0)
        z_row = Z + row.to(tl.int64) * stride_z  # int64: row * V passes 2^31 in big chunks
        t = tl.load(TARGETS + row).to(tl.int32)
        counted = t != ignore_index
        cols = tl.arange(0, BLOCK)

        # pass 1: online log-sum-exp over the row, BLOCK logits at a time (fp32 statistics)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            z = tl.load(z_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)

        # the target's logit: one load (masked off for ignored rows and for targets out of range -> nan loss)
        in_range = (t >= 0) & (t < V)
        z_t = tl.load(z_row + t, mask=counted & in_range, other=0.0).to(tl.float32)
        loss = tl.where(in_range, lse - z_t, float("nan"))
        tl.store(LOSS + row, tl.where(counted, loss, 0.0))

        if GRAD:
            # pass 2: dZ = (softmax - onehot) / n over the logits, in place; rows that do not count get zeros
            scale = tl.where(counted, tl.load(INV_N), 0.0)
            for start in range(0, V, BLOCK):
                c = start + cols
                z = tl.load(z_row + c, mask=c < V, other=0.0).to(tl.float32)
                p = tl.exp(z - lse)
                dz = tl.where(c == t, p - 1.0, p) * scale
                tl.store(z_row + c, dz.to(Z.dtype.element_ty), mask=c < V)


def _rows(logits, targets, loss_rows, inv_n, ignore_index, grad):
    """Launch the kernel over one chunk: loss_rows gets each row's loss; with grad, logits become dZ."""
    V = logits.shape[1]
    block = min(BLOCK_V if not interpreting() else 128, triton.next_power_of_2(V))  # the CPU interpreter: small
    _ce_rows_kernel[(logits.shape[0],)](logits, targets, loss_rows, inv_n, V, logits.stride(0), ignore_index,
                                        BLOCK=block, GRAD=grad, num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------------------------------------
# The chunk loop: logits (cuBLAS) -> kernel -> dh, dW (cuBLAS), C rows at a time
# ----------------------------------------------------------------------------------------------------------
def chunk_rows(V, compute_dtype):
    """Rows per chunk: as many as CHUNK_BYTES of logits hold, in multiples of 64 (the matmuls' tiles)."""
    rows = CHUNK_BYTES // (V * torch.empty((), dtype=compute_dtype).element_size())
    return max(64, rows // 64 * 64)


def _accumulate_dw(acc, dz_t, h_chunk, first):
    """acc (fp32) += dZ^T h_chunk, the product summed in fp32 and added without rounding to bf16 between chunks.
    The first chunk overwrites acc (beta = 0: acc is not read, so it needs no zeros first)."""
    beta = 0.0 if first else 1.0
    if acc.dtype == dz_t.dtype:
        acc.addmm_(dz_t, h_chunk, beta=beta)
    elif acc.is_cuda:  # cuBLAS: bf16/fp16 operands, fp32 accumulator read and written in place
        torch.addmm(acc, dz_t, h_chunk, beta=beta, out_dtype=torch.float32, out=acc)
    else:  # the CPU has no mixed-dtype matmul; fp32 operands hold bf16/fp16 values exactly
        acc.addmm_(dz_t.float(), h_chunk.float(), beta=beta)


def _forward(h, weight, targets, ignore_index, compute_dtype, grad, rows):
    """(loss, dh, dW): the mean loss and, with grad, its gradients for h and W (before the upstream scale)."""
    N, d = h.shape
    V = weight.shape[0]
    w = weight.to(compute_dtype)  # no copy unless autocast runs an fp32 W in bf16 (then freed on return)
    n = (targets != ignore_index).sum()
    inv_n = 1.0 / n.clamp_min(1).float()  # no counted token: gradients 0 (and the loss 0/0 = nan, below)
    loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
    logits = torch.empty((min(rows, N), V), dtype=compute_dtype, device=h.device)
    if grad:
        dh = torch.empty_like(h)
        acc = torch.empty((V, d), dtype=torch.float32, device=h.device)
    for start in range(0, N, rows):
        end = min(start + rows, N)
        h_chunk, z = h[start:end].to(compute_dtype), logits[:end - start]
        torch.mm(h_chunk, w.t(), out=z)
        _rows(z, targets[start:end], loss_rows[start:end], inv_n, ignore_index, grad)
        if grad:  # z now holds dZ
            if dh.dtype == compute_dtype:
                torch.mm(z, w, out=dh[start:end])
            else:
                dh[start:end] = z @ w
            _accumulate_dw(acc, z.t(), h_chunk, first=start == 0)
        del z  # (a view of the chunk buffer: it must go for the buffer to be freed below)
    loss = loss_rows.sum() / n
    if not grad:
        return loss, h.new_empty(0), weight.new_empty(0)
    del logits, w  # freed before the cast of acc allocates the (V, d) gradient in W's dtype
    return loss, dh, acc.to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Custom ops (what torch.compile sees) and their autograd
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("nanoforge::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          compute_dtype: torch.dtype, grad: bool,
                          rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen already (compute_dtype)
        return _forward(h, weight, targets, ignore_index, compute_dtype, grad, rows)


@_linear_cross_entropy.register_fake
def _(h, weight, targets, ignore_index, compute_dtype, grad, rows):
    loss = torch.empty((), dtype=torch.float32, device=h.device)
    if not grad:
        return loss, h.new_empty(0), weight.new_empty(0)
    return loss, torch.empty_like(h), torch.empty_like(weight)


@torch.library.custom_op("nanoforge::linear_cross_entropy_scale_", mutates_args=("dh", "dw"))
def _scale_(dh: torch.Tensor, dw: torch.Tensor, g: torch.Tensor) -> None:
    dh.mul_(g.to(dh.dtype))
    dw.mul_(g.to(dw.dtype))


@_scale_.register_fake
def _(dh, dw, g):
    return None


def _setup_context(ctx, inputs, output):
    _loss, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.mark_non_differentiable(dh, dw)
    ctx.backward_done = False


def _backward(ctx, g, _ddh, _ddw):
    if ctx.backward_done:  # the saved gradients were scaled in place: a second backward would scale them twice
        raise RuntimeError("linear_cross_entropy: backward ran twice through the same loss (retain_graph); "
                           "compute the loss again instead")
    ctx.backward_done = True
    dh, dw = ctx.saved_tensors
    _scale_(dh, dw, g)
    return dh, dw, None, None, None, None, None


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------------
def _check(h, weight, targets):
    """Refuse what the op does not do, in words, before anything is launched."""
    for name, t in (("h", h), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"linear_cross_entropy (Triton): {name} must be float32/bfloat16/float16, got {t.dtype} "
                            f"(NANOFORGE_KERNELS=cross_entropy=torch runs the twin)")
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight must be (vocab, d) with d = h.shape[-1]; got h "
                         f"{tuple(h.shape)}, weight {tuple(weight.shape)}")
    if targets.shape != h.shape[:-1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be int64/int32 of shape h.shape[:-1] = "
                         f"{tuple(h.shape[:-1])}; got {tuple(targets.shape)} {targets.dtype}")
    if not (h.device == weight.device == targets.device):
        raise ValueError(f"linear_cross_entropy: h on {h.device}, weight on {weight.device}, targets on "
                         f"{targets.device}")


def linear_cross_entropy(h, weight, targets, ignore_index=-1, rows=None):
    """Mean cross-entropy of the logits h @ weight^T against targets (ignore_index does not count), as
    linear_cross_entropy_torch computes it, without keeping the (N, V) logits: Triton + cuBLAS on CUDA (see
    kernels/__init__.py), the twin elsewhere. h (..., d), weight (V, d), targets (...). rows: tokens per chunk
    (default: chunk_rows(), from CHUNK_BYTES). Returns an fp32 scalar. Under autocast the matmuls run in the
    autocast dtype, as F.linear would."""
    if not use_triton("cross_entropy", h, weight, targets):
        return linear_cross_entropy_torch(h, weight, targets, ignore_index)
    _check(h, weight, targets)
    device = h.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    if not torch.is_autocast_enabled(device) and weight.dtype != h.dtype:
        raise TypeError(f"linear_cross_entropy: h is {h.dtype} but weight is {weight.dtype} (outside autocast "
                        f"they must match, as for F.linear)")
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    loss, _dh, _dw = _linear_cross_entropy(h2, weight, t2, int(ignore_index), compute_dtype, grad,
                                           int(rows or chunk_rows(weight.shape[0], compute_dtype)))
    return loss
