"""The speed instruments of train.py's step, on the CPU: the loader's vectorised batches equal the window-by-window
reading they replace, the profile's attribution of GPU work to phases (on a hand-made trace), and
--profile_steps leaving the run's numbers unchanged."""
import json
import os

import numpy as np
import pytest
import torch

import train
from bench.step_profile import analyse, table
from conftest import TINY_TEST_MODEL
from configurator import configure
from shards import TokenWindows, write_shard


def reference_batch(data, first, count, doc_starts):
    """The definition, one window at a time: sample g is window window_index(g) of its shard."""
    xs, ys, ds = [], [], []
    for g in range(first, first + count):
        w = data.window_index(g)
        s = int(np.searchsorted(data.first, w, side="right") - 1)
        tokens, mask, info = data.shards[s]
        start = (w - int(data.first[s])) * data.block_size
        chunk = torch.from_numpy(tokens[start:start + data.block_size + 1].astype(np.int64))
        x, y = chunk[:-1], chunk[1:].clone()
        if mask is not None:
            y[torch.from_numpy(mask[start + 1:start + data.block_size + 1] == 0)] = -1
        xs.append(x), ys.append(y)
        if info["doc_starts"] is None:
            ds.append(x == info["eot"])
        else:
            flags = torch.zeros(data.block_size, dtype=torch.bool)
            lo, hi = np.searchsorted(info["doc_starts"], [start, start + data.block_size])
            flags[torch.from_numpy(info["doc_starts"][lo:hi] - start)] = True
            ds.append(flags)
    return torch.stack(xs), torch.stack(ys), torch.stack(ds)


@pytest.mark.parametrize("sft", [False, True])
def test_vectorised_batches_equal_the_window_by_window_definition(tmp_path, sft):
    rng = np.random.default_rng(0)
    for name, n in (("val_000000.bin", 900), ("train_000001.bin", 1001), ("train_000002.bin", 517)):
        tokens = rng.integers(0, 70000, n)  # > 65535: uint32 shards
        extra = {}
        if sft:
            extra = {"mask": rng.integers(0, 2, n), "doc_starts": np.sort(rng.choice(n, 9, replace=False))}
        write_shard(str(tmp_path / name), tokens, 70000, eot=int(tokens[5]), **extra)
    data = TokenWindows(str(tmp_path), "train", 32, 70016, seed=3, shuffle=True)
    assert data.n == 1000 // 32 + 516 // 32
    for first in (0, 5, data.n - 3, 2 * data.n + 1):  # across shards, an epoch boundary, a later epoch
        want = reference_batch(data, first, 7, True)
        got = data.batch(first, 7, torch.device("cpu"), doc_starts=True)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
        x, y, none = data.batch(first, 7, torch.device("cpu"))
        assert none is None and torch.equal(x, want[0]) and torch.equal(y, want[1])


def fake_trace():
    """Two steps. Main thread 1: phases, and a launch inside 'data'; thread 2 (autograd's backward thread)
    launches while thread 1 waits inside forward_backward; one kernel is launched outside every phase."""
    X = lambda name, ts, dur, tid=1, cat="user_annotation", corr=None: {
        "ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "cat": cat,
        **({"args": {"correlation": corr}} if corr is not None else {})}
    events = []
    for step, t in enumerate((0, 1000)):
        c = 10 * step
        events += [X("phase:data", t, 100), X("phase:forward_backward", t + 100, 600),
                   X("phase:optimizer", t + 700, 200), X("phase:sophia_refresh", t + 750, 100),
                   X("cudaMemcpyAsync", t + 10, 5, cat="cuda_runtime", corr=c + 1),
                   X("memcpy", t + 20, 10, tid=7, cat="gpu_memcpy", corr=c + 1),
                   X("cudaLaunchKernel", t + 110, 5, cat="cuda_runtime", corr=c + 2),
                   X("fwd_kernel", t + 120, 300, tid=7, cat="kernel", corr=c + 2),
                   X("cuLaunchKernel", t + 400, 5, tid=2, cat="cuda_driver", corr=c + 3),    # backward thread
                   X("bwd_kernel", t + 420, 250, tid=7, cat="kernel", corr=c + 3),
                   X("cudaLaunchKernel", t + 760, 5, cat="cuda_runtime", corr=c + 4),        # nested phase
                   X("hess_kernel", t + 770, 50, tid=7, cat="kernel", corr=c + 4),
                   X("cudaLaunchKernel", t + 950, 5, cat="cuda_runtime", corr=c + 5),        # outside
                   X("late_kernel", t + 960, 20, tid=7, cat="kernel", corr=c + 5)]
    return {"traceEvents": events}


