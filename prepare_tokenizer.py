"""
prepare_tokenizer.py — train a byte-level BPE tokenizer and write a file tiktoken loads.

    # the one the tiny preset uses, from the sample that ships in assets/ (seconds)
    python prepare_tokenizer.py --local assets/openstax_cc_by_sample.jsonl.gz --vocab_size 4096 \\
        --out assets/openstax_4k.json
    # Lille's size, 32,768, from the OpenStax books in ../shared, or streamed from the hub
    python prepare_tokenizer.py --local '../shared/data/openstax_edu_text/train_*.jsonl.gz' --vocab_size 32768 \\
        --out data/tokenizers/openstax_32k.json
    python prepare_tokenizer.py --dataset HuggingFaceFW/fineweb-edu --max_chars 2e9 --vocab_size 32768 \\
        --out data/tokenizers/fineweb_32k.json
    # then every script takes the file where it takes a tiktoken name
    python prepare_fineweb.py --tokenizer data/tokenizers/openstax_32k.json --local ... --out_dir ...

The algorithm (byte-pair encoding, Sennrich et al. 2016 on bytes as in GPT-2):
  1. Text is UTF-8 bytes. The starting vocabulary is the 256 single bytes, so *every* string can be encoded,
     including characters never seen in training: they fall back to their bytes. No "unknown" token exists.
  2. A split pattern (a regex) first cuts the text into chunks: words with their leading space, runs of at most
     three digits, punctuation runs, newlines, other whitespace. Merges never cross a chunk boundary, so no
     token ever glues "dog" to the "." after it, and numbers are read in groups of at most three digits.
  3. Count every adjacent pair of tokens inside the chunks (each distinct chunk counted once, weighted by how
     often it occurs). Merge the most frequent pair into a new token, the next id. Recount, repeat, until the
     vocabulary has the size asked for. The order of the merges is the tokenizer: token id = merge rank.
  4. Encoding a new chunk replays the merges: of all adjacent pairs present, merge the one whose merged token
     has the lowest rank; stop when no adjacent pair is a token. Decoding concatenates the tokens' bytes.
Step 3 is the slow part (a naive loop is O(merges x corpus)); Hugging Face's `tokenizers` (Rust) does it with
incremental pair counts in seconds, so it trains, and tiktoken (Rust too) encodes with the ranks we write.

Special tokens sit above the merges: <|endoftext|> (every document starts with it, shards.py), then the chat
slots chat_format.py needs (its EXTRA_TOKENS: <|pad|>, <|im_start|>, ...). They are real token ids of this
tokenizer, so chat formats need no vocabulary padding. --vocab_size counts them: 32,768 means exactly 32,768 ids.

The split-pattern pitfall. GPT-4's pattern (tiktoken's cl100k_base) writes digits as `\\p{N}{1,3}+`: in tiktoken's
regex engine that is a *possessive* {1,3}, i.e. at most three digits. Hugging Face `tokenizers` uses Oniguruma,
where `{1,3}+` means "(one to three digits), one or more times": any run of digits, one chunk. The same text
would then be cut differently in training (HF) and in use (tiktoken). Our pattern writes `\\p{N}{1,3}` (a lone
atom needs no possessive), avoids `$` (end of *line* in Oniguruma, end of *text* in tiktoken), and
tests/test_tokenizer.py checks that both engines cut the same text into the same chunks.
"""
import argparse
import base64
import os
import sys
from itertools import islice

import checkpoint  # save_json: the one atomic writer

# GPT-4's split, written so Oniguruma (training) and tiktoken (use) read it alike (see the docstring): contractions
# ('s 'll ...), a word with at most one leading non-letter (" the", "(the"), 1-3 digits, punctuation with the
# newlines that follow it, newlines with the spaces before them, spaces not before a word, any other spaces.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"


def hf_trainer_and_tokenizer(n_merged_vocab):
    """A Hugging Face byte-level BPE, untrained: split pattern, then bytes -> printable characters (ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_merged_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], min_frequency=2, show_progress=True)
    return tok, trainer


def ranks_from_hf(tok):
    """HF's vocabulary -> tiktoken's mergeable ranks (token bytes -> rank). Single bytes get rank = byte value;
    every merged token keeps HF's id, which is its merge order (HF numbers the 256-letter alphabet first)."""
    from tokenizer import bytes_to_unicode
    unbyte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = tok.get_vocab()
    ranks = {bytes([b]): b for b in range(256)}
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i < 256:
            if len(piece) != 1:
                raise RuntimeError(f"unexpected: HF id {i} is the merged token {piece!r} (the alphabet comes first)")
            continue
        ranks[bytes(unbyte[c] for c in piece)] = i
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise RuntimeError("unexpected: HF's ids are not 0..n-1 (ranks must be dense)")
    return ranks


