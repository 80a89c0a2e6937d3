"""
Tests for eval.py / eval_tasks.py: the scorer picks what a model with known preferences prefers, the metrics
differ where they should, batching/padding/truncation change nothing, every rendering equals
lm-evaluation-harness's (hand-written expected strings from its task files), a local file row and the hub row
of the same item render alike, every real task file parses, a random model sits at chance, bits per byte is
exact for a uniform model, the LRC suite's table comes out of a tiny checkpoint on the stand-in files in
tests/data/evals, and bad input ends in a one-line error before anything is scored or overwritten.
"""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
from tokenizer import get_encoding
import torch
import torch.nn as nn

import eval as nf_eval
import eval_tasks
from conftest import SHARED
from model import GPT, GPTConfig

EVAL_DATA = os.environ.get("NANOFORGE_EVAL_DATA") or os.path.join(SHARED, "data", "evals")   # the real files
STAND_INS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "evals")    # hand-written rows
needs_data = pytest.mark.skipif(not os.path.isdir(EVAL_DATA), reason=f"shared eval data not found at {EVAL_DATA}")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def enc():
    return get_encoding("gpt2")


class PreferenceStub(nn.Module):
    """A model with the GPT forward signature whose next-token distribution we know exactly: uniform (all
    logits 0) over `vocab` entries, except that after token a it puts logit `boost` on favourite[a].
    `padding_bait` puts a huge logit on a vocabulary padding slot (id >= n_vocab) everywhere: the scorer must
    slice the padding off, or every greedy test fails."""

    def __init__(self, vocab, favourite=None, boost=30.0, padding_bait=None):
        super().__init__()
        fav = torch.full((vocab,), -1, dtype=torch.long)
        for a, b in (favourite or {}).items():
            fav[a] = b
        self.register_buffer("fav", fav)
        self.vocab, self.boost, self.padding_bait = vocab, boost, padding_bait

    def forward(self, idx, targets=None, cache=None, last_only=False):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        f = self.fav[idx]
        hit = f >= 0
        logits[hit, f[hit]] = self.boost
        if self.padding_bait is not None:
            logits[:, :, self.padding_bait] = 100.0
        return logits, None


def one_token(enc, text):
    ids = enc.encode_ordinary(text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def tiny_gpt(block_size=256, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, vocab_size=50257,
                    block_size=block_size)
    return GPT(cfg).eval()


# ---- multiple choice -------------------------------------------------------------------------------------------
def test_forced_choice_picks_the_favoured_ending(enc):
    # after the context's last word the stub favours one specific next word; that choice must win, wherever
    # it sits among the choices, under all three rules, with padding slots baited
    words = [" mat", " dog", " hat", " car"]
    ctx_ends = [" the", " a", " my", " your", " our"]
    fav, items = {}, []
    for k, end in enumerate(ctx_ends):
        gold = k % len(words)
        fav[one_token(enc, end)] = one_token(enc, words[gold])
        items.append({"pairs": [(f"The cat sat on{end}", w) for w in words], "gold": gold,
                      "norm_texts": [w.strip() for w in words]})
    stub = PreferenceStub(50304, fav, padding_bait=50300)
    r = nf_eval.run_task(stub, enc, "hellaswag", items, block_size=32, device=CPU, batch_size=3)
    assert r["acc"] == r["acc_norm"] == r["acc_token"] == 1.0
    assert r["chance"] == 0.25 and r["n"] == 5
    # and a stub with no preference at all cannot find them (equal one-token choices tie -> choice 0)
    r0 = nf_eval.run_task(PreferenceStub(50304), enc, "hellaswag", items, block_size=32, device=CPU)
    assert r0["acc"] == 2 / 5            # golds 0, 1, 2, 3, 0


def test_acc_and_acc_norm_disagree_when_lengths_differ(enc):
    # uniform model: log p(choice) = -k ln V for a k-token choice. acc prefers the fewest tokens; acc_norm
    # (per character, lm-evaluation-harness) prefers the most characters per token; acc_token (llm.c: mean per
    # token) sees a tie. Choice 1 is a long word of few tokens.
    short, long_ = " cat", " internationalization"
    k_short, k_long = len(enc.encode_ordinary(short)), len(enc.encode_ordinary(long_))
    assert k_short == 1 and k_long > 1 and k_long / len(long_.strip()) < k_short / len(short.strip())
    item = {"pairs": [("I saw a", short), ("I saw a", long_)], "gold": 1, "norm_texts": ["cat", "internationalization"]}
    stub = PreferenceStub(enc.n_vocab)
    r = nf_eval.run_task(stub, enc, "piqa", [item], block_size=32, device=CPU)
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0 and r["acc_token"] == 0.0
    scored = nf_eval.score_requests(stub, [(enc.encode_ordinary(c), enc.encode_ordinary(x)) for c, x in item["pairs"]],
                                    32, enc.n_vocab, CPU)
    np.testing.assert_allclose(scored["logprob"], [-k_short * math.log(enc.n_vocab), -k_long * math.log(enc.n_vocab)],
                               rtol=1e-6)


def test_batching_padding_and_truncation_change_nothing(enc):
    # a real (random) GPT: one request at a time == batched with right padding == a hand-written reference;
    # a context longer than the window is cut on the left and the continuation kept whole
    model = tiny_gpt(block_size=64)
    gen = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(0, 50257, (n_ctx,), generator=gen).tolist(),
             torch.randint(0, 50257, (n_cont,), generator=gen).tolist())
            for n_ctx, n_cont in [(1, 1), (5, 3), (17, 9), (40, 2), (3, 20), (63, 2), (64, 2), (200, 7)]]
    one = nf_eval.score_requests(model, reqs, 64, 50257, CPU, batch_size=1)
    many = nf_eval.score_requests(model, reqs, 64, 50257, CPU, batch_size=16, batch_tokens=10_000)
    np.testing.assert_allclose(one["logprob"], many["logprob"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(one["greedy"], many["greedy"])
    assert many["truncated"] == 2        # (63, 2) fits exactly (65 = 64 + 1); (64, 2) and (200, 7) do not
    for (ctx, cont), got in zip(reqs, many["logprob"]):
        seq = (ctx + cont)[-65:]         # what the window can hold: block_size + 1 tokens
        n_ctx = len(seq) - len(cont)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0][0, :, :50257].double(), -1)
        want = sum(logp[n_ctx - 1 + i, t].item() for i, t in enumerate(cont))
        assert abs(got - want) < 1e-3


