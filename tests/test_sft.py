"""prepare_sft.py, sft.py and chat.py: schemas and weights, the shards and their masks as train.py reads them,
the pad layout, every bad-input error, context overflow in chat, the smoke checks, and the CPU pipeline
(tiny pretrain -> prepare_sft on the Alpaca sample -> sft, loss falls -> one chat turn that ends at the end token)."""
import hashlib
import json
import os
import runpy

import numpy as np
import pytest
import torch

import chat
import prepare_sft
import sft
import train
from chat_format import ChatFormat
from configurator import configure
from conftest import TINY_TEST_MODEL
from generation import GenerationConfig
from model import GPT, GPTConfig
from shards import list_shards, open_shard
from tokenizer import get_encoding

GPT2 = get_encoding("gpt2")


def prepare(tmp_path, *args, name="sft"):
    out = str(tmp_path / name)
    meta = prepare_sft.main(["--out_dir", out, "--workers", "1", *args])
    return out, meta


def fake_checkpoint(path, tokenizer="gpt2", chat_format=None, **model):
    """A small random-weights checkpoint as train.py would write it (only the parts loaders read)."""
    cfg = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, vocab_size=50257, block_size=128)
    cfg.update(model)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**cfg))
    config = {**cfg, "tokenizer": tokenizer, "vocab_pad_multiple": gpt.config.vocab_pad_multiple}
    if chat_format:
        config["chat_format"] = chat_format
    os.makedirs(path, exist_ok=True)
    torch.save({"model": gpt.state_dict(), "config": config, "step": 0}, os.path.join(path, "ckpt.pt"))
    return str(path)


