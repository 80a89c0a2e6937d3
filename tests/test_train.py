"""train.py end to end on the CPU: loss falls, resume is exact, DDP matches one process, and nothing is lost
when things go wrong (NaN loss, a crash mid-checkpoint, SIGTERM, bad paths and keys)."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import train
from configurator import configure
from conftest import ROOT, TINY_TEST_MODEL
from model import GPT, GPTConfig


def run_cfg(data_dir, out_dir, *extra):
    return configure(train.DEFAULTS, TINY_TEST_MODEL + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra])


def losses(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r["val_loss"] for r in rows if "val_loss" in r]


def test_validation_loss_falls_and_artifacts_exist(sample_data_dir, tmp_path, capsys):
    train.train(run_cfg(sample_data_dir, tmp_path, "--max_iters=60", "--eval_interval=30",
                        "--sample_prompt=The cell"))
    assert "sample: The cell" in capsys.readouterr().out       # the run ends with a generation from the prompt
    _, val = losses(tmp_path)
    assert val[0] > 10.0                       # untrained: about ln(50257) = 10.8
    assert val[-1] < val[0] - 2.0, val         # clearly learned something (unigram statistics at least)
    for f in ("ckpt.pt", "best.pt", "loss.png", "metrics.jsonl"):
        assert os.path.getsize(tmp_path / f) > 0
    ckpt = checkpoint.load(str(tmp_path))
    assert ckpt["step"] == 60 and ckpt["config"]["n_layer"] == 2 and "optimizer" in ckpt and "rng" in ckpt
    assert not any(k.startswith(("_orig_mod", "module")) for k in ckpt["model"])  # uncompiled names


def test_resume_continues_the_same_loss_sequence_bitwise(sample_data_dir, tmp_path):
    schedule = ["--lr_decay_iters=12", "--eval_interval=6"]
    train.train(run_cfg(sample_data_dir, tmp_path / "straight", "--max_iters=12", *schedule))
    train.train(run_cfg(sample_data_dir, tmp_path / "split", "--max_iters=6", *schedule))
    train.train(run_cfg(sample_data_dir, tmp_path / "split", "--max_iters=12", "--init_from=resume", *schedule))
    straight, _ = losses(tmp_path / "straight")
    split, _ = losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 13))
    assert split == straight                   # loss for loss, bit for bit


def test_ddp_two_processes_match_one_process(sample_data_dir, tmp_path):
    common = [f"--data_dir={sample_data_dir}", "--max_iters=4", "--eval_interval=4", "--device=cpu"]
    overrides = [a for a in TINY_TEST_MODEL if not a.startswith(("--batch_size", "--total_batch_tokens"))]
    # one process accumulates 2 micro-batches of 4 rows; two processes take 4 rows each: the same 8 windows a step
    single = configure(train.DEFAULTS, overrides + common + [f"--out_dir={tmp_path / 'one'}", "--batch_size=4",
                                                             "--total_batch_tokens=512"])
    train.train(single)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *overrides, *common, f"--out_dir={tmp_path / 'two'}",
           "--batch_size=4", "--total_batch_tokens=512"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one, val_one = losses(tmp_path / "one")
    two, val_two = losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for s in one:
        assert abs(one[s] - two[s]) < 1e-4, (s, one[s], two[s])
    assert abs(val_one[-1] - val_two[-1]) < 1e-4


def test_ddp_sophia_two_processes(sample_data_dir, tmp_path):
    """Sophia under DDP, grad_accum 2: the Hessian refresh (a logits-only forward through the DDP wrapper, then a
    backward outside no_sync on the step's first micro-batch) neither hangs nor trips DDP's reducer, the steps go
    on, and the saved h is refreshed. (A smoke test: that the ranks' h agree follows from DDP averaging grads.)"""
    overrides = [a for a in TINY_TEST_MODEL if not a.startswith(("--batch_size", "--total_batch_tokens"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *overrides, f"--data_dir={sample_data_dir}", "--max_iters=4",
           "--eval_interval=4", "--device=cpu", f"--out_dir={tmp_path}", "--batch_size=2", "--total_batch_tokens=512",
           "--optimizer=sophia", "--hess_interval=2", "--learning_rate=2e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, _ = losses(tmp_path)
    assert sorted(steps) == [1, 2, 3, 4]
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)["optimizer"]["state"]
    assert state and all(s["hessian"].abs().sum() > 0 for s in state.values())


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(sample_data_dir, tmp_path, monkeypatch):
    train.train(run_cfg(sample_data_dir, tmp_path, "--max_iters=4", "--eval_interval=2", "--lr_decay_iters=8"))
    good = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    real_forward = train.GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        return logits, (loss * float("nan") if loss is not None and self.training else loss)
    monkeypatch.setattr(train.GPT, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient norm at step 5: stopping without "
                                                 "saving; the last good checkpoint is .*ckpt.pt \\(step 4"):
        train.train(run_cfg(sample_data_dir, tmp_path, "--max_iters=8", "--init_from=resume", "--lr_decay_iters=8"))
    after = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert after["step"] == good["step"] == 4
    assert all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])


def test_crash_during_checkpoint_write_leaves_the_previous_one(sample_data_dir, tmp_path, monkeypatch):
    train.train(run_cfg(sample_data_dir, tmp_path, "--max_iters=2", "--eval_interval=2", "--lr_decay_iters=8"))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")      # the write starts ...
        raise OSError("disk full")              # ... and the process dies mid-way
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        train.train(run_cfg(sample_data_dir, tmp_path, "--max_iters=4", "--eval_interval=2", "--init_from=resume",
                            "--lr_decay_iters=8"))
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)   # the old one, whole
    assert ckpt["step"] == 2


def test_sigterm_saves_a_checkpoint_and_resume_continues(sample_data_dir, tmp_path):
    args = [sys.executable, os.path.join(ROOT, "train.py"), *TINY_TEST_MODEL, f"--data_dir={sample_data_dir}",
            f"--out_dir={tmp_path}", "--max_iters=100000", "--eval_interval=100000", "--lr_decay_iters=100"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out         # 128 + SIGTERM, after saving: a scheduler sees the preemption
    assert "stopped by signal" in out
    step = torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"]
    assert step >= 3
    cfg = run_cfg(sample_data_dir, tmp_path, f"--max_iters={step + 2}", "--init_from=resume", "--lr_decay_iters=100")
    train.train(cfg)
    steps, _ = losses(tmp_path)
    assert sorted(steps) == list(range(1, step + 3))


@pytest.mark.parametrize("argv, msg", [
    (["--data_dir=/nonexistent/data"], "data folder not found: /nonexistent/data"),
    (["--learning_rat=1e-3"], "unknown config key 'learning_rat'"),
    (["--init_from=resume", "--out_dir=/tmp/nanoforge_no_such_run"], "no checkpoint at /tmp/nanoforge_no_such_run"),
    (["--init_from=/nonexistent/run"], "no checkpoint"),
])
def test_bad_input_exits_with_a_clear_message(sample_data_dir, argv, msg):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY_TEST_MODEL,
                          f"--data_dir={sample_data_dir}", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0
    assert msg in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_wrong_tokenizer_shard_is_refused(tmp_path):
    import numpy as np
    from shards import write_shard
    for name in ("val_000000.bin", "train_000001.bin"):
        write_shard(str(tmp_path / name), np.arange(0, 100000, 7), 128256)   # ids up to 99995: cl100k-sized
    # a meta.json that lies (gpt2) about shards with bigger ids: the ids themselves are still checked
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 128256, "n_vocab": 50257,
                                                    "eot": 0}))
    cfg = run_cfg(tmp_path, tmp_path / "out", "--max_iters=1")
    with pytest.raises(ValueError, match=r"uses ids up to 128255, beyond the model.s 50304 vocabulary rows"):
        train.train(cfg)


