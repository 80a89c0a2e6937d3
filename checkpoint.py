"""
checkpoint.py — the one place that finds, opens and writes checkpoints.

Every script that reads a trained model (train.py's resume and init_from, sft.py, chat.py, eval.py, export.py,
bench/sophia_study.py) goes through here, so every one of them gets the same three guarantees:

  * Nothing gets in through a checkpoint. A .pt file is a pickle, and unpickling can call any Python function
    the file names (os.system, say). We open it with torch.load(weights_only=True), whose unpickler only builds
    tensors and plain containers/numbers/strings: nanoforge's own checkpoints hold nothing else, and a file
    that names anything else is refused before that thing runs.
  * Every bad file is one clear line: missing, truncated, not a torch file at all, or a dict without the
    'model' and 'config' a nanoforge checkpoint has.
  * Nothing written is half-written. save() writes a temporary file with a name unique to this process, then
    renames it over the old one (a rename within a folder is atomic): a crash or a full disk mid-write leaves
    the previous checkpoint whole, and the partial temporary is removed.

Where a model comes from elsewhere, a Hugging Face folder (config.json + model.safetensors, or `hf:<folder>`)
is read by hf.py instead: safetensors holds tensors only, no code at all.

    run folder | ckpt.pt | best.pt  --find()--> file --load()--> {"model", "config", ...}  --build--> GPT
    hf:<folder> | exported folder  ---------------------- hf.load_hf_model() -------------------> GPT
"""
import errno
import os
import pickle

import torch

HF_PREFIX = "hf:"


# ---- where a checkpoint is ---------------------------------------------------------------------------------
def find(path):
    """A run folder means its ckpt.pt; a file means itself. FileNotFoundError naming what is missing."""
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "ckpt.pt")):
        raise FileNotFoundError(f"no checkpoint at {path}: it has a config.json, but a Hugging Face folder also needs "
                                f"{weights} (or, sharded, its index and shards: pass hf:{path})")
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        hint = ""
        if os.path.isfile(os.path.join(os.path.dirname(file), "best.pt")) and file.endswith("ckpt.pt"):
            hint = (f"; {os.path.dirname(file)}/best.pt exists: it holds the best weights only (no optimizer, no "
                    f"data position), so it can start a run (init_from=<that file>) but not resume one")
        raise FileNotFoundError(f"no checkpoint at {file}{hint}")
    return file


def is_hf_folder(path):
    """`hf:<folder>`, or a folder holding an exported model (config.json + model.safetensors) and no ckpt.pt."""
    if path.startswith(HF_PREFIX):
        return True
    return (os.path.isdir(path) and not os.path.exists(os.path.join(path, "ckpt.pt"))
            and all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.safetensors")))


# ---- opening one ---------------------------------------------------------------------------------------------
# What train.py writes, key by key: the type each must have, and whether a file without it is still a checkpoint
# (best.pt and exported students hold no optimizer state; files from before a key existed lack it).
SCHEMA = {"model": (dict, True), "config": (dict, True), "step": (int, False), "best_val_loss": ((int, float), False),
          "optimizer": (dict, False), "data": (dict, False), "rng": (dict, False)}
ARCH_KEYS = ("n_layer", "n_embd", "n_head", "vocab_size", "block_size")  # a config without these describes no model


def load(path, mmap=False):
    """The checkpoint dict of a run folder or .pt file, opened safely (see the top) and verified: the archive's
    checksums, the schema, finite weights. mmap=True maps the file instead of reading it (the config or step
    without pulling gigabytes into memory); the checksums and weights are then not read, so not verified."""
    if is_hf_folder(path):  # read by hf.py, handed back in a checkpoint's shape (train.py's init_from=hf:<folder>)
        model, config = load_model(path)
        return {"model": model.state_dict(), "config": config, "step": 0}
    file = find(path)
    if not mmap:
        verify_archive(file)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e)
        if "Unsupported global" in reason or "GLOBAL" in reason or "not an allowed global" in reason:
            found = next((line.strip() for line in reason.splitlines() if "global" in line.lower()), reason[:200])
            raise ValueError(f"{file} was refused: it asks to run Python code or build objects other than tensors "
                             f"and plain values ({found}); nanoforge's checkpoints never do, so this file was not "
                             f"written by train.py. Nothing in it was run.") from None
        raise ValueError(f"{file} is not a readable checkpoint (garbage or damaged: {reason[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated zip, empty file, not a torch file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{file} is not a readable checkpoint (truncated, or not written by torch.save: "
                         f"{first[:160]})") from None
    check_schema(ckpt, file, weights=not mmap)
    return ckpt


