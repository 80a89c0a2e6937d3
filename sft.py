"""
sft.py — instruction tuning: train.py's loop, started from a pretrained checkpoint, on prepare_sft.py's shards.

    python prepare_sft.py --format alpaca --out_dir data/sft_alpaca_gpt2 \\
        --source dolly_local --source alpaca_gpt4_local --source gsm8k_local
    python sft.py config/sft_alpaca.py --init_from=out/gpt2_124m
    python chat.py out/sft_alpaca

Nothing here is a second training loop. The SFT shards carry a mask (1 on assistant tokens and their end token),
train.py's loader turns mask 0 into target -1, and the cross entropy ignores -1: the loss is

    L = - sum_t mask_t log p(x_t | x_<t) / sum_t mask_t          (only what the assistant says is learned)

What differs from pretraining is only the defaults below: a small learning rate (the weights are already good;
a pretraining-sized step would wash out what they know), a few epochs over a small set, a warmup given as a
fraction of the run, no weight decay. The checks are train.py's own resolution (configurator.resolve), which
already knows SFT data by its meta.json: the shards were rendered with the checkpoint's tokenizer, the model's
(padded) vocabulary holds the format's special tokens, and with --layout pad the windows match the model's
context. Only two rules are SFT's alone (prepare() below). The format is stored in the checkpoint's config as
`chat_format`, so chat.py picks it up by itself. Exit codes as train.py's (130 / 143 after a signal, saved).
"""
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) or before the loop: leave at once, quietly.
    # os._exit, not sys.exit: a SystemExit raised inside a half-done import (numpy's, torch's) can end in a
    # traceback from the half-made module on the way out; nothing is open or unsaved yet
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

from configurator import ConfigError, read_meta, script_defaults
from train import DEFAULTS as TRAIN_DEFAULTS
from train import main

# ----------------------------------------------------------------------------------------------------------------
# SFT defaults (on top of train.py's; config/sft_*.py and --key=value override them). The model's architecture is
# not set here: it comes with the checkpoint in init_from.
init_from = "out/gpt2_124m"         # the pretrained run folder (or .pt file); 'resume' continues this SFT run
out_dir = "out/sft"
data_dir = "data/sft_alpaca_gpt2"   # prepare_sft.py's output (shards + meta.json)
chat_format = ""                    # '' = the format the data was rendered with (meta.json); stored in the ckpt
learning_rate = 5e-5
min_lr = 5e-6
lr_schedule = "cosine"
warmup_frac = 0.03                  # warmup over the first 3% of the steps
epochs = 3.0                        # max_iters = epochs over the training tokens
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
batch_size = 16
total_batch_tokens = 32768          # 16 x 1024 x 2: 32 sequences a step, ParchmentLM's SFT batch
eval_interval = 50
eval_iters = 10
log_interval = 5
# pack layout: conversations share windows. doc_mask = True keeps them apart (each attends only within itself,
# from prepare_sft.py's .docs.bin; exact for RoPE models). It runs attention through SDPA with an explicit mask
# (the memory-efficient kernel): correct on CPU and in the tests, its GPU speed not yet measured. Off by default.
doc_mask = False
DEFAULTS = {**TRAIN_DEFAULTS, **script_defaults(globals())}


def prepare(cfg):
    """The two rules only SFT has: it starts from a trained model, and its data carries masks. Returns cfg."""
    if cfg["init_from"] == "scratch":
        raise ConfigError("sft.py fine-tunes a pretrained model: set init_from to a run folder or checkpoint file")
    if not os.path.isfile(os.path.join(cfg["data_dir"], "meta.json")):
        raise FileNotFoundError(f"{cfg['data_dir']}/meta.json not found: make the SFT shards with prepare_sft.py")
    if read_meta(cfg["data_dir"]).get("kind") != "sft":
        raise ConfigError(f"{cfg['data_dir']} holds pretraining shards (no masks): use prepare_sft.py's output")
    return cfg


if __name__ == "__main__":
    main(DEFAULTS, sys.argv[1:], prepare)
