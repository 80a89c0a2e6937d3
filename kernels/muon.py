"""
Muon: momentum, then orthogonalise the update of each weight matrix (MomentUm Orthogonalized by Newton-Schulz).
Jordan et al. (2024), kellerjordan.github.io/posts/muon; Bernstein & Newhouse (2024), "Old Optimizer, New Norm",
arXiv:2409.20325; Liu et al. (2025), "Muon is Scalable for LLM Training" (Moonlight), arXiv:2502.16982.
modded-nanogpt and nanochat train their transformer blocks' matrices with it, and AdamW for everything else.

Why orthogonalise: steepest descent under the spectral norm
-----------------------------------------------------------
A linear layer y = W x is judged by how much it can stretch an input: its spectral norm ‖W‖₂ (the largest
singular value). So ask for the step ΔW that lowers the loss most to first order, ⟨G, ΔW⟩ with G the gradient
(or its momentum), among steps of spectral norm at most η:

    argmin_{‖ΔW‖₂ ≤ η} ⟨G, ΔW⟩ = −η·U Vᵀ          where G = U S Vᵀ is the (thin) SVD of G

UVᵀ is G with every singular value set to 1, the "orthogonal part" (polar factor) of G. Reading it: SGD and Adam
steps are dominated by a few large singular directions of G (the gradient of a matrix is a sum of outer products
of a batch's activations and errors, and is nearly low rank); the orthogonalised step moves every direction G
points at by the same amount, so the rare directions learn as fast as the common ones. That is the account
given for Muon reaching a loss in fewer tokens than AdamW (modded-nanogpt: ~1.35x); bench/optim_study.py
measures it here.

The quintic Newton-Schulz iteration (no SVD on the GPU)
-------------------------------------------------------
An SVD is slow and hard to batch; an odd polynomial of a matrix is three matmuls. For X = U S Vᵀ,

    A = X Xᵀ = U S² Uᵀ,   B = b·A + c·A² = U (b S² + c S⁴) Uᵀ,   X ← a·X + B X = U (a S + b S³ + c S⁵) Vᵀ

so one step applies the scalar polynomial φ(s) = a·s + b·s³ + c·s⁵ to every singular value at once and leaves
U and V alone. Repeated, φ∘φ∘... pushes every s in (0, 1] towards 1: the iteration converges to U Vᵀ. The
coefficients (a, b, c) = (3.4445, −4.7750, 2.0315) (Jordan) are tuned for speed, not exactness: the slope at
zero is a = 3.4445, so a tiny singular value grows 3.4445x per step (5 steps: ~480x) at the price of not
converging exactly: after 5 steps the singular values land in a band around 1, about 0.7-1.2, not at 1. That
turned out not to hurt training, and 5 bf16 iterations are cheap (the test checks the band and checks φ⁵).

Three details make it work:
  * Normalise first. φ only maps [0, 1] into the band, so X₀ = G / (‖G‖_F + ε): the Frobenius norm bounds the
    spectral norm (‖G‖₂ ≤ ‖G‖_F), so every singular value of X₀ is at most 1. ε keeps a zero gradient at zero.
  * Transpose tall matrices. With X of shape m × n, A = X Xᵀ is m × m. Iterate on the wide orientation
    (m ≤ n) so that A is the small Gram matrix, then transpose back: costs 4m²n + 2m³ flops a step instead of
    4mn² + 2n³.
  * Scale by the shape. A full-rank U Vᵀ of shape rows × cols has entries of RMS 1/sqrt(max(rows, cols)); the
    update is multiplied by max(1, rows/cols)^0.5 (Jordan's choice) so that a tall matrix (rows = fan-out)
    gets entries of RMS 1/sqrt(cols) = 1/sqrt(fan-in), like a square one. Muon's lr (0.02) is therefore in
    "spectral" units, nothing like AdamW's 6e-4.

The optimizer, per 2-D parameter W with gradient g (fp32 momentum buffer m, μ = momentum, Nesterov):

    m ← μ·m + (1 − μ)·g                      the momentum (an EMA; its scale is irrelevant: X₀ is normalised)
    u ← (1 − μ)·g + μ·m                      Nesterov: look ahead along the momentum
    O ← NewtonSchulz₅(u)                      ≈ U Vᵀ of u, in bf16
    W ← W·(1 − lr·wd) − lr·max(1, rows/cols)^0.5·O      decoupled weight decay (Loshchilov & Hutter), as AdamW's

The decay is lr·wd per step with Muon's own lr: at lr 0.02 and wd 0.1 that is 0.2% a step, 33x AdamW's 6e-4·0.1
(Moonlight found decay necessary at scale; nanochat's default is none), so the study has an arm without it.

Muon is for the matrices inside the transformer blocks only. The embedding is a lookup table (one row per token,
not a linear map of a vector space), the head's rows are as many classifiers as tokens, and gains (RMSNorm) are
vectors: those go to AdamW, which this optimizer runs too (torch's fused kernel on CUDA), with its own lr.

Where the time goes, and the Triton kernels
-------------------------------------------
Per step and matrix (m ≤ n): A = X Xᵀ (2m²n flops), A² (2m³), B X (2m²n). Two of the three products are
symmetric: X Xᵀ, and A·A = A·Aᵀ because A is symmetric. A symmetric m × m result has only m(m+1)/2 distinct
entries, so `_gram_kernel` below computes only the tiles on and below the diagonal (tile row i ≥ tile column
j) and writes each one twice, at (i, j) and transposed at (j, i). The programs above the diagonal exit at once.
That does about half the flops of those two products: per step 3m²n + m³ instead of 4m²n + 2m³, e.g. 1.5x
fewer for a square matrix. The same kernel does B = c·A Aᵀ + b·A in its epilogue (the tile of A it needs for
b·A is the tile being written), so B never costs an extra pass over memory. The third product B X is not
symmetric; torch.baddbmm does it with a·X fused in (one cuBLAS call). Matrices of one shape are stacked and
orthogonalised in one batched launch (grid axis 2), which keeps a GPU busy with GPT-2's 768-wide matrices.

`gram_torch` is the twin (torch.baddbmm: the same products without the symmetry), `gram_for()` the switch
(kernels.use_triton("muon", ...)); `newton_schulz` runs either. bf16 inputs accumulate in fp32 (tl.dot), and
round once to bf16, as cuBLAS does; fp32 inputs use IEEE fp32 dot products (the tests' reference path).
Triton 3.9's CPU interpreter gets bf16 dot products wrong (as kernels/attention.py notes), so under the
interpreter bf16 tiles are widened to fp32 before the dot: exact, since a product of two bf16 numbers fits in
fp32's mantissa, and accumulated in fp32 like the GPU's tensor cores; loads, masks, mirroring and rounding are
the GPU's code.

DDP: with torch.distributed initialised, every rank holds the same averaged gradients (DDP all-reduced them)
and so the same momentum. Each rank orthogonalises 1/world of each stack of same-shape matrices and
all-gathers the results (nanochat's distributed Muon splits the work the same way), then every rank applies
every update: the state stays identical on all ranks, so rank 0's checkpoint is complete and resumes on any
number of processes.
"""
import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as adamw_functional

