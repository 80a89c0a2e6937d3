"""
prepare_fineweb.py — text in, token shards out (the format in shards.py).

    # the real thing: stream FineWeb-Edu from the Hugging Face hub (no full download), 1B tokens
    python prepare_fineweb.py --out_dir data/fineweb_edu --max_tokens 1e9
    # only documents the educational classifier scored >= 3
    python prepare_fineweb.py --min_score 3
    # offline: local jsonl / jsonl.gz / parquet / txt files (here the OpenStax textbooks in ../shared)
    python prepare_fineweb.py --local '../shared/data/openstax_edu_text/train_*.jsonl.gz' \\
        --val_local ../shared/data/openstax_edu_text/val_000.jsonl.gz --out_dir data/openstax_gpt2
    # a weighted mixture, token-weighted (auto_g_nano_1b's): see MIXES below
    python prepare_fineweb.py --mix smollm --tokenizer gpt2 --out_dir data/smollm_mix

Every document becomes [end-of-text] + tokens: the end-of-text token *prepended* marks where a document starts,
so the model learns that what follows it is unrelated to what came before. Tokenizing runs in a pool of
processes; results come back in input order (imap), so the output is identical run to run.

Validation comes first: shard 0 holds --val_tokens worth of whole documents from the start of the stream
(or the --val_local files), the train shards follow.
"""
import argparse
import glob
import gzip
import json
import os
import sys
from multiprocessing import Pool

import numpy as np

from shards import token_dtype, write_shard

# Named mixtures: (hub dataset, config, text field, weight). auto-g-nano interleaved these SmolLM-corpus parts.
MIXES = {
    "smollm": [("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup", "text", 0.40),
               ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "text", 0.25),
               ("codeparrot/codeparrot-clean", None, "content", 0.35)],  # Python code
}


def iter_local(patterns, text_field="text"):
    """Documents from local files, in sorted-path order. jsonl(.gz) and parquet rows use `text_field`."""
    paths = sorted(p for pat in patterns for p in glob.glob(pat))
    if not paths:
        raise FileNotFoundError(f"no files match {patterns}")
    for path in paths:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
                yield from batch.column(0).to_pylist()
        elif path.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if text_field not in row:
                            raise KeyError(f"{path}:{line_no}: no '{text_field}' field (has {list(row)[:5]})")
                        yield row[text_field]
        elif path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:  # one document per file
                yield f.read()
        else:
            raise ValueError(f"{path}: unsupported file type (jsonl, jsonl.gz, parquet, txt)")


def iter_hub(name, config, text_field="text", min_score=None):
    """Stream a dataset from the hub: rows arrive as they download, nothing is stored beyond a small buffer."""
    from datasets import load_dataset
    ds = load_dataset(name, name=config, split="train", streaming=True)
    for row in ds:
        if min_score is not None and row.get("score", float("inf")) < min_score:
            continue
        yield row[text_field]


def interleave(sources, weights, tokens_of):
    """Token-weighted mixing: always draw the next document from the source furthest below its share.
    Deterministic (no randomness at all), and exact in tokens rather than in documents."""
    emitted = [0] * len(sources)
    alive = list(range(len(sources)))
    while alive:
        i = min(alive, key=lambda j: emitted[j] / weights[j])
        try:
            doc = next(sources[i])
        except StopIteration:
            alive.remove(i)
            continue
        toks = tokens_of(doc)
        emitted[i] += len(toks)
        yield toks


_enc = None


def _init_worker(tokenizer):
    global _enc
    import tiktoken
    _enc = tiktoken.get_encoding(tokenizer)


def _tokenize(text):
    # encode_ordinary: special-token strings in web text ("<|endoftext|>") are encoded as plain text
    return np.array([_enc.eot_token] + _enc.encode_ordinary(text), dtype=np.uint32)


