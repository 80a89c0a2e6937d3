"""
bench/sophia_study.py — Sophia at Lille-130M's published settings against a tuned AdamW, on one GPU (issue #5).

The question
------------
Lille-130M was pretrained with Sophia (SophiaG, kernels/sophia.py). On the same model, data, batch and number of
tokens, does Sophia at Lille's settings reach a lower validation loss than AdamW? Is it still ahead at equal
wall-clock, once its Hessian estimate is paid for? And what does that estimate cost in a real training run
(target: Sophia's mean step time at most 12% above AdamW's, at equal steps)?

The design
----------
* Model and batch: config/lille_130m.py unchanged (24 layers, d 640, 10 query / 2 KV heads, SwiGLU, RoPE, tied
  embeddings, gpt2 tokenizer): 16 x 512 x grad_accum 2 = 16,384 tokens per step.
* Data: the OpenStax shards (~15M train tokens). 600 steps = 9.8M tokens, under one epoch: no run sees a token
  twice, so the validation loss measures generalisation, not memorisation.
* Every run: the same seed (same initial weights, same data order), 30 warmup steps (5%) then cosine decay,
  gradient clipping at 1, validation every 50 steps on the same 20 x 16 windows. Only the optimizer differs.
* AdamW gets what a fair baseline needs: its learning rate tuned by a sweep (2.5e-4 to 2e-3), and a schedule
  decayed fully to 0 (a half-decayed cosine leaves loss on the table). Weight decay 0.1, betas (0.9, 0.95).
* Sophia gets Lille's recipe exactly (the preset): lr 1e-4 -> 1e-5, rho 0.05, weight decay 0.2, betas
  (0.9, 0.95), Hessian refreshed every k = 10 steps. A second run at 3x that lr checks that the small published
  lr, chosen for 260k steps, is not what holds it back in a 600-step run.
* What differs from Lille's own run: 600 steps, not 260,620 (9.8M tokens, not 4.27B); warmup 30 steps (5% of the
  run) instead of 2000 (0.8%), since 2000 would be three times this whole run; OpenStax, not FineWeb-Edu; the
  gpt2 tokenizer; no dropout. So this answers "which optimizer is ahead early, at small scale", not "which ends
  lower after 4B tokens".

Measuring time honestly
-----------------------
train.py logs every step's wall-clock ms (log_interval = 1; the loss .item() syncs every step anyway). Evaluation
and checkpointing happen outside the steps, compilation inside them: step 1 compiles the training graph, Sophia's
first Hessian step the logits-only forward. One-off costs that say nothing about a long run: a step slower than 3x
the median of its kind (ordinary / Hessian) is counted at that median, and the seconds removed are reported.
Hessian steps are those with s % k == 0 (train.py refreshes right after optimizer step s, inside its time). The
wall-clock axis is this compile-excluded training time.

    overhead = mean step ms of the Sophia run / mean step ms of the AdamW runs - 1        (equal steps and batch)

It holds the Hessian refresh (forward + backward of one micro-batch every k steps, about 1/(k * grad_accum) = 5%
of the compute) and the difference between the two optimizer steps.

    python bench/sophia_study.py --data_dir=data/openstax_gpt2     # ~7 minutes on an H100; $BENCH_OUT for results
    python bench/sophia_study.py --plot_only                        # re-analyse the runs in out/sophia_study
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
from shards import list_shards, read_header  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
MODEL = "lille_130m"
PRESET = f"config/{MODEL}.py"
MAX_ITERS = 600
# kernels_backend=torch,sophia=triton: at 16 x 512 tokens per micro-batch a 24-layer model is host-bound with our
# Triton custom ops for the model (each costs more CPU time to launch than its GPU work: 10% MFU measured on an
# H100), while inductor fuses the same elementwise work into fewer launches; both optimizers see the same model
# code. Sophia keeps its fused Triton step (under 'torch' it would run the unfused twin, and the comparison would
# be with fused AdamW). save_checkpoints=False: 12 evaluations x 2.3 GB of checkpoints would outweigh training.
COMMON = ["--warmup_iters=30", "--eval_interval=50", "--eval_iters=20", "--log_interval=1",
          "--kernels_backend=torch,sophia=triton",
          "--save_checkpoints=False"]
ADAMW = ["--optimizer=adamw", "--min_lr=0", "--weight_decay=0.1"]
# (name, train.py flags after the common ones). They run in this order, and when the time budget runs out the last
# ones are skipped: so first the runs the comparison cannot do without (the likely best AdamW, Lille's Sophia).
RUNS = [
    ("adamw_lr5e-4", ADAMW + ["--learning_rate=5e-4"]),
    ("sophia_lr1e-4", []),                                          # the preset is Lille's Sophia recipe
    ("adamw_lr2.5e-4", ADAMW + ["--learning_rate=2.5e-4"]),
    ("adamw_lr1e-3", ADAMW + ["--learning_rate=1e-3"]),
    ("sophia_lr3e-4", ["--learning_rate=3e-4", "--min_lr=3e-5"]),  # sensitivity: 3x Lille's lr
    ("adamw_lr2e-3", ADAMW + ["--learning_rate=2e-3"]),
]
PRESET_HESS_INTERVAL = 10   # config/lille_130m.py; used only for a run that left no config to read it from
OUTLIER = 3.0               # a step slower than 3x the median of its kind is compilation: counted at the median
TARGET_OVERHEAD = 0.12
TOTAL_BUDGET_S = 3600       # all training subprocesses together (a lent GPU with a 10-minute limit: 470)
PER_RUN_TIMEOUT_S = 900     # one run (60-80 s on an H100 once compiled; the first compile adds ~50 s)
MIN_RUN_S = 45              # a run is not started with less than this left
GRACE_S = 20                # after SIGTERM train.py finishes its step, evaluates and checkpoints; then SIGKILL


# ---- running ----------------------------------------------------------------------------------------------------
def train_run(name, flags, args, timeout):
    """One train.py subprocess, output to <out_root>/<name>.log. Returns (status, seconds)."""
    out_dir = os.path.join(args.out_root, name)
    shutil.rmtree(out_dir, ignore_errors=True)  # stale metrics from an earlier study must not pass as this one's
    cmd = [sys.executable, "train.py", PRESET, f"--data_dir={args.data_dir}", f"--out_dir={out_dir}",
           f"--max_iters={args.max_iters}", *COMMON, *flags, *shlex.split(args.extra)]  # later flags win
    print("  " + shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(os.path.join(args.out_root, f"{name}.log"), "w") as log:
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
    return ("ok" if rc == 0 else f"failed (exit {rc}, see {name}.log)"), time.time() - t0


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
    except (ValueError, FileNotFoundError):
        return {}


def value_at(xs, ys, x):
    """The curve (xs increasing) linearly interpolated at x; None outside it."""
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] if xs and x == xs[-1] else None


def first_reach(xs, ys, target):
    """The first x at which the linearly interpolated curve comes down to `target`; None if it never does."""
    if ys and ys[0] <= target:
        return xs[0]
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if y1 <= target < y0:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def analyse_run(out_dir, optimizer=None, hess_interval=None):
    """Losses and compile-excluded step times of one run directory (metrics.jsonl written by train.py)."""
    name = os.path.basename(os.path.normpath(out_dir))
    cfg = run_config(out_dir)
    optimizer = optimizer or cfg.get("optimizer") or ("sophia" if "sophia" in name else "adamw")
    k = hess_interval or cfg.get("hess_interval") or PRESET_HESS_INTERVAL
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    steps = [r for r in rows if "ms" in r]
    evals = [r for r in rows if "val_loss" in r]
    r = {"name": name, "optimizer": optimizer, "hess_interval": k, "config": cfg, "steps": 0,
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


def compare(runs):
    """The AdamW sweep's winner, and each Sophia run against it: overhead, equal tokens, equal wall-clock."""
    out = {"lines": [], "sophia": {}}
    timed = {o: [r for r in runs if r["optimizer"] == o and r["steps"]] for o in ("adamw", "sophia")}
    adamw = [r for r in timed["adamw"] if r.get("final_val") is not None]
    best = min(adamw, key=lambda r: r["final_val"]) if adamw else None
    if best:
        known = all("learning_rate" in r["config"] for r in adamw)  # a run without a checkpoint has no config
        lrs = sorted(adamw, key=lambda r: r["config"]["learning_rate"]) if known else adamw
        edge = known and len(lrs) > 1 and best in (lrs[0], lrs[-1])
        out["lines"].append("AdamW sweep, final val loss: " + ", ".join(f"{r['name']} {r['final_val']:.4f}"
                                                                        for r in lrs) + f"; best **{best['name']}**"
                            + (" (at the edge of the sweep: a wider one might find a better AdamW)." if edge else "."))
    out["best_adamw"] = best["name"] if best else None
    ref_mean = statistics.mean(r["mean_ms"] for r in timed["adamw"]) if timed["adamw"] else None
    ref_med = statistics.mean(r["med_ms"] for r in timed["adamw"]) if timed["adamw"] else None
    for s in timed["sophia"]:
        res = {}
        ordinary = s["med_ms"] or s["med_hess_ms"]   # (hess_interval 1 leaves no ordinary step)
        hessian = s["med_hess_ms"] or ordinary       # (a run stopped before its first refresh has no Hessian step)
        if ref_mean:
            res["overhead"] = s["mean_ms"] / ref_mean - 1
            res["hessian_part"] = (hessian - ordinary) / s["hess_interval"] / ref_mean
            res["step_part"] = ordinary / ref_med - 1
            ok = res["hessian_part"] <= TARGET_OVERHEAD
            out["lines"].append(
                f"{s['name']}: the Hessian estimate costs **{res['hessian_part']:+.1%}** of AdamW's step time "
                f"({'meets' if ok else 'misses'} the <= {TARGET_OVERHEAD:.0%} target): the refresh steps take "
                f"{hessian:.1f} ms against {ordinary:.1f} for an ordinary one, one step in {s['hess_interval']}. "
                f"The whole step: {s['mean_ms']:.1f} ms vs AdamW's {ref_mean:.1f} = {res['overhead']:+.1%} at equal "
                f"steps, the rest being ordinary Sophia steps {res['step_part']:+.1%} against AdamW's median "
                f"{ref_med:.1f} ms (the optimizer step, its host work and the win-rate readback, plus run-to-run "
                f"spread).")
        if best and s.get("final_val") is not None:
            res["tokens"] = head_to_head(best, s, "curve_tokens", "M tokens", 1e6)
            res["wall"] = head_to_head(best, s, "curve_s", " s", 1)
            out["lines"].append(f"{s['name']} vs {best['name']}, {res['tokens']['text']}.")
            out["lines"].append(f"{s['name']} vs {best['name']}, {res['wall']['text']}.")
        out["sophia"][s["name"]] = res
    return out


