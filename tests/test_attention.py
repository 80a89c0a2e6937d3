"""
Tests for kernels/attention.py: the Triton flash attention (forward, LSE, dQ, dK, dV) against an explicit
reference and against the twin (SDPA), under the 2x rule (tests/tolerance.py).

The reference is the textbook computation, written out so nothing is shared with the kernel: repeat K and V per
query group, S = c Q K^T, the causal mask, softmax, P V; in fp64 for fp32 inputs (CPU), in fp32 for 16-bit ones.
Inputs are made the way the model makes them: (B, T, H, D) tensors viewed as (B, H, T, D) by .transpose(1, 2).

CPU: the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) with small blocks (32 x 16), so
T = 17 and 129 cover a partial last block, several blocks, and diagonals split over two tiles. The interpreter
runs fp32 and fp16; its bf16 tl.dot is broken (Triton 3.9), so bf16 is checked on the GPU only.
GPU (@pytest.mark.gpu): the full sweep in bf16 and fp16 with the block configs used for speed, every autotuning
config, fp32, determinism, and torch.compile.
"""
import math

import pytest
import torch

import kernels
from kernels import attention as A
from kernels import attention_tuning as AT
from tolerance import assert_within_2x

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the small floor of the 2x rule, relative to the tensor's largest entry: two units in the last place for 16-bit
# results (their final rounding), 1e-5 for fp32 (summation-order noise, which SDPA may happen not to have)
FLOOR = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}


def make_qkv(B, Hq, Hkv, T, D, dtype, device=DEVICE, seed=0):
    """q, k, v as (B, H, T, D) views of (B, T, H, D) tensors, like the model's .transpose(1, 2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=g).to(device, dtype).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=g).to(device, dtype).transpose(1, 2)
    return q, k, v


def reference(q, k, v, do, causal, scale, dtype):
    """Explicit attention in `dtype` (fp64 / fp32): returns O, LSE, dQ, dK, dV."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference, whatever another test left set
    try:
        kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # GQA the expensive, obvious way
        s = (q @ kr.transpose(-1, -2)) * scale
        if causal:
            T = q.shape[2]
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        o = torch.softmax(s, -1) @ vr
        o.backward(do.to(dtype))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return o.detach(), torch.logsumexp(s, -1).detach(), q.grad, k.grad, v.grad


