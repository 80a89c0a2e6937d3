"""
eval.py — how good is a checkpoint? Zero-shot benchmarks and bits per byte, in one pass.

    python eval.py out/gpt2_124m                                          # the core suite + bits per byte
    python eval.py out/tiny --tasks hellaswag,piqa --limit 200            # a quick look
    python eval.py out/gpt2_124m --suite lrc --online                     # the LRC card's nine columns
    python eval.py --compare out/gpt2_124m out/lille_130m                 # side by side (their eval.json)
    python eval.py --compare out/a out/b --suite lrc --reference          # the card's table, one row a run

THE ONE IDEA. A language model assigns a probability to any text. To ask it a multiple-choice question we do
not make it "answer": we write each candidate after the question and measure how likely the model finds it,

    log p(continuation | context) = sum_i log p(c_i | context, c_1 .. c_{i-1})      (c_i: continuation tokens)

and pick the most likely candidate. The task files and how each item becomes (context, continuation) text
are in eval_tasks.py. Three ways to compare candidates, all reported:

    acc        argmax of the summed log-prob. Favours short answers: every extra token costs probability.
    acc_norm   argmax of log-prob / len(answer in characters): lm-evaluation-harness's acc_norm (it divides by
               the character length of the choice string, delimiter excluded). Characters, not tokens, so
               models with different tokenizers are normalised alike. This is the HellaSwag/ARC/PIQA number
               papers and leaderboards usually quote.
    acc_token  argmax of the MEAN token log-prob (= lowest mean loss): what llm.c's HellaSwag scorer calls
               acc_norm. Same idea, tokenizer-dependent. Compare it with llm.c's HellaSwag plots.

Published references for orientation (OpenAI's GPT-2 124M weights): HellaSwag acc 0.2892 / acc_norm 0.3114 with
lm-evaluation-harness (its rendering prefixes the activity label, see eval_tasks.py), and acc 0.2859 / acc_token
0.2955 with llm.c's completion-style scorer, which is our rendering. Our HellaSwag file is the harness-cleaned
text, so expect agreement with llm.c to a few tenths of a point, not exactly.

For every task the table also shows `chance`, the expected accuracy of guessing uniformly (the mean of
1/num_choices over the items), and ±1 standard error of acc, so "0.27 on 10k items" can be told from noise:
the harness's sample standard deviation over sqrt(n), which for 0/1 scores is sqrt(p(1-p)/(n-1)).

SUITES. `--suite core` (the default) is the set above; `--suite lrc` is the LRC card's zero-shot table:
ARC-E, ARC-C, LogiQA, CSQA, PIQA, WinoG, BoolQ, SciQ, MMLU and their average, each in the metric the paper
reports (eval_tasks.LRC_COLUMNS), printed as one row per checkpoint; `--reference` adds the published
LRC-1.5B-SFT row. MMLU's 57 subjects: acc is the mean over all items (the harness's `mmlu` number), acc_macro
the mean over subjects, and eval.json holds each subject's own numbers. A suite runs the tasks it finds on disk
and marks the others "needs --online" (offline, the LRC table has 7 filled columns: ../shared has no SciQ and no
MMLU) and gives no average then; a task named with --tasks whose file is missing is an error.

NOTHING IS LOST. Every task file (every row of it) and the bits-per-byte text are read and checked before
the model is loaded; a bad row is one line naming its file and line. eval.json is written to a temporary
file and renamed, so a run that fails leaves the previous results whole.

BATCHING. Candidates are independent sequences. We sort them by length (longest first), cut batches that fit
a budget of rows x tokens, pad every row on the RIGHT to the longest in its batch, and run one forward.
Right padding needs no attention mask: attention is causal, so a real token never looks at the pads after it.
From the (B, T, V) logits we gather only the positions that predict continuation tokens, take log_softmax in
fp32 (bf16 logits would cost precision over 50k entries), and sum per row. bf16 autocast on a GPU, fp32 on
the CPU. Log-probs are over the tokenizer's vocabulary only: the model's padding rows (vocabulary padded to a
multiple of 64) are sliced off, which renormalises over the tokens that can occur.

TOO LONG FOR THE CONTEXT WINDOW. The model sees at most block_size positions; a sequence context + continuation
may hold block_size + 1 tokens (the last token is only a target). Longer ones are LEFT-truncated: we drop the
beginning of the context and keep the whole continuation, as lm-evaluation-harness does. The JSON records how
many items were truncated per task. A continuation longer than block_size itself (a 246-token PIQA solution
against a 128-token tiny model; the harness refuses those) is scored in pieces of block_size / 2 tokens, each
after the block_size / 2 + 1 tokens before it: the sliding windows of bits per byte, below.

BITS PER BYTE. Cross-entropy per token depends on the tokenizer; per byte of UTF-8 text it does not:

    bpb = (sum over tokens of -ln p(token | previous)) / ln 2 / (UTF-8 bytes of the text)

Each document is [<|endoftext|>] + its tokens (as in our training shards); the end-of-text token is context,
never a target, so the scored tokens spell exactly the document's bytes. Documents longer than block_size are
read with SLIDING WINDOWS: a window of block_size tokens scores only the tokens the previous window did not,
then moves `stride` tokens on. Every token is scored exactly once, and after the first window each token has
at least block_size - stride tokens of context. stride = block_size (no overlap) is cheapest but the first
tokens of each window see almost nothing; the default stride = block_size / 2 costs 2x and guarantees half a
window of history, a middle road (stride 1 would be the exact "full context" answer at block_size x the cost).
"""
import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
from device import autocast as device_autocast, pick_device, pick_dtype, shared_dir

