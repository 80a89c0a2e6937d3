"""Nothing lost, every mistake named (issue #15, the training side): each fault a new user can meet, asserting both
the message and that what was saved survived. One tiny trained run (module fixture) is copied into each test."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import chat
import train
from configurator import ConfigError, configure
from conftest import ROOT, TINY_TEST_MODEL


def cfg_for(data_dir, out_dir, *extra):
    return configure(train.DEFAULTS, TINY_TEST_MODEL + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def trained(sample_data_dir, tmp_path_factory):
    """A finished 2-step run: ckpt.pt, best.pt, metrics.jsonl."""
    out = tmp_path_factory.mktemp("trained")
    train.train(cfg_for(sample_data_dir, out, "--max_iters=2", "--eval_interval=2", "--lr_decay_iters=8"))
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    """A private copy of the trained run, to damage at will."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def weights_equal(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---- 1. the NaN guard never saves non-finite weights ------------------------------------------------------------
def test_exploding_run_stops_without_saving_non_finite_weights(sample_data_dir, tmp_path):
    """The issue's repro (lr 1e3, an evaluation every step): the loss is finite on the step whose update makes the
    weights non-finite, which the old loss-only guard let through and saved. Now nothing non-finite is saved, and
    the message names the last finite checkpoint (or says there is none)."""
    with pytest.raises(FloatingPointError, match="stopping without saving; (the last good checkpoint is .*ckpt.pt "
                                                 r"\(step \d+, finite\)|there is no checkpoint of this run yet)") as e:
        train.train(cfg_for(sample_data_dir, tmp_path, "--max_iters=30", "--eval_iters=1", "--eval_interval=1",
                            "--warmup_iters=0", "--learning_rate=1e3", "--min_lr=1e2"))
    if os.path.exists(tmp_path / "ckpt.pt"):
        saved = checkpoint.load(str(tmp_path))
        assert all(torch.isfinite(v).all() for v in saved["model"].values())
        assert f"(step {saved['step']}, finite)" in str(e.value)


# ---- 2. a fresh run does not destroy the one in its folder ----------------------------------------------------
def test_fresh_run_in_an_existing_run_folder_is_refused(sample_data_dir, run_dir):
    before = checkpoint.load(str(run_dir))
    metrics = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run: continue it with --init_from=resume, or choose "
                                         "another --out_dir"):
        train.train(cfg_for(sample_data_dir, run_dir, "--max_iters=2"))
    assert (run_dir / "metrics.jsonl").read_text() == metrics and weights_equal(checkpoint.load(str(run_dir)), before)
    train.train(cfg_for(sample_data_dir, run_dir, "--max_iters=1", "--eval_interval=1", "--overwrite=True"))
    assert checkpoint.load(str(run_dir))["step"] == 1


# ---- 3. resume honours the saved data position; a changed setup is named --------------------------------------
def test_resume_under_another_batch_size_continues_at_the_saved_sample(sample_data_dir, run_dir, monkeypatch):
    assert checkpoint.load(str(run_dir))["data"]["next_sample"] == 8          # 2 steps x 4 rows
    firsts = []
    real_batch = train.TokenWindows.batch

    def spy(self, first, count, device, doc_starts=False):
        if self.shuffle:  # the training split
            firsts.append((first, count))
        return real_batch(self, first, count, device, doc_starts)
    monkeypatch.setattr(train.TokenWindows, "batch", spy)
    train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=4", "--batch_size=2",
                        "--total_batch_tokens=128", "--lr_decay_iters=8"))
    assert firsts == [(8, 2), (10, 2)]               # samples 8..11: neither trained twice nor skipped
    assert checkpoint.load(str(run_dir))["data"]["next_sample"] == 12


@pytest.mark.parametrize("flag, named", [("--n_layer=3", "n_layer=3 (checkpoint: 2)"),
                                         ("--block_size=32", "block_size=32 (checkpoint: 64)"),
                                         ("--seed=7", "seed=7 (checkpoint: 1337)")])
def test_resume_refuses_another_architecture(sample_data_dir, run_dir, flag, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        train.resolve(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=4", flag))


def test_a_tokenizer_or_vocabulary_against_the_data_is_named(sample_data_dir, tmp_path):
    for flag, named in (("--tokenizer=nope", "tokenizer='nope', but .*meta.json says its shards have tokenizer 'gpt2'"),
                        ("--vocab_size=32768", "vocab_size=32768, but .*meta.json says .* vocab_size 50257")):
        with pytest.raises(ConfigError, match=named):
            train.resolve(cfg_for(sample_data_dir, tmp_path, flag))
    run = train.resolve(cfg_for(sample_data_dir, tmp_path, "--tokenizer=gpt2", "--vocab_size=50257"))  # agreeing
    assert run.tokenizer == "gpt2" and run.vocab_size == 50257


def test_shard_header_against_meta_json(sample_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "eot": 0}))           # shards from another tokenizer run
    with pytest.raises(ValueError, match="val_000000.bin: header says vocabulary 50257 / end-of-text 50256, "
                                         "meta.json says 50257 / 0"):
        train.resolve(cfg_for(data, tmp_path / "out"))


