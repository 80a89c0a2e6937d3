"""
hf.py — nanoforge <-> Hugging Face Llama: one network, two sets of names.

nanoforge's RoPE + SwiGLU + RMSNorm presets are the Llama architecture. transformers' LlamaForCausalLM computes

    h = embed_tokens[ids]
    for each layer:  h = h + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = input_layernorm(h)
                     h = h + down_proj(silu(gate_proj(n)) * up_proj(n)),                n = post_attention_layernorm(h)
    logits = lm_head(norm(h))

which is model.py's Block line for line. Only the bookkeeping differs, and this file is that bookkeeping:

  * names:  wte <-> model.embed_tokens, blocks.i.ln_1 <-> model.layers.i.input_layernorm, ...
  * fusion: nanoforge computes q, k and v with ONE matmul (c_attn's rows are [q | k | v]) and gate and up with one
    more (c_fc's rows are [gate | up]); Llama keeps them as separate matrices. A fused matrix is the row-wise
    concatenation of the separate ones, so converting is torch.cat one way and torch.split the other.
  * no q/k permutation: both rotate "half-split" pairs (x[i], x[i + D/2]) (kernels/rope.py; transformers'
    rotate_half). Converters from Meta's original Llama weights permute q and k because those rotate interleaved
    pairs (x[2i], x[2i+1]); here nothing is permuted, and tests/test_hf.py checks the logits agree.
  * the attention scale is 1/sqrt(head_dim) in both, RMSNorm normalises in fp32 and then multiplies by the weight
    in both; head_dim may differ from hidden_size / heads in both (Llama's config.json has a head_dim key).

What has no Llama equivalent is refused with the reason (sinusoidal or learned positions, a plain SiLU MLP), and a
Llama-family checkpoint nanoforge cannot express (biases, scaled RoPE, another activation) is refused on import,
naming the config.json key: a model that loads must compute what it computed where it came from.

    from hf import load_hf_model
    model, config = load_hf_model("path/to/SmolLM2-135M")    # a local folder: config.json + *.safetensors
    # config: GPTConfig's fields + "tokenizer" (the folder's tokenizer.json) -> train.py / sft.py / chat.py

load_hf_model also reads the folders export.py writes: --format hf (the same Llama files) and --format native
(nanoforge's own names), so chat.py and eval.py can open an exported folder, which holds no code, only tensors.
"""
import json
import os

import torch

from model import GPT, GPTConfig

ARCHITECTURE = "LlamaForCausalLM"


# ---- names ---------------------------------------------------------------------------------------------------
def _layer_names(i):
    """nanoforge name -> Hugging Face name(s) of layer i. A tuple means a fused nanoforge matrix: its rows are
    the Hugging Face matrices stacked in that order."""
    hf = f"model.layers.{i}."
    return {f"blocks.{i}.ln_1.weight": hf + "input_layernorm.weight",
            f"blocks.{i}.attn.c_attn.weight": tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
            f"blocks.{i}.attn.c_proj.weight": hf + "self_attn.o_proj.weight",
            f"blocks.{i}.ln_2.weight": hf + "post_attention_layernorm.weight",
            f"blocks.{i}.mlp.c_fc.weight": (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
            f"blocks.{i}.mlp.c_proj.weight": hf + "mlp.down_proj.weight"}


def _names(config):
    names = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}
    for i in range(config.n_layer):
        names.update(_layer_names(i))
    if not config.tie_embeddings:  # a tied head is the embedding itself: Llama then stores it once, as we do
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _split_sizes(config, name):
    """Row counts of the pieces of a fused matrix: [q, k, v] = [Hq*D, Hkv*D, Hkv*D] or [gate, up] = [F, F]."""
    if name.endswith("c_attn.weight"):
        return config.qkv_sizes
    return [config.ffn_hidden] * 2


# ---- nanoforge -> Hugging Face -------------------------------------------------------------------------------
def check_exportable(config):
    """Raise a ValueError naming the reason when a nanoforge config has no LlamaForCausalLM equivalent."""
    if config.pos != "rope":
        raise ValueError(f"pos='{config.pos}' has no Llama equivalent: Llama encodes positions only by rotating q "
                         f"and k (RoPE), it has no {config.pos} position table to add to the embeddings; "
                         f"use --format native (or onnx)")
    if config.mlp != "swiglu":
        raise ValueError(f"mlp='{config.mlp}' has no Llama equivalent: Llama's MLP is gated, "
                         f"down(silu(gate(x)) * up(x)), not a plain down(silu(W x)); use --format native (or onnx)")


