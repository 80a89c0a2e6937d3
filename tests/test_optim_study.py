"""bench/optim_study.py (and bench/sophia_study.py, its issue #5 setting): the analysis on hand-made metrics.jsonl
files whose answers are known (compile steps counted at the median, step time against AdamW, the Hessian part,
the interpolated crossings, the Muon bar), then the whole script end to end on the CPU with tiny runs."""
import json
import os
import subprocess
import sys

import pytest

from bench import common as bench_common
from bench import optim_study as study
from bench import sophia_study
from conftest import ROOT

TOKENS_PER_STEP = 1000


def write_run(path, ms_of_step, vals, config=None):
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
    if config:
        json.dump(config, open(os.path.join(path, "run_config.json"), "w"))
    return str(path)


@pytest.fixture
def three_runs(tmp_path):
    root = tmp_path / "gpt2_124m"
    # AdamW: step 1 compiles (5 s); step 7 is slow but under 3x the median, so it is real time and stays
    adamw_ms = [100.0] * 20
    adamw_ms[0], adamw_ms[6] = 5000.0, 250.0
    # Sophia, k = 5: ordinary steps 105 ms, Hessian steps (5, 10, 15, 20) 155 ms; steps 1 and 5 compile
    sophia_ms = [155.0 if s % 5 == 0 else 105.0 for s in range(1, 21)]
    sophia_ms[0], sophia_ms[4] = 6000.0, 3000.0
    adamw = study.analyse_run(write_run(root / "adamw_x", adamw_ms, [10.0, 5.0, 4.0]))
    sophia = study.analyse_run(write_run(root / "sophia_x", sophia_ms, [10.0, 4.5, 3.8]),
                               optimizer="sophia", hess_interval=5)
    muon = study.analyse_run(write_run(root / "muon_x", [104.0] * 20, [10.0, 4.0, 3.5]))  # from the name
    return adamw, sophia, muon


def test_compile_steps_count_at_the_median_of_their_kind(three_runs):
    adamw, sophia, muon = three_runs
    assert (adamw["optimizer"], muon["optimizer"], adamw["model"]) == ("adamw", "muon", "gpt2_124m")
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


def test_step_costs_crossings_and_the_muon_bar(three_runs):
    adamw, sophia, muon = three_runs
    res = study.compare([adamw, sophia, muon])["gpt2_124m"]
    assert res["best"]["adamw"] is adamw and res["best"]["muon"] is muon
    assert res["overhead"]["sophia_x"] == pytest.approx(115 / 107.5 - 1)
    assert res["overhead"]["muon_x"] == pytest.approx(104 / 107.5 - 1)
    text = "\n".join(res["lines"])
    assert "is +9.3%" in text and "ordinary steps +5.0%" in text  # Hessian part (155 - 105) / 5 / 107.5
    assert "meets the <= 5% bar" in text                            # Muon: -3.3%
    # equal tokens (20k): Sophia 3.8 < AdamW 4.0; Sophia's curve passes 4.0 between 10k (4.5) and 20k (3.8)
    assert "sophia_x lower by 0.2000 nats**; it reached adamw_x's 4.0000 at 0.0171M tokens (86% of the tokens)" in text
    # the bar: Muon's curve is at 4.0 at 10k tokens = 50% of AdamW's 20k, and at 1.04 s = 48% of AdamW's 2.15 s
    assert res["bar"]["tokens"] == pytest.approx(0.5)
    assert res["bar"]["wall"] == pytest.approx(1.04 / 2.15)
    assert "meets the bar and the moonshot" in res["bar"]["text"]


def test_a_muon_run_that_never_gets_there_misses_the_bar(tmp_path):
    adamw = study.analyse_run(write_run(tmp_path / "m" / "adamw_a", [100.0] * 20, [10.0, 5.0, 4.0]))
    muon = study.analyse_run(write_run(tmp_path / "m" / "muon_a", [150.0] * 20, [10.0, 5.0, 4.2]))
    res = study.compare([adamw, muon])["m"]
    assert res["bar"]["tokens"] is None and "never reaches" in res["bar"]["text"]
    assert "misses the <= 5% bar" in "\n".join(res["lines"])       # +50% a step


def test_sweep_flags_a_winner_at_its_edge(tmp_path):
    runs = [study.analyse_run(write_run(tmp_path / "m" / f"adamw_{lr}", [100.0] * 20, [10.0, 5.0, v],
                                        config={"optimizer": "adamw", "learning_rate": lr}))
            for lr, v in ((3e-4, 4.0), (6e-4, 4.1), (1.2e-3, 4.2))]
    best, line = study.sweep(runs, "adamw")
    assert best["name"] == "adamw_0.0003" and "at the edge of the sweep" in line


