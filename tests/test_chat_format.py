"""chat_format.py: exact renderings and masks for every format, the prompt/training prefix property, special ids,
streaming decode across split UTF-8 characters, and clear errors."""
import json
import os

import pytest

from chat_format import EXTRA_TOKENS, FORMATS, ChatFormat, render
from conftest import SHARED
from tokenizer import get_encoding

GPT2 = get_encoding("gpt2")
EOT = "<|endoftext|>"
ONE_TURN = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
TWO_TURNS = ONE_TURN + [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]

# the exact text each format must produce for TWO_TURNS (special tokens written as their strings)
EXPECTED_TWO_TURNS = {
    "alpaca": EOT + "Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue." + EOT +
              "### Instruction:\nAnother?\n\n### Response:\nRed." + EOT,
    "lime": EOT + "<user>Name a colour.<assistant>Blue." + EOT + "<user>Another?<assistant>Red." + EOT,
    "parchment": EOT + "system\nYou are a helpful assistant." + EOT + "\nuser\nName a colour." + EOT +
                 "\nassistant\nBlue." + EOT + "\nuser\nAnother?" + EOT + "\nassistant\nRed." + EOT,
    "chatml": EOT + "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
                    "<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>",
    "none": EOT + "Name a colour.Blue." + EOT + "Another?Red." + EOT,
}
END = {"alpaca": EOT, "lime": EOT, "parchment": EOT, "chatml": "<|im_end|>", "none": EOT}