def hf_config(config, token_ids, extra=None):
    """config.json of a LlamaForCausalLM with this config. token_ids: {'bos', 'eos', 'pad'} ids. vocab_size is the
    number of embedding rows, padding included (the chat special tokens live in the padding). `extra` is stored
    under "nanoforge" (the tokenizer's own vocabulary size, the chat format...) so that an import can restore the
    run config exactly; other tools ignore unknown keys."""
    check_exportable(config)
    return {"architectures": [ARCHITECTURE], "model_type": "llama",
            "vocab_size": config.padded_vocab_size, "hidden_size": config.n_embd,
            "intermediate_size": config.ffn_hidden, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
            "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.block_size,
            "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
            # rope_theta + rope_scaling is what transformers 4.x and llama.cpp's converter read; rope_parameters
            # is transformers 5's spelling of the same thing
            "rope_theta": config.rope_theta, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": token_ids["bos"], "eos_token_id": token_ids["eos"], "pad_token_id": token_ids["pad"],
            "use_cache": True, "nanoforge": extra or {}}


def to_hf_state_dict(model, dtype=torch.float32):
    """The model's weights under Llama's names, fused matrices split. Each tensor is a fresh contiguous copy:
    safetensors refuses tensors that share memory, and the pieces of a split are views of one matrix.

    nn.Linear stores W as (out, in) and computes x W^T, in both libraries, so the rows of c_attn are the output
    features [q | k | v]: splitting along dim 0 gives q_proj (Hq*D, d), k_proj (Hkv*D, d), v_proj (Hkv*D, d).
    Within q_proj the rows are head-major (head h owns rows h*D .. h*D+D-1), as both reshape (.., H, D)."""
    sd, out = model.state_dict(), {}
    for ours, theirs in _names(model.config).items():
        w = sd[ours].detach().to(dtype)
        if isinstance(theirs, tuple):
            for name, piece in zip(theirs, w.split(_split_sizes(model.config, ours), dim=0)):
                out[name] = piece.clone()
        else:
            out[theirs] = w.clone()
    return out


# ---- Hugging Face -> nanoforge -------------------------------------------------------------------------------
def gpt_config_from_hf(hf, where="config.json"):
    """GPTConfig fields from a Llama config.json, or a ValueError naming the key nanoforge cannot express.

    Accepted: what changes only sizes (layers, widths, heads, KV heads, head_dim, vocabulary, context, theta, eps,
    tied or not). Refused: what changes the computation (biases, another activation, scaled RoPE such as
    Llama-3.1/3.2's 'llama3' or 'linear'/'dynamic'/'yarn'). The vocabulary is taken as is (vocab_pad_multiple 1):
    its rows are the file's. pretraining_tp only split matmuls during Meta's training; the math is the same."""
    def fail(key, why):
        raise ValueError(f"{where}: {key}={hf.get(key)!r}: {why}")
    if hf.get("model_type") != "llama" and ARCHITECTURE not in (hf.get("architectures") or []):
        fail("model_type", f"not a Llama-family checkpoint (nanoforge loads {ARCHITECTURE}: Llama, SmolLM2, "
                           f"TinyLlama shapes)")
    if hf.get("hidden_act", "silu") != "silu":
        fail("hidden_act", "nanoforge's gated MLP uses silu")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            fail(key, "nanoforge's linear layers have no bias")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        fail("rope_parameters" if "rope_parameters" in hf else "rope_scaling",
             f"RoPE type '{kind}' rescales frequencies, nanoforge's RoPE has no scaling (model.py rope_tables)")
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if not isinstance(hf.get(k), int)]
    if missing:
        raise ValueError(f"{where}: missing or non-integer keys {missing}")
    n_head = hf["num_attention_heads"]
    return {"n_layer": hf["num_hidden_layers"], "n_embd": hf["hidden_size"], "n_head": n_head,
            "n_kv_head": hf.get("num_key_value_heads") or n_head,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_head,
            "ffn_hidden": hf["intermediate_size"], "mlp": "swiglu", "pos": "rope",
            "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default: untied
            "vocab_size": hf["vocab_size"], "vocab_pad_multiple": 1,
            "block_size": hf.get("max_position_embeddings", 2048), "norm_eps": hf.get("rms_norm_eps", 1e-6)}