def twin(q, k, v, do, causal, scale):
    """The PyTorch twin (SDPA) in the dtype under test: O, LSE (from explicit scores), dQ, dK, dV."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = A.attention_torch(q, k, v, causal, scale)
    o.backward(do)
    group = q.shape[1] // k.shape[1]
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)).float() * c
    if causal:
        T = q.shape[2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return o.detach(), torch.logsumexp(s, -1), q.grad, k.grad, v.grad


def ours(q, k, v, do, causal, scale, deterministic=True):
    """The launchers directly (forward returns the LSE too); test_autograd_path checks the autograd wiring."""
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    o, lse = A._forward(q, k, v, causal, c)
    return (o, lse, *A._backward(do, q, k, v, o, lse, causal, c, deterministic))


def check(B, Hq, Hkv, T, D, causal, dtype, scale=None, device=DEVICE, seed=0, qkv=None, deterministic=True):
    q, k, v = qkv if qkv is not None else make_qkv(B, Hq, Hkv, T, D, dtype, device, seed)
    c = 1.0 / math.sqrt(D) if scale is None else scale
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    want = reference(q, k, v, do, causal, c, ref_dtype)
    same = twin(q, k, v, do, causal, scale)
    got = ours(q, k, v, do, causal, scale, deterministic)
    for name, g, s, r in zip(("O", "LSE", "dQ", "dK", "dV"), got, same, want):
        assert g.dtype == (torch.float32 if name == "LSE" else dtype), f"{name} dtype {g.dtype}"
        atol = FLOOR[torch.float32 if name == "LSE" else dtype] * max(1.0, r.abs().max().item())
        assert_within_2x(g, s, r, atol=atol, name=f"{name} (B{B} Hq{Hq} Hkv{Hkv} T{T} D{D} causal={causal})")


# ------------------------------------------------------------------------------------ CPU: interpreter
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 1)])  # group ratio 1 and 4
@pytest.mark.parametrize("T", [1, 17, 129])
def test_matches_reference(T, Hq, Hkv, B, causal):
    check(B, Hq, Hkv, T, 64, causal, torch.float32)


@pytest.mark.parametrize("T,causal", [(32, True), (48, False), (5, True)])
def test_block_multiples_and_short(T, causal):
    """T an exact multiple of the blocks (no tail), and a T shorter than one block."""
    check(1, 4, 1, T, 64, causal, torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_head_dim_128(causal):
    check(1, 2, 1, 33, 128, causal, torch.float32)


@pytest.mark.parametrize("D", [16, 32])
def test_small_head_dims(D):
    check(1, 2, 1, 20, D, True, torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_fp16(causal):
    check(2, 4, 2, 40, 64, causal, torch.float16)


def test_scale_and_peaked_softmax():
    """A large scale makes every row nearly one-hot: online softmax must not overflow or lose the max."""
    check(1, 2, 1, 37, 64, True, torch.float32, scale=2.0)


def test_other_layouts():
    """Contiguous (B, H, T, D) inputs, and q/k/v sliced out of one fused (B, T, 3, H, D) projection."""
    q, k, v = (x.contiguous() for x in make_qkv(1, 4, 2, 21, 64, torch.float32))
    check(1, 4, 2, 21, 64, True, torch.float32, qkv=(q, k, v))
    qkv = torch.randn(2, 19, 3, 2, 64, device=DEVICE)
    check(2, 2, 2, 19, 64, False, torch.float32, qkv=tuple(qkv[:, :, i].transpose(1, 2) for i in range(3)))


def test_square_blocks(monkeypatch):
    """Another block shape (16 x 16 everywhere): the diagonal is then exactly one tile."""
    monkeypatch.setattr(A, "pick_config", lambda kind, *args: (16, 16, 4, 1))
    check(1, 4, 2, 35, 64, True, torch.float32)


def test_small_blocks(monkeypatch):
    """32 x 16 tiles (16 x 32 for dK/dV): many blocks, and the diagonal split over two tiles, GQA with Hkv > 1."""
    configs = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
    monkeypatch.setattr(A, "pick_config", lambda kind, *args: configs[kind])
    check(2, 4, 2, 70, 64, True, torch.float32)
    check(1, 4, 2, 41, 64, False, torch.float32)


@pytest.mark.parametrize("deterministic", [True, False], ids=["two_kernels", "atomic_dq"])
@pytest.mark.parametrize("T,causal", [(70, True), (64, True), (41, False), (20, True)])
def test_dkdv_diag_split(T, causal, deterministic, monkeypatch):
    """DIAG_SPLIT (6th config entry): the dK/dV walk masked on the diagonal and the last partial block only, the
    unmasked loop between. T = 70: diagonal, bulk and a partial tail; 64: no tail; 20: all inside one key block."""
    configs = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1, 0, 1), "dq": (32, 16, 4, 1),
               "fused": (16, 32, 4, 1, 0, 1)}
    monkeypatch.setattr(A, "pick_config", lambda kind, *args: configs[kind])
    check(2, 4, 2, T, 64, causal, torch.float32, deterministic=deterministic)


def test_tuning_lists_follow_the_block_rules():
    """Every candidate, short list and wide, respects the kernels' block rules (or _fits prunes it: then it
    is dead weight in the list, so none may be pruned by the rules alone)."""
    for lists in (AT.TUNE_CONFIGS, AT.WIDE_CONFIGS):
        for kind, by_dim in lists.items():
            for D, configs in by_dim.items():
                for c in configs:
                    bm, bn = c[:2]
                    assert (bn % bm if kind in ("dkdv", "fused") else bm % bn) == 0, (kind, D, c)
                    assert len(c) <= (6 if kind in ("dkdv", "fused") else 5), (kind, D, c)


@pytest.mark.parametrize("B,Hq,Hkv,T,D,causal", [(2, 4, 2, 70, 64, True), (1, 4, 1, 41, 64, False),
                                                (1, 2, 2, 129, 64, True), (1, 2, 1, 33, 128, True),
                                                (1, 2, 1, 1, 64, True)])
def test_atomic_dq_path(B, Hq, Hkv, T, D, causal):
    """The opt-in backward (dQ added with atomics inside the dK/dV kernel), GQA and a partial last block."""
    check(B, Hq, Hkv, T, D, causal, torch.float32, deterministic=False)


def test_atomic_dq_autograd_path():
    """deterministic=False reaches the backward through autograd (and the default does not)."""
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 4, 2, 37, 64, torch.float32))
    do = torch.randn(q.shape, device=DEVICE)
    calls = []
    real = A._backward
    try:
        A._backward = lambda *a: calls.append(a[-1]) or real(*a)
        atomic = torch.autograd.grad(A.attention_triton(q, k, v, True, deterministic=False), (q, k, v), do)
        default = torch.autograd.grad(A.attention_triton(q, k, v, True), (q, k, v), do)
    finally:
        A._backward = real
    assert calls == [False, A.DETERMINISTIC]
    for a, b in zip(atomic, default):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_autograd_path():
    """attention_triton through autograd gives what the launchers give, for leaf views with requires_grad."""
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 4, 2, 19, 64, torch.float32))
    do = torch.randn(q.shape, device=DEVICE)
    o = A.attention_triton(q, k, v, True)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o2, lse = A._forward(q.detach(), k.detach(), v.detach(), True, 0.125)
    for a, b in zip((o, *grads), (o2, *A._backward(do, q.detach(), k.detach(), v.detach(), o2, lse, True, 0.125))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_key_rows_are_finite():
    """Row 0 of causal attention sees one key: its output is exactly V[0], its LSE the one score, no NaN."""
    q, k, v = make_qkv(1, 2, 1, 3, 64, torch.float32)
    o, lse = A._forward(q, k, v, True, 0.125)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(o[:, :, 0], v[:, :, 0].expand_as(o[:, :, 0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(lse[:, :, 0], 0.125 * (q[:, :, 0] * k[:, :, 0]).sum(-1), rtol=1e-6, atol=1e-6)


def test_output_layout():
    """O comes back as a (B, Hq, T, D) view of (B, T, Hq, D) memory: the model's transpose back is free."""
    q, k, v = make_qkv(2, 4, 2, 9, 64, torch.float32)
    o = A.attention_triton(q, k, v)
    assert o.shape == (2, 4, 9, 64) and o.transpose(1, 2).is_contiguous()