def test_a_continuation_longer_than_the_window_is_scored_in_pieces(enc):
    # a 150-token continuation against a 64-token window (a PIQA solution against a tiny model): pieces of 32
    # tokens, each after the 33 before it. The stub's next token depends on the last token only, so the pieces
    # must sum to the exact log-likelihood: a favoured step log(e^30 / (e^30 + V - 1)), any other -log V
    V, boost = 1000, 30.0
    cont = [(7 * i) % 500 for i in range(150)]
    fav = {a: b for a, b in zip(cont[:99], cont[1:100])}        # the first 99 steps favoured, the rest not
    stub = PreferenceStub(V, fav, boost)
    ctx = [3] * 10                                              # 3 is never favoured: the first token is not
    scored = nf_eval.score_requests(stub, [(ctx, cont), ([1], cont[:5])], 64, V, CPU)
    z = math.log(math.exp(boost) + V - 1)
    favoured = sum(fav.get(a) == b for a, b in zip([3] + cont[:-1], cont))
    assert favoured == 99
    np.testing.assert_allclose(scored["logprob"][0], favoured * (boost - z) - (150 - favoured) * math.log(V),
                               rtol=1e-7)   # fp32 log_softmax; one token misplaced costs 6.9
    assert list(scored["n_tokens"]) == [150, 5] and not scored["greedy"][0]
    assert [len(p[0]) - p[1] for p in nf_eval.fit_window(ctx, cont, 64)] == [32] * 4 + [22]
    assert [p[1] for p in nf_eval.fit_window(ctx, cont, 64)] == [10, 33, 33, 33, 43]   # the window filled


# ---- renderings: equal to lm-evaluation-harness v0.4.8's task files ----------------------------------------------
def pairs_of(name, canonical_row):
    item = eval_tasks.RENDER[eval_tasks.TASKS[name].kind](canonical_row)
    return item["pairs"], item["gold"]


