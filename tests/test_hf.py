"""
hf.py and export.py --format hf against transformers itself: a nanoforge model exported as a Hugging Face folder
loads as LlamaForCausalLM (no remote code) and computes the same logits and greedy tokens; a random
LlamaForCausalLM loads into nanoforge and does the same; what nanoforge cannot express is refused by name.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import export  # noqa: E402
import hf  # noqa: E402
from generation import GenerationConfig, generate  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

TOL = 1e-4          # fp32 logits, max |difference|
GREEDY_TOKENS = 20


@pytest.fixture(autouse=True, scope="module")
def tokenizer_built_once():
    """Every export here writes gpt2's tokenizer.json; building it once saves seconds (test_export.py tests it)."""
    built, original = {}, export.tokenizer_json

    def cached(enc, specials):
        key = (enc.name, tuple(sorted(specials.items())))
        if key not in built:
            built[key] = original(enc, specials)
        return built[key]
    export.tokenizer_json = cached
    yield
    export.tokenizer_json = original


def peaky(model, std=1.0):
    """A random model with spread-out logits: at init (std 0.02) the top two logits of a step can sit 1e-6 apart,
    and greedy decoding would then compare rounding, not the two implementations."""
    torch.nn.init.normal_(model.wte.weight, std=std)
    return model.eval()


def save_run(tmp_path, config, extra=None):
    """A checkpoint folder as train.py writes it (the parts export reads)."""
    torch.manual_seed(0)
    model = peaky(GPT(config))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "config": {**vars(config), "tokenizer": "gpt2", **(extra or {})}},
               run / "ckpt.pt")
    return model, str(run)