def train(texts, vocab_size, name):
    """Texts -> the tokenizer file's contents (a dict, see tokenizer.py's docstring) with vocab_size ids in all."""
    from chat_format import EXTRA_TOKENS
    specials = [EOT, *EXTRA_TOKENS]
    n_ranks = vocab_size - len(specials)
    if n_ranks < 256 + 1:
        raise ValueError(f"--vocab_size {vocab_size} is too small: 256 bytes + {len(specials)} special tokens "
                         f"+ at least one merge")
    tok, trainer = hf_trainer_and_tokenizer(n_ranks)
    tok.train_from_iterator(texts, trainer=trainer)
    ranks = ranks_from_hf(tok)
    if len(ranks) == 256:  # nothing was learned: no text, or no pair seen twice
        raise ValueError("the training text is empty (or has no pair of symbols seen twice): no merge was learned; "
                         "check --local / --text_field")
    if len(ranks) < n_ranks:  # the text ran out of pairs seen twice: a smaller vocabulary than asked
        print(f"note: the training text supports only {len(ranks) - 256} merges: vocabulary "
              f"{len(ranks) + len(specials)} instead of {vocab_size} (give more text)")
    by_rank = sorted(ranks, key=ranks.get)
    return {"format": "nanoforge-bpe", "name": name, "pat_str": SPLIT_PATTERN,
            "mergeable_ranks": [base64.b64encode(t).decode("ascii") for t in by_rank],
            "special_tokens": {s: len(ranks) + i for i, s in enumerate(specials)}, "eot": EOT}


def compression_table(texts, specs):
    """Bytes per token of held-out text for each tokenizer. Why it matters: bits per byte = (loss in nats per
    token / ln 2) / (bytes per token), so a tokenizer that packs more bytes into a token spends the model's
    per-token prediction on more text, and a smaller vocabulary makes each prediction cheaper (the output
    layer is vocab x d). Models with different tokenizers are compared in bits per byte, never per token."""
    from tokenizer import get_encoding
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    rows = []
    for spec in specs:
        try:
            enc = get_encoding(spec)
        except (ValueError, RuntimeError) as e:
            rows.append(f"  {spec:<40} unavailable ({str(e)[:80]})")
            continue
        n_tok = sum(len(enc.encode_ordinary(t)) for t in texts)
        rows.append(f"  {spec:<40} vocabulary {enc.n_vocab:>7,}  {n_tok:>10,} tokens  "
                    f"{n_bytes / n_tok:5.2f} bytes/token")
    return f"held-out text: {len(texts)} documents, {n_bytes:,} bytes\n" + "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", nargs="+", default=None, help="local jsonl/jsonl.gz/parquet/txt files or globs")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="hub dataset to stream (no --local)")
    p.add_argument("--dataset_config", default="sample-10BT")
    p.add_argument("--text_field", default="text")
    p.add_argument("--vocab_size", type=int, default=32768, help="ids in all: 256 bytes + merges + specials")
    p.add_argument("--max_chars", type=float, default=1e9, help="train on at most this many characters")
    p.add_argument("--heldout_docs", type=int, default=50, help="first documents, kept out of training, "
                                                                "on which compression is reported")
    p.add_argument("--out", required=True, help="the tokenizer file to write (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    # before the (maybe hour-long) training: a data folder prepared with the old file would silently decode to
    # other text (meta.json records its hash, so train.py and chat.py would refuse it, but better not to break it)
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a folder: give the tokenizer file to write, e.g. "
                         f"{os.path.join(args.out, 'tokenizer.json')}")
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out} already exists: data and checkpoints made with it would no longer "
                         f"match it; choose another name, or pass --overwrite to replace it")
    from prepare_fineweb import iter_hub, iter_local

    def documents():
        if args.local:
            return iter_local(args.local, args.text_field)
        return iter_hub(args.dataset, args.dataset_config, args.text_field)

    docs = documents()
    heldout = list(islice(docs, args.heldout_docs))

    def budget(docs, left=int(args.max_chars)):  # the training stream, cut at --max_chars
        for d in docs:
            if left <= 0:
                return
            left -= len(d)
            yield d[:max(0, left + len(d))]

    name = os.path.splitext(os.path.basename(args.out))[0]
    obj = train(budget(docs), args.vocab_size, name)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    checkpoint.save_json(args.out, obj)  # written whole or not at all
    n_vocab = len(obj["mergeable_ranks"]) + len(obj["special_tokens"])
    print(f"wrote {args.out}: {n_vocab:,} ids ({len(obj['mergeable_ranks']):,} byte sequences + specials "
          f"{list(obj['special_tokens'])})")
    if heldout:
        print(compression_table(heldout, [args.out, "gpt2", "cl100k_base"]))
    return obj


if __name__ == "__main__":
    from configurator import run_script
    run_script(main, sys.argv[1:])
