"""
Tests for kernels/muon.py.

The oracles: (1) the Newton-Schulz iteration applies the scalar polynomial φ(s) = a·s + b·s³ + c·s⁵ five times
to the singular values of the normalised input and keeps its singular vectors: checked in fp64 against an SVD,
and the result's singular values lie in the iteration's band (~0.7-1.2) on wide and tall shapes, in fp32 and
bf16, with either backend; (2) the Triton Gram kernel against fp64 by the 2x rule (Triton's CPU interpreter);
(3) the optimizer's step against the formulas written out by hand, and torch's AdamW for the other parameters;
(4) resume: N + N steps from a saved state_dict equal 2N straight, bitwise; (5) two gloo processes, each
orthogonalising half of the matrices, equal one process, bitwise. Run as a script, this file is that DDP worker.
"""
import io
import os
import subprocess
import sys

import pytest
import torch

import kernels
from conftest import ROOT
from kernels.muon import NS_COEFFICIENTS, NS_EPS, Muon, gram_torch, gram_triton, newton_schulz, split_params
from model import GPT, GPTConfig
from tolerance import assert_within_2x

SHAPES = [(37, 91), (91, 37), (3, 20, 50)]  # wide, tall, a stack; none a multiple of a tile


@pytest.fixture
def backend():
    yield lambda choice: kernels.set_backend(f"auto,muon={choice}")
    kernels.set_backend(os.environ.get("NANOFORGE_KERNELS", "auto"))


def tiny_gpt(tie=True, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=48, block_size=16,
                         vocab_size=97, tie_embeddings=tie))


# ---- the iteration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_is_phi5_of_the_singular_values(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = newton_schulz(g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    s = S / (torch.linalg.matrix_norm(g)[..., None] + NS_EPS)
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    expected = U @ torch.diag_embed(s) @ Vh                # same singular vectors, φ⁵ of the singular values
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("choice", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_output_is_near_orthogonal(shape, dtype, choice, backend):
    backend(choice)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out = newton_schulz(g, dtype=dtype)
    assert out.shape == g.shape and out.dtype == dtype
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() > 0.65 and sv.max() < 1.2, (sv.min().item(), sv.max().item())
    ref = newton_schulz(g.double(), dtype=torch.float64)  # and it is the same matrix as the exact iteration's
    rel = torch.linalg.matrix_norm(out.double() - ref) / torch.linalg.matrix_norm(ref)
    assert rel.max() < (2e-5 if dtype == torch.float32 else 0.05), rel


def test_zero_gradient_stays_zero():
    assert torch.equal(newton_schulz(torch.zeros(5, 7)), torch.zeros(5, 7, dtype=torch.bfloat16))


# ---- the Triton kernel (the CPU interpreter here; the GPU where there is one) ---------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 45, 70), (2, 70, 45), (1, 16, 16), (1, 5, 3)])
@pytest.mark.parametrize("epilogue", [False, True])
def test_gram_kernel_2x_rule(shape, dtype, epilogue):
    gen = torch.Generator().manual_seed(3)
    B, M, K = shape
    x = torch.randn(B, K, M, generator=gen).mT.to(dtype)  # a strided (transposed) view: the kernel takes strides
    alpha, beta, c = 1.0, 0.0, None
    if epilogue:  # B = c·A Aᵀ + b·A with a symmetric A, as the iteration's second product
        x = x / torch.linalg.matrix_norm(x.float(), keepdim=True).to(dtype)
        c = gram_torch(x.double()).to(dtype)
        x, alpha, beta = c, NS_COEFFICIENTS[2], NS_COEFFICIENTS[1]
    ours = gram_triton(x, alpha, beta, c, block=16, block_k=16)
    same = gram_torch(x, alpha, beta, c)
    ref = gram_torch(x.double(), alpha, beta, None if c is None else c.double())
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.double(), ours.double().mT, rtol=0, atol=0)  # mirrored exactly
    assert_within_2x(ours, same, ref, atol=1e-6 * ref.abs().max().item(), name=f"gram {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_triton_against_twin(dtype, backend):
    g = torch.randn(2, 40, 72, generator=torch.Generator().manual_seed(4))
    ref = newton_schulz(g.double(), dtype=torch.float64)
    backend("torch")
    twin = newton_schulz(g, dtype=dtype)
    backend("triton")
    ours = newton_schulz(g, dtype=dtype)
    err = lambda y: torch.linalg.matrix_norm(y.double() - ref)
    assert (err(ours) <= 2 * err(twin) + 1e-6).all(), (err(ours), err(twin))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(12, 768, 2304), (12, 768, 768), (12, 4096, 768), (12, 768, 2048)])