@pytest.mark.parametrize("schedule", ["cosine", "poly", "wsd", "constant"])
def test_lr_schedules_warm_up_then_reach_their_floor(schedule):
    run = SimpleNamespace(**dict(train.DEFAULTS, lr_schedule=schedule, learning_rate=2.0, min_lr=0.2,
                                 warmup_iters=10, max_iters=100, lr_decay_iters=0, poly_power=2.0, wsd_decay_frac=0.2))
    lrs = [train.lr_factor(s, run) for s in range(101)]   # a multiplier of each group's base lr: peak 1, floor 0.1
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0                       # linear warmup
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # never increases afterwards
    assert abs(lrs[100] - (1.0 if schedule == "constant" else 0.1)) < 1e-9
    if schedule == "wsd":
        assert lrs[79] == 1.0 and lrs[90] < 1.0


def test_sophia_trains_and_resumes_exactly(sample_data_dir, tmp_path):
    """optimizer='sophia': the Hessian refresh every hess_interval steps, the win rate in the log, exact resume."""
    opts = ["--optimizer=sophia", "--hess_interval=2", "--sophia_rho=0.05", "--learning_rate=4e-3",
            "--lr_decay_iters=10", "--eval_interval=5"]
    train.train(run_cfg(sample_data_dir, tmp_path / "straight", "--max_iters=10", *opts))
    train.train(run_cfg(sample_data_dir, tmp_path / "split", "--max_iters=5", *opts))
    train.train(run_cfg(sample_data_dir, tmp_path / "split", "--max_iters=10", "--init_from=resume", *opts))
    straight, val = losses(tmp_path / "straight")
    split, _ = losses(tmp_path / "split")
    assert split == straight
    assert val[-1] < val[0] - 0.5
    ckpt = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    hessians = [s["hessian"] for s in ckpt["optimizer"]["state"].values()]
    assert hessians and all(h.abs().sum() > 0 for h in hessians)   # the estimate was refreshed and saved


