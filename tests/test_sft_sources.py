"""The seeds' own instruction sets in prepare_sft.py: Kyoto-Corpus (Lille-130M-Instruct), RAG_Multilingual and
aya_dataset (LIME-1B). Each is written here as a small local file in the set's own schema (a handful of rows),
then goes prepare_sft.py -> shards (every assistant turn masked, multi-turn conversations kept whole, the passage
as the context) -> one sft.py step. The hub aliases name the real sets and splits (load_dataset stood in for),
English is the default language and --lang chooses another, and a bad row in each schema is one line naming the
file and line."""
import json
import math
import os
import runpy

import numpy as np
import pytest

import prepare_sft
import sft
import train
from chat_format import ChatFormat, get_encoding
from configurator import configure
from conftest import TINY_TEST_MODEL
from shards import list_shards, open_shard

GPT2 = get_encoding("gpt2")
LIME = ChatFormat("lime", GPT2)


def words(tag, n=30):
    """A sentence long enough that a conversation fills a 64-token window (the tiny model's context)."""
    return f"{tag}: " + " ".join(f"word{k}" for k in range(n)) + "."


# ---- rows in each set's schema (the fields prepare_sft.py's comment cites) ------------------------------------
def kyoto_rows():
    """Lille's template, some rows two turns long. Turns: (user, assistant) pairs, to check the masks against."""
    rows, turns = [], []
    for i in range(6):
        pairs = [(words(f"question {i}.{t}", 12), words(f"answer {i}.{t}")) for t in range(1 + (i % 2))]
        text = "<|startoftext|>" + "".join(f"<|user|>{u}<|assistant|>{a}<|endoftext|>" for u, a in pairs)
        rows.append({"text": text})
        turns.append(pairs)
    return rows, turns


def rag_rows():
    """RAG_Multilingual: instruction, context (the retrieved passage), response, lang in en | es | ca."""
    rows = []
    for i, lang in enumerate(["en", "es", "ca"] * 4):
        rows.append({"id": f"{lang}-{i}", "instruction": words(f"question {i}", 8),
                     "context": words(f"passage {i} ({lang})", 8), "response": words(f"response {i}", 20),
                     "category": "qa", "lang": lang, "extractive": f"span {i}"})
    return rows


