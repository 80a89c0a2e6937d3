"""
Benchmark: our Triton RMSNorm (plain and fused with the residual add), RoPE and SwiGLU against their peers,
forward and forward + backward, on one GPU.

    python bench/kernels.py              # table + plot in bench/results/ (env BENCH_OUT); 1-2 minutes, mostly
                                         # torch.compile of the peers
    python bench/kernels.py --sweep      # also time alternative launch configs of our kernels (tuning data)
    python bench/kernels.py --only rmsnorm,rope        # a subset of the cases
    python bench/kernels.py --cross_entropy   # (alone) the fused head + loss vs eager, torch.compile, Liger:
                                         # ms and extra peak GiB at three head shapes (cross_entropy.md); ~3 min
    python bench/kernels.py --cross_entropy_model   # (alone) parchment_166m and lrc_1p5b training steps, the
                                         # loss fused or not: peak GiB, tok/s (cross_entropy_model.md)
    python bench/kernels.py --model      # (alone) a compiled GPT-2 124M training micro-step (fwd + bwd, bf16
                                         # autocast) with our kernels and with the twins: ms per step and where
                                         # the GPU time goes, by kernel family (kernels_model.md); ~20 s a spec

Peers, all in this one run: the PyTorch eager twin, torch.compile of the twin, F.rms_norm (RMSNorm only) and
Liger-Kernel when it imports (it is not a requirement: `pip install --no-deps liger-kernel` adds it).

All three operations are memory-bound, so the score is bandwidth: GB/s = bytes that must move / time, with
bytes counted as the minimum traffic of the operation (every input read once, every output written once;
tables, weights and per-row statistics ignored), the same count for every implementation:

    RMSNorm  fwd: read x, write y = 2 elements;  fwd+bwd: + read x, dy, write dx = 5 elements (10 B in bf16)
    RoPE     fwd: read q, k, write q, k = 2 (q + k);  fwd+bwd: 4 (q + k)
    SwiGLU   fwd: read a, b, write c = 3 (M F);  fwd+bwd: + read dc, a, b, write da, db = 8 (M F)

and compared with the measured copy bandwidth of the same GPU (bench/common.copy_bandwidth_gbs). Timing:
median of CUDA-event timings with the L2 flushed before each repetition (bench/common.time_ms). Forward is
timed as in training (inputs require grad, so autograd saves what backward needs); fwd+bwd is forward then
torch.autograd.grad (no .grad accumulation, which would add a read-modify-write that is no part of the op).

Two more columns separate the GPU from the host. `GPU ms` is the sum of the durations of the kernels one call
launches (torch.profiler, L2 flushed before each call), i.e. the time if Python cost nothing; `host us` is the
time Python takes to issue one call. An eager call whose host time exceeds its GPU time is host-bound: `ms`
then measures Python, and under torch.compile or in a long training step (where the host runs ahead of the
GPU) only `GPU ms` matters.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import RESULTS_DIR, copy_bandwidth_gbs, gpu_name, host_us, time_ms, write_results  # noqa: E402
from kernels import set_backend  # noqa: E402
import kernels.rmsnorm as rms  # noqa: E402
import kernels.rope as rope  # noqa: E402
import kernels.swiglu as swi  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = "cuda"
EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------
# Liger-Kernel, if installed (each import on its own: one broken module should not hide the others)
# ----------------------------------------------------------------------------------------------------------
def _liger(module, name):
    try:
        mod = __import__(f"liger_kernel.ops.{module}", fromlist=[name])
        return getattr(mod, name)
    except Exception as e:  # not installed, or an API change
        print(f"liger_kernel.ops.{module}.{name}: not available ({type(e).__name__}: {e})")
        return None


LigerRMSNorm = _liger("rms_norm", "LigerRMSNormFunction")
LigerRope = _liger("rope", "LigerRopeFunction")
LigerSiLUMul = _liger("swiglu", "LigerSiLUMulFunction")
LigerFusedGateUp = _liger("swiglu", "LigerFusedGateUpSiLUMulFunction")


# ----------------------------------------------------------------------------------------------------------
# The cases: inputs, implementations, byte counts
# ----------------------------------------------------------------------------------------------------------
def leaf(t):
    return t.detach().requires_grad_()


def rmsnorm_case(M, N):
    x = leaf(torch.randn(M, N, device=DEVICE, dtype=DTYPE))
    w = leaf(1 + 0.1 * torch.randn(N, device=DEVICE, dtype=DTYPE))
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    impls = {
        "ours": lambda x, w: rms.rmsnorm(x, w, EPS),
        "eager twin": lambda x, w: rms.rmsnorm_torch(x, w, EPS),
        "compile twin": torch.compile(lambda x, w: rms.rmsnorm_torch(x, w, EPS), dynamic=False),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (N,), w, EPS),
    }
    if LigerRMSNorm is not None:  # offset 0, llama casting (fp32 statistics), no in-place dx over dy
        impls["liger"] = lambda x, w: LigerRMSNorm.apply(x, w, EPS, 0.0, "llama", False)
    el, bs = M * N, x.element_size()
    return dict(name=f"RMSNorm {M}x{N}", inputs=(x, w), grads=(dy,), impls=impls,
                bytes_fwd=2 * el * bs, bytes_fb=5 * el * bs)


def add_rmsnorm_case(M, N):
    """The fused residual add + RMSNorm (kernels/rmsnorm.py's second lesson): (h, y) = (x + r, norm(x + r)).
    Traffic: forward reads x, r and writes h, y; backward reads dh, dy, h and writes dx (= dr, one tensor)."""
    x, r = (leaf(torch.randn(M, N, device=DEVICE, dtype=DTYPE)) for _ in range(2))
    w = leaf(1 + 0.1 * torch.randn(N, device=DEVICE, dtype=DTYPE))
    dh, dy = (torch.randn(M, N, device=DEVICE, dtype=DTYPE) for _ in range(2))
    impls = {
        "ours": lambda x, r, w: rms.add_rmsnorm(x, r, w, EPS),
        "eager twin": lambda x, r, w: rms.add_rmsnorm_torch(x, r, w, EPS),
        "compile twin": torch.compile(lambda x, r, w: rms.add_rmsnorm_torch(x, r, w, EPS), dynamic=False),
    }
    el, bs = M * N, x.element_size()
    return dict(name=f"add + RMSNorm {M}x{N}", inputs=(x, r, w), grads=(dh, dy), impls=impls,
                bytes_fwd=4 * el * bs, bytes_fb=8 * el * bs)


def rope_case(B, Hq, Hkv, T, D):
    # q and k as the model makes them: strided views into one fused qkv projection
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEVICE, dtype=DTYPE)
    q = leaf(qkv[..., :Hq * D].view(B, T, Hq, D))
    k = leaf(qkv[..., Hq * D:(Hq + Hkv) * D].view(B, T, Hkv, D))
    cos, sin = rope.rope_tables(D, T, 10000.0, device=DEVICE)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    impls = {
        "ours": lambda q, k: rope.apply_rope(q, k, cos, sin),
        "eager twin": lambda q, k: rope.apply_rope_torch(q, k, cos, sin),
        "compile twin": torch.compile(lambda q, k: rope.apply_rope_torch(q, k, cos, sin), dynamic=False),
    }
    if LigerRope is not None:
        # Liger takes (B, H, T, D) views of (B, T, H, D) storage and HF-style tables (T, D) = [cos | cos];
        # it rotates in place and needs contiguous storage, so it gets its own contiguous copies of q and k.
        cos_hf, sin_hf = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
        qc, kc = leaf(q.detach().contiguous()), leaf(k.detach().contiguous())

        def liger_rope(q, k):
            qo, ko = LigerRope.apply(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)
            return qo.transpose(1, 2), ko.transpose(1, 2)
        impls["liger"] = (liger_rope, (qc, kc))
    el, bs = q.numel() + k.numel(), q.element_size()
    return dict(name=f"RoPE B{B} T{T} H{Hq}/{Hkv} D{D}", inputs=(q, k), grads=(dq, dk),
                impls=impls, bytes_fwd=2 * el * bs, bytes_fb=4 * el * bs)


def swiglu_case(M, Fdim):
    a = leaf(torch.randn(M, Fdim, device=DEVICE, dtype=DTYPE))
    b = leaf(torch.randn(M, Fdim, device=DEVICE, dtype=DTYPE))
    dc = torch.randn(M, Fdim, device=DEVICE, dtype=DTYPE)
    impls = {"ours": swi.swiglu, "eager twin": swi.swiglu_torch,
             "compile twin": torch.compile(swi.swiglu_torch, dynamic=False)}
    if LigerSiLUMul is not None:
        impls["liger"] = LigerSiLUMul.apply
    el, bs = M * Fdim, a.element_size()
    return dict(name=f"SwiGLU a,b {M}x{Fdim}", inputs=(a, b), grads=(dc,), impls=impls,
                bytes_fwd=3 * el * bs, bytes_fb=8 * el * bs)


def swiglu_packed_case(M, Fdim):
    ab = leaf(torch.randn(M, 2 * Fdim, device=DEVICE, dtype=DTYPE))
    dc = torch.randn(M, Fdim, device=DEVICE, dtype=DTYPE)
    impls = {"ours": swi.swiglu_packed, "eager twin": swi.swiglu_packed_torch,
             "compile twin": torch.compile(swi.swiglu_packed_torch, dynamic=False)}
    if LigerFusedGateUp is not None:
        impls["liger"] = LigerFusedGateUp.apply
    el, bs = M * Fdim, ab.element_size()
    return dict(name=f"SwiGLU packed {M}x2*{Fdim}", inputs=(ab,), grads=(dc,), impls=impls,
                bytes_fwd=3 * el * bs, bytes_fb=8 * el * bs)


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------
_flush_buffer = None


def gpu_ms(fn, reps=10):
    """(device ms per call, {kernel name: ms per call}): the kernels fn() launches, from torch.profiler. The
    L2 flush before each call is a bitwise_not over 256 MB, a kernel no implementation uses, left out of the sum."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=DEVICE)
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            _flush_buffer.bitwise_not_()
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and "bitwise_not" not in e.name:
            per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.time_range.elapsed_us() / reps / 1000
    return sum(per_kernel.values()), per_kernel


def calls(fn, inputs, grads):
    """The two timed calls of one implementation: forward, and forward + backward."""
    def fwd():
        return fn(*inputs)

    def fwd_bwd():
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out, inputs, grads)
    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def impl_calls(case):
    for impl, fn in case["impls"].items():
        fn, inputs = fn if isinstance(fn, tuple) else (fn, case["inputs"])
        yield impl, calls(fn, inputs, case["grads"])


