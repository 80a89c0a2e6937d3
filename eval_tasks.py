"""
eval_tasks.py — the benchmarks eval.py knows: where each one's file lives and how an item becomes text.

Every benchmark here is asked the same way: as TEXT the model continues. An item turns into one or more
(context, continuation) string pairs, and eval.py scores the continuation's log-likelihood given the context.
So a task is only a rendering rule. Four kinds:

    choice    one context, n candidate continuations (HellaSwag, ARC, PIQA, BoolQ, COPA, CommonsenseQA):
              the prediction is the candidate the model finds most likely.
    schema    n contexts, ONE shared continuation (WinoGrande): "partial evaluation". The blank is filled with
              each option and we score only what comes after it, which reads the same for every option, so
              the likelihoods compare like with like.
    lm        one context, one continuation (LAMBADA): is the continuation the model's greedy choice, token by
              token? And how likely is it (perplexity)?
    generate  one context, an answer string (simple arithmetic): generate greedily, compare with the answer.

THE DELIMITER. Where the context ends and the continuation starts matters for a BPE tokenizer: GPT-2 spells a
word after a space as one token " word", so the space belongs to the continuation (" Paris", not "Paris"
after "... capital is "). Every rendering below therefore ends the context WITHOUT trailing whitespace and
starts the continuation with the separating space. The per-task rules, checked against the two reference
suites (lm-evaluation-harness task configs; llm-foundry's tasks yaml + composer's ICL datasets, which strip
every field, append the task's continuation_delimiter to the query with its trailing space removed, and
prefix a space to each answer for GPT-2-style tokenizers):

    hellaswag       ctx + " " + ending                                   (llm.c's rendering; see below)
    arc_easy        "Question: {q}\\nAnswer:" + " " + choice             (delimiter "\\nAnswer: "; = harness)
    piqa            "Question: {goal}\\nAnswer:" + " " + solution        (delimiter "\\nAnswer: "; = harness)
    boolq           "Passage: {p}\\nQuestion: {q}?\\nAnswer:" + " yes"/" no"   (delimiter "\\nAnswer: ")
    copa            "{premise without .}, because|therefore" + " " + choice (lower-cased first letter)
    commonsense_qa  "Question: ...\\nChoices:\\nA. ..\\nB. ..\\nAnswer:" + " A"  (lettered: the model names
                    a letter, so every choice is one character and acc_norm = acc)
    winogrande      sentence up to the blank, filled with option i  |  " " + the rest of the sentence
    lambada_openai  passage without its last word + " " + last word
    arithmetic      "25-759=" + "-734" (nospaces), "25 - 759 =" + " -734" (withspaces): the file's strings as
                    they are. (composer re-adds a space before every answer for GPT-2-style tokenizers, so
                    llm-foundry scored "25-759= -734"; we keep the file's own spacing, which is the point of
                    the "nospaces" variant.)

HellaSwag: the local file holds `ctx` = ctx_a + " " + ctx_b, already cleaned of WikiHow's "[title]"/"[step]"
markup (the same cleaning lm-evaluation-harness applies). llm.c renders ctx + " " + ending, and so do we.
The harness additionally prefixes the activity label ("Roof shingle removal: A man is ...") and capitalises
ctx_b; that moves GPT-2 124M by about a point, so compare our HellaSwag with llm.c's numbers first.

ADDING A TASK in a format that is already here is one line in TASKS at the bottom: e.g. ARC-Challenge in
llm-foundry form would be
    "arc_challenge": Task("choice", "llm_foundry/arc_challenge.jsonl", query("\\nAnswer:"), ...).

ONLINE. This machine is offline, so the files come from ../shared/data/evals/ (see shared/data/MANIFEST.md
section 4). Each task also knows its Hugging Face hub dataset and how to turn a hub row into the local row
format; `load_items(..., online=True)` uses them (via `datasets`) when the local file is missing.
"""
import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

