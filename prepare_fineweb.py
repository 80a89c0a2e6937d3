"""
prepare_fineweb.py — text in, token shards out (the format in shards.py).

    # the first run: the OpenStax sample that ships in assets/ (train.py calls ensure_sample itself)
    python prepare_fineweb.py --local assets/openstax_cc_by_sample.jsonl.gz --out_dir data/openstax_sample
    # the real thing: stream FineWeb-Edu from the Hugging Face hub (no full download), 1B tokens
    python prepare_fineweb.py --out_dir data/fineweb_edu --max_tokens 1e9
    # only documents the educational classifier scored >= 3
    python prepare_fineweb.py --min_score 3
    # offline: local jsonl / jsonl.gz / parquet / txt files (here the OpenStax textbooks in ../shared)
    python prepare_fineweb.py --local '../shared/data/openstax_edu_text/train_*.jsonl.gz' \\
        --val_local ../shared/data/openstax_edu_text/val_000.jsonl.gz --out_dir data/openstax_gpt2
    # a weighted mixture, token-weighted (auto_g_nano_1b's): see MIXES below
    python prepare_fineweb.py --mix smollm --tokenizer gpt2 --out_dir data/smollm_mix
    # any tokenizer tokenizer.py knows: a tiktoken name, or a file from prepare_tokenizer.py
    python prepare_fineweb.py --local ... --tokenizer data/tokenizers/openstax_32k.json --out_dir ...

Every document becomes [end-of-text] + tokens: the end-of-text token *prepended* marks where a document starts,
so the model learns that what follows it is unrelated to what came before. Tokenizing runs in a pool of
processes, a bounded batch of documents at a time; results come back in input order, so the output is identical
run to run.

Validation comes first: shard 0 holds --val_tokens worth of whole documents from the start of the stream
(or the --val_local files), the train shards follow. An input smaller than --val_tokens is not an error: the
first --val_frac of it becomes validation instead (with a notice), so one small file is enough to start.

Nothing half-made is ever trained on: shards are written into `<out_dir>.partial`, meta.json last, and the
folder is renamed to out_dir only when everything is in it. A run that dies leaves the .partial folder, and the
next run says so (and how to continue) instead of mixing two runs' shards.
"""
import argparse
import glob
import gzip
import json
import os
import shutil
import sys
from itertools import islice

import numpy as np

from shards import ShardError, token_dtype, write_shard
from tokenizer import content_hash, get_encoding

# Named mixtures: (hub dataset, config, text field, score field or None, weight). auto-g-nano interleaved these
# SmolLM-corpus parts, token-weighted. The score field is where --min_score looks ("a.b" = row["a"]["b"]):
# smollm-corpus keeps FineWeb-Edu's classifier score under metadata; cosmopedia and code have none.
MIXES = {
    "smollm": [("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup", "text", "metadata.score", 0.40),
               ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "text", None, 0.25),
               ("codeparrot/codeparrot-clean", None, "content", None, 0.35)],  # Python code
}
HUB_SCORE_FIELD = "score"  # FineWeb-Edu's own rows: score (float) and int_score at the top level
ROOT = os.path.dirname(os.path.abspath(__file__))
# The quick start's data: CC BY 4.0 OpenStax books (README: "The sample"), prepared on first use by ensure_sample
SAMPLE = os.path.join(ROOT, "assets", "openstax_cc_by_sample.jsonl.gz")
SAMPLE_DIR_NAME = "openstax_sample"
SAMPLE_TOKENIZER = "assets/openstax_4k.json"  # prepare_tokenizer.py's 4,096-token BPE of that sample (README)
BATCH_DOCS = 256           # documents read ahead per source: what bounds memory, whatever the source's length


class DataError(ValueError):
    """Bad input, named by file and line: main() prints it as one line."""


# ---- reading: documents as plain strings, every problem named by file and line ---------------------------------
# Reading happens here, in the main process, and only tokenizing goes to the pool. So a bad row raises a DataError
# right where it is read, naming its file and line, instead of surfacing as a traceback from inside a worker
# (where the row's origin is long lost). main() prints a DataError as one line and stops before any shard is
# kept. Files are read as bytes and decoded line by line for the same reason: Python's text mode would report
# a non-UTF-8 byte as a position in a buffer, not as a line of the file.
def local_paths(patterns):
    """The files that local patterns (paths or globs) name, sorted; a pattern matching nothing is an error."""
    paths = set()
    for pat in patterns:
        found = glob.glob(pat)
        if not found:
            raise DataError(f"no files match '{pat}'")
        paths.update(found)
    return sorted(paths)


