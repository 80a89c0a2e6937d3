"""parallel.py on the CPU (gloo): FSDP2 over two processes trains what one process trains, a sharded run's
checkpoint is the one format (resumable by any number of processes), two torchrun "nodes" equal one process, and
activation checkpointing changes memory, not numbers."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import train
from configurator import configure
from conftest import ROOT, TINY_TEST_MODEL

OVERRIDES = [a for a in TINY_TEST_MODEL if not a.startswith(("--batch_size", "--total_batch_tokens"))]
# one process: 2 micro-batches of 4 rows a step; two processes: 4 rows each. The same 8 windows a step.
SHAPE = ["--batch_size=4", "--total_batch_tokens=512", "--device=cpu", "--eval_interval=4", "--lr_decay_iters=8"]


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def torchrun(*args, nproc=2, launcher=("--standalone",)):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train.py"), *OVERRIDES, *SHAPE, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finished(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def one_process(sample_data_dir, tmp_path_factory):
    """The reference: one process, 8 steps, checkpoints at 4 and 8 (the 4-step one copied aside)."""
    out = tmp_path_factory.mktemp("one")
    train.train(configure(train.DEFAULTS, OVERRIDES + SHAPE + [f"--data_dir={sample_data_dir}", f"--out_dir={out}",
                                                               "--max_iters=8"]))
    return out


def test_fsdp_two_processes_match_one_process_and_save_the_same_format(sample_data_dir, one_process, tmp_path):
    finished(torchrun(f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path}", "--max_iters=8", "--parallel=fsdp"))
    one, two = losses(one_process), losses(tmp_path)
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for s in one:
        assert abs(one[s] - two[s]) < 1e-4, (s, one[s], two[s])
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (one_process, tmp_path))
    assert a["model"].keys() == b["model"].keys()  # FSDP keeps the names: no prefixes, whole tensors
    for k in a["model"]:
        assert a["model"][k].shape == b["model"][k].shape
        # fp32 noise (another order of the reductions), which Adam's m / sqrt(v) can grow where v is tiny: 1.6e-5
        # at most, in 1 of 3.2M embedding entries, measured
        assert float((a["model"][k] - b["model"][k]).abs().max()) < 1e-4, k
    sa, sb = a["optimizer"], b["optimizer"]
    assert sa["state"].keys() == sb["state"].keys() and [g["params"] for g in sa["param_groups"]] == \
        [g["params"] for g in sb["param_groups"]]  # numbered by parameter, as Optimizer.state_dict() numbers them
    for i in sa["state"]:
        assert torch.allclose(sa["state"][i]["exp_avg_sq"], sb["state"][i]["exp_avg_sq"], atol=1e-6)


def test_fsdp_resume_continues_the_same_losses_with_any_number_of_processes(sample_data_dir, one_process, tmp_path):
    """4 steps sharded over 2 processes, then resumed to 8 twice: sharded again (2 processes), and by one plain
    process. Both continue the one-process loss sequence (fp32 noise: the reductions' order differs)."""
    finished(torchrun(f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path / 'a'}", "--max_iters=4",
                      "--parallel=fsdp"))
    os.makedirs(tmp_path / "b")
    for f in ("ckpt.pt", "metrics.jsonl", "run_config.json"):
        if os.path.exists(tmp_path / "a" / f):
            with open(tmp_path / "a" / f, "rb") as src, open(tmp_path / "b" / f, "wb") as dst:
                dst.write(src.read())
    again = torchrun(f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path / 'a'}", "--max_iters=8",
                     "--parallel=fsdp", "--init_from=resume")
    finished(again)
    train.train(configure(train.DEFAULTS, OVERRIDES + SHAPE + [f"--data_dir={sample_data_dir}", "--max_iters=8",
                                                               f"--out_dir={tmp_path / 'b'}", "--init_from=resume"]))
    ref = losses(one_process)
    for run in ("a", "b"):
        got = losses(tmp_path / run)
        assert sorted(got) == list(range(1, 9)), run
        for s in range(5, 9):
            assert abs(got[s] - ref[s]) < 1e-4, (run, s, got[s], ref[s])


