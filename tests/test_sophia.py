"""
Tests for kernels/sophia.py.

The oracle is a direct per-element transcription of the update in the module docstring, in Python floats
(fp64), with the parameter rounded to its dtype once per step. The fused Triton step (in Triton's interpreter on
the CPU, on the GPU for the tests marked gpu) and the PyTorch twin must both follow it for 25 steps of identical
synthetic gradients, with a Hessian update every k-th step: p, m, h within fp32 rounding (p within one rounding
step for bf16 parameters, which are rounded once per step from fp32 math).
"""
import io
import os

import pytest
import torch

import kernels
from kernels.sophia import SophiaG, sample_labels_from_logits, sampled_label_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU box the small tests run the real kernel
SHAPES = [(), (1,), (7,), (33, 5), (3, 4, 5), (130,)]  # 0-dim to several tiles of 64, none a multiple of it
GROUPS = [dict(lr=0.01, weight_decay=0.1), dict(lr=0.02, weight_decay=0.3)]
BETAS, RHO, BS, EPS, K, STEPS = (0.9, 0.9), 0.005, 100, 1e-12, 4, 25  # rho*bs: about half clipped


@pytest.fixture
def backend():
    yield lambda choice: kernels.set_backend(f"auto,sophia={choice}")
    kernels.set_backend(os.environ.get("NANOFORGE_KERNELS", "auto"))


def make_params(shapes, dtype, device=DEVICE, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, device=device).to(dtype)) for s in shapes]


def make_grads(shapes, dtype, device=DEVICE, steps=STEPS, seed=1):
    """(training gradient, estimator gradient) per step; a few exact zeros to exercise sign(0) = 0."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda s: torch.randn(s, generator=gen, device=device)
    out = []
    for _ in range(steps):
        g = [randn(s) * (torch.rand(s, generator=gen, device=device) > 0.05) for s in shapes]
        gh = [randn(s) for s in shapes]
        out.append(([x.to(dtype) for x in g], [x.to(dtype) for x in gh]))
    return out


def split_groups(params, groups, weight_decay):
    half = len(params) // 2
    cfg = [dict(g) for g in groups]
    if not weight_decay:
        for g in cfg:
            g["weight_decay"] = 0.0
    return [dict(params=params[:half], **cfg[0]), dict(params=params[half:], **cfg[1])]


def run_optimizer(params, param_groups, grads, tile=64, **kw):
    opt = SophiaG(param_groups, betas=BETAS, rho=RHO, eps=EPS, tile=tile, **kw)
    for step, (g, gh) in enumerate(grads):
        for p, x in zip(params, g):
            p.grad = x.clone()
        opt.step(bs=BS)
        if step % K == K - 1:
            for p, x in zip(params, gh):
                p.grad = x.clone()
            opt.update_hessian()
    return opt


def transcription(params, param_groups, grads):
    """The docstring's update, element by element, in Python floats. Returns p, m, h lists and the last win rate."""
    dtype = params[0].dtype
    group_of = [gi for gi, g in enumerate(param_groups) for _ in g["params"]]
    p = [x.detach().float().flatten().tolist() for x in params]
    m = [[0.0] * len(x) for x in p]
    h = [[0.0] * len(x) for x in p]
    for step, (g, gh) in enumerate(grads):
        unclipped = total = 0
        for i, grad in enumerate(g):
            lr, wd = param_groups[group_of[i]]["lr"], param_groups[group_of[i]]["weight_decay"]
            beta1 = BETAS[0]
            for j, gj in enumerate(grad.float().flatten().tolist()):
                pj = p[i][j] * (1 - lr * wd)
                m[i][j] = beta1 * m[i][j] + (1 - beta1) * gj
                ratio = m[i][j] / (RHO * BS * h[i][j] + EPS)
                pj -= lr * max(-1.0, min(1.0, ratio))
                p[i][j] = pj
                unclipped += abs(m[i][j]) < RHO * BS * h[i][j]
                total += 1
            p[i] = torch.tensor(p[i]).to(dtype).float().tolist()  # the parameter is stored in its dtype
        if step % K == K - 1:
            beta2 = BETAS[1]
            for i, grad in enumerate(gh):
                h[i] = [beta2 * hj + (1 - beta2) * gj * gj for hj, gj in zip(h[i], grad.float().flatten().tolist())]
    shaped = lambda lists: [torch.tensor(v, dtype=torch.float64).view(x.shape) for v, x in zip(lists, params)]
    return shaped(p), shaped(m), shaped(h), unclipped / total


