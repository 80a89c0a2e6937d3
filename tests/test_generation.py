"""generation.py: logit processors on constructed logits, KV-cache decoding against full recomputation, beam
search against greedy and against exhaustive search, stopping rules."""
import itertools

import pytest
import torch

from generation import (GenerationConfig, apply_repetition_penalty, ban_repeated_ngrams, beam_search, generate,
                        process_logits, stream)
from model import GPT, GPTConfig, KVCache

NEG = float("-inf")


def tiny_gpt(vocab_size=50257, seed=0, sharp=True, **kw):
    """The brief's tiny model. `sharp` widens the random weights so greedy decoding does not just repeat one
    token (a freshly initialised GPT's logits are nearly flat), which would make the comparisons trivial."""
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, vocab_size=vocab_size, block_size=128)
    model = GPT(GPTConfig(**{**cfg, **kw})).eval()
    if sharp:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
    return model


PROMPT = [50256, 464, 3139, 286, 4881, 318]


# ---- logit processors -----------------------------------------------------------------------------------------
def test_repetition_penalty_divides_positive_multiplies_negative_once():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    seqs = torch.tensor([[0, 1, 1, 0], [3, 3, 3, 3]])
    out = apply_repetition_penalty(logits, seqs, 2.0)
    assert torch.equal(out[0], torch.tensor([1.0, -2.0, 0.5, 3.0]))   # ids 0 and 1 seen (twice: penalised once)
    assert torch.equal(out[1], torch.tensor([2.0, -1.0, 0.5, 1.5]))   # only id 3 seen
    assert torch.equal(apply_repetition_penalty(logits, seqs, 1.0), logits)
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, 3.0]))  # the input is not modified


def test_no_repeat_ngram_bans_exactly_the_completing_tokens():
    logits = torch.zeros(3, 10)
    seqs = torch.tensor([[5, 6, 7, 5, 6],    # "5 6" was followed by 7: with n=3, 7 is banned
                         [1, 2, 3, 4, 5],    # no repeated bigram: nothing banned
                         [5, 6, 7, 5, 6]])
    out = ban_repeated_ngrams(logits, seqs, 3)
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [7]
    assert not torch.isinf(out[1]).any()
    out2 = ban_repeated_ngrams(logits, seqs, 2)  # tail "6": 6 was followed by 7
    assert torch.isinf(out2[0]).nonzero().flatten().tolist() == [7]
    out2b = ban_repeated_ngrams(logits, torch.tensor([[1, 2, 1, 3, 1]]), 2)  # 1 was followed by 2 and by 3
    assert torch.isinf(out2b[0]).nonzero().flatten().tolist() == [2, 3]
    out1 = ban_repeated_ngrams(logits[:1], torch.tensor([[4, 2]]), 1)
    assert torch.isinf(out1[0]).nonzero().flatten().tolist() == [2, 4]
    assert torch.equal(ban_repeated_ngrams(logits, seqs, 0), logits)
    assert torch.equal(ban_repeated_ngrams(logits, seqs, 6), logits)  # longer than the sequence


def test_no_repeat_ngram_against_a_python_reference():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 4):
        seqs = torch.randint(0, 4, (5, 30), generator=g)
        out = ban_repeated_ngrams(torch.zeros(5, 4), seqs, n)
        for row, banned in zip(seqs.tolist(), torch.isinf(out).tolist()):
            tail = tuple(row[len(row) - n + 1:])
            expect = {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == tail}
            assert {t for t, b in enumerate(banned) if b} == expect


def test_process_logits_allowed_bias_and_min_length():
    gen = GenerationConfig(min_new_tokens=2, stop_ids=(3,), logit_bias={1: 5.0})
    logits = torch.zeros(1, 5)
    allowed = torch.tensor([True, True, True, True, False])
    out = process_logits(logits, torch.tensor([[0]]), 0, gen, allowed)
    assert out.tolist() == [[0.0, 5.0, 0.0, NEG, NEG]]                  # stop banned before min, 4 not allowed
    assert process_logits(logits, torch.tensor([[0]]), 2, gen, allowed)[0, 3] == 0.0  # allowed after min
    assert logits.eq(0).all()


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(num_beams=0), dict(max_new_tokens=0),
                                 dict(min_new_tokens=5, max_new_tokens=2), dict(repetition_penalty=0)])