# ---- 4. a folder without its completion marker is not trained on ---------------------------------------------
def test_data_folder_without_meta_json_is_refused(sample_data_dir, tmp_path):
    data = tmp_path / "partial"
    shutil.copytree(sample_data_dir, data)
    os.remove(data / "meta.json")                                            # what a crashed prepare leaves
    with pytest.raises(FileNotFoundError, match="meta.json not found: the folder is incomplete"):
        train.resolve(cfg_for(data, tmp_path / "out"))


# ---- 5. a torn metrics line does not block resume --------------------------------------------------------------
def test_torn_last_metrics_line_is_dropped_with_a_notice(sample_data_dir, run_dir, capsys):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')                                   # killed mid-write
    train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=3", "--lr_decay_iters=8"))
    assert "dropping the torn last line" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:1] + ["{oops"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not valid JSON"):
        train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=4", "--lr_decay_iters=8"))


# ---- 6. one run per folder, unique temporary names ------------------------------------------------------------
def test_second_run_in_a_locked_folder_gets_a_clear_error(sample_data_dir, run_dir):
    holder = train.lock_run_folder(str(run_dir))                        # as a running train.py holds it
    try:
        with pytest.raises(ValueError, match=f"is in use by another run \\(pid {os.getpid()}\\)"):
            train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=3"))
    finally:
        holder.close()
    other = run_dir / f"ckpt.pt.{os.getpid() + 1}.tmp"                       # another writer's temporary
    other.write_bytes(b"theirs")
    checkpoint.save(str(run_dir / "ckpt.pt"), checkpoint.load(str(run_dir)))
    assert other.read_bytes() == b"theirs" and not (run_dir / f"ckpt.pt.{os.getpid()}.tmp").exists()


# ---- 7. a full disk ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0; "
                                                "basic_ios::clear: iostream error")])
def test_full_disk_says_so_keeps_the_old_checkpoint_and_removes_the_partial_file(sample_data_dir, run_dir,
                                                                                 monkeypatch, error):
    before = checkpoint.load(str(run_dir))

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"the first megabytes")
        raise error
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="no space left writing .*ckpt.pt \\(the previous ckpt.pt is kept"):
        train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=4", "--eval_interval=2",
                            "--lr_decay_iters=8"))
    monkeypatch.undo()
    assert weights_equal(checkpoint.load(str(run_dir)), before)
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]


# ---- 8. best.pt -----------------------------------------------------------------------------------------------
def test_best_pt_starts_a_run_and_resume_says_what_it_is(sample_data_dir, run_dir, tmp_path):
    best = str(run_dir / "best.pt")
    model = train.train(cfg_for(sample_data_dir, tmp_path / "ft", f"--init_from={best}", "--max_iters=1",
                                "--eval_interval=1"))
    assert model is not None and checkpoint.load(str(tmp_path / "ft"))["step"] == 1
    os.remove(run_dir / "ckpt.pt")
    with pytest.raises(FileNotFoundError, match="best.pt exists: it holds the best weights only"):
        train.resolve(cfg_for(sample_data_dir, run_dir, "--init_from=resume"))
    shutil.copy(best, run_dir / "ckpt.pt")                                   # a best.pt renamed by hand
    with pytest.raises(ValueError, match="holds weights only .*instead of resuming"):
        train.resolve(cfg_for(sample_data_dir, run_dir, "--init_from=resume"))


