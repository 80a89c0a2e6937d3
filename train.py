"""
train.py — pretraining, top to bottom: one CPU, one GPU, or N GPUs under torchrun.

    python train.py config/tiny.py                                  # a laptop CPU, under two minutes
    python train.py config/gpt2_124m.py                             # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --batch_size=32

The loop, per optimizer step:
    for each of `grad_accum` micro-batches:  forward (bf16 autocast) -> loss / grad_accum -> backward
    clip the global gradient norm -> optimizer step at the scheduled learning rate -> log
and every eval_interval steps: validation loss (nats and bits per byte), checkpoint (atomically).

sft.py runs this same loop (the `train()` function below) on instruction data: only its defaults differ.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kernels
from configurator import configure, script_defaults
from model import GPT, GPTConfig
from shards import list_shards, open_shard

# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters. Defaults describe gpt2_124m; presets in config/ and --key=value flags override them.
# I/O
out_dir = "out/gpt2_124m"
data_dir = "data/openstax_gpt2"     # folder of {val,train}_NNNNNN.bin shards from prepare_fineweb.py
tokenizer = "gpt2"                  # tiktoken encoding the shards were made with (for bits per byte, chat)
init_from = "scratch"               # 'scratch' | 'resume' (out_dir/ckpt.pt) | a path to a checkpoint to start from
eval_interval = 250                 # steps between validation + checkpoint
eval_iters = 20                     # micro-batches per validation (a fixed token budget: the same windows each time)
save_checkpoints = True             # False: evaluate without writing ckpt.pt / best.pt (throwaway studies, benchmarks)
log_interval = 10
seed = 1337
# model (GPTConfig fields; see model.py)
n_layer = 12
n_embd = 768
n_head = 12
n_kv_head = 12
head_dim = 0
ffn_hidden = 2048
mlp = "swiglu"
pos = "rope"
rope_theta = 10000.0
tie_embeddings = True
vocab_size = 50257
vocab_pad_multiple = 64
block_size = 1024
norm_eps = 1e-5
doc_mask = False                    # True: packed documents attend only within themselves (model.py, doc_starts)
# batch: tokens per optimizer step = batch_size * block_size * grad_accum * world_size
batch_size = 16                     # micro-batch rows per process
total_batch_tokens = 524288         # 0.5M tokens per step (GPT-2 / nanoGPT); sets grad_accum ...
gradient_accumulation_steps = 0     # ... unless given here (> 0)
max_iters = 5000
epochs = 0.0                        # > 0: max_iters = epochs over the training tokens (used by sft.py)
# optimizer
optimizer = "adamw"                 # 'adamw' | 'sophia'
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                     # 0 = off
sophia_rho = 0.04                   # Sophia's clipping scale rho (kernels/sophia.py)
hess_interval = 10                  # Sophia: refresh the Hessian estimate every k steps
# learning-rate schedule: linear warmup, then 'cosine' | 'poly' | 'wsd' (warmup-stable-decay) | 'constant'
lr_schedule = "cosine"
warmup_iters = 700
warmup_frac = 0.0                   # > 0: warmup_iters = this fraction of max_iters (handy with epochs)
lr_decay_iters = 0                  # 0 = max_iters
poly_power = 1.0                    # 'poly': lr falls as (1 - progress)^power
wsd_decay_frac = 0.2                # 'wsd': the last 20% of steps decay linearly to min_lr
# system
device = "auto"                     # 'auto' | 'cpu' | 'cuda'
dtype = "auto"                      # 'auto' (bf16 autocast on a GPU that has it, else fp32) | 'bfloat16' | 'float32'
compile = True                      # torch.compile the model (ignored on CPU: compile time would dominate)
kernels_backend = os.environ.get("NANOFORGE_KERNELS", "auto")  # kernels/: 'auto' | 'triton' | 'torch' (+ ',name=choice'); see kernels/__init__.py
peak_flops = 0.0                    # the GPU's dense bf16 peak for MFU; 0 = look the GPU up in GPU_PEAK_FLOPS
DEFAULTS = script_defaults(globals())
MODEL_KEYS = [k for k in GPTConfig.__dataclass_fields__]

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets. MFU divides by these.
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
                  "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


# ----------------------------------------------------------------------------------------------------------------
# Data: fixed windows of block_size + 1 tokens, shuffled once per epoch by a seeded permutation. Sample number g
# of the run is window perm_epoch[g % n] of epoch g // n, so the data is a pure function of (seed, g): resuming
# at step s, or splitting a step over ranks, reads exactly the windows an uninterrupted single process would.
class TokenWindows:
    def __init__(self, data_dir, split, block_size, vocab_size, seed, shuffle):
        self.shards = [open_shard(p, vocab_size) for p in list_shards(data_dir, split)]
        counts = [(info["n_tokens"] - 1) // block_size for _, _, info in self.shards]
        self.first = np.cumsum([0] + counts)  # window index where each shard starts
        self.n = int(self.first[-1])
        if self.n == 0:
            raise ValueError(f"{data_dir}: the {split} split has fewer than block_size + 1 = {block_size + 1} "
                             f"tokens in every shard")
        self.block_size, self.seed, self.shuffle = block_size, seed, shuffle
        self.n_tokens = sum(info["n_tokens"] for _, _, info in self.shards)
        self._perm_epoch, self._perm = None, None

    def window_index(self, g):
        epoch, i = divmod(g, self.n)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen).numpy(), epoch
        return int(self._perm[i])

    def batch(self, first_sample, count, device, doc_starts=False):
        """Samples first_sample .. first_sample+count-1 as (x, y), y = x shifted by one. Where the shard has a
        mask (SFT), targets on untrained positions are -1, which the loss ignores. doc_starts: also a bool (B, T)
        tensor, True where a document begins in x: from the shard's .docs.bin (prepare_sft.py writes one), else
        at each end-of-text token (prepare_fineweb.py starts every document with one)."""
        xs, ys, ds = [], [], []
        for g in range(first_sample, first_sample + count):
            w = self.window_index(g)
            s = int(np.searchsorted(self.first, w, side="right") - 1)
            tokens, mask, info = self.shards[s]
            start = (w - int(self.first[s])) * self.block_size
            chunk = torch.from_numpy(tokens[start:start + self.block_size + 1].astype(np.int64))
            x, y = chunk[:-1], chunk[1:].clone()
            if mask is not None:
                y[torch.from_numpy(mask[start + 1:start + self.block_size + 1] == 0)] = -1
            xs.append(x)
            ys.append(y)
            if doc_starts:
                known = info["doc_starts"]
                if known is None:
                    ds.append(x == info["eot"])
                else:
                    lo, hi = np.searchsorted(known, [start, start + self.block_size])
                    flags = torch.zeros(self.block_size, dtype=torch.bool)
                    flags[torch.from_numpy(known[lo:hi] - start)] = True
                    ds.append(flags)
        out = [torch.stack(xs), torch.stack(ys)] + ([torch.stack(ds)] if doc_starts else [])
        if device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in out)
        return tuple(t.to(device) for t in out)


# ----------------------------------------------------------------------------------------------------------------
def lr_at(step, cfg):
    """The learning rate for optimizer step `step` (0-based)."""
    lr, lo, warm = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"]
    if step < warm:
        return lr * (step + 1) / (warm + 1)
    if cfg["lr_schedule"] == "constant":
        return lr
    decay_end = cfg["lr_decay_iters"] or cfg["max_iters"]
    if cfg["lr_schedule"] == "wsd":
        decay_start = max(warm, int(decay_end * (1 - cfg["wsd_decay_frac"])))
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, decay_end - decay_start))
        return lr + (lo - lr) * progress
    progress = min(1.0, (step - warm) / max(1, decay_end - warm))
    if cfg["lr_schedule"] == "cosine":
        return lo + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - lo)
    if cfg["lr_schedule"] == "poly":
        return lo + (lr - lo) * (1.0 - progress) ** cfg["poly_power"]
    raise ValueError(f"lr_schedule='{cfg['lr_schedule']}': expected cosine, poly, wsd or constant")


def make_optimizer(model, cfg, device):
    """Weight decay on the matrices of the blocks only: not on norms (their scale is the point of them), and
    by choice not on the embedding/head, whose rows for rare tokens would otherwise decay towards zero."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith(("wte.", "wpe.")) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (cfg["beta1"], cfg["beta2"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=betas, fused=device.type == "cuda")
    if cfg["optimizer"] == "sophia":
        from kernels.sophia import SophiaG
        return SophiaG(groups, lr=cfg["learning_rate"], betas=betas, rho=cfg["sophia_rho"])
    raise ValueError(f"optimizer='{cfg['optimizer']}': expected 'adamw' or 'sophia'")