from kernels import HAS_TRITON, interpreting, use_triton
from parallel import local as _local, shard_like as _like  # FSDP's slices of a parameter

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.sophia import _round_to  # fp32 -> bf16 rounding to nearest even, also under the interpreter

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of φ(s) = a·s + b·s³ + c·s⁵ (Jordan)
NS_STEPS = 5
NS_EPS = 1e-7      # X₀ = G / (‖G‖_F + ε)
# The Gram kernel's tiles: (BLOCK, BLOCK_K, num_warps, num_stages). BLOCK x BLOCK is the output tile (square, so a
# tile and its mirror match), BLOCK_K the reduction chunk. On a GPU triton.autotune times these once per (M, K,
# dtype) at the first call (a few seconds, inside a run's first, compile-excluded step) and keeps the fastest; the
# first one is a usual good choice for bf16 on an H100/H200 (2 x 128 x 64 x 2 B x 3 stages = 96 KB of shared
# memory). The interpreter and the tests pass a fixed, small tile.
GPU_CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4)]

# ----------------------------------------------------------------------------------------------------------------
# The Triton kernel: out = alpha·X Xᵀ + beta·C for a stack of matrices, only the lower tiles computed
# ----------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _gram_kernel(x_ptr, c_ptr, out_ptr, M, K, alpha, beta,
                     stride_xb, stride_xm, stride_xk, stride_cb, stride_cm, stride_cn, stride_ob, stride_om,
                     stride_on, HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """Program (i, j, b): tile (i, j) of matrix b, for i >= j; it also writes the mirror tile (j, i)."""
        i, j, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if j <= i:  # tiles above the diagonal are the mirrors of tiles below it: nothing to do here
            rows_i = i * BLOCK + tl.arange(0, BLOCK)
            rows_j = j * BLOCK + tl.arange(0, BLOCK)
            ks = tl.arange(0, BLOCK_K)
            x_i = x_ptr + b * stride_xb + rows_i[:, None] * stride_xm + ks[None, :] * stride_xk
            x_j = x_ptr + b * stride_xb + rows_j[:, None] * stride_xm + ks[None, :] * stride_xk
            acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):  # acc += X[rows_i, k-chunk] · X[rows_j, k-chunk]ᵀ
                in_k = (k0 + ks)[None, :] < K
                a = tl.load(x_i, mask=(rows_i[:, None] < M) & in_k, other=0.0)
                bt = tl.load(x_j, mask=(rows_j[:, None] < M) & in_k, other=0.0)
                if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 x bf16 products are exact in fp32
                    a, bt = a.to(tl.float32), bt.to(tl.float32)
                acc = tl.dot(a, tl.trans(bt), acc, input_precision=PRECISION)
                x_i += BLOCK_K * stride_xk
                x_j += BLOCK_K * stride_xk
            acc = alpha * acc
            valid = (rows_i[:, None] < M) & (rows_j[None, :] < M)
            if HAS_C:  # C is symmetric: its tile (i, j) serves the mirror (j, i) too, transposed
                c_tile = c_ptr + b * stride_cb + rows_i[:, None] * stride_cm + rows_j[None, :] * stride_cn
                acc += beta * tl.load(c_tile, mask=valid, other=0.0).to(tl.float32)
            out = _round_to(acc, out_ptr.dtype.element_ty)
            o = out_ptr + b * stride_ob
            # element (r, s) goes to (r, s) and, mirrored, to (s, r), for r >= s only: the whole tile when i > j
            # (every row of tile i is below every row of tile j), the lower triangle of a diagonal tile. So
            # the result is exactly symmetric, and no two stores of a program touch the same element
            lower = rows_i[:, None] >= rows_j[None, :]
            tl.store(o + rows_i[:, None] * stride_om + rows_j[None, :] * stride_on, out, mask=valid & lower)
            strictly_lower = rows_i[:, None] > rows_j[None, :]
            tl.store(o + rows_j[None, :] * stride_om + rows_i[:, None] * stride_on, out,
                     mask=valid & strictly_lower)

    # the output depends only on the inputs (out is never read), so timing configs on the real call is safe
    _gram_tuned = triton.autotune([triton.Config({"BLOCK": b, "BLOCK_K": k}, num_warps=w, num_stages=s)
                                   for b, k, w, s in GPU_CONFIGS], key=["M", "K"])(_gram_kernel)


