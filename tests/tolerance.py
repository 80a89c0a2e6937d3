"""
The project's tolerance rule for low-precision kernels (DESIGN.md, "How to test"):

    |ours - ref_fp32| <= 2 * |torch_same_dtype - ref_fp32| + atol      (elementwise, then reduced by max)

ref_fp32 is the computation in fp32 (or fp64) on the same inputs; torch_same_dtype is the PyTorch twin run in
the dtype under test. A kernel may be as wrong as PyTorch itself is, twice over, plus a small floor.
"""
import torch


def assert_within_2x(ours, torch_same, ref, atol=1e-5, name="output"):
    ours, torch_same, ref = ours.double(), torch_same.double(), ref.double()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err_ours = (ours - ref).abs()
    err_torch = (torch_same - ref).abs()
    bad = err_ours > 2 * err_torch + atol
    if bad.any():
        i = bad.flatten().nonzero()[0].item()
        raise AssertionError(
            f"{name}: {bad.sum().item()} of {bad.numel()} elements break the 2x rule; first at flat index {i}: "
            f"ours err {err_ours.flatten()[i]:.3e} vs torch err {err_torch.flatten()[i]:.3e} (atol {atol:.1e}); "
            f"max ours err {err_ours.max():.3e}, max torch err {err_torch.max():.3e}")


# The atol floor for elementwise kernels, relative to the largest reference value: far below one rounding step of
# the dtype (bf16 ~4e-3, fp16 ~5e-4, fp32 ~6e-8), so it only forgives values near zero.
REL_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 2e-4}


def assert_kernel_2x(ours, same, ref, name):
    """The 2x rule with the REL_ATOL floor, for the elementwise kernels (RMSNorm, RoPE, SwiGLU).

    One known exception: Triton's CPU interpreter (3.9) converts fp32 to bf16 by truncation where the GPU rounds
    to nearest, so under the interpreter a bf16 result may be one more bf16 step (2^-7 relative, elementwise)
    away from the reference. The GPU runs get the plain rule."""
    from kernels import interpreting
    atol = REL_ATOL[ours.dtype] * ref.abs().max().item()
    if not (interpreting() and ours.dtype == torch.bfloat16):
        return assert_within_2x(ours, same, ref, atol=atol, name=name)
    ours, same, ref = ours.double(), same.double(), ref.double()
    step = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)  # one bf16 ulp at |ref|
    err_ours, err_torch = (ours - ref).abs(), (same - ref).abs()
    bad = err_ours > 2 * err_torch + atol + step
    assert not bad.any(), (f"{name}: {bad.sum().item()} of {bad.numel()} elements break the 2x rule (+1 bf16 "
                           f"step for the interpreter); max ours err {err_ours.max():.3e}, "
                           f"max torch err {err_torch.max():.3e}")
