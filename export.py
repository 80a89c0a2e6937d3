"""
export.py — a checkpoint as files that other tools open: a Hugging Face model folder, ONNX, or nanoforge's own.

    python export.py out/sft_alpaca                        # -> out/sft_alpaca/hf/   (the default: --format hf)
    python export.py out/gpt2_124m --dtype bfloat16 --out_dir /tmp/gpt2_hf
    python export.py out/lime_1b --format native           # -> out/lime_1b/export/ (any preset)
    python export.py out/tiny --format onnx                # -> out/tiny/onnx/model.onnx

--format hf writes what `transformers.AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)` load with no remote code, and what llama.cpp's convert_hf_to_gguf.py reads:

    config.json              LlamaForCausalLM (hf.py maps the names and splits the fused matrices)
    model.safetensors        the weights under Llama's names, --dtype float32 | bfloat16 | float16
    generation_config.json   bos / eos (every id the chat format stops at) / pad
    tokenizer.json           the tiktoken encoding rewritten as a Hugging Face byte-level BPE (below)
    tokenizer_config.json    the special tokens and the chat template: the checkpoint's chat format in Jinja, so
                             apply_chat_template(messages, add_generation_prompt=True) gives chat_format.render's ids

Presets whose architecture Llama cannot express (lime_1b: sinusoidal positions and a plain SiLU MLP; learned
positions) are refused with the reason; --format native and --format onnx take any model.

--format native is the plain form: nanoforge's own names in model.safetensors and GPTConfig in config.json
(`tie_embeddings: true` stores a tied head once, as `wte.weight`; `load_exported` reads it back).

The files are written into a staging folder and moved into place when all are complete: a folder that cannot be
created or written is one clear error before any work, and a refused or failed export leaves an earlier one whole.
"""
import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict

import torch

import hf
from chat_format import EOT, EXTRA_TOKENS, ChatFormat
from checkpoint import load_model
from tokenizer import bytes_to_unicode, get_encoding

DEFAULT_DIR = {"hf": "hf", "native": "export", "onnx": "onnx"}  # under the run folder


# ---- files: a staging folder, renamed into place ------------------------------------------------------------
# An export is several files that belong together. They are written into a fresh hidden folder inside out_dir and
# only moved into out_dir (one rename each: instant, on the same file system) once every one of them is complete.
# So a crash, a full disk or Ctrl-C mid-export leaves the previous export as it was, not a new model.safetensors
# beside an old config.json; and creating that folder first is the check that out_dir can be written at all
# (asking os.access() would not do: root passes every permission check, a read-only file system still refuses).
def make_staging(out_dir):
    """Create out_dir (and parents) and a hidden staging folder in it, or one clear error naming out_dir."""
    import tempfile
    try:
        os.makedirs(out_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    except OSError as e:
        raise ValueError(f"cannot write the export to {out_dir}: {e.strerror or e} "
                         f"(choose another --out_dir)") from None


def first_missing(path):
    """The outermost folder of `path` that does not exist yet (what a failed export removes again), or None."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def write_json(path, obj, indent=1):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)


def write_safetensors(path, tensors):
    """safetensors creates its file readable by its owner only (0600); give it the mode open() would (the umask's)."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---- the tokenizer: tiktoken ranks -> a Hugging Face byte-level BPE -------------------------------------------
def hf_pattern(pat):
    """tiktoken's split regex in the dialect of `tokenizers` (Oniguruma). Both read `x++` as possessive, but
    Oniguruma reads `x{1,3}+` as "(x{1,3}) one or more times", not as a possessive {1,3}: cl100k's
    `\\p{N}{1,3}+` would then swallow a whole number instead of groups of 3 digits (37 of 50 OpenStax documents
    tokenized differently). Possessive and greedy agree there (nothing follows inside the alternative), so the
    `+` after a `{m,n}` is dropped."""
    import re
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat)


def tokenizer_json(enc, specials):
    """tokenizer.json for a tiktoken encoding. specials: {id: string} (tiktoken's own + our padding-slot tokens).

    tiktoken keeps only ranks (bytes -> id) and encodes a piece by repeatedly merging the adjacent pair whose
    concatenation has the lowest rank. Hugging Face's BPE needs the merges spelled out: for each token, every
    split into two tokens of the vocabulary is a merge, ranked by the token it makes. Merging the best-ranked
    pair first is then the same rule. ignore_merges=True takes a piece that is itself a token whole, as tiktoken
    does before merging. The split regex runs first (Split), then ByteLevel maps bytes to symbols (its own regex
    off: tiktoken's replaces it)."""
    # An example (gpt2): " the" is rank 262 and splits into two tokens as " " + "the", " t" + "he" or " th" + "e",
    # so three merges, each ranked 262, make it. Whichever pair of pieces a word reaches, " the" is made when 262
    # is the lowest rank on offer, in both libraries, so both arrive at the same tokens (tested on 50 OpenStax
    # documents). tiktoken keeps the ranks and the regex in "private" attributes; they are its data.
    sym = bytes_to_unicode()  # byte -> visible character, as GPT-2 vocabularies store them
    ranks = enc._mergeable_ranks
    text = {r: "".join(sym[x] for x in b) for b, r in ranks.items()}  # rank -> the token as vocab text
    merges = sorted((r, ranks[b[:i]], ranks[b[i:]])  # (made, left, right), by the rank of what it makes
                    for b, r in ranks.items() for i in range(1, len(b)) if b[:i] in ranks and b[i:] in ranks)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in sorted(specials.items())],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": hf_pattern(enc._pat_str)}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,  # no BOS added to plain text: tokenizer(text) == tiktoken's encode_ordinary(text)
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  # the specials are in the vocab too: `tokenizers` keeps an added token's id only when the model
                  # knows it, and would otherwise number them from the end (cl100k's end-of-text would be 100256)
                  "vocab": {**{t: r for r, t in text.items()}, **{s: i for i, s in specials.items()}},
                  "merges": [(text[left], text[right]) for _, left, right in merges]}}


