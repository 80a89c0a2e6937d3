"""
bench/distill_study.py — issue 17's comparison: Low-Rank Clone against its two baselines, on the same student
shape, data order and student tokens.

    python bench/distill_study.py --scale cpu      # ~10 minutes on 2 CPU cores: config/tiny.py -> a d=48 student
    python bench/distill_study.py --scale gpu      # one GPU: issue 17's gpt2_124m teacher -> config/distill_small.py

The arms, one after another in this process, each an ordinary run folder under --out_root:

    lrc      distill.py: the student's weights are the teacher's times trained projections; loss CE + KL + clone
    kd       distill.py --free_student=True --clone_weight=0: an ordinary random student taught by the logits
    scratch  train.py with the student's shape: no teacher at all

The teacher is trained first (train.py) when its folder has no ckpt.pt, so one command makes the whole study.
Every arm has the same seed, data windows, batch, steps, schedule and learning rate (one lr for all arms, not swept:
the slow test in tests/test_distill.py found lrc and scratch both best near the same lr at its toy scale).

What it reports (bench/results/<name>.md, .json, .png):
* validation loss and bits per byte against student tokens, every eval point of every arm;
* the headline: the tokens lrc needs to reach scratch's final validation loss, as a fraction of scratch's tokens
  (linear interpolation between lrc's eval points; issue 17's goal is <= 1/3 at the gpu scale);
* wall-clock per student token: the median logged step time over the tokens of a step. For lrc and kd it includes
  the teacher's forward pass (and for lrc the products W_t P, made again every micro-batch).
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill  # noqa: E402
import train  # noqa: E402
from bench import common as bench_common  # noqa: E402
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# The two scales. teacher: train.py argv for the teacher; student: what every arm shares; width: the student's d.
SCALES = {
    # config/tiny.py's own run (d 128, 4 layers, 786k non-embedding weights) -> d 48 (295k, 0.38 of it): minutes
    "cpu": dict(
        teacher=["config/tiny.py"],
        student=["--data_dir=data/openstax_sample", "--tokenizer=assets/openstax_4k.json", "--vocab_size=4096",
                 "--block_size=128", "--batch_size=8", "--total_batch_tokens=1024", "--max_iters=1000",
                 "--eval_interval=100", "--eval_iters=8", "--log_interval=20", "--warmup_iters=30",
                 "--learning_rate=1e-2", "--min_lr=3e-4", "--optimizer=adamw", "--compile=False",
                 "--save_checkpoints=True"],
        scratch=["--n_layer=4", "--n_head=4", "--n_kv_head=2", "--head_dim=32", "--ffn_hidden=384", "--mlp=swiglu",
                 "--pos=rope", "--tie_embeddings=True"],
        width=48),
    # issue 17's teacher (gpt2_124m, 1000 x 32,768 OpenStax tokens) -> config/distill_small.py's d=256 student
    "gpu": dict(
        teacher=["config/gpt2_124m.py", "--data_dir=data/openstax_gpt2", "--total_batch_tokens=32768",
                 "--max_iters=1000", "--warmup_iters=50"],
        student=["config/distill_small.py", "--log_interval=10"],
        scratch=["config/gpt2_124m.py", "--head_dim=64"],
        width=256),
}
ARMS = ("lrc", "kd", "scratch")


def run_arm(arm, scale, teacher_dir, out_dir):
    """One arm's run folder: trained, resumed where an earlier study was interrupted, or (finished) re-analysed."""
    seconds_file = os.path.join(out_dir, "study_seconds.txt")  # the arm's wall-clock, kept for re-analysis
    before = float(open(seconds_file).read()) if os.path.isfile(seconds_file) else 0.0
    state = run_state(metrics_dir(arm, out_dir))
    if state == "finished":
        print(f"{arm}: already trained in {out_dir}")
        return before or None
    resume = ["--init_from=resume"] if state == "partial" else []  # train.py's exact resume from its last save
    print(f"{arm}: {'resuming the interrupted run' if resume else 'training'} in {out_dir}")
    t0 = time.time()
    if arm == "scratch":
        train.train(scratch_config(scale, out_dir, resume=bool(resume)))
    else:
        extra = ["--free_student=True", "--clone_weight=0"] if arm == "kd" else []
        distill.main(scale["student"] + [f"--teacher={teacher_dir}", f"--n_embd={scale['width']}",
                                         f"--out_dir={out_dir}"] + extra + resume)
    seconds = before + time.time() - t0
    with open(seconds_file, "w") as f:
        f.write(f"{seconds:.1f}\n")
    return seconds


def run_state(run_dir):
    """Of a train.py run folder: 'finished' (its last evaluation is at the run's max_iters), 'partial' (a saved
    state to resume from: the study was interrupted), or 'new'."""
    if not os.path.isfile(os.path.join(run_dir, "ckpt.pt")):
        return "new"
    max_iters = json.load(open(os.path.join(run_dir, "run_config.json")))["max_iters"]
    evals = [r for r in bench_common.metrics_rows(run_dir) if "val_loss" in r]
    return "finished" if evals and evals[-1]["step"] == max_iters else "partial"


