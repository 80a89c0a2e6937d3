"""
configurator.py — nanoGPT-style configuration, with errors instead of surprises.

Every script keeps its hyperparameters as plain globals at its top, so a reader sees them first. Then

    python train.py config/lille_130m.py --batch_size=8 --compile=False

applies the preset file (a small Python file of assignments), then each --key=value override, in order.
Unlike nanoGPT's exec() of this file, a key the script does not define is an error that names it (a typo such
as --learning_rat=1e-3 would otherwise be silently ignored), and a value must have its default's type
(an int may stand for a float; None defaults accept anything).

After configure(), resolve() turns the dict into the run: the values are checked (a choice from its list, a
number in its range), then the data folder's meta.json and the init/resume checkpoint add what they know (the
tokenizer, the vocabulary, the architecture), and any contradiction between the sources is an error that names
both sides, before anything is allocated. The precedence, lowest first:

    the script's defaults -> the preset file -> --key=value -> the data's meta.json -> the checkpoint's architecture

(the last two are facts, not preferences: a setting that contradicts them is an error, not an override).
"""
import ast
import hashlib
import json
import os
from types import SimpleNamespace


class ConfigError(ValueError):
    pass


def read_config_file(path):
    """Run a preset file and return the names it assigns (it may import math, compute values, etc.)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    scope = {}
    with open(path) as f:
        text = f.read()
    try:
        code = compile(text, path, "exec")
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    try:
        exec(code, scope)
    except Exception as e:  # a preset may compute values; its mistakes are named with the file
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
            and type(v).__name__ != "module"}


def _check_type(key, value, default, source, declared=None):
    """value as its default's type; a key whose default is None takes the `declared` type (or anything)."""
    if default is None and declared is not None and value is not None:
        default = declared()  # 0, 0.0, '' or False: a stand-in of the declared type
    if default is None or value is None:
        return value
    kind = type(default).__name__
    rule = f"its default {default!r} is a {kind}" if declared is None else f"it must be of type {kind} (or None)"
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if not isinstance(value, type(default)) or isinstance(default, bool) != isinstance(value, bool):
        raise ConfigError(f"{source}: {key}={value!r} is a {type(value).__name__}, but {rule}")
    return value


