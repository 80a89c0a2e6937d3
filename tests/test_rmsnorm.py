"""
RMSNorm: the twin against fp64 (gradcheck and the formula), the Triton kernel against the twin and an fp64
reference under the 2x rule (tests/tolerance.py), forward and both gradients, odd shapes, three dtypes,
strided inputs; dw bitwise reproducible; bad input refused in words; torch.compile keeps the op in one graph.

On CPU the kernels run in Triton's interpreter (tests/conftest.py), so shapes are small; the same checks
run at full size on a GPU (-m gpu).
"""

import pytest
import torch

from kernels import interpreting, set_backend
from kernels.rmsnorm import rmsnorm, rmsnorm_torch
from tests.tolerance import assert_kernel_2x as assert_2x

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


pytestmark = pytest.mark.usefixtures("force_triton")  # the Triton path, also on CPU (interpreter)


def make_rows(M, N, dtype, layout, seed=0, scale=1.0):
    """An (M, N) or (2, M//2, N)-like tensor in one of three layouts:
    'contiguous'; 'strided' (a column slice of a wider buffer: rows N + 7 apart, read in place);
    'transposed' (a (T, B, N) buffer seen as (B, T, N): leading dims that do not flatten, copied once)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        t = torch.randn(M, N, generator=g) * scale
    elif layout == "strided":
        t = (torch.randn(M, N + 7, generator=g) * scale)[:, 3:3 + N]
    elif layout == "transposed":
        assert M % 3 == 0
        t = (torch.randn(3, M // 3, N, generator=g) * scale).transpose(0, 1)
    return t.to(device=DEVICE, dtype=dtype)


def check_against_reference(M, N, dtype, layout="contiguous", w_dtype=None):
    w_dtype = w_dtype or dtype
    x = make_rows(M, N, dtype, layout, seed=1, scale=2.0)
    dy = make_rows(M, N, dtype, "strided" if layout != "contiguous" else "contiguous", seed=2)
    dy = dy.reshape(x.shape)
    g = torch.Generator().manual_seed(3)
    w = (1.0 + 0.3 * torch.randn(N, generator=g)).to(device=DEVICE, dtype=w_dtype)

    def run(fn, x, w, dy):
        x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = fn(x, w)
        y.backward(dy)
        return y.detach(), x.grad, w.grad

    ours = run(lambda x, w: rmsnorm(x, w, EPS), x, w, dy)
    same = run(lambda x, w: rmsnorm_torch(x, w, EPS), x, w, dy)
    ref = run(lambda x, w: rmsnorm_torch(x, w, EPS), x.double(), w.double(), dy.double())
    for name, o, s, r in zip(("y", "dx", "dw"), ours, same, ref):
        assert o.dtype == s.dtype, f"{name}: dtype {o.dtype} != twin's {s.dtype}"
        assert_2x(o, s, r, name=f"{name} {dtype} {layout}")


# ---------------------------------------------------------------- the twin against fp64
def test_twin_gradcheck_fp64():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rmsnorm_torch(x, w, EPS), (x, w))


def test_twin_matches_formula():
    x, w = torch.randn(4, 11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 11 + EPS) * w
    torch.testing.assert_close(rmsnorm_torch(x, w, EPS), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the kernel, CPU (interpreter) sizes
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N", [(1, 123), (615, 123), (1, 5376), (5, 5376)])
def test_kernel_vs_reference(M, N, dtype):
    check_against_reference(M, N, dtype)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kernel_noncontiguous(layout, dtype):
    check_against_reference(615, 123, dtype, layout)


def test_kernel_mixed_dtypes():
    """bf16 activations with an fp32 weight (autocast's case): y in bf16, dw in fp32."""
    check_against_reference(33, 123, torch.bfloat16, w_dtype=torch.float32)


def test_kernel_3d_strided_weight_and_empty():
    x = torch.randn(2, 3, 40, device=DEVICE, requires_grad=True)
    w_storage = torch.randn(80, device=DEVICE)
    w = w_storage[::2].requires_grad_()  # a strided 1-D weight
    rmsnorm(x, w).square().sum().backward()
    gx, gw = torch.autograd.grad(rmsnorm_torch(x, w, EPS).square().sum(), (x, w))
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(w.grad, gw)
    w = torch.ones(40, device=DEVICE, requires_grad=True)
    empty = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    y = rmsnorm(empty, w)
    y.sum().backward()
    assert y.shape == (0, 40) and empty.grad.shape == (0, 40)


def test_dw_bitwise_reproducible():
    M, N = (16384, 4096) if DEVICE == "cuda" else (615, 123)
    x = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        rmsnorm(x, w).backward(dy)
        grads.append((x.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_dw_reduction_of_many_partials():
    """The second stage of dw alone, with more partial rows than one [128, 32] tile holds (G = 300, as on a
    big GPU) and a width that is not a multiple of 32: the sum of the partials, and the same bits twice."""
    from kernels.rmsnorm import _reduce_partials
    g = torch.Generator().manual_seed(4)
    partial = torch.randn(300, 77, generator=g).to(DEVICE)
    dws = []
    for dtype in (torch.float32, torch.float32, torch.bfloat16):
        dw = torch.empty(77, device=DEVICE, dtype=dtype)
        _reduce_partials(partial, dw)
        dws.append(dw)
    torch.testing.assert_close(dws[0].double(), partial.double().sum(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(dws[0], dws[1])
    assert torch.equal(dws[2], dws[0].to(torch.bfloat16)) or interpreting()  # the interpreter truncates


def test_autocast_output_dtype():
    """Under autocast y comes out in the autocast dtype (the next matmul's input dtype), from both
    implementations and through both wrappers (eager autograd.Function, compiled custom op); dx and dw keep the
    dtypes of x and w. The values are the fp32 result rounded once."""
    x = make_rows(33, 123, torch.float32, "contiguous", seed=1)
    w = torch.randn(123, device=DEVICE)
    dy = torch.randn(33, 123, device=DEVICE).to(torch.bfloat16)
    expected = rmsnorm_torch(x, w, EPS)  # no autocast: fp32

    def run(fn):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = fn(xl, wl)
        y.backward(dy)
        return y, xl.grad, wl.grad

    twin = run(lambda x, w: rmsnorm_torch(x, w, EPS))
    assert twin[0].dtype == torch.bfloat16 and torch.equal(twin[0], expected.to(torch.bfloat16))
    torch._dynamo.reset()
    for name, fn in (("eager", lambda x, w: rmsnorm(x, w, EPS)),
                     ("compiled", torch.compile(lambda x, w: rmsnorm(x, w, EPS), backend="aot_eager",
                                                fullgraph=True))):
        y, dx, dw = run(fn)
        assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.float32, torch.float32), name
        bf16_step = 2 ** -7 * expected.abs()  # within one bf16 rounding of the fp32 result
        assert ((y.double() - expected.double()).abs() <= bf16_step + 1e-6).all(), name
        torch.testing.assert_close(dx, twin[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dw, twin[2], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- bad input
def test_rejects_bad_input(monkeypatch):
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        rmsnorm(x.double(), torch.ones(8, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight must be 1-D of size"):
        rmsnorm(x, torch.ones(9, device=DEVICE))
    with pytest.raises(ValueError, match="do not fit one tile"):
        rmsnorm(torch.randn(1, 65537, device=DEVICE), torch.ones(65537, device=DEVICE))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # forced Triton on CPU tensors without the interpreter
    with pytest.raises(RuntimeError, match="forced to 'triton' on CPU"):
        rmsnorm(torch.randn(4, 8), torch.ones(8))


def test_torch_backend_runs_the_twin():
    set_backend("torch")
    x, w = torch.randn(5, 16, device=DEVICE), torch.randn(16, device=DEVICE)
    assert torch.equal(rmsnorm(x, w), rmsnorm_torch(x, w, EPS))


# ---------------------------------------------------------------- torch.compile
def compile_check(backend):
    torch._dynamo.reset()
    x = torch.randn(6, 123, device=DEVICE, requires_grad=True)
    w = torch.randn(123, device=DEVICE, requires_grad=True)

    def f(x, w):
        return (rmsnorm(x * 2.0, w) * 3.0).square().sum()

    compiled = torch.compile(f, backend=backend, fullgraph=True)  # fullgraph: a graph break is an error
    loss_c = compiled(x, w)
    gx_c, gw_c = torch.autograd.grad(loss_c, (x, w))
    loss_e = f(x, w)
    gx_e, gw_e = torch.autograd.grad(loss_e, (x, w))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(gw_c, gw_e)


def test_torch_compile_fullgraph():
    compile_check("aot_eager")


# ---------------------------------------------------------------- full size on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N", [(1, 123), (615, 123), (1, 5376), (615, 5376), (16384, 4096), (4099, 8192),
                                 (3, 65536)])
def test_gpu_kernel_vs_reference(M, N, dtype):
    check_against_reference(M, N, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_noncontiguous(layout, dtype):
    check_against_reference(615, 5376, dtype, layout)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    compile_check("inductor")


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """More than 2^31 elements: the last rows must still be right (int32 offsets would wrap)."""
    N = 4096
    M = 2**31 // N + 5
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    y = rmsnorm(x, w)
    y.backward(dy)
    tail = slice(M - 8, M)
    xt = x.detach()[tail].clone().requires_grad_()
    yt = rmsnorm_torch(xt, w.detach(), EPS)
    yt.backward(dy[tail])
    torch.testing.assert_close(y[tail], yt, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad[tail], xt.grad, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(w.grad).all()
