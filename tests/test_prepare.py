"""prepare_fineweb.py: local formats, the shard layout (val first, EOT before every document), determinism,
and the token-weighted mixture."""
import gzip
import hashlib
import json
import os

import numpy as np
import pytest
import tiktoken

import prepare_fineweb
from shards import list_shards, open_shard

DOCS = [f"Document number {i}. " + "Photosynthesis turns light into chemical energy. " * (i % 5 + 1)
        for i in range(40)]


def write_sources(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for d in DOCS[:20]:
            f.write(json.dumps({"text": d, "other": 1}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": DOCS[20:30]}), tmp_path / "b.parquet")
    for i, d in enumerate(DOCS[30:]):
        (tmp_path / f"c{i:02d}.txt").write_text(d)
    return [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet"), str(tmp_path / "c*.txt")]


def test_local_formats_layout_and_determinism(tmp_path):
    sources = write_sources(tmp_path)
    enc = tiktoken.get_encoding("gpt2")
    digests = []
    for run in ("one", "two"):
        out = tmp_path / run
        prepare_fineweb.main(["--local", *sources, "--out_dir", str(out), "--val_tokens", "100",
                              "--shard_size", "300", "--workers", "2"])
        paths = [*list_shards(str(out), "val"), *list_shards(str(out), "train")]
        assert os.path.basename(paths[0]) == "val_000000.bin"
        assert os.path.basename(paths[1]) == "train_000001.bin"
        tokens = np.concatenate([open_shard(p, 50257)[0] for p in paths])
        # every document is [EOT] + its tokens, in source order: paths sorted, then rows in file order
        expected = np.concatenate([[enc.eot_token] + enc.encode_ordinary(d) for d in
                                   DOCS[:20] + DOCS[20:30] + DOCS[30:]])
        assert np.array_equal(tokens, expected)
        assert all(open_shard(p)[2]["n_tokens"] == 300 for p in paths[1:-1])  # train shards cut exactly
        digests.append([hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths])
    assert digests[0] == digests[1]


def test_mixture_is_token_weighted_and_deterministic():
    a = iter([np.ones(10)] * 100)
    b = iter([np.ones(30)] * 100)
    picked = list(prepare_fineweb.interleave([a, b], [0.75, 0.25], tokens_of=lambda t: t))
    n_a = sum(len(t) for t in picked[:40] if len(t) == 10)
    n_b = sum(len(t) for t in picked[:40] if len(t) == 30)
    assert abs(n_a / (n_a + n_b) - 0.75) < 0.05
    assert len(picked) == 200  # a source that runs dry is dropped, the other continues


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        list(prepare_fineweb.iter_local([str(tmp_path / "nothing*.jsonl")]))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(KeyError, match="no 'text' field"):
        list(prepare_fineweb.iter_local([str(tmp_path / "x.jsonl")]))
    (tmp_path / "y.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(prepare_fineweb.iter_local([str(tmp_path / "y.csv")]))