def verify_archive(file):
    """torch.save writes a zip archive holding a CRC-32 of every record (the pickle, each tensor's bytes), but
    torch.load never checks them: one flipped bit in a weight loads silently. zipfile checks every record
    against its CRC (one read of the file, ~1 GB/s), so a damaged file is named here, before it is trained on."""
    import zipfile
    try:
        with zipfile.ZipFile(file) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{file} is not a readable checkpoint (truncated, or not written by torch.save: "
                         f"{str(e)[:160] or type(e).__name__})") from None
    if bad is not None:
        raise ValueError(f"{file} is damaged: its record '{bad}' does not match the checksum torch.save wrote "
                         f"(a bit changed on disk or in a copy); use another checkpoint (best.pt, an earlier copy)")


def check_schema(ckpt, file, weights=True):
    """The keys and types train.py writes (SCHEMA), an architecture in the config, and (weights=True) finite
    floating-point weights: a file that fails is one line naming it and what is wrong, never a KeyError later.
    A non-finite weight means the run that wrote it had diverged, so it is never taken for a good checkpoint."""
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{file} is not a nanoforge checkpoint (it has no 'model' and 'config'; found {keys})")
    for key, (kind, _) in SCHEMA.items():
        if key in ckpt and not isinstance(ckpt[key], kind) or key == "step" and isinstance(ckpt.get(key), bool):
            raise ValueError(f"{file}: '{key}' is a {type(ckpt[key]).__name__} ({str(ckpt[key])[:40]!r}), not what "
                             f"train.py writes: the file was not written by nanoforge, or was edited")
    missing = [k for k in ARCH_KEYS if k not in ckpt["config"]]
    if missing:
        raise ValueError(f"{file}: its config lacks {', '.join(missing)}: it does not say what model the weights "
                         f"are (not a nanoforge checkpoint, or an edited one)")
    from model import GPTConfig
    GPTConfig.from_dict(ckpt["config"], where=file)  # every architecture value typed and in range
    not_tensor = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)][:3]
    if not_tensor or not ckpt["model"]:
        raise ValueError(f"{file}: its 'model' holds no weights" + (f" ({not_tensor} are not tensors)"
                                                                     if not_tensor else ""))
    if "optimizer" in ckpt and ("step" not in ckpt or not isinstance(ckpt.get("data", {}).get("next_sample"), int)):
        raise ValueError(f"{file}: it has optimizer state but no step or data position: it cannot be resumed")
    if weights:
        bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not v.isfinite().all()), None)
        if bad is not None:
            raise ValueError(f"{file}: weight '{bad}' holds NaN or inf: the run that wrote it had diverged, so it "
                             f"is not a good checkpoint; use an earlier one")