def test_interpolation_helpers():
    xs, ys = [0, 10, 20], [10.0, 5.0, 4.0]
    assert study.value_at(xs, ys, 15) == pytest.approx(4.5)
    assert study.value_at(xs, ys, 20) == 4.0 and study.value_at(xs, ys, 21) is None
    assert study.first_reach(xs, ys, 7.5) == pytest.approx(5.0)
    assert study.first_reach(xs, ys, 3.9) is None                              # never gets there
    assert study.first_reach([0, 10, 20, 30], [10.0, 4.0, 5.0, 3.0], 4.5) == pytest.approx(9.1666, rel=1e-3)


def test_plot_only_reports_runs_that_left_no_metrics(tmp_path, monkeypatch):
    """A run that timed out before its first log is a row with its status; an arm never run is no row."""
    monkeypatch.setattr(bench_common, "RESULTS_DIR", str(tmp_path / "results"))
    root = tmp_path / "root"
    write_run(root / "lille_130m" / "adamw_lr6e-4", [100.0] * 20, [10.0, 5.0, 4.0])
    json.dump({"lille_130m/sophia_lr1e-4": "timed out after 30 s"}, open(root / "status.json", "w"))
    sophia_study.main(["--plot_only", f"--out_root={root}", "--max_iters=20"])
    rows = json.load(open(tmp_path / "results" / "sophia_study.json"))["rows"]
    assert [(r[0], r[1], r[3]) for r in rows] == [("lille_130m", "adamw_lr6e-4", "ok"),
                                                  ("lille_130m", "sophia_lr1e-4", "timed out after 30 s")]
    assert os.path.getsize(tmp_path / "results" / "sophia_study.png") > 0


def test_end_to_end_tiny_runs(sample_data_dir, tmp_path):
    import train
    runs = "adamw_lr6e-4,sophia_lr1e-4" + (",muon_lr0.02" if "muon_lr" in train.DEFAULTS else "")
    tiny = ("--n_layer=2 --n_embd=64 --n_head=4 --n_kv_head=2 --ffn_hidden=128 --block_size=32 --batch_size=2 "
            "--compile=False --eval_interval=2 --eval_iters=1 --hess_interval=2")
    env = {**os.environ, "BENCH_OUT": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/optim_study.py", f"--data_dir={sample_data_dir}",
                           f"--out_root={tmp_path / 'runs'}", "--models=lille_130m", f"--runs={runs}",
                           "--max_iters=4", "--tokens_per_step=128", "--warmup_iters=1", f"--extra={tiny}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = open(tmp_path / "results" / "optim_study.md").read()
    assert "| lille_130m | adamw_lr6e-4 | adamw lr 0.0006->6e-05, wd 0.1 | ok | 4 |" in md
    assert "| lille_130m | sophia_lr1e-4 | sophia lr 0.0001->1e-05, wd 0.2, rho 0.05, k 2 | ok | 4 |" in md
    assert "sophia_lr1e-4 vs adamw_lr6e-4, at equal wall-clock" in md
    if "muon" in runs:
        assert "| lille_130m | muon_lr0.02 | muon lr 0.02 (x the schedule)" in md and "Bar: muon_lr0.02" in md
    assert os.path.getsize(tmp_path / "results" / "optim_study.png") > 0
    assert os.path.exists(tmp_path / "runs" / "lille_130m" / "sophia_lr1e-4.log")
    status = json.load(open(tmp_path / "runs" / "status.json"))
    assert status == {f"lille_130m/{n}": "ok" for n in runs.split(",")}


def test_bad_arguments_are_clear_errors_and_write_nothing(tmp_path, capsys, monkeypatch):
    """--plot_only over a folder with no runs, a missing --stamp_from file, an unknown model or arm: an error
    naming it, no results."""
    monkeypatch.setattr(study.bench_common, "RESULTS_DIR", str(tmp_path / "results"))
    for argv, said in ((["--plot_only", f"--out_root={tmp_path / 'empty'}"], "no run of"),
                       (["--plot_only", f"--out_root={tmp_path}", f"--stamp_from={tmp_path / 'nope.json'}"],
                        "no such file"),
                       (["--models=gpt3"], "no preset config/gpt3.py"),
                       (["--runs=adamw_lr1"], "unknown run(s) ['adamw_lr1']")):
        with pytest.raises(SystemExit):
            study.main(argv)
        assert said in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "results")