def gram_triton(x, alpha=1.0, beta=0.0, c=None, block=None, block_k=None):
    """alpha·X Xᵀ + beta·C for X of shape (B, M, K) (any strides) and symmetric C (B, M, M); output (B, M, M).
    block, block_k: a fixed tile (tests); by default autotuned on a GPU, 32 x 32 in the interpreter."""
    batch, m, k = x.shape
    out = torch.empty(batch, m, m, device=x.device, dtype=x.dtype)
    c_arg = out if c is None else c  # not read when HAS_C is False
    args = (x, c_arg, out, m, k, float(alpha), float(beta), *x.stride(), *c_arg.stride(), *out.stride())
    flags = dict(HAS_C=c is not None, PRECISION="ieee" if x.dtype == torch.float32 or interpreting() else "tf32",
                 UPCAST=interpreting() and x.dtype == torch.bfloat16)
    if block is None and not interpreting():
        _gram_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK"]), triton.cdiv(m, meta["BLOCK"]), batch)](*args, **flags)
        return out
    block, block_k = block or 32, block_k or 32
    tiles = triton.cdiv(m, block)
    _gram_kernel[(tiles, tiles, batch)](*args, BLOCK=block, BLOCK_K=block_k, **flags,
                                        num_warps=8 if block >= 128 else 4, num_stages=3)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch twin and the switch
