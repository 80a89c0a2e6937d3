"""
GGUF, for real: a nanoforge checkpoint -> export.py's Hugging Face folder -> llama.cpp's own convert_hf_to_gguf.py
(f32 and q8_0) -> llama.cpp (tests/gguf_tools.py builds it once per machine).

For the gpt2 tokenizer (tied head) and cl100k_base (untied head), both with grouped-query attention:
  * the converter recognises the tokenizer (its pre-tokenizer hash: gpt-2, dbrx) and llama.cpp then tokenizes
    text exactly as tiktoken does (prompts, and 50 OpenStax documents where ../shared has them);
  * f32: llama.cpp's greedy sampler picks the same 24 tokens as generation.py on every prompt, and its logits
    agree with ours;
  * q8_0: the next-token distribution stays close: the mean KL(ours || llama.cpp q8_0) over every position of
    every prompt is printed and bounded;
  * the chat template in the GGUF, rendered by llama.cpp's own Jinja engine (llama-server --jinja,
    /apply-template), is chat_format.render's prompt, and llama.cpp tokenizes it to render's ids.
The checkpoint is train.py's, trained 30 steps on the shipped sample, once per tokenizer.
"""
import json
import os

import pytest

import export
import gguf_tools as lc
from chat_format import ChatFormat
from checkpoint import load_model
from configurator import configure
from conftest import SHARED, TINY_TEST_MODEL, encoding_or_skip
from generation import GenerationConfig, generate

pytestmark = pytest.mark.skipif(not lc.built(), reason=f"llama.cpp is not built in {lc.HOME}: "
                                                       f"run `python tests/gguf_tools.py` (CI does)")

PROMPTS = ["The cell membrane is", "In 1492, Columbus sailed", "Photosynthesis converts light energy into",
           "def f(x):\n    return x ** 2  # 12345 apples"]
NEW_TOKENS = 24
TRAIN_STEPS = 30          # TINY_TEST_MODEL (2 layers, d 64, 4 query / 2 key-value heads, 256 tokens a step) at
                          # lr 1e-2: entropy ~7.5 nats after 30 steps (3e-3 leaves it near uniform, 10+ nats)
Q8_MAX_KL = 1e-3          # nats, mean over positions (measured: bench/results/gguf.md)
CASES = {"gpt2-tied": ("gpt2", True, "gpt-2"), "cl100k-untied": ("cl100k_base", False, "dbrx")}
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is a cell?"},
                {"role": "assistant", "content": "The unit of life."},
                {"role": "user", "content": "And a tissue?"}]
OPENSTAX = os.path.join(SHARED, "data", "openstax_edu_text", "sample_50.jsonl")


def trained_run(folder, tokenizer, tied):
    """A small model trained briefly by train.py on the shipped OpenStax sample: real next-token distributions
    (a random model's are flat, where q8_0's error would vanish in the noise, or one-hot if scaled up)."""
    import prepare_fineweb
    import train
    data, run = folder / "data", folder / "run"
    prepare_fineweb.main(["--local", prepare_fineweb.SAMPLE, "--out_dir", str(data), "--tokenizer", tokenizer,
                          "--val_tokens", "2000", "--max_tokens", "20000", "--workers", "1"])
    train.train(configure(train.DEFAULTS, TINY_TEST_MODEL + [
        f"--data_dir={data}", f"--out_dir={run}", f"--tie_embeddings={tied}", f"--max_iters={TRAIN_STEPS}",
        f"--eval_interval={TRAIN_STEPS}", f"--log_interval={TRAIN_STEPS}", "--learning_rate=1e-2"]))
    return str(run)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """The trained checkpoint, its export (chat format chatml) and its two GGUF files, once per tokenizer."""
    tokenizer, tied, pre = CASES[request.param]
    enc = encoding_or_skip(tokenizer)
    folder = tmp_path_factory.mktemp(request.param)
    run = trained_run(folder, tokenizer, tied)
    hf_dir = export.export(run, str(folder / "hf"), chat_format="chatml")
    ggufs = {t: str(folder / f"model-{t}.gguf") for t in ("f32", "q8_0")}
    for t, path in ggufs.items():
        lc.convert(hf_dir, path, t)
    model = load_model(run)[0].eval()
    assert model.config.n_kv_head < model.config.n_head and model.config.tie_embeddings == tied
    return {"name": request.param, "model": model, "enc": enc, "pre": pre, "ggufs": ggufs,
            "fmt": ChatFormat("chatml", enc)}