def export_specials(enc, padded_vocab_size):
    """{id: string}: tiktoken's special tokens where tiktoken puts them (cl100k's end-of-text is 100257, after a
    hole at 100256), and chat_format's EXTRA_TOKENS at n_vocab + i where the padding has the row."""
    specials = {enc.encode_single_token(t): t for t in enc.special_tokens_set}
    for i, t in enumerate(EXTRA_TOKENS):
        if t not in enc.special_tokens_set and enc.n_vocab + i < padded_vocab_size:
            specials[enc.n_vocab + i] = t
    return specials


# ---- the chat template: chat_format.render in Jinja -----------------------------------------------------------
# One template per format, read against chat_format.ChatFormat._segments. Every tag is {%- ... -%}, so the layout
# below adds no whitespace; the text is what {{ }} prints. `bos`, `end` and the tags are set in front of the
# template (chat_template below). ns.ctx holds a context message until the user message it precedes.
#   alpaca     the preamble (a system message replaces it; "..., paired with an input ..." when the first turn has
#              a context), then per turn "### Instruction:" [+ "### Input:"] + "### Response:" + answer + eot
#   lime       [system] [context] <user> text <assistant> answer eot: the tags are special tokens
#   parchment  a system turn always (ParchmentLM's default text if none is given); eot closes every turn
#   chatml     <|im_start|>role\n ... <|im_end|>, a newline between turns; a context is a turn of its own
#   none       the texts back to back: plain completion, nothing stripped
# Jinja's `trim` is Python's str.strip(), as render's. Each user turn ends with the header that opens the answer,
# printed when an answer follows or when add_generation_prompt asks for it (the HF convention).
TEMPLATES = {
    "alpaca": r"""
{{- bos -}}
{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] | trim -}}
{%- elif (messages | first)['role'] == 'context' -%}{{- preamble_input -}}
{%- else -%}{{- preamble -}}{%- endif -%}
{{- '\n\n' -}}
{%- for m in messages -%}
  {%- if m['role'] == 'context' -%}{%- set ns.ctx = m['content'] | trim -%}
  {%- elif m['role'] == 'user' -%}
    {{- '### Instruction:\n' + (m['content'] | trim) + '\n\n' -}}
    {%- if ns.ctx is not none -%}{{- '### Input:\n' + ns.ctx + '\n\n' -}}{%- endif -%}
    {%- set ns.ctx = none -%}
    {%- if add_generation_prompt or not loop.last -%}{{- '### Response:\n' -}}{%- endif -%}
  {%- elif m['role'] == 'assistant' -%}{{- (m['content'] | trim) + end -}}
  {%- endif -%}
{%- endfor -%}""",
    "lime": r"""
{{- bos -}}
{%- for m in messages -%}
  {%- if m['role'] == 'system' and m['content'] | trim -%}{{- (m['content'] | trim) + '\n' -}}
  {%- elif m['role'] == 'context' -%}{%- set ns.ctx = m['content'] | trim -%}
  {%- elif m['role'] == 'user' -%}
    {%- if ns.ctx -%}{{- ns.ctx + '\n' -}}{%- endif -%}
    {{- user_tag + (m['content'] | trim) -}}
    {%- set ns.ctx = none -%}
    {%- if add_generation_prompt or not loop.last -%}{{- assistant_tag -}}{%- endif -%}
  {%- elif m['role'] == 'assistant' -%}{{- (m['content'] | trim) + end -}}
  {%- endif -%}
{%- endfor -%}""",
    "parchment": r"""
{{- bos -}}
{%- if messages[0]['role'] != 'system' -%}{{- 'system\n' + default_system + end -}}{%- endif -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{{- 'system\n' + (m['content'] | trim) + end -}}
  {%- elif m['role'] == 'context' -%}{%- set ns.ctx = m['content'] | trim -%}
  {%- elif m['role'] == 'user' -%}
    {{- '\nuser\n' + (m['content'] | trim) -}}
    {%- if ns.ctx -%}{{- '\n\n' + ns.ctx -}}{%- endif -%}
    {{- end -}}
    {%- set ns.ctx = none -%}
    {%- if add_generation_prompt or not loop.last -%}{{- '\nassistant\n' -}}{%- endif -%}
  {%- elif m['role'] == 'assistant' -%}{{- (m['content'] | trim) + end -}}
  {%- endif -%}
{%- endfor -%}""",
    "chatml": r"""
{{- bos -}}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{{- im_start + 'system\n' + (m['content'] | trim) + end -}}
  {%- elif m['role'] == 'context' -%}{{- ns.nl + im_start + 'context\n' + (m['content'] | trim) + end -}}
  {%- elif m['role'] == 'user' -%}
    {{- ns.nl + im_start + 'user\n' + (m['content'] | trim) + end + '\n' -}}
    {%- if add_generation_prompt or not loop.last -%}{{- im_start + 'assistant\n' -}}{%- endif -%}
  {%- elif m['role'] == 'assistant' -%}{{- (m['content'] | trim) + end -}}
  {%- endif -%}
  {%- set ns.nl = '\n' -%}
{%- endfor -%}""",
    "none": r"""
{{- bos -}}
{%- for m in messages -%}
  {%- if m['role'] == 'system' and m['content'] -%}{{- m['content'] + '\n\n' -}}
  {%- elif m['role'] == 'context' -%}{%- set ns.ctx = m['content'] -%}
  {%- elif m['role'] == 'user' -%}
    {%- if ns.ctx -%}{{- ns.ctx + '\n\n' -}}{%- endif -%}
    {{- m['content'] -}}
    {%- set ns.ctx = none -%}
  {%- elif m['role'] == 'assistant' -%}{{- m['content'] + end -}}
  {%- endif -%}
{%- endfor -%}""",
}


