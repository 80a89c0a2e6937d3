"""
SwiGLU: the twins against fp64 (gradcheck and the formula), the Triton kernels (separate a, b and the packed
[..., 2F] form) against the twin and an fp64 reference under the 2x rule, forward and every gradient, odd
widths, three dtypes, strided inputs, saturated gates (no NaN); bad input refused in words; torch.compile
keeps the ops in one graph.
"""

import pytest
import torch

from kernels import set_backend
from kernels.swiglu import swiglu, swiglu_packed, swiglu_packed_torch, swiglu_torch
from tests.tolerance import assert_kernel_2x as assert_2x

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


pytestmark = pytest.mark.usefixtures("force_triton")  # the Triton path, also on CPU (interpreter)


def make_ab(M, F, dtype, layout, seed=0):
    """The packed projection h = [a | b] of shape (M, 2F), gates spread over [-6, 6] (both tails of the
    sigmoid). layout 'contiguous' | 'strided' (rows 2F + 5 apart, a column slice of a wider buffer) |
    'transposed' ((2, M/2, 2F) seen as (M/2, 2, 2F): leading dims that do not flatten, copied once)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        ab = torch.randn(M, 2 * F + 5, generator=g)[:, 2:2 + 2 * F]
    elif layout == "transposed":
        ab = torch.randn(2, M // 2, 2 * F, generator=g).transpose(0, 1)
    else:
        ab = torch.randn(M, 2 * F, generator=g)
    return (ab * 2.0).to(device=DEVICE, dtype=dtype)


def grads_of(fn, inputs, dc):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    c = fn(*inputs)
    c.backward(dc.to(c.dtype))
    return [c.detach()] + [t.grad for t in inputs]


def check_against_reference(M, F, dtype, layout="contiguous"):
    ab = make_ab(M, F, dtype, layout)
    g = torch.Generator().manual_seed(1)
    dc = torch.randn(*ab.shape[:-1], F, generator=g).to(device=DEVICE, dtype=dtype)
    if layout != "contiguous":
        dc = dc.transpose(-1, -2).contiguous().transpose(-1, -2)  # a non-contiguous upstream gradient too

    # packed: ab in, c and dab out; leaf views keep ab's layout for our kernel
    ab_leaf = ab.detach().requires_grad_()
    c = swiglu_packed(ab_leaf)
    c.backward(dc)
    ours = (c.detach(), ab_leaf.grad)
    same = grads_of(swiglu_packed_torch, [ab], dc)
    ref = grads_of(swiglu_packed_torch, [ab.double()], dc)
    for name, o, s, r in zip(("c", "dab"), ours, same, ref):
        assert o.shape == s.shape and o.dtype == s.dtype
        assert_2x(o, s, r, name=f"packed {name} {dtype} {layout}")

    # separate a, b: strided views of the same buffer (row stride 2F)
    a, b = ab[..., :F].detach().requires_grad_(), ab[..., F:].detach().requires_grad_()
    c = swiglu(a, b)
    c.backward(dc)
    ours = (c.detach(), a.grad, b.grad)
    same = grads_of(swiglu_torch, [ab[..., :F], ab[..., F:]], dc)
    ref = grads_of(swiglu_torch, [ab[..., :F].double(), ab[..., F:].double()], dc)
    for name, o, s, r in zip(("c", "da", "db"), ours, same, ref):
        assert o.shape == s.shape and o.dtype == s.dtype
        assert_2x(o, s, r, name=f"{name} {dtype} {layout}")


# ---------------------------------------------------------------- the twins against fp64
def test_twin_gradcheck_fp64():
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_torch, (a, b))
    ab = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_packed_torch, (ab,))


def test_twin_matches_formula():
    ab = torch.randn(4, 14, dtype=torch.float64)
    a, b = ab[:, :7], ab[:, 7:]
    expected = a / (1 + torch.exp(-a)) * b
    torch.testing.assert_close(swiglu_torch(a, b), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(swiglu_packed_torch(ab), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the kernels, CPU (interpreter) sizes
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F", [(1, 123), (615, 123), (1, 5376), (3, 5376)])
def test_kernel_vs_reference(M, F, dtype):
    check_against_reference(M, F, dtype)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_noncontiguous(layout, dtype):
    check_against_reference(42, 123, dtype, layout)


def test_saturated_gates_stay_finite():
    a = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], device=DEVICE).requires_grad_()
    b = torch.full_like(a, 2.0).requires_grad_()
    c = swiglu(a, b)
    c.sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    swiglu_torch(a2, b2).sum().backward()
    for ours, twin in ((c, swiglu_torch(a2, b2)), (a.grad, a2.grad), (b.grad, b2.grad)):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, twin)


def test_3d_and_empty():
    ab = torch.randn(2, 5, 18, device=DEVICE, requires_grad=True)
    c = swiglu_packed(ab)
    assert c.shape == (2, 5, 9)
    c.sum().backward()
    torch.testing.assert_close(ab.grad, torch.autograd.grad(swiglu_packed_torch(ab).sum(), ab)[0])
    empty = torch.randn(0, 18, device=DEVICE, requires_grad=True)
    c = swiglu_packed(empty)
    c.sum().backward()
    assert c.shape == (0, 9) and empty.grad.shape == (0, 18)


# ---------------------------------------------------------------- bad input
def test_rejects_bad_input():
    a = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="must match in shape"):
        swiglu(a, a[:, :7])
    with pytest.raises(ValueError, match="must match in shape"):
        swiglu(a, a.half())
    with pytest.raises(ValueError, match="last dimension must be even"):
        swiglu_packed(a[:, :7])
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        swiglu(a.double(), a.double())
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        swiglu_packed(torch.ones(4, 8, dtype=torch.int32, device=DEVICE))


def test_torch_backend_runs_the_twin():
    set_backend("torch")
    ab = torch.randn(3, 10, device=DEVICE)
    assert torch.equal(swiglu_packed(ab), swiglu_packed_torch(ab))
    assert torch.equal(swiglu(ab[:, :5], ab[:, 5:]), swiglu_torch(ab[:, :5], ab[:, 5:]))


# ---------------------------------------------------------------- torch.compile
def compile_check(backend):
    torch._dynamo.reset()
    ab = torch.randn(6, 2 * 123, device=DEVICE, requires_grad=True)

    def f(ab):
        h = ab * 2.0
        return swiglu_packed(h).square().sum() + swiglu(h[:, :123], h[:, 123:]).sum()

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    loss_c = compiled(ab)
    (g_c,) = torch.autograd.grad(loss_c, ab)
    loss_e = f(ab)
    (g_e,) = torch.autograd.grad(loss_e, ab)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(g_c, g_e)


def test_torch_compile_fullgraph():
    compile_check("aot_eager")


# ---------------------------------------------------------------- full size on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F", [(1, 123), (615, 123), (1, 5376), (615, 5376), (4099, 8192)])
def test_gpu_kernel_vs_reference(M, F, dtype):
    check_against_reference(M, F, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_noncontiguous(layout, dtype):
    check_against_reference(616, 5376, dtype, layout)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    compile_check("inductor")


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """A packed input of more than 2^31 elements: the last rows must still be right."""
    F = 8192
    M = 2**31 // (2 * F) + 3
    ab = torch.randn(M, 2 * F, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dc = torch.randn(M, F, device="cuda", dtype=torch.bfloat16)
    c = swiglu_packed(ab)
    c.backward(dc)
    tail = slice(M - 4, M)
    abt = ab.detach()[tail].clone().requires_grad_()
    ct = swiglu_packed_torch(abt)
    ct.backward(dc[tail])
    torch.testing.assert_close(c[tail], ct, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ab.grad[tail], abt.grad, rtol=2e-2, atol=2e-2)