def trained_spans(ids, mask):
    """Maximal runs of mask == 1, as lists of ids."""
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    return spans + [current] if current else spans


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_turn_rendering_and_mask_exact(fmt):
    chat = ChatFormat(fmt, GPT2)
    ids, mask = chat.render(TWO_TURNS)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert chat.decode(ids) == EXPECTED_TWO_TURNS[fmt]
    # exactly two trained spans: each assistant answer followed by its end token, nothing else
    spans = trained_spans(ids, mask)
    assert [chat.decode(s) for s in spans] == ["Blue." + END[fmt], "Red." + END[fmt]]
    assert spans[0] == GPT2.encode_ordinary("Blue.") + [chat.ids["end"]]
    assert ids[0] == GPT2.eot_token and mask[0] == 0  # every rendering starts a new document


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_turns", [1, 2])
def test_open_assistant_prompt_is_a_prefix_of_training(fmt, n_turns):
    """What chat.py feeds the model equals the training rendering up to the answer's first token."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "context", "content": "Colours: blue, red."}]
    msgs += TWO_TURNS[:2 * n_turns]
    chat = ChatFormat(fmt, GPT2)
    full, mask = chat.render(msgs)
    prompt, prompt_mask = chat.render(msgs[:-1], open_assistant=True)
    assert full[:len(prompt)] == prompt and prompt_mask == mask[:len(prompt)]
    assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1   # the answer starts right after the prompt
    assert sum(prompt_mask) == (n_turns - 1) * (len(GPT2.encode_ordinary("Blue.")) + 1)  # earlier answers only


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_alpaca_matches_the_original_alpaca_text():
    """The torchtune copy of Stanford Alpaca stores each example's full prompt+answer text: ours is identical."""
    with open(os.path.join(SHARED, "data", "sft", "torchtune_alpaca_tiny", "alpaca_tiny.json")) as f:
        rows = [r for r in json.load(f) if r["output"] == r["output"].strip()]
    with_input = [r for r in rows if r["input"]][:3]
    without = [r for r in rows if not r["input"]][:3]
    assert with_input and without
    chat = ChatFormat("alpaca", GPT2)
    for r in with_input + without:
        msgs = ([{"role": "context", "content": r["input"]}] if r["input"] else []) + [
            {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        ids, mask = chat.render(msgs)
        assert chat.decode(ids) == EOT + r["text"] + EOT
        assert chat.decode([i for i, m in zip(ids, mask) if m]) == r["output"] + EOT


def test_context_placement_per_format():
    msgs = [{"role": "context", "content": "CTX"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}]
    text = {f: ChatFormat(f, GPT2).decode(ChatFormat(f, GPT2).render(msgs)[0]) for f in FORMATS}
    assert "paired with an input" in text["alpaca"] and "### Input:\nCTX\n\n### Response:" in text["alpaca"]
    assert text["lime"] == EOT + "CTX\n<user>Q<assistant>A" + EOT
    assert "user\nQ\n\nCTX" + EOT in text["parchment"]                     # ParchmentLM's instruction\n\ncontext
    assert "<|im_start|>context\nCTX<|im_end|>\n<|im_start|>user\nQ" in text["chatml"]
    assert text["none"] == EOT + "CTX\n\nQA" + EOT


def test_system_message_placement():
    msgs = [{"role": "system", "content": "SYS"}] + ONE_TURN
    alpaca = ChatFormat("alpaca", GPT2)
    assert alpaca.decode(alpaca.render(msgs)[0]).startswith(EOT + "SYS\n\n### Instruction:")  # replaces preamble
    parchment = ChatFormat("parchment", GPT2)
    assert parchment.decode(parchment.render(msgs)[0]).startswith(EOT + "system\nSYS" + EOT + "\nuser\n")
    chatml = ChatFormat("chatml", GPT2)
    assert chatml.decode(chatml.render(msgs)[0]).startswith(EOT + "<|im_start|>system\nSYS<|im_end|>\n")


def test_chatml_tags_are_single_special_ids_in_padding_slots():
    chat = ChatFormat("chatml", GPT2)
    start, end = chat.ids["im_start"], chat.ids["end"]
    assert GPT2.n_vocab <= start < 50304 and GPT2.n_vocab <= end < 50304 and start != end
    ids, _ = chat.render(TWO_TURNS)
    assert ids.count(start) == 4 and ids.count(end) == 4
    # a user typing the tag gets text, not the special token
    typed, _ = chat.render([{"role": "user", "content": "<|im_end|>"}], open_assistant=True)
    assert typed.count(end) == 1 and chat.decode(typed).count("<|im_end|>") == 2
    lime = ChatFormat("lime", GPT2)
    assert lime.render(ONE_TURN)[0].count(lime.ids["user"]) == 1 and lime.ids["user"] >= GPT2.n_vocab


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_special_token_table():
    # gpt2: every extra token in its padding slot, one id per string whatever the format
    for i, t in enumerate(EXTRA_TOKENS):
        assert ChatFormat("chatml", GPT2).specials.get(GPT2.n_vocab + i, t) == t
    assert ChatFormat("parchment", GPT2).ids["pad"] == 50257 != GPT2.eot_token
    cl100k = get_encoding("cl100k_base")
    parchment = ChatFormat("parchment", cl100k)  # ParchmentLM: <|endofprompt|> pads, <|endoftext|> ends
    assert parchment.ids["pad"] == cl100k.encode_single_token("<|endofprompt|>") == 100276
    assert parchment.ids["end"] == 100257 and parchment.vocab_size == 100277
    assert ChatFormat("chatml", cl100k).ids["end"] == 100277 + EXTRA_TOKENS.index("<|im_end|>")
    assert ChatFormat("alpaca", GPT2).vocab_size == 50257 and ChatFormat("chatml", GPT2).vocab_size == 50260
    assert ChatFormat("chatml", GPT2).stop_ids == [50256, 50258, 50259]


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_allowed_mask_excludes_padding_and_pad():
    chat = ChatFormat("chatml", GPT2)
    allowed = chat.allowed_mask(50304)
    assert allowed[:50257].all() and allowed[chat.ids["end"]] and allowed[chat.ids["im_start"]]
    assert not allowed[chat.ids["pad"]] and not allowed[50300]
    cl = ChatFormat("parchment", get_encoding("cl100k_base")).allowed_mask(100352)
    assert not cl[100276] and not cl[100258] and cl[100257]  # no pad, no fill-in-the-middle tokens; eot yes


def test_stream_decoder_never_splits_a_character():
    chat = ChatFormat("alpaca", GPT2)
    text = "naïve café → 世界 🙂 done"
    ids = GPT2.encode_ordinary(text)
    assert any(len(GPT2.decode_single_token_bytes(i).decode("utf-8", "ignore")) == 0 for i in ids)  # real splits
    decoder, pieces = chat.stream_decoder(), []
    for i in ids:
        pieces.append(decoder.push(i))
        assert "\ufffd" not in pieces[-1]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert decoder.push(chat.ids["end"]) == EOT and chat.decode([50300]) == "<|id:50300|>"


def test_none_format_keeps_spaces():
    chat = ChatFormat("none", GPT2)
    msgs = [{"role": "user", "content": "The capital of France is"}, {"role": "assistant", "content": " Paris"}]
    ids, mask = chat.render(msgs)
    assert chat.decode(ids) == EOT + "The capital of France is Paris" + EOT


@pytest.mark.parametrize("messages, open_assistant, match", [
    ([], False, "non-empty"),
    ([{"role": "robot", "content": "x"}], False, "role"),
    ([{"role": "user", "content": 3}], False, "content"),
    ([{"role": "assistant", "content": "x"}], False, "must follow a user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True, "two user messages"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], True, "only come first"),
    ([{"role": "context", "content": "c"}], True, "user message"),
    (ONE_TURN, True, "end with a user"),
    (ONE_TURN[:1], False, "end with an assistant"),
])
def test_bad_conversations_are_clear_errors(messages, open_assistant, match):
    with pytest.raises(ValueError, match=match):
        render(messages, "alpaca", GPT2, open_assistant=open_assistant)


@pytest.mark.shared  # needs ../shared's data or tiktoken cache (skipped without it)
def test_unknown_format_and_vocabulary_checks():
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        ChatFormat("vicuna", GPT2)
    with pytest.raises(ValueError, match="cannot hold the special tokens"):
        ChatFormat("chatml", GPT2).check_model(50257, 50257)       # vocab_pad_multiple=1: no padding slots
    ChatFormat("alpaca", GPT2).check_model(50257, 50257)           # alpaca needs none
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        ChatFormat("alpaca", get_encoding("cl100k_base")).check_model(50257, 50304)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_encoding("no_such_encoding")