def measure_wall(case):
    """Pass 1: wall ms and host us of every implementation (a peer that fails is reported, not fatal)."""
    case["results"] = {}
    for impl, passes in impl_calls(case):
        try:
            passes["fwd+bwd"]()  # first call: compiles (Triton, torch.compile) outside the timed region
            case["results"][impl] = {p: [time_ms(f), host_us(f)] for p, f in passes.items()}
        except Exception as e:
            print(f"  {case['name']} / {impl}: failed ({type(e).__name__}: {str(e)[:200]})")


def measure_gpu(case):
    """Pass 2, after every wall timing: the profiler (CUPTI) stays attached to the process once started and
    slows every later launch on the host, so no wall time may be taken after it."""
    for impl, passes in impl_calls(case):
        if impl in case["results"]:
            for p, f in passes.items():
                case["results"][impl][p].append(gpu_ms(f)[0])


def report(case, copy_gbs, rows, summary):
    results = case["results"]
    for pass_name, nbytes in (("fwd", case["bytes_fwd"]), ("fwd+bwd", case["bytes_fb"])):
        peers = {k: v[pass_name][0] for k, v in results.items() if k != "ours"}
        best_peer = min(peers, key=peers.get) if peers else None
        for impl, times in results.items():
            ms, host, dev_ms = times[pass_name]
            gbs = nbytes / (ms * 1e-3) / 1e9
            vs_best = peers[best_peer] / ms if best_peer else float("nan")  # > 1: faster than the best peer
            rows.append([case["name"], pass_name, impl, ms, gbs, 100 * gbs / copy_gbs, vs_best, dev_ms,
                         nbytes / (dev_ms * 1e-3) / 1e9, host])
        if "ours" in results and best_peer:
            ours, host, dev_ms = results["ours"][pass_name]
            summary[(case["name"], pass_name)] = dict(
                ours_gbs=nbytes / (ours * 1e-3) / 1e9, ours_gpu_gbs=nbytes / (dev_ms * 1e-3) / 1e9,
                peers={k: nbytes / (v * 1e-3) / 1e9 for k, v in peers.items()},
                peers_gpu={k: nbytes / (v[pass_name][2] * 1e-3) / 1e9 for k, v in results.items() if k != "ours"})
            print(f"  {case['name']:<40} {pass_name:<8} ours {ours:.3f} ms = "
                  f"{nbytes / (ours * 1e-3) / 1e9:6.0f} GB/s (GPU {dev_ms:.3f} ms, host {host:.0f} us); best peer "
                  f"{best_peer} {peers[best_peer]:.3f} ms: ours is {peers[best_peer] / ours:.2f}x")