def iter_local(patterns, text_field="text"):
    """Documents from local files, in sorted-path order. jsonl(.gz) and parquet rows use `text_field`."""
    for path in local_paths(patterns):
        if path.endswith(".parquet"):
            yield from iter_parquet(path, text_field)
        elif path.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
            yield from iter_jsonl(path, text_field)
        elif path.endswith(".txt"):
            with open(path, "rb") as f:  # one document per file
                yield decode_utf8(f.read(), path)
        else:
            raise DataError(f"{path}: unsupported file type (jsonl, jsonl.gz, parquet, txt)")


def decode_utf8(raw, where):
    """bytes -> str, or a DataError naming where the first non-UTF-8 byte is and how to convert the file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); convert it "
                        f"first, e.g. iconv -f latin1 -t utf-8") from None


def json_lines(path):
    """(line number, object) for every non-empty line of a .jsonl or .jsonl.gz file. Read as bytes and decoded one
    line at a time, so a non-UTF-8 byte or a line of bad JSON is a DataError naming the file and the line
    ("file:line"). prepare_sft.py and eval_tasks.py read their JSON-lines files through this too: one reader, one
    way of naming a bad line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            line = decode_utf8(raw, where)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            yield line_no, row


def iter_jsonl(path, text_field):
    """One JSON object a line; its text field is the document."""
    for line_no, row in json_lines(path):
        yield text_of(row, text_field, f"{path}:{line_no}")


def iter_parquet(path, text_field):
    """One column of a parquet file, batch by batch (parquet is columnar: only that column is read)."""
    import pyarrow.parquet as pq
    f = pq.ParquetFile(path)
    if text_field not in f.schema_arrow.names:
        raise DataError(f"{path}: no '{text_field}' column (has {f.schema_arrow.names[:5]}); set --text_field")
    row_no = 0
    for batch in f.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row_no += 1
            yield text_of({text_field: text}, text_field, f"{path}: row {row_no}")


