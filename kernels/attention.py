"""
Flash attention in Triton: causal or not, grouped-query (GQA), forward and backward.

THE MATH. For one head, Q (T, D), K and V (T, D), softmax scale c (default 1/sqrt(D)):

    S = c * Q K^T            (T, T) scores; causal: S_ij = -inf for j > i (a query sees itself and the past)
    P = softmax(S) by row    P_ij = exp(S_ij - LSE_i),  LSE_i = log sum_j exp(S_ij)
    O = P V                  (T, D)

The naive code writes S and P to memory: T^2 numbers per head, 64 MiB of fp32 per head at T = 4096. Flash
attention never does. It keeps a block of BLOCK_M query rows on chip and streams K and V past it in blocks of
BLOCK_N keys (TILING), so memory traffic is O(T * D) and the (T, T) matrices only ever exist one tile at a time.

ONLINE SOFTMAX. The catch is that softmax needs the whole row (its max and its sum) before any P_ij is known.
Keep, for each row, the running max m and the running sum l of exp(S - m), and the unnormalised output acc:

    for each key block j:   m_new = max(m, rowmax(S_j))
                            alpha = exp(m - m_new)          (old terms were measured against the old max)
                            P_j   = exp(S_j - m_new)
                            l     = alpha * l + rowsum(P_j)
                            acc   = alpha * acc + P_j V_j
    at the end:             O = acc / l,   LSE = m + log(l)

Subtracting the running max keeps every exp() <= 1 (no overflow); the rescale by alpha makes the result exact,
not an approximation. We work in base 2: exp(x) = exp2(x * log2(e)), and log2(e) is folded into the scale
(qk_scale = c * log2 e), so the inner loop does one multiply and an exp2, the GPU's native instruction.

CAUSAL BLOCK SKIPPING. With query block [m0, m0 + BLOCK_M) and key block [n0, n0 + BLOCK_N):
  - blocks with n0 > last query are entirely above the diagonal: never visited (half the work of causal);
  - blocks with n0 + BLOCK_N <= m0 are entirely below: every score is visible, no mask is computed;
  - only the few blocks that straddle the diagonal pay for the mask (and for the end of the sequence, T).
The forward and dQ kernels write their loop twice, an unmasked copy (the bulk) and a masked one (diagonal and
the partial block at T), chosen by a compile-time flag, so the hot loop carries no masking at all. (In the dK/dV
kernel that split is a tuning choice, DIAG_SPLIT, as the second loop costs registers; see _dkdv_inner.)
Any T works: loads past T read zeros, masked scores are -inf, and rows past T are never stored.
No NaN: every row's first visited block contains key 0 (or, on the diagonal, the row's own key), so the
running max is finite before any fully masked tile could make exp(-inf - -inf).

BACKWARD (recomputation). With dO = dL/dO, the chain rule through O = P V and the softmax gives

    dV = P^T dO          dP = dO V^T          dS = P * (dP - Delta)          dQ = c dS K      dK = c dS^T Q
    where Delta_i = sum_j P_ij dP_ij = sum_j P_ij (dO_i . V_j) = dO_i . O_i   ("rowsum(dO * O)")

(the softmax Jacobian dP_ij/dS_ik = P_ij (delta_jk - P_ik) gives dS_ik = P_ik (dP_ik - sum_j P_ij dP_ij)).
P is not stored: the backward recomputes it tile by tile from S and the saved LSE, P = exp(S - LSE), exact and
with no max/sum pass. Delta (fp32, one number per row) comes from a small preprocessing kernel.
Two kernels do the rest, each owning what it writes, so no atomics and a DETERMINISTIC result:
  - dK/dV: a program holds one key block of one kv head and walks the query blocks (causal: from the diagonal
    down, as earlier queries never see these keys); it accumulates dV += P^T dO and dK += dS^T Q in registers
    and stores once;
  - dQ: a program holds one query block and walks the key blocks (causal: up to the diagonal).
S and dP are recomputed in both: 7 matrix products and 2 exps per tile instead of the 5 and 1 of a version
that adds dQ with atomics. Determinism has that price in products, yet on an H100 it is the faster of the two
(see Speed below): the atomics' version does less work but runs slower. It (FlashAttention-2's way) is here
too, opt-in (NANOFORGE_ATTN_DETERMINISTIC=0, or attention_triton(..., deterministic=False)): the dK/dV kernel
also forms dQ += dS K per tile and adds it to an fp32 buffer with atomics; dQ's last bits then vary per run.
Speed (bench/attention.py, H100, bf16 causal, GPU time): forward 424-482 TFLOP/s at D 128, 1.4-1.5x SDPA's
FlashAttention-2; forward + backward 1.17-1.23x FlashAttention-2 (188 TFLOP/s at D 64, 324-381 at D 128),
still 0.68-0.80x cuDNN. The deterministic backward is also the faster one on this GPU: at B4 H16 T4096 D128 the
dK/dV kernel with dQ atomics takes 2.75 ms, the two deterministic kernels 1.38 + 0.73. Both backward loops are
latency-bound, since Triton waits for each product before the next; what hides the latency is other programs
on the same SM, so registers per program (occupancy) decide more than instruction counts, hence the tuning
search over tiles, warps and register caps (kernels/attention_tuning.py).

GQA. Hq query heads share Hkv key/value heads (G = Hq / Hkv): query head h reads kv head h // G, straight from
the strided K and V, never from a repeated copy. The gradient of a shared K is the sum over its G query heads,
dK_kv = sum_{h in group} dK_h; the dK/dV program of kv head kv loops over those G heads and sums in registers.

LAYOUTS. q (B, Hq, T, D), k and v (B, Hkv, T, D) arrive as strided views (the model's .transpose(1, 2) of
(B, T, H, D) tensors); the kernels take strides and copy nothing (unless the last dim is itself strided).
The output is allocated (B, T, Hq, D) in memory and returned as its (B, Hq, T, D) view, so the model's
.transpose(1, 2).reshape(B, T, C) afterwards is free. Supported: head dim 16/32/64/128, fp16 and bf16
(fp32 too: exact fp32 products, slow, for tests and the interpreter; Triton 3.9's interpreter gets bf16
products wrong, so CPU tests use fp32 and fp16). Constants inside the kernels (log2 e = 1.4427, ln 2 = 0.6931)
are written out: a Triton kernel may only read globals declared tl.constexpr. Wiring (kernels/__init__.py):
the two directions are the operators nanoforge::flash_attn_fwd / _bwd, triton_ops that torch.compile replaces
by the kernels themselves, called from one autograd.Function. A compiled graph cannot time configs (it traces on
shape-only tensors), so there each kernel runs the config an eager call already tuned, else its default.

ONE ENTRY POINT. attention() at the bottom is the model's only way to attention: training (causal, or a
document mask), prefill, and KV-cache decoding, where it builds the mask for queries that are the last
positions (Tq < Tk); SDPA (the twin) is called nowhere else.
"""
import math
import os

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from kernels import HAS_TRITON, backend, interpreting, launcher, op, use_triton
from kernels.attention_tuning import pick_config

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # no Triton (e.g. macOS): a stand-in lets this file import; only the twin below is ever called
    from types import SimpleNamespace
    triton = SimpleNamespace(jit=lambda fn=None, **options: fn or (lambda f: f))
    tl = SimpleNamespace(constexpr=None)

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, T, qk_scale, lo, hi,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi). MASKED: also mask keys >= T and (causal) keys > query."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # S / c
        if MASKED:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # in log2 units; qk_scale > 0, so max commutes
        alpha = tl.exp2(m_i - m_new)                      # rescale what was summed against the old max
        p = tl.exp2(s * qk_scale - m_new[:, None])        # one fused multiply-add per score, then exp2
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        else:
            v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # acc = alpha acc + P V
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T", "GROUP"])
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
              T, GROUP, qk_scale,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (query blocks, Hq, B). Causal rows near the end see the most keys: launch them first (reversed
    # axis 0) so the long programs start early and the short ones fill the gaps at the end.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes a Python float as fp64: keep the math in fp32
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # 64-bit offsets: B * H * T * D can pass 2^31
    kv = h // GROUP                    # GQA: the kv head this query head reads
    Q += b * sqb + h * sqh
    K += b * skb + kv * skh
    V += b * svb + kv * svh
    O += b * sob + h * soh
    LSE += (b * tl.num_programs(1) + h) * T
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)      # running unnormalised output
    if CAUSAL:  # keys [0, start_m): below the diagonal for every row, no mask; then the diagonal block(s)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, T, qk_scale,
                                   0, start_m, BLOCK_N, False, CAUSAL, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, T, qk_scale,
                                   start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N, True, CAUSAL, PRECISION)
    else:       # every key: whole blocks unmasked, then the partial block at the end of the sequence
        t_full = (T // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, T, qk_scale,
                                   0, t_full, BLOCK_N, False, CAUSAL, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, T, qk_scale,
                                   t_full, T, BLOCK_N, True, CAUSAL, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(LSE + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=offs_m < T)  # natural log
    tl.store(O + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty), mask=offs_m[:, None] < T)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["T"])