from eval_tasks import (DEFAULT_DATA_ROOT, LRC_COLUMNS, LRC_REFERENCE, SUITES, TASKS, load_items, read_rows,
                        resolve_tasks, task_path)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BPB_FILE = shared_dir("openstax_edu_text", "sample_50.jsonl")
GEN_TOKENS = 10           # greedy tokens generated for an arithmetic answer (6-digit numbers are <= 3 gpt2 tokens)
LOGSOFTMAX_CHUNK = 8192   # continuation positions per log_softmax: bounds the fp32 (N, V) temporary


def progress_bar(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="seq", disable=None if enabled else True, leave=False)


# ---- scoring: log p(continuation | context) for a list of token-id pairs ------------------------------------
@torch.no_grad()
def score_requests(model, requests, block_size, n_vocab, device, batch_size=64, batch_tokens=4096, desc=None,
                   progress=False):
    """requests: [(context_ids, continuation_ids)]. Returns a dict of numpy arrays over the requests:
    logprob (summed over the continuation, nats, float64), n_tokens, greedy (every continuation token is the
    argmax of its distribution), and `truncated`, the number of contexts cut on the left."""
    seqs, owner, truncated = [], [], 0     # owner[k]: the request that piece k of the scoring belongs to
    for r, (ctx, cont) in enumerate(requests):
        if len(cont) == 0:
            raise ValueError("empty continuation: nothing to score")
        if len(ctx) == 0:
            raise ValueError("empty context: start it with the end-of-text token")
        pieces = fit_window(list(ctx), list(cont), block_size)
        truncated += pieces[0][1] < len(ctx)        # the first piece holds what is left of the context
        seqs += pieces
        owner += [r] * len(pieces)

    n = len(seqs)
    logprob, greedy = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=bool)
    order = sorted(range(n), key=lambda i: -len(seqs[i][0]))   # longest first: little padding, OOM shows early
    autocast = device_autocast(device, pick_dtype("auto", device))  # bf16 on a GPU that has it
    bar = progress_bar(n, desc, progress)
    i = 0
    while i < n:
        T = len(seqs[order[i]][0]) - 1                          # this batch's input length (its longest row)
        rows = order[i:i + max(1, min(batch_size, batch_tokens // T))]
        x = torch.zeros(len(rows), T, dtype=torch.long)         # pad id 0: invisible, see BATCHING above
        row_of, pos_of, target = [], [], []
        for r, j in enumerate(rows):
            toks, n_ctx = seqs[j]
            x[r, :len(toks) - 1] = torch.tensor(toks[:-1])
            # the logit at position p predicts token p + 1: continuation tokens n_ctx.. are predicted at n_ctx-1..
            row_of += [r] * (len(toks) - n_ctx)
            pos_of += range(n_ctx - 1, len(toks) - 1)
            target += toks[n_ctx:]
        with autocast:
            logits = model(x.to(device))[0]
        row_of, pos_of = torch.tensor(row_of, device=device), torch.tensor(pos_of, device=device)
        target = torch.tensor(target, device=device)
        lp_sum = torch.zeros(len(rows), dtype=torch.float64, device=device)
        misses = torch.zeros(len(rows), dtype=torch.long, device=device)
        for s in range(0, len(target), LOGSOFTMAX_CHUNK):
            e = s + LOGSOFTMAX_CHUNK
            lg = logits[row_of[s:e], pos_of[s:e], :n_vocab].float()           # (N, V) only where we score
            lp = F.log_softmax(lg, dim=-1).gather(1, target[s:e, None]).squeeze(1)
            lp_sum.index_add_(0, row_of[s:e], lp.double())
            misses.index_add_(0, row_of[s:e], (lg.argmax(-1) != target[s:e]).long())
        del logits                                              # before the next forward allocates its own
        logprob[rows] = lp_sum.cpu().numpy()
        greedy[rows] = (misses == 0).cpu().numpy()
        bar.update(len(rows))
        i += len(rows)
    bar.close()
    owner, n_req = np.array(owner, dtype=np.int64), len(requests)       # a request's pieces: summed, all greedy
    return {"logprob": np.bincount(owner, weights=logprob, minlength=n_req),
            "greedy": np.bincount(owner, weights=~greedy, minlength=n_req) == 0,
            "n_tokens": np.array([len(cont) for _, cont in requests]), "truncated": int(truncated)}


def fit_window(ctx, cont, block_size):
    """[(tokens, n_ctx)]: sequences of at most block_size + 1 tokens (the last is only a target) that together
    score every continuation token once. Usually one: the context cut on the left. A continuation longer than
    block_size goes in pieces of block_size // 2 tokens, each after as many of the tokens before it as fit."""
    full, start, pieces = ctx + cont, len(ctx), []
    step = len(cont) if len(cont) <= block_size else max(1, block_size // 2)
    while start < len(full):
        end = min(start + step, len(full))
        lo = max(0, end - (block_size + 1))
        pieces.append((full[lo:end], start - lo))
        start = end
    return pieces


@torch.no_grad()
def greedy_generate(model, prompts, max_new_tokens, block_size, n_vocab, device, batch_size=64, desc=None,
                    progress=False):
    """Greedy continuations (max_new_tokens each, token ids) of prompts (lists of ids), batched.

    Rows are right-padded as in scoring; row r's next token is read at its own last position, written after
    it, and the whole batch runs again (no KV cache: answers are a few tokens, and any model with the GPT
    forward signature works). Prompts are left-truncated to leave room for the answer."""
    keep = block_size - max_new_tokens
    prompts = [list(p[-keep:]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    autocast = device_autocast(device, pick_dtype("auto", device))  # bf16 on a GPU that has it
    bar = progress_bar(len(prompts), desc, progress)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        lens = torch.tensor([len(prompts[j]) for j in rows], device=device)
        buf = torch.zeros(len(rows), int(lens.max()) + max_new_tokens, dtype=torch.long, device=device)
        for r, j in enumerate(rows):
            buf[r, :len(prompts[j])] = torch.tensor(prompts[j])
        arange = torch.arange(len(rows), device=device)
        for _ in range(max_new_tokens):
            with autocast:
                logits = model(buf[:, :int(lens.max())])[0]
            nxt = logits[arange, lens - 1, :n_vocab].argmax(-1)
            buf[arange, lens] = nxt
            lens += 1
        for r, j in enumerate(rows):
            out[j] = buf[r, len(prompts[j]):len(prompts[j]) + max_new_tokens].tolist()
        bar.update(len(rows))
    bar.close()
    return out


# ---- tasks ---------------------------------------------------------------------------------------------------
def encoder(enc):
    """Text -> ids, cached (HellaSwag repeats each context 4 times). encode_ordinary: benchmark text is text,
    even where it happens to contain '<|endoftext|>'. An empty context becomes the end-of-text token."""
    cache = {}

    def encode(text):
        # each choice repeats its item's context: a long BoolQ or LogiQA passage is encoded once, not per choice
        if text not in cache:
            cache[text] = enc.encode_ordinary(text) or [enc.eot_token]
        return cache[text]
    return encode


def answer_is_right(generated_text, answer):
    """The answer must be the first thing on the generated line (leading spaces aside), and not the start of a
    longer number: '-734' matches '-734', ' -734.' and '-734 is it', not '-7345'."""
    line = generated_text.split("\n")[0].strip()
    ans = answer.strip()
    return line.startswith(ans) and (len(line) == len(ans) or not line[len(ans)].isdigit())


def run_task(model, enc, name, items, block_size, device, batch_size=64, batch_tokens=4096, progress=False):
    """Score one task's items; returns its metrics (a JSON-ready dict)."""
    kind, encode, n_vocab = TASKS[name].kind, encoder(enc), enc.n_vocab
    kw = dict(block_size=block_size, n_vocab=n_vocab, device=device, batch_size=batch_size, desc=name,
              progress=progress)
    res = {"kind": kind, "n": len(items)}
    if kind in ("choice", "schema"):
        reqs = [(encode(c), encode(x)) for it in items for c, x in it["pairs"]]
        scored = score_requests(model, reqs, batch_tokens=batch_tokens, **kw)
        hits = {"acc": [], "acc_norm": [], "acc_token": []}
        k = 0
        for it in items:
            m = len(it["pairs"])
            lp, ntok = scored["logprob"][k:k + m], scored["n_tokens"][k:k + m]
            chars = np.array([max(1, len(t)) for t in it["norm_texts"]], dtype=np.float64)
            hits["acc"].append(int(np.argmax(lp)) == it["gold"])
            hits["acc_norm"].append(int(np.argmax(lp / chars)) == it["gold"])
            hits["acc_token"].append(int(np.argmax(lp / ntok)) == it["gold"])
            k += m
        res.update({key: float(np.mean(v)) for key, v in hits.items()})
        if kind == "schema":   # one shared continuation: both normalisations equal acc by construction
            res.pop("acc_norm"), res.pop("acc_token")
        if any("group" in it for it in items):   # MMLU: each subject's numbers and their plain mean
            res["subjects"] = per_group([it.get("group") for it in items], hits)
            res["acc_macro"] = float(np.mean([g["acc"] for g in res["subjects"].values()]))
        res["chance"] = float(np.mean([1.0 / len(it["pairs"]) for it in items]))
        res["truncated"] = scored["truncated"]
    elif kind == "lm":
        reqs = [(encode(it["context"]), encode(it["continuation"])) for it in items]
        scored = score_requests(model, reqs, batch_tokens=batch_tokens, **kw)
        res["acc"] = float(np.mean(scored["greedy"]))
        # lm-evaluation-harness: perplexity = exp(-mean over ITEMS of the continuation's total log-likelihood)
        res["ppl"] = float(math.exp(-np.mean(scored["logprob"])))
        res["chance"], res["truncated"] = 0.0, scored["truncated"]
    elif kind == "generate":
        outs = greedy_generate(model, [encode(it["context"]) for it in items], GEN_TOKENS, **kw)
        texts = [enc.decode(o[:o.index(enc.eot_token)] if enc.eot_token in o else o) for o in outs]
        res["acc"] = float(np.mean([answer_is_right(t, it["answer"]) for t, it in zip(texts, items)]))
        res["chance"] = 0.0
        res["examples"] = [{"context": it["context"], "answer": it["answer"], "generated": t}
                           for it, t in list(zip(items, texts))[:3]]
    else:
        raise ValueError(f"{name}: unknown task kind '{kind}'")
    res["stderr"] = stderr(res["acc"], len(items))
    return res


def stderr(p, n):
    """lm-evaluation-harness's standard error of a mean of 0/1 scores: sample std (n - 1) / sqrt(n)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def per_group(groups, hits):
    """{group: {"n", "acc", ...}} for items labelled with a group (MMLU's subjects), sorted by name.

    Two averages follow from it. Over items (acc), every question counts once: the harness's `mmlu` number,
    dominated by the big subjects (professional_law alone is 1,534 of 14,042 items). Over subjects
    (acc_macro), every subject counts once, the way MMLU's per-subject tables are usually read."""
    out = {}
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        out[g] = {"n": len(idx), **{key: float(np.mean([v[i] for i in idx])) for key, v in hits.items()}}
    return out


# ---- bits per byte ----------------------------------------------------------------------------------------------
def read_documents(path):
    """.jsonl / .jsonl.gz: the "text" field of every line; anything else: the whole file is one document.
    Checked before any model work: a missing file, a non-UTF-8 byte or a row without text is one line naming
    the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bits-per-byte file {path} not found (--bpb_file; 'none' skips it)")
    if path.endswith((".jsonl", ".jsonl.gz")):
        docs = []
        for n, row in read_rows(path):
            if not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{n}: no \"text\" string field (the bits-per-byte text)")
            docs.append(row["text"])
    else:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            docs = [raw.decode("utf-8")]
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{path} holds no text")
    return docs


def window_requests(tokens, block_size, stride):
    """Sliding windows over one document's tokens (tokens[0] = end-of-text). Each (context, continuation):
    the continuation holds the tokens this window scores, the context the ones before it in the window."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride {stride} must lie in 1..block_size ({block_size})")
    last = min(block_size, len(tokens) - 1)          # index of the last scored token so far
    reqs = [(tokens[:1], tokens[1:last + 1])]
    while last < len(tokens) - 1:
        end = min(last + stride, len(tokens) - 1)
        reqs.append((tokens[end - block_size:last + 1], tokens[last + 1:end + 1]))
        last = end
    return reqs


def bits_per_byte(model, enc, docs, block_size, device, stride=None, batch_size=64, batch_tokens=4096,
                  progress=False):
    """docs: read_documents' list of texts."""
    stride = stride or max(1, block_size // 2)
    reqs = [r for d in docs for r in window_requests([enc.eot_token] + enc.encode_ordinary(d), block_size, stride)]
    scored = score_requests(model, reqs, block_size, enc.n_vocab, device, batch_size, batch_tokens, "bpb", progress)
    nats, n_tokens = -float(scored["logprob"].sum()), int(scored["n_tokens"].sum())
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"documents": len(docs), "tokens": n_tokens, "bytes": n_bytes,
            "stride": stride, "nats_per_token": nats / n_tokens, "bytes_per_token": n_bytes / n_tokens,
            "bpb": nats / math.log(2) / n_bytes}


# ---- a whole suite -------------------------------------------------------------------------------------------
def online_only(names, data_root, online):
    """The tasks of a suite that only --online can run here: no local file, but a hub dataset. A suite runs the
    rest and marks these "needs --online" (offline, the LRC suite has 7 of its 9 columns: ../shared holds no SciQ
    and no MMLU). Named tasks (--tasks) are never skipped, and a suite with nothing on disk is still the error
    that names the missing file, not an empty table."""
    missing = {n: task_path(n, data_root) for n in names
               if not online and TASKS[n].hub and not os.path.exists(task_path(n, data_root))}
    return missing if len(missing) < len(names) else {}


def prepare(names, data_root=DEFAULT_DATA_ROOT, limit=None, online=False, bpb_file=None):
    """Every task's items and the bits-per-byte text, read and checked before any model is loaded, so a bad
    row in the last file cannot cost the results of the tasks before it."""
    tasks = {name: load_items(name, data_root, limit, online) for name in names}
    bpb = {"file": os.path.abspath(bpb_file), "docs": read_documents(bpb_file)} if bpb_file else None
    return tasks, bpb


def evaluate(model, enc, tasks, block_size, device, bpb=None, bpb_stride=None, batch_size=64, batch_tokens=4096,
             progress=False, log=print):
    """tasks, bpb: what prepare() returned. -> {"tasks": {name: metrics}, "bpb": metrics or None}."""
    results = {"tasks": {}, "bpb": None}
    for name, data in tasks.items():
        t0 = time.time()
        r = run_task(model, enc, name, data["items"], block_size, device, batch_size, batch_tokens, progress)
        r.update(data=data["source"], seconds=time.time() - t0)
        if data["note"]:
            r["note"] = data["note"]
        results["tasks"][name] = r
        log(f"  {name:<30} {r['n']:6d} items  acc {r['acc']:.4f}  ({r['seconds']:.1f} s)")
    if bpb:
        t0 = time.time()
        results["bpb"] = {"file": bpb["file"], **bits_per_byte(model, enc, bpb["docs"], block_size, device,
                                                                bpb_stride, batch_size, batch_tokens, progress)}
        results["bpb"]["seconds"] = time.time() - t0
    return results


# ---- tables ----------------------------------------------------------------------------------------------------
def fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def footnotes(results):
    """Where a task's prompt deliberately differs from lm-evaluation-harness, and where its data does."""
    lines = [f"  {name}: {TASKS[name].differs}" for name in results["tasks"] if TASKS[name].differs]
    lines += [f"  * {name}: {r['note']}" for name, r in results["tasks"].items() if r.get("note")]
    return lines


def format_table(results):
    lines = ["renderings: lm-evaluation-harness v0.4.8's task definitions (eval_tasks.py), except as noted below",
             f"{'task':<30}{'n':>7}{'acc':>9}{'acc_norm':>10}{'acc_token':>11}{'chance':>8}{'± s.e.':>8}"
             f"  {'other':<13}{'sec':>7}"]
    for name, r in results["tasks"].items():
        other = f"ppl {r['ppl']:.2f}" if "ppl" in r else f"macro {r['acc_macro']:.4f}" if "acc_macro" in r else ""
        label = name + ("*" if r.get("note") else "")
        lines.append(f"{label:<30}{r['n']:>7}{fmt(r['acc']):>9}{fmt(r.get('acc_norm')):>10}"
                     f"{fmt(r.get('acc_token')):>11}{fmt(r['chance']):>8}{fmt(r['stderr']):>8}  {other:<13}"
                     f"{r.get('seconds', 0):>7.1f}")
    lines += [f"{name:<30}{'needs --online':>21}  (no local file {path})"
              for name, path in results.get("needs_online", {}).items()]
    b = results.get("bpb")
    if b:
        lines.append(f"bits per byte {b['bpb']:.4f}  ({os.path.basename(b['file'])}: {b['documents']} documents, "
                     f"{b['tokens']:,} tokens, {b['bytes']:,} bytes, {b['nats_per_token']:.4f} nats/token, "
                     f"stride {b['stride']}, {b.get('seconds', 0):.1f} s)")
    return "\n".join(lines + footnotes(results))


def compare_table(named_results):
    """Rows: each task's headline metrics and bits per byte; one column per run."""
    names = [n for n, _ in named_results]
    rows, seen = [], set()
    for _, res in named_results:
        for task, r in res["tasks"].items():
            for metric in ("acc", "acc_norm", "acc_token", "acc_macro", "ppl"):
                if metric in r and (task, metric) not in seen:
                    seen.add((task, metric))
                    rows.append((task, metric))
    width = max([12] + [len(n) + 2 for n in names])
    lines = [f"{'task':<30}{'metric':<11}" + "".join(f"{n:>{width}}" for n in names)]
    for task, metric in rows:
        vals = [res["tasks"].get(task, {}).get(metric) for _, res in named_results]
        lines.append(f"{task:<30}{metric:<11}" + "".join(f"{fmt(v, '.2f' if metric == 'ppl' else '.4f'):>{width}}"
                                                          for v in vals))
    bpbs = [res["bpb"]["bpb"] if res.get("bpb") else None for _, res in named_results]
    if any(v is not None for v in bpbs):
        lines.append(f"{'bits per byte':<41}" + "".join(f"{fmt(v):>{width}}" for v in bpbs))
    steps = [res.get("step") for _, res in named_results]
    lines.append(f"{'step':<41}" + "".join(f"{fmt(v, 'd'):>{width}}" for v in steps))
    return "\n".join(lines)


def lrc_row(res):
    """One run's row of the LRC card's table: {column: metric x 100 or None, "Avg": ...}, and its notes."""
    row, notes = {}, []
    for col, task, metric in LRC_COLUMNS:
        r = res["tasks"].get(task, {})
        row[col] = 100 * r[metric] if metric in r else None
        if r.get("note"):
            notes.append((col, r["note"]))
    vals = list(row.values())
    row["Avg"] = sum(vals) / len(vals) if None not in vals else None   # only over all nine, as the card
    return row, notes


def lrc_table(named_results, reference=False):
    """The LRC card's zero-shot table, one row per run (x100, the paper's metric per column), optionally under
    the published LRC-1.5B-SFT row. A `*` marks a cell whose data is not the harness's (see the notes).

    The paper's average is the plain mean of the nine columns, so a run missing any column gets no average:
    a mean over fewer tasks would look comparable and is not. The same goes for --limit runs, which the notes
    name: a first-N subset of each task estimates the full number with a standard error of about 0.5/sqrt(N)."""
    cols = [c for c, _, _ in LRC_COLUMNS] + ["Avg"]
    width = max([26] + [len(n) + 2 for n, _ in named_results])
    lines = ["LRC card's zero-shot table (x100; every column rendered as lm-evaluation-harness v0.4.8): acc_norm "
             "for ARC-C and LogiQA, acc elsewhere (the paper's Table 14); MMLU: the mean over items, as the harness",
             f"{'run':<{width}}" + "".join(f"{c:>8}" for c in cols)]
    if reference:
        name, ref = LRC_REFERENCE
        lines.append(f"{name:<{width}}" + "".join(f"{ref[c]:>8.2f}" for c in cols))
    notes = []
    for name, res in named_results:
        row, run_notes = lrc_row(res)
        online = [col for col, task, _ in LRC_COLUMNS if task in res.get("needs_online", {})]
        flagged = {col for col, _ in run_notes}
        cells = ["online" if c in online else fmt(row[c], ".2f") + ("*" if c in flagged else "") for c in cols]
        lines.append(f"{name:<{width}}" + "".join(f"{cell:>8}" for cell in cells))
        notes += [f"  * {name} {col}: {note}" for col, note in run_notes]
        if online:
            notes.append(f"  {name} {', '.join(online)}: needs --online (no local file; --online fetches the hub's "
                         f"copy with `datasets`), so no average")
        if res.get("limit"):
            notes.append(f"  {name}: the first {res['limit']} items of each task only, not the full sets")
    return "\n".join(lines + notes)


# ---- command line --------------------------------------------------------------------------------------------
def run_folder(ckpt):
    return ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))


def run_name(ckpt):
    return os.path.basename(os.path.normpath(run_folder(ckpt)))


def check_checkpoint(ckpt):
    """Fail before any work if `ckpt` is neither a nanoforge checkpoint nor a Hugging Face folder (checkpoint.py
    is the one resolver: run folder -> ckpt.pt, a .pt file, hf:<folder> or an exported folder)."""
    if not checkpoint.is_hf_folder(ckpt):
        checkpoint.find(ckpt)


def read_results(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); delete it to evaluate again") from None


def evaluate_checkpoint(ckpt, args, tasks, bpb, needs_online=None):
    """Load a run's checkpoint, evaluate it on prepare()'s tasks, write <run>/eval.json (or --out)."""
    from tokenizer import get_encoding  # the one loader: tiktoken names (offline too), our BPE files, tokenizer.json
    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    hf_folder = checkpoint.is_hf_folder(ckpt)
    file = ckpt if hf_folder else checkpoint.find(ckpt)
    model, cfg = checkpoint.load_model(ckpt, device)
    enc = get_encoding(cfg.get("tokenizer", "gpt2"))
    step = None  # the step is metadata; a memory-mapped second look (tensors only, no code) costs nothing
    if not hf_folder:
        step = int(checkpoint.load(ckpt, mmap=True).get("step", -1))
    out = (args.out if not args.compare else "") or os.path.join(run_folder(ckpt), "eval.json")
    checkpoint.check_writable(out)  # before the work: results that cannot be written would be lost
    batch_tokens = args.batch_tokens or (32768 if device.type == "cuda" else 4096)
    print(f"evaluating {file} (step {step}, {model.num_params():,} parameters, context {model.config.block_size}) "
          f"on {device}{' with bf16 autocast' if device.type == 'cuda' else ''}")
    results = evaluate(model, enc, tasks, model.config.block_size, device, bpb, args.bpb_stride or None,
                       args.batch_size, batch_tokens, progress=True)
    results.update({"needs_online": needs_online or {}, "ckpt": os.path.abspath(file), "step": step, "tokenizer": enc.name, "limit": args.limit,
                    "suite": args.suite, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "seconds": time.time() - t0})
    checkpoint.save_json(out, results, indent=1)  # a crash mid-write leaves the previous eval.json whole
    print(format_table(results))
    print(f"total {results['seconds']:.1f} s; wrote {out}")
    return results


def parse_args(argv):
    p = argparse.ArgumentParser(description="zero-shot benchmarks and bits per byte for a nanoforge checkpoint")
    p.add_argument("checkpoint", nargs="?", help="run folder (its ckpt.pt) or a .pt file, as chat.py and export.py "
                                                 "take it")
    p.add_argument("--ckpt", help=argparse.SUPPRESS)  # the same, as a flag: accepted for older command lines
    p.add_argument("--tasks", default=None, help=f"comma-separated, or 'all': {', '.join(TASKS)}")
    p.add_argument("--suite", default=None, help="; ".join(f"{k}: {', '.join(v)}" for k, v in SUITES.items())
                   + " (default core; lrc prints the LRC card's table)")
    p.add_argument("--reference", action="store_true", help="--suite lrc: add the published LRC-1.5B-SFT row")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (quick runs)")
    p.add_argument("--batch_size", type=int, default=64, help="most sequences per forward")
    p.add_argument("--batch_tokens", type=int, default=0,
                   help="most padded tokens per forward (0: 32768 on a GPU, 4096 on the CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data_root", default=DEFAULT_DATA_ROOT, help="folder holding the task files")
    p.add_argument("--online", action="store_true", help="fetch missing task files from the hub with `datasets`")
    p.add_argument("--bpb_file", default=DEFAULT_BPB_FILE, help="held-out text (.jsonl 'text' field, or .txt); "
                                                                "'none' skips bits per byte")
    p.add_argument("--bpb_stride", type=int, default=0, help="sliding-window stride (0: block_size // 2)")
    p.add_argument("--out", default="", help="results file (default <run folder>/eval.json)")
    p.add_argument("--compare", nargs="+", metavar="RUN",
                   help="print these runs side by side, from their eval.json (evaluated first where missing)")
    args = p.parse_args(argv)
    if args.checkpoint and args.ckpt and args.checkpoint != args.ckpt:
        p.error(f"two checkpoints given: {args.checkpoint} and --ckpt {args.ckpt}")
    args.ckpt = args.checkpoint or args.ckpt
    if not args.ckpt and not args.compare:
        p.error("give a checkpoint (eval.py RUN) or --compare RUN [RUN ...]")
    for key in ("limit", "batch_size"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        # every check before any work: names, checkpoints, then every row of every file
        # (a typo in a name must not cost a model load, and a missing checkpoint must not cost reading
        # 14k MMLU rows; --compare re-evaluates only the runs that have no eval.json yet)
        names = resolve_tasks(args.tasks, args.suite)
        needs_online = online_only(names, args.data_root, args.online) if args.tasks is None else {}
        names = [n for n in names if n not in needs_online]
        if args.reference and args.suite != "lrc":
            raise ValueError("--reference adds the published LRC-1.5B-SFT row to --suite lrc's table")
        runs = args.compare or [args.ckpt]
        stored = {r: os.path.join(run_folder(r), "eval.json") for r in runs}
        todo = [r for r in runs if not (args.compare and os.path.exists(stored[r]))]
        for run in todo:
            check_checkpoint(run)
        bpb_file = None if args.bpb_file.lower() in ("", "none") else args.bpb_file
        tasks, bpb = prepare(names, args.data_root, args.limit, args.online, bpb_file) if todo else (None, None)
        named = [(run_name(r), evaluate_checkpoint(r, args, tasks, bpb, needs_online) if r in todo
                  else read_results(stored[r]))
                 for r in runs]
        if args.suite == "lrc" or args.compare:
            print(lrc_table(named, args.reference) if args.suite == "lrc" else compare_table(named))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
