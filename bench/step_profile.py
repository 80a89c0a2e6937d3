"""
bench/step_profile.py — where train.py's own step spends its time, phase by phase, on the host and on the GPU.

bench/e2e.py says how fast training is; this says why. `python train.py <preset> --profile_steps=N` records the
run's last N steps with torch.profiler (the loop marks its phases: data, forward_backward, clip, optimizer,
sophia_refresh, zero_grad, log) and this file turns the trace into one table:

    phase              host ms/step   GPU ms/step   kernels/step
    data                      0.31          0.01             2
    forward_backward          3.90         61.20           830
    ...
    wall 66.0 ms/step · GPU busy 63.1 ms (95.6%) · idle gaps > 50 us: 12/step

How the GPU time is attributed: every kernel (and copy) carries the correlation id of the host call that
launched it (cudaLaunchKernel, cuLaunchKernel, cudaMemcpyAsync, ...). The launch happened at a time when the main
thread was inside one phase (the innermost, when phases nest), and that phase gets the kernel, also when the launch
came from another thread, such as autograd's backward thread, while the main thread waited in backward(). Host ms
is the time the main thread spent in the phase (exclusive of nested phases). GPU busy is the union of kernel
intervals; if it is well below the wall time, the GPU idles between kernels: the host is not keeping ahead, and
faster kernels cannot help that step; fewer launches (CUDA graphs) or less host work can.

Profiling slows the host (the profiler records every call), so these steps are not the ones e2e.py times; read
host ms as an upper bound and GPU ms as exact.

    python train.py config/lille_130m.py --max_iters=34 --profile_steps=4        # writes out_dir/profile.{md,json}
    python bench/step_profile.py out/lille_130m/profile_trace.json --steps 4     # the table again, from a trace
"""
import argparse
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext

import torch

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaMemcpyAsync",
            "cudaMemsetAsync", "cudaGraphLaunch", "cudaLaunchCooperativeKernel")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
IDLE_GAP_US = 50  # a gap between consecutive GPU activities longer than this counts as the GPU idling
TOP_KERNELS = 12


class LoopProfiler:
    """Records steps [first_step, first_step + steps) of train.py's loop. The loop calls at_step(step) at the top
    of every step and wraps each phase in `with profiler.phase(name):`; outside the window both are free."""

    def __init__(self, first_step, steps, out_dir, device):
        self.first, self.last, self.out_dir, self.device = first_step, first_step + steps, out_dir, device
        self.steps, self.prof, self.active, self.t0 = steps, None, False, 0.0

    def phase(self, name):
        return torch.profiler.record_function(f"phase:{name}") if self.active else nullcontext()

    def at_step(self, step):
        if step == self.first and not self.active:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()  # the window starts with an idle GPU: its wall time is its own
                # every call that makes the host wait for the GPU warns now: the loop should have none but its
                # log points (log_interval), and each one found names a stall of the pipeline
                self.warnings = warnings.catch_warnings(record=True)
                self.caught = self.warnings.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()
            self.active, self.t0 = True, time.perf_counter()
        elif step == self.last and self.active:
            syncs = None
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
                self.warnings.__exit__(None, None, None)
                waits = [str(w.message).splitlines()[0][:120] for w in self.caught if "synchroniz" in str(w.message)]
                syncs = {"per_step": len(waits) / self.steps, "kinds": sorted(set(waits))}
            wall_ms = (time.perf_counter() - self.t0) * 1e3 / self.steps
            self.prof.stop()
            self.active, trace = False, os.path.join(self.out_dir, "profile_trace.json")
            self.prof.export_chrome_trace(trace)
            result = analyse(json.load(open(trace)), self.steps, wall_ms)
            result["host_syncs"] = syncs
            write(result, self.out_dir)
            print(table(result), flush=True)