def test_gpu_real_shapes(shape, backend):
    """gpt2_124m's stacks (qkv, proj, fc, mlp proj): the kernel at its real tiles, bf16, and the band."""
    g = torch.randn(shape, device="cuda")
    x = (g / torch.linalg.matrix_norm(g, keepdim=True)).bfloat16()
    x = x.mT if x.size(-2) > x.size(-1) else x                        # as the iteration sees it (a strided view)
    ours, same, ref = gram_triton(x), gram_torch(x), gram_torch(x.double())
    assert_within_2x(ours, same, ref, atol=1e-3 * ref.abs().max().item(), name=f"gram {shape}")
    backend("triton")
    sv = torch.linalg.svdvals(newton_schulz(g).double())
    assert sv.min() > 0.65 and sv.max() < 1.2, (sv.min().item(), sv.max().item())


# ---- the optimizer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_split_params_blocks_matrices_to_muon(tie):
    model = tiny_gpt(tie)
    muon, decay, no_decay = split_params(model)
    named = dict(model.named_parameters())
    ids = lambda ps: {id(p) for p in ps}
    assert ids(muon) == ids(p for n, p in named.items() if n.startswith("blocks.") and p.ndim == 2)
    assert len(muon) == 2 * 4                                           # c_attn, attn c_proj, c_fc, mlp c_proj
    assert ids(decay) == (set() if tie else {id(model.lm_head.weight)})  # an untied head: AdamW with decay
    assert id(model.wte.weight) in ids(no_decay)
    assert len(muon) + len(decay) + len(no_decay) == len(named)          # every parameter exactly once
    opt = Muon(model, lr=0.03, adamw_lr=1e-3, weight_decay=0.1)
    assert [(g["kind"], g["lr"], g["base_lr"], g["weight_decay"]) for g in opt.param_groups] == (
        [("muon", 0.03, 0.03, 0.1)] + ([] if tie else [("adamw", 1e-3, 1e-3, 0.1)]) + [("adamw", 1e-3, 1e-3, 0.0)])


def test_two_steps_follow_the_formulas():
    """Muon: m ← μm + (1−μ)g, u ← (1−μ)g + μm, W ← W(1 − lr·wd) − lr·sqrt(max(1, rows/cols))·NS(u);
    the vector in the adamw group moves exactly as under torch.optim.AdamW."""
    gen = torch.Generator().manual_seed(5)
    w, v = torch.nn.Parameter(torch.randn(48, 20, generator=gen)), torch.nn.Parameter(torch.randn(20, generator=gen))
    lr, mu, wd, adamw_lr = 0.02, 0.9, 0.1, 1e-2
    opt = Muon([dict(params=[w], kind="muon"), dict(params=[v], kind="adamw", weight_decay=0.0)], lr=lr,
               adamw_lr=adamw_lr, momentum=mu, weight_decay=wd)
    v_ref = torch.nn.Parameter(v.detach().clone())
    ref_opt = torch.optim.AdamW([v_ref], lr=adamw_lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8, foreach=False)
    W, m = w.detach().clone(), torch.zeros_like(w)
    for _ in range(2):
        g, gv = torch.randn(48, 20, generator=gen), torch.randn(20, generator=gen)
        w.grad, v.grad, v_ref.grad = g.clone(), gv.clone(), gv.clone()
        opt.step()
        ref_opt.step()
        m = mu * m + (1 - mu) * g
        u = (1 - mu) * g + mu * m
        W = W * (1 - lr * wd) - lr * (48 / 20) ** 0.5 * newton_schulz(u).float()
        torch.testing.assert_close(w.detach(), W, rtol=0, atol=1e-6)
        torch.testing.assert_close(v.detach(), v_ref.detach(), rtol=0, atol=0)
    assert opt.last_backend == "torch"  # the CPU default


def train_steps(model, opt, steps, first_step, data_seed=7):
    """A hand-written loop: 2 micro-batches of accumulation, a warmup-then-decay factor on every group's
    base_lr (the schedule is data), clipping, Muon step."""
    for step in range(first_step, first_step + steps):
        factor = min(1.0, (step + 1) / 3) * (1 - step / 20)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        gen = torch.Generator().manual_seed(data_seed + step)
        for _ in range(2):
            x = torch.randint(0, 97, (3, 16), generator=gen)
            _, loss = model(x, x)
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def test_resume_from_state_dict_is_bitwise_exact():
    model, steps = tiny_gpt(), 4
    opt = Muon(model, lr=0.02, adamw_lr=3e-3)
    first = train_steps(model, opt, steps, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    straight = train_steps(model, opt, steps, steps)

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed_model = tiny_gpt(seed=123)  # different initial weights: all must come from the checkpoint
    resumed_model.load_state_dict(saved["model"])
    resumed_opt = Muon(resumed_model, lr=0.5, adamw_lr=0.5)  # wrong lrs too: the checkpoint's groups win
    resumed_opt.load_state_dict(saved["opt"])
    resumed = train_steps(resumed_model, resumed_opt, steps, steps)
    assert resumed == straight and straight < first
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    a, b = opt.state_dict(), resumed_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, b["state"][i][key]), (i, key)


