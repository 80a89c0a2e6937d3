"""
train.py — pretraining, top to bottom: one CPU, one GPU, or N GPUs under torchrun.

    python train.py config/tiny.py                                  # a laptop CPU, under two minutes
    python train.py config/gpt2_124m.py                             # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --batch_size=32

Read it in three parts. (1) The hyperparameters, below, as globals (nanoGPT style; configurator.py applies the
preset and the --key=value flags). (2) The run, resolved once by resolve(): the settings, then the facts of the
data folder (meta.json: tokenizer, vocabulary) and of the init/resume checkpoint (the architecture), checked
against each other before anything is allocated; a mistake is one line naming the key. The rest reads
`run.<key>`. (3) train() allocates and loop() runs, one optimizer step per turn, in execution order:

    evaluate + checkpoint   (at the top, every eval_interval steps and on the last step, nanochat-style)
    for each of `grad_accum` micro-batches:  forward (bf16 autocast) -> loss / grad_accum -> backward
    clip the global gradient norm -> optimizer.step() at lr = base_lr * lr_factor(step) -> log

The host never waits for the GPU inside a step: the loss and the finiteness of the gradient stay on the device
and are read every log_interval steps. sft.py runs this same loop on instruction data; only its defaults differ.
Exit codes: 0 done, 1 a named error, 130 after Ctrl-C and 143 after SIGTERM (128 + signal, both after saving).
"""
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) or before the loop: leave at once, quietly.
    # os._exit, not sys.exit: a SystemExit raised inside a half-done import (numpy's, torch's) can end in a
    # traceback from the half-made module on the way out; nothing is open or unsaved yet
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import fields
from types import SimpleNamespace

import torch
import torch.distributed as dist

import checkpoint
import kernels
import parallel as parallel_  # the module; `parallel` is the setting below
from configurator import ConfigError, check_values, configure, run_script, script_defaults
from device import autocast, pick_device, pick_dtype
from device import peak_flops as device_peak_flops  # (the name peak_flops is the setting below)
from model import GPT, GPTConfig, weight_decayed
from shards import TokenWindows, check_headers, read_meta  # TokenWindows: the data, a function of (seed, sample)
from tokenizer import check_same, content_hash

# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters. Defaults describe gpt2_124m; presets in config/ and --key=value flags override them.
# I/O
out_dir = "out/gpt2_124m"
data_dir = "data/openstax_gpt2"     # {val,train}_NNNNNN.bin + meta.json from prepare_fineweb.py / prepare_sft.py
tokenizer = ""                      # '' = the data's (meta.json); set it only to assert what the data must be
init_from = "scratch"               # 'scratch' | 'resume' (out_dir/ckpt.pt) | a run folder or .pt to start from
overwrite = False                   # True: a fresh run may replace the run already in out_dir
eval_interval = 250                 # steps between validation + checkpoint
eval_iters = 20                     # micro-batches per validation (a fixed token budget: the same windows each time)
save_checkpoints = True             # False: evaluate without writing ckpt.pt / best.pt (throwaway studies, benchmarks)
log_interval = 10                   # steps between log lines; also how often the host reads the device's numbers
sample_prompt = ""                  # non-empty: the run ends by printing a short continuation of this text
seed = 1337
# model: every GPTConfig field (n_layer, n_embd, n_head, ..., block_size; model.py) is a key too, with its default
# there (one place). vocab_size and the tokenizer come from the data's meta.json; with init_from, the checkpoint's.
doc_mask = False                    # True: packed documents attend only within themselves (model.py, doc_starts)
# batch: tokens per optimizer step = batch_size * block_size * grad_accum * world_size
batch_size = 16                     # micro-batch rows per process
total_batch_tokens = 524288         # 0.5M tokens per step (GPT-2 / nanoGPT); sets grad_accum ...
gradient_accumulation_steps = 0     # ... unless given here (> 0)
max_iters = 5000
epochs = 0.0                        # > 0: max_iters = epochs over the training tokens (used by sft.py)
# optimizer
optimizer = "adamw"                 # 'adamw' | 'sophia' | 'muon' (kernels/muon.py: Muon on block matrices)
learning_rate = 6e-4                # AdamW's (and Sophia's) peak lr; with muon, the lr of the non-matrix params
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                     # 0 = off
sophia_rho = 0.04                   # Sophia's clipping scale rho (kernels/sophia.py)
hess_interval = 10                  # Sophia: refresh the Hessian estimate every k steps
muon_lr = 0.02                      # Muon's lr for the 2-D block matrices
muon_momentum = 0.95
# learning-rate schedule: linear warmup, then 'cosine' | 'poly' | 'wsd' (warmup-stable-decay) | 'constant'
lr_schedule = "cosine"
warmup_iters = 700
warmup_frac = 0.0                   # > 0: warmup_iters = this fraction of max_iters (handy with epochs)
lr_decay_iters = 0                  # 0 = max_iters
poly_power = 1.0                    # 'poly': lr falls as (1 - progress)^power
wsd_decay_frac = 0.2                # 'wsd': the last 20% of steps decay linearly to min_lr
# system
device = "auto"                     # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
dtype = "auto"                      # 'auto' (bf16 autocast on a GPU that has it, else fp32) | 'bfloat16' | 'float32'
parallel = "ddp"                    # torchrun's processes: 'ddp' (each holds the whole model) | 'fsdp' (parallel.py)
activation_checkpointing = "none"   # 'none' | 'blocks' | N: recompute Block activations in the backward (parallel.py)
compile = True                      # torch.compile the model (ignored on CPU: compile time would dominate)
compile_mode = "default"            # 'default' | 'reduce-overhead' (CUDA graphs) | 'max-autotune-no-cudagraphs'
kernels_backend = os.environ.get("NANOFORGE_KERNELS", "auto")  # 'auto' | 'triton' | 'torch' (+ ',name=choice')
peak_flops = 0.0                    # the GPU's dense bf16 peak for MFU; 0 = device.GPU_PEAK_FLOPS's entry
profile_steps = 0                   # > 0: profile the run's last N steps, phase by phase (bench/step_profile.py)
MODEL_KEYS = [f.name for f in fields(GPTConfig)]
DEFAULTS = {**{f.name: f.default for f in fields(GPTConfig)}, **script_defaults(globals())}
# Checked at start, so a bad value fails now and not on the step that first uses it.
CHOICES = {"lr_schedule": ("cosine", "poly", "wsd", "constant"), "optimizer": ("adamw", "sophia", "muon"),
           "parallel": parallel_.PARALLEL,
           "compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs")}