def assert_p_close(ours, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    else:  # one bf16/fp16 rounding step apart at most (fp32 vs fp64 math can flip a rounding)
        torch.testing.assert_close(ours.double(), ref, rtol=2 ** -7, atol=1e-3)


def check_against_transcription(opt, params, ref, dtype):
    """The transcription lives on the CPU (Python floats); the optimizer's tensors are moved there to compare."""
    p_ref, m_ref, h_ref, win_ref = ref
    n = sum(p.numel() for p in params)
    for p, pr, mr, hr in zip(params, p_ref, m_ref, h_ref):
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["hessian"].dtype == torch.float32
        assert_p_close(p.detach().cpu(), pr, dtype)
        torch.testing.assert_close(state["exp_avg"].cpu().double(), mr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["hessian"].cpu().double(), hr, rtol=1e-5, atol=1e-6)
    assert abs(opt.win_rate().item() - win_ref) <= 2 / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [True, False])
def test_triton_and_twin_follow_the_transcription(backend, dtype, weight_decay):
    grads = make_grads(SHAPES, dtype)
    ref = transcription(make_params(SHAPES, dtype), split_groups(make_params(SHAPES, dtype), GROUPS, weight_decay),
                        grads)
    assert 0.05 < ref[3] < 0.95, "the synthetic run should mix clipped and unclipped coordinates"
    for choice in ("triton", "torch"):
        backend(choice)
        params = make_params(SHAPES, dtype)
        opt = run_optimizer(params, split_groups(params, GROUPS, weight_decay), grads)
        assert opt.last_backend == choice
        check_against_transcription(opt, params, ref, dtype)


@pytest.mark.parametrize("choice", ["triton", "torch"])
def test_first_steps_are_sign_momentum(backend, choice):
    """h = 0: every coordinate is clipped, the step is exactly -lr*sign(g), and zero gradients do not move."""
    backend(choice)
    params = make_params([(5, 13), (1,)], torch.float32)
    before = [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, device=DEVICE) for p in params]
    grads[0][0, :4] = 0.0
    opt = SophiaG(params, lr=0.01, weight_decay=0.0, tile=32)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step(bs=512)
    for p, b, g in zip(params, before, grads):
        assert torch.equal(p.detach(), b - 0.01 * torch.sign(g))
    assert opt.win_rate().item() == 0.0


def test_state_dict_roundtrip_gives_identical_next_steps(backend):
    """Save mid-run (bf16 and fp32 parameters: two buckets), load into a fresh optimizer: the next steps agree
    bit for bit, and the loaded state is still fp32 (torch's loader alone would cast it to bf16)."""
    backend("triton")
    shapes = [(33, 5), (7,), (130,), ()]
    grads32, grads16 = make_grads(shapes, torch.float32, steps=12), make_grads(shapes, torch.bfloat16, steps=12)
    mixed = [(g32[:2] + g16[2:], h32[:2] + h16[2:]) for (g32, h32), (g16, h16) in zip(grads32, grads16)]

    def fresh_params():
        return make_params(shapes[:2], torch.float32) + make_params(shapes[2:], torch.bfloat16, seed=3)

    params_a = fresh_params()
    opt_a = run_optimizer(params_a, split_groups(params_a, GROUPS, True), mixed[:8])
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    saved_params = [p.detach().clone() for p in params_a]

    def run_tail(opt, params):  # the last 4 steps, with a Hessian update after the second
        for step, (g, gh) in enumerate(mixed[8:]):
            for p, x in zip(params, g):
                p.grad = x.clone()
            opt.step(bs=BS)
            if step == 1:
                for p, x in zip(params, gh):
                    p.grad = x.clone()
                opt.update_hessian()
    run_tail(opt_a, params_a)

    params_b = [torch.nn.Parameter(x.clone()) for x in saved_params]
    opt_b = SophiaG(split_groups(params_b, GROUPS, True), betas=BETAS, rho=RHO, eps=EPS, tile=64)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer))
    assert all(opt_b.state[p]["exp_avg"].dtype == torch.float32 for p in params_b)
    run_tail(opt_b, params_b)
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa.detach(), pb.detach())
        for key in ("exp_avg", "hessian"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])


