"""
Sophia (SophiaG): a light second-order optimizer. Per coordinate it keeps a momentum m and a diagonal curvature
estimate h (both fp32, whatever the parameter dtype), and takes a Newton-like step m/h that is clipped, so a
bad curvature estimate costs at most one learning rate.
Liu, Li, Hall, Liang, Ma (2023), "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv:2305.14342; official code: github.com/Liuhong99/Sophia (sophia.py, train_sophiag.py).

The update, every step, with g = p.grad and bs = the tokens of the step (see below):

    p ← p·(1 − lr·wd)                                   decoupled weight decay, as in AdamW
    m ← β1·m + (1 − β1)·g
    p ← p − lr·clip(m / (ρ·bs·h + ε), −1, 1)            = p − lr·sign(m)·min(|m| / (ρ·bs·h + ε), 1)

and every k = hess_interval steps (10 in the paper), right after a backward pass of the estimator loss below,
`update_hessian()` does

    h ← β2·h + (1 − β2)·ĝ⊙ĝ                             ĝ = p.grad at that moment

Reading the step: where the curvature is large, |m|/(ρ·bs·h) < 1 and the step is lr·m/(ρ·bs·h), a Newton step
with the "Hessian" ρ·bs·h. Where the curvature is tiny (flat, or not yet estimated: h = 0 at the start), the
ratio saturates and the step is lr·sign(m), the Lion/signSGD step. So the first steps are sign-momentum steps of
exactly ±lr, and no coordinate ever moves more than lr (plus weight decay). ε > 0 keeps 0/0 out (default 1e-12
as in the paper; the official code adds 1e-15). There is no bias correction, hence no step count in the math.
bf16/fp16 parameters: the math is fp32 and the new p is rounded once per step (the official code instead does
two in-place bf16 operations); m and h are always fp32.

Where ĝ comes from: the Gauss-Newton-Bartlett (GNB) estimator, the "G" of SophiaG
------------------------------------------------------------------------------------
For cross entropy on logits f, the Hessian of the loss in f is S = diag(q) − q·qᵀ with q = softmax(f), and
Bartlett's identity gives S = E_{ŷ~q}[∇_f CE(f, ŷ) ∇_f CE(f, ŷ)ᵀ]: the outer product of gradients of the loss
on labels *sampled from the model's own softmax*. So the Gauss-Newton matrix JᵀSJ is the expected outer product
of parameter gradients with sampled labels, and its diagonal is estimated by squaring such a gradient. Over a
batch of B tokens (paper, Algorithm 2):

    L̂(θ) = (1/B)·Σ_b CE(f(θ, x_b), ŷ_b),   ŷ_b ~ softmax(f(θ, x_b))         the mean over the B tokens
    ĥ    = B·∇L̂ ⊙ ∇L̂                                                       B: ∇L̂ is a mean of B terms

Scale conventions (those of the official code: h holds ĝ⊙ĝ, the factor B is applied in the step):
  * ĝ is the gradient of the MEAN sampled-label cross entropy over the B tokens the estimator saw, computed like
    an ordinary gradient (DDP averaging the ranks). There is no factor B in the loss. The official loop also
    clips ĝ by global norm (1.0), as it clips g.
  * h therefore holds EMA(∇L̂⊙∇L̂) = EMA(ĥ)/B, and the factor B is applied in the step as ρ·bs·h, with
    bs = B = the number of tokens ĝ averaged over: NOT the tokens of the optimizer step if the estimator sees fewer.
    Why: with sampled labels E[∇CE] = 0, so E[ĝ⊙ĝ] = (per-token Gauss-Newton diagonal) / B, and only bs = B
    turns bs·h back into the curvature of the mean loss, whatever B is (tests/test_sophia.py checks this).
  * Who runs the estimator: give SophiaG an `estimator(step) -> B` callable and it refreshes h itself every
    hess_interval steps, inside step(), and uses the B it returned as bs (kept in the param groups, so a
    checkpoint keeps it; with SFT masks B varies, and each step uses the last refresh's). train.py's estimator
    takes the step's first micro-batch on every rank: B = batch_size · block_size · world (trained tokens only,
    for SFT). Before 2026-12-01 train.py passed bs = tokens per optimizer step, grad_accum times more: ρ was
    effectively ρ·grad_accum (the H100 study ran that way; bench/results/sophia_study_h100/README.md).
  * lr is the step size of the clipped update (the official README: it corresponds to ρ·η_t of the paper), in
    practice about the learning rate one would give AdamW.
`sampled_label_loss(logits)` at the bottom is the estimator's loss; the estimator does its backward pass.

The "win rate" (official train loop's train/win_rate): the share of coordinates whose step was NOT clipped,
|m| < ρ·bs·h. The README's advice is to tune ρ so that it stays in 0.1-0.5. The Triton step counts them per tile
for free (the values are in registers anyway); `win_rate()` sums the counts on the device, no sync until .item().

Memory layout: a pointer table, not one flat parameter buffer
-----------------------------------------------------------
The parameters belong to the model (DDP registered them, torch.compile traced them) and the gradients are fresh
tensors after every zero_grad(set_to_none=True), so we may not move either into a buffer of ours. The state is
ours: all parameters of one (device, dtype) form a bucket whose m and h live in two flat fp32 buffers (each
parameter's slice starting 16-byte aligned); self.state[p] holds views into them, so torch's state_dict sees
ordinary per-parameter tensors. The kernel is ONE launch per bucket, one program per tile of TILE elements of one
parameter. A tile finds its parameter through tables: the addresses of p and p.grad (re-sent every step since the
gradients move; address 0 = no gradient, skip it), its numel, its state offset, its group, whose row of
hyperparameters (lr, wd, β1, β2, ρ·bs, ε) is a tiny fp32 tensor sent every step: the learning-rate schedule is
data, never a recompile, and parameter groups with different lr/wd share the launch. Loads are vectorised when
every address is 16-byte aligned (the usual case; DDP's gradient bucket views may not be, then a slower variant).
"""
import array
import math