# ----------------------------------------------------------------------------------------------------------------
def gram_torch(x, alpha=1.0, beta=0.0, c=None):
    """The same product with torch.bmm / torch.baddbmm (every tile computed)."""
    if c is None:
        out = torch.bmm(x, x.mT)
        return out if alpha == 1.0 else out.mul_(alpha)
    return torch.baddbmm(c, x, x.mT, beta=beta, alpha=alpha)


def gram_for(x):
    """The switch: gram_triton on CUDA (or forced) for x's dtype, else the twin. Asked once per Newton-Schulz
    call: every product of its iterations has x's device and dtype."""
    if use_triton("muon", x) and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return gram_triton
    return gram_torch


@torch.no_grad()
def newton_schulz(g, steps=NS_STEPS, dtype=torch.bfloat16, gram=None):
    """≈ U Vᵀ of g (a matrix, or a stack (B, rows, cols) of them), by `steps` quintic Newton-Schulz iterations
    in `dtype`. The singular values of the result lie in a band around 1 (about 0.7-1.2 after 5 steps).
    gram: gram_triton or gram_torch, when the caller has asked the switch already (else gram_for asks it)."""
    if g.ndim not in (2, 3):
        raise ValueError(f"newton_schulz: expected a matrix or a stack of matrices, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g if g.ndim == 3 else g[None]
    # ‖X₀‖₂ <= ‖X₀‖_F = 1: every singular value at most 1. Normalised in g's precision, then rounded once
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + NS_EPS)).to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide orientation: A = X Xᵀ is the smaller Gram matrix
    gram = gram or gram_for(x)
    for _ in range(steps):
        A = gram(x)                          # X Xᵀ                 (symmetric)
        B = gram(A, alpha=c, beta=b, c=A)    # c·A Aᵀ + b·A = b·A + c·A²   (symmetric, since A is)
        x = torch.baddbmm(x, B, x, beta=a)   # a·X + B X
    if tall:
        x = x.mT
    return x if g.ndim == 3 else x[0]


# ----------------------------------------------------------------------------------------------------------------
# The optimizer: Muon for the blocks' matrices, AdamW for the rest, in one torch.optim.Optimizer
# ----------------------------------------------------------------------------------------------------------------
def split_params(model):
    """(muon, adamw_decay, adamw_no_decay) of a raw GPT: the 2-D parameters inside model.blocks go to Muon;
    among the rest, model.weight_decayed (train.py's rule): decay for other matrices (an untied lm_head), none for
    the embeddings and the gains (norms)."""
    from model import weight_decayed  # here, not at the top: model.py imports kernels/
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():  # a tied head is the embedding: named once, as wte.weight
        if name.startswith("blocks.") and p.ndim == 2:
            muon.append(p)
        elif weight_decayed(name, p):
            decay.append(p)
        else:
            no_decay.append(p)
    if not muon:
        names = [n for n, _ in model.named_parameters()][:3]
        raise ValueError(f"Muon: no 2-D parameter under 'blocks.' in this model (names start {names}); pass the "
                         f"raw model, not a torch.compile / DDP wrapper")
    return muon, decay, no_decay