def test_new_renderings_equal_the_harness_definitions():
    # arc/arc_challenge.yaml: "Question: {{question}}\nAnswer:", choices.text, choices.label.index(answerKey)
    arc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
           "answerKey": "2"}
    assert pairs_of("arc_challenge", eval_tasks.arc_from_hub(arc)) == (
        [("Question: Which is a gas?\nAnswer:", " ice"), ("Question: Which is a gas?\nAnswer:", " steam"),
         ("Question: Which is a gas?\nAnswer:", " rock")], 1)
    # sciq/sciq.yaml: "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", [d1, d2, d3, correct], target 3
    rows = eval_tasks.read_rows(os.path.join(STAND_INS, "sciq", "sciq_test.jsonl"))
    ctx = "Plants take in carbon dioxide and release oxygen.\nQuestion: What gas do plants take in for " \
          "photosynthesis?\nAnswer:"
    assert pairs_of("sciq", eval_tasks.sciq_row(rows[0][1])) == (
        [(ctx, " oxygen"), (ctx, " nitrogen"), (ctx, " helium"), (ctx, " carbon dioxide")], 3)
    assert pairs_of("sciq", eval_tasks.sciq_row(rows[1][1]))[0][3] == (
        "\nQuestion: What is the boiling point of water at sea level in Celsius?\nAnswer:", " 100")   # no support
    # logiqa/utils_logiqa.py: "Passage: ..\nQuestion: ..\nChoices:\nA. ..\nD. ..\nAnswer:", choices = option texts
    row = eval_tasks.read_rows(os.path.join(STAND_INS, "logiqa", "logiqa_test.jsonl"))[0][1]
    ctx = ("Passage: All cats in the house are grey. Tom is a cat in the house.\nQuestion: Which must be true?\n"
           "Choices:\nA. Tom is black.\nB. Tom is grey.\nC. Tom is outside.\nD. Tom is a dog.\nAnswer:")
    assert pairs_of("logiqa", eval_tasks.logiqa_row(row)) == (
        [(ctx, " Tom is black."), (ctx, " Tom is grey."), (ctx, " Tom is outside."), (ctx, " Tom is a dog.")], 1)
    # mmlu: description "The following are multiple choice questions (with answers) about {subject}.\n\n" +
    # "{{question.strip()}}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:", choices A-D, target answer
    mmlu = {"question": " What is 2 + 3? ", "subject": "high_school_us_history", "choices": ["4", "5", "6", "7"],
            "answer": 1}
    ctx = ("The following are multiple choice questions (with answers) about high school us history.\n\n"
           "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    item = eval_tasks.choice(eval_tasks.mmlu_row(mmlu))
    assert item["pairs"] == [(ctx, " A"), (ctx, " B"), (ctx, " C"), (ctx, " D")] and item["gold"] == 1
    assert item["group"] == "high_school_us_history" and len(eval_tasks.MMLU_SUBJECTS) == 57


def test_boolq_copa_csqa_equal_the_harness_from_hub_and_from_file():
    # super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"], label
    hub = {"passage": "Frogs -- Frogs start life as tadpoles.", "question": "do frogs start life in water",
           "label": 1}
    ctx = "Frogs -- Frogs start life as tadpoles.\nQuestion: do frogs start life in water?\nAnswer:"
    assert pairs_of("boolq", eval_tasks.boolq_from_hub(hub)) == ([(ctx, " no"), (ctx, " yes")], 1)
    local = {"query": "Passage: Frogs -- Frogs start life as tadpoles.\nQuestion: do frogs start life in water?",
             "choices": ["no", "yes"], "gold": 1}          # llm-foundry's row: a "Passage: " prefix, no "Answer:"
    assert pairs_of("boolq", eval_tasks.boolq_from_file(local)) == ([(ctx, " no"), (ctx, " yes")], 1)
    # super_glue/copa/utils.py: premise.strip()[:-1] + " therefore", choices " " + lower-first, target_delimiter
    # " " in front: a double space, and no comma
    hub = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.",
           "question": "effect", "label": 1}
    want = ([("The man turned on the faucet therefore", "  the toilet filled."),
             ("The man turned on the faucet therefore", "  water flowed.")], 1)
    assert pairs_of("copa", eval_tasks.copa_from_hub(hub)) == want
    local = {"query": "The man turned on the faucet, therefore", "choices": ["the toilet filled.", "water flowed."],
             "gold": 1}
    assert pairs_of("copa", eval_tasks.copa_from_file(local)) == want
    cause = dict(hub, question="cause", premise="My body cast a shadow over the grass.")
    assert pairs_of("copa", eval_tasks.copa_from_hub(cause))[0][0][0] == "My body cast a shadow over the grass because"
    # commonsense_qa/default.yaml: "Question: {{question.strip()}}\nA. ..\nE. ..\nAnswer:", choices A-E, answerKey
    hub = {"question": "Where is a wet umbrella put? ", "answerKey": "C",
           "choices": {"label": list("ABCDE"), "text": ["oven", "bed", "stand", "fridge", "sink"]}}
    ctx = "Question: Where is a wet umbrella put?\nA. oven\nB. bed\nC. stand\nD. fridge\nE. sink\nAnswer:"
    assert pairs_of("commonsense_qa", eval_tasks.csqa_from_hub(hub)) == ([(ctx, " " + x) for x in "ABCDE"], 2)
    local = {"query": "Question: Where is a wet umbrella put?\nChoices:\nA. oven\nB. bed\nC. stand\nD. fridge\n"
                      "E. sink\nAnswer:", "choices": list("ABCDE"), "gold": 2}
    assert pairs_of("commonsense_qa", eval_tasks.csqa_from_file(local)) == ([(ctx, " " + x) for x in "ABCDE"], 2)


