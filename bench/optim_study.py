"""
bench/optim_study.py — AdamW, Muon and Sophia on the same models, data, batch and tokens, on one GPU (issues #5, #20).

The question
------------
Quality per GPU-minute. modded-nanogpt and nanochat train their block matrices with Muon (kernels/muon.py) and
report ~1.35-1.5x fewer tokens to a target loss at under 2% extra time; Lille-130M was pretrained with Sophia
(kernels/sophia.py), which the first version of this study (bench/results/sophia_study_h100/) found 0.17 nats
behind a tuned AdamW. Here, at nanoGPT's budget: which optimizer reaches the lowest validation loss, how many
tokens and how much wall-clock does each need to reach the best AdamW's final loss, and what does each cost per
step? The issue's bar for Muon on gpt2_124m: the best AdamW's final loss with <= 70% of its tokens and <= 80% of
its wall-clock (moonshot <= 60%), and its step within 5% of a training step.

The design
----------
* Models: config/gpt2_124m.py and config/lille_130m.py as they are (architecture, betas, clipping), on the
  OpenStax shards (~15M train tokens): 1000 steps x 32,768 tokens = 32.8M tokens, ~2.2 epochs for both.
  gpt2_124m: 16 x 1024 x 2 micro-batches; lille_130m: 16 x 512 x 4.
* nanoGPT's budget for every run: 1000 steps, warmup 50, cosine decay to 10% of the peak lr. The same seed for
  every run (same initial weights, same data order); validation every 50 steps on the same 20 x 16 windows.
* Arms, one learning-rate sweep per optimizer (a factor of 2 between neighbours):
    AdamW  lr 3e-4 .. 2.4e-3, weight decay 0.1 (nanoGPT's 6e-4 in the middle);
    Muon   muon_lr 0.01 .. 0.08 for the blocks' matrices (0.02 is modded-nanogpt's and nanochat's), momentum
           0.95 Nesterov, weight decay 0.1 (and one arm without); its AdamW part (embeddings, head, gains) at
           nanoGPT's lr 6e-4 -> 6e-5; one schedule factor scales both lrs;
    Sophia Lille's settings (lr 1e-4 -> 1e-5, rho 0.05, weight decay 0.2, Hessian every 10 steps), and 3x and 6x
           that lr: Lille's lr was chosen for 260k steps, not 1000.
  An arm at the edge of its sweep that wins is flagged: a wider sweep might do better.
* kernels_backend=torch,sophia=triton,muon=triton: inductor fuses the model's elementwise twins (our Triton
  custom ops made lille_130m host-bound, see config/lille_130m.py); the optimizers keep their Triton kernels,
  and AdamW is torch's fused one. Checkpoints off: 20 evaluations x 1.5 GB would outweigh training.

Measuring time honestly
-----------------------
train.py logs every step's wall-clock ms (log_interval = 1; the loss .item() syncs every step anyway). Evaluation
and checkpointing happen outside the steps, compilation inside them: step 1 compiles the training graph, Sophia's
first Hessian step the logits-only forward. One-off costs that say nothing about a long run: a step slower than 3x
the median of its kind (ordinary / Hessian) is counted at that median, and the seconds removed are reported.
Hessian steps are those with s % k == 0 (train.py refreshes right after optimizer step s, inside its time). The
wall-clock axis is this compile-excluded training time. Per model:

    step time vs AdamW = mean step ms of the run / mean step ms of that model's AdamW runs - 1   (equal steps, batch)

For Muon this is what its optimizer step costs beyond fused AdamW's, as a share of a whole training step (the bar:
<= 5%); bench/optim.py times the optimizer steps alone. For Sophia it holds the Hessian refresh too.

Cost and how to run it
----------------------
A full run is 2 models x 12 arms x 1000 steps x 32,768 tokens. Estimated from earlier logs, not yet measured at
this budget: ~2 minutes per gpt2_124m run (437k tok/s on an H200 in bench/results/train_gpt2_124m_h200/, plus
~30 s of compilation and evaluation) and ~3 minutes per lille_130m run (~270k tok/s on an H100 in
sophia_study_h100/, ~50 s of compilation), about an hour in all. Every invocation adds its runs to --out_root, so
a machine with a 10-minute limit runs it in slices (4 gpt2_124m runs or 3 lille_130m runs each) and analyses
everything at the end:

    python bench/optim_study.py --models=gpt2_124m --runs=adamw_lr6e-4,muon_lr0.02,adamw_lr1.2e-3,muon_lr0.04 \\
        --total_budget=540                                   # one 10-minute call; $BENCH_OUT for results
    python bench/optim_study.py --plot_only                  # re-analyse every run in out/optim_study
    python bench/optim_study.py --max_iters=300              # a shortened study: 9.8M tokens a run

(bench/sophia_study.py is this script at issue #5's settings: lille_130m, 600 x 16,384 tokens, warmup 30.)
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common as bench_common  # noqa: E402  (its RESULTS_DIR honours $BENCH_OUT)
from bench.common import first_reach, metrics_rows  # noqa: E402
from shards import list_shards, read_header  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
MODELS = ("gpt2_124m", "lille_130m")  # presets in config/
MAX_ITERS = 1000
TOKENS_PER_STEP = 32768
WARMUP_ITERS = 50
MIN_LR_FRAC = 0.1                     # cosine to 10% of the peak
COMMON = ["--eval_interval=50", "--eval_iters=20", "--log_interval=1", "--batch_size=16",
          "--kernels_backend=torch,sophia=triton,muon=triton", "--save_checkpoints=False"]


def lr_flags(lr):
    return [f"--learning_rate={lr:g}", f"--min_lr={lr * MIN_LR_FRAC:g}"]


ADAMW = ["--optimizer=adamw", "--weight_decay=0.1"]
MUON = ["--optimizer=muon", "--muon_momentum=0.95", "--weight_decay=0.1", *lr_flags(6e-4)]  # + its AdamW part
SOPHIA = ["--optimizer=sophia", "--sophia_rho=0.05", "--weight_decay=0.2", "--hess_interval=10"]  # Lille's
# (name, train.py flags after the common ones), the same arms for every model. They run in this order, and when
# the time budget runs out the last ones are skipped: so first the runs the comparison cannot do without.
ARMS = [
    ("adamw_lr6e-4", ADAMW + lr_flags(6e-4)),
    ("muon_lr0.02", MUON + ["--muon_lr=0.02"]),
    ("sophia_lr1e-4", SOPHIA + lr_flags(1e-4)),
    ("adamw_lr1.2e-3", ADAMW + lr_flags(1.2e-3)),
    ("muon_lr0.04", MUON + ["--muon_lr=0.04"]),
    ("adamw_lr3e-4", ADAMW + lr_flags(3e-4)),
    ("muon_lr0.01", MUON + ["--muon_lr=0.01"]),
    ("sophia_lr3e-4", SOPHIA + lr_flags(3e-4)),
    ("adamw_lr2.4e-3", ADAMW + lr_flags(2.4e-3)),
    ("muon_lr0.08", MUON + ["--muon_lr=0.08"]),
    ("muon_lr0.02_wd0", MUON + ["--muon_lr=0.02", "--weight_decay=0"]),
    ("sophia_lr6e-4", SOPHIA + lr_flags(6e-4)),
]
SWEPT = {"adamw": "learning_rate", "muon": "muon_lr", "sophia": "learning_rate"}  # the lr each sweep varies
COLORS = {"adamw": "Blues", "muon": "Greens", "sophia": "Oranges"}
BAR_TOKENS, BAR_WALL, MOONSHOT = 0.70, 0.80, 0.60   # issue #20, Muon vs the best AdamW on gpt2_124m
BAR_MUON_STEP = 0.05
PRESET_HESS_INTERVAL = 10   # Sophia's k; used only for a run that left no config to read it from
OUTLIER = 3.0               # a step slower than 3x the median of its kind is compilation: counted at the median
TOTAL_BUDGET_S = 4 * 3600   # all training subprocesses together (a lent GPU with a 10-minute limit: ~540)
PER_RUN_TIMEOUT_S = 900     # one run
MIN_RUN_S = 45              # a run is not started with less than this left
GRACE_S = 20                # after SIGTERM train.py finishes its step and evaluates; then SIGKILL


# ---- running ----------------------------------------------------------------------------------------------------
# Each run is its own train.py process, exactly as a user would start it (the preset, then the study's flags, then
# the arm's, then --extra: later flags win), so the study measures the real loop, compilation and all. A run past
# its time limit gets SIGTERM: train.py finishes the step in flight and evaluates, so the curve keeps its last point.
def data_tokenizer(data_dir):
    """The study's data decides the vocabulary: a preset that names its own tokenizer (lille_130m's 32k file) is
    pointed at the data's instead, so every model trains on the same tokens (train.py refuses a mismatch)."""
    meta = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta):
        return []
    meta = json.load(open(meta))
    return [f"--tokenizer={meta['tokenizer']}", f"--vocab_size={meta.get('n_vocab', meta['vocab_size'])}"]