def chat_template(fmt):
    """The Jinja chat template of a ChatFormat: its special strings set in front of TEMPLATES[fmt.name].

    Written out, a special token is its string ('<|im_end|>'); the tokenizer turns it back into its one id. So
    apply_chat_template(messages, add_generation_prompt=True) on a conversation that ends with a user message
    gives render(..., open_assistant=True)'s ids. One difference is inherent to any text template: render encodes
    each earlier answer apart from the text before it, the template joins them into one string. The ids differ
    only where the two would merge into one token, which the formats' headers prevent except in 'none' (a user
    text ending in a letter, its answer starting with one). Another: a user who types '<|im_end|>' gets the
    special token from apply_chat_template unless it is called with sanitize_control_tokens=True (render treats
    message text as text, always)."""
    import chat_format as cf
    tags = {"bos": EOT, "end": fmt.specials[fmt.ids["end"]], "preamble": cf.ALPACA_PREAMBLE,
            "preamble_input": cf.ALPACA_PREAMBLE_INPUT, "default_system": cf.PARCHMENT_SYSTEM}
    for role in ("user", "assistant", "im_start"):
        if role in fmt.ids:
            tags[role if role == "im_start" else role + "_tag"] = fmt.specials[fmt.ids[role]]
    sets = "".join(f"{{%- set {k} = {json.dumps(v)} -%}}" for k, v in tags.items())
    return sets + CHECKS + "{%- set ns = namespace(ctx=none, nl='') -%}" + TEMPLATES[fmt.name].strip()