AT_LEAST = {"batch_size": 1, "block_size": 1, "eval_interval": 1, "eval_iters": 1, "log_interval": 1,
            "max_iters": 0, "total_batch_tokens": 1, "gradient_accumulation_steps": 0, "hess_interval": 1,
            "warmup_iters": 0, "learning_rate": 0.0, "min_lr": 0.0, "grad_clip": 0.0, "epochs": 0.0,
            "profile_steps": 0, "lr_decay_iters": 0, "poly_power": 0.0, "wsd_decay_frac": 0.0,
            "warmup_frac": (0.0, 1.0), "weight_decay": 0.0, "sophia_rho": 0.0, "muon_lr": 0.0, "peak_flops": 0.0,
            "seed": 0, "beta1": (0.0, 1.0), "beta2": (0.0, 1.0), "muon_momentum": (0.0, 1.0)}  # (lo, hi): lo <= v < hi


# ---- the run: the settings, then the facts of the data and of the checkpoint -----------------------------------
def resolve(cfg):
    """configure()'s dict -> the run, read as run.<key>. Lowest first: the defaults above -> the preset -> --key=value
    -> the data's meta.json -> the init/resume checkpoint's architecture. The last two are facts, not preferences: a
    setting that contradicts them is an error naming both sides. Also picks the device, precision and kernels."""
    check_values(cfg, CHOICES, AT_LEAST)
    given = {k for k in cfg if cfg[k] != DEFAULTS.get(k)}  # set by a preset or a flag
    run = SimpleNamespace(**cfg, config=dict(cfg), ckpt=None, ckpt_path=None)
    kernels.set_backend(run.kernels_backend)
    run.world, run.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    run.ddp, run.master = run.world > 1, run.rank == 0
    run.device = pick_device(run.device, int(os.environ.get("LOCAL_RANK", "0")))
    run.amp_dtype = pick_dtype(run.dtype, run.device, allowed=("float32", "bfloat16"))
    run.autocast = autocast(run.device, run.amp_dtype)
    if not os.path.isdir(run.data_dir):  # a fresh clone: the quick start's data, from assets/
        import prepare_fineweb
        prepare_fineweb.ensure_sample(run.data_dir)
    meta = read_meta(run.data_dir)
    data_vocab = meta.get("n_vocab", meta["vocab_size"])  # the tokenizer's; an SFT header may add a pad slot
    for key, want in (("tokenizer", meta["tokenizer"]), ("vocab_size", data_vocab)):
        if key in given and cfg[key] != want:
            raise ConfigError(f"{key}={cfg[key]!r}, but {run.data_dir}/meta.json says its shards have {key} "
                              f"{want!r}: drop the setting (the data's is used) or point data_dir elsewhere")
    run.tokenizer, run.model = meta["tokenizer"], {**{k: cfg[k] for k in MODEL_KEYS}, "vocab_size": data_vocab}
    run.tokenizer_sha256 = check_tokenizer(run.data_dir, meta)  # what the run depends on, by content
    with open(os.path.join(run.data_dir, "meta.json"), "rb") as f:  # the data's identity: its shards, their counts
        run.data_sha256 = hashlib.sha256(f.read()).hexdigest()
    if run.init_from != "scratch":
        source = run.out_dir if run.init_from == "resume" else run.init_from
        run.ckpt_path = source if checkpoint.is_hf_folder(source) else checkpoint.find(source)
        run.ckpt = checkpoint.load(run.ckpt_path)
        adopt_architecture(run, run.ckpt["config"], given)
    run.__dict__.update(run.model)
    run.train_windows = check_headers(run.data_dir, meta, run.block_size)
    check_model_fits_data(run, meta, GPTConfig(**run.model))
    if run.init_from != "resume" and not run.overwrite and run.master and any(
            os.path.exists(os.path.join(run.out_dir, f)) for f in ("ckpt.pt", "best.pt", "metrics.jsonl")):
        raise ConfigError(f"{run.out_dir} already holds a run: continue it with --init_from=resume, or choose "
                          f"another --out_dir (or pass --overwrite=True to replace it)")
    resolve_batch(run)
    run.config.update(run.model, tokenizer=run.tokenizer, tokenizer_sha256=run.tokenizer_sha256,
                      data_sha256=run.data_sha256, max_iters=run.max_iters, warmup_iters=run.warmup_iters,
                      **({"chat_format": run.chat_format} if hasattr(run, "chat_format") else {}))
    return run


