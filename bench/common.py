"""
What every benchmark in bench/ shares: timing on the GPU, the GPU's name and copy bandwidth, writing a
results file (markdown table + the raw rows as JSON) that names the GPU, the date and the commit, and reading
the training studies' runs (a run folder's metrics.jsonl, where a loss curve reaches a target).

Timing uses CUDA events around many repetitions after a warm-up, and reports the median: one slow outlier
(a clock ramp, an allocator hiccup) does not move it. The L2 cache is flushed between repetitions by
writing a buffer larger than L2, so a memory-bound kernel is measured reading from HBM as it would in a
training step, not from a warm cache.
"""
import datetime
import json
import os
import subprocess
import time

import torch

RESULTS_DIR = os.environ.get("BENCH_OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))


def commit():
    """The commit measured: $NANOFORGE_COMMIT (set when the tree travels without .git), else git's HEAD."""
    if os.environ.get("NANOFORGE_COMMIT"):
        return os.environ["NANOFORGE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).decode().strip()
    except Exception:
        return "unknown"


def gpu_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


_flush_buffer = None


def time_ms(fn, reps=50, warmup=10, flush_l2=True, queued=False):
    """Median milliseconds of fn() over `reps` runs, each timed with CUDA events (after an L2 flush).
    queued=False: a synchronisation after every run, so each time is one call from an idle GPU and includes
    the host's launch overhead wherever it exceeds the flush (the wall time of a single eager call).
    queued=True: the runs are queued back to back with one synchronisation at the end, so the host launches
    run n+1 while the GPU works on run n: what is timed is GPU time, as in a training step that keeps the GPU
    busy (and as triton.testing.do_bench does). Host overhead is then invisible unless it exceeds the GPU time
    of a run (flush included): measure it separately (host_us)."""
    global _flush_buffer
    if flush_l2 and _flush_buffer is None:
        _flush_buffer = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")  # > any L2 (50-60 MB)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if flush_l2:
            _flush_buffer.zero_()
        start.record()
        fn()
        end.record()
        if not queued:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def host_us(fn, reps=20):
    """Microseconds of host time per call, the GPU left to run behind (no synchronisation inside the loop)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / reps * 1e6


def copy_bandwidth_gbs(nbytes=2 * 1024**3):
    """The GPU's achievable memory bandwidth: a device-to-device copy, counting bytes read + written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=20, warmup=5, flush_l2=False)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_results(name, header, rows, notes="", stamp=None, extra=None):
    """Write bench/results/<name>.md (a table) and <name>.json (the rows, and `extra`: e.g. the curves), stamped
    with GPU, date, commit. stamp: the stamp of the machine that measured, when the rows are re-analysed
    elsewhere (e.g. on a CPU)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    if stamp is None:
        stamp = {"gpu": gpu_name(), "date": datetime.date.today().isoformat(), "commit": commit(),
                 "torch": torch.__version__}
        try:
            import triton
            stamp["triton"] = triton.__version__
        except Exception:
            pass
    lines = [f"# {name}", "", " · ".join(f"{k}: {v}" for k, v in stamp.items()), ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        lines.append("| " + " | ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in r) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS_DIR, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as f:
        json.dump({**stamp, "header": header, "rows": rows, **(extra or {})}, f, indent=1)
    print(text)
    return os.path.join(RESULTS_DIR, f"{name}.md")


# ---- the training studies' runs ------------------------------------------------------------------------------
def metrics_rows(run_dir):
    """The rows of a train.py run folder's metrics.jsonl ([] if it has none yet)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def first_reach(xs, ys, target):
    """The first x at which the linearly interpolated curve comes down to `target`; None if it never does."""
    if ys and ys[0] <= target:
        return xs[0]
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if y1 <= target < y0:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None