def assert_same_model(ours, theirs, vocab):
    """ours: a nanoforge GPT; theirs: a transformers causal LM. Same logits (fp32) and 20 identical greedy tokens."""
    torch.manual_seed(1)
    idx = torch.randint(0, vocab, (2, 11))
    with torch.no_grad():
        diff = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    assert diff <= TOL, f"logits differ by {diff}"
    prompt = idx[:1]
    new = generate(ours, prompt[0].tolist(), GenerationConfig(max_new_tokens=GREEDY_TOKENS, temperature=0))
    a = torch.cat([prompt, torch.tensor([new])], dim=1)
    b = theirs.generate(prompt, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    assert a.shape == b.shape == (1, prompt.shape[1] + GREEDY_TOKENS)
    assert torch.equal(a, b), f"greedy tokens differ:\n{a.tolist()}\n{b.tolist()}"


SHAPES = {  # gpt2 vocabulary (the exported tokenizer's), tiny widths
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, block_size=64),
    "gpt2_shaped": dict(n_layer=2, n_embd=48, n_head=4, n_kv_head=4, ffn_hidden=96, block_size=64),
    "untied_gqa_wide_heads": dict(n_layer=2, n_embd=48, n_head=4, n_kv_head=2, head_dim=24, ffn_hidden=80,
                                  block_size=64, tie_embeddings=False, rope_theta=5e5, norm_eps=1e-6),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_nanoforge_to_transformers(tmp_path, shape):
    config = GPTConfig(vocab_size=50257, **SHAPES[shape])
    model, run = save_run(tmp_path, config)
    out = export.export(run, str(tmp_path / "hf"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert theirs.config.vocab_size == config.padded_vocab_size == 50304
    assert_same_model(model, theirs, 50257)
    # and back: the round trip restores the run config (vocabulary, padding) and the very same weights
    again, run_config = hf.load_hf_model(out)
    assert run_config["vocab_size"] == 50257 and run_config["vocab_pad_multiple"] == 64
    assert run_config["tokenizer"] == os.path.join(out, "tokenizer.json")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_bfloat16_export_loads_and_is_close(tmp_path):
    model, run = save_run(tmp_path, GPTConfig(vocab_size=50257, **SHAPES["tiny"]))
    out = export.export(run, str(tmp_path / "hf"), dtype="bfloat16")
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = torch.randint(0, 50257, (1, 9))
    with torch.no_grad():
        ref, got = model(idx)[0], theirs(idx).logits
    assert (ref - got).abs().max() < 0.05 * ref.abs().max()  # bf16 weights: ~3 significant digits


def random_llama(folder, **overrides):
    """A random LlamaForCausalLM saved as safetensors: GQA, head_dim != hidden / heads, untied."""
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24, max_position_embeddings=64, rms_norm_eps=1e-6,
               tie_word_embeddings=False, initializer_range=0.2, rope_theta=5e5)
    cfg.update(overrides)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    theirs.save_pretrained(folder)
    return theirs


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_to_nanoforge(tmp_path, tied):
    theirs = random_llama(tmp_path / "llama", tie_word_embeddings=tied)
    ours, config = hf.load_hf_model(str(tmp_path / "llama"))
    assert (config["n_head"], config["n_kv_head"], config["head_dim"], config["tie_embeddings"]) == (4, 2, 24, tied)
    assert config["rope_theta"] == 5e5 and config["norm_eps"] == 1e-6 and config["block_size"] == 64
    assert "tokenizer" not in config  # this folder has none
    assert_same_model(ours, theirs, 320)


def test_sharded_bfloat16_checkpoint_loads(tmp_path):
    """Hub checkpoints are often bf16 and, past a size, split into shards listed by model.safetensors.index.json."""
    theirs = random_llama(tmp_path / "fp32").to(torch.bfloat16)
    theirs.save_pretrained(tmp_path / "bf16", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "bf16" / "model.safetensors.index.json")
    ours, _ = hf.load_hf_model(str(tmp_path / "bf16"))
    assert ours.wte.weight.dtype == torch.float32  # widened on load
    # the reference: transformers reading the same files into fp32 (theirs.float() would keep the RoPE frequencies
    # that .to(bfloat16) rounded: they are a buffer of the module, not a weight in the file)
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    assert_same_model(ours, reference, 320)


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


@pytest.mark.parametrize("changes, message", [
    ({"attention_bias": True}, "attention_bias=True: nanoforge's linear layers have no bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0}}, "RoPE type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "RoPE type 'linear'"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type='qwen2': not a Llama"),
])
def test_what_nanoforge_cannot_express_is_refused(tmp_path, changes, message):
    folder = str(tmp_path / "llama")
    random_llama(folder)
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        hf.load_hf_model(folder)
    assert "config.json" in str(e.value)


def test_missing_and_extra_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = str(tmp_path / "llama")
    random_llama(folder)
    file = os.path.join(folder, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(96)
    save_file(tensors, file)
    with pytest.raises(ValueError, match="no place for.*q_proj.bias"):
        hf.load_hf_model(folder)
    del tensors["model.layers.0.self_attn.q_proj.bias"], tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(ValueError, match="missing tensors.*layers.1.mlp.up_proj"):
        hf.load_hf_model(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_hf_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hf.load_hf_model(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: missing or non-integer keys \['hidden_size'"):
        hf.load_hf_model(str(tmp_path))


@pytest.mark.parametrize("config, reason", [
    (dict(pos="sinusoidal", mlp="silu"), "pos='sinusoidal' has no Llama equivalent"),  # lime_1b
    (dict(pos="learned"), "pos='learned' has no Llama equivalent"),
    (dict(mlp="silu"), "mlp='silu' has no Llama equivalent"),
])
def test_presets_without_a_llama_equivalent_are_refused(tmp_path, config, reason):
    _, run = save_run(tmp_path, GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=2, ffn_hidden=64, vocab_size=300,
                                          block_size=16, **config))
    out = tmp_path / "hf"
    with pytest.raises(ValueError, match=reason):
        export.export(run, str(out))
    assert not out.exists()  # refused before anything was written
    assert os.path.exists(export.export(run, str(tmp_path / "native"), fmt="native"))  # --format native works
