"""
export.py — a checkpoint's weights as `model.safetensors` + `config.json`, readable without nanoforge's code.

    python export.py out/gpt2_124m                      # writes out/gpt2_124m/export/
    python export.py out/gpt2_124m --dtype bfloat16 --out_dir /tmp/gpt2

safetensors stores plain named tensors (no pickle, so loading it runs no code) and refuses two names for one
storage: a tied head is therefore written once, as `wte.weight`, and config.json says `tie_embeddings: true`.
The vocabulary's padding rows are kept (chat special tokens live there); `vocab_size` in config.json is the
tokenizer's, `padded_vocab_size` the number of rows.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from model import GPT, GPTConfig, load_checkpoint


def export(ckpt_path, out_dir, dtype="float32"):
    from safetensors.torch import save_file
    model, run_config = load_checkpoint(ckpt_path)
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del tensors["lm_head.weight"]
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = {**asdict(model.config), "padded_vocab_size": model.config.padded_vocab_size,
              "tokenizer": run_config.get("tokenizer", "gpt2"), "dtype": dtype, "architecture": "nanoforge.GPT"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return out_dir


def load_exported(out_dir):
    """The inverse: a GPT from an export folder (what another tool would do with the two files)."""
    from safetensors.torch import load_file
    config = json.load(open(os.path.join(out_dir, "config.json")))
    model = GPT(GPTConfig.from_dict(config))
    tensors = load_file(os.path.join(out_dir, "model.safetensors"))
    if config["tie_embeddings"]:
        tensors["lm_head.weight"] = tensors["wte.weight"]
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a run folder (its ckpt.pt) or a .pt file")
    p.add_argument("--out_dir", default=None, help="default: <run folder>/export")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    run_dir = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt)
    try:
        print("wrote", export(args.ckpt, args.out_dir or os.path.join(run_dir, "export"), args.dtype))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