def adopt_architecture(run, saved, given):
    """A resumed (or fine-tuned) run keeps its checkpoint's architecture and tokenizer: a flag or preset that says
    otherwise is named, not silently ignored. `given`: the keys set away from their defaults."""
    keys = MODEL_KEYS + (["seed"] if run.init_from == "resume" else [])
    differ = [f"{k}={run.config[k]!r} (checkpoint: {saved[k]!r})" for k in keys if k in given and k in saved
              and saved[k] != run.config[k] and not (k == "head_dim" and run.config[k] == 0)]
    if differ:
        raise ValueError(f"{run.ckpt_path} was trained with another setup than this run asks for: "
                         f"{', '.join(differ)}. Drop those overrides, or start a fresh run in another out_dir")
    if run.init_from == "resume" and saved.get("optimizer", run.optimizer) != run.optimizer:
        raise ValueError(f"optimizer={run.optimizer!r}, but {run.ckpt_path} was trained with {saved['optimizer']!r}, "
                         f"whose state cannot drive another optimizer: resume with --optimizer={saved['optimizer']}, "
                         f"or start a new run from its weights (--init_from={run.ckpt_path}, another out_dir)")
    if saved.get("tokenizer") and saved["tokenizer"] != run.tokenizer:
        raise ValueError(f"tokenizer mismatch: the checkpoint {run.ckpt_path} was trained with "
                         f"'{saved['tokenizer']}' but {run.data_dir} was tokenized with '{run.tokenizer}'")
    check_same(run.tokenizer, saved.get("tokenizer_sha256"), run.ckpt_path, run.tokenizer_sha256)
    if run.init_from == "resume" and saved.get("data_sha256", run.data_sha256) != run.data_sha256:
        raise ValueError(f"{run.data_dir}/meta.json is not the data {run.ckpt_path} was trained on (meta.json "
                         f"sha256 {saved['data_sha256'][:12]}... then, {run.data_sha256[:12]}... now: prepared "
                         f"again, or another folder): its saved data position means nothing here; resume on that "
                         f"data, or start from the weights with --init_from={run.ckpt_path} in another out_dir")
    run.model = {k: saved[k] for k in MODEL_KEYS if k in saved}


def check_tokenizer(data_dir, meta):
    """The tokenizer meta.json names must load now (not at the end of training) and still be the one that made
    the shards (its content hash, when meta.json records one). Returns the hash, which the checkpoint keeps."""
    path = os.path.join(data_dir, "meta.json")
    try:
        now = content_hash(meta["tokenizer"])
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{path} names tokenizer '{meta['tokenizer']}', which cannot be loaded: {e}") from None
    check_same(meta["tokenizer"], meta.get("tokenizer_sha256"), path, now)
    return now


def check_model_fits_data(run, meta, model_cfg):
    """SFT data (meta kind 'sft': a chat format, maybe conversations padded to one window each) fits the model
    that will train on it; any data's token ids fit the model's vocabulary rows."""
    if meta.get("kind") == "sft":
        from chat_format import ChatFormat
        from tokenizer import get_encoding
        if getattr(run, "chat_format", "") and run.chat_format != meta["format"]:
            raise ValueError(f"chat_format='{run.chat_format}' but {run.data_dir} was rendered as "
                             f"'{meta['format']}': prepare the data again or drop the override")
        run.chat_format = meta["format"]
        ChatFormat(meta["format"], get_encoding(meta["tokenizer"])).check_model(
            model_cfg.vocab_size, model_cfg.padded_vocab_size, where=f"checkpoint {run.init_from}")
        if meta.get("layout") == "pad" and meta["block_size"] != run.block_size:
            raise ValueError(f"{run.data_dir} pads conversations to {meta['block_size']} tokens but the model's "
                             f"context is {run.block_size}: prepare again with --block_size {run.block_size}")
    if meta["vocab_size"] > model_cfg.padded_vocab_size:
        raise ValueError(f"{run.data_dir} uses ids up to {meta['vocab_size'] - 1}, beyond the model's "
                         f"{model_cfg.padded_vocab_size} vocabulary rows")