def test_generation_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


# ---- decoding with a model ------------------------------------------------------------------------------------
def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_gpt()
    # logits: prefill + one-token steps from the cache == one forward over the whole sequence
    seq = torch.tensor([PROMPT + [11, 262, 1110, 13]])
    full = model(seq)[0]
    cache = KVCache(model.config, 1, seq.shape[1], "cpu", torch.float32)
    steps = [model(seq[:, :len(PROMPT)], cache=cache)[0]]
    for t in range(len(PROMPT), seq.shape[1]):
        steps.append(model(seq[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    # tokens: greedy streaming with the cache == greedy by recomputing everything each step
    gen = GenerationConfig(max_new_tokens=16, temperature=0)
    cached = list(stream(model, PROMPT, gen))
    ids = list(PROMPT)
    for _ in range(16):
        ids.append(int(model(torch.tensor([ids]), last_only=True)[0][0, -1].argmax()))  # no cache: every position
    assert cached == ids[len(PROMPT):]
    assert len(set(cached)) > 3  # not a degenerate one-token loop


def test_beam_search_with_one_beam_is_greedy():
    model = tiny_gpt()
    for extra in ({}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}):
        greedy = generate(model, PROMPT, GenerationConfig(max_new_tokens=12, temperature=0, **extra))
        beam, _ = beam_search(model, PROMPT, GenerationConfig(max_new_tokens=12, num_beams=1, **extra))
        assert beam == greedy


def test_beam_search_one_beam_greedy_with_a_stop_token():
    model = tiny_gpt()
    greedy = generate(model, PROMPT, GenerationConfig(max_new_tokens=8, temperature=0))
    stop = greedy[5]  # pretend the 6th greedy token is the end token: both must stop right there
    gen = dict(max_new_tokens=20, stop_ids=(stop,))
    g = generate(model, PROMPT, GenerationConfig(temperature=0, **gen))
    b, _ = beam_search(model, PROMPT, GenerationConfig(num_beams=1, **gen))
    assert g == b == greedy[:greedy.index(stop) + 1]


def sequence_logprob(model, prompt, new):
    logp = torch.log_softmax(model(torch.tensor([prompt + new]))[0][0].float(), dim=-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(new))


@pytest.mark.parametrize("depth, beams", [(2, 8), (3, 64)])
def test_beam_search_is_exact_when_beams_cover_every_prefix(depth, beams):
    """With vocabulary V = 8 and K >= V^(depth-1) beams nothing is ever pruned, so beam search must return the
    best of all V^depth continuations, scored by a full forward pass (catches cache reordering mistakes)."""
    model = tiny_gpt(vocab_size=8, vocab_pad_multiple=1, seed=1)
    prompt = [1, 2, 3]
    candidates = torch.tensor(list(itertools.product(range(8), repeat=depth)))         # (8^depth, depth)
    seqs = torch.cat([torch.tensor(prompt).expand(len(candidates), -1), candidates], dim=1)
    logp = torch.log_softmax(model(seqs)[0].float(), dim=-1)[:, len(prompt) - 1:-1]   # predicts each new token
    totals = logp.gather(2, candidates[:, :, None])[:, :, 0].sum(1)
    best = candidates[totals.argmax()].tolist()
    found, score = beam_search(model, prompt, GenerationConfig(max_new_tokens=depth, num_beams=beams,
                                                               length_penalty=0.0))
    assert found == best
    assert score == pytest.approx(sequence_logprob(model, prompt, found), abs=1e-4)


def test_beam_search_finds_higher_likelihood_than_greedy():
    model = tiny_gpt()
    gen = dict(max_new_tokens=12, length_penalty=0.0)
    greedy = generate(model, PROMPT, GenerationConfig(temperature=0, **gen))
    beam, score = beam_search(model, PROMPT, GenerationConfig(num_beams=4, **gen))
    assert score == pytest.approx(sequence_logprob(model, PROMPT, beam), abs=1e-3)
    assert score >= sequence_logprob(model, PROMPT, greedy) - 1e-4


def test_stream_stops_at_stop_id_and_respects_min_new_tokens():
    model = tiny_gpt()
    stop = 50256
    out = list(stream(model, PROMPT, GenerationConfig(max_new_tokens=30, temperature=0, stop_ids=(stop,),
                                                       min_new_tokens=4, logit_bias={stop: 1e4})))
    assert out == out[:4] + [stop] and stop not in out[:4]       # forced to stop, but not before 4 tokens
    allowed = torch.ones(model.config.padded_vocab_size, dtype=torch.bool)
    allowed[stop] = False                                         # a disallowed id is never produced, bias or not
    out = list(stream(model, PROMPT, GenerationConfig(max_new_tokens=5, temperature=0, logit_bias={stop: 1e4}),
                      allowed))
    assert stop not in out and len(out) == 5


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny_gpt()
    gen = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9)
    a = generate(model, PROMPT, gen, generator=torch.Generator().manual_seed(3))
    b = generate(model, PROMPT, gen, generator=torch.Generator().manual_seed(3))
    assert a == b
    top1 = generate(model, PROMPT, GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=1))
    assert top1 == generate(model, PROMPT, GenerationConfig(max_new_tokens=10, temperature=0))


