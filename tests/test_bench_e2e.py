"""bench/e2e.py without a GPU: its data folders, its reading of metrics.jsonl, bad flags, and a failed run."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from bench import e2e
from shards import list_shards, open_shard


def test_synthetic_data_is_a_data_folder_train_py_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(e2e, "TOKENS_PER_VOCAB", 5000)
    folder = e2e.synthetic_data(str(tmp_path), "cl100k_base", 100277)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["vocab_size"] == 100277 and meta["tokenizer"] == "cl100k_base" and meta["eot"] == 100257
    for split, n in (("val", 65_536), ("train", 5000)):
        (path,) = list_shards(folder, split)
        tokens, _, info = open_shard(path, 100277)
        assert info["n_tokens"] == n and tokens.dtype == np.uint32 and int(tokens.max()) < 100277
    assert e2e.synthetic_data(str(tmp_path), "cl100k_base", 100277) == folder  # made once, then reused


def test_read_metrics_takes_the_second_half(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val_loss": 11.0}] + [
        {"step": s, "loss": 5.0, "tok_s": 1000.0 * s, "mfu": 0.01 * s, "mem_gib": float(s)} for s in (3, 6, 9, 12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert e2e.read_metrics(str(path), 12) == (10500.0, pytest.approx(0.105), 12.0)  # steps 9 and 12 only
    with pytest.raises(ValueError, match="no logged training step past step 50"):
        e2e.read_metrics(str(path), 100)


@pytest.mark.parametrize("argv, msg", [(["--presets", "nope"], "no config/nope.py"),
                                       (["--presets", "tiny", "--layers", "gpt2_124m=2"], "not run"),
                                       (["--nanogpt", "/nonexistent"], "no bench.py there")])
def test_bad_flags_are_one_line_errors(argv, msg, capsys):
    with pytest.raises(SystemExit):
        e2e.parse_args(argv)
    assert msg in capsys.readouterr().err


def test_a_failed_run_is_a_row_and_the_report_still_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(e2e, "run_logged", lambda *a: 1)
    monkeypatch.setattr(e2e, "RESULTS_DIR", str(tmp_path))
    args = SimpleNamespace(layers={"gpt2_124m": 2}, logs=str(tmp_path), steps=10, compile_mode="", timeout=5,
                           results="e2e")
    row = e2e.time_preset("gpt2_124m", "auto", str(tmp_path), str(tmp_path), args)
    assert row["tok_s"] is None and "status 1" in row["error"] and row["layers"] == 2
    e2e.write_report([row], {"gpu": "x", "date": "d", "commit": "c"}, args)
    saved = json.load(open(tmp_path / "e2e.json"))
    assert saved["rows"][0]["preset"] == "gpt2_124m" and set(saved) == {"gpu", "date", "commit", "rows"}
    assert "2 *" in (tmp_path / "e2e.md").read_text()  # fewer layers than the preset: marked


def test_merge_keeps_other_presets_rows_with_their_own_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(e2e, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(e2e, "TOKENS_PER_VOCAB", 5000)
    monkeypatch.setattr(e2e, "gpu_name", lambda: "GPU B")
    monkeypatch.setattr(e2e, "time_preset", lambda preset, backend, *a: {
        "preset": preset, "kernels": backend, "tok_s": 2.0 if backend == "auto" else 1.0, "mfu": 0.1,
        "mem_gib": 1.0, "layers": 12, "accum": 1})
    earlier = {"gpu": "GPU A", "date": "2026-12-01", "commit": "abc1234", "rows": [
        {"preset": "lille_130m", "kernels": "auto", "tok_s": 3.0, "mfu": 0.2, "mem_gib": 2.0, "layers": 24},
        {"preset": "gpt2_124m", "kernels": "auto", "tok_s": 9.0, "mfu": 0.2, "mem_gib": 2.0, "layers": 12}]}
    (tmp_path / "e2e.json").write_text(json.dumps(earlier))
    rows = e2e.main(["--presets", "gpt2_124m", "--merge", "--profile_steps", "0"])
    assert [(r["preset"], r["kernels"], r["gpu"]) for r in rows] == [
        ("lille_130m", "auto", "GPU A"), ("gpt2_124m", "auto", "GPU B"), ("gpt2_124m", "torch", "GPU B")]
    table = (tmp_path / "e2e.md").read_text()
    assert "(GPU A, 2026-12-01, abc1234)" in table and "| 2.000x |" in table  # gpt2's ratio from its own run
