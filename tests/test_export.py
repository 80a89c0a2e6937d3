"""
export.py: the native files reproduce the checkpoint; the exported tokenizer.json gives tiktoken's ids (50 OpenStax
documents, gpt2 and cl100k_base); the chat template gives chat_format.render's ids for every format; the ONNX
graph runs in onnxruntime with the same logits; a folder that cannot be written is one clear error, and a failed
export leaves the previous one whole. (tests/test_hf.py checks the model side of the Hugging Face folder.)
"""
import errno
import json
import os

import pytest
import torch

import export
import hf
from chat_format import FORMATS, ChatFormat, render
from conftest import encoding_or_skip, SHARED
from checkpoint import load_model as load_checkpoint
from model import GPT, GPTConfig

OPENSTAX = os.path.join(SHARED, "data", "openstax_edu_text", "sample_50.jsonl")


def save_run(folder, config, tokenizer="gpt2", **extra):
    torch.manual_seed(0)
    model = GPT(config)
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": {**vars(config), "tokenizer": tokenizer, **extra}, "step": 3},
               os.path.join(folder, "ckpt.pt"))
    return model, str(folder)


# ---- native ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_native_round_trip(tmp_path, tied):
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=64, vocab_size=100, block_size=16,
                    tie_embeddings=tied)
    _, run = save_run(tmp_path, cfg)
    out = export.export(run, str(tmp_path / "export"), fmt="native")
    again = export.load_exported(out)
    idx = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(again(idx)[0], load_checkpoint(run)[0](idx)[0], rtol=0, atol=0)
    assert hf.load_hf_model(out)[1]["tokenizer"] == "gpt2"  # what chat/eval read from a native folder


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export.export(str(tmp_path / "none"), str(tmp_path / "x"))


# ---- the output folder (issue #15: export to a read-only or missing folder) -------------------------------------
SMALL = GPTConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, ffn_hidden=32, vocab_size=100, block_size=16)


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    _, run = save_run(tmp_path / "run", SMALL)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write the export to .*a_file/out: Not a directory"):
        export.export(run, str(tmp_path / "a_file" / "out"), fmt="native")
    # and from the command line: one line, no traceback
    with pytest.raises(SystemExit, match="^error: cannot write the export to"):
        export.main([run, "--format", "native", "--out_dir", str(tmp_path / "a_file" / "out")])