def test_context_limits():
    model = tiny_gpt()
    out = list(stream(model, list(range(120)), GenerationConfig(max_new_tokens=50, temperature=0)))
    assert len(out) == 8  # clipped to the 128-token context
    with pytest.raises(ValueError, match="no room left"):
        list(stream(model, list(range(128)), GenerationConfig(temperature=0)))
    with pytest.raises(ValueError, match="empty"):
        beam_search(model, [], GenerationConfig(num_beams=2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_and_beams_on_gpu(dtype):
    """On the GPU the prefill runs the Triton attention kernel and the steps SDPA on cached keys: the logits must
    still match a full forward pass, in fp32 and in bf16 weights (chat.py's default there)."""
    from chat import cast_weights
    model = cast_weights(tiny_gpt().cuda(), dtype)
    assert model.rope_cos.dtype == torch.float32 and model.wte.weight.dtype == getattr(torch, dtype)
    seq = torch.tensor([PROMPT + [11, 262, 1110, 13]], device="cuda")
    with torch.no_grad():
        full = model(seq)[0].float()
        cache = KVCache(model.config, 1, seq.shape[1], "cuda", model.wte.weight.dtype)
        steps = [model(seq[:, :len(PROMPT)], cache=cache)[0]]
        steps += [model(seq[:, t:t + 1], cache=cache)[0] for t in range(len(PROMPT), seq.shape[1])]
    cached = torch.cat(steps, dim=1).float()
    scale = full.abs().max().item()
    assert (cached - full).abs().max().item() <= (0.05 if dtype == "bfloat16" else 5e-3) * scale + 1e-3
    greedy = generate(model, PROMPT, GenerationConfig(max_new_tokens=16, temperature=0))
    beam, _ = beam_search(model, PROMPT, GenerationConfig(max_new_tokens=16, num_beams=1))
    assert len(beam) == len(greedy) == 16
    if dtype == "float32":  # bf16 logits can tie exactly, and argmax and topk may break a tie differently
        assert beam == greedy
    sampled = generate(model, PROMPT, GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=50),
                       generator=torch.Generator("cuda").manual_seed(0))
    assert len(sampled) == 8


# ---- sampling (moved here with sample_next from model.py) -----------------------------------------------------
def test_sample_next_top_k_and_top_p_restrict_the_choice():
    from generation import sample_next
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0).item() == 0                                   # greedy
    assert {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)} == {0, 1}
    # probabilities ~ [0.72, 0.26, 0.013, ...]: top_p 0.5 keeps only the first, 0.9 the first two
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)} == {0}
    assert {sample_next(logits, 1.0, top_p=0.9, generator=g).item() for _ in range(300)} == {0, 1}
