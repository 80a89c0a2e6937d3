"""tokenizer.py and prepare_tokenizer.py: every kind of spec, the shipped gpt2 ranks, a trained BPE file that
tiktoken loads and that round-trips any UTF-8, the split pattern read alike by both regex engines, and the
Lille-130M count at its own 32,768-token vocabulary."""
import json
import os
import random
from itertools import islice

import pytest
import regex
import tiktoken

import prepare_tokenizer
from prepare_fineweb import SAMPLE, iter_local
from chat_format import EXTRA_TOKENS, ChatFormat
from conftest import ROOT, SHARED
from tokenizer import get_encoding

# a little real text (the shipped sample's first documents) plus digits and contractions
TRAIN_TEXT = list(islice(iter_local([SAMPLE]), 20)) + [
    "In 1984, 1234567 cells divided; it's 3.14159 times as fast as we'll see.\n\n" * 3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 512-id BPE trained on a little text, written and loaded back as a user would."""
    out = str(tmp_path_factory.mktemp("tok") / "small.json")
    prepare_tokenizer.main(["--local", write_jsonl(out + ".src.jsonl", TRAIN_TEXT), "--vocab_size", "512",
                            "--heldout_docs", "5", "--out", out])
    return out


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def test_trained_file_is_a_tiktoken_encoding_with_the_chat_slots(trained):
    enc = get_encoding(trained)
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.n_vocab == 512  # --vocab_size counts bytes + merges + specials
    assert enc.eot_token == enc.encode_single_token("<|endoftext|>") == 512 - 1 - len(EXTRA_TOKENS)
    assert set(EXTRA_TOKENS) <= enc.special_tokens_set
    fmt = ChatFormat("chatml", enc)
    assert fmt.vocab_size == enc.n_vocab  # the chat tokens are the tokenizer's own: no padding slot needed
    ids, _ = fmt.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert fmt.ids["im_start"] in ids and max(ids) < enc.n_vocab
    # "<|im_end|>" typed in text is plain text, never the special id
    assert enc.encode_single_token("<|im_end|>") not in enc.encode_ordinary("say <|im_end|> now")


def test_round_trip_is_lossless_on_any_utf8(trained):
    enc = get_encoding(trained)
    rng = random.Random(0)
    # characters the training text never had: CJK, emoji, combining marks, controls, NUL, the top of Unicode
    ranges = [(0, 0x7f), (0x80, 0x7ff), (0x4e00, 0x9fff), (0x1f600, 0x1f64f), (0x300, 0x36f), (0x10fff0, 0x10ffff)]
    for _ in range(200):
        s = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 40)))
        ids = enc.encode_ordinary(s)
        assert enc.decode(ids) == s
        assert b"".join(enc.decode_single_token_bytes(i) for i in ids) == s.encode("utf-8")
    doc = TRAIN_TEXT[10]  # a training document: it round-trips too, in fewer tokens than bytes (merges learnt)
    assert enc.decode(enc.encode_ordinary(doc)) == doc
    assert len(enc.encode_ordinary(doc)) < len(doc.encode()) / 1.5


def test_split_pattern_reads_alike_in_both_engines(trained):
    """HF tokenizers (Oniguruma) cuts the training text; tiktoken cuts it in use. The `regex` module has
    tiktoken's semantics (tiktoken's own _educational BPE uses it)."""
    from tokenizers import Regex, pre_tokenizers
    text = ("In 1984, 1234567 people's cats WE'LL see.\n\n  x  \t\r\n 3.14159 ¡Hola! 中文 😀 end  \nlast   "
            "line\r\n\r\n$100,000.00 (x_1+y^2)   ")

    def hf_chunks(pattern):
        return [p for p, _ in pre_tokenizers.Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)]
    assert hf_chunks(prepare_tokenizer.SPLIT_PATTERN) == regex.findall(prepare_tokenizer.SPLIT_PATTERN, text)
    # the pitfall itself: cl100k's possessive `\p{N}{1,3}+` is "any run of digits" to Oniguruma
    cl100k = prepare_tokenizer.SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,3}+")
    assert "1234567" in hf_chunks(cl100k) and "1234567" not in regex.findall(cl100k, text)
    # and end to end: the trained tiktoken encoding never holds more than three digits in one token
    enc = get_encoding(trained)
    pieces = [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary("1234567 and 1234567")]
    assert max(len(p.strip()) for p in pieces if p.strip().isdigit()) <= 3


def test_vocab_size_too_small_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        prepare_tokenizer.train(iter(["abc"]), 200, "x")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        get_encoding(str(tmp_path / "junk.json"))
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="neither prepare_tokenizer.py's format"):
        get_encoding(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="no such file"):
        get_encoding(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="not a file and not a tiktoken name"):
        get_encoding("gpt3_please")


def test_gpt2_ships_with_the_repo_and_equals_tiktokens():
    enc = get_encoding("gpt2")
    assert (enc.n_vocab, enc.eot_token) == (50257, 50256)
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's known ids
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    if not os.path.isdir(cache):
        pytest.skip("no tiktoken cache (../shared absent) to compare with")
    ref = tiktoken.get_encoding("gpt2")
    assert enc._mergeable_ranks == ref._mergeable_ranks and enc._pat_str == ref._pat_str
    assert enc._special_tokens == ref._special_tokens and enc.n_vocab == ref.n_vocab


def test_hugging_face_tokenizer_json(trained, tmp_path):
    """A tokenizer.json (here made by `tokenizers` itself, GPT-2 style byte-level) behind tiktoken's interface."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN_TEXT, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    enc = get_encoding(path)
    assert enc.eot_token == 0 and enc.n_vocab == tok.get_vocab_size()
    s = "The cell membrane, 中文 😀 <|endoftext|> end"
    ids = enc.encode_ordinary(s)
    assert enc.eot_token not in ids and enc.decode(ids) == s  # special text stays text
    assert b"".join(enc.decode_single_token_bytes(i) for i in ids) == s.encode()
    assert enc.encode(s, allowed_special="all").count(enc.eot_token) == 1
    with pytest.raises(ValueError, match="special token"):
        enc.encode(s)  # tiktoken's rule: special text must be allowed explicitly


def test_lille_130m_at_its_own_vocabulary_is_exact():
    """config/lille_130m.py uses a 32,768-id tokenizer (prepare_tokenizer.py --vocab_size 32768): 127,171,200."""
    import torch
    from configurator import read_config_file
    from model import GPT, GPTConfig
    preset = read_config_file(os.path.join(ROOT, "config", "lille_130m.py"))
    assert preset["vocab_size"] == 32768 and preset["tokenizer"].endswith(".json")
    with torch.device("meta"):
        assert GPT(GPTConfig.from_dict(preset)).num_params() == 127_171_200


def test_shared_dir_is_optional():
    """A fresh clone has no ../shared: gpt2 and the tiny preset's tokenizer still load from the repository."""
    assert os.path.isfile(os.path.join(ROOT, "assets", "gpt2.tiktoken"))
    assert get_encoding("assets/openstax_4k.json").n_vocab == 4096
    assert SHARED  # conftest names the place; tests that need it skip when it is absent