DEFAULT_DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "evals")


# ---- rendering: one raw row (the local file's format) -> an item -------------------------------------------
# An item is a dict. choice/schema: {"pairs": [(context, continuation), ...], "gold": int, "norm_texts": [...]}
# where norm_texts are the strings whose character length acc_norm divides by (the answer without the
# delimiter, as lm-evaluation-harness does). lm: {"context", "continuation"}. generate: {"context", "answer"}.

def hellaswag(row):
    ctx = row["ctx"].strip()
    endings = [e.strip() for e in row["endings"]]
    return {"pairs": [(ctx, " " + e) for e in endings], "gold": int(row["label"]), "norm_texts": endings}


def query(suffix=""):
    """llm-foundry multiple choice {query, choices, gold}: context = query + suffix (the task's delimiter
    without its trailing space), continuation = " " + choice."""
    def render(row):
        ctx = row["query"].strip() + suffix
        choices = [c.strip() for c in row["choices"]]
        return {"pairs": [(ctx, " " + c) for c in choices], "gold": int(row["gold"]), "norm_texts": choices}
    return render


def schema(row):
    """llm-foundry schema {context_options, continuation, gold}: the continuation is scored after each option."""
    rest = row["continuation"].strip()
    return {"pairs": [(opt.strip(), " " + rest) for opt in row["context_options"]], "gold": int(row["gold"]),
            "norm_texts": [rest] * len(row["context_options"])}


def continuation(delimiter):
    """llm-foundry language modelling {context, continuation}: context.rstrip() + delimiter + continuation."""
    def render(row):
        return {"context": row["context"].rstrip(), "continuation": delimiter + row["continuation"].strip()}
    return render


def answer(row):
    """Generation: the continuation (its leading space kept) is the answer to produce."""
    return {"context": row["context"].rstrip(), "answer": row["continuation"]}


