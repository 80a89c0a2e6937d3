"""
prepare_sft.py — instruction sets in, token + mask shards out (what sft.py trains on).

    # the seeds' sets from the Hugging Face hub, mixed with weights (NAME[:WEIGHT], weight 0.5 = a random half,
    # 2 = every example twice), in ParchmentLM's format and tokenizer
    python prepare_sft.py --format parchment --tokenizer cl100k_base --layout pad --block_size 1024 \\
        --source dolly_parchment --source simplemath --out_dir data/sft_parchment_cl100k
    # offline: the local copies in ../shared/data/sft (aliases below) or any jsonl / json file
    python prepare_sft.py --format alpaca --tokenizer gpt2 --out_dir data/sft_alpaca_gpt2 \\
        --source dolly_local --source alpaca_gpt4_local --source gsm8k_local
    # multilingual sets keep their English rows unless --lang names others (RAG_Multilingual: en es ca; Aya: ISO
    # 639-3 codes or names), a comma list for several sets at once; the retrieved passage becomes the context
    python prepare_sft.py --format lime --out_dir data/sft_rag_es --source rag_multilingual --source aya --lang es,spa

Pipeline: read each source -> rows to conversations (the schema is recognised from the row's fields) -> split off
`val_frac` of every source for validation -> weight the training part -> shuffle (seeded: the output is identical
run to run) -> chat_format.render -> shards: val_000000.bin first, then train_000001.bin, ... each with its
.mask.bin (1 = trained token) and .docs.bin (where each conversation starts), in the format of shards.py.

Layouts (how conversations become train.py's windows of block_size + 1 tokens):
  pack  (default) conversations back to back, as pretraining packs documents. No token is wasted; a window may
        hold several conversations (each starts with end-of-text, which pretraining taught means "a new document")
        and a long one continues in the next window.
  pad   every conversation alone in a window of exactly block_size tokens, padded with the format's pad token
        (mask 0): it starts at position 0 and attends to nothing else, as ParchmentLM trained. Conversations
        longer than block_size are dropped (counted). --block_size must equal the model's.

The shard header's vocabulary is chat_format's ChatFormat.vocab_size: the tokenizer's n_vocab widened to hold the
format's special tokens (gpt2 + chatml: 50260; + the pad slot with --layout pad), so uint16 storage still works
for gpt2, and sft.py can check the model's padded vocabulary covers it.
"""
import argparse
import glob
import json
import os
import random
import re
import sys
from multiprocessing import Pool

import numpy as np

from chat_format import FORMATS, ChatFormat
from device import shared_dir
from shards import write_shard
from tokenizer import get_encoding


PARCHMENT_DOLLY_CATEGORIES = ("closed_qa", "open_qa", "information_extraction")

# Hub sources: alias -> (dataset, config, split, options). Options: categories (keep rows whose 'category' is one
# of these), per_operator (SimpleMath: this many problems per arithmetic operator, ParchmentLM's balance).
HUB = {
    "dolly": ("databricks/databricks-dolly-15k", None, "train", {}),                   # auto-g-nano: all 15,011
    "dolly_parchment": ("Cleanlab/databricks-dolly-15k-cleaned", None, "train",
                        {"categories": PARCHMENT_DOLLY_CATEGORIES}),                      # ParchmentLM's QA subset
    "alpaca_cleaned": ("yahma/alpaca-cleaned", None, "train", {}),
    "no_robots": ("HuggingFaceH4/no_robots", None, "train", {}),
    "simplemath": ("ProCreations/SimpleMath", None, "train", {"per_operator": 2500}),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", None, "train_sft", {}),              # LRC's SFT set
    "rag": ("neural-bridge/rag-dataset-12000", None, "train", {}),                      # context, question, answer
    "kyoto": ("Nikity/Kyoto-Corpus", None, "train", {}),                                # Lille-130M-Instruct's
    "rag_multilingual": ("projecte-aina/RAG_Multilingual", None, "train", {}),          # LIME-1B's (with the next)
    "aya": ("CohereLabs/aya_dataset", None, "train", {}),
}
# Where the seeds' own sets' fields come from (to_messages below reads them):
#   kyoto: Nikity/Kyoto-Corpus, named by Lille-130M-Instruct's model card and Nikityyy/lille's README. Its dataset
#     card could not be read from here, so its fields and split are NOT confirmed: 'train' is assumed, and a row is
#     read as `messages` or `conversations` if it has them, else as a `text` in Lille's own template, the form
#     Lille's pipeline documents (prepare_dataset.py reads <|endoftext|>-separated text; the chat template of its
#     huggingface/export_hf.py and the Hastings tokenizer's README give <|startoftext|><|user|>..<|assistant|>..).
#   rag_multilingual: projecte-aina/RAG_Multilingual, files train.jsonl, validation.jsonl, test.jsonl (the hub's
#     file tree at a7020cf); columns id, instruction, context, response, category, lang (en | es | ca), extractive
#     (as the public loaders that train on it read them). Dolly's schema plus `lang`: the context is the passage.
#   aya: CohereLabs/aya_dataset (formerly CohereForAI/aya_dataset), splits train and test; columns inputs,
#     targets, language (a name, "English"), language_code (ISO 639-3, "eng"), annotation_type, user_id (the
#     card's dataset_info, as the subsets cut from it repeat it, and loaders filtering language_code).
# A source whose rows carry a language field keeps one language: English by default, --lang to choose.
LANGUAGE_FIELDS = {"lang": "en", "language_code": "eng"}  # field -> default; Aya's `language` name matches too
# Offline copies (shared/data/sft, see its MANIFEST.md): Dolly there has no category or context fields.
LOCAL = {
    "dolly_local": "dolly15k_partial/dolly15k_first6400_no_context.jsonl",
    "alpaca_gpt4_local": "alpaca_gpt4_demo/alpaca_en_demo.jsonl",
    "gsm8k_local": "gsm8k_train_alpaca/gsm8k_train.jsonl",
    "alpaca_tiny_local": "torchtune_alpaca_tiny/alpaca_tiny.json",
}


