"""Nothing lost, every mistake named, round two: the mechanisms behind each fault a new user met on a clean clone.

  * checkpoints are verified when opened (the archive's CRC-32s, the schema, finite weights), so a damaged,
    foreign or diverged file is one line naming it;
  * a run records the tokenizer by content (meta.json, the checkpoint), so a tokenizer retrained in place is named;
  * a resume cannot run past its end, nor continue another optimizer's state; temporaries of a killed save go;
  * every model, schedule and None-default key is typed and ranged before anything is allocated;
  * every script's entry point turns an expected error into one line and a non-zero exit.
One tiny trained run (module fixture) is copied into each test that damages it."""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import chat
import checkpoint
import configurator
import distill
import prepare_fineweb
import prepare_tokenizer
import tokenizer
import train
from configurator import ConfigError, configure
from conftest import ROOT
from test_faults import cfg_for, run_dir, trained  # noqa: F401 (fixtures: the finished 2-step run, a copy)


def snapshot(folder):
    """Every file's bytes: what 'nothing was written' is checked against."""
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder)) if p != ".lock"}


def rewrite(path, edit):
    """Load a checkpoint without checks, edit the dict, write it back as torch.save does (valid archive CRCs)."""
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def one_line_error(proc, *fragments):
    """A script failed the way users are promised: exit 1, 'error: ...' on one line, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-800:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-1000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


# ---- 1. a resume cannot run past its end ------------------------------------------------------------------------
def test_resume_with_max_iters_already_passed_is_refused_before_anything_is_written(sample_data_dir, run_dir,
                                                                                   monkeypatch):
    before = snapshot(run_dir)
    real_batch, calls = train.TokenWindows.batch, []

    def bounded(self, *a, **k):  # without the check the loop never ends: fail instead of hanging
        calls.append(1)
        assert len(calls) < 100, "the resumed run trains past its max_iters"
        return real_batch(self, *a, **k)
    monkeypatch.setattr(train.TokenWindows, "batch", bounded)
    with pytest.raises(ConfigError, match=r"max_iters=1, but .*ckpt.pt is already at step 2: nothing is left"):
        train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=1"))
    assert snapshot(run_dir) == before


# ---- 2. checkpoints are verified when opened ----------------------------------------------------------------------
def test_a_flipped_bit_in_a_checkpoint_is_named_and_nothing_is_overwritten(sample_data_dir, run_dir):
    path = run_dir / "ckpt.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # inside a weight's bytes: torch.load alone reads it without complaint
    path.write_bytes(bytes(data))
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"ckpt.pt is damaged: its record '.*' does not match the checksum"):
        checkpoint.load(str(run_dir))
    with pytest.raises(ValueError, match="is damaged"):
        train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=4"))
    assert snapshot(run_dir) == before


def test_a_non_finite_weight_is_never_a_good_checkpoint(sample_data_dir, run_dir):
    rewrite(run_dir / "ckpt.pt", lambda c: c["model"]["wte.weight"].view(-1)[7].fill_(float("nan")))
    with pytest.raises(ValueError, match=r"ckpt.pt: weight 'wte.weight' holds NaN or inf: the run that wrote it "
                                         r"had diverged"):
        train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=4"))
    with pytest.raises(ValueError, match="holds NaN or inf"):
        chat.load_chat(str(run_dir))


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


@pytest.mark.parametrize("edit, named", [
    (_set("config", {}), "its config lacks n_layer, n_embd, n_head, vocab_size, block_size"),
    (lambda c: c["config"].pop("n_embd"), "its config lacks n_embd"),
    (_set("step", "2"), "'step' is a str"),
    (_set("model", [1, 2]), "'model' is a list"),
    (_set("model", {"wte.weight": 3}), "its 'model' holds no weights"),
    (lambda c: c["config"].update(n_layer="two"), "n_layer='two': must be an int"),
    (lambda c: c["config"].update(vocab_pad_multiple=1), "its weights do not fit the model its config describes"),
    (lambda c: c["data"].pop("next_sample"), "optimizer state but no step or data position"),
])
def test_foreign_or_edited_checkpoints_are_one_line_for_train_and_chat(sample_data_dir, run_dir, edit, named):
    rewrite(run_dir / "ckpt.pt", edit)
    with pytest.raises(ValueError, match="ckpt.pt") as e:
        train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=4"))
    assert named in str(e.value)
    if "next_sample" not in named:  # chat reads weights and config only
        with pytest.raises(ValueError, match="ckpt.pt") as e:
            chat.load_chat(str(run_dir))
        assert named in str(e.value)


def test_a_zero_byte_checkpoint_is_one_line(run_dir):
    (run_dir / "ckpt.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ckpt.pt is not a readable checkpoint"):
        checkpoint.load(str(run_dir))
    proc = script("chat.py", str(run_dir), "-p", "hi")
    one_line_error(proc, "ckpt.pt is not a readable checkpoint")


# ---- 3. the tokenizer is recorded by content ----------------------------------------------------------------------
@pytest.fixture
def own_tokenizer_run(tmp_path):
    """Data and a 1-step run made with a tokenizer file that is later 'retrained' in place."""
    tok = tmp_path / "my.json"
    shutil.copy(os.path.join(ROOT, "assets", "openstax_4k.json"), tok)
    data = str(tmp_path / "data")
    meta = prepare_fineweb.main(["--local", prepare_fineweb.SAMPLE, "--out_dir", data, "--tokenizer", str(tok),
                                 "--val_tokens", "3000", "--max_tokens", "20000", "--workers", "1"])
    assert meta["tokenizer_sha256"] == tokenizer.content_hash(str(tok))
    out = tmp_path / "run"
    train.train(cfg_for(data, out, "--max_iters=1", "--eval_interval=1", "--eval_iters=1"))
    assert checkpoint.load(str(out))["config"]["tokenizer_sha256"] == meta["tokenizer_sha256"]
    return tok, data, out


def retrain_in_place(tok):
    """The same file name, other merges (two ranks swapped): ids now decode to other text."""
    obj = json.loads(tok.read_text())
    ranks = obj["mergeable_ranks"]
    ranks[300], ranks[301] = ranks[301], ranks[300]
    tok.write_text(json.dumps(obj))
    tokenizer.get_encoding.cache_clear()


def test_a_tokenizer_retrained_in_place_is_named_on_resume_on_chat_and_on_a_new_run(own_tokenizer_run, tmp_path):
    tok, data, out = own_tokenizer_run
    retrain_in_place(tok)
    before = snapshot(out)
    with pytest.raises(ValueError, match=rf"tokenizer '{tok}' has changed: .*meta.json recorded sha256 \w+\.\.\., "
                                         r"the tokenizer is \w+\.\.\. now"):
        train.train(cfg_for(data, out, "--init_from=resume", "--max_iters=2"))
    with pytest.raises(ValueError, match=rf"tokenizer '{tok}' has changed: .*run recorded sha256"):
        chat.load_chat(str(out))
    with pytest.raises(ValueError, match="has changed"):
        train.train(cfg_for(data, tmp_path / "fresh", "--max_iters=1"))
    assert snapshot(out) == before


def test_a_checkpoint_of_another_tokenizer_content_is_refused_on_resume(own_tokenizer_run):
    tok, data, out = own_tokenizer_run
    rewrite(out / "ckpt.pt", lambda c: c["config"].update(tokenizer_sha256="0" * 64))
    with pytest.raises(ValueError, match=r"ckpt.pt recorded sha256 000000000000\.\.\., the tokenizer is"):
        train.train(cfg_for(data, out, "--init_from=resume", "--max_iters=2"))


def test_resume_on_data_prepared_again_is_refused(sample_data_dir, run_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "source": "other text"}))
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"meta.json is not the data .*ckpt.pt was trained on \(meta.json sha256 "
                                         r"\w+\.\.\. then, \w+\.\.\. now"):
        train.train(cfg_for(str(data), run_dir, "--init_from=resume", "--max_iters=4"))
    assert snapshot(run_dir) == before


def test_meta_json_naming_an_unloadable_tokenizer_fails_at_start(sample_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "tokenizer": str(tmp_path / "gone.json")}))
    with pytest.raises(ConfigError, match=r"meta.json names tokenizer '.*gone.json', which cannot be loaded"):
        train.train(cfg_for(str(data), tmp_path / "run", "--max_iters=1"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_prepare_tokenizer_refuses_to_overwrite_a_folder_or_to_learn_nothing(tmp_path):
    src = tmp_path / "text.jsonl"
    src.write_text("".join(json.dumps({"text": f"the cell {i} divides and the cell grows"}) + "\n"
                           for i in range(50)))
    out = tmp_path / "tok.json"
    out.write_text("{}")
    with pytest.raises(ValueError, match="tok.json already exists: data and checkpoints made with it"):
        prepare_tokenizer.main(["--local", str(src), "--vocab_size", "300", "--out", str(out)])
    assert out.read_text() == "{}"
    with pytest.raises(ValueError, match="is a folder: give the tokenizer file to write"):
        prepare_tokenizer.main(["--local", str(src), "--vocab_size", "300", "--out", str(tmp_path)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="the training text is empty"):
        prepare_tokenizer.main(["--local", str(empty), "--vocab_size", "300", "--out", str(tmp_path / "e.json")])
    assert not (tmp_path / "e.json").exists()
    proc = script("prepare_tokenizer.py", "--local", str(src), "--vocab_size", "300", "--out", str(tmp_path))
    one_line_error(proc, "is a folder")


# ---- 4. a full disk is named, and the plot never hides it ----------------------------------------------------------
def test_torch_unexpected_pos_is_a_full_disk_and_loss_png_does_not_replace_the_error(sample_data_dir, run_dir,
                                                                                       monkeypatch):
    import matplotlib.figure
    old_png = (run_dir / "loss.png").read_bytes()

    def full_disk_save(obj, f, *a, **k):
        open(f, "wb").write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2176 vs 2066")

    def full_disk_png(self, fname, *a, **k):
        open(fname, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk_png)
    with pytest.raises(OSError, match=r"no space left writing .*ckpt.pt \(the previous ckpt.pt is kept"):
        train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=4"))
    assert (run_dir / "loss.png").read_bytes() == old_png  # the old plot, not a 0-byte one
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]


def test_a_full_disk_without_a_file_name_is_still_one_line():
    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit) as e:
        configurator.run_script(main, [])
    assert e.value.code == "error: no space left on the device: free some disk space, then resume"


# ---- 5. the temporaries of a killed save are removed at the next start ---------------------------------------------
def test_stale_temporaries_of_a_killed_save_are_removed_at_the_next_start(sample_data_dir, run_dir, capsys):
    for name in ("ckpt.pt.4242.tmp", "best.pt.77.tmp"):
        (run_dir / name).write_bytes(b"x" * 1000)
    (run_dir / "notes.tmp").write_text("mine")  # not a save()'s temporary: kept
    train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=3", "--eval_interval=3"))
    assert sorted(p for p in os.listdir(run_dir) if p.endswith(".tmp")) == ["notes.tmp"]
    assert "ckpt.pt.4242.tmp, left by a save that was killed" in capsys.readouterr().out


# ---- 6. init_from=hf:<folder> ------------------------------------------------------------------------------------
@pytest.mark.shared  # needs ../shared's data (SFT copies or eval task files): skipped without it
def test_init_from_a_hugging_face_folder_in_train_and_sft(trained, sample_data_dir, tmp_path):
    import export
    import prepare_sft
    import sft
    folder = export.export(str(trained), str(tmp_path / "native"), fmt="native")
    model, _ = checkpoint.load_model(str(trained))
    out = tmp_path / "from_hf"
    started = train.train(cfg_for(sample_data_dir, out, "--max_iters=1", "--eval_interval=1",
                                  f"--init_from=hf:{folder}", "--learning_rate=0", "--min_lr=0"))
    assert all(torch.equal(a, b) for a, b in zip(started.state_dict().values(), model.state_dict().values()))
    data = str(tmp_path / "sft_data")
    prepare_sft.main(["--out_dir", data, "--workers", "1", "--format", "alpaca", "--source", "alpaca_tiny_local",
                      "--block_size", "64"])
    cfg = configure(sft.DEFAULTS, [f"--data_dir={data}", f"--init_from=hf:{folder}", f"--out_dir={tmp_path / 's'}",
                                   "--max_iters=1", "--epochs=0", "--eval_iters=1", "--batch_size=2",
                                   "--total_batch_tokens=128", "--compile=False"])
    train.train(sft.prepare(cfg))
    assert checkpoint.load(str(tmp_path / "s"))["config"]["chat_format"] == "alpaca"


# ---- 7. another optimizer cannot continue a run's optimizer state ---------------------------------------------------
@pytest.mark.parametrize("other", ["muon", "sophia"])
def test_resume_with_another_optimizer_is_refused_before_run_config_is_rewritten(sample_data_dir, run_dir, other):
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=rf"optimizer='{other}', but .*ckpt.pt was trained with 'adamw'.*"
                                         r"resume with --optimizer=adamw"):
        train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=4", f"--optimizer={other}"))
    assert snapshot(run_dir) == before


# ---- 8. one line where a traceback was --------------------------------------------------------------------------
@pytest.mark.parametrize("flag, named", [
    ("--block_size=200000 --total_batch_tokens=800000", "holds no window of block_size + 1 = 200001 tokens"),
    ("--n_head=0", "n_head=0: must be >= 1"),
    ("--ffn_hidden=0", "ffn_hidden=0: must be >= 1"),
    ("--n_layer=-2", "n_layer=-2: must be >= 1"),
    ("--poly_power=-1", "poly_power=-1.0: must be >= 0.0"),
    ("--beta2=1.0", "beta2=1.0: must be >= 0.0 and < 1.0"),
    ("--wsd_decay_frac=-0.5", "wsd_decay_frac=-0.5: must be >= 0.0"),
])
def test_bad_model_and_schedule_values_are_named_before_anything_is_written(sample_data_dir, tmp_path, flag, named):
    extra = ["--lr_schedule=poly"] if "poly" in flag else []
    with pytest.raises(ValueError) as e:
        train.train(cfg_for(sample_data_dir, tmp_path, "--max_iters=2", *flag.split(), *extra))
    assert named in str(e.value)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "run_config.json").exists()


def test_data_smaller_than_one_window_is_named(sample_data_dir, tmp_path):
    from shards import write_shard
    data = tmp_path / "tiny_data"
    shutil.copytree(sample_data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    for name in os.listdir(data):
        if name.startswith("train_"):
            os.remove(data / name)
    write_shard(str(data / "train_000001.bin"), [], meta["vocab_size"], meta["eot"])  # an empty train shard
    with pytest.raises(ValueError, match=r"the train split \(0 tokens in 1 shard\(s\)\) holds no window"):
        train.train(cfg_for(str(data), tmp_path / "run", "--max_iters=2"))
    with pytest.raises(ValueError, match="holds no window"):
        train.train(cfg_for(str(data), tmp_path / "run2", "--epochs=1"))


@pytest.mark.parametrize("content, named", [
    ("[1, 2]", "tokenizer, vocab_size, eot missing or of the wrong type"),
    ('{"tokenizer": "gpt2", "vocab_size": 50257}', "eot missing or of the wrong type"),
    ('{"tokenizer": "gpt2", ', "meta.json: not valid JSON"),
])
def test_a_malformed_meta_json_is_named(sample_data_dir, tmp_path, content, named):
    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    (data / "meta.json").write_text(content)
    with pytest.raises(ValueError, match="meta.json") as e:
        train.train(cfg_for(str(data), tmp_path / "run", "--max_iters=1"))
    assert named in str(e.value)


def test_prepare_fineweb_errors_and_ctrl_c_are_one_line(tmp_path):
    one_line_error(script("prepare_fineweb.py", "--local", prepare_fineweb.SAMPLE, "--tokenizer", "nosuch",
                          "--out_dir", str(tmp_path / "a"), "--workers", "1"), "unknown tokenizer 'nosuch'")
    obj = json.load(open(os.path.join(ROOT, "assets", "openstax_4k.json")))
    (tmp_path / "bad.json").write_text(json.dumps({**obj, "pat_str": "(?P<"}))
    one_line_error(script("prepare_fineweb.py", "--local", prepare_fineweb.SAMPLE, "--tokenizer",
                          str(tmp_path / "bad.json"), "--out_dir", str(tmp_path / "b"), "--workers", "1"),
                   "bad.json: damaged")

    def interrupted(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        configurator.run_script(interrupted, [])
    assert e.value.code == 130


@pytest.fixture
def hf_folder(trained, tmp_path):
    """An exported Hugging Face (Llama) folder of the trained run, with its tokenizer.json."""
    pytest.importorskip("tokenizers")
    import export
    return export.export(str(trained), str(tmp_path / "hf"), fmt="hf")


@pytest.mark.parametrize("damage, named", [
    (lambda f: open(os.path.join(f, "model.safetensors"), "r+b").truncate(5000),
     "model.safetensors: not a readable safetensors file"),
    (lambda f: _edit_json(os.path.join(f, "config.json"), lambda c: c.update(intermediate_size=100)),
     "the weights do not fit config.json"),
    (lambda f: open(os.path.join(f, "config.json"), "w").write("[1, 2]"),
     "config.json: expected a JSON object of model settings, found a list"),
    (lambda f: open(os.path.join(f, "tokenizer.json"), "w").write('{"model": {"type": "BPE"}, "added_tokens": 3}'),
     "tokenizer.json: damaged or unsupported"),
    (lambda f: os.remove(os.path.join(f, "model.safetensors")), "model.safetensors"),
])
@pytest.mark.shared  # needs ../shared's data (SFT copies or eval task files): skipped without it
def test_damaged_hugging_face_folders_are_one_line_in_chat_and_eval(hf_folder, tmp_path, damage, named):
    import eval as evaluation
    damage(hf_folder)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        chat.load_chat(hf_folder)
    assert named in str(e.value)
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--ckpt", hf_folder, "--tasks", "arc_easy", "--limit", "1", "--bpb_file", "none"])
    assert named in str(e.value.code)


def _edit_json(path, edit):
    obj = json.load(open(path))
    edit(obj)
    json.dump(obj, open(path, "w"))


@pytest.mark.shared  # needs ../shared's data (SFT copies or eval task files): skipped without it
def test_eval_refuses_before_the_work_when_its_results_cannot_be_written(trained, monkeypatch):
    import eval as evaluation
    ran = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: ran.append(1) or {})
    with pytest.raises(SystemExit) as e:  # /proc takes no new files, even from root
        evaluation.main(["--ckpt", str(trained), "--tasks", "arc_easy", "--limit", "1", "--bpb_file", "none",
                         "--out", "/proc/nanoforge_eval.json"])
    assert "cannot write /proc/nanoforge_eval.json" in str(e.value.code) and not ran


@pytest.mark.parametrize("value, named", [
    ("abc", "n_embd='abc' is a str, but it must be of type int"),
    ("48.5", "n_embd=48.5 is a float, but it must be of type int"),
])
def test_keys_whose_default_is_none_have_a_declared_type(value, named):
    with pytest.raises(ConfigError, match=named):
        configure(distill.DEFAULTS, [f"--n_embd={value}"], distill.TYPES)
    assert configure(distill.DEFAULTS, ["--n_embd=48"], distill.TYPES)["n_embd"] == 48


def test_distill_negative_width_is_one_line(trained, tmp_path):
    proc = script("distill.py", f"--teacher={trained}", "--n_embd=-8", f"--out_dir={tmp_path}", "--compile=False")
    one_line_error(proc, "n_embd=-8: must be >= 1")
    one_line_error(script("distill.py", f"--teacher={trained}", "--n_embd=abc"), "n_embd='abc' is a str")


# ---- 9. smaller ---------------------------------------------------------------------------------------------------
def test_binary_context_file_and_non_utf8_metrics_name_the_file(sample_data_dir, run_dir, tmp_path):
    binary = tmp_path / "doc.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    one_line_error(script("chat.py", str(run_dir), "--context", str(binary), "-p", "hi", "--max_new_tokens", "2"),
                   f"--context {binary}: not UTF-8 text")
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 1, "note": "\xff"}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:\d+ is not valid JSON"):
        train.train(cfg_for(sample_data_dir, run_dir, "--init_from=resume", "--max_iters=3"))


def test_a_folder_with_config_json_but_no_weights_names_model_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors \(or, sharded"):
        checkpoint.load_model(str(tmp_path))


def test_readme_says_presets_are_python_that_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert "Presets are Python files that run" in text