import torch
import torch.nn.functional as F

from kernels import HAS_TRITON, use_triton
from parallel import local as _local, shard_like as _like  # FSDP's slices of a parameter

if HAS_TRITON:
    import triton
    import triton.language as tl

TILE = 4096  # elements per Triton program: 16 per thread with 8 warps, four 16-byte loads per array for fp32

# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _locate_tile(tile_tensor, tile_start, addresses, numels, state_offsets,
                     DTYPE: tl.constexpr, ALIGNED: tl.constexpr, TILE: tl.constexpr):
        """This program's tile: which parameter t, where its elements start, and the pointers to p, g and state."""
        tile = tl.program_id(0)
        t = tl.load(tile_tensor + tile)
        start = tl.multiple_of(tl.load(tile_start + tile), TILE)  # tiles start on multiples of TILE
        grad_address = tl.load(addresses + 2 * t + 1)            # 0 when the parameter has no gradient
        p_base = tl.load(addresses + 2 * t).to(tl.pointer_type(DTYPE))
        g_base = grad_address.to(tl.pointer_type(DTYPE))
        state = tl.multiple_of(tl.load(state_offsets + t), 4)     # slices start 16-byte aligned (4 floats)
        if ALIGNED:  # tell the compiler so it can use 16-byte vector loads
            p_base = tl.multiple_of(p_base, 16)
            g_base = tl.multiple_of(g_base, 16)
        numel = tl.load(numels + t)
        return t, start, grad_address, p_base, g_base, state, numel

    @triton.jit
    def _round_to(x, DTYPE: tl.constexpr):
        """fp32 -> DTYPE, rounding to nearest even. bf16 is done in the bits: Triton's CPU interpreter truncates
        that conversion (and flushes subnormals) where the GPU rounds; this way both store what torch would."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16      # add half an ulp (ties to even), cut
            rounded = tl.where(x != x, 0x7FC0, rounded)                # NaN stays (a quiet) NaN
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)

    @triton.jit
    def _sophia_tile(p_ptrs, g_ptrs, m_ptrs, h_ptrs, valid, lr, wd, beta1, rho_bs, eps, MASKED: tl.constexpr):
        """The update on one tile, fp32 math; returns how many coordinates were not clipped."""
        if MASKED:  # the last, partial tile of a parameter
            p = tl.load(p_ptrs, mask=valid, other=0.0).to(tl.float32)
            g = tl.load(g_ptrs, mask=valid, other=0.0).to(tl.float32)
            m = tl.load(m_ptrs, mask=valid, other=0.0)
            h = tl.load(h_ptrs, mask=valid, other=0.0)
        else:       # full tiles need no mask, so nothing stops vectorised loads
            p = tl.load(p_ptrs).to(tl.float32)
            g = tl.load(g_ptrs).to(tl.float32)
            m = tl.load(m_ptrs)
            h = tl.load(h_ptrs)
        m = beta1 * m + (1.0 - beta1) * g
        curvature = rho_bs * h
        ratio = tl.math.div_rn(m, curvature + eps)                      # IEEE division, as torch's
        ratio = tl.where(ratio > 1.0, 1.0, tl.where(ratio < -1.0, -1.0, ratio))  # clip; NaN passes through
        p = p * (1.0 - lr * wd) - lr * ratio
        if MASKED:
            tl.store(p_ptrs, _round_to(p, p_ptrs.dtype.element_ty), mask=valid)
            tl.store(m_ptrs, m, mask=valid)
        else:
            tl.store(p_ptrs, _round_to(p, p_ptrs.dtype.element_ty))
            tl.store(m_ptrs, m)
        # masked lanes hold m = h = 0, and 0 < 0 is false: they count nothing
        return tl.sum((tl.abs(m) < curvature).to(tl.int32), axis=0)

    @triton.jit
    def _sophia_step_kernel(tile_tensor, tile_start, addresses, numels, state_offsets, tensor_group, hyper,
                            exp_avg, hessian, unclipped,
                            DTYPE: tl.constexpr, ALIGNED: tl.constexpr, TILE: tl.constexpr):
        t, start, grad_address, p_base, g_base, state, numel = _locate_tile(
            tile_tensor, tile_start, addresses, numels, state_offsets, DTYPE, ALIGNED, TILE)
        count = tl.full((), 0, tl.int32)
        if grad_address != 0:
            row = hyper + tl.load(tensor_group + t) * 6  # a group's row: lr, wd, beta1, beta2, rho*bs, eps
            lr, wd, beta1 = tl.load(row), tl.load(row + 1), tl.load(row + 2)
            rho_bs, eps = tl.load(row + 4), tl.load(row + 5)
            offs = tl.arange(0, TILE)
            p_ptrs = p_base + start + offs
            g_ptrs = g_base + start + offs
            m_ptrs = exp_avg + state + start + offs
            h_ptrs = hessian + state + start + offs
            if start + TILE <= numel:
                count = _sophia_tile(p_ptrs, g_ptrs, m_ptrs, h_ptrs, None, lr, wd, beta1, rho_bs, eps, False)
            else:
                valid = start + offs < numel
                count = _sophia_tile(p_ptrs, g_ptrs, m_ptrs, h_ptrs, valid, lr, wd, beta1, rho_bs, eps, True)
        tl.store(unclipped + tl.program_id(0), count)

    @triton.jit
    def _hessian_ema_kernel(tile_tensor, tile_start, addresses, numels, state_offsets, tensor_group, hyper,
                            hessian, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, TILE: tl.constexpr):
        t, start, grad_address, p_base, g_base, state, numel = _locate_tile(
            tile_tensor, tile_start, addresses, numels, state_offsets, DTYPE, ALIGNED, TILE)
        if grad_address != 0:
            beta2 = tl.load(hyper + tl.load(tensor_group + t) * 6 + 3)
            offs = tl.arange(0, TILE)
            g_ptrs = g_base + start + offs
            h_ptrs = hessian + state + start + offs
            if start + TILE <= numel:
                g = tl.load(g_ptrs).to(tl.float32)
                tl.store(h_ptrs, beta2 * tl.load(h_ptrs) + (1.0 - beta2) * g * g)
            else:
                valid = start + offs < numel
                g = tl.load(g_ptrs, mask=valid, other=0.0).to(tl.float32)
                h = tl.load(h_ptrs, mask=valid, other=0.0)
                tl.store(h_ptrs, beta2 * h + (1.0 - beta2) * g * g, mask=valid)


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch twin: the same two updates on lists of tensors (one parameter group), fp32 math
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sophia_step_torch(params, grads, exp_avgs, hessians, *, lr, weight_decay, beta1, rho_bs, eps):
    """One SophiaG step on lists of tensors; exp_avgs/hessians are fp32. Returns the count of unclipped coordinates."""
    low_precision = params[0].dtype != torch.float32
    p32 = [p.float() for p in params] if low_precision else list(params)  # copies for bf16/fp16: one rounding
    g32 = [g.float() for g in grads]
    torch._foreach_mul_(p32, 1.0 - lr * weight_decay)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, g32, alpha=1.0 - beta1)
    curvature = torch._foreach_mul(hessians, rho_bs)
    ratio = torch._foreach_div(exp_avgs, torch._foreach_add(curvature, eps))
    torch._foreach_clamp_min_(ratio, -1.0)
    torch._foreach_clamp_max_(ratio, 1.0)
    torch._foreach_add_(p32, ratio, alpha=-lr)
    if low_precision:
        torch._foreach_copy_(params, p32)
    return sum((m.abs() < c).sum() for m, c in zip(exp_avgs, curvature))


@torch.no_grad()
def hessian_ema_torch(hessians, grads, *, beta2):
    """h ← β2·h + (1 − β2)·ĝ⊙ĝ on lists of tensors (fp32 h)."""
    g32 = [g.float() for g in grads]
    torch._foreach_mul_(hessians, beta2)
    torch._foreach_addcmul_(hessians, g32, g32, value=1.0 - beta2)


# ----------------------------------------------------------------------------------------------------------------
# A bucket: the parameters of one (device, dtype), their flat state and the tables the kernels read
# ----------------------------------------------------------------------------------------------------------------
def _to_device(host, device):
    """A small host tensor -> device without stalling the host: pinned memory and an asynchronous copy (the
    caching host allocator does not reuse the pinned block before the copy has run)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.clone().to(device)