def test_bf16_parameters_keep_fp32_momentum_through_a_round_trip():
    w = torch.nn.Parameter(torch.randn(8, 12).bfloat16())
    opt = Muon([dict(params=[w], kind="muon")])
    w.grad = torch.randn(8, 12).bfloat16()
    opt.step()
    fresh = Muon([dict(params=[w], kind="muon")])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[w]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(fresh.state[w]["momentum_buffer"], opt.state[w]["momentum_buffer"])


def test_backend_switch(backend):
    w = torch.nn.Parameter(torch.randn(20, 12))
    opt = Muon([dict(params=[w], kind="muon")])
    results = {}
    for choice in ("torch", "triton"):
        backend(choice)
        w.data.fill_(0.5)
        opt.state.clear()
        w.grad = torch.linspace(-1, 1, 240).view(20, 12)
        opt.step()
        results[choice] = w.detach().clone()
        assert opt.last_backend == choice
    torch.testing.assert_close(results["triton"], results["torch"], rtol=0, atol=2e-5)


def test_parameters_without_gradient_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(6, 4)), torch.nn.Parameter(torch.ones(6, 4))
    opt = Muon([dict(params=[a, b], kind="muon")])
    a.grad = torch.randn(6, 4)
    opt.step()
    assert torch.equal(b, torch.ones(6, 4)) and b not in opt.state and not torch.equal(a, torch.ones(6, 4))


@pytest.mark.parametrize("groups, message", [
    (lambda: [dict(params=[torch.nn.Parameter(torch.ones(5))], kind="muon")], "2-D parameters only"),
    (lambda: [dict(params=[torch.nn.Parameter(torch.ones(2, 3, 4))], kind="muon")], r"shape \(2, 3, 4\)"),
    (lambda: [dict(params=[torch.nn.Parameter(torch.ones(5, 5))])], "kind='muon' or kind='adamw'"),
    (lambda: [dict(params=[torch.nn.Parameter(torch.ones(5, 5))], kind="muon", momentum=1.0)], "momentum"),
    (lambda: [dict(params=[torch.nn.Parameter(torch.ones(5))], kind="adamw", betas=(0.9, 1.5))], "betas"),
    (lambda: [dict(params=[torch.nn.Parameter(torch.ones(5, 5))], kind="muon", ns_steps=0)], "ns_steps"),
    (lambda: [dict(params=[torch.nn.Parameter(torch.ones(5, 5))], kind="muon", lr=-1.0)], "invalid lr"),
])
def test_bad_groups_are_clear_errors(groups, message):
    with pytest.raises(ValueError, match=message):
        Muon(groups())


def test_a_wrapped_model_is_a_clear_error():
    wrapped = torch.nn.Module()
    wrapped._orig_mod = tiny_gpt()  # what torch.compile's wrapper looks like: names start with _orig_mod.
    with pytest.raises(ValueError, match="no 2-D parameter under 'blocks.'"):
        Muon(wrapped)
    with pytest.raises(ValueError, match="matrix or a stack"):
        newton_schulz(torch.ones(4))


def test_negative_lr_from_a_schedule_is_caught_at_step():
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([dict(params=[w], kind="muon")])
    opt.param_groups[0]["lr"] = -0.1
    w.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match="invalid lr"):
        opt.step()


# ---- DDP: 2 gloo processes == 1 process --------------------------------------------------------------------------
def ddp_case(steps=3):
    """Parameters, and per step identical gradients on every rank (what DDP's all-reduce leaves): 3 matrices of
    one shape (an odd count: a padded share), 2 tall ones, a vector for AdamW."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(24, 40)] * 3 + [(40, 24)] * 2 + [(24,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    opt = Muon([dict(params=params[:5], kind="muon"), dict(params=params[5:], kind="adamw")], adamw_lr=1e-2)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def test_two_gloo_processes_equal_one(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "test_muon.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (OMP_NUM_THREADS=1): the same CPU kernels, bit for bit
    try:
        single = ddp_case()
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        for i, (p, q) in enumerate(zip(single, torch.load(tmp_path / f"rank{rank}.pt"))):
            assert torch.equal(p, q), f"rank {rank}, parameter {i}: max |diff| {(p - q).abs().max():.3e}"


if __name__ == "__main__":  # the DDP worker: python -m torch.distributed.run --nproc_per_node=2 tests/test_muon.py DIR
    import torch.distributed as dist
    dist.init_process_group("gloo")
    torch.save(ddp_case(), os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pt"))
    dist.barrier()  # both ranks' files are written
    os._exit(0)  # no interpreter teardown: gloo's threads can abort it after the work is done (see train.main)
