"""
RoPE: the twin against fp64 (gradcheck and the complex-number form of the rotation), the Triton kernel
against the twin and an fp64 reference under the 2x rule, forward and the gradients of q and k, for head
dims 64/128/92, GQA head counts 32/8, 12/12, 7/1, three dtypes, q and k as strided views out of one fused
qkv projection; cos/sin sliced at a position offset (the KV cache's case); bad input refused in words;
torch.compile keeps the op in one graph.
"""

import pytest
import torch

from kernels import set_backend
from kernels.rope import apply_rope, apply_rope_torch, rope_tables
from tests.tolerance import assert_kernel_2x as assert_2x

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(32, 8), (12, 12), (7, 1)]


pytestmark = pytest.mark.usefixtures("force_triton")  # the Triton path, also on CPU (interpreter)


def fused_qkv(B, T, Hq, Hkv, D, dtype, layout="fused", seed=0):
    """q, k as the model makes them: views into one (B, T, (Hq + 2 Hkv) D) projection, last dim contiguous.
    layout 'fused': that; 'contiguous': fresh tensors; 'time_major': the projection stored (T, B, ...) so the
    batch stride is smaller than the time stride."""
    g = torch.Generator().manual_seed(seed)
    width = (Hq + 2 * Hkv) * D
    if layout == "time_major":
        qkv = torch.randn(T, B, width, generator=g).transpose(0, 1)
    else:
        qkv = torch.randn(B, T, width, generator=g)
    qkv = qkv.to(device=DEVICE, dtype=dtype)
    q = qkv[..., :Hq * D].unflatten(-1, (Hq, D))
    k = qkv[..., Hq * D:(Hq + Hkv) * D].unflatten(-1, (Hkv, D))
    if layout == "contiguous":
        q, k = q.contiguous(), k.contiguous()
    return q, k


def check_against_reference(B, T, Hq, Hkv, D, dtype, layout="fused", pos=7):
    q, k = fused_qkv(B, T, Hq, Hkv, D, dtype, layout)
    cos, sin = rope_tables(D, pos + T + 3, 10000.0, device=DEVICE)
    cos, sin = cos[pos:pos + T], sin[pos:pos + T]  # what the KV cache passes
    # upstream gradients, deliberately strided: the transpose the model applies after RoPE, undone
    g = torch.Generator().manual_seed(1)
    dq = torch.randn(B, Hq, T, D, generator=g).to(device=DEVICE, dtype=dtype).transpose(1, 2)
    dk = torch.randn(B, Hkv, T, D, generator=g).to(device=DEVICE, dtype=dtype).transpose(1, 2)

    def run(fn, q, k, cos, sin):
        q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        qo, ko = fn(q, k, cos, sin)
        torch.autograd.backward((qo, ko), (dq.to(qo.dtype), dk.to(ko.dtype)))
        return qo.detach(), ko.detach(), q.grad, k.grad

    q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()  # keep the strided layout
    qo, ko = apply_rope(q_leaf, k_leaf, cos, sin)
    torch.autograd.backward((qo, ko), (dq, dk))
    ours = (qo.detach(), ko.detach(), q_leaf.grad, k_leaf.grad)
    same = run(apply_rope_torch, q, k, cos, sin)
    ref = run(apply_rope_torch, q.double(), k.double(), cos, sin)
    for name, o, s, r in zip(("q", "k", "dq", "dk"), ours, same, ref):
        assert o.dtype == s.dtype and o.shape == s.shape, f"{name}: {o.dtype} {o.shape} vs {s.dtype} {s.shape}"
        assert_2x(o, s, r, name=f"{name} D={D} H={Hq}/{Hkv} {dtype} {layout}")


# ---------------------------------------------------------------- the twin against fp64
def test_twin_gradcheck_fp64():
    q = torch.randn(2, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_tables(6, 3, 10000.0)
    assert torch.autograd.gradcheck(lambda q, k: apply_rope_torch(q, k, cos, sin), (q, k))


def test_twin_is_a_complex_rotation():
    """Half-split RoPE = multiplying (x1 + i x2) by exp(i * t * theta^(-2j/D)): an independent fp64 form."""
    T, D, theta = 9, 10, 500.0
    x = torch.randn(1, T, 3, D, dtype=torch.float64)
    cos, sin = rope_tables(D, T, theta)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:])
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, D, 2) / D)
    rot = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    expected = torch.cat([rot.real, rot.imag], dim=-1)
    got, _ = apply_rope_torch(x, x, cos, sin)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # the tables are fp32


