"""
Benchmark: our Triton RMSNorm, RoPE and SwiGLU against their peers, forward and forward + backward, on one GPU.

    python bench/kernels.py              # table + plot in bench/results/ (env BENCH_OUT); 1-2 minutes, mostly
                                         # torch.compile of the peers
    python bench/kernels.py --sweep      # also time alternative launch configs of our kernels (tuning data)

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
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import RESULTS_DIR, copy_bandwidth_gbs, gpu_name, time_ms, write_results  # noqa: E402
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
def time_impl(fn, inputs, grads):
    """(ms forward, ms forward + backward)."""
    def fwd():
        return fn(*inputs)

    def fwd_bwd():
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out, inputs, grads)

    fwd_bwd()  # first call: compiles (Triton, torch.compile) outside the timed region
    return time_ms(fwd), time_ms(fwd_bwd)


def run_case(case, copy_gbs, rows, summary):
    results = {}
    for impl, fn in case["impls"].items():
        fn, inputs = fn if isinstance(fn, tuple) else (fn, case["inputs"])
        try:
            results[impl] = time_impl(fn, inputs, case["grads"])
        except Exception as e:  # a peer that fails is reported, not fatal
            print(f"  {case['name']} / {impl}: failed ({type(e).__name__}: {str(e)[:200]})")
    for p, (pass_name, nbytes) in enumerate((("fwd", case["bytes_fwd"]), ("fwd+bwd", case["bytes_fb"]))):
        peers = {k: v[p] for k, v in results.items() if k != "ours"}
        best_peer = min(peers, key=peers.get) if peers else None
        for impl, times in results.items():
            ms = times[p]
            gbs = nbytes / (ms * 1e-3) / 1e9
            vs_best = peers[best_peer] / ms if best_peer else float("nan")  # > 1: faster than the best peer
            rows.append([case["name"], pass_name, impl, ms, gbs, 100 * gbs / copy_gbs, vs_best])
        if "ours" in results and best_peer:
            ours = results["ours"][p]
            summary[(case["name"], pass_name)] = dict(ours_gbs=nbytes / (ours * 1e-3) / 1e9,
                                                      peers={k: nbytes / (v * 1e-3) / 1e9 for k, v in peers.items()})
            print(f"  {case['name']:<40} {pass_name:<8} ours {ours:.3f} ms = "
                  f"{nbytes / (ours * 1e-3) / 1e9:6.0f} GB/s; best peer {best_peer} {peers[best_peer]:.3f} ms: "
                  f"ours is {peers[best_peer] / ours:.2f}x")


def check_targets(summary, copy_gbs):
    """The issue's targets (H100, bf16, forward + backward)."""
    lines = []

    def target(key, goal_gbs, what):
        if key not in summary:
            return
        got = summary[key]["ours_gbs"]
        ok = "MET" if got >= goal_gbs else "MISSED"
        lines.append(f"- {key[0]} {key[1]}: {got:.0f} GB/s vs target {goal_gbs:.0f} ({what}): {ok}")

    target(("RMSNorm 16384x4096", "fwd+bwd"), 0.85 * copy_gbs, "85% of copy")
    target(("RMSNorm 16384x2048", "fwd+bwd"), 0.80 * copy_gbs, "80% of copy")
    for key, s in summary.items():
        if key[0].startswith("RoPE") and key[1] == "fwd+bwd" and "compile twin" in s["peers"]:
            target(key, s["peers"]["compile twin"], "torch.compile")
        if key[0].startswith("SwiGLU") and key[1] == "fwd+bwd" and "compile twin" in s["peers"]:
            target(key, 0.95 * s["peers"]["compile twin"], "95% of torch.compile")
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
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=impl)
    ax.axhline(copy_gbs, color="k", ls="--", lw=1, label=f"copy {copy_gbs:.0f} GB/s")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{g[0]}\n{g[1]}".replace(" ", "\n", 1) for g in groups], fontsize=7)
    ax.set_ylabel("GB/s (minimum traffic / time)")
    ax.set_title(f"nanoforge kernels, bf16, {gpu_name()}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------------------
# --sweep: alternative launch configs of our kernels, for tuning (the fixed rules live in kernels/*.py)
# ----------------------------------------------------------------------------------------------------------
SWEEP_SHAPES = dict(rmsnorm=((16384, 4096), (16384, 2048)), swiglu=(16384, 8192), rope=(8, 32, 8, 2048, 128))


def sweep():
    print("\n--sweep: our kernels under other launch configs (ms; the default config first)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M, N in SWEEP_SHAPES["rmsnorm"]:
        x = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
        w = torch.randn(N, device=DEVICE, dtype=DTYPE)
        dy = torch.randn_like(x)
        default_fwd, default_bwd = rms._fwd_config, rms._bwd_config
        for BM, nw in [default_fwd(M, N)[::2], (1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16)]:
            rms._fwd_config = lambda M_, N_, BM=BM, nw=nw: (BM, triton_next_pow2(N_), nw)
            ms = time_ms(lambda: rms._rmsnorm_fwd(x, w, EPS))
            print(f"  rmsnorm fwd {M}x{N} BLOCK_M={BM} warps={nw}: {ms:.3f} ms {4 * M * N / ms / 1e6:.0f} GB/s")
        rms._fwd_config = default_fwd
        _, rstd = rms._rmsnorm_fwd(x, w, EPS)
        BM0, _, nw0, G0 = default_bwd(M, N, 0)
        for BM, nw, per_sm in [(BM0, nw0, G0 / sms), (1, 8, 1), (1, 8, 2), (1, 16, 1), (2, 8, 1), (2, 16, 1),
                               (2, 16, 2), (4, 16, 1), (1, 4, 4)]:
            rms._bwd_config = lambda M_, N_, d, BM=BM, nw=nw, per_sm=per_sm: (
                BM, triton_next_pow2(N_), nw, max(1, min(int(per_sm * sms), -(-M_ // BM))))
            ms = time_ms(lambda: rms._rmsnorm_bwd(dy, x, w, rstd))
            print(f"  rmsnorm bwd {M}x{N} BLOCK_M={BM} warps={nw} programs/SM={per_sm:.2f}: {ms:.3f} ms "
                  f"{6 * M * N / ms / 1e6:.0f} GB/s")
        rms._bwd_config = default_bwd
    M, Fdim = SWEEP_SHAPES["swiglu"]
    ab = torch.randn(M, 2 * Fdim, device=DEVICE, dtype=DTYPE)
    dc = torch.randn(M, Fdim, device=DEVICE, dtype=DTYPE)
    default = swi._grid_config
    for BM, BF, nw in [(None, None, None), (1, 1024, 4), (4, 1024, 4), (4, 1024, 8), (1, 2048, 8), (8, 1024, 8),
                       (2, 512, 4)]:
        if BM is not None:
            swi._grid_config = lambda M_, F_, BM=BM, BF=BF, nw=nw: (
                (-(-M_ // BM) * -(-F_ // BF),), dict(BLOCK_M=BM, BLOCK_F=BF, num_warps=nw))
        f = time_ms(lambda: swi._swiglu_packed_fwd(ab))
        b = time_ms(lambda: swi._swiglu_packed_bwd(dc, ab))
        print(f"  swiglu packed {M}x2*{Fdim} tile={BM or 'default'}x{BF or ''} warps={nw or ''}: fwd {f:.3f} ms "
              f"{6 * M * Fdim / f / 1e6:.0f} GB/s, bwd {b:.3f} ms {10 * M * Fdim / b / 1e6:.0f} GB/s")
        swi._grid_config = default
    B, Hq, Hkv, T, D = SWEEP_SHAPES["rope"]
    q = torch.randn(B, T, Hq, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=DTYPE)
    cos, sin = rope.rope_tables(D, T, 10000.0, device=DEVICE)
    default = rope._config
    for cap, nw in [(None, None), (1024, 4), (2048, 4), (4096, 8), (4096, 16), (1024, 2)]:
        if cap is not None:
            rope._config = lambda Hq_, Hkv_, D_, cap=cap, nw=nw: (
                min(triton_next_pow2(Hq_), max(1, cap // triton_next_pow2(D_ // 2))),
                min(triton_next_pow2(Hkv_), max(1, cap // triton_next_pow2(D_ // 2))), triton_next_pow2(D_ // 2), nw)
        ms = time_ms(lambda: rope._rope(q, k, cos, sin, False))
        nbytes = 2 * (q.numel() + k.numel()) * 2
        print(f"  rope fwd cap={cap or 'default'} warps={nw or ''}: {ms:.3f} ms {nbytes / ms / 1e6:.0f} GB/s")
        rope._config = default


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    set_backend("triton")  # 'ours' is the Triton path, whatever NANOFORGE_KERNELS says
    copy_gbs = copy_bandwidth_gbs()
    print(f"{gpu_name()}: copy bandwidth {copy_gbs:.0f} GB/s")
    rows, summary = [], {}
    for make, shape in ((rmsnorm_case, (16384, 4096)), (rmsnorm_case, (16384, 2048)),
                        (rope_case, (8, 32, 8, 2048, 128)), (swiglu_case, (16384, 8192)),
                        (swiglu_packed_case, (16384, 8192))):
        case = make(*shape)
        run_case(case, copy_gbs, rows, summary)
        del case
        torch.cuda.empty_cache()
    targets = check_targets(summary, copy_gbs)
    notes = (f"bf16. Copy bandwidth {copy_gbs:.0f} GB/s. GB/s counts the minimum traffic (RMSNorm 2 / 5 elements "
             f"per element fwd / fwd+bwd, RoPE 2 / 4 per q and k element, SwiGLU 3 / 8 per output element); "
             f"'vs best peer' = best peer's time / this time (> 1: faster than every peer). Liger's RoPE runs on "
             f"contiguous q, k (it needs them); everyone else reads q, k as strided views of a fused qkv.\n\n"
             f"Targets (fwd+bwd):\n" + "\n".join(targets))
    write_results("kernels", ["case", "pass", "impl", "ms", "GB/s", "% of copy", "vs best peer"], rows, notes)
    plot(rows, copy_gbs, os.path.join(RESULTS_DIR, "kernels.png"))
    if args.sweep:
        sweep()


if __name__ == "__main__":
    main()