def from_hf_state_dict(tensors, config, where="the checkpoint"):
    """Llama-named tensors -> a nanoforge state dict (fused matrices concatenated). Every tensor must be used:
    a left-over one (a bias, a layer too many) would be silently dropped otherwise, so it is an error."""
    tensors, out = dict(tensors), {}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway: it is the embedding
    missing = []
    for ours, theirs in _names(config).items():
        parts = theirs if isinstance(theirs, tuple) else (theirs,)
        missing += [p for p in parts if p not in tensors]
        if not missing:
            out[ours] = torch.cat([tensors.pop(p) for p in parts], dim=0)
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    extra = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]  # old exports saved this buffer
    if extra:
        raise ValueError(f"{where}: tensors nanoforge has no place for: {extra[:4]}"
                         f"{' ...' if len(extra) > 4 else ''} (biases? another architecture?)")
    if config.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    return out


def read_safetensors(folder):
    """Every tensor of a folder's model.safetensors, or of the shards its model.safetensors.index.json lists.
    Large checkpoints are sharded (model-00001-of-00002.safetensors, ...); the index maps each name to its file."""
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (a pytorch_model.bin is not read: unpickling "
                                f"it could run code; convert it to safetensors first)")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(os.path.join(folder, name)))
        except Exception as e:  # safetensors' own error type: a truncated or damaged file, one line naming it
            raise ValueError(f"{os.path.join(folder, name)}: not a readable safetensors file (truncated or "
                             f"damaged: {str(e)[:160]})") from None
    return tensors


def resolve_folder(path):
    """A local folder as is; otherwise a hub id ('HuggingFaceTB/SmolLM2-135M'), downloaded by huggingface_hub
    (config, tokenizer and safetensors files only). The hub needs network; everything else here works offline."""
    if os.path.isdir(path):
        return path
    if path.count("/") != 1 or os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such folder (expected a Hugging Face model folder or a hub id)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:
        raise FileNotFoundError(f"{path}: not a local folder, and the hub could not provide it "
                                f"({type(e).__name__}: {str(e)[:200]})") from None


def load_hf_model(path, device="cpu"):
    """A local Hugging Face Llama folder (or a hub id) -> (GPT in eval mode, run config dict).

    The run config holds GPTConfig's fields and "tokenizer": the folder's tokenizer.json. A folder that
    export.py wrote restores what it recorded under "nanoforge" (the tokenizer's own vocabulary size and padding,
    the tiktoken name when there is no tokenizer.json, the chat format)."""
    folder = resolve_folder(path)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        with open(config_file, encoding="utf-8") as f:
            hf = json.load(f)
    except ValueError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: expected a JSON object of model settings, found a {type(hf).__name__}")
    if hf.get("architecture") == "nanoforge.GPT":  # export.py --format native: our own names, nothing to map
        return _load_native(folder, hf, device)
    fields = gpt_config_from_hf(hf, where=config_file)
    ours = hf.get("nanoforge") or {}
    run = {}
    if ours.get("vocab_size") and ours.get("vocab_pad_multiple"):
        restored = GPTConfig(**{**fields, "vocab_size": ours["vocab_size"],
                                "vocab_pad_multiple": ours["vocab_pad_multiple"]})
        if restored.padded_vocab_size == fields["vocab_size"]:
            fields.update(vocab_size=restored.vocab_size, vocab_pad_multiple=restored.vocab_pad_multiple)
    if ours.get("chat_format"):
        run["chat_format"] = ours["chat_format"]
    tokenizer_file = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tokenizer_file):
        run["tokenizer"] = tokenizer_file
    elif ours.get("tokenizer"):
        run["tokenizer"] = ours["tokenizer"]
    config = GPTConfig.from_dict(fields, where=config_file)
    model = GPT(config)  # random init, then overwritten: simple, and seconds even at 1B parameters
    state = from_hf_state_dict(read_safetensors(folder), config, where=folder)
    load_named(model, state, folder)  # copies into the fp32 parameters (bf16 files are widened), keeps the tie
    return model.to(device).eval(), {**fields, **run}


def load_named(model, state, folder):
    """load_state_dict, with a shape or name mismatch (config.json saying one size, the weights another) named as
    the folder's in one line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{folder}: the weights do not fit config.json ({' '.join(str(e).split())[:240]})") from None


def _load_native(folder, config, device):
    """An export.py --format native folder: GPTConfig in config.json, nanoforge's names in model.safetensors
    (a tied head stored once, as wte.weight)."""
    gpt_config = GPTConfig.from_dict(config, where=os.path.join(folder, "config.json"))
    model = GPT(gpt_config)
    tensors = read_safetensors(folder)
    if gpt_config.tie_embeddings and "wte.weight" in tensors:
        tensors["lm_head.weight"] = tensors["wte.weight"]
    load_named(model, {k: v.float() for k, v in tensors.items()}, folder)
    run = {k: v for k, v in config.items() if k not in ("padded_vocab_size", "dtype", "architecture")}
    return model.to(device).eval(), run