@pytest.mark.parametrize("choice", ["triton", "torch"])
def test_parameters_without_gradient_are_left_alone(backend, choice):
    backend(choice)
    used, unused = make_params([(70,), (9,)], torch.float32)
    before = unused.detach().clone()
    opt = SophiaG([used, unused], lr=0.01, weight_decay=0.5, tile=32)
    for _ in range(3):
        used.grad = torch.randn(used.shape, device=DEVICE)
        opt.step(bs=10)
        opt.update_hessian()
    assert torch.equal(unused.detach(), before)  # not even weight decay
    assert not opt.state[unused]["exp_avg"].any() and not opt.state[unused]["hessian"].any()
    assert opt.state[used]["hessian"].any()


def test_unaligned_parameter_takes_the_unvectorised_path(backend):
    """A parameter that starts 4 bytes into its storage: the kernel may not assume 16-byte alignment."""
    results = []
    for choice in ("triton", "torch"):
        backend(choice)
        storage = torch.randn(101, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        param = torch.nn.Parameter(storage[1:])
        assert param.data_ptr() % 16 != 0
        opt = SophiaG([param], lr=0.01, tile=32)
        gen = torch.Generator().manual_seed(6)
        for step in range(6):
            param.grad = torch.randn(100, generator=gen).to(DEVICE)
            opt.step(bs=50)
            if step % 2:
                opt.update_hessian()
        results.append((param.detach().clone(), opt.state[param]["exp_avg"].clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "learning rate"), (dict(rho=-0.1), "rho"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.99)), "betas"), (dict(eps=0.0), "eps"), (dict(tile=100), "tile"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SophiaG(make_params([(3,)], torch.float32), **kwargs)


def test_negative_lr_from_a_schedule_is_caught_at_step():
    params = make_params([(3,)], torch.float32)
    opt = SophiaG(params)
    params[0].grad = torch.ones(3, device=DEVICE)
    opt.param_groups[0]["lr"] = -0.1
    with pytest.raises(ValueError, match="learning rate"):
        opt.step(bs=8)


@pytest.mark.parametrize("bs", [0, -5, float("nan"), True, "4096"])
def test_bs_must_be_a_positive_token_count(bs):
    params = make_params([(3,)], torch.float32)
    params[0].grad = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="bs"):
        SophiaG(params).step(bs=bs)
    with pytest.raises(TypeError):
        SophiaG(params).step()  # bs is required without an estimator: there is no sensible default


@pytest.mark.parametrize("choice", ["triton", "torch"])
def test_sparse_gradients_are_refused(backend, choice):
    backend(choice)
    params = make_params([(4, 3)], torch.float32)
    params[0].grad = torch.eye(4, 3, device=DEVICE).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        SophiaG(params).step(bs=8)


def test_wrong_dtypes_are_refused(backend):
    backend("triton")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        SophiaG(make_params([(3,)], torch.float64))
    param = make_params([(3,)], torch.bfloat16)[0]
    if not hasattr(param, "grad_dtype"):
        pytest.skip("this torch refuses a gradient of another dtype by itself")
    param.grad_dtype = None  # let torch accept an fp32 gradient on a bf16 parameter; SophiaG must refuse it
    param.grad = torch.ones(3, device=DEVICE)
    with pytest.raises(TypeError, match="does not match"):
        SophiaG([param]).step(bs=8)


def test_non_contiguous_parameter(backend):
    backend("triton")
    param = torch.nn.Parameter(torch.randn(6, 4, device=DEVICE).t())
    param.grad = torch.randn(6, 4, device=DEVICE).t()
    with pytest.raises(ValueError, match="contiguous"):
        SophiaG([param]).step(bs=8)
    backend("torch")  # the twin has no such restriction
    SophiaG([param]).step(bs=8)


