"""model.py: exact parameter counts, the causal property, the KV cache, and every architectural switch."""
import glob
import os

import pytest
import torch

from configurator import read_config_file
from model import GPT, GPTConfig, KVCache, describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (preset, our exact count with the tokenizer's vocabulary). auto_g_nano_1b must match its card to the parameter.
EXPECTED_PARAMS = {
    "auto_g_nano_1b": 1_050_002_688,
    "gpt2_124m": 123_551_232,
    "lille_130m": 127_171_200,     # on its own 32,768-token tokenizer, as Lille's code (138,364,160 on gpt2)
    "parchment_166m": 161_966_592,
    "lime_1b": 983_264_256,
    "lrc_1p5b": 1_606_374_912,
    "tiny": 1_311_872,             # on the 4,096-token tokenizer of the shipped sample (assets/openstax_4k.json)
}


def meta_model(**kw):
    with torch.device("meta"):
        return GPT(GPTConfig(**kw))


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts(preset):
    cfg = GPTConfig.from_dict(read_config_file(os.path.join(ROOT, "config", f"{preset}.py")))
    assert meta_model(**vars(cfg)).num_params() == EXPECTED_PARAMS[preset]
    assert "parameters" in describe(cfg)


def test_every_pretraining_preset_is_counted():
    presets = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "config", "*.py"))}
    assert {p for p in presets if not p.startswith(("sft", "distill"))} <= set(EXPECTED_PARAMS)  # recipes on a model


def test_lille_with_its_own_vocabulary_matches_its_code():
    cfg = GPTConfig.from_dict(read_config_file(os.path.join(ROOT, "config", "lille_130m.py")))
    cfg.vocab_size = 32768
    assert meta_model(**vars(cfg)).num_params() == 127_171_200  # "127.2M" in Lille's code


def test_padding_rows_are_allocated_but_not_counted():
    m = meta_model(vocab_size=100, vocab_pad_multiple=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, ffn_hidden=64)
    assert m.wte.weight.shape[0] == 128
    assert m.num_params(count_padding=True) - m.num_params() == 28 * 32
    untied = meta_model(vocab_size=100, vocab_pad_multiple=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, ffn_hidden=64,
                        tie_embeddings=False)
    assert untied.num_params(count_padding=True) - untied.num_params() == 2 * 28 * 32


def small(**kw):
    base = dict(n_layer=2, n_embd=48, n_head=6, n_kv_head=2, ffn_hidden=96, vocab_size=101, block_size=32)
    base.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**base)).eval()


VARIANTS = [dict(), dict(n_kv_head=1), dict(n_kv_head=6), dict(head_dim=16), dict(pos="sinusoidal"),
            dict(pos="learned"), dict(mlp="silu"), dict(tie_embeddings=False), dict(rope_theta=500000.0)]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_causal_changing_token_t_leaves_earlier_logits(kw):
    model = small(**kw)
    idx = torch.randint(0, 101, (2, 20))
    logits, _ = model(idx)
    t = 11
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % 101
    logits2, _ = model(idx2)
    torch.testing.assert_close(logits[:, :t], logits2[:, :t], rtol=0, atol=1e-6)
    assert (logits[:, t:] - logits2[:, t:]).abs().max() > 1e-4  # and the change does reach the later positions


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_kv_cache_decoding_equals_recomputation(kw):
    model = small(**kw)
    idx = torch.randint(0, 101, (2, 17))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
    pieces = [model(idx[:, :9], cache=cache)[0]]               # prefill 9
    pieces.append(model(idx[:, 9:12], cache=cache)[0])         # a chunk of 3 (needs the offset causal mask)
    for t in range(12, 17):                                    # then one token at a time
        pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 17


@pytest.mark.parametrize("backend", ["torch", "triton,attention=torch"])
def test_blocks_compute_the_textbook_block(backend):
    """The logits and gradients of the model, through whichever kernels the backend picks, must be those of the
    textbook pre-norm loop x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) written here with the twins; 'triton'
    runs the Triton kernels (the interpreter on CPU; the small test model's head dim 8 is below the attention
    kernel's 16)."""
    from kernels import set_backend
    from kernels.rmsnorm import rmsnorm_torch
    model = small(n_layer=3)
    idx = torch.randint(0, 101, (2, 13))

    def textbook():
        x = model.wte(idx)
        cos_sin = (model.rope_cos[:13], model.rope_sin[:13])
        for layer, b in enumerate(model.blocks):
            x = x + b.attn(rmsnorm_torch(x, b.ln_1.weight, b.ln_1.eps), cos_sin, None, layer)
            x = x + b.mlp(rmsnorm_torch(x, b.ln_2.weight, b.ln_2.eps))
        return model.lm_head(rmsnorm_torch(x, model.ln_f.weight, model.ln_f.eps))

    try:
        set_backend(backend)
        ours = model(idx)[0]
        g_ours = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
        set_backend("torch")
        ref = textbook()
        g_ref = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    finally:
        set_backend(os.environ.get("NANOFORGE_KERNELS", "auto"))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_head_dim_differs_from_width():
    model = small(n_embd=48, n_head=6, n_kv_head=2, head_dim=16)   # 6 x 16 = 96 query dims > 48
    assert model.blocks[0].attn.c_attn.weight.shape == (96 + 2 * 2 * 16, 48)
    assert model.blocks[0].attn.c_proj.weight.shape == (48, 96)
    assert model(torch.randint(0, 101, (1, 5)))[0].shape == (1, 5, 128)