def check_targets(summary, copy_gbs):
    """The issue's targets (bf16, forward + backward), on the wall time of eager calls and on device time."""
    lines = []

    def target(key, goal_gbs, goal_gpu_gbs, what):
        if key not in summary:
            return
        got, got_gpu = summary[key]["ours_gbs"], summary[key]["ours_gpu_gbs"]
        lines.append(f"- {key[0]} {key[1]} ({what}): wall {got:.0f} GB/s vs {goal_gbs:.0f}: "
                     f"{'MET' if got >= goal_gbs else 'MISSED'}; GPU time {got_gpu:.0f} GB/s vs {goal_gpu_gbs:.0f}: "
                     f"{'MET' if got_gpu >= goal_gpu_gbs else 'MISSED'}")

    target(("RMSNorm 16384x4096", "fwd+bwd"), 0.85 * copy_gbs, 0.85 * copy_gbs, "85% of copy")
    target(("RMSNorm 16384x2048", "fwd+bwd"), 0.80 * copy_gbs, 0.80 * copy_gbs, "80% of copy")
    for key, s in summary.items():
        if key[0].startswith("RoPE") and key[1] == "fwd+bwd" and "compile twin" in s["peers"]:
            target(key, s["peers"]["compile twin"], s["peers_gpu"]["compile twin"], "torch.compile")
        if key[0].startswith("SwiGLU") and key[1] == "fwd+bwd" and "compile twin" in s["peers"]:
            target(key, 0.95 * s["peers"]["compile twin"], 0.95 * s["peers_gpu"]["compile twin"],
                   "95% of torch.compile")
    return lines