def test_switch(monkeypatch):
    """attention() runs the Triton path when forced (on CPU via the interpreter), the twin otherwise."""
    q, k, v = make_qkv(1, 4, 2, 18, 64, torch.float32)
    try:
        kernels.set_backend("auto,attention=triton")
        forced = A.attention(q, k, v)
        monkeypatch.setattr(A, "attention_triton", lambda *a: pytest.fail("Triton path taken"))
        kernels.set_backend("torch")
        twin_out = A.attention(q, k, v)
    finally:
        kernels.set_backend("auto")
    torch.testing.assert_close(forced, twin_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "auto,attention=triton"])
@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_mask_when_queries_are_the_last_positions(Tq, backend):
    """KV-cache decoding: Tq new queries against Tk cached keys are the last Tq rows of full causal attention
    (the bottom-right mask; SDPA's is_causal would align it top-left). Forced Triton too: decoding goes to the
    twin, not to an error."""
    q, k, v = make_qkv(2, 4, 2, 11, 64, torch.float32)
    full = A.attention_torch(q, k, v, causal=True)
    try:
        kernels.set_backend(backend)
        new = A.attention(q[:, :, -Tq:], k, v, causal=True)
    finally:
        kernels.set_backend("auto")
    torch.testing.assert_close(new, full[:, :, -Tq:], rtol=1e-5, atol=1e-5)