def test_save_checkpoints_off_and_run_config(sample_data_dir, tmp_path):
    """save_checkpoints=False: evaluations still logged, no ckpt.pt / best.pt; run_config.json holds the resolved
    settings either way."""
    train.train(run_cfg(sample_data_dir, tmp_path, "--max_iters=4", "--eval_interval=2", "--save_checkpoints=False"))
    _, val = losses(tmp_path)
    assert len(val) == 3  # steps 0, 2, 4
    assert not os.path.exists(tmp_path / "ckpt.pt") and not os.path.exists(tmp_path / "best.pt")
    saved = json.load(open(tmp_path / "run_config.json"))
    assert saved["max_iters"] == 4 and saved["save_checkpoints"] is False and saved["n_layer"] > 0


def test_hessian_refresh_uses_one_micro_batch_and_counts_its_tokens(sample_data_dir, tmp_path):
    """Sophia's estimate inside SophiaG.step(): the sampled-label gradient of the step's FIRST micro-batch alone, so
    with grad_accum 2 the refreshed h is (1 - beta2) * g^2 of that micro-batch's gradient, and the bs the next steps
    use is that micro-batch's token count (batch_size * block_size), not the step's (twice as many)."""
    cfg = run_cfg(sample_data_dir, tmp_path, "--optimizer=sophia", "--batch_size=2",
                  "--gradient_accumulation_steps=2", "--hess_interval=1")
    run = train.resolve(cfg)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**run.model))
    data = train.TokenWindows(run.data_dir, "train", run.block_size, model.config.padded_vocab_size, run.seed, True)
    opt = train.make_optimizer(model, run, train.hessian_estimator(model, model, data, run))
    for group in opt.param_groups:
        group["lr"] = 0.0                     # a step that moves nothing, then the refresh (hess_interval 1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.param_groups[0]["bs"] == 2 * run.block_size == run.tokens_per_step / 2
    from kernels.sophia import sampled_label_loss
    x, y, _ = data.batch(0, 2, torch.device("cpu"))   # step 0, micro-batch 0
    model.zero_grad()
    sampled_label_loss(model(x)[0], loss_mask=y != -1,
                       generator=torch.Generator().manual_seed(run.seed * 1_000_003)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    for p in model.parameters():
        want = (1 - cfg["beta2"]) * p.grad.float() ** 2
        torch.testing.assert_close(opt.state[p]["hessian"].view_as(p), want, rtol=1e-5, atol=1e-12)


def test_muon_branch_builds_kernels_muon_and_keeps_each_groups_base_lr(sample_data_dir, tmp_path, monkeypatch):
    """optimizer='muon' constructs kernels/muon.py's Muon (imported lazily, with the agreed signature) and the
    schedule multiplies each group's own base lr."""
    import types
    seen = {}

    class FakeMuon(torch.optim.SGD):
        def __init__(self, model, lr, adamw_lr, momentum, betas, weight_decay):
            seen.update(lr=lr, adamw_lr=adamw_lr, momentum=momentum, betas=betas, weight_decay=weight_decay)
            mats = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("wte")]
            rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and not n.startswith("wte"))]
            super().__init__([{"params": mats, "lr": lr}, {"params": rest, "lr": adamw_lr}], lr=lr)
    run = train.resolve(run_cfg(sample_data_dir, tmp_path, "--optimizer=muon", "--muon_lr=0.05"))
    model = GPT(GPTConfig(**run.model))
    monkeypatch.setitem(sys.modules, "kernels.muon", types.SimpleNamespace(Muon=FakeMuon))
    opt = train.make_optimizer(model, run)
    assert seen == dict(lr=0.05, adamw_lr=3e-3, momentum=0.95, betas=(0.9, 0.95), weight_decay=0.1)
    assert [g["base_lr"] for g in opt.param_groups] == [0.05, 3e-3]
