"""
bench/step_profile.py — one preset's compiled training step in one process: tokens/s, and where the time goes.

bench/e2e.py is the arbiter (train.py as a user runs it); this is the workbench for making it faster. It builds the
preset's GPT, compiles it, and times micro-steps of forward + backward + fused AdamW on random tokens under bf16
autocast, for each kernels_backend given, in one process (one compile each). With --profile it then records a few
steps with torch.profiler and prints the top operations by GPU time, plus the one number that says whether the
host keeps up: the GPU's busy time per step against the step's wall time. A step whose GPU is busy 60% of the
time is host-bound (launch overhead, Python), and faster kernels will not help it; CUDA graphs
(--compile_mode reduce-overhead) or fewer launches will.

    python bench/step_profile.py config/lille_130m.py --kernels auto torch auto,attention=triton --profile
    python bench/step_profile.py config/gpt2_124m.py --compile_mode reduce-overhead --layers 4
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import kernels  # noqa: E402
from configurator import read_config_file  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

STEPS = 20     # timed micro-steps per kernels setting, after WARMUP untimed ones (compilation happens there)
WARMUP = 5
PROFILE_STEPS = 3


def build(preset_path, layers, batch_size):
    cfg = read_config_file(preset_path)
    if layers:
        cfg["n_layer"] = layers
    config = GPTConfig.from_dict(cfg)
    torch.manual_seed(0)
    model = GPT(config).cuda()
    B = batch_size or cfg.get("batch_size", 16)
    idx = torch.randint(0, config.vocab_size, (B, config.block_size), device="cuda")
    return model, idx, config


def make_step(model, idx, compile_mode):
    """One micro-step as train.py takes it: compiled model, bf16 autocast, backward, fused AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    compiled = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    targets = torch.roll(idx, -1, dims=1)

    def step():
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the graphs' previous outputs may be reused
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(step, n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def profile(step, top):
    """Top operations by GPU time over PROFILE_STEPS steps, and GPU busy time per step vs the wall time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(PROFILE_STEPS):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / PROFILE_STEPS
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=60))
    # busy = the summed durations of the kernels themselves (the table also lists each op that launched them)
    kernels_ = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.time_range.elapsed_us() for e in kernels_) / PROFILE_STEPS
    print(f"per step (profiled, so slower than timed): wall {wall * 1e3:.2f} ms, GPU busy {gpu_us / 1e3:.2f} ms "
          f"({100 * gpu_us / 1e3 / (wall * 1e3):.0f}%), {len(kernels_) / PROFILE_STEPS:.0f} kernels")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", help="config/<preset>.py")
    p.add_argument("--kernels", nargs="+", default=["auto", "torch"], help="kernels_backend values, one compile each")
    p.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead",
                                                                 "max-autotune-no-cudagraphs"])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--layers", type=int, default=0, help="fewer layers than the preset (0: the preset's)")
    p.add_argument("--batch_size", type=int, default=0, help="micro-batch rows (0: the preset's)")
    p.add_argument("--profile", action="store_true", help="also print the profiler's top operations")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("step_profile: needs a CUDA GPU")
    for spec in args.kernels:
        torch._dynamo.reset()
        kernels.set_backend(spec)
        model, idx, config = build(args.preset, args.layers, args.batch_size)
        step = make_step(model, idx, args.compile_mode)
        t0 = time.perf_counter()
        for _ in range(WARMUP):
            step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        dt = time_steps(step, args.steps)
        tokens = idx.numel()
        flops = model.flops_per_token() * tokens / dt
        print(f"{os.path.basename(args.preset)} layers={config.n_layer} B={idx.shape[0]} T={idx.shape[1]} "
              f"kernels={spec} compile_mode={args.compile_mode}: {dt * 1e3:.2f} ms/step, {tokens / dt:,.0f} tok/s, "
              f"{flops / 1e12:.0f} TFLOP/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
              f"(warm-up + compile {warm:.0f} s)", flush=True)
        if args.profile:
            profile(step, args.top)
        del model, step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