def test_compile_aot_eager():
    """torch.compile traces the autograd.Function and keeps the custom ops opaque: no graph break."""
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 4, 2, 20, 64, torch.float32))
    fn = lambda q, k, v: (A.attention_triton(q, k, v, True) * 2).sum()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    eager = torch.autograd.grad(fn(q, k, v), (q, k, v))
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autotune_picks_fastest_and_remembers(monkeypatch):
    """The GPU-only tuning path, run with a fake clock: every candidate is launched, a failing one is skipped,
    the fastest is kept per key, and the next call does not tune again. (In the interpreter on a CPU; on a GPU
    the real kernels run, timed by the fake clock.)"""
    import triton
    monkeypatch.setattr(AT, "interpreting", lambda: False)  # as on a GPU (the kernels still run interpreted)
    monkeypatch.setattr(AT, "AUTOTUNE", True)
    monkeypatch.setattr(AT, "_tuned", {})
    # per kernel, in candidate order: the 2nd is fastest, the 4th does not compile, the others are slower
    clock = {1: 1.0, 3: None}
    calls = []

    def fake_bench(fn, warmup, rep):
        fn()
        kind, config = launched[-1]
        index = AT.TUNE_CONFIGS[kind][64].index(config)
        calls.append((kind, index))
        ms = clock.get(index, 2.0 + index)
        if ms is None:
            raise RuntimeError("out of resource: shared memory")
        return ms

    launched = []
    real_launch = A._launch

    def spy_launch(kernel, grid_of, config, *args, **constexprs):
        kind = {A._attn_fwd: "fwd", A._attn_bwd_dkdv: "dkdv", A._attn_bwd_dq: "dq"}[kernel]
        launched.append((kind, config))
        return real_launch(kernel, grid_of, config, *args, **constexprs)

    monkeypatch.setattr(A, "_launch", spy_launch)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    q, k, v = make_qkv(1, 2, 1, 20, 64, torch.float16)
    do = torch.randn(q.shape, device=DEVICE).half()
    o, lse = A._forward(q, k, v, True, 0.125)
    grads = A._backward(do, q, k, v, o, lse, True, 0.125)
    for kind in ("fwd", "dkdv", "dq"):
        fitting = [i for i, c in enumerate(AT.TUNE_CONFIGS[kind][64]) if AT._fits(kind, c, 64)]
        assert [i for kd, i in calls if kd == kind] == fitting  # each candidate that fits, once
        assert AT._tuned[(kind, 64, True, torch.float16)] == AT.TUNE_CONFIGS[kind][64][1]
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **kw: pytest.fail("tuned twice"))
    o2, _ = A._forward(q, k, v, True, 0.125)
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    want = twin(q, k, v, do, True, 0.125)
    torch.testing.assert_close(o.float(), want[0].float(), rtol=0, atol=4e-3)
    for g, w in zip(grads, want[2:]):
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=1e-2)


def test_twin_gradcheck():
    """The twin itself against fp64 finite differences (causal and not, GQA)."""
    for causal in (True, False):
        q, k, v = (x.double().requires_grad_() for x in make_qkv(1, 4, 2, 5, 8, torch.float32))
        assert torch.autograd.gradcheck(lambda q, k, v: A.attention_torch(q, k, v, causal), (q, k, v))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,err,match", [
    (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "dtype"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "dtype"),
    (lambda q, k, v: (q[:, :, :5], k, v), ValueError, "same length"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "same shape"),
    (lambda q, k, v: (q[0], k[0], v[0]), ValueError, "4-D"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of Hkv"),
    (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), ValueError, "head dim 48"),
])
def test_bad_input(bad, err, match):
    q, k, v = make_qkv(1, 4, 2, 8, 64, torch.float32)
    with pytest.raises(err, match=match):
        A.attention_triton(*bad(q, k, v))


def test_nonpositive_scale_refused():
    q, k, v = make_qkv(1, 2, 1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="positive"):
        A.attention_triton(q, k, v, scale=-0.1)


def test_head_dim_256_refused():
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError, match="not supported"):
        A.attention_triton(q, q, q)


