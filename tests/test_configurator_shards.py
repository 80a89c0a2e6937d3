"""configurator.py and shards.py: bad input is a clear error that names what is wrong."""
import os

import numpy as np
import pytest

from configurator import ConfigError, configure
from shards import HEADER_BYTES, ShardError, open_shard, read_header, write_shard

DEFAULTS = {"batch_size": 16, "learning_rate": 6e-4, "compile": True, "out_dir": "out", "betas": (0.9, 0.95),
            "init_from": "scratch"}


def test_overrides_and_presets(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("batch_size = 8\nlearning_rate = 1e-3\n")
    cfg = configure(DEFAULTS, [str(preset), "--batch_size=4", "--compile=False", "--learning_rate=1",
                               "--out_dir=out/123", "--betas=(0.8, 0.9)"])
    assert cfg["batch_size"] == 4 and cfg["compile"] is False and cfg["out_dir"] == "out/123"
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)  # int accepted for a float
    assert cfg["betas"] == (0.8, 0.9)
    assert DEFAULTS["batch_size"] == 16  # the defaults themselves are untouched


@pytest.mark.parametrize("argv, msg", [
    (["--learning_rat=1e-3"], "unknown config key 'learning_rat'"),
    (["--batch_size=4.5"], "batch_size"),
    (["--compile=1"], "compile"),
    (["--batch_size"], "--key=value"),
    (["missing_preset.py"], "not found"),
])
def test_bad_overrides(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        configure(DEFAULTS, argv)


def test_preset_with_unknown_key(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("batch_sise = 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'batch_sise'"):
        configure(DEFAULTS, [str(preset)])


def test_shard_round_trip_uint16_and_uint32(tmp_path):
    for vocab, dtype in ((50257, np.uint16), (128256, np.uint32)):
        tokens = np.array([vocab - 1, 0, 5, 70000 % vocab])
        path = str(tmp_path / f"train_{vocab}.bin")
        write_shard(path, tokens, vocab, eot=vocab - 1, mask=[0, 1, 1, 0])
        got, mask, info = open_shard(path, vocab)
        assert got.dtype == dtype and list(got) == list(tokens) and list(mask) == [0, 1, 1, 0]
        assert info["vocab_size"] == vocab and info["eot"] == vocab - 1


def test_shard_bad_magic_truncated_and_out_of_vocab(tmp_path):
    path = str(tmp_path / "val_000000.bin")
    write_shard(path, np.arange(100), 50257)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-10])
    with pytest.raises(ShardError, match="truncated"):
        read_header(path)
    open(path, "wb").write(b"\x00" * 4 + raw[4:])
    with pytest.raises(ShardError, match="bad magic"):
        read_header(path)
    open(path, "wb").write(raw[:100])
    with pytest.raises(ShardError, match="shorter than"):
        read_header(path)
    open(path, "wb").write(raw)
    with pytest.raises(ShardError, match="token id 99 >= the model's vocabulary size 64"):
        open_shard(path, vocab_size=64)
    with pytest.raises(ShardError, match="must lie in"):
        write_shard(path, np.array([70000]), 50257)
    assert len(raw) == HEADER_BYTES + 200


def test_doc_starts_sidecar_round_trip_and_validation(tmp_path):
    """.docs.bin: written with the shard, read back into info['doc_starts']; offsets out of order or past the end
    are refused when writing and when reading (a file from elsewhere)."""
    from shards import ShardError, docs_path, open_shard, write_shard
    path = str(tmp_path / "train_000001.bin")
    write_shard(path, np.arange(10), 50257, eot=0, doc_starts=[0, 4, 7])
    _, _, info = open_shard(path)
    assert info["doc_starts"].tolist() == [0, 4, 7]
    for bad in ([0, 7, 4], [0, 10], [-1, 3]):
        with pytest.raises(ShardError, match="document starts"):
            write_shard(str(tmp_path / "train_000002.bin"), np.arange(10), 50257, doc_starts=bad)
        assert not os.path.exists(tmp_path / "train_000002.bin")  # refused before anything was written
    np.array([0, 12], dtype=np.int64).tofile(docs_path(path))
    with pytest.raises(ShardError, match="increasing offsets"):
        open_shard(path)
    write_shard(str(tmp_path / "plain.bin"), np.arange(5), 50257)
    assert open_shard(str(tmp_path / "plain.bin"))[2]["doc_starts"] is None
