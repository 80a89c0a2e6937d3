"""
bench/e2e.py — the arbiter of the kernels: end-to-end training speed of every preset, with them and without.

A kernel that wins on its own but loses inside a compiled training step is not worth having (DESIGN.md, "How to
measure"), so this benchmark trains each preset exactly as a user does,

    python train.py config/<preset>.py --kernels_backend=auto|torch --max_iters=N ...

in a subprocess, at the preset's own micro-batch and gradient accumulation, and reads what the run itself logged
to its metrics.jsonl: tokens per second (the median over the second half of the logged steps, so compilation and
warm-up are left out), MFU, and peak memory. With --nanogpt PATH (a copy of karpathy/nanoGPT) it also runs
nanoGPT's own bench.py at GPT-2 124M with the same micro-batch, in the same session on the same GPU: the peer
that gpt2_124m is measured against.

No data needs to travel: each vocabulary gets one folder of random tokens, written once into a temporary folder
with the files prepare_fineweb.py writes (val_000000.bin, train_000001.bin, meta.json). Random tokens cost the
GPU exactly what real ones do; the loss is meaningless here, and nothing else is read from it.

Where a preset does not fit the GPU or the time, --layers runs it with fewer layers (the same widths, so each
layer costs what it costs in the full model): those rows say so in the `layers` column.

Each run also profiles its last --profile_steps steps (train.py --profile_steps, bench/step_profile.py): host and
GPU milliseconds per phase of the step, how busy the GPU was and how often the host waited for it. The timed steps
come before those, so profiling never slows a number in the table; the profile tables follow it.

Writes bench/results/e2e.md (a table with the auto/torch and gpt2/nanoGPT ratios, then the profiles) and
bench/results/e2e.json: {"gpu", "date", "commit", "rows": [{"preset", "kernels", "tok_s", "mfu", "mem_gib",
"layers", "accum", "profile"}]}.

    python bench/e2e.py                                    # every preset, auto and torch, 30 steps each
    python bench/e2e.py --presets lille_130m,gpt2_124m --nanogpt .carry/nanogpt --max_accum 8
    python bench/e2e.py --presets lime_1b,lrc_1p5b --layers lime_1b=8,lrc_1p5b=6 --max_accum 2 --results e2e_1b
    python bench/e2e.py --presets lille_130m --backends auto --compile_mode reduce-overhead --max_accum 1 \
        --results e2e_graphs   # CUDA graphs take one micro-batch a step (train.py refuses accumulation with them)

--max_accum caps the micro-batches a step (gpt2_124m's preset takes 32 on one GPU: 8 give the same tokens/s to
within the optimizer step's share, in a quarter of the time); the `accum` column says what each row ran.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import RESULTS_DIR, commit, gpu_name  # noqa: E402
from configurator import read_config_file  # noqa: E402
from shards import write_shard  # noqa: E402

# ---- settings (flags override) ---------------------------------------------------------------------------------
PRESETS = ["gpt2_124m", "lille_130m", "parchment_166m", "lime_1b", "auto_g_nano_1b", "lrc_1p5b"]
BACKENDS = ["auto", "torch"]
# Also run, for these presets: lille_130m trains with Sophia, whose fused step is a kernel of ours too, so the twins
# with only that kernel show how much of 'auto' over 'torch' is the optimizer and how much the model's kernels.
EXTRA_BACKENDS = {"lille_130m": ["torch,sophia=triton"]}
STEPS = 30                 # optimizer steps per run; tokens/s is the median over the logged steps past STEPS / 2
LOG_EVERY = 3              # train.py's log_interval: a log point syncs with the GPU, so not every step
PROFILE_STEPS = 4          # then this many more steps under torch.profiler (train.py --profile_steps): the table
                           # of where each run's step goes (bench/step_profile.py); they are not in tokens/s
MAX_ACCUM = 0              # > 0: at most this many micro-batches a step (fewer than the preset's), to fit the time
TIMEOUT_S = 900            # one run (compile included) that takes longer is recorded as failed, and the next starts
TOKENS_PER_VOCAB = 8_000_000  # random tokens per data folder; the loader wraps around, so more are not needed
# The end-of-text id of each tokenizer the presets name (written into meta.json, as prepare_fineweb.py does)
EOT = {"gpt2": 50256, "cl100k_base": 100257}
TIKTOKEN_CACHE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tokenizers", "tiktoken_cache")


# ---- data: one folder of random tokens per vocabulary --------------------------------------------------------
def synthetic_data(root, tokenizer, vocab_size):
    """A data folder as prepare_fineweb.py writes it, of uniformly random ids below vocab_size; made once."""
    folder = os.path.join(root, f"{tokenizer}_{vocab_size}")
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    eot = EOT.get(tokenizer, vocab_size - 1)
    files = []
    for name, n in (("val_000000.bin", 65_536), ("train_000001.bin", TOKENS_PER_VOCAB)):
        write_shard(os.path.join(folder, name), rng.integers(0, vocab_size, n), vocab_size, eot=eot)
        files.append({"file": name, "tokens": n})
    with open(os.path.join(folder, "meta.json"), "w") as f:  # written last: its presence means "complete"
        json.dump({"tokenizer": tokenizer, "vocab_size": vocab_size, "eot": eot, "shards": files,
                   "source": "synthetic: uniformly random tokens (bench/e2e.py)", "val_local": None}, f, indent=1)
    return folder


# ---- one training run, as a user runs it ------------------------------------------------------------------------
def accumulation(cfg, max_accum):
    """The preset's micro-batches per step on one GPU, capped at max_accum (0: no cap)."""
    accum = max(1, cfg.get("total_batch_tokens", 524288) // (cfg.get("batch_size", 16) * cfg.get("block_size", 1024)))
    return min(accum, max_accum) if max_accum else accum


def train_command(preset, backend, data_dir, out_dir, steps, layers, compile_mode, accum=0, profile_steps=0):
    cmd = [sys.executable, "train.py", f"config/{preset}.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
           f"--kernels_backend={backend}", f"--max_iters={steps + profile_steps}", f"--log_interval={LOG_EVERY}",
           f"--eval_interval={10 * steps}", "--eval_iters=1", "--save_checkpoints=False", "--warmup_iters=10"]
    if layers:
        cmd.append(f"--n_layer={layers}")
    if accum:
        cmd.append(f"--gradient_accumulation_steps={accum}")
    if profile_steps:
        cmd.append(f"--profile_steps={profile_steps}")
    if compile_mode:
        cmd.append(f"--compile_mode={compile_mode}")
    return cmd


def read_metrics(path, steps):
    """(tok_s, mfu, mem_gib) from a run's metrics.jsonl: medians of the logged steps in the second half of the
    run (the first half holds compilation and warm-up), and the peak memory."""
    rows = [json.loads(line) for line in open(path)]
    timed = [r for r in rows if "tok_s" in r and steps // 2 < r["step"] <= steps]  # not the profiled steps
    if not timed:
        raise ValueError(f"{path}: no logged training step past step {steps // 2}")
    return (statistics.median(r["tok_s"] for r in timed), statistics.median(r["mfu"] for r in timed),
            max(r["mem_gib"] for r in timed))


def run_logged(cmd, log_path, cwd, timeout):
    """Run cmd, its output into log_path (and the last lines printed); returns the exit status (124: timeout).
    Offline GPU machines: train.py asks tiktoken for the tokenizer (bits per byte), and tiktoken retries its
    download for minutes; the repository's offline cache (../shared, as tests/conftest.py uses) answers at once."""
    env = dict(os.environ)
    if "TIKTOKEN_CACHE_DIR" not in env and os.path.isdir(TIKTOKEN_CACHE):
        env["TIKTOKEN_CACHE_DIR"] = TIKTOKEN_CACHE
    with open(log_path, "w") as log:
        try:
            status = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                    env=env).returncode
        except subprocess.TimeoutExpired:
            status = 124
    tail = open(log_path).read().splitlines()[-3:]
    print("   " + "\n   ".join(tail), flush=True)
    return status


def time_preset(preset, backend, data_dir, work, args):
    """One row: train the preset, read its metrics; a failure is a row with tok_s None and the log's last line."""
    layers = args.layers.get(preset)
    cfg = read_config_file(os.path.join(ROOT, "config", f"{preset}.py"))
    accum = accumulation(cfg, getattr(args, "max_accum", 0))
    name = f"{preset}_{backend.replace(',', '+').replace('=', '-')}"
    out_dir = os.path.join(work, name)
    log_path = os.path.join(args.logs, f"e2e_{name}.log")
    profile_steps = getattr(args, "profile_steps", 0)
    cmd = train_command(preset, backend, data_dir, out_dir, args.steps, layers, args.compile_mode, accum,
                        profile_steps)
    print(f"== {preset} kernels={backend}{f' layers={layers}' if layers else ''}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    status = run_logged(cmd, log_path, ROOT, args.timeout)
    row = {"preset": preset, "kernels": backend, "tok_s": None, "mfu": None, "mem_gib": None,
           "layers": layers or cfg.get("n_layer", 12), "accum": accum}
    try:
        if status != 0:
            raise RuntimeError(f"train.py exited with status {status} (log: {log_path})")
        row["tok_s"], row["mfu"], row["mem_gib"] = read_metrics(os.path.join(out_dir, "metrics.jsonl"), args.steps)
        if profile_steps and os.path.exists(os.path.join(out_dir, "profile.json")):
            row["profile"] = json.load(open(os.path.join(out_dir, "profile.json")))
            shutil.copy(os.path.join(out_dir, "profile_trace.json"), os.path.join(args.logs, f"e2e_{name}_trace.json"))
    except Exception as e:  # keep going: the other rows are still worth having
        row["error"] = str(e)
    print(f"   -> {({k: v for k, v in row.items() if k != 'profile'})} ({time.time() - t0:.0f} s)", flush=True)
    return row


# ---- the peer: nanoGPT's own bench.py --------------------------------------------------------------------------
def time_nanogpt(path, batch_size, args):
    """nanoGPT's bench.py (GPT-2 124M, compiled, bf16, random tokens) at our micro-batch: its 'time per
    iteration' is one forward + backward + AdamW step of batch_size x 1024 tokens. Its MFU is against an A100's
    312 TFLOP/s; rescaled here to this GPU's peak (train.py's table), as our runs report it."""
    log_path = os.path.join(args.logs, "e2e_nanogpt.log")
    cmd = [sys.executable, "bench.py", f"--batch_size={batch_size}", "--real_data=False", "--compile=True"]
    print(f"== nanoGPT bench.py in {path}: {' '.join(cmd[1:])}", flush=True)
    status = run_logged(cmd, log_path, path, args.timeout)
    row = {"preset": "gpt2_124m", "kernels": "nanogpt", "tok_s": None, "mfu": None, "mem_gib": None, "layers": 12}
    found = re.findall(r"time per iteration: ([\d.]+)ms, MFU: ([\d.]+)%", open(log_path).read())
    if status != 0 or not found:
        row["error"] = f"bench.py exited with status {status}, no timing line (log: {log_path})"
        return row
    ms, mfu_a100 = map(float, found[-1])
    row["tok_s"] = batch_size * 1024 / (ms / 1000)
    import torch
    from checkpoint import peak_flops
    peak = peak_flops(torch.device("cuda")) if torch.cuda.is_available() else 0.0  # what our runs divide by
    row["mfu"] = mfu_a100 / 100 * 312e12 / peak if peak else None
    print(f"   -> {row}", flush=True)
    return row


# ---- the report ------------------------------------------------------------------------------------------------
def write_report(rows, stamp, args):
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{args.results}.json"), "w") as f:
        json.dump({**stamp, "rows": rows}, f, indent=1)
    full = {p: read_config_file(os.path.join(ROOT, "config", f"{p}.py")).get("n_layer", 12) for p in PRESETS}
    by = {(r["preset"], r["kernels"]): r for r in rows}
    lines = ["# End-to-end training speed (bench/e2e.py)", "",
             f"GPU: {stamp['gpu']} · date: {stamp['date']} · commit: {stamp['commit']} · {args.steps} steps a run, "
             f"tokens/s = median of the logged steps past step {args.steps // 2}"
             + (f" · compile_mode={args.compile_mode}" if args.compile_mode else ""), "",
             "`python train.py config/<preset>.py --kernels_backend=<kernels>` on random tokens, each preset at its "
             "own micro-batch and gradient accumulation. Rows marked * ran with fewer layers than the preset.", "",
             "| preset | layers | accum | kernels | tokens/s | MFU | peak mem GiB | vs torch | vs nanoGPT |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        torch_row, nano_row = by.get((r["preset"], "torch")), by.get(("gpt2_124m", "nanogpt"))
        ratio = lambda other: f"{r['tok_s'] / other['tok_s']:.3f}x" if r["tok_s"] and other and other["tok_s"] \
            and other is not r else ""
        layers = f"{r['layers']}{' *' if r['layers'] != full.get(r['preset'], r['layers']) else ''}"
        if r.get("commit", stamp["commit"]) != stamp["commit"] or r.get("gpu", stamp["gpu"]) != stamp["gpu"]:
            layers += f" ({r['gpu']}, {r['date']}, {r['commit']})"  # a row kept from an earlier run
        tok = f"{r['tok_s']:,.0f}" if r["tok_s"] else f"failed: {r.get('error', '')[:80]}"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else ""
        mem = f"{r['mem_gib']:.1f}" if r["mem_gib"] else ""
        vs_nano = ratio(nano_row) if r["preset"] == "gpt2_124m" and r["kernels"] != "nanogpt" else ""
        lines.append(f"| {r['preset']} | {layers} | {r.get('accum', '')} | {r['kernels']} | {tok} | {mfu} | {mem} | "
                     f"{ratio(torch_row) if r['kernels'] != 'torch' else ''} | {vs_nano} |")
    for r in rows:  # where each step goes (train.py --profile_steps)
        if r.get("profile"):
            from bench.step_profile import table
            lines += ["", f"### {r['preset']}, kernels={r['kernels']}: the profiled steps", "", table(r["profile"])]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS_DIR, f"{args.results}.md"), "w") as f:
        f.write(text)
    print(text)


def earlier_rows(results):
    """The rows of an earlier bench/results/<results>.json, each stamped with its own run's GPU, date and commit."""
    path = os.path.join(RESULTS_DIR, f"{results}.json")
    if not os.path.exists(path):
        return []
    saved = json.load(open(path))
    return [{"gpu": saved["gpu"], "date": saved["date"], "commit": saved["commit"], **r} for r in saved["rows"]]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (config/<name>.py)")
    p.add_argument("--backends", default=";".join(BACKENDS), help="kernels_backend values to run, separated by ';' "
                   "(a value may hold commas: 'torch,sophia=triton')")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--layers", default="", help="preset=n_layer,... : fewer layers for those presets")
    p.add_argument("--max_accum", type=int, default=MAX_ACCUM, help="at most this many micro-batches a step")
    p.add_argument("--profile_steps", type=int, default=PROFILE_STEPS, help="steps profiled after the timed ones")
    p.add_argument("--nanogpt", default="", help="a copy of karpathy/nanoGPT: also time its bench.py")
    p.add_argument("--compile_mode", default="", help="passed to train.py as --compile_mode when given")
    p.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per run before it counts as failed")
    p.add_argument("--results", default="e2e", help="bench/results/<this>.{md,json}: another name keeps a "
                   "second invocation (another compile_mode, say) from replacing the first's table")
    p.add_argument("--merge", action="store_true", help="keep the rows of other presets from the existing "
                   "results file (each row says its GPU, date and commit); ratios stay within one run")
    p.add_argument("--logs", default="", help="folder for the runs' logs (default: a temporary folder)")
    args = p.parse_args(argv)
    args.presets = [x for x in args.presets.split(",") if x]
    for name in args.presets:
        if not os.path.exists(os.path.join(ROOT, "config", f"{name}.py")):
            p.error(f"--presets: no config/{name}.py")
    args.layers = dict((k, int(v)) for k, v in (kv.split("=") for kv in args.layers.split(",") if kv))
    unknown = set(args.layers) - set(args.presets)
    if unknown:
        p.error(f"--layers names presets that are not run: {sorted(unknown)}")
    if args.nanogpt and not os.path.exists(os.path.join(args.nanogpt, "bench.py")):
        p.error(f"--nanogpt {args.nanogpt}: no bench.py there (a copy of github.com/karpathy/nanoGPT)")
    return args


def main(argv):
    args = parse_args(argv)
    stamp = {"gpu": gpu_name(), "date": datetime.date.today().isoformat(), "commit": commit()}
    rows = []
    if args.merge:  # a second device call adds its presets to the first call's table
        rows = [r for r in earlier_rows(args.results) if r["preset"] not in args.presets]
    with tempfile.TemporaryDirectory(prefix="nanoforge_e2e_") as work:
        args.logs = args.logs or work
        os.makedirs(args.logs, exist_ok=True)
        if args.nanogpt:
            batch = read_config_file(os.path.join(ROOT, "config", "gpt2_124m.py"))["batch_size"]
            rows.append({**time_nanogpt(os.path.abspath(args.nanogpt), batch, args), **stamp})
        for preset in args.presets:
            cfg = read_config_file(os.path.join(ROOT, "config", f"{preset}.py"))
            data_dir = synthetic_data(work, cfg.get("tokenizer", "gpt2"), cfg.get("vocab_size", 50257))
            for backend in [b for b in args.backends.split(";") if b] + EXTRA_BACKENDS.get(preset, []):
                rows.append({**time_preset(preset, backend, data_dir, work, args), **stamp})
                write_report(rows, stamp, args)  # after every run: a crash later loses nothing measured
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