class _Bucket:
    """The parameters of one (device, dtype): their state in two flat fp32 buffers, and the kernels' tables."""

    def __init__(self, params, groups, state, tile):
        self.params, self.groups, self.tile, self.state = params, groups, tile, state
        self.local = [_local(p) for p in params]  # what the kernels address: this process's elements
        self.device, self.dtype = self.local[0].device, params[0].dtype
        self.numel_list = [p.numel() for p in self.local]
        padded = [-(-n // 4) * 4 for n in self.numel_list]            # keep every slice 16-byte aligned
        offsets = [sum(padded[:i]) for i in range(len(padded))]
        self.exp_avg = torch.zeros(sum(padded), dtype=torch.float32, device=self.device)
        self.hessian = torch.zeros_like(self.exp_avg)
        for p, local, off, n in zip(params, self.local, offsets, self.numel_list):
            old = state.get(p, {})
            m, h = self.exp_avg[off:off + n].view(local.shape), self.hessian[off:off + n].view(local.shape)
            for key, view in (("exp_avg", m), ("hessian", h)):
                if key in old:  # keep what a checkpoint (or an earlier layout) held
                    view.copy_(_local(old[key]))
            state[p] = {"exp_avg": _like(p, m), "hessian": _like(p, h)}
        # tile i covers elements [tile_start[i], tile_start[i] + tile) of parameter tile_tensor[i]
        tiles = torch.tensor([-(-n // tile) for n in self.numel_list])
        tile_tensor = torch.repeat_interleave(torch.arange(len(params)), tiles)
        first_tile = torch.cumsum(tiles, 0) - tiles
        tile_start = (torch.arange(len(tile_tensor)) - first_tile[tile_tensor]) * tile
        self.n_tiles = len(tile_tensor)
        self.tile_tensor = tile_tensor.to(torch.int32).to(self.device)
        self.tile_start = tile_start.to(torch.int64).to(self.device)
        self.numels = torch.tensor(self.numel_list, dtype=torch.int64, device=self.device)
        self.state_offsets = torch.tensor(offsets, dtype=torch.int64, device=self.device)
        self.tensor_group = torch.tensor(groups, dtype=torch.int32, device=self.device)
        self.params_contiguous = all(p.is_contiguous() for p in self.local)
        self.unclipped_tiles = torch.zeros(self.n_tiles, dtype=torch.int32, device=self.device)
        self.unclipped, self.stepped = None, 0  # the last step's count of unclipped coordinates, and of all

    def gradients(self):
        """Every parameter's gradient, None where there is none (that parameter is skipped). Torch's .grad
        setter already guarantees the shape and the device; the dtype it lets through with grad_dtype=None."""
        grads = [None if p.grad is None else _local(p.grad) for p in self.params]
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError("SophiaG does not support sparse gradients")
            if g is not None and g.dtype is not self.dtype:
                raise TypeError(f"SophiaG: a {g.dtype} gradient does not match its {self.dtype} parameter")
        return grads

    def launch(self, kernel, grads, hyper_rows, *buffers):
        """One launch over every tile of the bucket; the per-step tables travel as two tiny async copies."""
        addresses = array.array("q")
        for p, g in zip(self.local, grads):
            if g is not None and not g.is_contiguous():
                raise ValueError("SophiaG's Triton step needs contiguous gradients; use "
                                 "NANOFORGE_KERNELS=auto,sophia=torch for this model")
            addresses.append(p.data_ptr())
            addresses.append(0 if g is None else g.data_ptr())
        if not self.params_contiguous:
            raise ValueError("SophiaG's Triton step needs contiguous parameters; make them contiguous or use "
                             "NANOFORGE_KERNELS=auto,sophia=torch")
        aligned = all(a % 16 == 0 for a in addresses)
        table = _to_device(torch.frombuffer(addresses, dtype=torch.int64), self.device)
        hyper = _to_device(torch.tensor(hyper_rows, dtype=torch.float32), self.device)
        kernel[(self.n_tiles,)](self.tile_tensor, self.tile_start, table, self.numels, self.state_offsets,
                                self.tensor_group, hyper, *buffers, DTYPE=_TL_DTYPE[self.dtype], ALIGNED=aligned,
                                TILE=self.tile, num_warps=8 if self.tile >= 2048 else 4)

    def per_group(self, grads):
        """(group index, [(p, g, m, h) ...]) for the parameters of this bucket that have a gradient."""
        by_group = {}
        for p, local, g, gi in zip(self.params, self.local, grads, self.groups):
            if g is not None:
                by_group.setdefault(gi, []).append((local, g, _local(self.state[p]["exp_avg"]),
                                                    _local(self.state[p]["hessian"])))
        return by_group.items()


# ----------------------------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------------------------
def _check_group(group):
    lr, (beta1, beta2), rho = group["lr"], group["betas"], group["rho"]
    wd, eps = group["weight_decay"], group["eps"]
    if not lr >= 0.0:
        raise ValueError(f"SophiaG: invalid learning rate {lr} (must be >= 0)")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"SophiaG: invalid betas {group['betas']} (each must be in [0, 1))")
    if not rho >= 0.0:
        raise ValueError(f"SophiaG: invalid rho {rho} (must be >= 0)")
    if not wd >= 0.0:
        raise ValueError(f"SophiaG: invalid weight_decay {wd} (must be >= 0)")
    if not eps > 0.0:
        raise ValueError(f"SophiaG: invalid eps {eps} (must be > 0, it keeps 0/0 out of m/(rho*bs*h + eps))")


class SophiaG(torch.optim.Optimizer):
    """SophiaG with fp32 state and one fused Triton launch per (device, dtype) for the step and for the Hessian EMA.

    Defaults are the official GPT-2 small (125M) settings: lr 6e-4, rho 0.05, weight decay 0.2, betas (0.965, 0.99).
    Two ways to drive it: `estimator=` (a callable step -> tokens, doing the backward of `sampled_label_loss`) and
    plain `step()`, the refresh happens inside; or by hand, `step(bs=tokens the estimate saw)` and
    `update_hessian()` after a backward pass of `sampled_label_loss`, every k steps. `win_rate()` for the log.
    `tile` (elements per Triton program, a power of two >= 16) is for tests.
    """

    def __init__(self, params, lr=6e-4, betas=(0.965, 0.99), rho=0.05, weight_decay=0.2, eps=1e-12, *, tile=TILE,
                 hess_interval=10, estimator=None):
        if tile < 16 or tile & (tile - 1):
            raise ValueError(f"SophiaG: tile must be a power of two >= 16, got {tile}")
        if hess_interval < 1:
            raise ValueError(f"SophiaG: hess_interval must be >= 1, got {hess_interval}")
        self.tile, self.hess_interval, self.estimator = tile, hess_interval, estimator
        # bs (tokens the curvature estimate averaged over) and steps (taken so far) live in the param groups, so
        # the optimizer's state_dict, hence a checkpoint, carries them
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
                                      bs=1.0, steps=0))
        self.last_backend = None  # 'triton' or 'torch', for the log

    def __getstate__(self):  # pickle / deepcopy: keep the tile; the layout is rebuilt from the state
        return {**super().__getstate__(), "tile": self.tile, "hess_interval": self.hess_interval,
                "estimator": self.estimator}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._buckets, self.last_backend = None, None

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"SophiaG keeps fp32 state and does fp32 math: parameters must be float32, "
                                f"bfloat16 or float16, not {p.dtype}")
        _check_group(group)
        self._buckets = None  # the layout is rebuilt (state kept) on the next step

    def _layout(self):
        if self._buckets is None:
            keyed = {}
            for gi, group in enumerate(self.param_groups):
                for p in group["params"]:
                    keyed.setdefault((p.device, p.dtype), []).append((p, gi))
            self._buckets = [_Bucket([p for p, _ in members], [gi for _, gi in members], self.state, self.tile)
                             for members in keyed.values()]
        return self._buckets

    def _hyper_rows(self, bs):
        rows = []
        for group in self.param_groups:
            _check_group(group)  # the schedule may have changed lr since the last step
            beta1, beta2 = group["betas"]
            rows.append([group["lr"], group["weight_decay"], beta1, beta2, group["rho"] * bs, group["eps"]])
        return rows

    @torch.no_grad()
    def step(self, closure=None, *, bs=None):
        """One update, then, with an estimator, the curvature refresh when due (every hess_interval steps).
        bs: the number of tokens the estimator's loss averaged over (the docstring's B). By hand, as in the
        official code, pass it here; with an estimator, leave it None: the count the last refresh returned is used."""
        if bs is None and self.estimator is None:
            raise TypeError("SophiaG.step() needs bs= (the tokens the curvature estimate averaged over) when it has "
                            "no estimator to count them")
        bs = self.param_groups[0]["bs"] if bs is None else bs
        if isinstance(bs, bool) or not isinstance(bs, (int, float)) or not (bs > 0 and math.isfinite(bs)):
            raise ValueError(f"SophiaG.step: bs must be the positive number of tokens in the step, got {bs!r}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = self._hyper_rows(bs)
        for bucket in self._layout():
            grads = bucket.gradients()
            self.last_backend = "triton" if use_triton("sophia", bucket.exp_avg) else "torch"
            if self.last_backend == "triton":
                bucket.launch(_sophia_step_kernel, grads, rows, bucket.exp_avg, bucket.hessian,
                              bucket.unclipped_tiles)
                bucket.unclipped = bucket.unclipped_tiles
            else:
                bucket.unclipped = torch.zeros((), dtype=torch.int64, device=bucket.device)
                for gi, items in bucket.per_group(grads):
                    lr, wd, beta1, _, rho_bs, eps = rows[gi]
                    p, g, m, h = (list(x) for x in zip(*items))
                    bucket.unclipped += sophia_step_torch(p, g, m, h, lr=lr, weight_decay=wd, beta1=beta1,
                                                          rho_bs=rho_bs, eps=eps)
            bucket.stepped = sum(n for n, g in zip(bucket.numel_list, grads) if g is not None)
        for group in self.param_groups:
            group["steps"] += 1
        if self.estimator is not None and self.param_groups[0]["steps"] % self.hess_interval == 0:
            self.refresh_hessian(self.param_groups[0]["steps"] - 1)
        return loss

    def refresh_hessian(self, step):
        """Sophia's extra work, behind its own step() so a training loop needs no Sophia-specific code: clear the
        training gradients, let the estimator run its backward (it returns how many tokens ĝ averaged over), fold
        ĝ⊙ĝ into h and remember that count as bs for the next steps. `step`: the 0-based step just taken (the
        estimator seeds its sampled labels with it, so a resumed run draws the same ones)."""
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            tokens = self.estimator(step)
        self.update_hessian()
        self.zero_grad(set_to_none=True)
        for group in self.param_groups:
            group["bs"] = float(tokens)

    @torch.no_grad()
    def update_hessian(self):
        """h ← β2·h + (1 − β2)·p.grad², for every parameter with a gradient (the estimator's ĝ, see the top)."""
        rows = self._hyper_rows(0.0)
        for bucket in self._layout():
            grads = bucket.gradients()
            if use_triton("sophia", bucket.exp_avg):
                bucket.launch(_hessian_ema_kernel, grads, rows, bucket.hessian)
            else:
                for gi, items in bucket.per_group(grads):
                    _, g, _, h = (list(x) for x in zip(*items))
                    hessian_ema_torch(h, g, beta2=rows[gi][3])

    def win_rate(self):
        """Share of coordinates NOT clipped in the last step (|m| < rho*bs*h): a 0-dim device tensor (nan before
        the first step). Official advice: tune rho to keep it in 0.1-0.5."""
        done = [b for b in (self._buckets or []) if b.unclipped is not None]
        if not done:
            return torch.tensor(float("nan"))
        device = done[0].device
        unclipped = sum(b.unclipped.sum().to(device) for b in done)
        return unclipped.double() / max(1, sum(b.stepped for b in done))

    def log_stats(self):
        """Numbers for a training log, read at log points only (this syncs with the device)."""
        return {"win_rate": float(self.win_rate())}

    def load_state_dict(self, state_dict):
        """torch's loader casts state to the parameter dtype (bf16 would lose the fp32 m and h): restore fp32."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint from before bs/steps were kept in the groups
            group.setdefault("bs", 1.0)
            group.setdefault("steps", 0)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in saved.items():
            p = params[index]
            for key in ("exp_avg", "hessian"):
                if key in entry:
                    self.state[p][key] = entry[key].to(device=p.device, dtype=torch.float32)
        self._buckets = None  # next use copies the loaded state into fresh flat buffers


# ----------------------------------------------------------------------------------------------------------------
# The estimator's loss, for train.py's Hessian micro-steps
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_labels_from_logits(logits, generator=None):
    """One label per position drawn from softmax(logits) in fp32: logits (..., V) -> int64 labels (...).
    Memory: an fp32 copy of the logits (B·T·V·4 bytes)."""
    vocab = logits.size(-1)
    probs = torch.softmax(logits.detach().reshape(-1, vocab).float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


def sampled_label_loss(logits, loss_mask=None, generator=None):
    """The GNB estimator's loss: the MEAN cross entropy of labels sampled from the model's own softmax.

    logits: (..., V), the FULL-sequence logits of the micro-batch (model(x) without last_only).
    loss_mask: optional bool (...), True where a token counts (SFT: y != -1); bs in step(bs=...) must then count
    those tokens. Backpropagate it exactly like the training loss (divided by the accumulation steps), clip as the
    step clips, then call optimizer.update_hessian(): ĝ is then the gradient of the mean over the step's tokens,
    and step(bs=...) supplies the factor B of the paper's ĥ = B·ĝ⊙ĝ. generator: for reproducible labels.
    """
    labels = sample_labels_from_logits(logits, generator)
    if loss_mask is not None:
        labels = labels.masked_fill(~loss_mask, -1)  # -1: "does not count", as in model.py
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-1)
