"""
Block configs and autotuning for kernels/attention.py: which tile sizes each of its kernels runs with.

A flash-attention kernel's speed depends on its tiles more than on anything else in it: how many query rows and
key columns a program holds (BLOCK_M, BLOCK_N), how many warps share the tile, how many loads are in flight
(num_stages), and how many registers each thread may take (maxnreg, which decides how many programs fit on an SM
at once). The best choice depends on the GPU, the head dim and the Triton version, so it is measured, not
guessed: the first launch of each (kernel, head dim, causal, dtype) times every candidate below on the real
arguments and keeps the fastest for the rest of the process.
"""
import os

import torch

from kernels import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.testing

# A config is (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]). Rules the kernels rely on: BLOCK_M % BLOCK_N
# == 0 in the forward and dQ kernels (the causal diagonal starts on a key-block boundary), BLOCK_N % BLOCK_M == 0
# in the dK/dV kernel (the same, transposed). maxnreg caps the registers per thread, so that more programs share
# an SM (65536 registers per SM: 4 programs of 4 warps fit at <= 128 registers): the backward loops are
# latency-bound, and other programs are what hides the latency. "fused" is the dK/dV kernel with dQ by atomics.
# The interpreter gets small blocks, so small tests cover several blocks, a partial last block and a diagonal
# split over two tiles.
INTERPRETER_CONFIGS = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1), "fused": (32, 64, 4, 1)}
# fp32 on a GPU: exact products (input_precision "ieee") run on the FMA units, not tensor cores, and need many
# more registers per tile; these small tiles compile without spills (a correctness path, not a fast one).
FP32_CONFIGS = {"fwd": {64: (32, 16, 4, 1), 128: (16, 16, 4, 1)},
                "dkdv": {64: (16, 32, 4, 1), 128: (16, 32, 4, 1)},
                "dq": {64: (32, 16, 4, 1), 128: (16, 16, 4, 1)},
                "fused": {64: (16, 32, 4, 1), 128: (16, 32, 4, 1)}}


def default_config(kind, head_dim, dtype):
    """The config used without autotuning (tests, NANOFORGE_ATTN_AUTOTUNE=0): the first tuning candidate."""
    if interpreting():
        return INTERPRETER_CONFIGS[kind]
    size = 128 if head_dim > 64 else 64
    return FP32_CONFIGS[kind][size] if dtype == torch.float32 else TUNE_CONFIGS[kind][size][0]


# The autotuning search space for 16-bit inputs on a GPU, per head dim (64 stands for <= 64): the fastest few of
# the wide search below as timed on an H100 (Triton 3.6, bench/attention.py with NANOFORGE_ATTN_TUNE=wide at
# B16 H12 T1024 D64 and B4 H16 T4096 D128; every candidate's time: bench/results/attention_wide_search_h100.md).
# A config is (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg[, DIAG_SPLIT]]): maxnreg caps registers per
# thread (0: no cap), DIAG_SPLIT (dK/dV only) masks only the diagonal and last blocks (see _dkdv_inner in
# kernels/attention.py). Timed once per (kernel, head dim, causal, dtype), so the first call of a run pays ~5 compiles per kernel and head dim (Triton
# caches them on disk after that). The first entry is the default when not tuning.
TUNE_CONFIGS = {
    "fwd": {64: [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (128, 64, 8, 3)],
            128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 32, 4, 3)]},
    "dkdv": {64: [(32, 128, 4, 2), (16, 64, 4, 3), (32, 64, 4, 3, 0, 1), (16, 64, 4, 2, 128), (32, 64, 4, 3)],
             128: [(64, 128, 8, 1, 0, 1), (32, 64, 4, 2, 0, 1), (64, 128, 8, 2), (64, 128, 8, 2, 0, 1),
                   (64, 64, 4, 2, 0, 1)]},
    "dq": {64: [(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3, 128), (64, 32, 4, 4)],
           128: [(128, 64, 8, 3), (128, 32, 8, 3, 128), (64, 32, 4, 4), (128, 32, 8, 3)]},
    "fused": {64: [(16, 64, 4, 3, 168), (32, 64, 4, 2, 0, 1), (32, 64, 4, 2)],
              128: [(32, 128, 8, 2, 0, 1), (32, 128, 8, 1), (32, 128, 8, 2)]},
}
# NANOFORGE_ATTN_TUNE=wide adds these to the search (for a new GPU or Triton version: the winners belong in the
# short lists above). Some are here to show what does not pay: 4 warps on 128-key dK/dV tiles at D 128 ran
# 2.4-3x slower than 8 on an H100.
WIDE_CONFIGS = {
    "fwd": {64: [(128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 2),
                 (128, 128, 8, 4), (64, 32, 4, 4), (128, 32, 4, 3)],
            128: [(128, 32, 8, 4), (128, 64, 8, 2), (64, 64, 4, 4), (128, 128, 8, 2), (128, 64, 4, 3),
                  (64, 64, 4, 2), (128, 32, 4, 3), (128, 128, 8, 1)]},
    "dkdv": {64: [(16, 64, 4, 2, 128), (32, 64, 8, 2, 128), (16, 64, 4, 3, 128), (16, 64, 4, 3, 0, 1),
                  (32, 64, 4, 2), (32, 128, 8, 2), (32, 128, 8, 2, 0, 1), (64, 64, 4, 2), (16, 128, 8, 3),
                  (16, 64, 4, 4), (64, 128, 8, 2), (16, 32, 4, 3), (32, 64, 4, 4), (32, 128, 4, 2, 0, 1),
                  (64, 64, 4, 2, 0, 1), (64, 128, 8, 1, 0, 1)],
             128: [(32, 128, 8, 1), (32, 128, 8, 2), (16, 128, 8, 2), (16, 128, 8, 3), (16, 64, 4, 3),
                   (32, 128, 8, 1, 0, 1), (32, 128, 8, 2, 0, 1), (64, 128, 8, 1), (32, 128, 4, 1), (32, 64, 4, 2),
                   (64, 64, 4, 2), (64, 64, 8, 2), (16, 128, 8, 1, 0, 1), (32, 128, 8, 3), (16, 64, 4, 3, 0, 1),
                   (64, 128, 8, 3, 0, 1), (32, 64, 4, 3, 0, 1), (64, 64, 4, 3, 0, 1), (64, 128, 8, 1, 168, 1)]},
    "dq": {64: [(64, 64, 4, 3, 128), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 4),
                (128, 32, 4, 3), (64, 64, 4, 2), (128, 128, 8, 3)],
           128: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 4),
                 (128, 128, 8, 1), (128, 128, 8, 2)]},
    "fused": {64: [(16, 64, 4, 2), (32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 3, 168, 1)],
              128: [(16, 128, 8, 2), (32, 64, 8, 2), (16, 128, 8, 3), (64, 128, 8, 1, 0, 1)]},
}
TUNE_WIDE = os.environ.get("NANOFORGE_ATTN_TUNE", "") == "wide"