def prompt_ids(enc, text):
    return [enc.eot_token] + enc.encode_ordinary(text)   # nanoforge's documents begin with end-of-text


def test_metadata_and_tokenizer(case):
    fields = lc.gguf_py().GGUFReader(case["ggufs"]["f32"]).fields

    def value(key):
        return fields[key].contents()
    fmt, enc = case["fmt"], case["enc"]
    assert value("tokenizer.ggml.pre") == case["pre"]           # recognised by its hash, not the 'default' guess
    assert value("tokenizer.chat_template") == export.chat_template(fmt)
    assert value("tokenizer.ggml.bos_token_id") == enc.eot_token and not value("tokenizer.ggml.add_bos_token")
    assert value("tokenizer.ggml.eos_token_id") == fmt.ids["end"]
    assert value("llama.attention.head_count_kv") == 2 and value("llama.context_length") == 64
    texts = PROMPTS + [" leading space", "tabs\tand\n\nnewlines  ", "ünïcödé 日本語 🙂", "1234567 3.14159"]
    if os.path.exists(OPENSTAX):
        texts += [json.loads(line)["text"] for line in open(OPENSTAX, encoding="utf-8")]
    with lc.llama(case["ggufs"]["f32"]) as llm:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == enc.encode_ordinary(text), text[:60]


def test_f32_greedy_tokens_are_ours(case):
    with lc.llama(case["ggufs"]["f32"]) as llm:
        for text in PROMPTS:
            ids = prompt_ids(case["enc"], text)
            ours = list(generate(case["model"], ids, GenerationConfig(temperature=0, max_new_tokens=NEW_TOKENS)))
            llm.reset()
            theirs = []
            for token in llm.generate(ids, temp=0.0, reset=True):   # llama.cpp's greedy sampler
                theirs.append(token)
                if len(theirs) == NEW_TOKENS:
                    break
            assert theirs == ours, f"{case['name']} {text!r}: llama.cpp {theirs} vs ours {ours}"
            same = lc.compare(case["model"], llm, [ids + ours])
            assert same["logit_diff"] < 2e-3 and same["top1"] == same["positions"], (text, same)


def test_q8_0_next_token_distribution_is_close(case, capsys):
    with lc.llama(case["ggufs"]["q8_0"]) as llm:
        r = lc.compare(case["model"], llm, [prompt_ids(case["enc"], text) for text in PROMPTS])
    with capsys.disabled():
        print(f"\n[gguf] {case['name']} q8_0: mean KL(ours || llama.cpp) {r['kl']:.2e} nats (max {r['kl_max']:.2e}), "
              f"top-1 agrees at {r['top1']}/{r['positions']} positions, our entropy {r['entropy']:.2f} nats")
    assert r["kl"] < Q8_MAX_KL


def as_text(ids, fmt, enc):
    """render's ids as the string a template writes: special tokens (chat tags in the padding slots, which
    tiktoken cannot decode) by their names, the runs of ordinary tokens between them decoded."""
    text, run = "", []
    for i in ids + [None]:
        if i is None or i in fmt.specials:
            text, run = text + enc.decode(run) + (fmt.specials[i] if i is not None else ""), []
        else:
            run.append(i)
    return text


def test_chat_template_renders_in_llama_cpp(case):
    """llama.cpp's Jinja engine, not Python's: the prompt is chat_format.render's, token for token."""
    fmt, enc = case["fmt"], case["enc"]
    want = fmt.render(CONVERSATION, open_assistant=True)[0]
    with lc.Server(case["ggufs"]["f32"]) as server:
        prompt = server.post("/apply-template", {"messages": CONVERSATION})["prompt"]
    assert prompt == as_text(want, fmt, enc)
    with lc.llama(case["ggufs"]["f32"]) as llm:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == want