def test_logiqa_file_rows_render_as_the_hub_rows():
    # llm-foundry's "Context: ..\nQuestion: ..\nChoices: A. .." with letters as choices -> the harness's prompt
    # with the option texts as choices, the same item as the hub's row
    local = eval_tasks.read_rows(os.path.join(STAND_INS, "llm_foundry", "logi_qa.jsonl"))
    hub = eval_tasks.read_rows(os.path.join(STAND_INS, "logiqa", "logiqa_test.jsonl"))
    for (_, row), (_, hub_row) in zip(local, hub):
        assert eval_tasks.logiqa_from_file(row) == eval_tasks.logiqa_row(hub_row)
    row = dict(local[0][1], query=local[0][1]["query"].replace("\nQuestion: ", "\n"))
    with pytest.raises(ValueError, match="query should read 'Context: "):
        eval_tasks.logiqa_from_file(row)
    with pytest.raises(ValueError, match="choices should be the letters A-D"):
        eval_tasks.logiqa_from_file(dict(local[0][1], choices=["w", "x", "y", "z"]))


def test_other_hub_rows_convert_like_the_local_files():
    # the online path's converters, on rows shaped like the hub datasets (no network here)
    piqa = eval_tasks.piqa_from_hub({"goal": "Keep bread fresh", "sol1": "bag it", "sol2": "sun it", "label": 0})
    assert piqa == eval_tasks.foundry("\nAnswer:")({"query": "Question: Keep bread fresh\n", "choices": ["bag it",
                                                                                                "sun it"], "gold": 0})
    wino = eval_tasks.winogrande_from_hub({"sentence": "Sarah was better than Maria so _ got the easy cases.",
                                           "option1": "Sarah", "option2": "Maria", "answer": "2"})
    assert wino == {"context_options": ["Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"],
                    "continuation": "got the easy cases.", "gold": 1}
    hs = eval_tasks.hellaswag_from_hub({"ctx": "Bake a cake. [title] Mix the  flour.", "endings": ["a [step] b"] * 4,
                                        "label": "2"})
    assert hs["query"] == "Bake a cake.. Mix the flour." and hs["choices"][0] == "a b" and hs["gold"] == 2
    assert eval_tasks.lm(eval_tasks.lambada_from_hub({"text": "he said hello"})) == {"context": "he said",
                                                                                      "continuation": " hello"}


MANIFEST_COUNTS = {"hellaswag": 10042, "arc_easy": 2376, "piqa": 1838, "boolq": 3270, "copa": 100,
                   "commonsense_qa": 1221, "winogrande": 1267, "lambada_openai": 5153,
                   "simple_arithmetic_nospaces": 1000, "simple_arithmetic_withspaces": 1000}


@needs_data
@pytest.mark.parametrize("name", eval_tasks.SUITES["core"])
def test_task_file_parses_into_the_documented_rendering(name):
    data = eval_tasks.load_items(name, EVAL_DATA)
    items = data["items"]
    assert len(items) == MANIFEST_COUNTS[name]
    kind = eval_tasks.TASKS[name].kind
    for it in items[:5]:
        if kind in ("choice", "schema"):
            assert len(it["pairs"]) >= 2 and 0 <= it["gold"] < len(it["pairs"])
            for ctx, cont in it["pairs"]:
                assert ctx and ctx == ctx.rstrip() and cont.startswith(" ") and cont.strip() == cont.lstrip()
            assert len(it["norm_texts"]) == len(it["pairs"])
        elif kind == "lm":
            assert it["context"] == it["context"].rstrip() and it["continuation"].startswith(" ")
        else:
            assert it["answer"].strip().lstrip("-").isdigit()
    first = items[0]
    if name in ("arc_easy", "piqa"):
        assert first["pairs"][0][0].startswith("Question: ") and first["pairs"][0][0].endswith("\nAnswer:")
    if name == "boolq":   # the harness's prompt: no "Passage: " prefix
        assert first["pairs"][0][0].startswith("All biomass goes") and first["pairs"][0][0].endswith("?\nAnswer:")
        assert [c for _, c in first["pairs"]] == [" no", " yes"] and "Title" in data["note"]
    if name == "copa":
        assert first["pairs"][1] == ("The man turned on the faucet therefore", "  water flowed from the spout.")
    if name == "commonsense_qa":   # lettered, no "Choices:" line; the local file's 4 choices are flagged
        assert "\nChoices:" not in first["pairs"][0][0] and first["pairs"][0][0].endswith("\nD. new york\nAnswer:")
        assert first["pairs"][0][1] == " A" and "not comparable" in data["note"]
    if name == "hellaswag":
        assert first["pairs"][3] == ("A man is sitting on a roof. he", " starts pulling up roofing on a roof.")
        assert first["gold"] == 3
    if name == "winogrande":   # partial evaluation: two contexts, one shared continuation
        (c0, x0), (c1, x1) = first["pairs"]
        assert c0 != c1 and x0 == x1 == " always got the easier cases."
    if name == "simple_arithmetic_nospaces":
        assert first == {"context": "25-759=", "answer": "-734"}
    if name == "simple_arithmetic_withspaces":
        assert first == {"context": "25 - 759 =", "answer": " -734"}
    assert (data["note"] is None) == (name not in ("boolq", "commonsense_qa"))