# The two mistakes a template would otherwise render silently, refused as render refuses them
# (raise_exception is the function transformers gives every chat template)
CHECKS = r"""
{%- for m in messages -%}
  {%- if m['role'] not in ['system', 'context', 'user', 'assistant'] -%}
    {{- raise_exception("message " ~ loop.index0 ~ ": role '" ~ m['role'] ~ "'"
                        ~ ", expected system, context, user or assistant") -}}
  {%- elif m['role'] == 'system' and not loop.first -%}
    {{- raise_exception("message " ~ loop.index0 ~ ": a system message may only come first") -}}
  {%- endif -%}
{%- endfor -%}""".strip()


# ---- the three formats ---------------------------------------------------------------------------------------
def export_hf(model, run_config, out_dir, dtype="float32", chat_format=None):
    """A Hugging Face folder (see the module docstring). chat_format: default the checkpoint's, else 'none'.

    The ids: bos is end-of-text (every nanoforge document and rendering begins with it), eos the format's end token
    (<|im_end|> for chatml, end-of-text otherwise), pad the format's pad token where the padding has its row.
    generation_config.json lists every id the format stops at, so model.generate stops where chat.py stops."""
    # the checks come first: a refusal (the staging folder is removed) costs no time spent writing
    config = model.config
    hf.check_exportable(config)
    spec = run_config.get("tokenizer", "gpt2")
    enc = get_encoding(spec)
    if not hasattr(enc, "_mergeable_ranks"):  # tokenizer_json reads tiktoken's ranks and split regex
        raise ValueError(f"tokenizer '{spec}' is not a tiktoken encoding: --format hf builds tokenizer.json from "
                         f"tiktoken's ranks (use --format native, and copy the tokenizer file yourself)")
    if enc.n_vocab > config.padded_vocab_size:
        raise ValueError(f"the model has {config.padded_vocab_size} embedding rows but its tokenizer "
                         f"'{enc.name}' has {enc.n_vocab} tokens")
    fmt = ChatFormat(chat_format or run_config.get("chat_format") or "none", enc)
    fmt.check_model(config.vocab_size, config.padded_vocab_size)
    specials = export_specials(enc, config.padded_vocab_size)
    pad = fmt.ids["pad"] if fmt.ids["pad"] in specials else enc.eot_token  # no padding row: pad with eot
    ids = {"bos": enc.eot_token, "eos": fmt.ids["end"], "pad": pad}
    extra = {"vocab_size": config.vocab_size, "vocab_pad_multiple": config.vocab_pad_multiple,
             "tokenizer": enc.name, "chat_format": fmt.name}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), hf.to_hf_state_dict(model, getattr(torch, dtype)))
    write_json(os.path.join(out_dir, "config.json"), {**hf.hf_config(config, ids, extra), "torch_dtype": dtype})
    write_json(os.path.join(out_dir, "generation_config.json"),
               {"bos_token_id": ids["bos"], "eos_token_id": fmt.stop_ids, "pad_token_id": pad})
    write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_json(enc, specials), indent=None)
    # tokenizer_config.json: which class reads tokenizer.json, the named special tokens, and two settings that keep
    # decoding exact (no "clean up" of spaces before punctuation) and encoding tiktoken's (no BOS, no EOS added)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": specials[ids["eos"]],
        "pad_token": specials[pad], "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": config.block_size,
        "chat_template": chat_template(fmt)})
    return out_dir