# ---- reporting --------------------------------------------------------------------------------------------------
def recipe(r, flags):
    c = r["config"]
    if not c:
        return " ".join(flags) or "preset"
    text = f"{c['optimizer']} lr {c['learning_rate']:g}->{c['min_lr']:g}, wd {c['weight_decay']:g}"
    return text + (f", rho {c['sophia_rho']:g}, k {c['hess_interval']}" if c["optimizer"] == "sophia" else "")


def preset_config():
    """What every run shares, resolved from the preset and COMMON: for runs that left no run_config.json."""
    import train
    from configurator import configure
    return configure(train.DEFAULTS, [PRESET, *COMMON])


def design_notes(runs, args):
    c = next((r["config"] for r in runs if r["config"]), None) or preset_config()
    done = [r for r in runs if r["steps"]]
    try:
        train_tokens = sum(read_header(p)["n_tokens"] for p in list_shards(args.data_dir, "train"))
    except Exception:
        train_tokens = 0
    tps = done[0]["tokens_per_step"] if done else 0
    text = (f"Question (issue #5): does Sophia at Lille-130M's published settings beat AdamW with a tuned lr on the "
            f"same model, data, batch and tokens, at equal tokens and at equal wall-clock, and what does its Hessian "
            f"estimate cost? Design: {PRESET} ({c.get('n_layer', '?')} layers, d {c.get('n_embd', '?')}, "
            f"block {c.get('block_size', '?')}), {args.max_iters} steps x {tps:,.0f} tokens = "
            f"{args.max_iters * tps / 1e6:.2f}M tokens")
    if train_tokens:
        text += f" ({args.max_iters * tps / train_tokens:.2f} epochs of {train_tokens / 1e6:.1f}M train tokens)"
    warmup, tokens = c.get("warmup_iters", 0), args.max_iters * tps
    text += (f"; every run the same seed and data order, warmup {warmup} steps ({warmup / args.max_iters:.0%} of "
             f"the run) then cosine (Lille: 2000 of 260,620 steps), eval every {c.get('eval_interval', '?')} "
             f"steps. AdamW: lr swept, decayed to 0. Sophia: the preset, i.e. Lille's recipe, and 3x its lr as a "
             f"check (recipes in the table). Unlike Lille: {tokens / 1e6:.2f}M not 4.27B tokens, OpenStax not "
             f"FineWeb-Edu, gpt2 tokenizer, no dropout. Times: per-step wall-clock from metrics.jsonl; compilation "
             f"steps (> {OUTLIER:g}x the median of their kind) counted at the median; the wall-clock axis is that "
             f"training time, without evaluation and checkpoints. Val curves are interpolated linearly between "
             f"evaluations.")
    if args.extra:
        text += f" Extra flags on every run: `{args.extra}`."
    if args.note:
        text += " " + args.note
    return text