def _bwd_delta(O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, T,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta_i = sum_d dO_id * O_id in fp32, one number per query row (B, Hq, T)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * tl.num_programs(1) + h) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQACC, sqt, sdot, offs_n, offs_d, T, qk_scale, lo, hi,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """One query head's contribution to a key block's dK, dV, from the query blocks [lo, hi).
    Works with transposed tiles (keys x queries), so that dV = P^T dO and dK = dS^T Q are plain products.
    MASKED: mask queries >= T and (causal) queries before a key. Whether the bulk of the walk gets its own
    unmasked copy of this loop is a tuning choice (DIAG_SPLIT in _attn_bwd_dkdv): the copy saves the mask's few
    instructions per score but costs registers, as this kernel already holds two (BLOCK_N, D) fp32
    accumulators; at D 64 it pushed Triton 3.6 from 198 to 255 registers and spills (sm_90, BLOCK_M 32), which
    halves how many programs share an SM. The loop is latency-bound (Triton waits for each product before the
    next), so other programs on the SM are what hides the latency: the tuner times both and keeps the faster.
    DQ_ATOMIC: also dQ += dS K for these queries, added in fp32 to DQACC with atomics (see _backward)."""
    offs_m = lo + tl.arange(0, BLOCK_M)
    q_ptrs = Q + offs_m[:, None] * sqt + offs_d[None, :]
    do_ptrs = DO + offs_m[:, None] * sdot + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        rows = offs_m < T
        if MASKED:
            q = tl.load(q_ptrs, mask=rows[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=rows[:, None], other=0.0)
            lse = tl.load(LSE + offs_m, mask=rows, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=rows, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)             # S^T / c   (BLOCK_N, BLOCK_M)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)           # dP^T = V dO^T
        p_t = tl.exp2(s_t * qk_scale - lse[None, :] * 1.4426950408889634)   # P^T = exp(S - LSE), recomputed
        if MASKED:
            keep = rows[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)   # dV += P^T dO
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)                  # dS^T = P^T * (dP^T - Delta)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)                 # dK += dS^T Q   (times c later)
        if DQ_ATOMIC:  # dQ += dS K (times c later), summed over key blocks by fp32 atomics: order not fixed
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)
            tl.atomic_add(DQACC + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=rows[:, None],
                          sem="relaxed")
        offs_m += BLOCK_M
        q_ptrs += BLOCK_M * sqt
        do_ptrs += BLOCK_M * sdot
    return dk, dv