def test_forced_triton_on_cpu_without_interpreter_is_an_error(backend, monkeypatch):
    backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    params = make_params([(3,)], torch.float32, device="cpu")  # CPU tensors, whatever the machine
    params[0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        SophiaG(params).step(bs=8)


# ----------------------------------------------------------------------------------------------------------------
# The estimator's labels and loss
# ----------------------------------------------------------------------------------------------------------------
def test_sampled_labels_follow_the_softmax_and_give_the_gauss_newton_diagonal():
    """For CE with labels drawn from q = softmax(f): E[∇_f] = 0 and E[∇_f ⊙ ∇_f] = q(1 - q) (Bartlett), the
    diagonal the estimator squares its way to. A sampler that ignored the softmax (or a temperature) fails."""
    n = 20000
    row = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0])
    q = torch.softmax(row, 0)
    logits = row.repeat(n, 1).to(torch.bfloat16).float().requires_grad_()  # bf16-representable values
    gen = torch.Generator().manual_seed(0)
    labels = sample_labels_from_logits(logits.view(100, n // 100, 5), generator=gen)
    assert labels.shape == (100, n // 100) and labels.dtype == torch.int64
    freq = torch.bincount(labels.flatten(), minlength=5).float() / n
    assert (freq - q).abs().max() < 0.015
    loss = sampled_label_loss(logits, generator=torch.Generator().manual_seed(1))
    loss.backward()
    per_token = logits.grad * n  # the loss is a mean over n tokens
    assert per_token.mean(0).abs().max() < 0.015
    assert (per_token.pow(2).mean(0) - q * (1 - q)).abs().max() < 0.015


def test_scale_bs_times_h_is_the_curvature_of_the_mean_loss_whatever_the_token_count(backend):
    """The docstring's scale convention, end to end through SophiaG's own refresh: an estimator averaging its
    sampled-label loss over B tokens returns B, and bs * h (bias-corrected EMA) converges to the Gauss-Newton
    diagonal of the MEAN per-token loss, mean_b x_bi^2 q_bj (1 - q_bj) for logits x W, for B = 4 and B = 32 alike.
    Passing a larger bs (the tokens of a whole step, grad_accum x B, as train.py once did) makes it grad_accum
    times too large, which this test would catch."""
    backend("torch")
    torch.manual_seed(0)
    x_all, steps, beta2 = torch.randn(32, 3), 2000, 0.998
    W = torch.nn.Parameter(0.5 * torch.randn(3, 4))
    for B in (4, 32):
        x = x_all[:B]
        q = torch.softmax(x @ W.detach(), -1)
        want = (x ** 2).T @ (q * (1 - q)) / B                      # (3, 4): the exact diagonal
        gen = torch.Generator().manual_seed(B)

        def estimator(step):
            sampled_label_loss(x @ W, generator=gen).backward()
            return B
        opt = SophiaG([W], lr=0.0, betas=(0.9, beta2), rho=1.0, weight_decay=0.0, hess_interval=1,
                      estimator=estimator)
        for _ in range(steps):
            opt.step()                                           # no gradient: nothing moves; then the refresh
        assert opt.param_groups[0]["bs"] == B
        curvature = opt.param_groups[0]["bs"] * opt.state[W]["hessian"] / (1 - beta2 ** steps)
        assert abs(curvature.sum() / want.sum() - 1) < 0.1, (B, curvature, want)
        assert ((curvature - want).abs() <= 0.3 * want + 1e-3).all(), (B, curvature, want)


def test_sampled_label_loss_respects_the_mask():
    logits = torch.randn(2, 6, 11, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 3:] = True
    sampled_label_loss(logits, loss_mask=mask, generator=torch.Generator().manual_seed(2)).backward()
    assert not logits.grad[:, :3].any() and logits.grad[:, 3:].abs().sum() > 0



def test_training_loop_with_the_estimator_learns(backend):
    """The whole recipe on a toy next-token task (y = x + 1 mod V): steps with bs = tokens, and every 4 steps
    the estimator's micro-step (sampled-label loss, backward, update_hessian). The loss must fall, and h must
    have been filled for every parameter."""
    backend("triton")
    vocab = 17
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, vocab)).to(DEVICE)
    opt = SophiaG(model.parameters(), lr=0.02, rho=0.05, weight_decay=0.0, tile=256)
    gen, label_gen = torch.Generator().manual_seed(0), torch.Generator(device=DEVICE).manual_seed(1)
    losses = []
    for step in range(16):
        x = torch.randint(0, vocab, (8, 16), generator=gen).to(DEVICE)
        loss = torch.nn.functional.cross_entropy(model(x).view(-1, vocab), ((x + 1) % vocab).view(-1))
        loss.backward()
        opt.step(bs=x.numel())
        opt.zero_grad(set_to_none=True)
        if step % 4 == 3:
            sampled_label_loss(model(x), generator=label_gen).backward()
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], losses
    assert all(opt.state[p]["hessian"].abs().sum() > 0 for p in model.parameters())
    assert 0.0 <= opt.win_rate().item() <= 1.0