class ShardWriter:
    """Collects document tokens and writes fixed-size shards; the first `val_tokens` go to the val shard."""

    def __init__(self, out_dir, vocab_size, eot, shard_size, val_tokens):
        self.out_dir, self.vocab_size, self.eot = out_dir, vocab_size, eot
        self.shard_size, self.val_tokens = shard_size, val_tokens
        self.buf, self.n_buf, self.index, self.total = [], 0, 0, 0
        self.val_done = val_tokens == 0
        self.written = []

    def add(self, toks):
        self.buf.append(toks)
        self.n_buf += len(toks)
        self.total += len(toks)
        limit = self.val_tokens if not self.val_done else self.shard_size
        if self.n_buf >= limit:
            self.flush()

    def end_val(self):
        """Close the validation shard now (used when validation comes from its own files)."""
        if not self.val_done:
            self.flush()

    def flush(self):
        if not self.buf:
            return
        tokens = np.concatenate(self.buf)
        if self.val_done and len(tokens) > self.shard_size:  # train shards are cut exactly; val keeps whole docs
            tokens, rest = tokens[:self.shard_size], tokens[self.shard_size:]
        else:
            rest = tokens[:0]
        split = "val" if not self.val_done else "train"
        path = os.path.join(self.out_dir, f"{split}_{self.index:06d}.bin")
        write_shard(path, tokens, self.vocab_size, self.eot)
        self.written.append((path, len(tokens)))
        self.index += 1
        self.val_done = True
        self.buf, self.n_buf = ([rest], len(rest)) if len(rest) else ([], 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="hub dataset to stream")
    p.add_argument("--dataset_config", default="sample-10BT")
    p.add_argument("--min_score", type=float, default=None, help="keep rows whose 'score' is at least this")
    p.add_argument("--local", nargs="+", default=None, help="local files or globs instead of the hub")
    p.add_argument("--val_local", nargs="+", default=None, help="local files that make the validation shard")
    p.add_argument("--text_field", default="text")
    p.add_argument("--mix", choices=sorted(MIXES), default=None, help="a named weighted mixture of hub sources")
    p.add_argument("--out_dir", default="data/fineweb_edu")
    p.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding: gpt2, cl100k_base, ...")
    p.add_argument("--max_tokens", type=float, default=0, help="stop after this many tokens (0 = all)")
    p.add_argument("--val_tokens", type=float, default=10e6, help="tokens in the validation shard (whole docs)")
    p.add_argument("--shard_size", type=float, default=100e6, help="tokens per train shard")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = p.parse_args(argv)

    import tiktoken
    from tqdm import tqdm
    enc = tiktoken.get_encoding(args.tokenizer)
    os.makedirs(args.out_dir, exist_ok=True)
    if any(f.endswith(".bin") for f in os.listdir(args.out_dir)):
        raise SystemExit(f"error: {args.out_dir} already holds shards; remove them or choose another --out_dir")
    writer = ShardWriter(args.out_dir, enc.n_vocab, enc.eot_token, int(args.shard_size),
                         0 if args.val_local else int(args.val_tokens))
    max_tokens = int(args.max_tokens) or None
    print(f"tokenizer {args.tokenizer}: vocabulary {enc.n_vocab}, tokens stored as "
          f"{np.dtype(token_dtype(enc.n_vocab)).name}, end-of-text id {enc.eot_token}")

    with Pool(args.workers, initializer=_init_worker, initargs=(args.tokenizer,)) as pool:
        def tokenized(texts):
            return pool.imap(_tokenize, texts, chunksize=16)

        if args.val_local:
            writer.val_done, writer.val_tokens = False, float("inf")  # every document of these files
            for toks in tqdm(tokenized(iter_local(args.val_local, args.text_field)), desc="val", unit="doc"):
                writer.add(toks)
            writer.val_tokens = writer.total  # the val shard is exactly those files
            writer.end_val()
        if args.mix:
            spec = MIXES[args.mix]
            streams = [tokenized(iter_hub(n, c, f, args.min_score)) for n, c, f, _ in spec]
            docs = interleave(streams, [w for *_, w in spec], tokens_of=lambda t: t)
        elif args.local:
            docs = tokenized(iter_local(args.local, args.text_field))
        else:
            docs = tokenized(iter_hub(args.dataset, args.dataset_config, args.text_field, args.min_score))
        n_val = writer.total
        with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokens") as bar:
            for toks in docs:
                if max_tokens and writer.total - n_val + len(toks) > max_tokens:
                    break
                writer.add(toks)
                bar.update(len(toks))
        writer.flush()
    if len(writer.written) < 2:
        raise SystemExit(f"error: only {writer.total} tokens: not enough for a validation and a train shard")
    meta = {"tokenizer": args.tokenizer, "vocab_size": enc.n_vocab, "eot": enc.eot_token,
            "shards": [{"file": os.path.basename(f), "tokens": n} for f, n in writer.written],
            "source": args.mix or args.local or f"{args.dataset}:{args.dataset_config}", "val_local": args.val_local}
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    for f, n in writer.written:
        print(f"{f}: {n:,} tokens")


if __name__ == "__main__":
    main(sys.argv[1:])