@triton.jit(do_not_specialize=["T", "GROUP"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQACC,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
                   sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                   T, GROUP, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                   DIAG_SPLIT: tl.constexpr):
    # grid (key blocks, Hkv, B). Causal: early keys are seen by the most queries; axis 0 in order launches
    # those heaviest programs first.
    start_n = tl.program_id(0) * BLOCK_N
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # (see _attn_fwd)
    kv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Hq = tl.num_programs(1) * GROUP
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n[:, None] < T
    k = tl.load(K + b * skb + kv * skh + offs_n[:, None] * skt + offs_d[None, :], mask=cols, other=0.0)
    v = tl.load(V + b * svb + kv * svh + offs_n[:, None] * svt + offs_d[None, :], mask=cols, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # The query blocks this key block meets: causal, from the diagonal on (queries before start_n never see
    # these keys); otherwise all. DIAG_SPLIT: the mask only where it can bite, i.e. the diagonal block(s)
    # [start_n, start_n + BLOCK_N) and the partial block at T; the blocks between run the unmasked loop.
    lo = start_n if CAUSAL else 0
    t_full = (T // BLOCK_M) * BLOCK_M                       # queries below this are all < T
    mid = 0
    if CAUSAL:
        mid = tl.minimum(start_n + BLOCK_N, T)              # end of the diagonal part
    for g in range(GROUP):  # GQA: sum the group's query heads into this kv head's dK, dV, in registers
        h = kv * GROUP + g
        q_h, do_h = Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh
        lse_h, delta_h = LSE + (b * Hq + h) * T, DELTA + (b * Hq + h) * T
        dq_h = DQACC + (b * Hq + h) * T * HEAD_DIM
        if DIAG_SPLIT:
            if CAUSAL:
                dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, lse_h, delta_h, dq_h, sqt, sdot, offs_n, offs_d, T,
                                     qk_scale, lo, mid, HEAD_DIM, BLOCK_M, True, CAUSAL, PRECISION, DQ_ATOMIC)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, lse_h, delta_h, dq_h, sqt, sdot, offs_n, offs_d, T,
                                 qk_scale, mid, t_full, HEAD_DIM, BLOCK_M, False, CAUSAL, PRECISION, DQ_ATOMIC)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, lse_h, delta_h, dq_h, sqt, sdot, offs_n, offs_d, T,
                                 qk_scale, tl.maximum(t_full, mid), T, HEAD_DIM, BLOCK_M, True, CAUSAL,
                                 PRECISION, DQ_ATOMIC)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, lse_h, delta_h, dq_h, sqt, sdot, offs_n, offs_d, T,
                                 qk_scale, lo, T, HEAD_DIM, BLOCK_M, True, CAUSAL, PRECISION, DQ_ATOMIC)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + kv * sdkh + offs_n[:, None] * sdkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=cols)
    tl.store(DV + b * sdvb + kv * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=cols)


