"""
Benchmark: our Triton flash attention against PyTorch's SDPA with each of its fused backends forced.

    python bench/attention.py            (one GPU; ~2-3 minutes, the first call of each head dim autotunes)

Causal attention, bf16, inputs laid out as the model makes them: (B, T, H, D) tensors viewed as (B, H, T, D).
Throughput convention (stated in the output, as in DESIGN.md): causal forward = 2 * B * Hq * T^2 * D FLOPs
(the two matmuls, 4 * B * Hq * T^2 * D, halved by the causal mask); forward + backward = 3.5 x that.
The same numerator serves every implementation, so TFLOP/s compares like with like (it is not hardware
utilisation: our backward does 7 matmuls per tile where FLOPs counts 5, see kernels/attention.py).

Ours twice: the default backward (deterministic: a dK/dV kernel and a dQ kernel) and the opt-in one that adds
dQ with fp32 atomics inside the dK/dV kernel (NANOFORGE_ATTN_DETERMINISTIC=0). Every autotuning candidate's
time is printed and written to the notes, so the tuning lists in kernels/attention.py can be checked.
Peers, each forced with torch.nn.attention.sdpa_kernel: FLASH_ATTENTION (FlashAttention-2), CUDNN_ATTENTION,
EFFICIENT_ATTENTION (xformers' memory-efficient kernel). GQA shapes use enable_gqa=True; a backend that refuses
a shape is reported as 'n/a'. Each timing is the median of CUDA-event timed calls queued back to back with the
L2 flushed before each (GPU time: the host launches the next call while the GPU runs this one, as in training);
the host's own time per call (Python, checks, launches) is a separate column, since it decides speed only when
the GPU runs out of queued work. NANOFORGE_ATTN_TUNE=wide widens the autotuner's search (kernels/attention.py).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import RESULTS_DIR, gpu_name, host_us, time_ms, write_results  # noqa: E402
from kernels import attention as A  # noqa: E402
from kernels import attention_tuning as AT  # noqa: E402

SHAPES = [  # (B, Hq, Hkv, T, D)
    (4, 16, 16, 4096, 128),
    (4, 16, 4, 4096, 128),
    (16, 12, 12, 1024, 64),
    (1, 16, 4, 16384, 128),
]
# bf16 causal fwd+bwd TFLOP/s targets on an H100 (1.3x SDPA-flash), and forward at T4096 D128
TARGET_FWD_BWD = {SHAPES[0]: 264, SHAPES[1]: 258, SHAPES[2]: 151, SHAPES[3]: 316}
TARGET_FWD = {SHAPES[0]: 400, SHAPES[1]: 400}


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return run


def implementations():
    from torch.nn.attention import SDPBackend
    return {
        "ours (Triton)": lambda q, k, v: A.attention_triton(q, k, v, causal=True, deterministic=True),
        "ours, atomic dQ": lambda q, k, v: A.attention_triton(q, k, v, causal=True, deterministic=False),
        "SDPA flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION),
        "SDPA efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }


def make_inputs(B, Hq, Hkv, T, D):
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    return q, k, v, torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)


def measure(fn, q, k, v, do):
    """(forward ms, forward+backward ms, host us forward, host us forward+backward), or None where the
    implementation refuses the shape. The ms are GPU time of calls queued back to back (time_ms(queued=True)),
    the throughput a training step sees while the GPU stays busy; host us is the Python + launch cost per call,
    which only shows when a call's GPU work is shorter than it (small shapes, or eager code with idle gaps)."""
    try:
        with torch.no_grad():
            fn(q, k, v)  # first call: compile / autotune / refuse
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    except RuntimeError as e:
        print(f"    refused: {str(e).splitlines()[0][:120]}")
        return None

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    return (time_ms(fwd, reps=30, warmup=5, queued=True), time_ms(fwd_bwd, reps=20, warmup=3, queued=True),
            host_us(fwd), host_us(fwd_bwd))