def _fits(kind, config, head_dim):
    """The kernels' block rules (BLOCK_M % BLOCK_N == 0 in fwd and dQ, the transpose in dK/dV) and the shared
    memory budget."""
    bm, bn = config[:2]
    aligned = bn % bm == 0 if kind in ("dkdv", "fused") else bm % bn == 0
    return aligned and _smem_bytes(kind, config, head_dim) <= SMEM_LIMIT


def _smem_bytes(kind, config, head_dim, elt=2):
    """Shared memory a config needs, roughly: the pipelined tiles times the stages plus what stays resident."""
    bm, bn, _, stages = config[:4]
    if kind == "fwd":   # Q resident, K and V tiles streamed
        return elt * head_dim * (bm + 2 * bn * stages)
    if kind == "dkdv":  # K, V resident, Q and dO tiles streamed
        return elt * head_dim * (2 * bn + 2 * bm * stages)
    if kind == "fused":  # as dK/dV, plus dS^T restaged for dQ = dS K and a second copy of K
        return elt * head_dim * (3 * bn + 2 * bm * stages) + elt * bm * bn
    return elt * head_dim * (2 * bm + 2 * bn * stages)  # dq: Q, dO resident, K and V streamed


SMEM_LIMIT = 160 * 1024  # of the H100's 227 KiB per block: leave room for the compiler's own scratch
AUTOTUNE = os.environ.get("NANOFORGE_ATTN_AUTOTUNE", "1") == "1"
_tuned = {}  # (kind, head_dim, causal, dtype) -> best config, found once by timing the candidates
tune_log = {}  # the same key -> {config: ms} for every candidate timed (bench/attention.py prints it)


def pick_config(kind, launch, head_dim, causal, dtype, tracing=False):
    """The config for this launch: fixed under the interpreter / fp32 / AUTOTUNE off, else the fastest of
    TUNE_CONFIGS (pruned to what fits in shared memory), timed once on the real arguments and remembered.
    launch(config) runs the kernel; every kernel here overwrites its outputs, so timing it repeatedly is safe.
    tracing: torch.compile is recording the launch on shape-only tensors, so nothing can be timed: the config
    an eager call already found, else the default; without maxnreg, which a recorded launch cannot pass."""
    key = (kind, head_dim, causal, dtype)
    if tracing:
        config = _tuned.get(key) or default_config(kind, head_dim, dtype)
        return tuple(config[:4]) + (0,) + tuple(config[5:])
    if interpreting() or dtype == torch.float32 or not AUTOTUNE:
        return default_config(kind, head_dim, dtype)
    if key not in _tuned:
        timings, error = {}, None
        size = 128 if head_dim > 64 else 64
        for config in TUNE_CONFIGS[kind][size] + (WIDE_CONFIGS[kind][size] if TUNE_WIDE else []):
            if not _fits(kind, config, head_dim):
                continue
            try:
                timings[config] = triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20)
            except Exception as e:  # a config the compiler rejects (out of shared memory / registers): skip
                error = e
        if not timings:
            raise RuntimeError(f"attention: no {kind} config compiled for head dim {head_dim}") from error
        _tuned[key] = min(timings, key=timings.get)
        tune_log[key] = timings
    return _tuned[key]