@pytest.mark.parametrize("optimizer", ["sophia", "muon"])
def test_sophia_and_muon_on_fsdp_slices_match_ddp(sample_data_dir, tmp_path, optimizer):
    """Sophia updates each process's slice (its Hessian refreshed every 2 steps from the ranks' own sampled
    labels, as under DDP); Muon gathers each matrix's update for Newton-Schulz and applies its own rows. Both
    train what DDP trains on the same two processes, and save their state whole (checked by resuming it)."""
    extra = [f"--optimizer={optimizer}", "--hess_interval=2", "--learning_rate=2e-3", "--max_iters=4",
             f"--data_dir={sample_data_dir}"]
    runs = [torchrun(*extra, f"--out_dir={tmp_path / p}", f"--parallel={p}") for p in ("ddp", "fsdp")]
    for run in runs:
        finished(run)
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4]
    for s in ddp:
        assert abs(ddp[s] - fsdp[s]) < 1e-4, (s, ddp[s], fsdp[s])
    a, b = (torch.load(tmp_path / p / "ckpt.pt", weights_only=True)["optimizer"]["state"] for p in ("ddp", "fsdp"))
    assert a.keys() == b.keys()
    for i in a:
        for key in a[i]:
            assert a[i][key].shape == b[i][key].shape, (i, key)  # whole, as one process saves it
            assert torch.allclose(a[i][key].float(), b[i][key].float(), atol=1e-5), (i, key)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_match_one_process(sample_data_dir, one_process, tmp_path):
    """torchrun's multi-node form, two "nodes" of one process on this machine meeting at a c10d rendezvous on
    localhost: README's two-node command with the addresses of one machine."""
    port = free_port()
    nodes = [torchrun(f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path}", "--max_iters=8", nproc=1,
                      launcher=("--nnodes=2", f"--node_rank={rank}", "--rdzv_backend=c10d", "--rdzv_id=test",
                                f"--rdzv_endpoint=127.0.0.1:{port}"))
             for rank in (0, 1)]
    for node in nodes:
        finished(node)
    one, two = losses(one_process), losses(tmp_path)
    assert sorted(two) == list(range(1, 9))
    for s in one:
        assert abs(one[s] - two[s]) < 1e-4, (s, one[s], two[s])


def test_activation_checkpointing_recomputes_the_same_numbers(sample_data_dir, one_process, tmp_path, capsys):
    train.train(configure(train.DEFAULTS, OVERRIDES + SHAPE + [f"--data_dir={sample_data_dir}", "--max_iters=8",
                                                               f"--out_dir={tmp_path}",
                                                               "--activation_checkpointing=blocks"]))
    assert "activation checkpointing: 2 of 2 blocks" in capsys.readouterr().out
    assert losses(tmp_path) == losses(one_process)  # recomputed, bit for bit


def test_one_process_fsdp_trains(sample_data_dir, one_process, tmp_path):
    """parallel='fsdp' without torchrun: a group of one (FSDP's bf16 weights and checkpointing on one GPU)."""
    train.train(configure(train.DEFAULTS, OVERRIDES + SHAPE + [f"--data_dir={sample_data_dir}", "--max_iters=8",
                                                               f"--out_dir={tmp_path}", "--parallel=fsdp",
                                                               "--activation_checkpointing=1"]))
    one, got = losses(one_process), losses(tmp_path)
    assert all(abs(one[s] - got[s]) < 1e-4 for s in one)
    assert not torch.distributed.is_initialized()  # the group is gone with the run


@pytest.mark.parametrize("flags, message", [
    (["--activation_checkpointing=some"], "activation_checkpointing='some': expected 'none', 'blocks' or a number"),
    (["--activation_checkpointing=3"], "a number of blocks from 0 to n_layer=2"),
    (["--parallel=zero"], "parallel='zero': expected one of ddp, fsdp"),
    (["--parallel=fsdp", "--compile_mode=reduce-overhead"], "cannot hold FSDP's gathers"),
])
def test_bad_parallel_settings_are_one_line_before_anything_runs(sample_data_dir, tmp_path, flags, message):
    cfg = configure(train.DEFAULTS, OVERRIDES + SHAPE + [f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path}",
                                                         "--max_iters=2", *flags])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.train(cfg)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_memory_estimate_orders_the_settings_and_matches_the_measured_ddp_peak():
    """`python model.py config/X.py --memory`: FSDP on 8 GPUs and checkpointing each save what they should, and
    the one DDP peak measured on a GPU (auto_g_nano_1b, 2 x H200, 16 x 1024: 50.6 GiB) is within 15%."""
    from configurator import read_config_file
    from model import GPT, GPTConfig
    from parallel import memory_estimate, memory_table
    preset = read_config_file(os.path.join(ROOT, "config", "auto_g_nano_1b.py"))
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(preset))
    total = lambda *a: sum(memory_estimate(model, 16, *a).values()) / 2**30
    assert abs(total(2, "ddp", 0) - 50.6) / 50.6 < 0.15
    assert total(8, "fsdp", 0) < total(8, "ddp", 0) and total(1, "ddp", 24) < total(1, "ddp", 0)
    assert total(8, "fsdp", 24) < 8  # sharded state and recomputed activations: a 1B model on small GPUs
    table = memory_table(model.config, 16)
    assert table.count("\n| ") == 1 + 12 and "| 8 | fsdp | blocks |" in table
    out = subprocess.run([sys.executable, "model.py", "config/auto_g_nano_1b.py", "--memory"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120).stdout
    assert "1,050,002,688" in out and "| 1 | fsdp | blocks |" in out


def test_memory_of_a_missing_preset_is_one_line():
    out = subprocess.run([sys.executable, "model.py", "config/nope.py", "--memory"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip() == "error: config file not found: config/nope.py"