def plot(rows, copy_gbs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"no plot ({e})")
        return
    groups = list(dict.fromkeys((r[0], r[1]) for r in rows))
    impls = list(dict.fromkeys(r[2] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = [next((r[4] for r in rows if (r[0], r[1]) == g and r[2] == impl), 0) for g in groups]
        gpu_vals = [next((r[8] for r in rows if (r[0], r[1]) == g and r[2] == impl), 0) for g in groups]
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, vals, width, label=impl)
        ax.scatter(xs, gpu_vals, marker="_", color="k", s=60, zorder=3, label="GPU time alone" if i == 0 else None)
    ax.axhline(copy_gbs, color="k", ls="--", lw=1, label=f"copy {copy_gbs:.0f} GB/s")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{g[0]}\n{g[1]}".replace(" ", "\n", 1) for g in groups], fontsize=7)
    ax.set_ylabel("GB/s (minimum traffic / wall time of an eager call)")
    ax.set_title(f"nanoforge kernels, bf16, {gpu_name()}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------------------
# --sweep: alternative launch configs of our kernels, for tuning (the fixed rules live in kernels/*.py).
# Device time only (gpu_ms): the launches are called directly, no autograd, no host overhead in the number.
# ----------------------------------------------------------------------------------------------------------
# (M, N, x dtype, dy dtype): the benchmark's bf16 shapes and GPT-2 124M's under autocast (fp32 x, bf16 dy)
SWEEP_RMSNORM = ((16384, 4096, torch.bfloat16, torch.bfloat16), (16384, 2048, torch.bfloat16, torch.bfloat16),
                 (16384, 768, torch.float32, torch.bfloat16))
SWEEP_ROPE = ((8, 32, 8, 2048, 128), (16, 12, 12, 1024, 64))  # B, Hq, Hkv, T, D
SWEEP_SWIGLU = (16384, 8192)


def _kernel_summary(per_kernel):
    return ", ".join(f"{name.split('(')[0][:28]} {ms:.3f}" for name, ms in
                     sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def sweep():
    print("\n--sweep: our kernels under other launch configs (device ms from the profiler; default config first)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M, N, xdt, dydt in SWEEP_RMSNORM:
        x = torch.randn(M, N, device=DEVICE, dtype=xdt)
        w = torch.randn(N, device=DEVICE, dtype=torch.float32 if xdt == torch.float32 else xdt)
        dy = torch.randn(M, N, device=DEVICE, dtype=dydt)
        fwd_bytes = M * N * (x.element_size() + dy.element_size())       # read x, write y (in dy's dtype)
        bwd_bytes = M * N * (2 * x.element_size() + dy.element_size())   # read x, dy, write dx
        default_fwd, default_bwd = rms._fwd_config, rms._bwd_config
        tag = f"{M}x{N} x {str(xdt)[6:]} y/dy {str(dydt)[6:]}"
        for BM, nw in [default_fwd(M, N)[::2], (1, 4), (1, 8), (2, 4), (2, 8), (4, 8), (4, 16)]:
            rms._fwd_config = lambda M_, N_, BM=BM, nw=nw: (BM, triton_next_pow2(N_), nw)
            ms, _ = gpu_ms(lambda: rms._forward(x, None, w, EPS, dydt))
            print(f"  rmsnorm fwd {tag} BLOCK_M={BM} warps={nw}: {ms:.4f} ms {fwd_bytes / ms / 1e6:.0f} GB/s")
        rms._fwd_config = default_fwd
        _, _, rstd = rms._forward(x, None, w, EPS, dydt)
        BM0, _, nw0, G0 = default_bwd(M, N, 0)
        for BM, nw, per_sm in [(BM0, nw0, G0 / sms), (1, 4, 4), (1, 8, 2), (2, 4, 4), (2, 8, 2), (2, 16, 1),
                               (4, 8, 2), (4, 16, 1), (8, 16, 1)]:
            if BM * triton_next_pow2(N) > 32768:
                continue
            rms._bwd_config = lambda M_, N_, d, BM=BM, nw=nw, per_sm=per_sm: (
                BM, triton_next_pow2(N_), nw, max(1, min(int(per_sm * sms), -(-M_ // BM))))
            ms, per_kernel = gpu_ms(lambda: rms._rmsnorm_bwd(dy, x, w, rstd, None))
            print(f"  rmsnorm bwd {tag} BLOCK_M={BM} warps={nw} programs/SM={per_sm:.2f}: {ms:.4f} ms "
                  f"{bwd_bytes / ms / 1e6:.0f} GB/s  [{_kernel_summary(per_kernel)}]")
        rms._bwd_config = default_bwd
    M, Fdim = SWEEP_SWIGLU
    ab = torch.randn(M, 2 * Fdim, device=DEVICE, dtype=DTYPE)
    dc = torch.randn(M, Fdim, device=DEVICE, dtype=DTYPE)
    f, _ = gpu_ms(lambda: swi._swiglu_packed_fwd(ab))
    b, _ = gpu_ms(lambda: swi._swiglu_packed_bwd(dc, ab))
    print(f"  swiglu packed {M}x2*{Fdim} default: fwd {f:.3f} ms {6 * M * Fdim / f / 1e6:.0f} GB/s, "
          f"bwd {b:.3f} ms {10 * M * Fdim / b / 1e6:.0f} GB/s")
    for B, Hq, Hkv, T, D in SWEEP_ROPE:
        qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEVICE, dtype=DTYPE)
        q = qkv[..., :Hq * D].view(B, T, Hq, D)
        k = qkv[..., Hq * D:(Hq + Hkv) * D].view(B, T, Hkv, D)
        # gradients as attention hands them back: (B, H, T, D) storage seen as (B, T, H, D)
        dq = torch.randn(B, Hq, T, D, device=DEVICE, dtype=DTYPE).transpose(1, 2)
        dk = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=DTYPE).transpose(1, 2)
        cos, sin = rope.rope_tables(D, T, 10000.0, device=DEVICE)
        nbytes = 2 * (q.numel() + k.numel()) * 2
        default = rope._config
        for cap, nw in [(None, None), (1024, 2), (2048, 4), (2048, 8), (4096, 8)]:
            if cap is not None:
                rope._config = lambda Hq_, Hkv_, D_, cap=cap, nw=nw: (
                    min(triton_next_pow2(Hq_), max(1, cap // triton_next_pow2(D_ // 2))),
                    min(triton_next_pow2(Hkv_), max(1, cap // triton_next_pow2(D_ // 2))),
                    triton_next_pow2(D_ // 2), nw)
            f, _ = gpu_ms(lambda: rope._rope(q, k, cos, sin, False))
            b, _ = gpu_ms(lambda: rope._rope(dq, dk, cos, sin, True))
            print(f"  rope B{B} T{T} H{Hq}/{Hkv} D{D} cap={cap or 'default'} warps={nw or ''}: fwd {f:.4f} ms "
                  f"{nbytes / f / 1e6:.0f} GB/s, bwd {b:.4f} ms {nbytes / b / 1e6:.0f} GB/s")
            rope._config = default


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------------------------------------
# --model: where a compiled training micro-step spends its GPU time, with our kernels and with the twins
# ----------------------------------------------------------------------------------------------------------
FAMILIES = (  # (family, substrings of kernel names), first match wins
    ("ours: rmsnorm", ("_rmsnorm_", "_dw_reduce")), ("ours: rope", ("_rope_kernel",)),
    ("ours: swiglu", ("_swiglu_",)), ("ours: attention", ("_attn_", "_bwd_delta")),
    ("matmul (cuBLAS/CUTLASS)", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "xmma")),
    ("SDPA (flash/cuDNN)", ("flash", "fmha", "cudnn")),
    ("inductor-generated Triton", ("triton_",)),
)


def family(name):
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return fam
    return "other (ATen elementwise, copies, ...)"


def model_step(n_layer, specs, profile_specs):
    """GPT-2 124M (gpt2_124m preset, n_layer blocks), micro-batch 16 x 1024, bf16 autocast, torch.compile:
    one forward + backward per step (gradients accumulate, as in train.py's micro-steps)."""
    from model import GPT, GPTConfig
    cfg = GPTConfig(n_layer=n_layer, n_embd=768, n_head=12, n_kv_head=12, ffn_hidden=2048, mlp="swiglu",
                    pos="rope", vocab_size=50257, vocab_pad_multiple=64, block_size=1024)
    B, T = 16, 1024
    torch.manual_seed(0)
    model = GPT(cfg).to(DEVICE)
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=DEVICE)
    targets = torch.randint(0, cfg.vocab_size, (B, T), device=DEVICE)
    rows, breakdown = [], {}
    print(f"\n--model: GPT-2 124M shapes, {n_layer} layers, micro-batch {B}x{T}, bf16 autocast, torch.compile")

    def compiled_step(spec):
        set_backend(spec)
        torch._dynamo.reset()
        compiled = torch.compile(model)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = compiled(idx, targets)
            loss.backward()
        t0 = time.time()
        step()
        step()
        torch.cuda.synchronize()
        return step, time.time() - t0

    for spec in specs:  # pass 1: wall times only (see measure_gpu: no profiler before the last wall time)
        step, compile_s = compiled_step(spec)
        ms = time_ms(step, reps=10, warmup=2, flush_l2=False)
        rows.append([spec, ms, B * T / ms * 1e3, float("nan"), compile_s])
        print(f"  kernels={spec:<28} {ms:8.2f} ms/step  {B * T / ms * 1e3:9.0f} tok/s  "
              f"(compile + 2 steps {compile_s:.0f} s)", flush=True)
    for spec in profile_specs:  # pass 2: device time, by kernel family
        step, _ = compiled_step(spec)
        dev_ms, per_kernel = gpu_ms(step, reps=3)
        fams = {}
        for name, k_ms in per_kernel.items():
            fams[family(name)] = fams.get(family(name), 0.0) + k_ms
        breakdown[spec] = fams
        for row in rows:
            if row[0] == spec:
                row[3] = dev_ms
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
        print(f"  [{spec}] GPU {dev_ms:.2f} ms/step; top kernels (ms per step): "
              + "; ".join(f"{n[:70]} {v:.3f}" for n, v in top), flush=True)
    set_backend("triton")
    fam_names = sorted({f for fams in breakdown.values() for f in fams})
    fam_rows = [[f] + [breakdown[s].get(f, 0.0) for s in breakdown] for f in fam_names]
    notes = (f"GPT-2 124M shapes ({n_layer} layers, d 768, 12 heads, SwiGLU 2048, RoPE), micro-batch {B}x{T}, bf16 "
             f"autocast, torch.compile (default mode), forward + backward per step, no optimizer. `kernels` is the "
             f"NANOFORGE_KERNELS spec. GPU ms: sum of kernel durations (profiler).\n\n"
             + "\n".join(f"- {r[0]}: {r[1]:.2f} ms/step, {r[2]:.0f} tok/s" for r in rows)
             + "\n\nGPU ms per step by kernel family:\n\n| family | " + " | ".join(breakdown) + " |\n|"
             + "---|" * (1 + len(breakdown)) + "\n"
             + "\n".join("| " + " | ".join([r[0]] + [f"{v:.3f}" for v in r[1:]]) + " |" for r in fam_rows))
    write_results("kernels_model", ["kernels", "ms/step", "tok/s", "GPU ms/step", "compile s"], rows, notes)


# ----------------------------------------------------------------------------------------------------------
# cross_entropy: the fused head + loss (kernels/cross_entropy.py). Compute-bound (three N x d x V matmuls) and
# memory-bound in the other sense -- the question is how much memory the (N, V) logits cost -- so its table
# reports ms and extra peak GiB, not GB/s, and runs on its own (--cross_entropy).
# ----------------------------------------------------------------------------------------------------------
CE_TOKENS = 16384
CE_SHAPES = ((768, 100352, "parchment"), (1536, 128256, "lrc"), (768, 50304, "gpt2"))
CE_ROWS = (1024, 2048, 4096)                                      # chunk sizes timed for ours
CE_CONFIGS = ((2048, 4), (8192, 16), (16384, 32))                 # (BLOCK_V, num_warps) of the row kernel
MATMUL_TFLOPS = 700.0                                              # the floor: 6 N d V at ~700 TF/s


def ce_measure(fn, reps=8):
    """(ms, extra peak GiB) of fn(): CUDA-event median (L2 flushed), and the peak memory allocated during one call
    above what was allocated before it (the inputs), the returned gradients included."""
    fn()  # compiles (Triton, torch.compile) outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    return time_ms(fn, reps=reps, warmup=2), extra


def cross_entropy_bench():
    """Forward + backward (gradients of h and W) of the head's loss at N = 16384 tokens, bf16 h and W, every
    implementation in one run; ours at several chunk sizes and kernel configs; an autocast row with fp32 W."""
    import kernels.cross_entropy as ce
    liger = _liger("fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    rows, N = [], CE_TOKENS
    for d, V, name in CE_SHAPES:
        torch.manual_seed(0)
        h = leaf(torch.randn(N, d, device=DEVICE, dtype=DTYPE))
        w = leaf(torch.randn(V, d, device=DEVICE, dtype=DTYPE) * d ** -0.5)
        t = torch.randint(0, V - 1, (N,), device=DEVICE)
        floor_ms = 6 * N * d * V / (MATMUL_TFLOPS * 1e12) * 1e3
        mm_ms = time_ms(lambda: h.detach() @ w.detach().t(), reps=10, warmup=2)  # the logits matmul, measured
        compiled = torch.compile(ce.linear_cross_entropy_torch, dynamic=False)
        impls = {"eager twin": ce.linear_cross_entropy_torch, "compile twin": compiled}
        if liger is not None:
            impls["liger"] = lambda h, w, t: liger.apply(h, w, t, None, None, -1)[0]
        for r in CE_ROWS:
            impls[f"ours rows={r}"] = lambda h, w, t, r=r: ce.linear_cross_entropy(h, w, t, rows=r)
        ours = f"ours rows={ce.chunk_rows(V, DTYPE)} (default)"
        impls[ours] = ce.linear_cross_entropy
        for impl, fn in impls.items():
            try:
                ms, gib = ce_measure(lambda: torch.autograd.grad(fn(h, w, t), (h, w)))
            except Exception as e:  # a failing peer is reported, not fatal
                print(f"  cross_entropy {name} / {impl}: failed ({type(e).__name__}: {str(e)[:200]})")
                continue
            rows.append([f"d{d} V{V} ({name})", impl, ms, gib, floor_ms / ms, 3 * mm_ms / ms])
            print(f"  {rows[-1][0]:<26} {impl:<22} {ms:8.2f} ms  +{gib:6.3f} GiB  (floor {floor_ms:.1f} ms, "
                  f"3 x measured logits matmul {3 * mm_ms:.1f} ms)", flush=True)
        if name != "gpt2":  # the row kernel's launch config, at the default chunk size
            defaults = ce.BLOCK_V, ce.NUM_WARPS
            for block, warps in CE_CONFIGS:
                ce.BLOCK_V, ce.NUM_WARPS = block, warps
                ms, gib = ce_measure(lambda: torch.autograd.grad(ce.linear_cross_entropy(h, w, t), (h, w)))
                rows.append([f"d{d} V{V} ({name})", f"ours BLOCK_V={block} warps={warps}", ms, gib,
                             floor_ms / ms, 3 * mm_ms / ms])
                print(f"  {rows[-1][1]:<40} {ms:8.2f} ms", flush=True)
            ce.BLOCK_V, ce.NUM_WARPS = defaults
        if name == "lrc":  # train.py's setup: fp32 weights, bf16 autocast (h arrives in bf16 from the last norm)
            w32 = leaf(w.detach().float())
            for impl in ("eager twin", "compile twin", ours):
                def step(fn=impls[impl]):
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = fn(h, w32, t)
                    torch.autograd.grad(loss, (h, w32))
                ms, gib = ce_measure(step)
                rows.append([f"d{d} V{V} ({name})", f"{impl}, fp32 W + autocast", ms, gib, floor_ms / ms,
                             3 * mm_ms / ms])
                print(f"  {rows[-1][1]:<40} {ms:8.2f} ms  +{gib:6.3f} GiB", flush=True)
            del w32
        if name == "parchment":  # where ours spends its time (profiler; kept for the end: it slows later launches)
            profile = (h, w, t)
        else:
            del h, w, t
        del impls, compiled
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    h, w, t = profile
    dev_ms, per_kernel = gpu_ms(lambda: torch.autograd.grad(ce.linear_cross_entropy(h, w, t), (h, w)), reps=5)
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8]
    breakdown = "; ".join(f"{k[:60]} {v:.2f} ms" for k, v in top)
    print(f"  parchment, ours (default): GPU {dev_ms:.2f} ms: {breakdown}", flush=True)
    notes = (f"N = {N} tokens, bf16 h and W (except the autocast rows: fp32 W), forward + backward (gradients of h "
             f"and W, torch.autograd.grad). ms: CUDA-event median, L2 flushed. +GiB: peak memory allocated during a "
             f"call above what was allocated before it (h, W, targets), the returned gradients included. "
             f"'x floor': the issue's matmul floor (6 N d V at {MATMUL_TFLOPS:.0f} TF/s) / ms; 'x 3 mm': three times "
             f"the measured N x d x V logits matmul / ms. Liger-Kernel FLCE as installed (its default chunking). "
             f"Ours at parchment's shape, GPU time by kernel (profiler): {dev_ms:.2f} ms = {breakdown}.")
    write_results("cross_entropy", ["shape", "impl", "ms", "+GiB", "x floor", "x 3 mm"], rows, notes)


def cross_entropy_model(presets=("parchment_166m", "lrc_1p5b"), steps=3):
    """Training steps of whole presets at their own micro-batch (fp32 weights, bf16 autocast, fused AdamW, eager:
    no torch.compile, to keep this short), with the head's loss fused (cross_entropy=triton) and not (=torch):
    peak GiB allocated and tokens/s. The same other kernels (auto) in both."""
    from configurator import read_config_file
    from model import GPT, GPTConfig
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for preset in presets:
        cfg = read_config_file(os.path.join(root, "config", f"{preset}.py"))
        model_cfg = GPTConfig.from_dict(cfg)
        B, T = cfg["batch_size"], model_cfg.block_size
        torch.manual_seed(0)
        with torch.device(DEVICE):  # initialised on the GPU: a 1.5B model's init on the host takes a while
            model = GPT(model_cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randint(0, model_cfg.vocab_size, (B, T), device=DEVICE)
        y = torch.randint(0, model_cfg.vocab_size, (B, T), device=DEVICE)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for spec in ("auto,cross_entropy=torch", "auto,cross_entropy=triton"):
            set_backend(spec)
            try:
                step()  # the optimizer's state is allocated here, before the peak is reset
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                ms = time_ms(step, reps=steps, warmup=0, flush_l2=False)
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                rows.append([preset, f"{B}x{T}", spec, "OOM", float("nan"), float("nan")])
                print(f"  {preset} {B}x{T} kernels={spec}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            gib = torch.cuda.max_memory_allocated() / 2**30
            rows.append([preset, f"{B}x{T}", spec, gib, B * T / ms * 1e3, ms])
            print(f"  {preset} {B}x{T} kernels={spec:<28} peak {gib:6.2f} GiB  {B * T / ms * 1e3:9.0f} tok/s", flush=True)
        del model, opt
        torch.cuda.empty_cache()
    set_backend("triton")
    write_results("cross_entropy_model", ["preset", "micro-batch", "kernels", "peak GiB", "tok/s", "ms/step"], rows,
                  f"Eager (no torch.compile) training steps: fp32 weights, bf16 autocast, fused AdamW, random tokens, "
                  f"median of {steps} steps after one. Peak: torch.cuda.max_memory_allocated over those steps.")


CASES = dict(rmsnorm=((rmsnorm_case, (16384, 4096)), (rmsnorm_case, (16384, 2048))),
             add_rmsnorm=((add_rmsnorm_case, (16384, 768)), (add_rmsnorm_case, (16384, 2048))),
             rope=((rope_case, (8, 32, 8, 2048, 128)),),
             swiglu=((swiglu_case, (16384, 8192)), (swiglu_packed_case, (16384, 8192))))
MODEL_SPECS = "torch;auto;auto,rmsnorm=torch;auto,rope=torch;auto,swiglu=torch;auto,attention=torch"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch configs")
    parser.add_argument("--only", default="rmsnorm,add_rmsnorm,rope,swiglu", help="comma-separated subset of the cases")
    parser.add_argument("--no_table", action="store_true", help="skip the peer table (with --sweep / --model)")
    parser.add_argument("--model", action="store_true",
                        help="(alone) time a compiled GPT-2 124M micro-step per kernels spec")
    parser.add_argument("--model_layers", type=int, default=12)
    parser.add_argument("--model_specs", default=MODEL_SPECS, help="';'-separated NANOFORGE_KERNELS specs")
    parser.add_argument("--model_profile", default="torch;auto", help="';'-separated specs to profile by family")
    parser.add_argument("--cross_entropy", action="store_true",
                        help="(alone) the fused head + loss against its peers: ms and extra peak GiB")
    parser.add_argument("--cross_entropy_model", action="store_true",
                        help="(alone, or after --cross_entropy) whole-preset training steps, loss fused or not")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    if args.cross_entropy or args.cross_entropy_model:
        set_backend("triton")
        if args.cross_entropy:
            cross_entropy_bench()
        return cross_entropy_model() if args.cross_entropy_model else None
    if args.model:  # alone in its process: a profiler run before it would slow its wall times (measure_gpu)
        return model_step(args.model_layers, args.model_specs.split(";"), args.model_profile.split(";"))
    set_backend("triton")  # 'ours' is the Triton path, whatever NANOFORGE_KERNELS says
    if not args.no_table:
        copy_gbs = copy_bandwidth_gbs()
        print(f"{gpu_name()}: copy bandwidth {copy_gbs:.0f} GB/s")
        rows, summary = [], {}
        cases = [make(*shape) for name in args.only.split(",") for make, shape in CASES[name]]
        for case in cases:
            measure_wall(case)
        for case in cases:
            measure_gpu(case)
            report(case, copy_gbs, rows, summary)
        del cases
        torch.cuda.empty_cache()
        targets = check_targets(summary, copy_gbs)
        notes = (f"bf16. Copy bandwidth {copy_gbs:.0f} GB/s. GB/s counts the minimum traffic (RMSNorm 2 / 5 elements "
                 f"per element fwd / fwd+bwd, RoPE 2 / 4 per q and k element, SwiGLU 3 / 8 per output element); "
                 f"'vs best peer' = best peer's time / this time (> 1: faster than every peer). Liger's RoPE runs "
                 f"on contiguous q, k (it needs them); everyone else reads q, k as strided views of a fused qkv. "
                 f"ms, GB/s, % of copy and vs best peer are wall times of eager calls (CUDA events, L2 flushed, "
                 f"host time included where the GPU waits for Python); GPU ms and GPU GB/s count the kernels' "
                 f"device time alone (profiler), host us is the Python time per call.\n\n"
                 f"Targets (fwd+bwd):\n" + "\n".join(targets))
        write_results("kernels", ["case", "pass", "impl", "ms", "GB/s", "% of copy", "vs best peer", "GPU ms",
                                  "GPU GB/s", "host us"], rows, notes)
        plot(rows, copy_gbs, os.path.join(RESULTS_DIR, "kernels.png"))
    if args.sweep:
        sweep()


if __name__ == "__main__":
    main()