def _check_group(group):
    for key in ("lr", "weight_decay"):
        if not group[key] >= 0.0:
            raise ValueError(f"Muon: invalid {key} {group[key]} in a {group['kind']} group (must be >= 0)")
    if group["kind"] == "muon":
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"Muon: invalid momentum {group['momentum']} (must be in [0, 1))")
        if isinstance(group["ns_steps"], bool) or not isinstance(group["ns_steps"], int) or group["ns_steps"] < 1:
            raise ValueError(f"Muon: invalid ns_steps {group['ns_steps']!r} (a whole number of iterations, >= 1)")
    else:
        beta1, beta2 = group["betas"]
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"Muon: invalid AdamW betas {group['betas']} (each must be in [0, 1))")


def _my_rows(p, full):
    """The rows of `full` (a whole matrix) that this process holds of p: all of them, or under FSDP its slice
    (FSDP2 splits dim 0 as torch.chunk does: ceil(rows / world) rows a process, the last ones fewer or none)."""
    if not hasattr(p, "to_local"):
        return full
    rows = -(-full.shape[0] // dist.get_world_size())
    start = min(dist.get_rank() * rows, full.shape[0])
    return full[start:start + p.to_local().shape[0]]


class Muon(torch.optim.Optimizer):
    """Muon (see the top of this file) for the 2-D parameters of the transformer blocks, AdamW for the others.

    Muon(model, lr=0.02, adamw_lr=6e-4, momentum=0.95, betas=(0.9, 0.95), weight_decay=0.1) splits a raw GPT's
    parameters itself (split_params). Or pass parameter groups, each with kind='muon' or kind='adamw' (and
    optionally its own lr, weight_decay, ...). Every group keeps its own lr; group['base_lr'] records the lr it was
    built with, so a schedule can set lr = base_lr * factor(step) on every group: data, never a recompile.
    State per parameter: Muon {'momentum_buffer' (fp32)}; AdamW torch's {'step', 'exp_avg', 'exp_avg_sq'}.
    """

    def __init__(self, params, lr=0.02, adamw_lr=6e-4, momentum=0.95, betas=(0.9, 0.95), weight_decay=0.1,
                 nesterov=True, ns_steps=NS_STEPS, eps=1e-8):
        if isinstance(params, torch.nn.Module):
            muon, decay, no_decay = split_params(params)
            params = [dict(params=muon, kind="muon"), dict(params=decay, kind="adamw"),
                      dict(params=no_decay, kind="adamw", weight_decay=0.0)]
            params = [g for g in params if g["params"]]
        defaults = dict(lr=lr, adamw_lr=adamw_lr, momentum=momentum, betas=tuple(betas), weight_decay=weight_decay,
                        nesterov=nesterov, ns_steps=ns_steps, eps=eps)
        super().__init__(params, defaults)
        self.last_backend = None  # 'triton' or 'torch': who ran the Newton-Schulz products in the last step

    def add_param_group(self, param_group):
        kind = param_group.get("kind")
        if kind not in ("muon", "adamw"):
            raise ValueError(f"Muon: every parameter group needs kind='muon' or kind='adamw', got {kind!r}")
        if kind == "adamw" and "lr" not in param_group:
            param_group["lr"] = self.defaults["adamw_lr"]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.pop("adamw_lr", None)
        group.setdefault("base_lr", group["lr"])
        for i, p in enumerate(group["params"]):
            if kind == "muon" and p.ndim != 2:
                raise ValueError(f"Muon: parameter {i} of a muon group has shape {tuple(p.shape)}; Muon "
                                 f"orthogonalises matrices, so it takes 2-D parameters only: give vectors (norm "
                                 f"gains, biases) and embeddings to an adamw group")
            if not p.is_floating_point():
                raise TypeError(f"Muon: parameter {i} is {p.dtype}; parameters must be floating point")
        _check_group(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_group(group)  # a schedule may have changed lr since the last step
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
        self._adamw_step()
        self._muon_step()
        return loss

    def _adamw_step(self):
        """torch's own AdamW (functional form): fused on CUDA, its state layout, so checkpoints look familiar."""
        for group in self.param_groups:
            if group["kind"] != "adamw":
                continue
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:  # the step counter lives with the parameter, as the fused kernel wants it
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not params:
                continue
            fused = all(p.is_cuda for p in params)
            beta1, beta2 = group["betas"]
            adamw_functional(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                             [self.state[p]["exp_avg_sq"] for p in params], [],
                             [self.state[p]["step"] for p in params], fused=fused, amsgrad=False, beta1=beta1,
                             beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                             maximize=False)

    def _muon_step(self):
        """Momentum per parameter (foreach), then one Newton-Schulz per stack of same-shape matrices, then
        the update per parameter group."""
        stacks = {}  # (shape, device, ns_steps) -> [(parameter, its update u, its group)]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None] if group["kind"] == "muon" else []
            if not params:
                continue
            if hasattr(params[0], "to_local"):  # FSDP: each process holds a slice of rows (parallel.local), and
                grads = [_local(p.grad).float() for p in params]  # the momentum is elementwise, so slices do
                bufs = [_local(self.state[p].setdefault("momentum_buffer", _like(p, torch.zeros_like(
                    _local(p), dtype=torch.float32)))) for p in params]
            else:
                grads = [p.grad.float() for p in params]  # no copy for fp32 gradients
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
                        for p in params]
            mu = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1.0 - mu)                            # m ← μ·m + (1 − μ)·g
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs  # u ← (1 − μ)·g + μ·m
            for p, u in zip(params, updates):  # ... but Newton-Schulz needs the whole matrix: gather it
                u = _like(p, u).full_tensor() if hasattr(p, "to_local") else u
                stacks.setdefault((p.shape, u.device, group["ns_steps"]), []).append((p, u, group))
        if not stacks:
            return
        # the switch, asked once a step: every product of every stack runs on the same device, in bf16
        triton = use_triton("muon", *(u for members in stacks.values() for _, u, _ in members))
        self.last_backend, gram = ("triton", gram_triton) if triton else ("torch", gram_torch)
        for (shape, _, ns_steps), members in stacks.items():
            orth = self._orthogonalise(torch.stack([u for _, u, _ in members]), ns_steps, gram)
            scale = max(1.0, shape[0] / shape[1]) ** 0.5
            by_group = {}
            for (p, _, group), o in zip(members, orth.unbind(0)):
                by_group.setdefault(id(group), (group, [], []))
                by_group[id(group)][1].append(_local(p) if hasattr(p, "to_local") else p)
                by_group[id(group)][2].append(_my_rows(p, o).to(p.dtype))
            for group, params, orths in by_group.values():
                lr, wd = group["lr"], group["weight_decay"]
                if wd != 0.0:
                    torch._foreach_mul_(params, 1.0 - lr * wd)                     # decoupled weight decay
                torch._foreach_add_(params, orths, alpha=-lr * scale)              # W ← W − lr·scale·O

    def _orthogonalise(self, stack, ns_steps, gram):
        """newton_schulz of a (k, rows, cols) stack; under torch.distributed each rank does ceil(k / world) of
        the matrices (zero matrices pad the last share: they stay zero) and all ranks gather all results."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return newton_schulz(stack, ns_steps, gram=gram)
        k, rank = stack.size(0), dist.get_rank()
        share = -(-k // world)
        padded = torch.cat([stack, stack.new_zeros(share * world - k, *stack.shape[1:])])
        mine = newton_schulz(padded[rank * share:(rank + 1) * share], ns_steps, gram=gram).contiguous()
        gathered = torch.empty((share * world, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        dist.all_gather(list(gathered.chunk(world)), mine)
        return gathered[:k]

    def load_state_dict(self, state_dict):
        """torch's loader casts state to the parameter's dtype and leaves 'step' where it was saved; put the
        momentum back in fp32 and each step counter next to its parameter (the fused AdamW kernel's place)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in saved.items():
            p, state = params[index], self.state[params[index]]
            if "momentum_buffer" in entry:
                state["momentum_buffer"] = entry["momentum_buffer"].to(device=p.device, dtype=torch.float32)
            if "step" in entry:
                state["step"] = entry["step"].to(device=p.device, dtype=torch.float32)
