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
