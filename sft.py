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
fraction of the run, no weight decay. Before handing over to train(), we check what train.py cannot know: the
shards were rendered with the checkpoint's tokenizer, the model's (padded) vocabulary holds the format's special
tokens, and with --layout pad the windows match the model's context. The format is stored in the checkpoint's
config as `chat_format`, so chat.py picks it up by itself.
"""
import json
import os
import sys

import torch

from configurator import configure, script_defaults
from train import DEFAULTS as TRAIN_DEFAULTS
from train import train

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


def checkpoint_config(cfg):
    """The config stored with the weights we start from (the architecture and tokenizer come from it)."""
    src = os.path.join(cfg["out_dir"], "ckpt.pt") if cfg["init_from"] == "resume" else cfg["init_from"]
    src = os.path.join(src, "ckpt.pt") if os.path.isdir(src) else src
    if cfg["init_from"] == "scratch":
        raise ValueError("sft.py fine-tunes a pretrained model: set init_from to a run folder or checkpoint file")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"init_from='{cfg['init_from']}': no checkpoint at {src}")
    # mmap: read the small config without pulling the weights and optimizer state into memory
    ckpt = torch.load(src, map_location="cpu", mmap=True, weights_only=False)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{src} is not a nanoforge checkpoint (no 'model' and 'config')")
    return ckpt["config"]


def prepare(cfg):
    """Check data against checkpoint and fill in what train() needs. Returns cfg, ready for train(cfg)."""
    from chat_format import ChatFormat, get_encoding
    from model import GPTConfig
    meta_path = os.path.join(cfg["data_dir"], "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: make the SFT shards with prepare_sft.py first")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("kind") != "sft":
        raise ValueError(f"{cfg['data_dir']} holds pretraining shards (no masks): use prepare_sft.py's output")
    if cfg["chat_format"] and cfg["chat_format"] != meta["format"]:
        raise ValueError(f"chat_format='{cfg['chat_format']}' but {cfg['data_dir']} was rendered as "
                         f"'{meta['format']}': prepare the data again or drop the override")
    cfg["chat_format"] = meta["format"]

    ckpt_cfg = checkpoint_config(cfg)
    if ckpt_cfg.get("tokenizer") != meta["tokenizer"]:
        raise ValueError(f"tokenizer mismatch: the checkpoint was trained with '{ckpt_cfg.get('tokenizer')}' but "
                         f"{cfg['data_dir']} was tokenized with '{meta['tokenizer']}'")
    cfg["tokenizer"] = meta["tokenizer"]
    model_cfg = GPTConfig.from_dict(ckpt_cfg)
    fmt = ChatFormat(meta["format"], get_encoding(meta["tokenizer"]))
    fmt.check_model(model_cfg.vocab_size, model_cfg.padded_vocab_size, where=f"checkpoint {cfg['init_from']}")
    if meta["vocab_size"] > model_cfg.padded_vocab_size:  # the pad slot of --layout pad
        raise ValueError(f"{cfg['data_dir']} uses ids up to {meta['vocab_size'] - 1}, beyond the model's "
                         f"{model_cfg.padded_vocab_size} vocabulary rows")
    if meta["layout"] == "pad" and meta["block_size"] != model_cfg.block_size:
        raise ValueError(f"{cfg['data_dir']} pads conversations to {meta['block_size']} tokens but the model's "
                         f"context is {model_cfg.block_size}: prepare again with --block_size "
                         f"{model_cfg.block_size}")

    return cfg


if __name__ == "__main__":
    try:
        train(prepare(configure(DEFAULTS, sys.argv[1:])))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