# ---- rows -> conversations -----------------------------------------------------------------------------------
def text_field(value, name):
    """A message's text: a string (a number, as SimpleMath's answers, becomes one). null is an error: an empty
    turn trained on would teach the model to say nothing."""
    if value is None:
        raise ValueError(f"field '{name}' is null")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' is a {type(value).__name__}, not a string")
    return value


def to_messages(row):
    """One dataset row -> a conversation (list of messages), recognising the common schemas by their fields.
    Required fields must be strings; an optional one (input, context) that is null counts as absent."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")

    def turn(user, answer, context=None, system=None):
        msgs = [{"role": "system", "content": system}] if system else []
        context = text_field(row[context], context) if context and row.get(context) is not None else ""
        msgs += [{"role": "context", "content": context}] if context.strip() else []
        return msgs + [{"role": "user", "content": text_field(row[user], user)},
                       {"role": "assistant", "content": text_field(row[answer], answer)}]
    if "messages" in row:                                       # no_robots, ultrachat: [{role, content}]
        return [{"role": text_field(m.get("role"), "messages[].role"),
                 "content": text_field(m.get("content"), "messages[].content")} for m in row["messages"]]
    if "conversations" in row:                                  # ShareGPT: [{from, value}]
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        return [{"role": roles.get(m["from"], m["from"]),
                 "content": text_field(m.get("value"), "conversations[].value")} for m in row["conversations"]]
    if "instruction" in row and "output" in row:                # Alpaca: instruction, input, output
        return turn("instruction", "output", "input")
    if "instruction" in row and "response" in row:              # Dolly: instruction, context, response
        return turn("instruction", "response", "context")
    if "problem" in row and "answer" in row:                    # SimpleMath
        return turn("problem", "answer")
    if "question" in row and "answer" in row:                   # RAG / QA: context, question, answer
        return turn("question", "answer", "context")
    if "prompt" in row and ("completion" in row or "response" in row):
        return turn("prompt", "completion" if "completion" in row else "response")
    if "inputs" in row and "targets" in row:                    # Aya: inputs, targets
        return turn("inputs", "targets")
    if isinstance(row.get("text"), str) and "<|user|>" in row["text"]:   # Lille's template (Kyoto-Corpus)
        return lille_messages(row["text"])
    raise ValueError(f"unrecognised row schema with fields {sorted(row)}: expected messages, conversations, "
                     f"instruction+output, instruction+response, problem+answer, question+answer, prompt+completion, "
                     f"inputs+targets or a text in Lille's <|user|>..<|assistant|>.. template")


def lille_messages(text):
    """Lille's template -> messages: [<|startoftext|>]<|user|>u<|assistant|>a<|endoftext|><|user|>u2<|assistant|>a2..
    Every turn is kept, so a multi-turn conversation stays one (and the mask covers each answer, not only the last
    as Lille's own loss did). End-of-text only closes an answer here; chat_format adds our own end tokens."""
    body = text.replace("<|startoftext|>", "").replace("<|endoftext|>", "")
    parts = re.split(r"(<\|user\|>|<\|assistant\|>)", body)
    roles = ["user" if tag == "<|user|>" else "assistant" for tag in parts[1::2]]
    if parts[0].strip() or roles != ["user", "assistant"] * (len(roles) // 2):
        raise ValueError("field 'text': expected <|user|> then <|assistant|>, alternating from the start and "
                         "ending with an answer")
    return [{"role": role, "content": content} for role, content in zip(roles, parts[2::2])]


def read_local(path):
    """(where, row) pairs of a .jsonl (one object a line) or .json (a list of objects) file; `where` ("file:line"
    or "file: item i") is what an error about that row names."""
    if path.endswith(".json"):
        # Read the bytes and decode them ourselves: an error then names the line. (A list comprehension over the
        # file would lose which line it was on, which is what #15 found.)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return [(f"{path}: item {i}", row) for i, row in enumerate(rows)]
    from prepare_fineweb import json_lines  # the one JSON-lines reader: every bad line named "file:line"
    return [(f"{path}:{line_no}", row) for line_no, row in json_lines(path)]


def read_hub(name, config, split):
    from datasets import load_dataset
    try:
        return list(load_dataset(name, config, split=split))
    except Exception as e:  # offline, or a renamed dataset
        raise RuntimeError(f"could not load '{name}' from the Hugging Face hub ({type(e).__name__}: {e}); "
                           f"offline, use a local file or one of {sorted(LOCAL)}") from None


def balance_operators(rows, per_operator, rng):
    """ParchmentLM's SimpleMath selection: for + - * /, up to per_operator random problems containing it.
    rows are (where, row) pairs."""
    chosen = []
    for op in "+-*/":
        having = [(w, r) for w, r in rows if op in str(r["problem"])]
        rng.shuffle(having)
        chosen += having[:per_operator]
    return chosen


def keep_language(name, rows, langs=None):
    """The rows of one language, for a source whose rows carry a language field (LANGUAGE_FIELDS, read from the
    first row): English unless `langs` (--lang, split at commas) names others; 'all' keeps every row. Several
    values let one --lang serve several sets (es,spa: RAG_Multilingual's Spanish and Aya's); each set must match
    one; Aya's rows match by their code or their `language` name. A row without the field is an error naming it.
    rows are (where, row) pairs."""
    first = rows[0][1] if rows else None
    field = next((f for f in LANGUAGE_FIELDS if isinstance(first, dict) and f in first), None)
    if field is None or "all" in (langs or []):
        return rows, None
    want = {v.lower() for v in (langs or [LANGUAGE_FIELDS[field]])}
    kept, seen = [], set()
    for where, row in rows:
        if not isinstance(row, dict) or row.get(field) is None:
            raise ValueError(f"{where}: no '{field}' field (the language; {name}'s first row has one)")
        values = {str(row[field]).lower()} | ({str(row["language"]).lower()} if "language" in row else set())
        seen.add(str(row[field]))
        if values & want:
            kept.append((where, row))
    if not kept:
        raise ValueError(f"--source {name}: no row has {field} in {sorted(want)} (its values: "
                         f"{', '.join(sorted(seen)[:20])}); choose with --lang")
    print(f"{name}: {field} in {sorted(want)}: {len(kept)} of {len(rows)} rows (--lang chooses, --lang all keeps all)")
    return kept, sorted(want)


def load_source(spec, seed, categories=None, langs=None):
    """'NAME[:WEIGHT]' -> (label, conversations, weight, stats). NAME: a HUB alias, a LOCAL alias, or a path/glob.
    langs: --lang's values (keep_language)."""
    name, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            name, weight = head, float(tail)
        except ValueError:
            pass
    if weight < 0:
        raise ValueError(f"--source {spec}: the weight must be >= 0")
    rng = random.Random(f"{seed}:{name}")
    options = {}
    if name in HUB:
        hub_name, config, split, options = HUB[name]
        rows = [(f"{hub_name} row {i}", row) for i, row in enumerate(read_hub(hub_name, config, split))]
    else:
        paths = [os.path.join(shared_dir("sft"), LOCAL[name])] if name in LOCAL else sorted(glob.glob(name))
        if not paths or not all(os.path.isfile(p) for p in paths):
            raise FileNotFoundError(f"--source {name}: no such file, and not one of the hub aliases {sorted(HUB)} "
                                    f"or local aliases {sorted(LOCAL)}")
        rows = [pair for p in paths for pair in read_local(p)]  # (where, row): errors name the file and line
    n_rows = len(rows)
    rows, lang = keep_language(name, rows, langs)
    keep = options.get("categories") or categories
    if keep:
        if rows and all(isinstance(r, dict) and "category" in r for _, r in rows):
            rows = [(w, r) for w, r in rows if r["category"] in keep]
        else:
            print(f"note: {name} has no 'category' field: the category filter {list(keep)} is not applied")
    if "per_operator" in options:
        rows = balance_operators(rows, options["per_operator"], rng)
    # every row becomes a conversation here, in the main process, so a bad one is named (file:line) before any
    # rendering starts in the worker pool, and nothing is written
    conversations = []
    for where, row in rows:
        try:
            conversations.append(to_messages(row))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # one line naming the row, not a traceback
            raise ValueError(f"{where}: {e}") from None
    # drop rows with an empty answer or question, as ParchmentLM did
    conversations = [c for c in conversations if all(m["content"].strip() for m in c if m["role"] != "system")]
    stats = {"source": name, "rows": n_rows, "kept": len(conversations), "weight": weight, "lang": lang}
    return name, conversations, weight, stats


def split_and_weight(conversations, weight, val_frac, rng):
    """Shuffle one source, take val_frac of it (unweighted) for validation, repeat/subsample the rest by weight:
    int(weight) full copies plus a random fraction. Splitting before weighting keeps copies out of validation."""
    conversations = conversations[:]
    rng.shuffle(conversations)
    n_val = int(round(val_frac * len(conversations)))
    val, train = conversations[:n_val], conversations[n_val:]
    whole, frac = divmod(weight, 1.0)
    weighted = train * int(whole) + rng.sample(train, int(round(frac * len(train))))
    return val, weighted


# ---- rendering (in worker processes for big sets; imap keeps the input order) --------------------------------
_fmt = None


def _init_worker(fmt_name, tokenizer):
    global _fmt
    _fmt = ChatFormat(fmt_name, get_encoding(tokenizer))


def _render(conversation):
    try:
        ids, mask = _fmt.render(conversation)
    except ValueError:
        return None  # a malformed conversation (two user turns in a row, ...): counted and skipped
    return np.array(ids, dtype=np.uint32), np.array(mask, dtype=np.uint8)


def render_all(conversations, fmt_name, tokenizer, workers, desc):
    from tqdm import tqdm
    if workers <= 1:
        _init_worker(fmt_name, tokenizer)
        return [_render(c) for c in tqdm(conversations, desc=desc, unit="conv")]
    with Pool(workers, initializer=_init_worker, initargs=(fmt_name, tokenizer)) as pool:
        return list(tqdm(pool.imap(_render, conversations, chunksize=64), total=len(conversations), desc=desc,
                         unit="conv"))


def lay_out(rendered, layout, block_size, pad_id):
    """Rendered (ids, mask) pairs -> the list of (ids, mask) to write (padded to block_size in the pad layout),
    and counts of what was dropped."""
    dropped = {"malformed": sum(r is None for r in rendered), "too_long": 0, "nothing_to_train": 0}
    kept = []
    for r in rendered:
        if r is None:
            continue
        ids, mask = r
        if not mask.any():
            dropped["nothing_to_train"] += 1
            continue
        if layout == "pad":
            if len(ids) > block_size:
                dropped["too_long"] += 1
                continue
            n_pad = block_size - len(ids)
            ids = np.concatenate([ids, np.full(n_pad, pad_id, dtype=np.uint32)])
            mask = np.concatenate([mask, np.zeros(n_pad, dtype=np.uint8)])
        kept.append((ids, mask))
    return kept, dropped


def shard_groups(items, shard_size):
    """Split the conversations into consecutive groups of about shard_size tokens: a shard holds whole ones."""
    groups, current, n = [], [], 0
    for item in items:
        if current and n + len(item[0]) > shard_size:
            groups.append(current)
            current, n = [], 0
        current.append(item)
        n += len(item[0])
    return groups + [current] if current else groups


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", required=True,
                   help=f"NAME[:WEIGHT], repeatable. NAME: hub {sorted(HUB)}, local {sorted(LOCAL)}, or a file/glob")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--tokenizer", default="gpt2", help="a tiktoken name (gpt2, cl100k_base) or a tokenizer file")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--layout", default="pack", choices=("pack", "pad"))
    p.add_argument("--block_size", type=int, default=1024, help="the model's context (--layout pad; val check)")
    p.add_argument("--val_frac", type=float, default=0.02, help="fraction of every source kept for validation")
    p.add_argument("--categories", default=None, help="comma list: keep rows with these 'category' values")
    p.add_argument("--lang", default=None, help="comma list: for sets with a language field (rag_multilingual: en "
                   "es ca; aya: eng spa ... or English ...), keep these languages (default English; 'all')")
    p.add_argument("--shard_size", type=float, default=100e6, help="tokens per train shard (whole conversations)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    args = p.parse_args(argv)

    enc = get_encoding(args.tokenizer)
    fmt = ChatFormat(args.format, enc)
    vocab_size = fmt.vocab_size if args.layout == "pack" else max(fmt.vocab_size, fmt.ids["pad"] + 1)
    if os.path.isdir(args.out_dir) and any(f.endswith(".bin") for f in os.listdir(args.out_dir)):
        raise SystemExit(f"error: {args.out_dir} already holds shards; remove them or choose another --out_dir")
    categories = tuple(args.categories.split(",")) if args.categories else None
    langs = [v.strip() for v in args.lang.split(",") if v.strip()] if args.lang else None

    # ---- read, split, weight, shuffle ----
    val, train, sources = [], [], []
    for spec in args.source:
        name, conversations, weight, stats = load_source(spec, args.seed, categories, langs)
        v, t = split_and_weight(conversations, weight, args.val_frac, random.Random(f"{args.seed}:split:{name}"))
        val += v
        train += t
        sources.append({**stats, "val": len(v), "train": len(t)})
        print(f"{name}: {stats['rows']} rows, {stats['kept']} kept, weight {weight:g} -> {len(v)} val, {len(t)} train")
    rng = random.Random(args.seed)
    rng.shuffle(val)
    rng.shuffle(train)

    # ---- render and write: validation first (shard 0), then the training shards ----
    from tokenizer import content_hash  # what the ids mean, by content: train.py and chat.py compare it
    meta = {"kind": "sft", "format": args.format, "tokenizer": args.tokenizer, "n_vocab": enc.n_vocab,
            "tokenizer_sha256": content_hash(args.tokenizer),
            "vocab_size": vocab_size, "eot": enc.eot_token, "specials": {t: i for i, t in fmt.specials.items()},
            "layout": args.layout, "block_size": args.block_size, "seed": args.seed, "sources": sources,
            "shards": [], "dropped": {}}
    os.makedirs(args.out_dir, exist_ok=True)
    index = 0
    for split, conversations in (("val", val), ("train", train)):
        rendered = render_all(conversations, args.format, args.tokenizer, args.workers, desc=split)
        kept, dropped = lay_out(rendered, args.layout, args.block_size, fmt.ids["pad"])
        meta["dropped"][split] = dropped
        n_tokens = sum(len(ids) for ids, _ in kept)
        if n_tokens + (args.layout == "pad") < args.block_size + 1:  # pad adds one token per shard, below
            raise SystemExit(f"error: the {split} split has {n_tokens} tokens, not enough for one window of "
                             f"block_size + 1 = {args.block_size + 1}: add data or raise --val_frac")
        groups = [kept] if split == "val" else shard_groups(kept, args.shard_size)
        for group in groups:
            tokens = np.concatenate([ids for ids, _ in group])
            mask = np.concatenate([m for _, m in group])
            if args.layout == "pad":  # one more token, so the last of N windows (block_size + 1 each) is whole
                tokens = np.append(tokens, np.uint32(enc.eot_token))
                mask = np.append(mask, np.uint8(0))
            path = os.path.join(args.out_dir, f"{split}_{index:06d}.bin")
            # where each conversation starts: train.py's doc_mask keeps packed conversations from seeing each other
            starts = np.cumsum([0] + [len(ids) for ids, _ in group[:-1]])
            write_shard(path, tokens, vocab_size, enc.eot_token, mask=mask, doc_starts=starts)
            meta["shards"].append({"file": os.path.basename(path), "tokens": int(tokens.size),
                                   "trained_tokens": int(mask.sum()), "conversations": len(group)})
            index += 1
        trained = sum(int(m.sum()) for _, m in kept)
        print(f"{split}: {len(kept)} conversations -> {n_tokens:,} tokens, {trained / n_tokens:.1%} trained; "
              f"dropped {dropped}")
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {index} shard(s) to {args.out_dir} (format '{args.format}', {args.tokenizer}, header vocabulary "
          f"{vocab_size}, layout {args.layout})")
    return meta


if __name__ == "__main__":
    from configurator import run_script
    run_script(main, sys.argv[1:], expected=(RuntimeError,))
