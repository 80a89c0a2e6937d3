"""kernels/__init__.py: the one switch between Triton kernels and their PyTorch twins."""
import os
from types import SimpleNamespace

import pytest

import kernels

ON_GPU, ON_CPU = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)


@pytest.fixture(autouse=True)
def restore():
    yield
    kernels.set_backend(os.environ.get("NANOFORGE_KERNELS", "auto"))


def test_auto_picks_triton_on_gpu_except_where_the_twin_measured_faster(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    kernels.set_backend("auto")
    assert kernels.use_triton("rmsnorm", ON_GPU) and not kernels.use_triton("rmsnorm", ON_CPU)
    assert not kernels.use_triton("attention", ON_GPU)          # SDPA stays the default (see TWIN_WINS_ON_GPU)
    kernels.set_backend("auto,attention=triton")
    assert kernels.use_triton("attention", ON_GPU)
    kernels.set_backend("triton,rope=torch")
    assert kernels.use_triton("swiglu", ON_GPU) and not kernels.use_triton("rope", ON_GPU)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    kernels.set_backend("auto")
    assert not kernels.use_triton("rmsnorm", ON_GPU)            # no Triton installed: the twins


def test_forced_triton_refuses_what_it_cannot_run(monkeypatch):
    kernels.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CPU tensors"):
        kernels.use_triton("rmsnorm", ON_CPU)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="not installed"):
        kernels.use_triton("rmsnorm", ON_GPU)


@pytest.mark.parametrize("spec, msg", [("fast", "not one of"), ("auto,flash=torch", "unknown kernel"),
                                       ("rope=torch,auto", "must come first")])
def test_bad_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        kernels.set_backend(spec)


@pytest.mark.gpu
def test_gpu_compiled_model_launches_every_kernel_itself():
    """The wiring's purpose (kernels/__init__.py): in a compiled training step inductor's own generated code
    launches every Triton kernel of ours, forward and backward, and no opaque nanoforge op remains."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from model import GPT, GPTConfig
    kernels.set_backend("triton")
    torch._dynamo.reset()
    model = GPT(GPTConfig(n_layer=2, n_embd=256, n_head=4, n_kv_head=2, ffn_hidden=512, block_size=128,
                          vocab_size=1000)).cuda()
    idx = torch.randint(0, 1000, (2, 128), device="cuda")
    compiled = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(idx, idx)
        loss.backward()

    _, codes = run_and_get_code(step)
    code = "\n".join(codes)
    for name in ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
                 "_swiglu_bwd_kernel", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        assert name in code, f"{name} is not launched by inductor's code"
    assert "torch.ops.nanoforge" not in code, "an opaque nanoforge op is still called"