def test_a_read_only_folder_is_a_clear_error(tmp_path, monkeypatch):
    """A read-only folder: chmod where the tests run unprivileged; root ignores permission bits, so there a
    read-only file system is simulated (the same OSError the kernel raises, EROFS)."""
    _, run = save_run(tmp_path / "run", SMALL)
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        def read_only(path, *a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        monkeypatch.setattr(export.os, "makedirs", read_only)
        reason = "Read-only file system"
    else:
        locked.chmod(0o500)
        reason = "Permission denied"
    with pytest.raises(ValueError, match=f"cannot write the export to .*locked/out: {reason}"):
        export.export(run, str(locked / "out"), fmt="native")


def test_a_failed_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    _, run = save_run(tmp_path / "run", SMALL)
    out = export.export(run, str(tmp_path / "out"), fmt="native")
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    import safetensors.torch

    def disk_full(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export.export(run, out, fmt="native")
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before  # no .tmp left either


# ---- the tokenizer and the chat template ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["gpt2", "cl100k_base"])
def exported(request, tmp_path_factory):
    """(tiktoken encoding, the exported folder's transformers tokenizer) for a tiny model of that vocabulary."""
    transformers = pytest.importorskip("transformers")
    enc = encoding_or_skip(request.param)
    cfg = GPTConfig(n_layer=1, n_embd=8, n_head=2, n_kv_head=1, ffn_hidden=16, block_size=32,
                    vocab_size=enc.n_vocab, vocab_pad_multiple=128)
    folder = tmp_path_factory.mktemp(request.param)
    _, run = save_run(folder / "run", cfg, request.param, chat_format="chatml")
    out = export.export(run, str(folder / "hf"))
    return enc, transformers.AutoTokenizer.from_pretrained(out)


def test_tokenizer_gives_tiktokens_ids_on_openstax(exported):
    if not os.path.exists(OPENSTAX):
        pytest.skip(f"shared data not found at {OPENSTAX}")
    enc, tok = exported
    docs = [json.loads(line)["text"] for line in open(OPENSTAX, encoding="utf-8")]
    assert len(docs) == 50
    for i, doc in enumerate(docs):
        ids = tok.encode(doc, add_special_tokens=False)
        assert ids == enc.encode_ordinary(doc), f"document {i} tokenized differently"
        assert tok.decode(ids) == doc


EDGE_CASES = ["1234567 12 3.14159 ١٢٣٤٥ ٣", "trailing   ", "x \n\ny", "a  \n b  \r\n c\r\n\r\n", "\t\ttabs\t",
              "don't I'LL we'VE", "😀🙂 é ß 中文字符 naïve", "$$$ ,,,\n\n", "foo\u00a0bar", "   ", ""]


def test_tokenizer_edge_cases_and_special_ids(exported):
    enc, tok = exported
    for text in EDGE_CASES:  # digits in groups of three (cl100k), whitespace runs, apostrophes, non-Latin
        assert tok.encode(text, add_special_tokens=False) == enc.encode_ordinary(text), repr(text)
    eot = enc.eot_token  # 50256 / 100257 (after cl100k's hole at 100256)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == eot and tok.bos_token_id == eot
    for t in enc.special_tokens_set:
        assert tok.convert_tokens_to_ids(t) == enc.encode_single_token(t)
    fmt = ChatFormat("chatml", enc)
    assert tok.convert_tokens_to_ids("<|im_start|>") == fmt.ids["im_start"] == enc.n_vocab + 1  # padding slot
    assert tok.eos_token_id == fmt.ids["end"]
    assert tok.encode("a<|endoftext|>b", add_special_tokens=False) == enc.encode("a<|endoftext|>b",
                                                                                allowed_special="all")


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Name 3 primes.\n"}],
    [{"role": "context", "content": "Paris has 2,102,650 residents (2023)."},
     {"role": "user", "content": "How many people live in Paris?"}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "context", "content": "Water boils at 100 °C."}, {"role": "user", "content": "When does water boil?"},
     {"role": "assistant", "content": "À 100 degrés."}, {"role": "user", "content": "And ice melts?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "context", "content": "Tokyo: 37 million."}, {"role": "user", "content": "Biggest city?"},
     {"role": "assistant", "content": "Tokyo, with 37 million people."}, {"role": "user", "content": "Thanks."}],
]


def chat_ids(tok, fmt, messages, **kw):
    out = tok.apply_chat_template(messages, chat_template=export.chat_template(fmt), **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", FORMATS)
def test_chat_template_equals_render(exported, name):
    enc, tok = exported
    fmt = ChatFormat(name, enc)
    for messages in CONVERSATIONS:
        want = render(messages, name, enc, open_assistant=True)[0]
        assert chat_ids(tok, fmt, messages, add_generation_prompt=True) == want, (name, messages)
        # a whole conversation (training's rendering) too, where the answers begin at a token boundary
        whole = messages + [{"role": "assistant", "content": "Paris, of course." if name != "none" else " Yes."}]
        assert chat_ids(tok, fmt, whole) == render(whole, name, enc)[0], (name, whole)


def test_chat_template_refuses_what_render_refuses(exported):
    enc, tok = exported
    for name in FORMATS:
        for bad, message in [([{"role": "tool", "content": "x"}], "message 0: role 'tool'"),
                             ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
                              "message 1: a system message may only come first")]:
            with pytest.raises(Exception, match=message):
                chat_ids(tok, ChatFormat(name, enc), bad, add_generation_prompt=True)
            with pytest.raises(ValueError, match=message.split(": ")[0]):
                render(bad, name, enc, open_assistant=True)


def test_the_folders_own_template_is_the_checkpoints_format(exported):
    enc, tok = exported
    messages = CONVERSATIONS[3]
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert list(out["input_ids"] if hasattr(out, "keys") else out) == render(messages, "chatml", enc, True)[0]


# ---- ONNX ----------------------------------------------------------------------------------------------------
def test_onnx_matches_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import kernels
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=64, vocab_size=100, block_size=24)
    model, run = save_run(tmp_path / "run", cfg)
    before = {k: kernels.backend(k) for k in kernels.KERNEL_NAMES}
    path = export.export(run, str(tmp_path / "onnx"), fmt="onnx")
    assert {k: kernels.backend(k) for k in kernels.KERNEL_NAMES} == before  # the twins were forced only for it
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in [(1, 5), (3, 24)]:  # batch and length are dynamic, up to block_size
        idx = torch.randint(0, 100, shape)
        got = torch.from_numpy(session.run(None, {"idx": idx.numpy()})[0])
        with torch.no_grad():
            diff = (got - model.eval()(idx)[0]).abs().max().item()
        assert got.shape == (*shape, cfg.padded_vocab_size) and diff <= 1e-4, (shape, diff)
