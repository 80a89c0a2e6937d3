"""bench/distill_study.py: the headline's interpolation, and that the scratch arm trains with the distillation
arms' settings (same lr, schedule, batch, data, weight decay), only the model differing. No training here."""
import pytest

from bench import distill_study


def test_tokens_to_reach_interpolates_between_eval_points():
    curve = [(0, 8.0), (100, 6.0), (200, 5.0), (300, 4.5)]
    assert distill_study.tokens_to_reach(curve, 5.5) == pytest.approx(150)
    assert distill_study.tokens_to_reach(curve, 6.0) == pytest.approx(100)
    assert distill_study.tokens_to_reach(curve, 9.0) == 0          # reached at the first point
    assert distill_study.tokens_to_reach(curve, 4.0) is None       # never


@pytest.mark.parametrize("scale", sorted(distill_study.SCALES), ids=lambda s: f"{s}_scale")  # not "gpu": a marker
def test_scratch_arm_shares_the_distillation_arms_settings(scale):
    import distill
    from configurator import configure
    spec = distill_study.SCALES[scale]
    student = configure(distill.DEFAULTS, spec["student"])
    cfg = distill_study.scratch_config(spec, "out/x")
    for key in ("learning_rate", "min_lr", "lr_schedule", "warmup_iters", "max_iters", "batch_size",
                "total_batch_tokens", "data_dir", "weight_decay", "beta2", "seed", "optimizer"):
        assert cfg[key] == student[key], key
    assert cfg["n_embd"] == spec["width"] and cfg["out_dir"] == "out/x" and cfg["weight_decay"] == 0.0
    assert cfg["n_layer"] == (4 if scale == "cpu" else 12)


def test_an_interrupted_arm_is_resumed_and_a_finished_one_kept(tmp_path):
    """A run folder with a saved state whose last evaluation is before max_iters (the study was stopped) is
    'partial', so the study resumes it (train.py's exact resume) instead of re-analysing half a curve."""
    import json
    run = tmp_path / "scratch"
    assert distill_study.run_state(str(run)) == "new"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"saved")
    (run / "run_config.json").write_text(json.dumps({"max_iters": 100}))
    rows = [{"step": 0, "val_loss": 8.0, "val_bpb": 3.0}, {"step": 20, "loss": 7.0, "ms": 5.0},
            {"step": 50, "val_loss": 6.0, "val_bpb": 2.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert distill_study.run_state(str(run)) == "partial"
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 100, "val_loss": 5.0, "val_bpb": 2.0}) + "\n")
    assert distill_study.run_state(str(run)) == "finished"


def test_a_missing_teacher_is_named_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--teacher=.*nowhere: no such run folder"):
        distill_study.main(["--teacher", str(tmp_path / "nowhere"), "--out_root", str(tmp_path / "study")])
    assert not (tmp_path / "study").exists()