# ---------------------------------------------------------------- the kernel, CPU (interpreter) sizes
@pytest.mark.parametrize("Hq,Hkv", HEADS)
@pytest.mark.parametrize("D", [64, 128, 92])
def test_kernel_vs_reference_bf16(D, Hq, Hkv):
    check_against_reference(2, 3, Hq, Hkv, D, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("D,Hq,Hkv", [(92, 7, 1), (128, 32, 8)])
def test_kernel_vs_reference_dtypes(D, Hq, Hkv, dtype):
    check_against_reference(2, 3, Hq, Hkv, D, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "time_major"])
def test_kernel_layouts(layout):
    check_against_reference(3, 5, 7, 1, 92, torch.float32, layout)


def test_kernel_one_token_decode():
    """A single new token at position 40 (a decode step with the KV cache)."""
    check_against_reference(2, 1, 12, 12, 64, torch.float32, pos=40)


def test_offset_slice_matches_full_sequence():
    """Rotating tokens pos..pos+T-1 with sliced tables equals rotating the whole sequence and slicing."""
    q, k = fused_qkv(1, 12, 4, 2, 64, torch.float32)
    cos, sin = rope_tables(64, 12, 10000.0, device=DEVICE)
    qf, kf = apply_rope(q, k, cos, sin)
    qs, ks = apply_rope(q[:, 5:], k[:, 5:], cos[5:], sin[5:])
    torch.testing.assert_close(qs, qf[:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(ks, kf[:, 5:], rtol=0, atol=0)


def test_inputs_untouched_and_unused_output():
    q, k = fused_qkv(2, 3, 4, 2, 64, torch.float32)
    q0, k0 = q.clone(), k.clone()
    cos, sin = rope_tables(64, 3, 10000.0, device=DEVICE)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = apply_rope(q, k, cos, sin)
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)
    qo.sum().backward()  # k's output unused: its gradient is zero, not an error
    assert torch.equal(k.grad, torch.zeros_like(k))


# ---------------------------------------------------------------- bad input
def test_rejects_bad_input():
    q, k = fused_qkv(1, 4, 2, 1, 8, torch.float32)
    cos, sin = rope_tables(8, 4, 10000.0, device=DEVICE)
    with pytest.raises(ValueError, match="head dim must be even"):
        apply_rope(q[..., :7], k[..., :7], cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match=r"cos/sin must be \(T, D/2\)"):
        apply_rope(q, k, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="differ in B, T or D"):
        apply_rope(q, k[:, :2], cos, sin)
    with pytest.raises(TypeError, match="q is torch.float32 but k is torch.bfloat16"):
        apply_rope(q, k.bfloat16(), cos, sin)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        apply_rope(q.double(), k.double(), cos, sin)
    with pytest.raises(ValueError, match="must be even"):
        rope_tables(7, 4, 10000.0)


def test_torch_backend_runs_the_twin():
    set_backend("torch")
    q, k = fused_qkv(1, 4, 2, 1, 8, torch.float32)
    cos, sin = rope_tables(8, 4, 10000.0, device=DEVICE)
    for a, b in zip(apply_rope(q, k, cos, sin), apply_rope_torch(q, k, cos, sin)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- torch.compile
def compile_check(backend):
    torch._dynamo.reset()
    q, k = fused_qkv(2, 5, 4, 2, 64, torch.float32)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    cos, sin = rope_tables(64, 9, 10000.0, device=DEVICE)

    def f(q, k):
        qo, ko = apply_rope(q * 2.0, k, cos[4:9], sin[4:9])
        return (qo.square().sum() + (ko * 3.0).sum())

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    loss_c = compiled(q, k)
    grads_c = torch.autograd.grad(loss_c, (q, k))
    loss_e = f(q, k)
    grads_e = torch.autograd.grad(loss_e, (q, k))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph():
    compile_check("aot_eager")


# ---------------------------------------------------------------- full size on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", HEADS)
@pytest.mark.parametrize("D", [64, 128, 92])
def test_gpu_kernel_vs_reference(D, Hq, Hkv, dtype):
    check_against_reference(4, 512, Hq, Hkv, D, dtype, pos=1000)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "time_major"])
def test_gpu_layouts(layout):
    check_against_reference(3, 257, 32, 8, 128, torch.bfloat16, layout)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    compile_check("inductor")


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """q with more than 2^31 elements: the last tokens must still be right (int32 offsets would wrap)."""
    Hq, Hkv, D = 32, 8, 128
    T = 2**31 // (Hq * D) + 3
    q = torch.randn(1, T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_tables(D, T, 10000.0, device="cuda")
    qo, ko = apply_rope(q, k, cos, sin)
    tail = slice(T - 4, T)
    qt, kt = apply_rope_torch(q[:, tail], k[:, tail], cos[tail], sin[tail])
    torch.testing.assert_close(qo[:, tail], qt, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ko[:, tail], kt, rtol=2e-2, atol=2e-2)