# ---- a random model is at chance -------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("name,n", [("hellaswag", 160), ("piqa", 200)])
def test_random_init_model_scores_near_chance(enc, name, n):
    items = eval_tasks.load_items(name, EVAL_DATA, limit=n)["items"]
    r = nf_eval.run_task(tiny_gpt(256), enc, name, items, block_size=256, device=CPU, batch_size=64,
                         batch_tokens=4096)
    se = math.sqrt(r["chance"] * (1 - r["chance"]) / n)
    for metric in ("acc", "acc_norm", "acc_token"):
        assert abs(r[metric] - r["chance"]) < 4 * se, (metric, r)


# ---- LAMBADA and arithmetic ------------------------------------------------------------------------------------
def test_lambada_greedy_match_and_perplexity(enc):
    ctx, word = "I look at him and I don't care about", " signs"
    last, w = enc.encode_ordinary(ctx)[-1], one_token(enc, word)
    items = [{"context": ctx, "continuation": word}, {"context": ctx, "continuation": " dogs"}]
    r = nf_eval.run_task(PreferenceStub(50304, {last: w}, padding_bait=50299), enc, "lambada_openai", items,
                         block_size=64, device=CPU)
    assert r["acc"] == 0.5
    # item 1: log p ~ 0; item 2: " dogs" after the boosted word: -(30 + ln(e^30 + V - 1) - 30) ~ -30
    lp_dogs = -math.log(math.exp(30) + enc.n_vocab - 1)
    assert r["ppl"] == pytest.approx(math.exp(-(0 + lp_dogs) / 2), rel=1e-3)


def test_arithmetic_exact_match_by_greedy_generation(enc):
    eq, four, nl = one_token(enc, "="), one_token(enc, "4"), one_token(enc, "\n")
    stub = PreferenceStub(50304, {eq: four, four: nl}, padding_bait=50303)
    items = [{"context": "2+2=", "answer": "4"}, {"context": "2+3=", "answer": "5"},
             {"context": "1+1+1+1=", "answer": "4"}]
    r = nf_eval.run_task(stub, enc, "simple_arithmetic_nospaces", items, block_size=32, device=CPU, batch_size=2)
    assert r["acc"] == pytest.approx(2 / 3) and r["examples"][0]["generated"].startswith("4\n")
    assert nf_eval.answer_is_right(" -734. and", "-734") and nf_eval.answer_is_right("-734", " -734")
    assert not nf_eval.answer_is_right("-7345", "-734") and not nf_eval.answer_is_right("x -734", "-734")


# ---- bits per byte ---------------------------------------------------------------------------------------------
def test_sliding_windows_score_every_token_once():
    tokens = list(range(1000, 1000 + 137))
    for block, stride in [(16, 16), (16, 5), (16, 1), (200, 100)]:
        reqs = nf_eval.window_requests(tokens, block, stride)
        scored = [t for _, cont in reqs for t in cont]
        assert scored == tokens[1:]
        for k, (ctx, cont) in enumerate(reqs):
            assert len(ctx) + len(cont) <= block + 1
            window = ctx + cont
            assert window == list(range(window[0], window[0] + len(window)))   # a contiguous stretch
            if k > 0:
                assert len(ctx) >= block + 1 - stride


