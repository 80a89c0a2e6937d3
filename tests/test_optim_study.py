"""bench/sophia_study.py: the analysis on hand-made metrics.jsonl files whose answers are known (compile steps
counted at the median, the Hessian overhead, the interpolated crossings), then the whole script end to end on the
CPU with two tiny runs."""
import json
import os
import subprocess
import sys

import pytest

from bench import common as bench_common
from bench import sophia_study as study
from conftest import ROOT

TOKENS_PER_STEP = 1000


def write_run(path, ms_of_step, vals):
    """A train.py-like metrics.jsonl: steps 1..len(ms_of_step), val losses `vals` at steps 0, 10, 20, ..."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "val_loss": vals[0], "tokens": 0}) + "\n")
        for step in range(1, len(ms_of_step) + 1):
            f.write(json.dumps({"step": step, "loss": 5.0, "ms": ms_of_step[step - 1],
                                "tokens": step * TOKENS_PER_STEP}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "val_loss": vals[step // 10], "val_bpb": vals[step // 10] / 3,
                                    "tokens": step * TOKENS_PER_STEP}) + "\n")
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    # AdamW: step 1 compiles (5 s); step 7 is slow but under 3x the median, so it is real time and stays
    adamw_ms = [100.0] * 20
    adamw_ms[0], adamw_ms[6] = 5000.0, 250.0
    # Sophia, k = 5: ordinary steps 105 ms, Hessian steps (5, 10, 15, 20) 155 ms; steps 1 and 5 compile
    sophia_ms = [155.0 if s % 5 == 0 else 105.0 for s in range(1, 21)]
    sophia_ms[0], sophia_ms[4] = 6000.0, 3000.0
    adamw = study.analyse_run(write_run(tmp_path / "adamw_x", adamw_ms, [10.0, 5.0, 4.0]))
    sophia = study.analyse_run(write_run(tmp_path / "sophia_x", sophia_ms, [10.0, 4.5, 3.8]),
                               optimizer="sophia", hess_interval=5)
    return adamw, sophia


def test_compile_steps_count_at_the_median_of_their_kind(two_runs):
    adamw, sophia = two_runs
    assert adamw["optimizer"] == "adamw"  # from the directory name: no checkpoint here
    assert adamw["med_ms"] == 100.0 and adamw["med_hess_ms"] is None
    assert adamw["mean_ms"] == pytest.approx((19 * 100 + 250) / 20)          # step 1 at 100, step 7 kept at 250
    assert adamw["excluded_s"] == pytest.approx(4.9)
    assert adamw["train_s"] == pytest.approx((19 * 100 + 250) / 1000)
    assert sophia["med_ms"] == 105.0 and sophia["med_hess_ms"] == 155.0
    assert sophia["mean_ms"] == pytest.approx((16 * 105 + 4 * 155) / 20)      # = 115
    assert sophia["excluded_s"] == pytest.approx((6000 - 105 + 3000 - 155) / 1000)
    assert sophia["curve_s"] == pytest.approx([0.0, (8 * 105 + 2 * 155) / 1000, 2.3])
    assert sophia["curve_tokens"] == [0, 10_000, 20_000]
    assert (sophia["final_val"], sophia["best_val"], sophia["steps"]) == (3.8, 3.8, 20)
    assert sophia["tok_s"] == pytest.approx(TOKENS_PER_STEP / 0.115)


def test_overhead_and_crossings(two_runs):
    adamw, sophia = two_runs
    res = study.compare([adamw, sophia])
    assert res["best_adamw"] == "adamw_x"
    s = res["sophia"]["sophia_x"]
    assert s["overhead"] == pytest.approx(115 / 107.5 - 1)
    assert s["hessian_part"] == pytest.approx((155 - 105) / 5 / 107.5)
    assert s["step_part"] == pytest.approx(105 / 100 - 1)
    # equal tokens (20k): Sophia 3.8 < AdamW 4.0; Sophia's curve passes 4.0 between 10k (4.5) and 20k (3.8)
    assert (s["tokens"]["a"], s["tokens"]["b"], s["tokens"]["leader"]) == (4.0, 3.8, "sophia_x")
    assert s["tokens"]["reach"] == pytest.approx(10_000 + 10_000 * 0.5 / 0.7)
    # equal wall-clock: AdamW's 2.15 s; Sophia there is interpolated between 1.15 s (4.5) and 2.3 s (3.8)
    assert s["wall"]["x"] == pytest.approx(2.15)
    assert s["wall"]["b"] == pytest.approx(4.5 - 0.7 * (2.15 - 1.15) / (2.3 - 1.15))
    assert "misses" not in " ".join(res["lines"])                              # +7.0% meets the 12% target
    assert any("+7.0%" in line for line in res["lines"])


def test_interpolation_helpers():
    xs, ys = [0, 10, 20], [10.0, 5.0, 4.0]
    assert study.value_at(xs, ys, 15) == pytest.approx(4.5)
    assert study.value_at(xs, ys, 20) == 4.0 and study.value_at(xs, ys, 21) is None
    assert study.first_reach(xs, ys, 7.5) == pytest.approx(5.0)
    assert study.first_reach(xs, ys, 3.9) is None                              # never gets there
    assert study.first_reach([0, 10, 20, 30], [10.0, 4.0, 5.0, 3.0], 4.5) == pytest.approx(9.1666, rel=1e-3)


def test_a_run_without_metrics_is_reported_not_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_common, "RESULTS_DIR", str(tmp_path / "results"))
    write_run(tmp_path / "root" / "adamw_lr1e-3", [100.0] * 20, [10.0, 5.0, 4.0])
    study.main(["--plot_only", f"--out_root={tmp_path / 'root'}", "--runs=adamw_lr1e-3,sophia_lr1e-4",
                "--max_iters=20"])
    rows = json.load(open(tmp_path / "results" / "sophia_study.json"))["rows"]
    assert [(r[0], r[2]) for r in rows] == [("adamw_lr1e-3", "ok"), ("sophia_lr1e-4", "no metrics")]
    assert os.path.getsize(tmp_path / "results" / "sophia_study.png") > 0


def test_end_to_end_two_tiny_runs(sample_data_dir, tmp_path):
    tiny = ("--n_layer=2 --n_embd=64 --n_head=4 --n_kv_head=2 --ffn_hidden=128 --block_size=32 --batch_size=2 "
            "--total_batch_tokens=128 --compile=False --eval_interval=2 --eval_iters=1 --hess_interval=2 "
            "--warmup_iters=1")
    env = {**os.environ, "BENCH_OUT": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/sophia_study.py", f"--data_dir={sample_data_dir}",
                           f"--out_root={tmp_path / 'runs'}", "--runs=adamw_lr1e-3,sophia_lr1e-4", "--max_iters=4",
                           f"--extra={tiny}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = open(tmp_path / "results" / "sophia_study.md").read()
    assert "| adamw_lr1e-3 | adamw lr 0.001->0, wd 0.1 | ok | 4 |" in md
    assert "| sophia_lr1e-4 | sophia lr 0.0001->1e-05, wd 0.2, rho 0.05, k 2 | ok | 4 |" in md  # --extra won
    assert "sophia_lr1e-4: the Hessian estimate costs" in md and "at equal wall-clock" in md
    assert os.path.getsize(tmp_path / "results" / "sophia_study.png") > 0
    assert os.path.exists(tmp_path / "runs" / "sophia_lr1e-4.log")
    assert json.load(open(tmp_path / "runs" / "status.json")) == {"adamw_lr1e-3": "ok", "sophia_lr1e-4": "ok"}


def test_bad_arguments_are_clear_errors_and_write_nothing(tmp_path, capsys, monkeypatch):
    """--plot_only over a folder with no runs, or a missing --stamp_from file: an error naming it, no results."""
    monkeypatch.setattr(study.bench_common, "RESULTS_DIR", str(tmp_path / "results"))
    for argv, said in ((["--plot_only", f"--out_root={tmp_path / 'empty'}"], "no run of"),
                       (["--plot_only", f"--out_root={tmp_path}", f"--stamp_from={tmp_path / 'nope.json'}"],
                        "no such file")):
        with pytest.raises(SystemExit):
            study.main(argv)
        assert said in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "results")