def resolve_batch(run):
    """The batch arithmetic, the run's length and where its data stands (the loop reads these)."""
    if run.compile_mode == "reduce-overhead" and run.ddp:  # CUDA graphs cannot hold DDP's all-reduce hooks
        raise ConfigError("compile_mode='reduce-overhead' (CUDA graphs) does not work under DDP here: use "
                          "'default' or 'max-autotune-no-cudagraphs' with torchrun")
    graphs = run.compile and run.compile_mode == "reduce-overhead" and run.device.type == "cuda"
    run.new_graph_step = torch.compiler.cudagraph_mark_step_begin if graphs else (lambda: None)
    run.rows_per_micro = run.batch_size * run.world  # tokens per step = batch_size * block_size * world * accum
    per_micro = run.rows_per_micro * run.block_size
    run.grad_accum = run.gradient_accumulation_steps or max(1, run.total_batch_tokens // per_micro)
    if not run.gradient_accumulation_steps and run.grad_accum * per_micro != run.total_batch_tokens:
        raise ConfigError(f"total_batch_tokens={run.total_batch_tokens} is not a multiple of batch_size * "
                          f"block_size * world_size = {per_micro}; adjust one of them")
    run.tokens_per_step = run.grad_accum * per_micro
    if run.compile and run.compile_mode == "reduce-overhead" and run.grad_accum > 1:  # else silently wrong
        raise ConfigError(f"compile_mode='reduce-overhead' (CUDA graphs) with gradient accumulation (grad_accum="
                          f"{run.grad_accum}): PyTorch's CUDA graph trees hand a replay's gradient buffers to .grad, "
                          f"and the next micro-batch's replay overwrites them instead of adding to them "
                          f"(pytorch/pytorch#169545). Use one micro-batch a step (total_batch_tokens = batch_size x "
                          f"block_size x world_size) or compile_mode='default'")
    if run.epochs > 0:
        run.max_iters = max(1, int(run.epochs * run.train_windows * run.block_size / run.tokens_per_step))
    if run.max_iters < 1:
        raise ConfigError(f"max_iters={run.max_iters}: must be >= 1 (or set epochs > 0)")
    if run.profile_steps >= run.max_iters:
        raise ConfigError(f"profile_steps={run.profile_steps} must be < max_iters={run.max_iters}: the profile "
                          f"records the run's last steps, after compilation and warm-up")
    if run.warmup_frac > 0:
        run.warmup_iters = int(run.warmup_frac * run.max_iters)
    run.start_step, run.data_offset, run.resumed, run.ckpt_best_val = 0, 0, run.init_from == "resume", float("inf")
    if run.resumed:  # continue at the saved sample, also under another batch size: no window twice or skipped
        if "optimizer" not in run.ckpt:
            raise ConfigError(f"{run.ckpt_path} holds weights only (a best.pt?): start a run from it with "
                              f"--init_from={run.ckpt_path} instead of resuming")
        run.start_step, run.ckpt_best_val = run.ckpt["step"], run.ckpt["best_val_loss"]
        if run.start_step > run.max_iters:  # the loop ends at step == max_iters: it would never come
            raise ConfigError(f"max_iters={run.max_iters}, but {run.ckpt_path} is already at step {run.start_step}: "
                              f"nothing is left to train; resume with a larger max_iters (or the run's own)")
        run.data_offset = run.ckpt["data"]["next_sample"] - first_sample(run, run.start_step)  # first_sample^-1


def first_sample(run, step, micro=0):
    """The index of the first window of a micro-step, counted over all ranks: the run's data order is this one
    formula, so a resumed run (data_offset) and Sophia's estimator (the step's first micro-batch) read the same
    windows as an uninterrupted run. checkpoint 'next_sample' is first_sample(run, step) at the saved step."""
    return run.data_offset + (step * run.grad_accum + micro) * run.rows_per_micro


# ----------------------------------------------------------------------------------------------------------------
def lr_factor(step, run):
    """The learning-rate multiplier for optimizer step `step` (0-based): each param group's lr is its own base_lr
    times this, so optimizers whose groups have different lrs (Muon: matrices vs the rest) share one schedule."""
    lo, warm = run.min_lr / run.learning_rate if run.learning_rate else 0.0, run.warmup_iters  # floor, as a fraction
    if step < warm:
        return (step + 1) / (warm + 1)  # linear warmup: large early steps on random weights diverge
    if run.lr_schedule == "constant":
        return 1.0
    decay_end = run.lr_decay_iters or run.max_iters  # the schedule may end before the run (then it stays at lo)
    if run.lr_schedule == "wsd":
        decay_start = max(warm, int(decay_end * (1 - run.wsd_decay_frac)))
        return 1.0 + (lo - 1.0) * min(1.0, max(0, step - decay_start) / max(1, decay_end - decay_start))
    progress = min(1.0, (step - warm) / max(1, decay_end - warm))
    if run.lr_schedule == "cosine":
        return lo + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - lo)
    return lo + (1.0 - lo) * (1.0 - progress) ** run.poly_power  # 'poly'