def test_gqa_is_not_multi_head_in_disguise():
    """With one KV head, all query heads read the same keys: a model with n_kv_head=1 has fewer weights."""
    assert small(n_kv_head=1).num_params() < small(n_kv_head=2).num_params() < small(n_kv_head=6).num_params()


def test_tied_and_untied_heads():
    tied, untied = small(), small(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == 101 * 48


def test_positions_matter():
    """Each position scheme makes the model order-aware: swapping two tokens changes the last logits."""
    for pos in ("rope", "sinusoidal", "learned"):
        model = small(pos=pos)
        idx = torch.tensor([[1, 2, 3, 4, 5, 6]])
        swapped = torch.tensor([[2, 1, 3, 4, 5, 6]])
        assert (model(idx)[0][:, -1] - model(swapped)[0][:, -1]).abs().max() > 1e-5, pos


def test_loss_ignores_minus_one_targets():
    model = small()
    idx = torch.randint(0, 101, (2, 10))
    tgt = torch.randint(0, 101, (2, 10))
    masked = tgt.clone()
    masked[:, :5] = -1
    logits, loss = model(idx)[0], model(idx, masked)[1]  # with targets the fused loss returns no logits
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, logits.size(-1)), tgt[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_generate_greedy_matches_argmax_of_recomputation():
    model = small()
    from generation import GenerationConfig, generate
    idx = torch.randint(0, 101, (1, 6))
    out = generate(model, idx[0].tolist(), GenerationConfig(max_new_tokens=8, temperature=0.0))
    seq = idx
    for _ in range(8):
        nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert out == seq[0, 6:].tolist()


def test_generate_top_k_and_top_p_restrict_the_choice():
    from generation import sample_next
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)} <= {0, 1}
    # probabilities ~ [0.72, 0.26, 0.013, ...]: top_p 0.5 keeps only the first, 0.9 the first two
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)} == {0}
    assert {sample_next(logits, 1.0, top_p=0.9, generator=g).item() for _ in range(300)} == {0, 1}


def test_generate_stops_at_stop_token_and_context():
    from generation import GenerationConfig, generate
    model = small()
    ids = torch.randint(0, 101, (4,)).tolist()
    first = generate(model, ids, GenerationConfig(max_new_tokens=1, temperature=0.0))[0]
    out = generate(model, ids, GenerationConfig(max_new_tokens=10, temperature=0.0, stop_ids=(first,)))
    assert out == [first]                          # stopped right after producing the stop token
    assert len(generate(model, ids, GenerationConfig(max_new_tokens=1000, temperature=0.0))) == 28  # context 32


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="longer than the context"):
        small()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("bad, msg", [(dict(n_head=6, n_kv_head=4), "must divide"),
                                      (dict(mlp="gelu"), "mlp="), (dict(pos="alibi"), "pos="),
                                      (dict(n_embd=50, n_head=6), "not divisible")])
def test_bad_config_is_a_clear_error(bad, msg):
    with pytest.raises(ValueError, match=msg):
        GPTConfig(**bad)


@pytest.mark.parametrize("pos", ["rope", "sinusoidal"])
def test_casting_the_model_keeps_position_tables_fp32(pos):
    model = small(pos=pos).to(torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in model.buffers())
    ref = small(pos=pos)
    for (n, b), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, r), n  # not rounded on the way


@pytest.mark.parametrize("pos,kv", [("rope", 2), ("learned", 6), ("sinusoidal", 1)])
def test_doc_starts_isolate_packed_documents(pos, kv):
    """Two documents packed in one window, each starting where doc_starts is True: with it,
    each scores exactly as it does alone (positions restart for learned / sinusoidal; RoPE is relative)."""
    torch.manual_seed(0)
    model = small(pos=pos, n_kv_head=kv)
    g = torch.Generator().manual_seed(1)
    a = torch.cat([torch.tensor([0]), torch.randint(1, 100, (6,), generator=g)])
    b = torch.cat([torch.tensor([0]), torch.randint(1, 100, (8,), generator=g)])
    packed = torch.stack([torch.cat([a, b]), torch.cat([b, a])])   # two rows, the documents in both orders
    with torch.no_grad():
        logits, _ = model(packed, doc_starts=packed == 0)
        alone_a, _ = model(a[None])
        alone_b, _ = model(b[None])
        mixed, _ = model(packed)
    torch.testing.assert_close(logits[0, :7], alone_a[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[0, 7:], alone_b[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1, :9], alone_b[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1, 9:], alone_a[0], rtol=1e-4, atol=1e-5)
    assert (mixed[0, 7:] - alone_b[0]).abs().max() > 1e-3  # without it, b attends to a (and its positions move)


def test_doc_starts_window_starting_mid_document():
    """A window that begins inside a document (no start token first) keeps that tail as one document."""
    torch.manual_seed(0)
    model = small()
    x = torch.tensor([[5, 6, 7, 0, 8, 9]])
    with torch.no_grad():
        logits, _ = model(x, doc_starts=x == 0)
        head, _ = model(x[:, :3])
        tail, _ = model(x[:, 3:])
    torch.testing.assert_close(logits[0, :3], head[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[0, 3:], tail[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="KV-cache"):
        model(x, cache=KVCache(model.config, 1, 32, "cpu", torch.float32), doc_starts=x == 0)
    with pytest.raises(ValueError, match="shape"):
        model(x, doc_starts=(x == 0)[:, :4])