def test_bpb_of_a_uniform_model_is_log2_vocab_times_tokens_per_byte(enc, tmp_path):
    docs = ["Short one.", "A longer document, with ünïcödé bytes and numbers 12345. " * 12, "x" * 300]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokens = sum(len(enc.encode_ordinary(d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    want = math.log2(enc.n_vocab) * tokens / n_bytes
    for stride in (32, 7):
        b = nf_eval.bits_per_byte(PreferenceStub(50304, padding_bait=50257), enc, nf_eval.read_documents(str(path)),
                                  32, CPU, stride)
        assert b["tokens"] == tokens and b["bytes"] == n_bytes and b["bpb"] == pytest.approx(want, rel=1e-6)
    txt = tmp_path / "doc.txt"
    txt.write_text(docs[1])
    b = nf_eval.bits_per_byte(PreferenceStub(enc.n_vocab), enc, nf_eval.read_documents(str(txt)), 32, CPU)
    assert b["bpb"] == pytest.approx(math.log2(enc.n_vocab) * len(enc.encode_ordinary(docs[1])) / len(docs[1].encode()))


# ---- MMLU: per subject, micro and macro -------------------------------------------------------------------------
def test_mmlu_reports_every_subject_and_both_averages(enc):
    # the stub always answers " B" after "Answer:"; stand-in golds: mathematics B, C (0.5), anatomy C (0.0)
    items = eval_tasks.load_items("mmlu", STAND_INS)["items"]
    stub = PreferenceStub(50304, {one_token(enc, ":"): one_token(enc, " B")}, padding_bait=50300)
    r = nf_eval.run_task(stub, enc, "mmlu", items, block_size=128, device=CPU)
    assert r["subjects"] == {"anatomy": {"n": 1, "acc": 0.0, "acc_norm": 0.0, "acc_token": 0.0},
                             "elementary_mathematics": {"n": 2, "acc": 0.5, "acc_norm": 0.5, "acc_token": 0.5}}
    assert r["acc"] == pytest.approx(1 / 3) and r["acc_macro"] == 0.25    # harness's mean over items; macro
    assert r["stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))   # sample std / sqrt(n), as the harness


# ---- the command line ------------------------------------------------------------------------------------------
def save_tiny_checkpoint(folder, step, seed):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, ffn_hidden=64, block_size=64)
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": GPT(cfg).state_dict(), "config": {**dataclasses.asdict(cfg), "tokenizer": "gpt2"},
                "step": step}, os.path.join(folder, "ckpt.pt"))


def test_lrc_suite_prints_the_card_table_for_each_run(tmp_path, capsys):
    a, b = str(tmp_path / "run_a"), str(tmp_path / "run_b")
    save_tiny_checkpoint(a, 7, 0)
    save_tiny_checkpoint(b, 9, 1)
    common = ["--suite", "lrc", "--data_root", STAND_INS, "--bpb_file", "none", "--device", "cpu"]
    nf_eval.main([a] + common)  # the checkpoint positional, as chat.py and export.py take it
    res = json.load(open(os.path.join(a, "eval.json")))
    assert list(res["tasks"]) == eval_tasks.SUITES["lrc"] and res["suite"] == "lrc" and res["step"] == 7
    assert set(res["tasks"]["mmlu"]["subjects"]) == {"anatomy", "elementary_mathematics"}
    assert "not comparable" in res["tasks"]["commonsense_qa"]["note"]         # the 4-choice stand-in
    out = capsys.readouterr().out
    header = next(l for l in out.splitlines() if l.startswith("run "))
    assert header.split() == ["run", "ARC-E", "ARC-C", "LogiQA", "CSQA", "PIQA", "WinoG", "BoolQ", "SciQ", "MMLU", "Avg"]
    cells = next(l for l in out.splitlines() if l.startswith("run_a ")).split()[1:]
    want = [100 * res["tasks"][t][m] for _, t, m in eval_tasks.LRC_COLUMNS]
    assert [float(c.rstrip("*")) for c in cells] == pytest.approx([round(w, 2) for w in want + [sum(want) / 9]],
                                                                  abs=0.006)
    assert [c.endswith("*") for c in cells] == [False, False, True, True, False, False, True, False, False, False]
    nf_eval.main(["--compare", a, b, "--reference"] + common)   # a: read from eval.json, b: evaluated now
    lines = capsys.readouterr().out.splitlines()
    rows = [l.split()[0] for l in lines if l.split() and l.split()[0] in ("LRC-1.5B-SFT", "run_a", "run_b")]
    assert rows == ["LRC-1.5B-SFT", "run_a", "run_b"] and os.path.exists(os.path.join(b, "eval.json"))
    assert next(l for l in lines if l.startswith("LRC-1.5B-SFT")).split()[-1] == "63.48"


def lrc_cells(out, run):
    return next(l for l in out.splitlines() if l.startswith(run + " ")).split()[1:]


def test_lrc_suite_offline_marks_sciq_and_mmlu_as_needing_online(tmp_path, capsys):
    # the data root ../shared has: no sciq/ and no mmlu/ folders
    import shutil
    root = tmp_path / "evals"
    shutil.copytree(os.path.join(STAND_INS, "llm_foundry"), root / "llm_foundry")
    run = str(tmp_path / "tiny")
    save_tiny_checkpoint(run, 3, 0)
    nf_eval.main(["--ckpt", run, "--suite", "lrc", "--data_root", str(root), "--bpb_file", "none", "--device", "cpu"])
    res = json.load(open(os.path.join(run, "eval.json")))
    assert list(res["needs_online"]) == ["sciq", "mmlu"] and len(res["tasks"]) == 7
    out = capsys.readouterr().out
    cells = lrc_cells(out, "tiny")
    assert [c == "online" for c in cells] == [False] * 7 + [True, True, False] and cells[-1] == "-"
    assert all(float(c.rstrip("*")) >= 0 for c in cells[:7])
    assert "tiny SciQ, MMLU: needs --online" in out and "needs --online  (no local file" in out
    # named tasks are never skipped: --tasks sciq without its file is still the error naming it
    assert error_of(["--ckpt", run, "--tasks", "sciq", "--data_root", str(root), "--bpb_file", "none"]).startswith(
        "error: sciq: task file")


@needs_data
def test_lrc_suite_runs_offline_on_the_shared_files(tmp_path, capsys):
    run = str(tmp_path / "tiny")
    save_tiny_checkpoint(run, 3, 0)
    nf_eval.main(["--ckpt", run, "--suite", "lrc", "--limit", "16", "--data_root", EVAL_DATA, "--bpb_file", "none",
                  "--device", "cpu"])
    cells = lrc_cells(capsys.readouterr().out, "tiny")
    assert sum(c not in ("online", "-") for c in cells) == 7 and cells[7:9] == ["online", "online"]
    assert cells[2].endswith("*")                            # LogiQA: llm-foundry's text, flagged


@needs_data
def test_cli_core_tasks_write_eval_json_and_compare_runs(tmp_path, capsys):
    a, b = str(tmp_path / "run_a"), str(tmp_path / "run_b")
    save_tiny_checkpoint(a, 7, 0)
    save_tiny_checkpoint(b, 9, 1)
    text = tmp_path / "held_out.txt"
    text.write_text("The mitochondria is the powerhouse of the cell. " * 20)
    common = ["--tasks", "copa,winogrande,lambada_openai,simple_arithmetic_withspaces", "--limit", "4",
              "--bpb_file", str(text), "--device", "cpu", "--data_root", EVAL_DATA]
    nf_eval.main(["--ckpt", a] + common)
    res = json.load(open(os.path.join(a, "eval.json")))
    assert res["step"] == 7 and res["limit"] == 4 and set(res["tasks"]) == {"copa", "winogrande", "lambada_openai",
                                                                             "simple_arithmetic_withspaces"}
    assert res["tasks"]["copa"]["n"] == 4 and res["tasks"]["copa"]["chance"] == 0.5 and res["bpb"]["bpb"] > 0
    out = capsys.readouterr().out
    assert "acc_norm" in out and "bits per byte" in out and "simple_arithmetic_withspaces: llm-foundry's" in out
    nf_eval.main(["--compare", a, b] + common)
    out = capsys.readouterr().out
    header = [l for l in out.splitlines() if l.startswith("task") and "run_a" in l]
    assert header and "run_b" in header[0]
    assert any(l.startswith("step") and l.split()[-2:] == ["7", "9"] for l in out.splitlines())


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        nf_eval.main(argv)
    return str(e.value.code)


def test_help_names_the_tasks_and_suites(capsys):
    with pytest.raises(SystemExit):
        nf_eval.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in ("arc_challenge", "sciq", "logiqa", "mmlu", "--suite", "core:", "lrc:", "--reference"):
        assert word in text


def test_bad_arguments_are_one_line_errors_that_keep_eval_json(tmp_path, capsys):
    run = str(tmp_path / "run")
    save_tiny_checkpoint(run, 1, 0)
    kept = os.path.join(run, "eval.json")
    open(kept, "w").write('{"earlier": "results"}')
    base = ["--ckpt", run, "--bpb_file", "none", "--data_root", STAND_INS]
    assert error_of(base + ["--tasks", ""]).startswith("error: --tasks '' names no task")
    assert error_of(base + ["--tasks", " , "]).startswith("error: --tasks ' , ' names no task")
    assert error_of(base + ["--suite", "lrcc"]) == "error: unknown suite 'lrcc'; known: core, lrc"
    msg = error_of(base + ["--tasks", "sciq,mmluu"])
    assert msg.startswith("error: unknown task(s) ['mmluu']") and "mmlu" in msg
    assert error_of(base + ["--tasks", "sciq", "--suite", "lrc"]) == "error: give --tasks or --suite, not both"
    assert "--reference adds" in error_of(base + ["--tasks", "sciq", "--reference"])
    assert "no checkpoint at" in error_of(["--ckpt", str(tmp_path / "nope"), "--tasks", "sciq", "--bpb_file", "none"])
    msg = error_of(["--ckpt", run, "--tasks", "copa", "--data_root", str(tmp_path)])
    assert msg.startswith("error: copa: task file") and "not found" in msg and "--online" in msg
    assert "bits-per-byte file" in error_of(base + ["--tasks", "sciq", "--bpb_file", str(tmp_path / "no.jsonl")])
    assert open(kept).read() == '{"earlier": "results"}' and "evaluating" not in capsys.readouterr().out


def test_bad_files_are_named_with_their_line_before_any_task_runs(tmp_path, capsys):
    run = str(tmp_path / "run")
    save_tiny_checkpoint(run, 1, 0)
    kept = os.path.join(run, "eval.json")
    open(kept, "w").write('{"earlier": "results"}')
    root = tmp_path / "evals"
    for sub in ("sciq", "mmlu"):
        (root / sub).mkdir(parents=True)
        (root / sub / f"{sub}_test.jsonl").write_text(open(os.path.join(STAND_INS, sub, f"{sub}_test.jsonl")).read())
    mmlu = root / "mmlu" / "mmlu_test.jsonl"
    good = mmlu.read_bytes()

    def fails_with(text, mmlu_bytes=good, bpb_file="none"):
        mmlu.write_bytes(mmlu_bytes)    # mmlu is the LAST task: a bad row there must stop the run before sciq
        msg = error_of(["--ckpt", run, "--tasks", "sciq,mmlu", "--data_root", str(root), "--bpb_file", bpb_file])
        assert text in msg, msg
    fails_with(f"{mmlu}:2: not valid JSON", good.replace(b'"answer": 2}', b'"answer": 2', 1))
    fails_with(f"{mmlu}:3: not UTF-8", good.replace(b"heart", b"he\xffrt"))
    fails_with(f"{mmlu}:1: not in the mmlu format (KeyError: 'subject')", good.replace(b'"subject"', b'"topic"', 1))
    fails_with(f"{mmlu}:3: not in the mmlu format (ValueError: unknown MMLU subject 'anatomyy')",
               good.replace(b'"anatomy"', b'"anatomyy"'))
    fails_with(f"{mmlu}:1: not in the mmlu format (TypeError: 'choices' must be a list of strings",
               good.replace(b'["4", "5", "6", "7"]', b'"4567"'))
    fails_with(f"{mmlu}:1: gold=7 with 4 choices", good.replace(b'"answer": 1', b'"answer": 7'))
    fails_with(f"{mmlu}:1: a JSON object expected, not list", b"[1, 2]\n" + good)
    fails_with(f"{mmlu}: no mmlu items", b"\n\n")
    text = tmp_path / "held_out.txt"
    text.write_bytes(b"fine\nline two \xff\nthree\n")
    fails_with(f"{text}:2: not UTF-8", bpb_file=str(text))
    docs = tmp_path / "held_out.jsonl"
    docs.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    fails_with(f"{docs}:2: no \"text\" string field", bpb_file=str(docs))
    assert open(kept).read() == '{"earlier": "results"}' and "evaluating" not in capsys.readouterr().out


def test_hub_split_errors_and_hub_rows_without_network(tmp_path, monkeypatch):
    # a stand-in `datasets` module: the real one would need the network
    import sys
    import types
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        if split != "validation":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\', \'validation\'].')
        return [{"premise": "The sun rose.", "choice1": "It got light.", "choice2": "It got dark.",
                 "question": "effect", "label": 0}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = eval_tasks.load_items("copa", str(tmp_path), online=True)            # no local file: the hub's rows
    assert data["source"] == "aps/super_glue/copa (validation)" and calls == [("aps/super_glue", "copa", "validation")]
    assert data["items"][0]["pairs"][0] == ("The sun rose therefore", "  it got light.") and data["note"] is None
    monkeypatch.setitem(eval_tasks.TASKS, "copa", dataclasses.replace(eval_tasks.TASKS["copa"],
                                                                      hub=("aps/super_glue", "copa", "test")))
    with pytest.raises(ValueError, match=r"copa: cannot load aps/super_glue/copa \(test\) from the hub "
                                         r"\(ValueError: Unknown split \"test\""):
        eval_tasks.load_items("copa", str(tmp_path), online=True)
    with pytest.raises(FileNotFoundError, match="no hub dataset is known"):
        eval_tasks.load_items("simple_arithmetic_nospaces", str(tmp_path), online=True)


# ---- GPU: bf16 autocast + Triton kernels agree with the CPU, and the full suite is fast -----------------------
@pytest.mark.gpu
def test_gpu_scores_match_cpu(enc):
    model = tiny_gpt(block_size=256)
    gen = torch.Generator().manual_seed(2)
    reqs = [(torch.randint(0, 50257, (n,), generator=gen).tolist(),
             torch.randint(0, 50257, (m,), generator=gen).tolist())
            for n, m in [(3, 2), (50, 10), (130, 30), (255, 1), (300, 40)]]
    cpu = nf_eval.score_requests(model, reqs, 256, 50257, CPU)
    gpu = nf_eval.score_requests(model.cuda(), reqs, 256, 50257, torch.device("cuda"), batch_size=4)
    # bf16 logits: ~0.01-0.05 nats per token
    np.testing.assert_allclose(gpu["logprob"], cpu["logprob"], rtol=0.02, atol=0.1)


@pytest.mark.gpu
@needs_data
def test_gpu_full_suite_speed(enc):
    """The core suite in full + bits per byte with a gpt2_124m-shaped model (random weights: timing only)."""
    import time
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=12, n_embd=768, n_head=12, n_kv_head=12, ffn_hidden=2048, block_size=1024)
    model = GPT(cfg).cuda().eval()
    t0 = time.time()
    tasks, bpb = nf_eval.prepare(eval_tasks.SUITES["core"], EVAL_DATA, bpb_file=nf_eval.DEFAULT_BPB_FILE)
    res = nf_eval.evaluate(model, enc, tasks, 1024, torch.device("cuda"), bpb, batch_tokens=32768)
    seconds = time.time() - t0
    print(nf_eval.format_table(res))
    print(f"full suite: {seconds:.1f} s on {torch.cuda.get_device_name()}")
    assert res["tasks"]["hellaswag"]["n"] == 10042 and abs(res["tasks"]["hellaswag"]["acc"] - 0.25) < 0.03
    assert seconds < 300