def scratch_config(scale, out_dir, resume=False):
    """train.py's config for the scratch arm: the student's architecture (the scratch flags), then every training
    setting the distillation arms run with (their resolved config: lr, schedule, batch, data, weight decay, ...)."""
    student = configure(distill.DEFAULTS, scale["student"])
    shared = {k: v for k, v in student.items() if k in train.DEFAULTS and v not in (None, "")}
    return {**configure(train.DEFAULTS, scale["scratch"]), **shared, "n_embd": scale["width"], "out_dir": out_dir,
            **({"init_from": "resume"} if resume else {})}


def metrics_dir(arm, out_dir):
    """distill.py keeps train.py's run (metrics.jsonl) in out_dir/distill; train.py in out_dir itself."""
    return out_dir if arm == "scratch" else os.path.join(out_dir, "distill")


def tokens_to_reach(curve, target):
    """The first token count at which a (tokens, loss) curve reaches `target`, interpolated linearly between eval
    points; None when it never does."""
    return bench_common.first_reach([t for t, _ in curve], [l for _, l in curve], target)


def analyse(out_root):
    """Rows of the results table, the curves for the plot, and the headline sentence."""
    curves, rows = {}, []
    for arm in ARMS:
        metrics = bench_common.metrics_rows(metrics_dir(arm, os.path.join(out_root, arm)))
        evals = [r for r in metrics if "val_loss" in r]
        steps = [r for r in metrics if "ms" in r and r["step"] > 1]  # step 1 holds one-off costs (first calls)
        curves[arm] = [(r["tokens"], r["val_loss"], r["val_bpb"]) for r in evals]
        tokens_per_step = evals[-1]["tokens"] / evals[-1]["step"]
        us_per_token = statistics.median(r["ms"] for r in steps) * 1e3 / tokens_per_step
        rows.append([arm, f"{evals[-1]['tokens']:,}", evals[-1]["val_loss"], evals[-1]["val_bpb"], us_per_token])
    target = curves["scratch"][-1][1]
    reach = tokens_to_reach([(t, l) for t, l, _ in curves["lrc"]], target)
    total = curves["scratch"][-1][0]
    us = {row[0]: row[-1] for row in rows}  # µs per student token, teacher included
    headline = (f"lrc reaches scratch's final validation loss {target:.4f} after {reach:,.0f} student tokens, "
                f"{reach / total:.2f} of scratch's {total:,} ({total / reach:.1f}x fewer); in training time, "
                f"{reach * us['lrc'] / 1e6:.1f} s against scratch's {total * us['scratch'] / 1e6:.1f} s" if reach else
                f"lrc does not reach scratch's final validation loss {target:.4f} within {total:,} tokens")
    return rows, curves, headline


def plot(curves, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, curve in curves.items():
        tokens = [t / 1e6 for t, _, _ in curve]
        axes[0].plot(tokens, [l for _, l, _ in curve], marker=".", label=arm)
        axes[1].plot(tokens, [b for _, _, b in curve], marker=".", label=arm)
    for ax, label in zip(axes, ("validation loss (nats/token)", "validation bits per byte")):
        ax.set_xlabel("student tokens (M)"), ax.set_ylabel(label), ax.grid(alpha=0.3), ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--out_root", default=None, help="run folders (default out/distill_study_<scale>)")
    p.add_argument("--teacher", default=None, help="an existing teacher run folder (default: train one)")
    p.add_argument("--name", default=None, help="results name under bench/results (default distill_study_<scale>)")
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    out_root = args.out_root or f"out/distill_study_{args.scale}"
    name = args.name or f"distill_study_{args.scale}"
    teacher_dir = args.teacher or os.path.join(out_root, "teacher")
    if args.teacher and not args.teacher.startswith("hf:") and not os.path.exists(args.teacher):
        sys.exit(f"error: --teacher={args.teacher}: no such run folder or file (leave it out to train one)")
    seconds = {}
    teacher_state = "given" if args.teacher else run_state(teacher_dir)  # else a train.py run of ours
    if teacher_state in ("new", "partial"):
        t0 = time.time()
        resume = ["--init_from=resume"] if teacher_state == "partial" else []
        train.train(configure(train.DEFAULTS, scale["teacher"] + [f"--out_dir={teacher_dir}"] + resume))
        seconds["teacher"] = time.time() - t0
    for arm in ARMS:
        seconds[arm] = run_arm(arm, scale, teacher_dir, os.path.join(out_root, arm))
    rows, curves, headline = analyse(out_root)
    teacher_evals = [r for r in bench_common.metrics_rows(teacher_dir) if "val_loss" in r]
    teacher = " ".join(scale["teacher"]) if not args.teacher else args.teacher
    teacher += (f" (final validation loss {teacher_evals[-1]['val_loss']:.4f}, {teacher_evals[-1]['val_bpb']:.4f} "
                f"bpb)" if teacher_evals else "")
    notes = (f"Scale '{args.scale}': teacher {teacher}; student d="
             f"{scale['width']}, shared flags: {' '.join(scale['student'])}. Command: python bench/distill_study.py "
             f"--scale {args.scale}. Wall-clock of each arm, seconds (evaluation included): "
             f"{ {k: round(v) if v else None for k, v in seconds.items()} }.\n\n**{headline}.**")
    bench_common.write_results(name, ["arm", "student tokens", "val loss", "val bpb", "µs per student token"],
                               rows, notes, extra={"curves": curves})
    plot(curves, os.path.join(bench_common.RESULTS_DIR, f"{name}.png"),
         f"{name}: Low-Rank Clone, logit-only KD and scratch students at equal student tokens")


if __name__ == "__main__":
    main()