def refresh_hessian(raw_model, optimizer, micro_batch, label_seed, autocast, device, cfg):
    """Sophia's curvature estimate (Gauss-Newton-Bartlett): the gradient of the loss on labels *sampled from the
    model's own softmax*, squared, is an unbiased estimate of the Gauss-Newton diagonal. As in the Sophia paper's
    code, one micro-batch per process is enough (the EMA over refreshes averages the noise), so the estimate costs
    1 / (hess_interval * grad_accum) of the training compute. Under DDP its backward all-reduces like an ordinary
    one. The labels depend only on (seed, step, rank): a resumed run draws the same ones."""
    from kernels.sophia import sampled_label_loss
    label_gen = torch.Generator(device=device).manual_seed(label_seed)
    model, x, y, _, starts = micro_batch
    with autocast:
        logits, _ = model(x, doc_starts=starts)
    # SFT data: only the trained positions count, as in the ordinary loss
    sampled_label_loss(logits, loss_mask=y != -1, generator=label_gen).backward()
    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
    optimizer.update_hessian()
    optimizer.zero_grad(set_to_none=True)


def save_checkpoint(path, payload):
    """torch.save to a temporary file, then an atomic rename: a crash mid-write leaves the old file whole."""
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def gpu_peak_flops(cfg, device):
    if cfg["peak_flops"] > 0:
        return cfg["peak_flops"]
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)


