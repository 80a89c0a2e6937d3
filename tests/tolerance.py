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