def test_profile_attributes_each_kernel_to_the_phase_that_launched_it():
    result = analyse(fake_trace(), steps=2, wall_ms=1.0)
    p = result["phases"]
    assert p["data"] == {"host_ms": 0.1, "gpu_ms": 0.01, "kernels": 1}
    assert p["forward_backward"] == {"host_ms": 0.6, "gpu_ms": 0.55, "kernels": 2}  # both threads' launches
    assert p["optimizer"]["host_ms"] == pytest.approx(0.1) and p["optimizer"]["kernels"] == 0  # minus nested
    assert p["sophia_refresh"] == {"host_ms": 0.1, "gpu_ms": 0.05, "kernels": 1}
    assert p["(outside the phases)"]["gpu_ms"] == pytest.approx(0.02)
    assert result["busy_ms"] == pytest.approx((10 + 300 + 250 + 50 + 20) / 1e3)
    # gaps over 50 us, each step: 30->120, 670->770, 820->960 (980 -> the next step's 1020 is only 40)
    assert result["idle_gaps"] == pytest.approx(3.0)
    assert result["top"][0][0] == "fwd_kernel" and result["top"][0][1] == pytest.approx(0.3)
    assert "| forward_backward | 0.60 | 0.55 | 2 |" in table(result)


def test_profile_steps_write_the_table_and_change_no_number(sample_data_dir, tmp_path, capsys):
    common = [f"--data_dir={sample_data_dir}", "--max_iters=6", "--eval_interval=6", "--save_checkpoints=False"]
    train.train(configure(train.DEFAULTS, TINY_TEST_MODEL + common + [f"--out_dir={tmp_path / 'plain'}"]))
    train.train(configure(train.DEFAULTS, TINY_TEST_MODEL + common + [f"--out_dir={tmp_path / 'prof'}",
                                                                      "--profile_steps=2"]))
    assert "| forward_backward |" in capsys.readouterr().out
    result = json.load(open(tmp_path / "prof" / "profile.json"))
    assert {"data", "forward_backward", "clip", "optimizer"} <= set(result["phases"]) and result["steps"] == 2
    assert os.path.exists(tmp_path / "prof" / "profile.md")
    read = lambda d: [json.loads(l).get("loss") for l in open(tmp_path / d / "metrics.jsonl")]
    assert read("plain") == read("prof")  # profiling observes; it changes nothing


def test_profile_steps_must_leave_steps_before_them(sample_data_dir, tmp_path):
    cfg = configure(train.DEFAULTS, TINY_TEST_MODEL + [f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path}",
                                                       "--max_iters=4", "--profile_steps=4"])
    with pytest.raises(ValueError, match="profile_steps=4 must be < max_iters=4"):
        train.train(cfg)


def test_cuda_graphs_with_gradient_accumulation_are_refused(sample_data_dir, tmp_path):
    """CUDA graph trees overwrite the accumulated gradients (pytorch#169545): one line, before anything runs,
    on any device (the setting is the mistake, whether or not this machine would compile)."""
    shape = [a for a in TINY_TEST_MODEL if not a.startswith("--compile")]
    cfg = configure(train.DEFAULTS, shape + [f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path}", "--max_iters=2",
                                             "--compile_mode=reduce-overhead", "--total_batch_tokens=512"])
    with pytest.raises(ValueError, match=r"with gradient accumulation \(grad_accum=2\).*pytorch/pytorch#169545"):
        train.train(cfg)