def plot_losses(metrics_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(png_path))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
def train(cfg):
    kernels.set_backend(cfg["kernels_backend"])
    # ---- processes and devices: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK ----
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, local_rank = 0, 1, 0
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
    want_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if want_cuda else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    use_bf16 = cfg["dtype"] == "bfloat16" or (cfg["dtype"] == "auto" and device.type == "cuda"
                                               and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- model: from scratch, resumed, or initialised from another run's weights (fine-tuning) ----
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    ckpt = None
    if cfg["init_from"] == "resume":
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"init_from='resume' but {ckpt_path} does not exist")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model_cfg = {k: ckpt["config"][k] for k in MODEL_KEYS}
    elif cfg["init_from"] != "scratch":
        src = cfg["init_from"]
        src = os.path.join(src, "ckpt.pt") if os.path.isdir(src) else src
        if not os.path.isfile(src):
            raise FileNotFoundError(f"init_from='{cfg['init_from']}': no checkpoint at {src}")
        init = torch.load(src, map_location="cpu", weights_only=False)
        model_cfg = {k: init["config"][k] for k in MODEL_KEYS}  # the architecture comes with the weights
    else:
        model_cfg = {k: cfg[k] for k in MODEL_KEYS}
    cfg.update(model_cfg)
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**model_cfg))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif cfg["init_from"] != "scratch":
        model.load_state_dict(init["model"])
        log(f"initialised from {src} (step {init['step']})")
    model.to(device)
    raw_model = model  # checkpoints save this one: parameter names without the compile/DDP prefixes

    # ---- data ----
    train_data = TokenWindows(cfg["data_dir"], "train", cfg["block_size"], model.config.padded_vocab_size,
                              cfg["seed"], shuffle=True)
    val_data = TokenWindows(cfg["data_dir"], "val", cfg["block_size"], model.config.padded_vocab_size,
                            cfg["seed"], shuffle=False)
    rows_per_micro = cfg["batch_size"] * world
    if cfg["gradient_accumulation_steps"] > 0:
        grad_accum = cfg["gradient_accumulation_steps"]
    else:
        per_micro = rows_per_micro * cfg["block_size"]
        grad_accum = max(1, cfg["total_batch_tokens"] // per_micro)
        if grad_accum * per_micro != cfg["total_batch_tokens"]:
            raise ValueError(f"total_batch_tokens={cfg['total_batch_tokens']} is not a multiple of batch_size * "
                             f"block_size * world_size = {per_micro}; adjust one of them")
    tokens_per_step = grad_accum * rows_per_micro * cfg["block_size"]
    if cfg["epochs"] > 0:
        cfg["max_iters"] = max(1, int(cfg["epochs"] * train_data.n * cfg["block_size"] / tokens_per_step))
    if cfg["warmup_frac"] > 0:
        cfg["warmup_iters"] = int(cfg["warmup_frac"] * cfg["max_iters"])
    log(f"{world} process(es) on {device.type}, micro-batch {cfg['batch_size']} x {cfg['block_size']}, grad_accum "
        f"{grad_accum}: {tokens_per_step:,} tokens/step; {train_data.n_tokens:,} train tokens, "
        f"{cfg['max_iters']} steps = {cfg['max_iters'] * tokens_per_step / max(1, train_data.n_tokens):.2f} epochs")
    log(f"model: {raw_model.num_params():,} parameters, {raw_model.flops_per_token() / 1e9:.3f} GFLOP/token")

    optimizer = make_optimizer(raw_model, cfg, device)
    step, best_val = 0, float("inf")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        log(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    if cfg["compile"] and device.type == "cuda":
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # ---- bookkeeping: metrics.jsonl keeps one line per logged step; a resumed run drops lines past its step ----
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    if master:
        kept = []
        if cfg["init_from"] == "resume" and os.path.exists(metrics_path):
            kept = [l for l in open(metrics_path) if json.loads(l)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
        with open(os.path.join(cfg["out_dir"], "run_config.json"), "w") as f:  # the resolved settings, readable
            json.dump(cfg, f, indent=1)                                        # without loading a checkpoint
    flops_per_step = raw_model.flops_per_token() * tokens_per_step
    peak = gpu_peak_flops(cfg, device) * world

    def checkpoint_payload():
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_val_loss": best_val, "config": dict(cfg),
                "data": {"next_sample": step * grad_accum * rows_per_micro, "seed": cfg["seed"]},
                "rng": {"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}

    # validation: the first eval_iters x batch_size windows of the val split, the same ones every time and whatever
    # the number of processes (rank r takes every world-th batch), so runs on 1 or N GPUs report comparable numbers
    n_val_windows = cfg["eval_iters"] * cfg["batch_size"]

    # bits per byte: nats/token over the validation windows, divided by ln 2 and by the bytes per token of
    # exactly those windows' targets. It compares models with different tokenizers fairly.
    val_bytes_per_token = None
    if master:
        try:
            import tiktoken
            enc = tiktoken.get_encoding(cfg["tokenizer"])
            ys = val_data.batch(0, n_val_windows, torch.device("cpu"))[1]
            ids = [int(t) for t in ys.flatten() if 0 <= t < enc.n_vocab]
            val_bytes_per_token = sum(len(enc.decode_single_token_bytes(t)) for t in ids) / max(1, len(ids))
        except Exception as e:  # no tokenizer offline: report nats only
            log(f"(bits per byte unavailable: {e})")

    @torch.no_grad()
    def evaluate():
        eval_model = model.module if ddp else model  # no DDP hooks: ranks may run different batch counts
        eval_model.eval()
        total = torch.zeros(2, device=device)  # sum of token losses, number of tokens
        for first in range(rank * cfg["batch_size"], n_val_windows, world * cfg["batch_size"]):
            x, y, *starts = val_data.batch(first, min(cfg["batch_size"], n_val_windows - first), device,
                                           doc_starts=cfg["doc_mask"])
            with autocast:
                _, loss = eval_model(x, y, doc_starts=starts[0] if starts else None)
            n = (y != -1).sum()
            total += torch.stack([loss.float() * n, n.float()])
        if ddp:
            dist.all_reduce(total)
        eval_model.train()
        return (total[0] / total[1]).item()

    def micro_batches(step):
        """This rank's micro-batches of optimizer step `step`, each with the context to run its backward in
        (DDP all-reduces gradients during backward, and only the last micro-step needs it: no_sync before) and
        the documents' starts (with doc_mask; else None)."""
        for micro in range(grad_accum):
            first = (step * grad_accum + micro) * rows_per_micro + rank * cfg["batch_size"]
            x, y, *starts = train_data.batch(first, cfg["batch_size"], device, doc_starts=cfg["doc_mask"])
            sync = nullcontext() if not ddp or micro == grad_accum - 1 else model.no_sync()
            yield model, x, y, sync, starts[0] if starts else None

    # ---- Ctrl-C / SIGTERM: finish the step in flight, write a checkpoint, exit cleanly ----
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # ---- the loop ----
    if step == 0:  # the untrained model's validation loss: the curve's starting point (about ln vocab)
        val = evaluate()
        log(f"step      0 | val loss {val:.4f}")
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": 0, "val_loss": val, "tokens": 0, "time": time.time()}) + "\n")
    model.train()
    t0 = time.time()
    try:
        while step < cfg["max_iters"]:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for _, x, y, sync, starts in micro_batches(step):
                with sync:
                    with autocast:
                        _, loss = model(x, y, doc_starts=starts)
                    (loss / grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                       cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
            if cfg["optimizer"] == "sophia":
                optimizer.step(bs=tokens_per_step)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg["optimizer"] == "sophia" and step % cfg["hess_interval"] == cfg["hess_interval"] - 1:
                refresh_hessian(raw_model, optimizer, next(micro_batches(step)),  # the step's first micro-batch
                                (cfg["seed"] * 1_000_003 + step) * world + rank, autocast, device, cfg)
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            loss_f = loss_sum.item() / grad_accum  # also the sync point that makes the step time honest
            if not math.isfinite(loss_f):
                raise FloatingPointError(f"loss is {loss_f} at step {step}: stopping without saving, the last "
                                         f"good checkpoint is {ckpt_path}. Lower learning_rate or check the data.")
            step += 1
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            if step % cfg["log_interval"] == 0 or step == 1:
                tok_s = tokens_per_step / dt
                mfu = flops_per_step / dt / peak if peak else float("nan")
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                gpu = f" | MFU {mfu * 100:5.1f}% | mem {mem:.1f} GiB" if device.type == "cuda" else ""
                if cfg["optimizer"] == "sophia":  # share of coordinates not clipped; Sophia's authors aim for 0.1-0.5
                    gpu += f" | win rate {optimizer.win_rate().item():.3f}"
                log(f"step {step:6d} | loss {loss_f:.4f} | lr {lr:.2e} | grad norm {grad_norm.item():.3f} | "
                    f"{dt * 1000:7.1f} ms | {tok_s:,.0f} tok/s{gpu}")
                if master:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": loss_f, "lr": lr, "grad_norm": grad_norm.item(),
                                            "ms": dt * 1000, "tok_s": tok_s, "mfu": mfu, "mem_gib": mem,
                                            "tokens": step * tokens_per_step, "time": time.time()}) + "\n")
            stop_now = stop["signal"] is not None
            if ddp:  # every rank must agree to stop, or the others hang in the next all-reduce
                flag = torch.tensor(float(stop_now), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = flag.item() > 0
            if step % cfg["eval_interval"] == 0 or step == cfg["max_iters"] or stop_now:
                val = evaluate()
                bpb = val / math.log(2) / val_bytes_per_token if val_bytes_per_token else float("nan")
                log(f"step {step:6d} | val loss {val:.4f} | val bpb {bpb:.4f}")
                if master and cfg["save_checkpoints"]:
                    best_val = min(best_val, val)
                    payload = checkpoint_payload()
                    save_checkpoint(ckpt_path, payload)
                    if val <= best_val:
                        save_checkpoint(os.path.join(cfg["out_dir"], "best.pt"),
                                        {k: payload[k] for k in ("model", "config", "step", "best_val_loss")})
                if master:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": step, "val_loss": val, "val_bpb": bpb,
                                            "tokens": step * tokens_per_step, "time": time.time()}) + "\n")
                t0 = time.time()  # evaluation and saving are not part of the next step's time
            if stop_now:
                log(f"stopped by signal {stop['signal']} at step {step}; " + (
                    f"checkpoint written to {ckpt_path}; continue with --init_from=resume" if cfg["save_checkpoints"]
                    else "no checkpoint (save_checkpoints=False)"))
                break
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if master and os.path.exists(metrics_path) and os.path.getsize(metrics_path):
            plot_losses(metrics_path, os.path.join(cfg["out_dir"], "loss.png"))
        if ddp:
            dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    try:
        train(configure(DEFAULTS, sys.argv[1:]))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # a clear message, not a traceback
        sys.exit(f"error: {e}")