def test_cpu_tensor_without_interpreter(monkeypatch):
    """CPU tensors on a forced-Triton path outside the interpreter: a clear error, not a crash or a fallback."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (x.cpu() for x in make_qkv(1, 2, 1, 8, 64, torch.float32, device="cpu"))
    with pytest.raises(RuntimeError, match="CUDA"):
        A.attention_triton(q, k, v)
    try:
        kernels.set_backend("auto,attention=triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            A.attention(q, k, v)
    finally:
        kernels.set_backend("auto")


def test_forced_triton_refuses_uncovered_shape_auto_falls_back(monkeypatch):
    """Head dim 48: forced Triton raises; 'auto' (when it would pick Triton) quietly uses the twin."""
    q, k, v = make_qkv(1, 2, 1, 8, 48, torch.float32)
    try:
        kernels.set_backend("auto,attention=triton")
        with pytest.raises(ValueError, match="head dim 48"):
            A.attention(q, k, v)
        kernels.set_backend("auto")
        monkeypatch.setattr(A, "use_triton", lambda *a: True)  # as on a GPU
        torch.testing.assert_close(A.attention(q, k, v), A.attention_torch(q, k, v))
    finally:
        kernels.set_backend("auto")


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.fixture
def fixed_configs(monkeypatch):
    """The sweep runs the default (untuned) configs: one compile per variant, not the whole search space."""
    monkeypatch.setattr(AT, "AUTOTUNE", False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)])  # group ratio 1, 4, 8
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 17, 127, 128, 129, 1000, 4096])
def test_gpu_sweep(T, B, Hq, Hkv, D, causal, dtype, fixed_configs):
    check(B, Hq, Hkv, T, D, causal, dtype, device="cuda", seed=T + B)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq", "fused"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_every_tuning_config(kind, D, monkeypatch):
    """Whatever the autotuner picks must be right: each candidate config of each kernel, forced in turn."""
    defaults = {k: AT.default_config(k, D, torch.bfloat16) for k in ("fwd", "dkdv", "dq", "fused")}
    for config in AT.TUNE_CONFIGS[kind][D] + AT.WIDE_CONFIGS[kind][D]:
        if not AT._fits(kind, config, D):
            continue
        chosen = {**defaults, kind: config}
        monkeypatch.setattr(A, "pick_config", lambda k, *args: chosen[k])
        check(2, 8, 2, 1000, D, True, torch.bfloat16, device="cuda", deterministic=kind != "fused")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("T", [1, 127, 1000])
def test_gpu_atomic_dq(T, Hq, Hkv, D, causal, fixed_configs):
    """The opt-in atomic-dQ backward in bf16 (fp16 and fp32 once each)."""
    check(3, Hq, Hkv, T, D, causal, torch.bfloat16, device="cuda", seed=T, deterministic=False)
    if T == 127 and Hkv == 2:
        check(3, Hq, Hkv, T, D, causal, torch.float16, device="cuda", deterministic=False)
        check(2, Hq, Hkv, 77, D, causal, torch.float32, device="cuda", deterministic=False)


@pytest.mark.gpu
def test_gpu_autotuned_path():
    """The real autotuning path once (it picks, remembers, and the result is still right)."""
    check(2, 8, 2, 513, 128, True, torch.bfloat16, device="cuda")
    assert any(key[1] == 128 for key in AT._tuned)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,D", [(1, 64), (77, 64), (300, 128)])
def test_gpu_fp32(T, D, causal, fixed_configs):
    check(2, 4, 2, T, D, causal, torch.float32, device="cuda")


@pytest.mark.gpu
def test_gpu_deterministic(fixed_configs):
    """No atomics: two backward passes give bit-identical gradients."""
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 8, 2, 1000, 128, torch.bfloat16, device="cuda"))
    do = torch.randn_like(q)
    first = torch.autograd.grad(A.attention_triton(q, k, v), (q, k, v), do)
    second = torch.autograd.grad(A.attention_triton(q, k, v), (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_compile_and_dispatch(fixed_configs):
    """On CUDA, attention() with attention=triton takes the Triton path ('auto' keeps SDPA, see
    kernels/__init__.py); torch.compile (inductor) runs it unchanged."""
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 8, 2, 200, 64, torch.bfloat16, device="cuda"))
    fn = lambda q, k, v: A.attention(q, k, v).float().square().sum()  # noqa: E731
    try:
        kernels.set_backend("auto,attention=triton")
        eager = torch.autograd.grad(fn(q, k, v), (q, k, v))
        compiled = torch.autograd.grad(torch.compile(fn, fullgraph=True)(q, k, v), (q, k, v))
        dispatched = A.attention(q, k, v)
    finally:
        kernels.set_backend("auto")
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)  # bf16 tolerances: inductor may round the loss's gradient differently
    torch.testing.assert_close(dispatched, A.attention_triton(q, k, v), rtol=0, atol=0)