def main():
    assert torch.cuda.is_available(), "bench/attention.py needs a CUDA GPU"
    torch.manual_seed(0)
    impls = implementations()
    rows, results = [], {}
    for shape in SHAPES:
        B, Hq, Hkv, T, D = shape
        name = f"B{B} Hq{Hq} Hkv{Hkv} T{T} D{D}"
        flops = 2 * B * Hq * T * T * D  # causal forward convention
        q, k, v, do = make_inputs(*shape)
        with torch.no_grad():  # sanity: a fast wrong kernel must not be reported
            err = (A.attention_triton(q, k, v) - A.attention_torch(q, k, v)).abs().max().item()
        assert err < 0.05, f"{name}: ours differs from SDPA by {err}"
        print(f"{name}: max |ours - SDPA| = {err:.2e}")
        for impl, fn in impls.items():
            ms = measure(fn, q, k, v, do)
            results[(shape, impl)] = ms
            if ms is None:
                rows.append([name, impl] + ["n/a"] * 6)
                continue
            tf_fwd, tf_all = flops / ms[0] / 1e9, 3.5 * flops / ms[1] / 1e9
            rows.append([name, impl, ms[0], tf_fwd, ms[1], tf_all, ms[2], ms[3]])
            print(f"  {impl:16s} fwd {ms[0]:8.3f} ms {tf_fwd:6.1f} TFLOP/s   fwd+bwd {ms[1]:8.3f} ms {tf_all:6.1f} "
                  f"TFLOP/s   host {ms[2]:5.0f} / {ms[3]:5.0f} us")
        del q, k, v, do
        torch.cuda.empty_cache()

    # ratios to the two strongest peers, and the targets
    ratio_lines = []
    for shape in SHAPES:
        B, Hq, Hkv, T, D = shape
        ours = results[(shape, "ours (Triton)")]
        for peer in ("SDPA flash", "SDPA cuDNN"):
            them = results[(shape, peer)]
            if ours and them:
                ratio_lines.append(f"B{B} Hq{Hq} Hkv{Hkv} T{T} D{D} vs {peer}: fwd {them[0] / ours[0]:.2f}x, "
                                   f"fwd+bwd {them[1] / ours[1]:.2f}x")
        atomic, flash = results[(shape, "ours, atomic dQ")], results[(shape, "SDPA flash")]
        if atomic and flash:
            ratio_lines.append(f"B{B} Hq{Hq} Hkv{Hkv} T{T} D{D} ours, atomic dQ vs SDPA flash: "
                               f"fwd+bwd {flash[1] / atomic[1]:.2f}x")
        flops = 2 * B * Hq * T * T * D
        goal = [f"fwd+bwd {3.5 * flops / ours[1] / 1e9:.0f} (target {TARGET_FWD_BWD[shape]})"]
        if shape in TARGET_FWD:
            goal.append(f"fwd {flops / ours[0] / 1e9:.0f} (target {TARGET_FWD[shape]})")
        ratio_lines.append(f"B{B} Hq{Hq} Hkv{Hkv} T{T} D{D} ours TFLOP/s: " + ", ".join(goal))
    print("\n".join(ratio_lines))
    tuned = "; ".join(f"{k[0]} D{k[1]} {str(k[3]).replace('torch.', '')}: BLOCK_M,BLOCK_N,warps,stages"
                      f"[,maxnreg]={v}" for k, v in AT._tuned.items())
    candidates = "\n".join(f"- {k[0]} D{k[1]}: " + ", ".join(f"{c} {ms * 1000:.0f} us" for c, ms in v.items())
                           for k, v in AT.tune_log.items())
    print("autotuning candidates (kernel time at the first shape of each head dim):\n" + candidates)
    notes = ("Causal, bf16, (B, T, H, D) views. TFLOP/s convention: causal forward = 2*B*Hq*T^2*D FLOPs, "
             "forward+backward = 3.5x that (same numerator for every implementation). ms: median GPU time of "
             "calls queued back to back (L2 flushed before each); host us: Python + launch time per call. "
             "Speed-ups are peer ms / our ms (> 1: ours faster).\n\n" + "\n".join(f"- {line}" for line in ratio_lines)
             + f"\n\nAutotuned configs: {tuned or 'none (NANOFORGE_ATTN_AUTOTUNE=0)'}"
             + "\n\nEvery candidate timed by the autotuner (kernel alone; first shape of each head dim):\n"
             + candidates)
    write_results("attention", ["shape", "implementation", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms",
                                "fwd+bwd TFLOP/s", "host us fwd", "host us fwd+bwd"], rows, notes)
    plot(rows)


def plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(r[0] for r in rows))
    impls = list(dict.fromkeys(r[1] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(impls)
    for ax, col, title in ((axes[0], 3, "causal forward"), (axes[1], 5, "causal forward + backward")):
        for i, impl in enumerate(impls):
            vals = [next((r[col] for r in rows if r[0] == s and r[1] == impl and r[col] != "n/a"), 0)
                    for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
        ax.set_xticklabels([s.replace(" T", "\nT") for s in shapes], fontsize=8)
        ax.set_ylabel("TFLOP/s (causal fwd = 2*B*H*T^2*D; fwd+bwd = 3.5x)")
        ax.set_title(f"{title}, bf16, {gpu_name()}")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    path = os.path.join(RESULTS_DIR, "attention.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