def plot(runs, path, gpu):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {}
    for opt, cmap in (("adamw", plt.cm.Blues), ("sophia", plt.cm.Oranges)):
        group = sorted([r for r in runs if r["optimizer"] == opt], key=lambda r: r["config"].get("learning_rate", 0))
        for i, r in enumerate(group):  # darker = larger learning rate
            colors[r["name"]] = cmap(0.45 + 0.5 * i / max(1, len(group) - 1))
    later = [v for r in runs for v in r["curve_val"][1:]]  # the untrained start (~ln vocab) would squash the rest
    for ax, axis, scale, xlabel, what in ((axes[0], "curve_tokens", 1e6, "tokens (millions)", "tokens"),
                                          (axes[1], "curve_s", 1, "training seconds (compile excluded)", "wall-clock")):
        for r in runs:
            if r["curve_val"]:
                label = r["name"] + ("" if r["status"] == "ok" else f" ({r['status']})")
                ax.plot([x / scale for x in r[axis]], r["curve_val"], "o-", ms=3, color=colors[r["name"]], label=label)
        if later:
            lo, hi = min(later), max(later)
            ax.set_ylim(lo - 0.05 * max(hi - lo, 0.1), hi + 0.05 * max(hi - lo, 0.1))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{MODEL} on OpenStax, {gpu}: val loss vs {what}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs, args, flags):
    cmp = compare(runs)
    header = ["run", "recipe", "status", "steps", "tokens (M)", "final val loss", "final val bpb", "best val loss",
              "ordinary step ms (median)", "Hessian step ms (median)", "mean step ms (compile excl.)", "tok/s",
              "train s (compile excl.)", "compile s excluded", "step time vs AdamW"]
    rows = []
    for r in runs:
        def get(key, scale=1.0):
            return r[key] / scale if r.get(key) is not None else "-"
        over = cmp["sophia"].get(r["name"], {}).get("overhead")
        rows.append([r["name"], recipe(r, flags.get(r["name"], [])), r["status"], r["steps"], get("tokens", 1e6),
                     get("final_val"), get("final_bpb"), get("best_val"), get("med_ms"), get("med_hess_ms"),
                     get("mean_ms"), get("tok_s"), get("train_s"), get("excluded_s"),
                     f"{over:+.1%}" if over is not None else "-"])
    stamp = None
    if args.stamp_from:  # re-analysis of runs measured elsewhere: their GPU and versions, not this machine's
        stamp = {k: v for k, v in json.load(open(args.stamp_from)).items() if k not in ("header", "rows")}
        if os.environ.get("NANOFORGE_COMMIT"):
            stamp["commit"] = os.environ["NANOFORGE_COMMIT"]
    gpu = stamp["gpu"] if stamp else bench_common.gpu_name()
    notes = design_notes(runs, args) + "\n\nMeasured:\n\n" + "\n".join(f"- {line}" for line in cmp["lines"])
    not_ok = [f"{r['name']} ({r['status']})" for r in runs if r["status"] != "ok"]
    if not_ok:
        notes += "\n- Runs that did not finish: " + ", ".join(not_ok) + "; their rows and curves are partial."
    notes += "\n\n![val loss vs tokens and wall-clock](sophia_study.png)"
    bench_common.write_results("sophia_study", header, rows, notes, stamp)
    plot(runs, os.path.join(bench_common.RESULTS_DIR, "sophia_study.png"), gpu)
    return cmp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_dir", default="data/openstax_gpt2")
    p.add_argument("--out_root", default="out/sophia_study")
    p.add_argument("--runs", default=",".join(n for n, _ in RUNS),
                   help="comma list of: " + ", ".join(n for n, _ in RUNS))
    p.add_argument("--max_iters", type=int, default=MAX_ITERS)
    p.add_argument("--per_run_timeout", type=float, default=PER_RUN_TIMEOUT_S, help="seconds per training run")
    p.add_argument("--total_budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all training runs")
    p.add_argument("--plot_only", action="store_true", help="no training: analyse the runs already in out_root")
    p.add_argument("--note", default="", help="a sentence for the notes, e.g. where re-analysed runs came from")
    p.add_argument("--stamp_from", default="", help="with --plot_only: a results .json written on the GPU that "
                   "ran the runs; its GPU, date and versions stamp the new results")
    p.add_argument("--extra", default="", help='train.py flags appended to every run, e.g. --extra="--compile=False"')
    args = p.parse_args(argv)
    flags = dict(RUNS)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if unknown := [n for n in names if n not in flags]:
        p.error(f"unknown run(s) {unknown}; known: {list(flags)}")
    args.data_dir, args.out_root = os.path.abspath(args.data_dir), os.path.abspath(args.out_root)
    if args.stamp_from and not os.path.isfile(args.stamp_from):
        p.error(f"--stamp_from {args.stamp_from}: no such file")
    if args.plot_only and not any(os.path.exists(os.path.join(args.out_root, n, "metrics.jsonl")) for n in names):
        p.error(f"--plot_only: no run of {names} has a metrics.jsonl under {args.out_root}")
    status_path = os.path.join(args.out_root, "status.json")
    status = json.load(open(status_path)) if args.plot_only and os.path.exists(status_path) else {}

    if not args.plot_only:
        os.makedirs(args.out_root, exist_ok=True)
        start = time.time()
        for i, name in enumerate(names):
            left = args.total_budget - (time.time() - start)
            if left < MIN_RUN_S:
                status[name] = "skipped: time budget spent"
                shutil.rmtree(os.path.join(args.out_root, name), ignore_errors=True)  # no stale curves either
            else:
                timeout = min(args.per_run_timeout, left - GRACE_S)
                print(f"[{i + 1}/{len(names)}] {name}: timeout {timeout:.0f} s, budget left {left:.0f} s", flush=True)
                status[name], took = train_run(name, flags[name], args, timeout)
            print(f"  {name}: {status[name]}" + ("" if status[name].startswith("skipped") else f" in {took:.0f} s"),
                  flush=True)
            with open(status_path, "w") as f:
                json.dump(status, f, indent=1)

    runs = []
    for name in names:
        r = analyse_run(os.path.join(args.out_root, name))
        expected = r["config"].get("max_iters", args.max_iters)
        r["status"] = status.get(name) or ("ok" if r["steps"] >= expected else
                                           f"partial: step {r['steps']}" if r["steps"] else "no metrics")
        runs.append(r)
    return report(runs, args, flags)


if __name__ == "__main__":
    main()