# ---- prepare_sft.py -------------------------------------------------------------------------------------------
def test_row_schemas_become_conversations():
    to = prepare_sft.to_messages
    assert to({"instruction": "I", "input": "C", "output": "O"}) == [
        {"role": "context", "content": "C"}, {"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}]
    assert to({"instruction": "I", "context": "", "response": "R", "category": "open_qa"})[-2:] == [
        {"role": "user", "content": "I"}, {"role": "assistant", "content": "R"}]
    assert to({"problem": "2 + 2", "answer": 4})[-1] == {"role": "assistant", "content": "4"}
    assert to({"context": "C", "question": "Q", "answer": "A"})[0] == {"role": "context", "content": "C"}
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert to({"prompt": "u", "prompt_id": "x", "messages": msgs}) == msgs
    assert to({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}) == msgs
    with pytest.raises(ValueError, match="unrecognised row schema"):
        to({"text": "just text"})


def test_weights_categories_and_simplemath_balance(tmp_path):
    rows = [{"instruction": f"q{i}", "response": f"a{i}", "category": ["open_qa", "brainstorming"][i % 2]}
            for i in range(40)] + [{"instruction": "empty answer", "response": " ", "category": "open_qa"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, convs, w, stats = prepare_sft.load_source(f"{path}:2.5", seed=0, categories=("open_qa",))
    assert w == 2.5 and stats["rows"] == 41 and len(convs) == 20  # other category and the empty answer dropped
    rng = __import__("random").Random(0)
    val, train_part = prepare_sft.split_and_weight(convs, 2.5, 0.1, rng)
    assert len(val) == 2 and len(train_part) == 45                # 18 * 2 + 9
    assert not {json.dumps(c) for c in val} & {json.dumps(c) for c in train_part}  # copies stay out of val
    maths = [(f"m.jsonl:{i}", {"problem": p, "answer": 0})   # (where, row), as the loader passes them
             for i, p in enumerate(["1 + 1"] * 5 + ["3 * 3"] * 2 + ["8 / 2"], 1)]
    chosen = prepare_sft.balance_operators(maths, 3, rng)
    assert sorted(r["problem"] for _, r in chosen) == ["1 + 1"] * 3 + ["3 * 3"] * 2 + ["8 / 2"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_sft.load_source("no_such_file.jsonl", seed=0)


def test_hub_sources_with_a_stand_in_for_load_dataset(monkeypatch):
    """The hub path is real code even where the hub is unreachable: feed it rows shaped like the real sets."""
    import datasets
    fake = {
        "Cleanlab/databricks-dolly-15k-cleaned": [
            {"instruction": f"q{i}", "context": "passage" if i % 2 else "", "response": f"a{i}",
             "category": ["closed_qa", "open_qa", "creative_writing", "information_extraction"][i % 4]}
            for i in range(8)],
        "ProCreations/SimpleMath": [{"problem": f"{i} {op} 2", "answer": i} for i in range(3000) for op in "+-*/"],
        "HuggingFaceH4/ultrachat_200k": [{"prompt": "hi", "prompt_id": "0", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    }
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, split))
        return fake[name]
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    _, convs, _, stats = prepare_sft.load_source("dolly_parchment", seed=0)
    assert stats["rows"] == 8 and len(convs) == 6                  # creative_writing dropped (ParchmentLM's filter)
    assert sum(m["role"] == "context" for c in convs for m in c) == 4   # rows 1, 3, 5, 7 have a passage
    _, convs, _, _ = prepare_sft.load_source("simplemath", seed=0)
    assert len(convs) == 4 * 2500                                  # 2,500 per operator
    _, convs, _, _ = prepare_sft.load_source("ultrachat:0.5", seed=0)
    assert convs[0][-1]["content"] == "hello"
    assert calls == [("Cleanlab/databricks-dolly-15k-cleaned", "train"), ("ProCreations/SimpleMath", "train"),
                     ("HuggingFaceH4/ultrachat_200k", "train_sft")]

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="offline, use a local file"):
        prepare_sft.load_source("no_robots", seed=0)


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_pack_shards_masks_and_loader(tmp_path):
    out, meta = prepare(tmp_path, "--format", "alpaca", "--source", "alpaca_tiny_local", "--block_size", "64",
                        "--val_frac", "0.1")
    assert [os.path.basename(p) for p in list_shards(out, "val")] == ["val_000000.bin"]
    assert [os.path.basename(p) for p in list_shards(out, "train")] == ["train_000001.bin"]
    assert meta["vocab_size"] == 50257 and meta["format"] == "alpaca" and meta["tokenizer"] == "gpt2"
    tokens, mask, info = open_shard(list_shards(out, "train")[0], 50304)
    assert info["vocab_size"] == 50257 and mask is not None and len(mask) == len(tokens)
    # every conversation: bos, prompt (mask 0), answer + end-of-text (mask 1)
    fmt = ChatFormat("alpaca", GPT2)
    text = fmt.decode(tokens)
    assert text.count("### Response:\n") == 90 and text.startswith("<|endoftext|>Below is an instruction")
    trained = fmt.decode(np.asarray(tokens)[np.asarray(mask) == 1])
    assert trained.count("<|endoftext|>") == 90 and "### Response" not in trained and "Below is" not in trained
    # train.py's loader: targets are -1 exactly where the target token's mask is 0
    windows = train.TokenWindows(out, "train", 64, 50304, seed=0, shuffle=False)
    x, y, _ = windows.batch(0, 3, torch.device("cpu"))
    for r in range(3):
        start = r * 64
        assert torch.equal(x[r], torch.from_numpy(tokens[start:start + 64].astype(np.int64)))
        expected = torch.from_numpy(tokens[start + 1:start + 65].astype(np.int64))
        expected[torch.from_numpy(mask[start + 1:start + 65] == 0)] = -1
        assert torch.equal(y[r], expected)


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_doc_starts_mark_conversations_not_turns(tmp_path):
    """Packed shards carry .docs.bin: the loader's doc_starts are True exactly where a conversation begins. In the
    parchment format end-of-text also separates turns, so the eot fallback would split conversations: the file
    is what keeps a multi-turn conversation whole under doc_mask."""
    out, meta = prepare(tmp_path, "--format", "parchment", "--source", "alpaca_tiny_local", "--block_size", "64",
                        "--val_frac", "0.1")
    path = list_shards(out, "train")[0]
    tokens, _, info = open_shard(path)
    starts = info["doc_starts"]
    assert len(starts) == meta["shards"][1]["conversations"] and starts[0] == 0
    assert (np.asarray(tokens)[starts] == GPT2.eot_token).all()      # each conversation opens with end-of-text
    n_eot = int((np.asarray(tokens) == GPT2.eot_token).sum())
    assert n_eot > 2 * len(starts)                                    # ... and eot separates its turns too
    windows = train.TokenWindows(out, "train", 64, 50304, seed=0, shuffle=False)
    x, y, flags = windows.batch(0, 4, torch.device("cpu"), doc_starts=True)
    for r in range(4):
        want = torch.zeros(64, dtype=torch.bool)
        inside = starts[(starts >= r * 64) & (starts < r * 64 + 64)] - r * 64
        want[torch.from_numpy(inside)] = True
        assert torch.equal(flags[r], want)


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_prepare_is_deterministic(tmp_path):
    digests = []
    for name in ("a", "b"):
        out, _ = prepare(tmp_path, "--format", "chatml", "--source", "alpaca_tiny_local:1.5", "--block_size", "64",
                         name=name)
        digests.append([hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest()
                        for f in sorted(os.listdir(out)) if f.endswith(".bin")])
    assert digests[0] == digests[1] and len(digests[0]) == 6   # val + train: tokens, mask, document starts


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_pad_layout_one_conversation_per_window(tmp_path):
    out, meta = prepare(tmp_path, "--format", "parchment", "--layout", "pad", "--block_size", "128",
                        "--source", "alpaca_tiny_local", "--val_frac", "0.1")
    fmt = ChatFormat("parchment", GPT2)
    assert meta["vocab_size"] == fmt.ids["pad"] + 1 == 50258      # the pad slot widens the header vocabulary
    assert meta["dropped"]["train"]["too_long"] > 0                # long answers do not fit 128 tokens
    tokens, mask, _ = open_shard(list_shards(out, "train")[0])
    n = meta["shards"][1]["conversations"]
    assert len(tokens) == n * 128 + 1
    windows = train.TokenWindows(out, "train", 128, 50304, seed=0, shuffle=True)
    assert windows.n == n                                          # every conversation is one window
    x, y, _ = windows.batch(0, n, torch.device("cpu"))
    assert (x[:, 0] == GPT2.eot_token).all()                       # each starts at position 0 with its bos
    for row_x, row_y in zip(x, y):
        end = int((row_y != -1).nonzero().max())                   # the last trained target: the end token
        assert row_y[end] == row_x[end + 1] == fmt.ids["end"] and (row_x[end + 2:] == fmt.ids["pad"]).all()
        assert (row_y[end + 1:] == -1).all()


# ---- sft.py: checks before training ---------------------------------------------------------------------------
def sft_cfg(data_dir, init_from, out_dir, *extra):
    return configure(sft.DEFAULTS, [f"--data_dir={data_dir}", f"--init_from={init_from}", f"--out_dir={out_dir}",
                                    *extra])


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_sft_refuses_mismatched_inputs(tmp_path):
    chatml, _ = prepare(tmp_path, "--format", "chatml", "--source", "alpaca_tiny_local", "--block_size", "64",
                        name="chatml")
    padded, _ = prepare(tmp_path, "--format", "alpaca", "--layout", "pad", "--block_size", "256",
                        "--source", "alpaca_tiny_local", name="padded")
    good = fake_checkpoint(tmp_path / "good")
    out = tmp_path / "out"

    def check(cfg):  # sft.py's two rules, then train.py's one resolution (where the other checks live)
        return train.resolve(sft.prepare(cfg))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        check(sft_cfg(chatml, tmp_path / "missing", out))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check(sft_cfg(chatml, fake_checkpoint(tmp_path / "cl", tokenizer="cl100k_base"), out))
    with pytest.raises(ValueError, match="cannot hold the special tokens"):
        check(sft_cfg(chatml, fake_checkpoint(tmp_path / "unpadded", vocab_pad_multiple=1), out))
    with pytest.raises(ValueError, match="pads conversations to 256 tokens but the model's context is 128"):
        check(sft_cfg(padded, good, out))
    with pytest.raises(ValueError, match="rendered as 'chatml'"):
        check(sft_cfg(chatml, good, out, "--chat_format=alpaca"))
    with pytest.raises(FileNotFoundError, match="prepare_sft.py"):
        check(sft_cfg(tmp_path, good, out))
    with pytest.raises(ValueError, match="fine-tunes a pretrained model"):
        check(sft_cfg(chatml, "scratch", out))
    run = check(sft_cfg(chatml, good, out))
    assert run.chat_format == "chatml" and run.tokenizer == "gpt2" and run.n_layer == 2   # from data and checkpoint


# ---- chat.py ------------------------------------------------------------------------------------------------
@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_chat_refuses_bad_inputs(tmp_path, monkeypatch):
    good = fake_checkpoint(tmp_path / "good", chat_format="alpaca")
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        chat.load_chat(good, "vicuna")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        chat.load_chat(str(tmp_path / "missing"), "alpaca")
    with pytest.raises(ValueError, match="cannot hold the special tokens of format 'chatml'"):
        chat.load_chat(fake_checkpoint(tmp_path / "unpadded", vocab_pad_multiple=1), "chatml")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        chat.load_chat(fake_checkpoint(tmp_path / "cl", tokenizer="cl100k_base"), "alpaca")
    model, fmt, _ = chat.load_chat(good)                           # the format the checkpoint was tuned with
    assert fmt.name == "alpaca"
    # the command line turns each error into a one-line message, not a traceback
    for argv, match in [([good, "--format", "vicuna"], "error: unknown chat format"),
                        ([str(tmp_path / "missing")], "error: no checkpoint"),
                        ([good, "--context", str(tmp_path / "no.txt"), "-p", "hi"], "No such file")]:
        monkeypatch.setattr("sys.argv", ["chat.py", *argv])
        with pytest.raises(SystemExit, match=match):
            runpy.run_path(chat.__file__, run_name="__main__")


def test_conversation_drops_oldest_turns_then_errors(tmp_path):
    model, fmt, _ = chat.load_chat(fake_checkpoint(tmp_path / "m"), "chatml")   # context 128 tokens
    conv = chat.Conversation(system="Be brief.")
    conv.turns = [(f"question {i} " + "word " * 10, f"answer {i} " + "word " * 10) for i in range(4)]
    ids, dropped = conv.prompt(fmt, "last question", block_size=128, room=16)
    assert dropped > 0 and len(ids) + 16 <= 128 and len(conv.turns) == 4 - dropped
    text = fmt.decode(ids)
    assert "Be brief." in text and "question 3" in text and "question 0" not in text   # system kept, oldest gone
    with pytest.raises(chat.PromptTooLong, match="more than the context of 128 tokens"):
        conv.prompt(fmt, "word " * 200, block_size=128, room=16)


def test_smoke_checks():
    assert chat.repeated_ngram_ratio([1, 2, 3, 4, 5, 6]) == 0.0
    assert chat.repeated_ngram_ratio([7] * 20) == pytest.approx(1 - 1 / 17)
    assert chat.content_words("What is the capital of France?") == {"capital", "france"}
    assert chat.smoke_verdict("Paris.", True, True, 0.0) == "OK"
    assert chat.smoke_verdict("Paris.", False, True, 0.0) == "WEAK"
    assert chat.smoke_verdict("Bananas", False, False, 0.0) == "FAIL"
    assert chat.smoke_verdict("la la la", True, True, 0.8) == "FAIL"
    assert chat.smoke_verdict("  ", True, True, 0.0) == "FAIL"


# ---- the CPU pipeline -----------------------------------------------------------------------------------------
@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
@pytest.mark.slow
def test_pipeline_pretrain_sft_chat(sample_data_dir, tmp_path, capsys):
    """tiny pretrain -> prepare_sft (Alpaca-GPT-4 sample, alpaca format) -> sft (val loss falls) -> chat."""
    pre = tmp_path / "pre"
    train.train(configure(train.DEFAULTS, TINY_TEST_MODEL + [f"--data_dir={sample_data_dir}", f"--out_dir={pre}",
                                                             "--max_iters=4", "--eval_interval=4"]))
    data, _ = prepare(tmp_path, "--format", "alpaca", "--source", "alpaca_gpt4_local", "--block_size", "64")
    out = tmp_path / "sft"
    cfg = sft.prepare(sft_cfg(data, pre, out, "--epochs=0", "--max_iters=10", "--warmup_frac=0",
                              "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--batch_size=4",
                              "--total_batch_tokens=256", "--eval_interval=10", "--eval_iters=4",
                              "--compile=False", "--log_interval=4"))
    train.train(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.3, val                             # the masked (answer-only) loss falls
    model, fmt, ckpt_cfg = chat.load_chat(str(out))
    assert ckpt_cfg["chat_format"] == "alpaca" and fmt.name == "alpaca"   # sft.py stored the format
    ids, _ = chat.Conversation().prompt(fmt, "Give three tips for staying healthy.", 64, room=8)
    # one chat turn that ends at the end token: the tiny model rarely says it by itself, so bias it after 3 tokens
    gen = GenerationConfig(max_new_tokens=20, min_new_tokens=3, temperature=0, stop_ids=tuple(fmt.stop_ids),
                           logit_bias={fmt.ids["end"]: 1e4})
    streamed = []
    text, stopped, n = chat.respond(model, fmt, ids, gen, on_text=streamed.append)
    assert stopped and n == 4 and text == "".join(streamed) and "<|endoftext|>" not in text
    # and the command line end to end: one-shot prompt, then the smoke table
    chat.main([str(out), "-p", "Hello", "--max_new_tokens", "4", "--temperature", "0"])
    rows = chat.smoke(model, fmt, GenerationConfig(max_new_tokens=3, stop_ids=tuple(fmt.stop_ids)))
    assert len(rows) == 10 and {r["temperature"] for r in rows} == {0.0, 0.8}
    assert all(r["verdict"] in ("OK", "WEAK", "FAIL") and r["tokens"] <= 3 for r in rows)
    printed = capsys.readouterr().out
    assert "smoke: " in printed and printed.count("| What is the capital") == 2


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_sft_with_doc_mask(sample_data_dir, tmp_path, monkeypatch):
    """--doc_mask=True: the model gets each window's conversation starts (from .docs.bin) in training and in
    evaluation, and the masked loss still falls. (That a start isolates what follows: tests/test_model.py.)"""
    pre = tmp_path / "pre"
    train.train(configure(train.DEFAULTS, TINY_TEST_MODEL + [f"--data_dir={sample_data_dir}", f"--out_dir={pre}",
                                                             "--max_iters=2", "--eval_interval=2"]))
    data, _ = prepare(tmp_path, "--format", "parchment", "--source", "alpaca_tiny_local", "--block_size", "64")
    seen = []
    real_forward = train.GPT.forward

    def spy(self, idx, targets=None, **kw):
        seen.append((self.training, kw.get("doc_starts")))
        return real_forward(self, idx, targets, **kw)
    monkeypatch.setattr(train.GPT, "forward", spy)
    out = tmp_path / "sft"
    train.train(sft.prepare(sft_cfg(data, pre, out, "--epochs=0", "--max_iters=8", "--warmup_frac=0",
                                    "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--batch_size=4",
                                    "--total_batch_tokens=256", "--eval_interval=8", "--eval_iters=4",
                                    "--compile=False", "--log_interval=4", "--doc_mask=True")))
    assert all(starts is not None and starts.dtype == torch.bool for _, starts in seen)
    assert {training for training, _ in seen} == {True, False}         # training and evaluation both
    assert sum(int(starts.sum()) for _, starts in seen) > 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0], val