def compare_step_by_step(backend, shapes, dtype, device, tile, steps=6):
    """The Triton step against the twin's, one step at a time: before every step the Triton side is reset to the
    twin's p, m and h, so each comparison is one step of each from the same state and differences cannot compound.

    Bounds, per coordinate. m and h: 1e-5 relative + 1e-6. p: 1e-5 |p| + 1e-6 + lr * (error of the clipped ratio)
    (+ one rounding step for bf16/fp16 p). The ratio's error is the one fp32 arithmetic cannot avoid:
    m = beta1*m + (1 - beta1)*g may cancel, and the two implementations round its terms differently (fused
    multiply-adds in the kernel, separate foreach ops in the twin), so m carries an absolute error of
    dm = 2^-22 (|m_prev| + |g|), and the ratio m / c (c = rho*bs*h + eps) an error of min(2, dm / c) -- unless both
    clip to the same sign, |m| >= c + dm, where it is exactly 0. With h = 0 (c = eps = 1e-12) that leaves the
    coordinates whose m cancelled to rounding noise: one implementation steps by +-lr on the noise, the other not
    (seen at real shapes with bf16 gradients: 0.9 * 0.2109375 - 0.1 * 1.8984375 = 0). The win rate may differ by the
    coordinates within dm of the clipping threshold."""
    grads = make_grads(shapes, dtype, device=device, steps=steps)
    params = {c: make_params(shapes, dtype, device=device) for c in ("triton", "torch")}
    opts = {c: SophiaG(split_groups(params[c], GROUPS, True), betas=BETAS, rho=RHO, eps=EPS, tile=tile)
            for c in params}
    lr_of = {id(p): g["lr"] for c in opts for g in opts[c].param_groups for p in g["params"]}
    rho_bs = RHO * BS
    for step, (g, gh) in enumerate(grads):
        state = lambda p, key: opts["torch"].state[p][key].clone() if key in opts["torch"].state.get(p, {}) else None
        before = [(p.detach().float().clone(), state(p, "exp_avg"), state(p, "hessian")) for p in params["torch"]]
        for choice in ("torch", "triton"):
            backend(choice)
            for p, x in zip(params[choice], g):
                p.grad = x.clone()
            opts[choice].step(bs=BS)
            assert opts[choice].last_backend == choice
        allowed_flips = 0
        for pt, pr, x, (p0, m0, h0) in zip(params["triton"], params["torch"], g, before):
            m0 = torch.zeros_like(p0) if m0 is None else m0
            h0 = torch.zeros_like(p0) if h0 is None else h0
            st, sr = opts["triton"].state[pt], opts["torch"].state[pr]
            torch.testing.assert_close(st["exp_avg"], sr["exp_avg"], rtol=1e-5, atol=1e-6)
            c = rho_bs * h0 + EPS
            dm = 2 ** -22 * (m0.abs() + x.float().abs())
            m = sr["exp_avg"]
            ratio_err = torch.where(m.abs() >= c + dm, torch.zeros_like(c), (dm / c).clamp(max=2.0))
            p_ref = pr.detach().float()
            bound = 1e-6 + 1e-5 * p_ref.abs() + lr_of[id(pr)] * ratio_err
            if dtype != torch.float32:
                bound = bound + 2 ** -7 * p_ref.abs()
            err = (pt.detach().float() - p_ref).abs()
            assert (err <= bound).all(), (f"step {step} {tuple(pt.shape)} {dtype}: {(err > bound).sum().item()} "
                                          f"coordinates off, worst excess {(err - bound).max().item():.3e}")
            allowed_flips += ((m.abs() - rho_bs * h0).abs() <= dm).sum().item()
        n = sum(p.numel() for p in params["torch"])
        flips = abs(opts["triton"].win_rate().item() - opts["torch"].win_rate().item()) * n
        assert flips <= allowed_flips + 0.5, (step, flips, allowed_flips)
        if step % K == K - 1:
            for choice in ("torch", "triton"):
                backend(choice)
                for p, x in zip(params[choice], gh):
                    p.grad = x.clone()
                opts[choice].update_hessian()
            for pt, pr in zip(params["triton"], params["torch"]):
                torch.testing.assert_close(opts["triton"].state[pt]["hessian"], opts["torch"].state[pr]["hessian"],
                                           rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # the next step starts both from the twin's state
            for pt, pr in zip(params["triton"], params["torch"]):
                pt.copy_(pr)
                for key in ("exp_avg", "hessian"):
                    opts["triton"].state[pt][key].copy_(opts["torch"].state[pr][key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_step_matches_twin_step_by_step(backend, dtype):
    compare_step_by_step(backend, SHAPES, dtype, DEVICE, tile=64)


# ----------------------------------------------------------------------------------------------------------------
# GPU: real shapes (GPT-2 124M's kinds of tensors), fp32 and bf16, the default tile
# ----------------------------------------------------------------------------------------------------------------
GPU_SHAPES = [(50304, 768), (2304, 768), (4096, 768), (768, 2048), (768,), (1000, 3), ()]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_matches_twin_at_real_shapes(backend, dtype):
    compare_step_by_step(backend, GPU_SHAPES, dtype, "cuda", tile=4096)


@pytest.mark.gpu
def test_gpu_unaligned_and_multi_group(backend):
    """Two groups, one parameter 4 bytes into its storage (as DDP's gradient-bucket views can be)."""
    start = torch.randn(3 * 4099, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    results = []
    for choice in ("triton", "torch"):
        backend(choice)
        a = torch.nn.Parameter(start.view(3, 4099).clone())
        b = torch.nn.Parameter(torch.cat([torch.zeros(1, device="cuda"), start])[1:])
        assert b.data_ptr() % 16 != 0
        opt = SophiaG([dict(params=[a], lr=1e-3), dict(params=[b], lr=3e-3, weight_decay=0.0)])
        gen = torch.Generator(device="cuda").manual_seed(1)
        for step in range(10):
            a.grad = torch.randn(a.shape, device="cuda", generator=gen)
            b.grad = torch.randn(b.shape, device="cuda", generator=gen)
            opt.step(bs=4096)
            if step % 3 == 2:
                opt.update_hessian()
        assert opt.last_backend == choice
        results.append([a.detach().clone(), b.detach().clone()])
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


if kernels.HAS_TRITON:
    import triton
    import triton.language as tl
    from kernels.sophia import _round_to

    @triton.jit
    def _round_kernel(x, y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y + offs, _round_to(tl.load(x + offs), tl.bfloat16))


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs Triton")
def test_bf16_rounding_is_round_to_nearest_even():
    """The kernel's own fp32 -> bf16 rounding (the interpreter truncates) against torch's: at ties, near the
    largest finite value, for inf, NaN and subnormals."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ties = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 3 * 2 ** -8), 1 + 2 ** -8 + 2 ** -20, 1.5703125 + 0.006]
    special = [3.3e38, -3.3e38, 3.39e38, float("inf"), float("-inf"), 0.0, -0.0, 1e-40]
    x = torch.cat([torch.tensor(ties + special), torch.randn(64 - len(ties) - len(special))]).to(device)
    y = torch.empty(64, dtype=torch.bfloat16, device=device)
    _round_kernel[(1,)](x, y, 64)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    x[0] = float("nan")
    _round_kernel[(1,)](x, y, 64)
    assert torch.isnan(y[0])