def export_native(model, run_config, out_dir, dtype="float32"):
    """nanoforge's own names and GPTConfig: any preset, read back by load_exported."""
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del tensors["lm_head.weight"]
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    config = {**asdict(model.config), "padded_vocab_size": model.config.padded_vocab_size,
              "tokenizer": run_config.get("tokenizer", "gpt2"), "dtype": dtype, "architecture": "nanoforge.GPT"}
    write_json(os.path.join(out_dir, "config.json"), config)
    return out_dir


def load_exported(out_dir):
    """The inverse of export_native: a GPT from its folder (hf.load_hf_model reads both kinds of folder)."""
    return hf.load_hf_model(out_dir)[0]


class LogitsOnly(torch.nn.Module):
    """forward(idx) -> logits: the one output an ONNX graph has (GPT.forward returns (logits, loss))."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)[0]


def export_onnx(model, run_config, out_dir, dtype="float32"):
    """model.onnx: token ids (batch, seq) int64 -> logits (batch, seq, padded vocab), any batch and length up to
    block_size. torch.onnx.export(dynamo=True) traces the model with torch.export and writes ONNX operators. The
    Triton kernels are custom operators with no ONNX form, so the PyTorch twins run during the trace (the
    kernels switch set to 'torch'; the twins are plain ATen operators, all of which ONNX has)."""
    import kernels
    if dtype != "float32":
        raise ValueError(f"--format onnx writes float32 (onnxruntime's CPU kernels), not {dtype}")
    # an example input fixes dtypes and ranks; Dim marks batch and length as free, so the graph is not specialised
    # to (2, 8). The length is bounded by the context: the model refuses longer inputs, and the RoPE tables end there
    wrapper, idx = LogitsOnly(model).eval(), torch.zeros(2, min(8, model.config.block_size), dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=model.config.block_size)
    with kernels.backend_as("torch"):  # the twins: plain torch ops that ONNX can express
        program = torch.onnx.export(wrapper, (idx,), dynamo=True, input_names=["idx"], output_names=["logits"],
                                    dynamic_shapes={"idx": {0: torch.export.Dim("batch"), 1: seq}})
    path = os.path.join(out_dir, "model.onnx")
    program.save(path)  # a model over 2 GB gets its weights in a model.onnx.data beside it (protobuf's limit)
    return path


EXPORTERS = {"hf": export_hf, "native": export_native, "onnx": export_onnx}


def export(ckpt_path, out_dir, dtype="float32", fmt="hf", chat_format=None):
    """Checkpoint (a run folder or a .pt file) -> files under out_dir; returns out_dir (hf, native) or model.onnx.
    Written into a staging folder and moved into place when complete (see make_staging); a refused or failed
    export removes what it created, and leaves an earlier export in out_dir whole."""
    if fmt not in EXPORTERS:
        raise ValueError(f"--format {fmt}: expected one of {', '.join(EXPORTERS)}")
    model, run_config = load_model(ckpt_path)
    kwargs = {"chat_format": chat_format} if fmt == "hf" else {}
    created = first_missing(out_dir)
    staging = make_staging(out_dir)
    try:
        main_path = EXPORTERS[fmt](model, run_config, staging, dtype, **kwargs)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    except BaseException:
        shutil.rmtree(created or staging, ignore_errors=True)
        raise
    os.rmdir(staging)
    return os.path.normpath(os.path.join(out_dir, os.path.relpath(main_path, staging)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a run folder (its ckpt.pt) or a .pt file")
    p.add_argument("--format", default="hf", choices=list(EXPORTERS))
    p.add_argument("--out_dir", default=None, help="default: <run folder>/hf, /export or /onnx")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chat_format", default=None, help="the chat template (hf): default the checkpoint's")
    args = p.parse_args(argv)
    run_dir = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt)
    try:
        out = args.out_dir or os.path.join(run_dir, DEFAULT_DIR[args.format])
        print("wrote", export(args.ckpt, out, args.dtype, args.format, args.chat_format))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