def load_weights(model, ckpt, file):
    """model.load_state_dict(ckpt['model']), with a mismatch (a tensor of another shape than the config says, a
    missing or extra name) named as the file's fault in one line rather than torch's page of names."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise ValueError(f"{file}: its weights do not fit the model its config describes ({detail})") from None


def load_model(path, device="cpu"):
    """(GPT in eval mode on `device`, the run's config dict) from a run folder, a .pt file, `hf:<folder>` or an
    exported Hugging Face folder. The config carries what the weights need around them: tokenizer, chat format."""
    if is_hf_folder(path):
        import hf  # the interop chapter: safetensors + config.json -> GPT
        model, config = hf.load_hf_model(path[len(HF_PREFIX):] if path.startswith(HF_PREFIX) else path, device)
        return model.eval(), config
    from model import GPT, GPTConfig
    ckpt = load(path)
    if "teacher_signature" in ckpt["model"]:  # distill.py's resumable state: projections, not a model
        student = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(find(path)))), "ckpt.pt")
        raise ValueError(f"{find(path)} is distill.py's training state (projections of a teacher), not a model; "
                         f"the distilled student is {student}")
    model = GPT(GPTConfig.from_dict(ckpt["config"], where=find(path)))
    load_weights(model, ckpt, find(path))
    return model.to(device).eval(), ckpt["config"]


# ---- writing one ---------------------------------------------------------------------------------------------
def save_run(out_dir, weights, optimizer_state, step, best_val, config, next_sample, device, best):
    """ckpt.pt: everything a resumed run needs to continue the same loss sequence (weights and optimizer state as
    one process's state_dict()s, whatever the parallelism: parallel.full_state; Sophia's Hessian too; step, the
    next data sample, RNG states, the resolved config); and when `best`, best.pt: the weights alone (what to
    fine-tune or chat with). Returns ckpt.pt's path."""
    payload = {"model": weights, "optimizer": optimizer_state, "step": step,
               "best_val_loss": best_val, "config": config, "data": {"next_sample": next_sample},
               "rng": {"cpu": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
    path = os.path.join(out_dir, "ckpt.pt")
    save(path, payload)
    if best:
        save(os.path.join(out_dir, "best.pt"), {k: payload[k] for k in ("model", "config", "step", "best_val_loss")})
    return path


def save(path, payload, writer=None):
    """writer(payload, tmp) (torch.save unless told) to `<path>.<pid>.tmp`, then an atomic rename over `path`. The
    temporary's name is unique to the process, so two writers never tear each other's file; on any failure it is
    removed and the old file stays."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        (writer or torch.save)(payload, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk_full(e):
            kept = f"the previous {os.path.basename(path)} is kept" if os.path.exists(path) else "nothing was kept"
            raise OSError(f"no space left writing {path} ({kept}, the partial file removed): free some disk "
                          f"space and resume") from None
        raise


def disk_full(e):
    """Whether an exception means the disk (or quota) is full: ENOSPC / EDQUOT, or one of the bare C++ stream
    errors torch.save's zip writer raises instead ('unexpected pos' is its check that a write went through)."""
    cpp = ("iostream error", "file write failed", "unexpected pos")
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in cpp))


def remove_stale_temporaries(folder):
    """save()'s `<name>.<pid>.tmp` files that a killed process left behind (SIGKILL allows no cleanup): each is
    as big as a checkpoint. Called by a run that holds the folder's lock, so no live writer owns one."""
    import glob
    import re
    for tmp in glob.glob(os.path.join(folder, "*.tmp")):
        if re.search(r"\.\d+\.tmp$", tmp) and os.path.isfile(tmp):
            os.remove(tmp)
            print(f"removed {tmp}, left by a save that was killed")


def check_writable(path):
    """Fail now, naming `path`, if a file cannot be created beside it (a read-only run folder, a missing one):
    for work whose result would otherwise be computed and then lost at the write."""
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {path}: {folder} is not writable ({e.strerror}); choose another place "
                         f"for it") from None


def save_json(path, obj, indent=None):
    """save() for a JSON file (eval.json, a tokenizer file): written whole or not at all."""
    import json

    def write(payload, tmp):
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=indent)
    save(path, obj, writer=write)


def restore_training_state(ckpt, optimizer, device, load=None):
    """What a resumed run needs besides the weights: the optimizer's state and the RNG states, so the next steps
    are the ones the uninterrupted run would have taken. The lr is this run's: each group keeps the base_lr the
    optimizer was just built with, not the saved one (a resume may change learning_rate on purpose).
    load: how the optimizer takes its state (optimizer.load_state_dict; FSDP's in parallel.py)."""
    bases = [g["base_lr"] for g in optimizer.param_groups]
    (load or optimizer.load_state_dict)(ckpt["optimizer"])
    for group, base in zip(optimizer.param_groups, bases):
        group["base_lr"] = base
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