# ---- the trace -> the table ------------------------------------------------------------------------------------
def analyse(trace, steps, wall_ms=None):
    """A chrome trace (torch.profiler's export) -> {phases: {name: host_ms, gpu_ms, kernels}, wall_ms, busy_ms,
    idle_gaps, top: [(kernel, gpu_ms, calls)]}, all per step."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    phases = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("phase:")]
    main_tid = phases[0]["tid"] if phases else None
    phases = sorted((e for e in phases if e["tid"] == main_tid), key=lambda e: (e["ts"], -e["dur"]))
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"] in LAUNCHES and "args" in e}
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    out = {name: {"host_ms": 0.0, "gpu_ms": 0.0, "kernels": 0} for name in
           dict.fromkeys(p["name"][len("phase:"):] for p in phases)}
    out["(outside the phases)"] = {"host_ms": 0.0, "gpu_ms": 0.0, "kernels": 0}
    for p in phases:  # host: the phase's own time, without the phases nested in it
        nested = sum(q["dur"] for q in phases if q is not p and p["ts"] <= q["ts"]
                     and q["ts"] + q["dur"] <= p["ts"] + p["dur"] and q["dur"] < p["dur"])
        out[p["name"][len("phase:"):]]["host_ms"] += (p["dur"] - nested) / 1e3
    top = {}
    for k in device:
        t = launches.get(k.get("args", {}).get("correlation"))
        inner = [p for p in phases if t is not None and p["ts"] <= t <= p["ts"] + p["dur"]]
        name = min(inner, key=lambda p: p["dur"])["name"][len("phase:"):] if inner else "(outside the phases)"
        out[name]["gpu_ms"] += k["dur"] / 1e3
        out[name]["kernels"] += 1
        entry = top.setdefault(k["name"][:90], [0.0, 0])
        entry[0], entry[1] = entry[0] + k["dur"] / 1e3, entry[1] + 1
    busy, gaps, end = 0.0, 0, None  # the union of the device intervals, and the idle gaps between them
    for k in device:
        s, e = k["ts"], k["ts"] + k["dur"]
        if end is not None and s - end > IDLE_GAP_US:
            gaps += 1
        busy += max(0.0, e - max(s, end if end is not None else s))
        end = e if end is None else max(end, e)
    if wall_ms is None and phases:
        wall_ms = (max(p["ts"] + p["dur"] for p in phases) - phases[0]["ts"]) / 1e3 / steps
    per = lambda v: v / steps
    return {"phases": {n: {k: per(v) for k, v in d.items()} for n, d in out.items() if d["host_ms"] or d["kernels"]},
            "wall_ms": wall_ms, "busy_ms": busy / 1e3 / steps, "idle_gaps": gaps / steps, "steps": steps,
            "top": sorted(((n, per(ms), per(c)) for n, (ms, c) in top.items()), key=lambda r: -r[1])[:TOP_KERNELS]}


def table(result):
    lines = ["| phase | host ms/step | GPU ms/step | kernels/step |", "|---|---|---|---|"]
    for name, d in result["phases"].items():
        lines.append(f"| {name} | {d['host_ms']:.2f} | {d['gpu_ms']:.2f} | {d['kernels']:.0f} |")
    wall, busy = result["wall_ms"] or float("nan"), result["busy_ms"]
    lines += ["", f"wall {wall:.1f} ms/step · GPU busy {busy:.1f} ms ({100 * busy / wall:.1f}%) · idle gaps "
              f"> {IDLE_GAP_US} us: {result['idle_gaps']:.1f}/step (profiled steps: {result['steps']})"]
    if result.get("host_syncs"):
        lines += [f"host waits for the GPU: {result['host_syncs']['per_step']:.1f}/step "
                  f"({'; '.join(result['host_syncs']['kinds']) or 'none'})"]
    lines += ["",
          "| top kernels | GPU ms/step | calls/step |", "|---|---|---|"]
    lines += [f"| `{n}` | {ms:.2f} | {c:.0f} |" for n, ms, c in result["top"]]
    return "\n".join(lines)


def write(result, out_dir):
    with open(os.path.join(out_dir, "profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "profile.md"), "w") as f:
        f.write(table(result) + "\n")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a profile_trace.json that train.py --profile_steps wrote")
    p.add_argument("--steps", type=int, required=True, help="how many steps the trace holds")
    args = p.parse_args(argv)
    print(table(analyse(json.load(open(args.trace)), args.steps)))


if __name__ == "__main__":
    main(sys.argv[1:])