def text_of(row, text_field, where):
    """The document text of one row, or a DataError saying what is wrong with it. A null or non-string text
    is an error rather than a skipped row: a whole column of them usually means the wrong --text_field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if text_field not in row:
        raise DataError(f"{where}: no '{text_field}' field (has {list(row)[:5]}); set --text_field")
    text = row[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{text_field}' is {'null' if text is None else type(text).__name__}, "
                        f"not a string")
    return text


def field(row, dotted):
    """row["a"]["b"] for "a.b"; None when any part is missing. Datasets nest their metadata differently
    (FineWeb-Edu: row["score"]; smollm-corpus: row["metadata"]["score"]), so MIXES names the path per source."""
    for key in dotted.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


def iter_hub(name, config, text_field="text", min_score=None, score_field=HUB_SCORE_FIELD):
    """Stream a dataset from the hub: rows arrive as they download, nothing is stored beyond a small buffer.
    With min_score, keep rows whose score_field is at least it; a row without that field is an error (a filter
    that silently keeps everything is worse than none)."""
    from datasets import load_dataset
    ds = load_dataset(name, name=config, split="train", streaming=True)
    for row_no, row in enumerate(ds, 1):
        where = f"{name}:{config} row {row_no}"
        if min_score is not None:
            score = field(row, score_field)
            if not isinstance(score, (int, float)):
                raise DataError(f"{where}: no numeric '{score_field}' field for --min_score (has {list(row)[:6]})")
            if score < min_score:
                continue
        yield text_of(row, text_field, where)


# ---- tokenizing, a bounded batch at a time ----------------------------------------------------------------------
# Each worker process loads the tokenizer once (the initializer), then turns texts into uint32 arrays. tiktoken
# releases the GIL, but one process per core is still the simplest way to use every core for a 1B-token run.
_enc = None


def _init_worker(tokenizer):
    global _enc
    _enc = get_encoding(tokenizer)


def _tokenize(text):
    # encode_ordinary: special-token strings in web text ("<|endoftext|>") are encoded as plain text
    return np.array([_enc.eot_token] + _enc.encode_ordinary(text), dtype=np.uint32)


def tokenized(texts, pool):
    """Token arrays of a stream of texts, in order. Only BATCH_DOCS documents are read ahead: Pool.imap would
    pull the whole input iterator into its task queue at once (unbounded memory, and one source drained before
    a mixture's next is touched)."""
    texts = iter(texts)
    while batch := list(islice(texts, BATCH_DOCS)):
        yield from (pool.map(_tokenize, batch, chunksize=16) if pool else map(_tokenize, batch))


def interleave(sources, weights, tokens_of, counts=None):
    """Token-weighted mixing: always draw the next document from the source furthest below its share
    (emitted_i / weight_i smallest). Deterministic (no randomness at all), exact in tokens rather than in
    documents, and lazy: a source is read only when it is its turn. `counts`, if given, is a list of
    [documents, tokens] per source, updated as documents go out."""
    # Why "furthest below its share" gives the weights: after n tokens in all, source i has emitted_i tokens and
    # is owed w_i * n. Picking the smallest emitted_i / w_i always serves the source most in debt, so every share
    # stays within about one (longest) document of w_i * n: an error in share of ~ (longest document) / n, which
    # shrinks as the output grows. A source that runs dry leaves; the others keep their relative weights.
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
        if counts is not None:  # after the yield: runs only once the caller has taken this document and asks
            counts[i][0] += 1   # for the next, so one it drew and dropped (the --max_tokens cut) is not counted
            counts[i][1] += len(toks)


# ---- writing ----------------------------------------------------------------------------------------------------
# Shards hold whole documents for validation (so bits per byte is measured on complete texts) and exactly
# shard_size tokens for training (a document may continue into the next train shard: training reads a flat
# stream of tokens, and the end-of-text token before each document says where one starts).
class ShardWriter:
    """Collects document tokens and writes fixed-size shards; the first `val_tokens` go to the val shard."""

    def __init__(self, out_dir, vocab_size, eot, shard_size, val_tokens):
        self.out_dir, self.vocab_size, self.eot = out_dir, vocab_size, eot
        self.shard_size, self.val_tokens = shard_size, val_tokens
        self.buf, self.n_buf, self.index, self.total = [], 0, 0, 0
        self.val_done = val_tokens == 0
        self.written = []

    def add(self, toks):
        """Buffer one document's tokens; write a shard as soon as a full one is buffered (memory stays bounded
        by one shard, ~200 MB of uint16 at the default 100M tokens)."""
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
        """Write the buffer as the next shard (the first one is validation), keeping what exceeds shard_size."""
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

    def finish(self, val_frac):
        """Write what is left. If the whole input was smaller than val_tokens, every document is still in the
        buffer: the first val_frac of its tokens (whole documents, at least one) become validation, the rest
        train, and a notice says so. Returns that notice, or None."""
        notice = None
        if not self.val_done:
            docs = self.buf
            if len(docs) < 2:
                raise DataError(f"only {len(docs)} document ({self.total} tokens): a validation and a train "
                                f"shard need at least two")
            # k = the fewest leading documents holding at least val_frac of all tokens, leaving one for training
            ends = np.cumsum([len(d) for d in docs])
            k = min(len(docs) - 1, max(1, int(np.searchsorted(ends, val_frac * self.total)) + 1))
            notice = (f"note: the input has {self.total:,} tokens, fewer than --val_tokens={self.val_tokens:,}: "
                      f"validation is its first {k} documents ({int(ends[k - 1]):,} tokens, --val_frac="
                      f"{val_frac:g}) instead")
            self.buf, self.n_buf = docs[:k], int(ends[k - 1])
            self.flush()
            self.buf, self.n_buf = docs[k:], self.total - int(ends[k - 1])
        while self.buf:
            self.flush()
        if len(self.written) < 2:
            raise DataError(f"only {self.total} tokens, all in the validation shard: no train shard (the "
                            f"--val_local files hold everything?)")
        return notice


# ---- the output folder: nothing half-made under out_dir, ever --------------------------------------------------
# Everything is written to <out_dir>.partial and meta.json goes in last; then one rename, which is atomic within a
# file system, makes out_dir appear complete. So a folder named out_dir is always a finished dataset (train.py can
# trust it), and a crash leaves only the .partial folder, which the next run finds and names.
def claim_out_dir(out_dir):
    """Refuse a finished or half-finished dataset, then create and return the temporary folder we write into.
    Creating it is the lock: a second run on the same out_dir finds it and stops."""
    partial = out_dir.rstrip("/") + ".partial"
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        raise DataError(f"{out_dir} already holds a prepared dataset (meta.json); remove it or choose another "
                        f"--out_dir")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise DataError(f"{out_dir} exists and holds files but no meta.json (a run that stopped partway?): "
                        f"remove it (rm -r {out_dir}) and run again, or choose another --out_dir")
    try:
        os.makedirs(partial)
    except FileExistsError:
        raise DataError(f"{partial} exists: an earlier run stopped partway (or one is still running). Its "
                        f"shards are incomplete and unused; remove it (rm -r {partial}) and run again") from None
    return partial


def count_local(patterns):
    """Documents in local files (for the progress bar's total): cheap next to tokenizing them."""
    n = 0
    for path in local_paths(patterns):
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            n += pq.ParquetFile(path).metadata.num_rows
        elif path.endswith(".txt"):
            n += 1
        else:
            with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                n += sum(1 for line in f if line.strip())
    return n


# ---- the run ----------------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="hub dataset to stream")
    p.add_argument("--dataset_config", default="sample-10BT")
    p.add_argument("--min_score", type=float, default=None,
                   help="keep hub rows whose score is at least this (FineWeb-Edu: 'score'; --mix: per source)")
    p.add_argument("--local", nargs="+", default=None, help="local files or globs instead of the hub")
    p.add_argument("--val_local", nargs="+", default=None, help="local files that make the validation shard")
    p.add_argument("--text_field", default="text")
    p.add_argument("--mix", choices=sorted(MIXES), default=None, help="a named weighted mixture of hub sources")
    p.add_argument("--out_dir", default="data/fineweb_edu")
    p.add_argument("--tokenizer", default="gpt2", help="a tiktoken name (gpt2, cl100k_base) or a tokenizer file")
    p.add_argument("--max_tokens", type=float, default=0, help="stop after this many train tokens (0 = all)")
    p.add_argument("--val_tokens", type=float, default=10e6, help="tokens in the validation shard (whole docs)")
    p.add_argument("--val_frac", type=float, default=0.1,
                   help="an input smaller than --val_tokens: this fraction of it becomes validation")
    p.add_argument("--shard_size", type=float, default=100e6, help="tokens per train shard")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = p.parse_args(argv)
    if not 0 < args.val_frac < 1:
        p.error(f"--val_frac must lie in (0, 1), got {args.val_frac}")
    if args.min_score is not None and args.local:
        p.error("--min_score filters hub rows on their score field; local files are taken whole (filter them first)")
    return args


def document_stream(args, pool, counts):
    """The training documents, tokenized: a weighted mixture, local files, or one hub dataset. For a mixture,
    each source gets its own lazy tokenized stream and interleave() decides, document by document, which one
    to read next: a source is only read when it is its turn, so none is drained ahead of the others."""
    if args.mix:
        spec = MIXES[args.mix]
        if args.min_score is not None:
            scored = ", ".join(f"{c or n} ({score})" for n, c, _, score, _ in spec if score)
            unscored = ", ".join(c or n for n, c, _, score, _ in spec if not score)
            print(f"note: --min_score {args.min_score:g} filters {scored}; {unscored} have no score field and are "
                  f"kept whole")
        streams = [tokenized(iter_hub(n, c, f, args.min_score if score else None, score), pool)
                   for n, c, f, score, _ in spec]
        return interleave(streams, [w for *_, w in spec], tokens_of=lambda t: t, counts=counts)
    if args.local:
        return tokenized(iter_local(args.local, args.text_field), pool)
    return tokenized(iter_hub(args.dataset, args.dataset_config, args.text_field, args.min_score), pool)


def write_dataset(args, enc, out, pool):
    """Every shard into `out` (the .partial folder); returns meta.json's contents."""
    from tqdm import tqdm
    writer = ShardWriter(out, enc.n_vocab, enc.eot_token, int(args.shard_size),
                         0 if args.val_local else int(args.val_tokens))
    if args.val_local:
        writer.val_done, writer.val_tokens = False, float("inf")  # every document of these files
        for toks in tqdm(tokenized(iter_local(args.val_local, args.text_field), pool), desc="val", unit="doc"):
            writer.add(toks)
        writer.val_tokens = writer.total  # the val shard is exactly those files
        writer.end_val()
    counts = [[0, 0] for _ in MIXES[args.mix]] if args.mix else None
    max_tokens = int(args.max_tokens) or None
    # the bar counts tokens against --max_tokens, or documents against the local files' count
    total = max_tokens or (count_local(args.local) if args.local else None)
    n_val = writer.total
    with tqdm(total=total, unit="tok" if max_tokens else "doc", unit_scale=bool(max_tokens),
              desc="tokenizing") as bar:
        for toks in document_stream(args, pool, counts):
            if max_tokens and writer.total - n_val + len(toks) > max_tokens:
                break
            writer.add(toks)
            bar.update(len(toks) if max_tokens else 1)
    notice = writer.finish(args.val_frac)
    if notice:
        print(notice)
    meta = {"tokenizer": args.tokenizer, "tokenizer_sha256": content_hash(args.tokenizer),  # by content: a path
            "vocab_size": enc.n_vocab, "eot": enc.eot_token,                                 # can be retrained
            "shards": [{"file": os.path.basename(f), "tokens": n} for f, n in writer.written],
            "source": args.mix or args.local or f"{args.dataset}:{args.dataset_config}", "val_local": args.val_local,
            "min_score": args.min_score, "val_note": notice}
    if args.mix:  # what the mixture really drew, per source (documents and tokens, validation included)
        meta["mix"] = [{"dataset": n, "config": c, "weight": w, "documents": d, "tokens": t}
                       for (n, c, *_, w), (d, t) in zip(MIXES[args.mix], counts)]
    return meta


def main(argv=None):
    """Check everything that can be checked (tokenizer, input patterns, the output folder) before reading a
    document, write into the .partial folder, publish it with one rename. Returns meta.json's contents."""
    args = parse_args(argv)
    enc = get_encoding(args.tokenizer)
    for patterns in (args.local, args.val_local):
        if patterns:
            local_paths(patterns)  # a pattern matching nothing fails now, before any folder is made
    partial = claim_out_dir(args.out_dir)
    print(f"tokenizer {args.tokenizer}: vocabulary {enc.n_vocab}, tokens stored as "
          f"{np.dtype(token_dtype(enc.n_vocab)).name}, end-of-text id {enc.eot_token}")
    try:
        if args.workers > 1:
            from multiprocessing import Pool
            with Pool(args.workers, initializer=_init_worker, initargs=(args.tokenizer,)) as pool:
                meta = write_dataset(args, enc, partial, pool)
        else:  # one process: no pool to start (the quick start's 2-core laptop)
            _init_worker(args.tokenizer)
            meta = write_dataset(args, enc, partial, None)
        with open(os.path.join(partial, "meta.json"), "w") as f:  # last: it marks the folder complete
            json.dump(meta, f, indent=1)
    except BaseException:  # an error or Ctrl-C: the partial folder holds nothing worth keeping
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # publish: out_dir appears, whole, in one step (rename of a directory onto an empty one is atomic on POSIX)
    if os.path.isdir(args.out_dir):
        os.rmdir(args.out_dir)  # empty (claim_out_dir checked): the rename below puts the finished folder there
    os.rename(partial, args.out_dir)
    for s in meta["shards"]:
        print(f"{os.path.join(args.out_dir, s['file'])}: {s['tokens']:,} tokens")
    return meta


def ensure_sample(data_dir):
    """The quick start's data, made on first use: train.py calls this when its data_dir is missing. Only a
    folder named like the sample's (data/openstax_sample) is prepared, from assets/ with SAMPLE_TOKENIZER; for
    any other missing folder it does nothing and returns False (train.py then says the folder is missing)."""
    if os.path.basename(os.path.normpath(data_dir)) != SAMPLE_DIR_NAME:
        return False
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        print(f"{data_dir} not found: preparing it from the OpenStax sample in assets/ (once, a few seconds)")
        main(["--local", SAMPLE, "--out_dir", data_dir, "--tokenizer", SAMPLE_TOKENIZER, "--val_tokens", "1e5"])
    return True


if __name__ == "__main__":
    from configurator import run_script
    run_script(main, sys.argv[1:], expected=(RuntimeError,))  # DataError, ShardError: ValueErrors