# ---- hub rows -> local rows (online use; this machine never runs them) --------------------------------------
def clean_wikihow(text):
    """HellaSwag's WikiHow contexts carry markup: ' [title]' ends a heading, '[header]', '[step]' are tags."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_from_hub(r):
    return {"ctx": clean_wikihow(r["ctx"]), "endings": [clean_wikihow(e) for e in r["endings"]],
            "label": int(r["label"])}


def arc_from_hub(r):
    labels = list(r["choices"]["label"])
    return {"query": "Question: " + r["question"], "choices": list(r["choices"]["text"]),
            "gold": labels.index(r["answerKey"])}


def piqa_from_hub(r):
    return {"query": "Question: " + r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}


def boolq_from_hub(r):
    return {"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
            "gold": int(r["answer"])}


def copa_from_hub(r):
    connector = "because" if r["question"] == "cause" else "therefore"
    lower_first = [c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
    return {"query": f"{r['premise'].strip().rstrip('.')}, {connector}", "choices": lower_first,
            "gold": int(r["label"])}


def csqa_from_hub(r):
    labels, texts = list(r["choices"]["label"]), list(r["choices"]["text"])
    listing = "".join(f"{l}. {t}\n" for l, t in zip(labels, texts))
    return {"query": f"Question: {r['question']}\nChoices:\n{listing}Answer:", "choices": labels,
            "gold": labels.index(r["answerKey"])}


def winogrande_from_hub(r):
    blank = r["sentence"].index("_")
    before, after = r["sentence"][:blank], r["sentence"][blank + 1:].strip()
    return {"context_options": [before + r["option1"], before + r["option2"]], "continuation": after,
            "gold": int(r["answer"]) - 1}


def lambada_from_hub(r):
    context, last_word = r["text"].rsplit(" ", 1)
    return {"context": context, "continuation": last_word}


# ---- the table -----------------------------------------------------------------------------------------------
@dataclass
class Task:
    kind: str                                # 'choice' | 'schema' | 'lm' | 'generate'
    file: str                                # relative to --data_root
    render: Callable                         # local row -> item
    hub: Optional[tuple] = None              # (path, config or None, split) for datasets.load_dataset
    from_hub: Optional[Callable] = None      # hub row -> local row


TASKS = {
    "hellaswag": Task("choice", "hellaswag/hellaswag_val.jsonl.gz", hellaswag,
                      ("Rowan/hellaswag", None, "validation"), hellaswag_from_hub),
    "arc_easy": Task("choice", "llm_foundry/arc_easy.jsonl", query("\nAnswer:"),
                     ("allenai/ai2_arc", "ARC-Easy", "test"), arc_from_hub),
    "piqa": Task("choice", "llm_foundry/piqa.jsonl", query("\nAnswer:"),
                 ("baber/piqa", None, "validation"), piqa_from_hub),   # ybisk/piqa is the (script-based) original
    "boolq": Task("choice", "llm_foundry/boolq.jsonl", query("\nAnswer:"),
                  ("google/boolq", None, "validation"), boolq_from_hub),
    "copa": Task("choice", "llm_foundry/copa.jsonl", query(),
                 ("aps/super_glue", "copa", "validation"), copa_from_hub),
    "commonsense_qa": Task("choice", "llm_foundry/commonsense_qa.jsonl", query(),
                           ("tau/commonsense_qa", None, "validation"), csqa_from_hub),
    "winogrande": Task("schema", "llm_foundry/winogrande.jsonl", schema,
                       ("allenai/winogrande", "winogrande_xl", "validation"), winogrande_from_hub),
    "lambada_openai": Task("lm", "llm_foundry/lambada_openai.jsonl", continuation(" "),
                           ("EleutherAI/lambada_openai", "default", "test"), lambada_from_hub),
    "simple_arithmetic_nospaces": Task("generate", "llm_foundry/simple_arithmetic_nospaces.jsonl", answer),
    "simple_arithmetic_withspaces": Task("generate", "llm_foundry/simple_arithmetic_withspaces.jsonl", answer),
}


def check_task_names(names):
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")


def task_path(name, data_root):
    return os.path.join(data_root, TASKS[name].file)


def read_rows(path, limit=None):
    """The first `limit` JSON lines of a .jsonl or .jsonl.gz file."""
    rows = []
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def hub_rows(name, limit=None):
    """Download the task's split from the Hugging Face hub and convert it to the local row format."""
    task = TASKS[name]
    if task.hub is None:
        raise FileNotFoundError(f"{name}: no hub dataset is known for this task; it exists only as a local file")
    from datasets import load_dataset
    path, config, split = task.hub
    ds = load_dataset(path, config, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [task.from_hub(r) for r in ds]


def load_items(name, data_root=DEFAULT_DATA_ROOT, limit=None, online=False):
    """Items of task `name` (the first `limit`), rendered to (context, continuation) text.

    A malformed row is an error naming the file and the line, not a KeyError deep in scoring."""
    check_task_names([name])
    task, path = TASKS[name], task_path(name, data_root)
    if os.path.exists(path):
        rows, source = read_rows(path, limit), path
    elif online:
        rows, source = hub_rows(name, limit), "/".join(str(p) for p in TASKS[name].hub if p)
    else:
        hub = f" or pass --online to fetch {TASKS[name].hub[0]} with `datasets`" if TASKS[name].hub else ""
        raise FileNotFoundError(f"{name}: task file {path} not found; point --data_root at the folder that "
                                f"holds {task.file}{hub}")
    items = []
    for i, row in enumerate(rows):
        try:
            item = task.render(row)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{source}, item {i}: not in the {name} format ({type(e).__name__}: {e})") from None
        if "pairs" in item and not 0 <= item["gold"] < len(item["pairs"]):
            raise ValueError(f"{source}, item {i}: gold={item['gold']} but {len(item['pairs'])} choices")
        items.append(item)
    return items