@triton.jit(do_not_specialize=["T"])
def _dq_from_acc(DQACC, DQ, sdqb, sdqh, sdqt, T, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """dQ = c * DQACC, from the fp32 (B, Hq, T, D) sums of the atomic path to dQ's dtype and layout."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    sm_scale = tl.cast(sm_scale, tl.float32)  # (see _attn_fwd)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    acc = tl.load(DQACC + ((b * tl.num_programs(1) + h) * T + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
                  mask=rows, other=0.0)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             (acc * sm_scale).to(DQ.dtype.element_ty), mask=rows)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, T, qk_scale, lo, hi,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """A query block's dQ from the key blocks [lo, hi): dQ += dS K, with P and dP recomputed per tile
    (S = Q K^T and dP = dO V^T issued together, as in _dkdv_inner)."""
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = K + offs_n[:, None] * skt + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * svt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])  # lse arrives in log2 units
        if MASKED:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        offs_n += BLOCK_N
        k_ptrs += BLOCK_N * skt
        v_ptrs += BLOCK_N * svt
    return dq


@triton.jit(do_not_specialize=["T", "GROUP"])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
                 T, GROUP, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heaviest first, as in the forward
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # (see _attn_fwd)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kv = h // GROUP
    K += b * skb + kv * skh
    V += b * svb + kv * svh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=rows[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=rows[:, None],
                 other=0.0)
    row0 = (b * tl.num_programs(1) + h) * T
    lse = tl.load(LSE + row0 + offs_m, mask=rows, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row0 + offs_m, mask=rows, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        dq = _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, T, qk_scale,
                       0, start_m, BLOCK_N, False, CAUSAL, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, T, qk_scale,
                       start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N, True, CAUSAL, PRECISION)
    else:
        t_full = (T // BLOCK_N) * BLOCK_N
        dq = _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, T, qk_scale,
                       0, t_full, BLOCK_N, False, CAUSAL, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, T, qk_scale,
                       t_full, T, BLOCK_N, True, CAUSAL, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=rows[:, None])


# ------------------------------------------------------------------------------------------- block configs
# Which tiles each kernel runs with, and the autotuner that picks them: kernels/attention_tuning.py.
# The backward's default: dQ by a second kernel, deterministic (see _backward). NANOFORGE_ATTN_DETERMINISTIC=0
# makes dQ come from fp32 atomics in the dK/dV kernel instead (fewer products, but slower on an H100; the last
# bits of dQ vary from run to run).
DETERMINISTIC = os.environ.get("NANOFORGE_ATTN_DETERMINISTIC", "1") != "0"


# -------------------------------------------------------------------------------------------- launchers
def _check_inputs(q, k, v):
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, T, D); got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    (B, Hq, T, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if (B, T, D) != (Bk, Tk, Dk):
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in B, T and D "
                         f"(the kernel is self-attention: query and key sequences have the same length)")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"attention: Hq={Hq} must be a multiple of Hkv={Hkv} (grouped-query attention)")
    if D not in HEAD_DIMS:
        raise ValueError(f"attention: head dim {D} not supported by the Triton kernel (supported: {HEAD_DIMS}); "
                         f"use NANOFORGE_KERNELS=attention=torch")
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError("attention: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")


def _unit_last(x):
    """The kernels assume the last dim is contiguous (true of every transposed view); copy only if it is not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _bthd_empty(q):
    """An uninitialised (B, Hq, T, D) tensor laid out as (B, T, Hq, D) in memory (not a view: no aliasing)."""
    B, H, T, D = q.shape
    return torch.empty_strided((B, H, T, D), (T * H * D, D, H * D, 1), dtype=q.dtype, device=q.device)


def _launch(kernel, grid_of, config, *args, **constexprs):
    bm, bn, warps, stages, maxnreg = (tuple(config) + (0,))[:5]
    options = {"maxnreg": maxnreg} if maxnreg else {}
    launcher(kernel)[grid_of(bm, bn)](*args, **constexprs, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                      num_stages=stages, **options)


def _tracing(t):
    """True while torch.compile traces the operator on shape-only tensors: nothing can be timed then."""
    return is_fake(t)


def _forward(q, k, v, causal, scale):
    """Returns O (B, Hq, T, D), a view of (B, T, Hq, D) memory, and LSE (B, Hq, T) fp32, natural log."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Hq, T, D = q.shape
    o = _bthd_empty(q)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    group = Hq // k.shape[1]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs

    def launch(config):
        _launch(_attn_fwd, lambda bm, bn: (triton.cdiv(T, bm), Hq, B), config,
                q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                T, group, scale * LOG2E, HEAD_DIM=D, CAUSAL=causal, PRECISION=precision)

    launch(pick_config("fwd", launch, D, causal, q.dtype, _tracing(q)))
    return o, lse


def _backward(do, q, k, v, o, lse, causal, scale, deterministic=True):
    """dQ, dK, dV. Deterministic: the dK/dV kernel, then the dQ kernel (each writes what it owns, 7 products
    per tile). Otherwise (FlashAttention-2's way): the dK/dV kernel also computes dQ += dS K for each of its
    tiles and adds it to an fp32 (B, Hq, T, D) buffer with atomics, 5 products and one exp per tile instead of
    7 and two, then a small kernel scales and casts it. Float addition is not associative, and the order in
    which key blocks add is up to the GPU: the last bits of dQ differ from run to run."""
    q, k, v, o, do = (_unit_last(x) for x in (q, k, v, o, do))
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    delta = torch.empty_like(lse)
    block = 16 if interpreting() else 64
    launcher(_bwd_delta)[(triton.cdiv(T, block), Hq, B)](o, do, delta, *o.stride()[:3], *do.stride()[:3], T,
                                              HEAD_DIM=D, BLOCK_M=block)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])

    dq_acc = torch.zeros(B, Hq, T, D, dtype=torch.float32, device=q.device) if not deterministic else dk

    def launch_dkdv(config):
        if not deterministic:
            dq_acc.zero_()  # the atomics add to it; tuning runs this launch repeatedly
        _launch(_attn_bwd_dkdv, lambda bm, bn: (triton.cdiv(T, bn), Hkv, B), config,
                q, k, v, do, lse, delta, dk, dv, dq_acc, *common, *dk.stride()[:3], *dv.stride()[:3],
                T, group, scale * LOG2E, scale, HEAD_DIM=D, CAUSAL=causal, PRECISION=precision,
                DQ_ATOMIC=not deterministic, DIAG_SPLIT=bool(config[5]) if len(config) > 5 else False)

    def launch_dq(config):
        _launch(_attn_bwd_dq, lambda bm, bn: (triton.cdiv(T, bm), Hq, B), config,
                q, k, v, do, lse, delta, dq, *common, *dq.stride()[:3],
                T, group, scale * LOG2E, scale, HEAD_DIM=D, CAUSAL=causal, PRECISION=precision)

    tracing = _tracing(q)
    if deterministic:
        launch_dkdv(pick_config("dkdv", launch_dkdv, D, causal, q.dtype, tracing))
        launch_dq(pick_config("dq", launch_dq, D, causal, q.dtype, tracing))
    else:
        launch_dkdv(pick_config("fused", launch_dkdv, D, causal, q.dtype, tracing))
        launcher(_dq_from_acc)[(triton.cdiv(T, block), Hq, B)](dq_acc, dq, *dq.stride()[:3], T, scale, HEAD_DIM=D,
                                                    BLOCK_M=block)
    return dq, dk, dv


# ------------------------------------------------------------- operators + autograd (kernels/__init__.py's wiring)
@op("flash_attn_fwd")
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, scale)


@op("flash_attn_bwd")
def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, causal: bool, scale: float,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, causal, scale, deterministic)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, deterministic):
        o, lse = flash_attn_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)  # O and LSE: all the backward needs to rebuild P
        ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.deterministic)
        return dq, dk, dv, None, None, None


def attention_triton(q, k, v, causal=True, scale=None, deterministic=None):
    """The Triton path, with its input checks (clear errors for what the kernel does not support).
    deterministic: how the backward computes dQ (see _backward); None: DETERMINISTIC (the environment's)."""
    _check_inputs(q, k, v)
    return _flash(q, k, v, causal, scale, deterministic)


def _flash(q, k, v, causal, scale, deterministic=None):
    """The Triton path on inputs already checked (each call checks once: attention() or attention_triton())."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0:  # the kernels take the row max of unscaled scores: right only for a positive scale
        raise ValueError(f"attention: softmax scale must be positive, got {scale}")
    deterministic = DETERMINISTIC if deterministic is None else bool(deterministic)
    return FlashAttention.apply(q, k, v, bool(causal), scale, deterministic)


# ------------------------------------------------------------------------------------- twin and switch
def attention_torch(q, k, v, causal=True, scale=None, mask=None):
    """q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), Hq a multiple of Hkv. SDPA, no repeated K/V.
    mask: bool, broadcastable to (B, Hq, Tq, Tk), True where a query may see a key; it replaces the causal rule
    (model.py's block-diagonal causal mask for packed documents, attention()'s decode mask). SDPA then runs its
    memory-efficient kernel (flash takes no mask), which has no native GQA: K and V are repeated over the
    group for it. The same under the legacy ONNX exporter, which converts SDPA only without enable_gqa; else
    enable_gqa is a Python bool computed from the shapes (that exporter also refuses a tensor there)."""
    group = q.shape[1] // k.shape[1]
    if mask is not None or torch.onnx.is_in_onnx_export():
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=bool(group > 1))


def attention(q, k, v, causal=True, scale=None, mask=None):
    """The one attention entry point: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D); causal (or full) grouped-query
    attention. Triton on CUDA, the twin elsewhere (kernels/__init__.py); the model never calls SDPA itself.

    Tq < Tk is KV-cache decoding: the Tq new queries sit at positions Tk - Tq .. Tk - 1, and query i sees the
    keys j <= Tk - Tq + i. SDPA's is_causal aligns its mask top-left (right only for Tq = Tk), so this builds
    the bottom-right mask (for the usual single new token it is all True: no mask at all). Decoding and an
    explicit mask go to the twin, whatever the switch says: the Triton kernel knows only the square causal
    rule. Otherwise, in 'auto' mode a shape the kernel does not cover (head dim outside HEAD_DIMS) goes to the
    twin, and with NANOFORGE_KERNELS=attention=triton it is an error instead."""
    Tq, Tk = q.shape[2], k.shape[2]
    if mask is None and causal and Tq != Tk:
        if Tq > 1:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        causal = False  # the mask (or, for one query, no mask) is the whole rule now
    if mask is None and Tq == Tk and use_triton("attention", q, k, v):
        if backend("attention") == "triton":
            return attention_triton(q, k, v, causal, scale)  # checks, and refuses in words
        if _kernel_covers(q, k, v):
            return _flash(q, k, v, causal, scale)
    return attention_torch(q, k, v, causal, scale, mask)


def _kernel_covers(q, k, v):
    try:
        _check_inputs(q, k, v)
        return True
    except (ValueError, TypeError, RuntimeError):
        return False