# ---- 9. signals: the conventional exit codes, no traceback ---------------------------------------------------
def start(args, data_dir, out_dir):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY_TEST_MODEL, f"--data_dir={data_dir}",
           f"--out_dir={out_dir}", "--lr_decay_iters=100", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigint_saves_and_exits_130_and_early_ctrl_c_prints_no_traceback(sample_data_dir, tmp_path):
    proc = start(["--max_iters=100000", "--eval_interval=100000"], sample_data_dir, tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").exists() and
                                          len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by signal 2" in out and checkpoint.load(str(tmp_path))["step"] >= 2
    early = start(["--max_iters=10"], sample_data_dir, tmp_path / "early")
    time.sleep(0.5)                                                           # still importing torch
    early.send_signal(signal.SIGINT)
    _, err = early.communicate(timeout=60)
    assert early.returncode == 130 and "Traceback" not in err, err[-2000:]


# ---- bad values: one line naming the key, before anything is allocated ---------------------------------------
@pytest.mark.parametrize("flag, named", [
    ("--lr_schedule=bogus", "lr_schedule='bogus': expected one of cosine, poly, wsd, constant"),
    ("--dtype=float16", "dtype='float16': training in fp16 needs a gradient scaler"),
    ("--dtype=bf16", "dtype='bf16': expected auto, float32, bfloat16"),
    ("--batch_size=0", "batch_size=0: must be >= 1"),
    ("--eval_interval=0", "eval_interval=0: must be >= 1"),
    ("--eval_iters=0", "eval_iters=0: must be >= 1"),
    ("--max_iters=-1", "max_iters=-1: must be >= 0"),
    ("--max_iters=0", "max_iters=0: must be >= 1"),
    ("--compile_mode=fast", "compile_mode='fast': expected one of default, reduce-overhead"),
    ("--optimizer=lion", "optimizer='lion': expected one of adamw, sophia, muon"),
])
def test_bad_values_are_named_at_start(sample_data_dir, tmp_path, flag, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        train.resolve(cfg_for(sample_data_dir, tmp_path, flag))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_cuda_graphs_under_ddp_are_refused_at_start(sample_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")                                    # as torchrun sets it; no group yet
    with pytest.raises(ValueError, match="compile_mode='reduce-overhead' .*does not work under DDP"):
        train.resolve(cfg_for(sample_data_dir, tmp_path, "--compile_mode=reduce-overhead"))


def test_fresh_clone_prepares_the_embedded_sample_first(sample_data_dir, tmp_path, monkeypatch, capsys):
    """data_dir missing: train.py asks prepare_fineweb.ensure_sample to make it (the data chapter's embedded
    sample), then resolves as usual."""
    import prepare_fineweb
    asked = []
    monkeypatch.setattr(prepare_fineweb, "ensure_sample",
                        lambda d: asked.append(d) or shutil.copytree(sample_data_dir, d))
    run = train.resolve(cfg_for(tmp_path / "data", tmp_path / "out"))
    assert asked == [str(tmp_path / "data")] and run.tokenizer == "gpt2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_without_a_gpu_is_an_error(sample_data_dir, tmp_path):
    with pytest.raises(ValueError, match="device='cuda' but no CUDA GPU is available"):
        train.resolve(cfg_for(sample_data_dir, tmp_path, "--device=cuda"))


def test_preset_syntax_error_names_file_and_line(tmp_path):
    preset = tmp_path / "broken.py"
    preset.write_text("n_layer = 4\nlearning_rate = = 3e-4\n")
    with pytest.raises(ConfigError, match=r"broken.py:2: syntax error"):
        configure(train.DEFAULTS, [str(preset)])


# ---- checkpoints from elsewhere: damaged, foreign, or malicious ---------------------------------------------
class Payload:
    """An object whose unpickling runs code: here it would create a file (a real attack would do worse)."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoint_files_are_one_clear_line_and_a_pickle_payload_never_runs(trained, tmp_path, sample_data_dir):
    good = open(trained / "ckpt.pt", "rb").read()
    cases = {"truncated.pt": (good[:len(good) // 2], "is not a readable checkpoint"),
             "garbage.pt": (b"\x00\x01 not a checkpoint at all" * 10, "is not a readable checkpoint"),
             "other.pt": (None, "is not a nanoforge checkpoint"),
             "evil.pt": (None, "was refused: it asks to run Python code .*Nothing in it was run")}
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "config": Payload(marker)}, tmp_path / "evil.pt")
    for name, (raw, msg) in cases.items():
        if raw is not None:
            (tmp_path / name).write_bytes(raw)
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=msg):
            checkpoint.load(path)
        with pytest.raises(ValueError, match=msg):                           # train.py's init_from
            train.resolve(cfg_for(sample_data_dir, tmp_path / "out", f"--init_from={path}"))
        with pytest.raises(ValueError, match=msg):                           # chat.py
            chat.load_chat(path)
    assert not marker.exists()                                               # the payload's code never ran


def test_chat_dtype_float8_is_a_clear_error(trained, monkeypatch):
    import runpy
    monkeypatch.setattr("sys.argv", ["chat.py", str(trained), "--dtype", "float8", "-p", "hi"])
    with pytest.raises(SystemExit, match="error: --dtype='float8': expected auto, float32, bfloat16, float16"):
        runpy.run_path(chat.__file__, run_name="__main__")


def test_hugging_face_folder_goes_to_hf_py(tmp_path, monkeypatch):
    """A folder with config.json + model.safetensors (or hf:<folder>) is read by hf.load_hf_model, which holds no
    pickle."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert checkpoint.is_hf_folder(str(tmp_path)) and checkpoint.is_hf_folder("hf:anything")
    import types
    calls = []
    fake = types.SimpleNamespace(load_hf_model=lambda path, device: (calls.append(path) or torch.nn.Linear(1, 1),
                                                                     {"tokenizer": "gpt2"}))
    monkeypatch.setitem(sys.modules, "hf", fake)
    _, config = checkpoint.load_model(f"hf:{tmp_path}")
    assert calls == [str(tmp_path)] and config == {"tokenizer": "gpt2"}