def make_optimizer(model, run, estimator=None):
    """The run's optimizer, weight decay by model.weight_decayed (the matrices, not the gains or the embedding).
    estimator: Sophia's curvature sample (hessian_estimator below); the optimizer calls it itself when due."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if weight_decayed(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (run.beta1, run.beta2)  # momentum and second-moment (or Hessian EMA) decay
    if run.optimizer == "sophia":
        from kernels.sophia import SophiaG
        opt = SophiaG(groups, lr=run.learning_rate, betas=betas, rho=run.sophia_rho,
                      hess_interval=run.hess_interval, estimator=estimator)
    elif run.optimizer == "muon":
        from kernels.muon import Muon
        opt = Muon(model, lr=run.muon_lr, adamw_lr=run.learning_rate, momentum=run.muon_momentum, betas=betas,
                   weight_decay=run.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=run.learning_rate, betas=betas, fused=run.device.type == "cuda")
    for group in opt.param_groups:  # the schedule multiplies this; set once, here
        group["base_lr"] = group["lr"]
    return opt


def phase(name):
    """Marks a part of the step for the profiler (--profile_steps, bench/step_profile.py); nearly free otherwise."""
    return torch.profiler.record_function("phase:" + name)


def hessian_estimator(model, raw_model, data, run):
    """Sophia's curvature sample (Gauss-Newton-Bartlett): the gradient of the loss on labels *sampled from the
    model's own softmax*, squared, estimates the Gauss-Newton diagonal. One micro-batch per process (the step's
    first), so it costs 1 / (hess_interval * grad_accum) of the training compute; under DDP its backward
    averages the ranks like an ordinary one. Returns the number of tokens that gradient averaged over: SophiaG's
    bs, which makes its scale right whatever grad_accum is. The labels depend only on (seed, step, rank)."""
    from kernels.sophia import sampled_label_loss

    def estimate(step):
        with phase("sophia_refresh"):
            first = first_sample(run, step)
            x, y, starts = data.batch(first + run.rank * run.batch_size, run.batch_size, run.device, run.doc_mask)
            seed = (run.seed * 1_000_003 + step) * run.world + run.rank
            label_gen = torch.Generator(device=run.device).manual_seed(seed)
            with run.autocast:
                logits, _ = model(x, doc_starts=starts)
            sampled_label_loss(logits, loss_mask=y != -1, generator=label_gen).backward()  # SFT: trained tokens
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), run.grad_clip or float("inf"))
            all_y = data.batch(first, run.rows_per_micro, torch.device("cpu"))[1]  # every rank's rows, on the host
            return int((all_y != -1).sum())
    return estimate


# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, data, run):
    """Mean loss over the first eval_iters x batch_size windows of the val split: the same ones every time and
    whatever the number of processes (rank r takes every world-th batch), so 1 or N GPUs report comparable numbers."""
    model.eval()
    total, n_windows = torch.zeros(2, device=run.device), run.eval_iters * run.batch_size
    turns = -(-run.eval_iters // run.world)  # every rank runs as many forwards (FSDP's gathers are collective)
    for turn in range(turns):
        first = (turn * run.world + run.rank) * run.batch_size
        counts = first < n_windows  # a rank past the end repeats the first batch and adds nothing
        first = first if counts else 0
        x, y, starts = data.batch(first, min(run.batch_size, n_windows - first), run.device, run.doc_mask)
        with run.autocast:
            _, loss = model(x, y, doc_starts=starts)
        n = (y != -1).sum() * counts  # SFT: only trained targets count
        total += torch.stack([loss.float() * n, n.float()])
    if run.ddp:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def bytes_per_token(data, run):
    """For bits per byte = nats/token / ln 2 / (bytes per token of exactly the validation targets), which compares
    models with different tokenizers fairly. None where the tokenizer cannot be loaded (offline)."""
    try:
        from tokenizer import get_encoding
        enc = get_encoding(run.tokenizer)
        ys = data.batch(0, run.eval_iters * run.batch_size, torch.device("cpu"))[1].flatten().tolist()
        ids = [t for t in ys if 0 <= t < enc.n_vocab]
        return sum(len(enc.decode_single_token_bytes(t)) for t in ids) / max(1, len(ids))  # UTF-8 bytes
    except Exception as e:  # offline without the tokenizer's file: nats only, training goes on
        print(f"(bits per byte unavailable: {e})")
        return None


def check_finite(last_good, step, first_bad, weights=None):
    """The NaN guard, acted on where the host looks anyway (log points) and before every save: first_bad is the
    first step whose loss or gradient norm was not finite (-1: none), kept on the device; with weights (the state_dict about to be saved),
    they are checked too (a finite gradient can still overflow them). Nothing non-finite is ever saved, so
    the checkpoint named here is a good one."""
    bad = int(first_bad)
    if bad >= 0 or (weights is not None and not all(t.isfinite().all() for t in weights.values()
                                                     if t.is_floating_point())):
        what = f"loss or gradient norm at step {bad + 1}" if bad >= 0 else f"weights at step {step}"
        where = f"the last good checkpoint is {last_good[0]} (step {last_good[1]}, finite)" \
            if last_good else "there is no checkpoint of this run yet"
        raise FloatingPointError(f"non-finite {what}: stopping without saving; {where}. Lower learning_rate, "
                                 f"raise warmup_iters, or check the data.")


# ---- the run folder: one run at a time, its settings, its log and its loss curve ------------------------------------
def lock_run_folder(out_dir):
    """An exclusive lock on out_dir while the returned file stays open: a second run there (it would interleave
    metrics.jsonl and fight over ckpt.pt) gets a clear error instead."""
    lock = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        import fcntl  # POSIX
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no lock
        pass
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise ValueError(f"{out_dir} is in use by another run (pid {holder}): wait for it to end, or choose "
                         f"another out_dir") from None
    lock.truncate(0), lock.write(str(os.getpid())), lock.flush()
    return lock


def open_run_folder(run):
    """Lock out_dir, write run_config.json (the resolved settings) and ready metrics.jsonl: a resumed run keeps
    the lines up to its step; a line torn by a kill mid-write (the last) is dropped with a notice, any other bad
    line is an error naming it. Resuming must not depend on a log, nor silently lose one. Returns the lock."""
    os.makedirs(run.out_dir, exist_ok=True)
    lock = lock_run_folder(run.out_dir)
    checkpoint.remove_stale_temporaries(run.out_dir)  # a killed save's leftovers: the lock says they are dead
    path, kept = os.path.join(run.out_dir, "metrics.jsonl"), []
    with open(path, "rb") if run.resumed and os.path.exists(path) else nullcontext(None) as f:
        lines = f.read().splitlines() if f else []
    for i, line in enumerate(lines):
        try:  # bytes, so a line that is not UTF-8 is named like any other bad line
            line = line.decode("utf-8")
            kept += [line + "\n"] if json.loads(line)["step"] <= run.start_step else []
        except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, or no step: not train.py's line
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1} is not valid JSON (UTF-8, with a step): fix or delete that "
                                 f"line") from None
            print(f"{path}: dropping the torn last line (line {i + 1}), cut off when the run was killed")
    with open(path, "w") as f:
        f.writelines(kept)
    with open(os.path.join(run.out_dir, "run_config.json"), "w") as f:
        json.dump(run.config, f, indent=1)
    return lock


def plot_losses(out_dir):
    """loss.png beside metrics.jsonl: the train loss per logged step and the validation points. Drawn in a
    `finally` at the end of every run, so it must never raise: an error here (a full disk, say) would replace
    the one that ended the run. It says what went wrong instead."""
    try:
        draw_losses(out_dir)
    except Exception as e:
        print(f"(loss.png not written: {type(e).__name__}: {e})")


def draw_losses(out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path, errors="replace") if line.endswith("}\n")] \
        if os.path.exists(path) else []
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style, label in (("loss", "-", "train"), ("val_loss", "o-", "val")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, lw=1, ms=3)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=os.path.basename(os.path.abspath(out_dir)))
    ax.grid(alpha=0.3), ax.legend(), fig.tight_layout()
    try:  # through checkpoint.save: a full disk leaves the old loss.png (or none), never a 0-byte one
        checkpoint.save(os.path.join(out_dir, "loss.png"), fig,
                        writer=lambda f, tmp: f.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
def train(cfg, model=None):
    """Resolve, allocate (model, optimizer, data), then the loop. Returns the trained (uncompiled) model; after
    SIGINT / SIGTERM, once saved, exits the process with 128 + signal (130 / 143) so a scheduler sees it.
    model: a module built by the caller instead of GPT(run's architecture) -- distill.py's LRC student. It must
    carry the same GPTConfig (it is checked) and GPT's contract: (logits, loss) = model(x, y, doc_starts=...)."""
    run = resolve(cfg)
    parallel_.check(run)
    parallel_.init(run)  # torchrun set RANK / WORLD_SIZE / LOCAL_RANK
    if run.device.type == "cuda":
        torch.cuda.set_device(run.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    lock = open_run_folder(run) if run.master else None  # one run per folder
    try:
        torch.manual_seed(run.seed)  # the same initial weights on every rank and in every rerun
        want = GPTConfig(**run.model)
        raw_model = model or GPT(want)  # checkpoints save this one: no compile/DDP prefixes
        if raw_model.config != want:
            raise ValueError(f"the model handed to train() is {raw_model.config}, the run asks for {run.model}")
        if run.ckpt is not None:
            checkpoint.load_weights(raw_model, run.ckpt, run.ckpt_path)
        # `model` is what runs (compiled, DDP-wrapped or FSDP-sharded); raw_model's names are what is saved
        model = parallel_.wrap(raw_model.to(run.device), run)
        rows = raw_model.config.padded_vocab_size
        train_data = TokenWindows(run.data_dir, "train", run.block_size, rows, run.seed, shuffle=True)
        val_data = TokenWindows(run.data_dir, "val", run.block_size, rows, run.seed, shuffle=False)
        optimizer = make_optimizer(raw_model, run, hessian_estimator(model, raw_model, train_data, run))
        if run.resumed:
            checkpoint.restore_training_state(run.ckpt, optimizer, run.device, load=lambda state: (
                parallel_.load_optimizer_state(raw_model, optimizer, state, run)))
        if run.master:
            print(f"{'resumed' if run.resumed else 'initialised'} from {run.ckpt_path} (step {run.ckpt['step']}); "
                  if run.ckpt else "", end="")
            print(f"{run.world} process(es) on {run.device}, micro-batch {run.batch_size} x {run.block_size}, "
                  f"grad_accum {run.grad_accum}: {run.tokens_per_step:,} tokens/step, {run.max_iters} steps; "
                  f"{raw_model.num_params():,} parameters, {raw_model.flops_per_token() / 1e9:.3f} GFLOP/token")
            if getattr(raw_model, "checkpoint_blocks", 0):  # recomputing a Block's forward costs about a third more
                share = raw_model.checkpoint_blocks / run.n_layer
                print(f"activation checkpointing: {raw_model.checkpoint_blocks} of {run.n_layer} blocks recompute their "
                      f"forward in the backward (about +{100 * share / 3:.0f}% compute)")
        run.ckpt = None  # the weights live in the model now: free the CPU copy
        stopped_by = loop(run, model, raw_model, optimizer, train_data, val_data)
        if dist.is_initialized():  # the ranks reach teardown together (rank 0 may still be saving)
            dist.barrier()
    finally:
        if run.master:
            plot_losses(run.out_dir)
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.close()
    if stopped_by:
        sys.exit(128 + stopped_by)
    if run.sample_prompt and run.master:  # the run ends by showing what it learned
        from generation import sample_text
        print("sample:", sample_text(raw_model, run.tokenizer, run.sample_prompt, seed=run.seed))
    return raw_model


def loop(run, model, raw_model, optimizer, train_data, val_data):
    """The flat loop of the module docstring. Returns the signal that stopped it (after saving), or None."""
    step, stopping, received = run.start_step, False, []
    handlers = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)  # see check_finite
    best_val, last_good = run.ckpt_best_val, (run.ckpt_path, step) if run.resumed else None  # a finite checkpoint
    bpt = bytes_per_token(val_data, run) if run.master else None
    peak = (run.peak_flops or device_peak_flops(run.device)) * run.world
    flops_per_token = raw_model.flops_per_token()
    t0, timed = time.time(), 0  # wall-clock since the last log point, and the steps it covers
    profiler = last_steps_profiler(run) if run.profile_steps else None  # --profile_steps
    try:
        while True:
            if profiler and run.master:
                profiler.at_step(step)
            last_step = step == run.max_iters or stopping  # the end, or a signal: evaluate, save, leave
            # ---- evaluate + checkpoint (a resumed run's first step was evaluated before it was saved) ----
            if (step % run.eval_interval == 0 or last_step) and not (step == run.start_step and run.resumed):
                check_finite(last_good, step, first_bad)
                val = evaluate(parallel_.for_evaluation(model), val_data, run)
                bpb = val / math.log(2) / bpt if bpt else float("nan")
                log(run, f"step {step:6d} | val loss {val:.4f} | val bpb {bpb:.4f}",
                    {"step": step, "val_loss": val, "val_bpb": bpb, "tokens": step * run.tokens_per_step})
                if run.save_checkpoints and step > run.start_step:
                    best_val, last_good = save(run, raw_model, optimizer, step, val, best_val, first_bad, last_good)
                t0, timed = time.time(), 0  # evaluation and saving are not part of the next steps' time
            if last_step:
                break
            # ---- one optimizer step: nothing here waits for the device ----
            factor = lr_factor(step, run)  # the schedule is data: no recompile, no per-optimizer code
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            loss_sum = torch.zeros((), device=run.device)  # summed on the device, read at log points only
            for micro in range(run.grad_accum):
                run.new_graph_step()  # reduce-overhead: the next CUDA-graph replay may reuse the last outputs
                with phase("data"):
                    first = first_sample(run, step, micro) + run.rank * run.batch_size
                    x, y, starts = train_data.batch(first, run.batch_size, run.device, run.doc_mask)
                # gradients are averaged across processes during the backward of the last micro-step only
                with phase("forward_backward"), parallel_.accumulating(model, micro == run.grad_accum - 1):
                    with run.autocast:
                        _, loss = model(x, y, doc_starts=starts)
                    (loss / run.grad_accum).backward()
                    loss_sum += loss.detach()  # detached: the log must not keep the graph alive
            with phase("clip"):
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), run.grad_clip or float("inf"))
                grad_norm = parallel_.plain(grad_norm)  # FSDP: a DTensor
                ok = torch.isfinite(grad_norm) & torch.isfinite(loss_sum)  # on the device: no sync here
                first_bad = torch.where(ok | (first_bad >= 0), first_bad, step)
            with phase("optimizer"):
                optimizer.step()  # Sophia refreshes its Hessian inside, when due (kernels/sophia.py)
                optimizer.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes, not adds
            step, timed = step + 1, timed + 1
            if step % run.log_interval == 0 or step == 1 or step == run.max_iters:  # the host looks, and syncs
                with phase("log"):
                    if run.ddp:
                        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                    check_finite(last_good, step, first_bad)
                    dt, t0, timed = (time.time() - t0) / timed, time.time(), 0
                    log_step(run, step, optimizer, loss_sum.item() / run.grad_accum, grad_norm.item(), factor, dt,
                             peak, flops_per_token)
                if run.ddp:  # every rank must agree to stop, or the others hang in the next all-reduce
                    flag = torch.tensor(float(bool(received)), device=run.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stopping = flag.item() > 0
            stopping = stopping or (bool(received) and not run.ddp)  # one process: stop at once
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if profiler:
            profiler.at_step(run.max_iters)  # the window ends with the run (also when it ends early)
    if stopping:
        signum = received[0] if received else signal.SIGTERM  # under DDP another rank may have got it
        log(run, f"stopped by signal {signum} at step {step}; " + (f"checkpoint written to {run.out_dir}/ckpt.pt; "
            f"continue with --init_from=resume" if run.save_checkpoints else "no checkpoint (save_checkpoints=False)"))
        return int(signum)
    return None


def last_steps_profiler(run):
    """torch.profiler over the run's last profile_steps steps, once everything is compiled and warm: the table of
    where each phase of the step spends host and GPU time (bench/step_profile.py)."""
    from bench.step_profile import LoopProfiler
    return LoopProfiler(run.max_iters - run.profile_steps, run.profile_steps, run.out_dir, run.device)


def save(run, raw_model, optimizer, step, val, best_val, first_bad, last_good):
    """The checkpoint at an evaluation: every rank hands over its part (FSDP gathers the whole state to rank 0),
    rank 0 checks it is finite and writes ckpt.pt, and best.pt when val is the best so far. Returns the new
    (best_val, last_good): the checkpoint a later NaN guard names."""
    weights, optimizer_state = parallel_.full_state(raw_model, optimizer, run)  # a collective under FSDP
    if not run.master:
        return best_val, last_good
    check_finite(last_good, step, first_bad, weights)  # nothing non-finite is ever written
    best_val = min(best_val, val)
    path = checkpoint.save_run(run.out_dir, weights, optimizer_state, step, best_val, run.config,
                               first_sample(run, step), run.device, best=val <= best_val)
    return best_val, (path, step)


def log(run, text, row=None):
    """Rank 0 prints, and appends `row` (+ the time) to metrics.jsonl."""
    if run.master:
        print(text)
        if row is not None:
            with open(os.path.join(run.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({**row, "time": time.time()}) + "\n")


def log_step(run, step, optimizer, loss, grad_norm, factor, dt, peak, flops_per_token):
    """One training log line. dt: seconds per step over the steps since the last log point. MFU = achieved
    FLOP/s (6N + attention per token, model.flops_per_token) / the GPUs' dense bf16 peak."""
    tok_s = run.tokens_per_step / dt  # all ranks' tokens: the run's throughput, not one GPU's
    mfu = flops_per_token * tok_s / peak if peak else float("nan")
    mem = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else 0.0  # peak
    extra = getattr(optimizer, "log_stats", dict)() if run.master else {}  # e.g. Sophia's win rate (syncs)
    gpu = f" | MFU {mfu * 100:5.1f}% | mem {mem:.1f} GiB" if run.device.type == "cuda" else ""
    lr = run.learning_rate * factor
    log(run, f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | {dt * 1000:7.1f} ms | "
        f"{tok_s:,.0f} tok/s{gpu}" + "".join(f" | {k.replace('_', ' ')} {v:.3f}" for k, v in extra.items()),
        {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms": dt * 1000, "tok_s": tok_s, "mfu": mfu,
         "mem_gib": mem, "tokens": step * run.tokens_per_step, **extra})


def leave():
    """The end of a script's process. A torchrun process leaves without the interpreter's finalizers: everything is
    saved and closed by now, but gloo's worker threads can still be dropping work objects while Python shuts down,
    and that aborts the process ('terminate called without an active exception', pytorch/pytorch#179291), so a
    finished run would report failure. os._exit skips that teardown, once the streams are flushed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)


def main(defaults, argv, prepare=None):
    """The command line of train.py and sft.py: a named error is one line and exit 1, never a traceback."""
    def start(argv):
        cfg = configure(defaults, argv)
        train(prepare(cfg) if prepare else cfg)
    run_script(start, argv)
    leave()


if __name__ == "__main__":
    main(DEFAULTS, sys.argv[1:])