def train_run(model, name, flags, args, timeout):
    """One train.py subprocess, output to <out_root>/<model>/<name>.log. Returns (status, seconds)."""
    out_dir = os.path.join(args.out_root, model, name)
    shutil.rmtree(out_dir, ignore_errors=True)  # stale metrics from an earlier study must not pass as this one's
    cmd = [sys.executable, "train.py", f"config/{model}.py", f"--data_dir={args.data_dir}", f"--out_dir={out_dir}",
           *data_tokenizer(args.data_dir), f"--max_iters={args.max_iters}", f"--warmup_iters={args.warmup_iters}",
           f"--total_batch_tokens={args.tokens_per_step}", *COMMON, *flags, *shlex.split(args.extra)]  # later win
    print("  " + shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(os.path.join(args.out_root, model, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # keeps what it has: a last evaluation at the step it reached
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return f"timed out after {timeout:.0f} s", time.time() - t0
    return ("ok" if rc == 0 else f"failed (exit {rc}, see {model}/{name}.log)"), time.time() - t0


# ---- analysis ---------------------------------------------------------------------------------------------------
def run_config(out_dir):
    """The run's own resolved config (optimizer, lr, hess_interval, ...): train.py's run_config.json, else the
    checkpoint's; {} if it wrote neither."""
    path = os.path.join(out_dir, "run_config.json")
    if os.path.exists(path):
        return json.load(open(path))
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        return {}
    import checkpoint
    try:  # mmap: the config is read without loading the weights; weights_only (checkpoint.load): no code runs
        return checkpoint.load(path, mmap=True)["config"]
    except (FileNotFoundError, ValueError):
        return {}


def value_at(xs, ys, x):
    """The curve (xs increasing) linearly interpolated at x; None outside it."""
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] if xs and x == xs[-1] else None


def analyse_run(out_dir, optimizer=None, hess_interval=None):
    """Losses and compile-excluded step times of one run directory (metrics.jsonl written by train.py)."""
    name = os.path.basename(os.path.normpath(out_dir))
    model = os.path.basename(os.path.dirname(os.path.normpath(out_dir)))
    cfg = run_config(out_dir)
    optimizer = optimizer or cfg.get("optimizer") or name.split("_")[0]  # the arm's name says it too
    k = hess_interval or cfg.get("hess_interval") or PRESET_HESS_INTERVAL
    rows = metrics_rows(out_dir)
    steps = [r for r in rows if "ms" in r]
    evals = [r for r in rows if "val_loss" in r]
    r = {"name": name, "model": model, "optimizer": optimizer, "hess_interval": k, "config": cfg, "steps": 0,
         "curve_tokens": [], "curve_s": [], "curve_val": []}
    if not steps:
        return r

    def is_hessian(step):
        return optimizer == "sophia" and step % k == 0
    median = {kind: statistics.median([s["ms"] for s in steps if is_hessian(s["step"]) == kind])
              for kind in {is_hessian(s["step"]) for s in steps}}
    kept = []  # (step, ms counted): a compilation step counts as a typical step of its kind
    for s in steps:
        typical = median[is_hessian(s["step"])]
        kept.append((s["step"], typical if s["ms"] > OUTLIER * typical else s["ms"]))

    def train_s_at(step):
        """Compile-excluded training seconds up to `step` (the mean logged step time x steps: log_interval > 1
        still gives an estimate)."""
        done = [ms for s, ms in kept if s <= step]
        return sum(done) / len(done) * step / 1000 if done else 0.0

    last = steps[-1]
    mean_ms = sum(ms for _, ms in kept) / len(kept)
    r.update(steps=last["step"], tokens=last["tokens"], tokens_per_step=last["tokens"] / last["step"],
             med_ms=median[False] if False in median else None, med_hess_ms=median.get(True), mean_ms=mean_ms,
             tok_s=last["tokens"] / last["step"] / mean_ms * 1000, train_s=train_s_at(last["step"]),
             excluded_s=(sum(s["ms"] for s in steps) - sum(ms for _, ms in kept)) / 1000,
             curve_tokens=[e["tokens"] for e in evals], curve_s=[train_s_at(e["step"]) for e in evals],
             curve_val=[e["val_loss"] for e in evals])
    if evals:
        r.update(final_val=evals[-1]["val_loss"], final_bpb=evals[-1].get("val_bpb"),
                 best_val=min(e["val_loss"] for e in evals))
    return r


def head_to_head(a, b, axis, unit, scale):
    """a vs b at the largest x both curves reach, on axis 'curve_tokens' or 'curve_s'; and where the run ahead
    there first reached the other's loss."""
    x = min(a[axis][-1], b[axis][-1])
    va, vb = value_at(a[axis], a["curve_val"], x), value_at(b[axis], b["curve_val"], x)
    lead, lag, v_lag = (a, b, vb) if va <= vb else (b, a, va)
    reach = first_reach(lead[axis], lead["curve_val"], v_lag)
    what = "tokens" if axis == "curve_tokens" else "wall-clock"
    text = (f"at equal {what} ({x / scale:.3g}{unit}): "
            f"{a['name']} {va:.4f}, {b['name']} {vb:.4f}: **{lead['name']} lower by {abs(va - vb):.4f} nats**")
    if reach is not None and x > 0:
        text += f"; it reached {lag['name']}'s {v_lag:.4f} at {reach / scale:.3g}{unit} ({reach / x:.0%} of the {what})"
    return {"x": x, "a": va, "b": vb, "leader": lead["name"], "reach": reach, "text": text}


# Comparing optimizers fairly means comparing each at its best: every optimizer gets its own lr sweep, and the
# comparisons below pit the best run of each against the best AdamW. A best found at the end of its sweep is
# flagged, because the true optimum may lie beyond it (then the comparison flatters the other side).
def sweep(runs, optimizer):
    """One optimizer's finished runs on one model: (the best by final val loss, a line listing the sweep)."""
    done = [r for r in runs if r["optimizer"] == optimizer and r.get("final_val") is not None]
    if not done:
        return None, None
    key = SWEPT.get(optimizer, "learning_rate")
    best = min(done, key=lambda r: r["final_val"])
    known = all(key in r["config"] for r in done)  # a run without run_config.json has no config
    by_lr = sorted(done, key=lambda r: r["config"][key]) if known else done
    edge = known and len(by_lr) > 1 and best["config"][key] in (by_lr[0]["config"][key], by_lr[-1]["config"][key])
    line = (f"{optimizer} sweep, final val loss: " + ", ".join(f"{r['name']} {r['final_val']:.4f}" for r in by_lr)
            + f"; best **{best['name']}**" + (" (at the edge of the sweep: a wider one might do better)." if edge
                                              else "."))
    return best, line


# Step time is compared at equal steps and batch, against the mean over that model's AdamW runs: the lr does not
# change the work of a step, so averaging the AdamW arms only lowers the run-to-run noise of the reference.
# Sophia's extra time comes in two parts: the Hessian refresh every k steps (an extra forward + backward of one
# micro-batch), spread here over its k steps, and its ordinary step against AdamW's (the optimizer step itself).
# Muon's extra time is all in its optimizer step (momentum, Newton-Schulz, the updates): the difference of the
# two runs' step times, as a share of AdamW's whole training step, is what the issue bounds at 5%.
def step_cost_line(r, ref_mean, ref_med):
    """What a Muon or Sophia run's steps cost against the same model's AdamW runs."""
    over = r["mean_ms"] / ref_mean - 1
    if r["optimizer"] == "sophia":
        ordinary = r["med_ms"] or r["med_hess_ms"]   # (hess_interval 1 leaves no ordinary step)
        hessian = r["med_hess_ms"] or ordinary       # (a run stopped before its first refresh has no Hessian step)
        part = (hessian - ordinary) / r["hess_interval"] / ref_mean
        return over, (f"{r['name']}: {r['mean_ms']:.1f} ms a step vs AdamW's {ref_mean:.1f} = **{over:+.1%}**, of "
                      f"which the Hessian refresh (one step in {r['hess_interval']}: {hessian:.1f} ms against "
                      f"{ordinary:.1f}) is {part:+.1%}, and ordinary steps {ordinary / ref_med - 1:+.1%} against "
                      f"AdamW's median {ref_med:.1f} ms.")
    ok = "meets" if over <= BAR_MUON_STEP else "misses"
    return over, (f"{r['name']}: {r['mean_ms']:.1f} ms a step vs AdamW's {ref_mean:.1f} = **{over:+.1%}**: the "
                  f"optimizer step's extra cost as a share of a training step ({ok} the <= {BAR_MUON_STEP:.0%} bar; "
                  f"median {r['med_ms']:.1f} vs {ref_med:.1f} ms).")


# The bar reads "reach AdamW's best final loss with <= 70% of the tokens and <= 80% of the wall-clock": the first
# point where Muon's (linearly interpolated) validation curve comes down to that loss, as a fraction of what the
# AdamW run spent to get there at its end. The wall-clock fraction is the tighter one when Muon's steps cost more.
# With evaluations every 50 steps the crossing is interpolated, so it is good to about one interval (5%).
def muon_bar(muon, adamw):
    """Issue #20's bar: tokens and wall-clock the best Muon run needs to reach the best AdamW's final loss."""
    target = adamw["final_val"]
    tok = first_reach(muon["curve_tokens"], muon["curve_val"], target)
    wall = first_reach(muon["curve_s"], muon["curve_val"], target)
    bar = {"target": target, "tokens": tok and tok / adamw["tokens"], "wall": wall and wall / adamw["train_s"]}
    if tok is None:
        bar["text"] = (f"Bar: {muon['name']} never reaches {adamw['name']}'s final {target:.4f} in its run "
                       f"(its final: {muon['final_val']:.4f}): **misses** (<= {BAR_TOKENS:.0%} of the tokens, "
                       f"<= {BAR_WALL:.0%} of the wall-clock).")
        return bar
    ok = bar["tokens"] <= BAR_TOKENS and bar["wall"] is not None and bar["wall"] <= BAR_WALL
    moon = " and the moonshot" if ok and bar["tokens"] <= MOONSHOT else ""
    bar["text"] = (f"Bar: {muon['name']} reaches {adamw['name']}'s final {target:.4f} at **{bar['tokens']:.0%} of "
                   f"its tokens** (bar <= {BAR_TOKENS:.0%}, moonshot <= {MOONSHOT:.0%}) and **{bar['wall']:.0%} of its "
                   f"wall-clock** (bar <= {BAR_WALL:.0%}): {'meets the bar' + moon if ok else '**misses**'}.")
    return bar


# Equal tokens answers "which optimizer learns more from the same data"; equal wall-clock answers "which gives the
# lower loss for the same GPU time" and charges each optimizer its step cost. Both are reported, for the best run
# of each optimizer only (a line per run would bury the answer in the sweep).
def compare_model(runs):
    """One model: each sweep and its best; every other run's step time against AdamW's; the best Muon and the best
    Sophia against the best AdamW at equal tokens and at equal wall-clock; the Muon bar."""
    out = {"lines": [], "overhead": {}, "best": {}}
    for optimizer in ("adamw", "muon", "sophia"):
        best, line = sweep(runs, optimizer)
        if line:
            out["lines"].append(line)
            out["best"][optimizer] = best
    adamw = [r for r in runs if r["optimizer"] == "adamw" and r["steps"]]
    ref_mean = statistics.mean(r["mean_ms"] for r in adamw) if adamw else None
    ref_med = statistics.mean(r["med_ms"] for r in adamw) if adamw else None
    for r in runs:
        if r["optimizer"] != "adamw" and r["steps"] and ref_mean:
            out["overhead"][r["name"]], line = step_cost_line(r, ref_mean, ref_med)
            out["lines"].append(line)
    best_adamw = out["best"].get("adamw")
    for optimizer in ("muon", "sophia"):
        best = out["best"].get(optimizer)
        if best and best_adamw:
            for axis, unit, scale in (("curve_tokens", "M tokens", 1e6), ("curve_s", " s", 1)):
                out["lines"].append(f"{best['name']} vs {best_adamw['name']}, "
                                    f"{head_to_head(best_adamw, best, axis, unit, scale)['text']}.")
    if out["best"].get("muon") and best_adamw:
        out["bar"] = muon_bar(out["best"]["muon"], best_adamw)
        out["lines"].append(out["bar"]["text"])
    return out


def compare(runs):
    """compare_model for every model in the runs, in order: {model: result}."""
    models = list(dict.fromkeys(r["model"] for r in runs))
    return {m: compare_model([r for r in runs if r["model"] == m]) for m in models}


# ---- reporting --------------------------------------------------------------------------------------------------
# The table's "recipe" column is read back from each run's own resolved config (run_config.json), not from the
# flags the study meant to pass: what a row says is what that run did.
def recipe(r, flags):
    c = r["config"]
    if not c:
        return " ".join(flags) or "preset"
    lr = f"lr {c['learning_rate']:g}->{c['min_lr']:g}, wd {c['weight_decay']:g}"
    if c["optimizer"] == "muon":
        return (f"muon lr {c['muon_lr']:g} (x the schedule), momentum {c.get('muon_momentum', '?')}, "
                f"wd {c['weight_decay']:g}; AdamW part {lr.split(', ')[0]}")
    if c["optimizer"] == "sophia":
        return f"sophia {lr}, rho {c['sophia_rho']:g}, k {c['hess_interval']}"
    return f"{c['optimizer']} {lr}"


def design_notes(runs, args):
    done = [r for r in runs if r["steps"]]
    try:
        train_tokens = sum(read_header(p)["n_tokens"] for p in list_shards(args.data_dir, "train"))
    except Exception:
        train_tokens = 0
    tps = done[0]["tokens_per_step"] if done else args.tokens_per_step
    tokens = args.max_iters * tps
    models = ", ".join(dict.fromkeys(r["model"] for r in runs))
    text = (f"Question (issues #5, #20): AdamW, Muon and Sophia on the same model, data, batch and tokens: the lowest "
            f"validation loss, the tokens and wall-clock to reach the best AdamW's final loss, the cost per step. "
            f"Design: {models} (the presets' architectures), {args.max_iters} steps x {tps:,.0f} tokens = "
            f"{tokens / 1e6:.2f}M tokens")
    if train_tokens:
        text += f" ({tokens / train_tokens:.2f} epochs of {train_tokens / 1e6:.1f}M train tokens)"
    text += (f"; every run the same seed and data order, warmup {args.warmup_iters} steps then cosine to "
             f"{MIN_LR_FRAC:.0%} of the peak, validation every 50 steps on the same windows. Each optimizer's lr "
             f"swept (recipes in the table); Muon's AdamW part at 6e-4. Times: per-step wall-clock from "
             f"metrics.jsonl; compilation steps (> {OUTLIER:g}x the median of their kind) counted at the median; "
             f"the wall-clock axis is that training time, without evaluation. Val curves are interpolated linearly "
             f"between evaluations.")
    if args.extra:
        text += f" Extra flags on every run: `{args.extra}`."
    return text + (" " + args.note if args.note else "")


def plot(runs, path, gpu):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.8 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        mine = [r for r in runs if r["model"] == model]
        colors = {}
        for opt, cmap in COLORS.items():
            group = sorted([r for r in mine if r["optimizer"] == opt],
                           key=lambda r: r["config"].get(SWEPT[opt], 0))
            for i, r in enumerate(group):  # darker = larger learning rate
                colors[r["name"]] = getattr(plt.cm, cmap)(0.45 + 0.5 * i / max(1, len(group) - 1))
        later = [v for r in mine for v in r["curve_val"][1:]]  # the untrained start (~ln vocab) squashes the rest
        for ax, axis, scale, xlabel, what in ((row[0], "curve_tokens", 1e6, "tokens (millions)", "tokens"),
                                              (row[1], "curve_s", 1, "training seconds (compile excluded)",
                                               "wall-clock")):
            for r in mine:
                if r["curve_val"]:
                    label = r["name"] + ("" if r["status"] == "ok" else f" ({r['status']})")
                    ax.plot([x / scale for x in r[axis]], r["curve_val"], "o-", ms=2,
                            color=colors.get(r["name"], "gray"), label=label)
            if later:
                lo, hi = min(later), max(later)
                ax.set_ylim(lo - 0.05 * max(hi - lo, 0.1), hi + 0.05 * max(hi - lo, 0.1))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss (nats/token)")
            ax.set_title(f"{model} on OpenStax, {gpu}: val loss vs {what}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs, args, flags):
    cmp = compare(runs)
    header = ["model", "run", "recipe", "status", "steps", "tokens (M)", "final val loss", "final val bpb",
              "best val loss", "ordinary step ms (median)", "Hessian step ms (median)",
              "mean step ms (compile excl.)", "tok/s", "train s (compile excl.)", "compile s excluded",
              "step time vs AdamW"]
    rows = []
    for r in runs:
        def get(key, scale=1.0):
            return r[key] / scale if r.get(key) is not None else "-"
        over = cmp[r["model"]]["overhead"].get(r["name"])
        rows.append([r["model"], r["name"], recipe(r, flags.get(r["name"], [])), r["status"], r["steps"],
                     get("tokens", 1e6), get("final_val"), get("final_bpb"), get("best_val"), get("med_ms"),
                     get("med_hess_ms"), get("mean_ms"), get("tok_s"), get("train_s"), get("excluded_s"),
                     f"{over:+.1%}" if over is not None else "-"])
    stamp = None
    if args.stamp_from:  # re-analysis of runs measured elsewhere: their GPU and versions, not this machine's
        stamp = {k: v for k, v in json.load(open(args.stamp_from)).items() if k not in ("header", "rows")}
        if os.environ.get("NANOFORGE_COMMIT"):
            stamp["commit"] = os.environ["NANOFORGE_COMMIT"]
    gpu = stamp["gpu"] if stamp else bench_common.gpu_name()
    notes = design_notes(runs, args) + "\n\nMeasured:\n"
    for model, res in cmp.items():
        notes += f"\n**{model}**\n\n" + "\n".join(f"- {line}" for line in res["lines"]) + "\n"
    not_ok = [f"{r['model']}/{r['name']} ({r['status']})" for r in runs if r["status"] != "ok"]
    if not_ok:
        notes += "\n- Runs that did not finish: " + ", ".join(not_ok) + "; their rows and curves are partial.\n"
    notes += f"\n![val loss vs tokens and wall-clock]({args.name}.png)"
    bench_common.write_results(args.name, header, rows, notes, stamp)
    plot(runs, os.path.join(bench_common.RESULTS_DIR, f"{args.name}.png"), gpu)
    return cmp


# Every mistake in the arguments is found here, before any run starts or any result is written: an unknown arm or
# model, a --stamp_from file that is not there, or --plot_only over a folder that holds none of the runs asked for
# (which would otherwise write an empty table over the real results).
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_dir", default="data/openstax_gpt2")
    p.add_argument("--out_root", default="out/optim_study")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of presets in config/")
    names = [n for n, _ in ARMS]
    p.add_argument("--runs", default=",".join(names), help="comma list of: " + ", ".join(names))
    p.add_argument("--max_iters", type=int, default=MAX_ITERS)
    p.add_argument("--tokens_per_step", type=int, default=TOKENS_PER_STEP)
    p.add_argument("--warmup_iters", type=int, default=WARMUP_ITERS)
    p.add_argument("--name", default="optim_study", help="results file name under bench/results (or $BENCH_OUT)")
    p.add_argument("--per_run_timeout", type=float, default=PER_RUN_TIMEOUT_S, help="seconds per training run")
    p.add_argument("--total_budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all training runs")
    p.add_argument("--plot_only", action="store_true", help="no training: analyse the runs already in out_root")
    p.add_argument("--note", default="", help="a sentence for the notes, e.g. where re-analysed runs came from")
    p.add_argument("--stamp_from", default="", help="with --plot_only: a results .json written on the GPU that "
                   "ran the runs; its GPU, date and versions stamp the new results")
    p.add_argument("--extra", default="", help='train.py flags appended to every run, e.g. --extra="--compile=False"')
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if unknown := [n for n in args.names if n not in dict(ARMS)]:
        p.error(f"unknown run(s) {unknown}; known: {[n for n, _ in ARMS]}")
    if missing := [m for m in args.model_list if not os.path.isfile(os.path.join(ROOT, "config", f"{m}.py"))]:
        p.error(f"--models: no preset config/{missing[0]}.py")
    args.data_dir, args.out_root = os.path.abspath(args.data_dir), os.path.abspath(args.out_root)
    if args.stamp_from and not os.path.isfile(args.stamp_from):
        p.error(f"--stamp_from {args.stamp_from}: no such file")
    if args.plot_only and not any(os.path.exists(os.path.join(args.out_root, m, n, "metrics.jsonl"))
                                  for m in args.model_list for n in args.names):
        p.error(f"--plot_only: no run of {args.model_list} x {args.names} has a metrics.jsonl under {args.out_root}")
    return args


# Runs go model by model, each model's arms in ARMS's order, so a budget that runs out cuts the least needed
# runs. status.json outlives one invocation: a study run in slices (one 10-minute call each) keeps every slice's
# statuses, and the final --plot_only reads them all; a run repeated later replaces its own entry only.
def run_all(args, status, status_path):
    """Every (model, arm) in order within one time budget; status[model/arm] says how each ended."""
    flags, start = dict(ARMS), time.time()
    todo = [(m, n) for m in args.model_list for n in args.names]
    for i, (model, name) in enumerate(todo):
        os.makedirs(os.path.join(args.out_root, model), exist_ok=True)
        key, left = f"{model}/{name}", args.total_budget - (time.time() - start)
        if left < MIN_RUN_S:
            status[key] = "skipped: time budget spent"
            shutil.rmtree(os.path.join(args.out_root, model, name), ignore_errors=True)  # no stale curves either
        else:
            timeout = min(args.per_run_timeout, left - GRACE_S)
            print(f"[{i + 1}/{len(todo)}] {key}: timeout {timeout:.0f} s, budget left {left:.0f} s", flush=True)
            status[key], took = train_run(model, name, flags[name], args, timeout)
        print(f"  {key}: {status[key]}" + ("" if status[key].startswith("skipped") else f" in {took:.0f} s"),
              flush=True)
        with open(status_path, "w") as f:
            json.dump(status, f, indent=1)


# Rows: with --plot_only, only the runs that exist (a metrics file) or were tried (a status entry): the default
# --runs names every arm, and arms never run are not rows. Otherwise every run asked for, finished or not.
def main(argv=None):
    args = parse_args(argv)
    status_path = os.path.join(args.out_root, "status.json")
    status = json.load(open(status_path)) if os.path.exists(status_path) else {}  # earlier slices' runs too
    if not args.plot_only:
        run_all(args, status, status_path)
    runs = []
    for model in args.model_list:
        for name in args.names:
            out_dir = os.path.join(args.out_root, model, name)
            key = f"{model}/{name}"
            if args.plot_only and key not in status and not os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
                continue  # never run: not a row
            r = analyse_run(out_dir)
            r["model"] = model
            expected = r["config"].get("max_iters", args.max_iters)
            r["status"] = status.get(key) or ("ok" if r["steps"] >= expected else
                                              f"partial: step {r['steps']}" if r["steps"] else "no metrics")
            runs.append(r)
    return report(runs, args, dict(ARMS))


if __name__ == "__main__":
    main()