def _parse_value(text):
    """'3e-4' -> 0.0003, 'False' -> False, "(0.9, 0.95)" -> tuple; anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def configure(defaults, argv, types=None):
    """Return a copy of `defaults` updated by the preset files and --key=value overrides in argv. types: key ->
    type for keys whose default is None (distill.py's student shape: None = the teacher's), checked as others."""
    config, types = dict(defaults), types or {}
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in read_config_file(arg).items():
                if key not in config:
                    raise ConfigError(f"{arg}: unknown config key '{key}'")
                config[key] = _check_type(key, value, defaults[key], arg, types.get(key))
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"override '{arg}' must look like --key=value")
            if key not in config:
                close = [k for k in config if k.startswith(key[:4])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"unknown config key '{key}'{hint}")
            as_text = isinstance(defaults[key], str) or types.get(key) is str
            value = text if as_text else _parse_value(text)  # paths stay strings
            config[key] = _check_type(key, value, defaults[key], arg, types.get(key))
    return config


def script_defaults(namespace):
    """The configurable globals of a script: the plain values defined above the call (nanoGPT's config_keys)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


def check_values(config, choices, at_least):
    """Every value against its rule, at start: `choices` key -> allowed values, `at_least` key -> lower bound,
    or (low, high): low <= value < high (a momentum of 1 never forgets, Adam's bias correction divides by 0)."""
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise ConfigError(f"{key}={config[key]!r}: expected one of {', '.join(map(str, allowed))}")
    for key, bound in at_least.items():
        low, high = bound if isinstance(bound, tuple) else (bound, float("inf"))
        if not low <= config[key] < high:
            below = f" and < {high}" if high < float("inf") else ""
            raise ConfigError(f"{key}={config[key]!r}: must be >= {low}{below}")


# ---- the run: settings, then the facts of the data and of the checkpoint ---------------------------------------
def resolve(cfg, defaults, model_keys, choices, at_least):
    """configure()'s dict -> the run, a namespace read as run.<key>: every value checked, the device and precision
    chosen, meta.json, the shard headers and the init/resume checkpoint read (to the CPU) and compared."""
    import checkpoint
    import kernels
    check_values(cfg, choices, at_least)
    run = SimpleNamespace(**cfg, config=dict(cfg), model_keys=model_keys, train_windows=0, ckpt=None,
                          ckpt_path=None)
    given = {k for k in cfg if cfg[k] != defaults.get(k)}  # set by a preset or a flag
    kernels.set_backend(run.kernels_backend)
    run.world, run.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    run.ddp, run.master = run.world > 1, run.rank == 0
    run.device = checkpoint.pick_device(run.device, int(os.environ.get("LOCAL_RANK", "0")))
    run.amp_dtype = checkpoint.pick_dtype(run.dtype, run.device, allowed=("float32", "bfloat16"))
    run.autocast = checkpoint.autocast(run.device, run.amp_dtype)
    meta = read_meta(run.data_dir)
    data_vocab = meta.get("n_vocab", meta["vocab_size"])  # the tokenizer's; an SFT header may add a pad slot
    for key, want in (("tokenizer", meta["tokenizer"]), ("vocab_size", data_vocab)):
        if key in given and cfg[key] != want:
            raise ConfigError(f"{key}={cfg[key]!r}, but {run.data_dir}/meta.json says its shards have {key} "
                              f"{want!r}: drop the setting (the data's is used) or point data_dir elsewhere")
    run.tokenizer, run.model = meta["tokenizer"], {k: cfg[k] for k in model_keys}
    run.tokenizer_sha256 = check_tokenizer(run.data_dir, meta)
    with open(os.path.join(run.data_dir, "meta.json"), "rb") as f:  # the data's identity: its shards, their counts
        run.data_sha256 = hashlib.sha256(f.read()).hexdigest()
    run.model["vocab_size"] = data_vocab
    if run.init_from != "scratch":
        source = run.out_dir if run.init_from == "resume" else run.init_from
        run.ckpt_path = source if checkpoint.is_hf_folder(source) else checkpoint.find(source)
        run.ckpt = checkpoint.load(run.ckpt_path)
        check_checkpoint(run, run.ckpt, given)
    run.__dict__.update(run.model)
    check_data(run, meta)
    if run.init_from != "resume" and not run.overwrite and run.master and any(
            os.path.exists(os.path.join(run.out_dir, f)) for f in ("ckpt.pt", "best.pt", "metrics.jsonl")):
        raise ConfigError(f"{run.out_dir} already holds a run: continue it with --init_from=resume, or choose "
                          f"another --out_dir (or pass --overwrite=True to replace it)")
    resolve_batch(run)
    run.config.update(run.model, tokenizer=run.tokenizer, tokenizer_sha256=run.tokenizer_sha256,
                      data_sha256=run.data_sha256,
                      max_iters=run.max_iters, warmup_iters=run.warmup_iters,
                      **({"chat_format": run.chat_format} if hasattr(run, "chat_format") else {}))
    return run


def resolve_batch(run):
    """The batch arithmetic, the run's length and where its data stands (train.py's loop reads these)."""
    if run.compile_mode == "reduce-overhead" and run.ddp:  # CUDA graphs cannot hold DDP's all-reduce hooks
        raise ConfigError("compile_mode='reduce-overhead' (CUDA graphs) does not work under DDP here: use "
                          "'default' or 'max-autotune-no-cudagraphs' with torchrun")
    import torch
    graphs = run.compile and run.compile_mode == "reduce-overhead" and run.device.type == "cuda"
    run.new_graph_step = torch.compiler.cudagraph_mark_step_begin if graphs else (lambda: None)
    # tokens per optimizer step = batch_size * block_size * world * grad_accum
    run.rows_per_micro = run.batch_size * run.world
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
    if getattr(run, "profile_steps", 0) >= run.max_iters:
        raise ConfigError(f"profile_steps={run.profile_steps} must be < max_iters={run.max_iters}: the profile "
                          f"records the run's last steps, after compilation and warm-up")
    if run.warmup_frac > 0:
        run.warmup_iters = int(run.warmup_frac * run.max_iters)
    # Where the data stands: step s reads samples data_offset + s * samples_per_step + ... A resumed run
    # continues at the saved sample, also under another batch size (no window is trained twice or skipped).
    run.start_step, run.data_offset, run.resumed = 0, 0, run.init_from == "resume"
    if run.resumed:
        if "optimizer" not in run.ckpt:
            raise ConfigError(f"{run.ckpt_path} holds weights only (a best.pt?): start a run from it with "
                              f"--init_from={run.ckpt_path} instead of resuming")
        run.start_step = run.ckpt["step"]
        if run.start_step > run.max_iters:  # the loop ends at step == max_iters: it would never come
            raise ConfigError(f"max_iters={run.max_iters}, but {run.ckpt_path} is already at step {run.start_step}: "
                              f"nothing is left to train; resume with a larger max_iters (or the run's own)")
        # the inverse of train.first_sample: the saved next window, minus the steps before it
        run.data_offset = run.ckpt["data"]["next_sample"] - run.start_step * run.grad_accum * run.rows_per_micro


def _model_config(run):
    from model import GPTConfig
    return GPTConfig(**run.model)


def read_meta(data_dir):
    """The data folder's meta.json: written last by prepare_fineweb.py / prepare_sft.py, so it also says the
    folder is complete (a crash mid-prepare leaves shards and no meta.json)."""
    if not os.path.isdir(data_dir):
        import prepare_fineweb  # a fresh clone: the data chapter can prepare its embedded sample here
        if hasattr(prepare_fineweb, "ensure_sample"):
            print(f"{data_dir} does not exist: preparing the embedded sample there first")
            try:
                prepare_fineweb.ensure_sample(data_dir)
            except OSError as e:
                print(f"(could not prepare it: {e})")
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data folder not found: {data_dir} (make it with prepare_fineweb.py)")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the folder is incomplete (prepare_fineweb.py / prepare_sft.py "
                                f"write it last; an interrupted prepare leaves none): run the prepare step again")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path}: not valid JSON ({e}): run the prepare step again") from None
    need = {"tokenizer": str, "vocab_size": int, "eot": int}  # what every reader of a data folder relies on
    wrong = [k for k, kind in need.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if wrong:
        raise ConfigError(f"{path}: {', '.join(wrong)} missing or of the wrong type (expected a JSON object with "
                          f"tokenizer: a string, vocab_size and eot: integers, as prepare_*.py write it)")
    return meta


def check_tokenizer(data_dir, meta):
    """The tokenizer meta.json names must load now (not at the end of training) and still be the one that made
    the shards (its content hash, when meta.json records one). Returns the hash, which the checkpoint keeps."""
    from tokenizer import check_same, content_hash
    path = os.path.join(data_dir, "meta.json")
    try:
        now = content_hash(meta["tokenizer"])
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{path} names tokenizer '{meta['tokenizer']}', which cannot be loaded: {e}") from None
    check_same(meta["tokenizer"], meta.get("tokenizer_sha256"), path, now)
    return now


def check_data(run, meta):
    """The shards against the model: headers agree with meta.json, and SFT data (a chat format, maybe padded to
    one conversation per window) fits the model that will train on it."""
    from shards import list_shards, n_windows, read_header
    for path in list_shards(run.data_dir, "val") + list_shards(run.data_dir, "train"):
        head = read_header(path)
        if head["vocab_size"] and (head["vocab_size"], head["eot"]) != (meta["vocab_size"], meta["eot"]):
            raise ValueError(f"{path}: header says vocabulary {head['vocab_size']} / end-of-text {head['eot']}, "
                             f"meta.json says {meta['vocab_size']} / {meta['eot']}: shards from different runs")
        run.train_windows += n_windows(head["n_tokens"], run.block_size) if "train_" in os.path.basename(path) else 0
    if meta.get("kind") == "sft":
        from chat_format import ChatFormat, get_encoding
        if getattr(run, "chat_format", "") and run.chat_format != meta["format"]:
            raise ValueError(f"chat_format='{run.chat_format}' but {run.data_dir} was rendered as "
                             f"'{meta['format']}': prepare the data again or drop the override")
        run.chat_format = meta["format"]
        model_cfg = _model_config(run)
        ChatFormat(meta["format"], get_encoding(meta["tokenizer"])).check_model(
            model_cfg.vocab_size, model_cfg.padded_vocab_size, where=f"checkpoint {run.init_from}")
        if meta.get("layout") == "pad" and meta["block_size"] != run.block_size:
            raise ValueError(f"{run.data_dir} pads conversations to {meta['block_size']} tokens but the model's "
                             f"context is {run.block_size}: prepare again with --block_size {run.block_size}")

    if meta["vocab_size"] > _model_config(run).padded_vocab_size:
        raise ValueError(f"{run.data_dir} uses ids up to {meta['vocab_size'] - 1}, beyond the model's "
                         f"{_model_config(run).padded_vocab_size} vocabulary rows")


def check_checkpoint(run, ckpt, given):
    """A resumed (or fine-tuned) run keeps its checkpoint's architecture: a flag or preset that says otherwise is
    named, not silently ignored. `given`: the keys set away from their defaults."""
    saved = ckpt["config"]
    keys = run.model_keys + (["seed"] if run.init_from == "resume" else [])
    differ = [f"{k}={run.config[k]!r} (checkpoint: {saved[k]!r})" for k in keys if k in given and k in saved
              and saved[k] != run.config[k] and not (k == "head_dim" and run.config[k] == 0)]
    if differ:
        raise ValueError(f"{run.ckpt_path} was trained with another setup than this run asks for: "
                         f"{', '.join(differ)}. Drop those overrides, or start a fresh run in another out_dir")
    if run.init_from == "resume" and saved.get("optimizer", run.optimizer) != run.optimizer:
        raise ValueError(f"optimizer={run.optimizer!r}, but {run.ckpt_path} was trained with {saved['optimizer']!r}, "
                         f"whose state cannot drive another optimizer: resume with --optimizer={saved['optimizer']}, "
                         f"or start a new run from its weights (--init_from={run.ckpt_path}, another out_dir)")
    run.model = {k: saved[k] for k in run.model_keys if k in saved}
    if saved.get("tokenizer") and saved["tokenizer"] != run.tokenizer:
        raise ValueError(f"tokenizer mismatch: the checkpoint {run.ckpt_path} was trained with "
                         f"'{saved['tokenizer']}' but {run.data_dir} was tokenized with '{run.tokenizer}'")
    from tokenizer import check_same
    check_same(run.tokenizer, saved.get("tokenizer_sha256"), run.ckpt_path, run.tokenizer_sha256)
    if run.init_from == "resume" and saved.get("data_sha256", run.data_sha256) != run.data_sha256:
        raise ValueError(f"{run.data_dir}/meta.json is not the data {run.ckpt_path} was trained on (meta.json "
                         f"sha256 {saved['data_sha256'][:12]}... then, {run.data_sha256[:12]}... now: prepared "
                         f"again, or another folder): its saved data position means nothing here; resume on that "
                         f"data, or start from the weights with --init_from={run.ckpt_path} in another out_dir")


# ---- the other end of a command line: an expected error is one line ---------------------------------------------
EXPECTED = (ValueError, OSError, FloatingPointError)  # bad input, missing/unwritable files, a full disk, divergence


def run_script(main, argv, expected=()):
    """Every script's `if __name__ == "__main__"`: main(argv), with an expected error (above, plus `expected`)
    turned into one line naming what is wrong and exit status 1, and Ctrl-C into exit 130 without a traceback.
    Anything else is a bug in nanoforge, and keeps its traceback."""
    import errno
    import sys
    try:
        return main(argv)
    except KeyboardInterrupt:
        sys.exit(130)  # 128 + SIGINT, as a shell reports it
    except EXPECTED + tuple(expected) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            sys.exit(f"error: no space left on the device{where}: free some disk space, then resume")
        sys.exit(f"error: {e}" if str(e) else f"error: {type(e).__name__}")