def aya_rows():
    """aya_dataset: inputs, targets, language (a name), language_code (ISO 639-3), annotation_type, user_id."""
    langs = [("English", "eng"), ("Spanish", "spa")]
    return [{"inputs": words(f"prompt {i}", 10), "targets": words(f"completion {i}"), "language": langs[i % 2][0],
             "language_code": langs[i % 2][1], "annotation_type": "original-annotations", "user_id": f"u{i}"}
            for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(tmp_path, source, *args):
    out = str(tmp_path / "sft")
    meta = prepare_sft.main(["--format", "lime", "--tokenizer", "gpt2", "--block_size", "64", "--val_frac", "0.3",
                             "--workers", "1", "--out_dir", out, "--source", source, *args])
    return out, meta


def conversations(out):
    """Every conversation of every shard, as (tokens, mask) pairs, cut at the recorded conversation starts."""
    convs = []
    for split in ("val", "train"):
        for path in list_shards(out, split):
            tokens, mask, info = open_shard(path)
            bounds = list(info["doc_starts"]) + [len(tokens)]
            convs += [(np.asarray(tokens[a:b]), np.asarray(mask[a:b])) for a, b in zip(bounds, bounds[1:])]
    return convs


def trained_runs(tokens, mask):
    """The decoded runs of consecutive trained tokens: one per assistant turn (its answer and end token)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [LIME.decode(tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])]


# ---- rows -> conversations ------------------------------------------------------------------------------------
def test_seed_schemas_become_conversations():
    to = prepare_sft.to_messages
    rows, turns = kyoto_rows()
    assert to(rows[1]) == [{"role": r, "content": c} for pair in turns[1] for r, c in zip(("user", "assistant"), pair)]
    # the same conversation as messages or ShareGPT turns (Kyoto-Corpus's fields are not confirmed: all are read)
    msgs = to(rows[1])
    assert to({"messages": msgs}) == msgs
    assert to({"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                 for m in msgs]}) == msgs
    rag = rag_rows()[0]
    assert to(rag) == [{"role": "context", "content": rag["context"]}, {"role": "user", "content": rag["instruction"]},
                       {"role": "assistant", "content": rag["response"]}]
    aya = aya_rows()[0]
    assert to(aya) == [{"role": "user", "content": aya["inputs"]}, {"role": "assistant", "content": aya["targets"]}]
    with pytest.raises(ValueError, match="unrecognised row schema"):
        to({"text": "plain text, no template"})


def test_language_is_english_unless_chosen(tmp_path):
    rag, aya = write_jsonl(tmp_path / "rag.jsonl", rag_rows()), write_jsonl(tmp_path / "aya.jsonl", aya_rows())
    _, convs, _, stats = prepare_sft.load_source(rag, seed=0)
    assert stats["lang"] == ["en"] and len(convs) == 4 and all("(en)" in c[0]["content"] for c in convs)
    _, convs, _, _ = prepare_sft.load_source(aya, seed=0)
    assert len(convs) == 5                                                  # language_code eng
    for langs, n_rag, n_aya in ((["es", "spa"], 4, 5), (["Spanish", "ca"], 4, 5), (["es", "all"], 12, 10)):
        assert len(prepare_sft.load_source(rag, seed=0, langs=langs)[1]) == n_rag
        assert len(prepare_sft.load_source(aya, seed=0, langs=langs)[1]) == n_aya
    with pytest.raises(ValueError, match=r"no row has lang in \['de'\] \(its values: ca, en, es\)"):
        prepare_sft.load_source(rag, seed=0, langs=["de"])
    # a set without a language field is not filtered
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "q", "output": "a"}])
    assert len(prepare_sft.load_source(plain, seed=0, langs=["es"])[1]) == 1


def test_hub_aliases_load_the_named_sets(monkeypatch):
    """The hub path is real code even where the hub is unreachable: feed it rows shaped like the real sets."""
    import datasets
    fake = {"Nikity/Kyoto-Corpus": kyoto_rows()[0], "projecte-aina/RAG_Multilingual": rag_rows(),
            "CohereLabs/aya_dataset": aya_rows()}
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, split))
        return fake[name]
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert len(prepare_sft.load_source("kyoto", seed=0)[1]) == 6
    _, convs, _, stats = prepare_sft.load_source("rag_multilingual", seed=0)
    assert stats["rows"] == 12 and len(convs) == 4 and all(c[0]["role"] == "context" for c in convs)
    assert len(prepare_sft.load_source("aya:2", seed=0, langs=["spa"])[1]) == 5
    assert calls == [("Nikity/Kyoto-Corpus", "train"), ("projecte-aina/RAG_Multilingual", "train"),
                     ("CohereLabs/aya_dataset", "train")]


def test_help_lists_the_seed_sets(capsys):
    with pytest.raises(SystemExit):
        prepare_sft.main(["--help"])
    text = capsys.readouterr().out
    assert all(f"'{name}'" in text for name in ("kyoto", "rag_multilingual", "aya")) and "--lang" in text


# ---- through shards and one sft.py step -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(sample_data_dir, tmp_path_factory):
    """A tiny pretrained checkpoint (one step on the shipped OpenStax sample) for sft.py to start from."""
    out = tmp_path_factory.mktemp("base") / "pre"
    train.train(configure(train.DEFAULTS, TINY_TEST_MODEL + [f"--data_dir={sample_data_dir}", f"--out_dir={out}",
                                                             "--max_iters=1", "--eval_interval=1"]))
    return str(out)


def one_sft_step(data, base, out):
    cfg = configure(sft.DEFAULTS, [f"--data_dir={data}", f"--init_from={base}", f"--out_dir={out}", "--epochs=0",
                                   "--max_iters=1", "--warmup_frac=0", "--warmup_iters=0", "--batch_size=2",
                                   "--total_batch_tokens=128", "--eval_interval=1", "--eval_iters=1",
                                   "--compile=False", "--log_interval=1"])
    train.train(sft.prepare(cfg))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = [r[k] for r in rows for k in ("loss", "val_loss") if k in r]
    assert losses and all(math.isfinite(x) for x in losses), rows
    assert os.path.isfile(os.path.join(out, "ckpt.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("schema", ["kyoto", "rag_multilingual", "aya"])
def test_schema_to_shards_masks_and_one_sft_step(schema, tmp_path, tiny_base):
    if schema == "kyoto":
        rows, turns = kyoto_rows()
        answers = [[a for _, a in pairs] for pairs in turns]
    elif schema == "rag_multilingual":
        rows = rag_rows()
        answers = [[r["response"]] for r in rows if r["lang"] == "en"]
    else:
        rows = aya_rows()
        answers = [[r["targets"]] for r in rows if r["language_code"] == "eng"]
    out, meta = prepare(tmp_path, write_jsonl(tmp_path / f"{schema}.jsonl", rows))
    assert sum(s["kept"] for s in meta["sources"]) == len(answers) and not any(meta["dropped"]["train"].values())
    convs = conversations(out)
    assert len(convs) == len(answers)
    # the mask covers every assistant turn and only them: each trained run is one answer and its end token
    runs = sorted(trained_runs(t, m) for t, m in convs)
    assert runs == sorted([a + "<|endoftext|>" for a in turn] for turn in answers)
    if schema == "kyoto":                              # the two-turn conversations stayed whole: 2 runs in one
        assert sorted(len(r) for r in runs) == [1, 1, 1, 2, 2, 2]
    if schema == "rag_multilingual":                   # the passage is the format's context, before <user>
        for tokens, _ in convs:
            text = LIME.decode(tokens)
            assert "(en)" in text and text.index("passage") < text.index("<user>")
    one_sft_step(out, tiny_base, str(tmp_path / "run"))


# ---- bad rows: one line naming the file and line --------------------------------------------------------------
@pytest.mark.parametrize("name, bad, message", [
    ("kyoto.jsonl", {"text": "<|assistant|>an answer first<|user|>then a question"},
     r"kyoto.jsonl:3: field 'text': expected <\|user\|> then <\|assistant\|>"),
    ("kyoto.jsonl", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     r"kyoto.jsonl:3: field 'messages\[\].content' is null"),
    ("rag.jsonl", {**rag_rows()[0], "response": None}, r"rag.jsonl:3: field 'response' is null"),
    ("rag.jsonl", {k: v for k, v in rag_rows()[0].items() if k != "lang"}, r"rag.jsonl:3: no 'lang' field"),
    ("aya.jsonl", {**aya_rows()[0], "inputs": ["a", "list"]}, r"aya.jsonl:3: field 'inputs' is a list, not a string"),
])
def test_bad_row_is_named_by_file_and_line(tmp_path, name, bad, message):
    good = {"kyoto.jsonl": kyoto_rows()[0], "rag.jsonl": rag_rows(), "aya.jsonl": aya_rows()}[name]
    path = write_jsonl(tmp_path / name, [good[0], good[0], bad, good[0]])
    with pytest.raises(ValueError, match=message):
        prepare_sft.load_source(path, seed=0)


def test_bad_row_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "aya.jsonl", aya_rows()[:2] + [{**aya_rows()[0], "targets": None}])
    monkeypatch.setattr("sys.argv", ["prepare_sft.py", "--format", "lime", "--out_dir", str(tmp_path / "o"),
                                     "--source", path])
    with pytest.raises(SystemExit, match=r"^error: .*aya.jsonl:3: field 'targets' is null$"):
        runpy.run_path(prepare_sft.__file__, run_name="__main__")
