"""
eval_tasks.py — the benchmarks eval.py knows: where each one's items come from and how an item becomes text.

Every benchmark here is asked the same way: as TEXT the model continues. An item turns into one or more
(context, continuation) string pairs, and eval.py scores the continuation's log-likelihood given the context.
So a task is only a rendering rule. Four kinds:

    choice    one context, n candidate continuations (ARC, PIQA, BoolQ, COPA, CSQA, SciQ, LogiQA, MMLU,
              HellaSwag): the prediction is the candidate the model finds most likely.
    schema    n contexts, ONE shared continuation (WinoGrande): "partial evaluation". The blank is filled with
              each option and we score only what comes after it, which reads the same for every option, so
              the likelihoods compare like with like.
    lm        one context, one continuation (LAMBADA): is the continuation the model's greedy choice, token by
              token? And how likely is it (perplexity)?
    generate  one context, an answer string (simple arithmetic): generate greedily, compare with the answer.

ONE ROW FORMAT PER KIND. Items come from a local file (this machine is offline: ../shared/data/evals, see
shared/data/MANIFEST.md section 4; most are llm-foundry's jsonl files) or from the Hugging Face hub
(`--online`, via `datasets`). Each task has one converter per source, `from_file` and `from_hub`, and both
produce the same canonical row; one renderer per kind (RENDER below) turns a canonical row into text:

    choice    {query, choices, gold}              pairs (query, " " + choice)
    schema    {context_options, continuation, gold}   pairs (option, " " + continuation)
    lm        {context, continuation}             (context, " " + continuation)
    generate  {context, continuation}             the continuation is the answer to produce

For every multiple-choice task the canonical row IS lm-evaluation-harness's task definition: query = its
doc_to_text (zero-shot: the task's `description`, if any, then doc_to_text), choices = its doc_to_choice,
gold = its doc_to_target. The harness scores (query, target_delimiter + choice) with target_delimiter " ",
exactly our pair, and its acc_norm divides by len(choice), our `norm_texts`. The harness encodes
context + continuation in one go and splits at the context's token count; we encode the two separately. With
GPT-2-style tokenizers the two agree, because each continuation starts with a space and BPE pre-tokenisation
always cuts before a space.

THE DELIMITER. Where the context ends and the continuation starts matters for a BPE tokenizer: GPT-2 spells a
word after a space as one token " word", so the space belongs to the continuation (" Paris", not "Paris"
after "... capital is "). Every context therefore ends WITHOUT trailing whitespace (as in the harness's
_encode_pair, trailing whitespace of a query moves to the front of the continuation).

The renderings, each checked against lm-evaluation-harness v0.4.8 (the version LRC was evaluated with; the
files below are unchanged at commit 4e7e0d4 but for dataset paths). Paths are inside lm_eval/tasks/:

    arc_easy, arc_challenge  arc/arc_easy.yaml, arc/arc_challenge.yaml: "Question: {question}\\nAnswer:",
                     choices = the answer texts; allenai/ai2_arc ARC-Easy | ARC-Challenge, test
    piqa             piqa/piqa.yaml: "Question: {goal}\\nAnswer:", choices [sol1, sol2]; baber/piqa, validation
    boolq            super_glue/boolq/default.yaml: "{passage}\\nQuestion: {question}?\\nAnswer:" (no "Passage: "
                     prefix), choices ["no", "yes"]; aps/super_glue boolq, validation
    copa             super_glue/copa/default.yaml + utils.py: premise.strip()[:-1] (the final period dropped)
                     + " because" (cause) | " therefore" (effect), no comma; each choice is " " + the choice
                     with its first letter lower-cased, so the harness scores it after a DOUBLE space
                     (delimiter + the choice's own space). The first token, " ", is the same for both choices
                     and cancels in acc, but we keep it: it is what the harness scores.
    commonsense_qa   commonsense_qa/default.yaml: "Question: {question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nE. ..
                     \\nAnswer:", choices the letters A-E (no "Choices:" line); tau/commonsense_qa, validation
    sciq             sciq/sciq.yaml: "{support.lstrip()}\\nQuestion: {question}\\nAnswer:", choices
                     [distractor1, distractor2, distractor3, correct_answer], gold 3; allenai/sciq, test
    logiqa           logiqa/logiqa.yaml + utils_logiqa.py: "Passage: {context}\\nQuestion: {question}\\nChoices:
                     \\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", choices = the option TEXTS, gold = "abcd".index(label);
                     EleutherAI/logiqa logiqa, test
    mmlu             mmlu/default/_default_template_yaml + mmlu_<subject>.yaml: the subject's description "The
                     following are multiple choice questions (with answers) about {subject with spaces}.\\n\\n",
                     then "{question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", choices A-D, gold = answer;
                     cais/mmlu all, test (57 subjects, 14,042 items). The harness's `mmlu` number
                     (mmlu/default/_mmlu.yaml: weight_by_size) is the mean over ITEMS; eval.py reports it as
                     acc and adds the macro average over subjects and a per-subject table.
    winogrande       winogrande/default.yaml + preprocess_winogrande.py: options sentence[:blank] + option,
                     continuation " " + the rest, stripped; allenai/winogrande winogrande_xl, validation
    lambada_openai   lambada/lambada_openai.yaml: text without its last word, " " + last word
    hellaswag        DIFFERS on purpose: ctx + " " + ending, llm.c's rendering. The harness (hellaswag/utils.py)
                     prefixes the activity label ("Roof shingle removal: A man is ...") and capitalises ctx_b;
                     that moves GPT-2 124M by about a point, so compare our HellaSwag with llm.c's numbers.
    simple_arithmetic_*   llm-foundry's tasks; the harness has no twin. "25-759=" + "-734" (nospaces),
                     "25 - 759 =" + " -734" (withspaces): the file's strings as they are.

THE LOCAL FILES. arc_easy, arc_challenge, piqa, boolq, copa, commonsense_qa, logiqa, winogrande,
lambada_openai and arithmetic are llm-foundry's {query, choices, gold} / {context_options, ...} / {context,
continuation} rows; `from_file` turns them into the harness's rows where llm-foundry's prompt differs (BoolQ's
"Passage: " prefix, COPA's comma, CSQA's "Choices:" line, LogiQA's whole layout: llm-foundry writes "Context: "
and "Choices: A. .." on one line and scores the letters, the harness scores the option texts). sciq and mmlu
files hold the hub's own rows, one JSON object a line (e.g. `datasets.load_dataset("allenai/sciq",
split="test").to_json("sciq/sciq_test.jsonl")`); ../shared has none, so the LRC suite marks them "needs
--online" when run offline. Three local files are NOT the harness's data, and a run on them says so (`note` in
eval.json, `*` in tables): llm-foundry's CommonsenseQA has 4 choices per item (the hub's has 5), its BoolQ
passages lack super_glue's "Title -- " prefix, and its LogiQA text is not the hub's character for character
(LOGIQA_NOTE). HellaSwag's file holds `ctx` = ctx_a + " " + ctx_b, already cleaned of WikiHow's
"[title]"/"[step]" markup (the same cleaning the harness applies).
"""
import os
from dataclasses import dataclass
from typing import Callable, Optional

from device import shared_dir

DEFAULT_DATA_ROOT = shared_dir("evals")


# ---- the renderers: a canonical row -> an item -------------------------------------------------------------
# An item is a dict. choice/schema: {"pairs": [(context, continuation), ...], "gold": int, "norm_texts": [...]}
# where norm_texts are the strings whose character length acc_norm divides by (the choice without the
# delimiter, as lm-evaluation-harness does); MMLU items also carry "group" (the subject).
# lm: {"context", "continuation"}. generate: {"context", "answer"}.

def strings(value, what):
    """A list of strings, or an error: a string where a list belongs would silently become its characters."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"'{what}' must be a list of strings, got {type(value).__name__}")
    return value


def choice(row):
    """{query, choices, gold} -> pairs (query, " " + choice). Whitespace ending the query moves to the front
    of each continuation, as in the harness's _encode_pair."""
    ctx = row["query"].rstrip()
    moved = row["query"][len(ctx):]
    choices = strings(row["choices"], "choices")
    item = {"pairs": [(ctx, moved + " " + c) for c in choices], "gold": int(row["gold"]), "norm_texts": choices}
    if "subject" in row:
        item["group"] = row["subject"]
    return item


def schema(row):
    """{context_options, continuation, gold}: the continuation is scored after each option."""
    rest = row["continuation"].strip()
    options = strings(row["context_options"], "context_options")
    return {"pairs": [(opt.rstrip(), " " + rest) for opt in options], "gold": int(row["gold"]),
            "norm_texts": [rest] * len(options)}


def lm(row):
    """{context, continuation}: context.rstrip() + " " + the continuation (LAMBADA's last word)."""
    return {"context": row["context"].rstrip(), "continuation": " " + row["continuation"].strip()}


def answer(row):
    """Generation: the continuation (its leading space kept) is the answer to produce."""
    return {"context": row["context"].rstrip(), "answer": row["continuation"]}


RENDER = {"choice": choice, "schema": schema, "lm": lm, "generate": answer}


# ---- converters: a local file's row or a hub row -> the canonical row ---------------------------------------
def as_is(row):
    return row


def foundry(suffix):
    """llm-foundry multiple choice {query, choices, gold}: its query lacks the harness's "\\nAnswer:"."""
    def convert(row):
        return {"query": row["query"].strip() + suffix, "choices": [c.strip() for c in strings(row["choices"],
                                                                                              "choices")],
                "gold": row["gold"]}
    return convert


def clean_wikihow(text):
    """HellaSwag's WikiHow contexts carry markup: ' [title]' ends a heading, '[header]', '[step]' are tags."""
    import re
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_from_file(r):
    return {"query": r["ctx"].strip(), "choices": [e.strip() for e in strings(r["endings"], "endings")],
            "gold": r["label"]}


def hellaswag_from_hub(r):
    return {"query": clean_wikihow(r["ctx"]), "choices": [clean_wikihow(e) for e in r["endings"]],
            "gold": int(r["label"])}


def arc_from_hub(r):
    labels = list(r["choices"]["label"])
    return {"query": f"Question: {r['question']}\nAnswer:", "choices": list(r["choices"]["text"]),
            "gold": labels.index(r["answerKey"])}


def piqa_from_hub(r):
    return {"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}


def boolq_from_file(r):
    """llm-foundry's "Passage: {p}\\nQuestion: {q}?" -> the harness's "{p}\\nQuestion: {q}?\\nAnswer:"."""
    query = r["query"].strip()
    query = query[len("Passage: "):] if query.startswith("Passage: ") else query
    return {"query": query + "\nAnswer:", "choices": [c.strip() for c in strings(r["choices"], "choices")],
            "gold": r["gold"]}


def boolq_from_hub(r):
    return {"query": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(r["label"])}


def lower_first(text):
    return text[:1].lower() + text[1:]


def copa_from_file(r):
    """llm-foundry's "{premise without its period}, because" -> the harness's "... because" (no comma)."""
    head, connector = r["query"].strip().rsplit(" ", 1)
    if connector not in ("because", "therefore"):
        raise ValueError(f"query should end in 'because' or 'therefore', not {connector!r}")
    return {"query": f"{head.removesuffix(',')} {connector}",
            "choices": [" " + lower_first(c.strip()) for c in strings(r["choices"], "choices")], "gold": r["gold"]}


def copa_from_hub(r):
    connector = {"cause": "because", "effect": "therefore"}[r["question"]]
    return {"query": r["premise"].strip()[:-1] + " " + connector,
            "choices": [" " + lower_first(r["choice1"]), " " + lower_first(r["choice2"])], "gold": int(r["label"])}


def lettered(question, options, letters):
    """"{question}\\nA. {o1}\\nB. {o2}...\\nAnswer:": CSQA's and MMLU's prompt (and LogiQA's after "Choices:")."""
    return question + "".join(f"\n{letter}. {o}" for letter, o in zip(letters, options)) + "\nAnswer:"


def csqa_from_file(r):
    """llm-foundry's "Question: ..\\nChoices:\\nA. ..": the harness lists the choices without that line."""
    return {"query": r["query"].strip().replace("\nChoices:\n", "\n", 1), "choices": strings(r["choices"], "choices"),
            "gold": r["gold"]}


def csqa_from_hub(r):
    texts = list(r["choices"]["text"])
    return {"query": lettered("Question: " + r["question"].strip(), texts, "ABCDE"), "choices": list("ABCDE"),
            "gold": "ABCDE".index(r["answerKey"])}


def sciq_row(r):
    return {"query": f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
            "choices": [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], "gold": 3}


def logiqa_query(context, question, options):
    return lettered(f"Passage: {context}\nQuestion: {question}\nChoices:", options, "ABCD")


def logiqa_row(r):
    options = strings(r["options"], "options")
    return {"query": logiqa_query(r["context"], r["question"], options), "choices": options,
            "gold": "abcd".index(r["label"].strip())}


def logiqa_from_file(r):
    """llm-foundry's "Context: {c}\\nQuestion: {q}\\nChoices: A. {o1}\\nB. {o2}\\nC. {o3}\\nD. {o4}\\n" with choices
    ["A", "B", "C", "D"] -> the harness's row (logiqa_row's): the passage, question and options are read back out
    of the query. Split from the right, so a passage that itself says "Question:" stays whole."""
    import re
    head, sep, options = r["query"].rpartition("\nChoices: ")
    context, sep2, question = head.removeprefix("Context: ").rpartition("\nQuestion: ")
    parts = re.fullmatch(r"A\. (.*)\nB\. (.*)\nC\. (.*)\nD\. (.*)\n?", options)
    if not (sep and sep2 and head.startswith("Context: ") and parts):
        raise ValueError("query should read 'Context: ..\\nQuestion: ..\\nChoices: A. ..\\nB. ..\\nC. ..\\nD. ..'")
    if strings(r["choices"], "choices") != list("ABCD"):
        raise ValueError(f"choices should be the letters A-D, not {r['choices']}")
    options = list(parts.groups())
    return {"query": logiqa_query(context.strip(), question.strip(), options), "choices": options, "gold": r["gold"]}


# Measured against lgw863/LogiQA-dataset's Test.txt (the file behind EleutherAI/logiqa) parsed as the harness's
# process_docs parses it: all 651 answers agree, and 340 of 651 prompts are the harness's to the character.
LOGIQA_NOTE = ("llm-foundry's LogiQA text differs from the harness's in 311 of 651 items (an option with an added "
               "final period in 180, an option that lost its first letter in 18, spacing after periods); the "
               "answers are the same")


MMLU_SUBJECTS = """abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology
college_chemistry college_computer_science college_mathematics college_medicine college_physics computer_security
conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts
high_school_biology high_school_chemistry high_school_computer_science high_school_european_history
high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics
high_school_microeconomics high_school_physics high_school_psychology high_school_statistics
high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence
logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes
moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine
professional_psychology public_relations security_studies sociology us_foreign_policy virology
world_religions""".split()


def mmlu_row(r):
    """The subject's zero-shot header (the harness's `description`, which _generate_configs.py writes as
    ' '.join(subject.split('_'))), then the question and four lettered choices."""
    if r["subject"] not in MMLU_SUBJECTS:
        raise ValueError(f"unknown MMLU subject {r['subject']!r}")
    options = strings(r["choices"], "choices")
    if len(options) != 4:
        raise ValueError(f"MMLU items have 4 choices, this one {len(options)}")
    header = f"The following are multiple choice questions (with answers) about {r['subject'].replace('_', ' ')}.\n\n"
    return {"query": header + lettered(r["question"].strip(), options, "ABCD"), "choices": list("ABCD"),
            "gold": int(r["answer"]), "subject": r["subject"]}


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
    kind: str                                # 'choice' | 'schema' | 'lm' | 'generate' (its renderer: RENDER)
    file: str                                # the local file, relative to --data_root
    from_file: Callable = as_is              # local row -> canonical row
    hub: Optional[tuple] = None              # (path, config or None, split) for datasets.load_dataset
    from_hub: Optional[Callable] = None      # hub row -> canonical row
    differs: Optional[str] = None            # where our rendering is deliberately not the harness's
    n_choices: Optional[int] = None          # the harness's choice count: items with another are not comparable
    file_note: Optional[str] = None          # how the shipped local file differs from the hub's data


LF = "llm_foundry/"
TASKS = {
    "hellaswag": Task("choice", "hellaswag/hellaswag_val.jsonl.gz", hellaswag_from_file,
                      ("Rowan/hellaswag", None, "validation"), hellaswag_from_hub,
                      differs="llm.c's rendering: ctx + ending, without the harness's activity-label prefix"),
    "arc_easy": Task("choice", LF + "arc_easy.jsonl", foundry("\nAnswer:"), ("allenai/ai2_arc", "ARC-Easy", "test"),
                     arc_from_hub),
    "arc_challenge": Task("choice", LF + "arc_challenge.jsonl", foundry("\nAnswer:"),
                          ("allenai/ai2_arc", "ARC-Challenge", "test"), arc_from_hub),
    "piqa": Task("choice", LF + "piqa.jsonl", foundry("\nAnswer:"), ("baber/piqa", None, "validation"),
                 piqa_from_hub),   # ybisk/piqa is the (script-based) original
    "boolq": Task("choice", LF + "boolq.jsonl", boolq_from_file, ("aps/super_glue", "boolq", "validation"),
                  boolq_from_hub, file_note="local passages lack super_glue's 'Title -- ' prefix"),
    "copa": Task("choice", LF + "copa.jsonl", copa_from_file, ("aps/super_glue", "copa", "validation"),
                 copa_from_hub),
    "commonsense_qa": Task("choice", LF + "commonsense_qa.jsonl", csqa_from_file,
                           ("tau/commonsense_qa", None, "validation"), csqa_from_hub, n_choices=5),
    "sciq": Task("choice", "sciq/sciq_test.jsonl", sciq_row, ("allenai/sciq", None, "test"), sciq_row),
    "logiqa": Task("choice", LF + "logi_qa.jsonl", logiqa_from_file, ("EleutherAI/logiqa", "logiqa", "test"),
                   logiqa_row, file_note=LOGIQA_NOTE),
    "mmlu": Task("choice", "mmlu/mmlu_test.jsonl", mmlu_row, ("cais/mmlu", "all", "test"), mmlu_row),
    "winogrande": Task("schema", LF + "winogrande.jsonl", as_is, ("allenai/winogrande", "winogrande_xl",
                                                                  "validation"), winogrande_from_hub),
    "lambada_openai": Task("lm", LF + "lambada_openai.jsonl", as_is, ("EleutherAI/lambada_openai", "default", "test"),
                           lambada_from_hub),
    "simple_arithmetic_nospaces": Task("generate", LF + "simple_arithmetic_nospaces.jsonl",
                                       differs="llm-foundry's task; the harness has no twin"),
    "simple_arithmetic_withspaces": Task("generate", LF + "simple_arithmetic_withspaces.jsonl",
                                         differs="llm-foundry's task; the harness has no twin"),
}

# The LRC card's zero-shot table: (column, task, metric). The metric of each column is the paper's Table 14
# (arXiv:2505.12781, appendix D.6, after Sheared-LLaMA): acc_norm for ARC-C and LogiQA, acc elsewhere.
LRC_COLUMNS = [("ARC-E", "arc_easy", "acc"), ("ARC-C", "arc_challenge", "acc_norm"), ("LogiQA", "logiqa", "acc_norm"),
               ("CSQA", "commonsense_qa", "acc"), ("PIQA", "piqa", "acc"), ("WinoG", "winogrande", "acc"),
               ("BoolQ", "boolq", "acc"), ("SciQ", "sciq", "acc"), ("MMLU", "mmlu", "acc")]
# The published LRC-1.5B-SFT row (x100): arXiv:2505.12781 Table 1, column LRC-1.5B ("all models ... are instruct
# versions"; the same numbers are Table 15's LRC-1.5B after SFT and Table 20's seed 218), lm_eval 0.4.8,
# zero-shot. The model card's visible text points to the paper's tables and does not repeat the row.
LRC_REFERENCE = ("LRC-1.5B-SFT (paper)", {"ARC-E": 74.75, "ARC-C": 44.97, "LogiQA": 30.72, "CSQA": 65.77,
                                          "PIQA": 73.07, "WinoG": 62.25, "BoolQ": 75.78, "SciQ": 94.60,
                                          "MMLU": 49.42, "Avg": 63.48})

SUITES = {"core": ["hellaswag", "arc_easy", "piqa", "boolq", "copa", "commonsense_qa", "winogrande", "lambada_openai",
                   "simple_arithmetic_nospaces", "simple_arithmetic_withspaces"],
          "lrc": [task for _, task, _ in LRC_COLUMNS]}


def check_task_names(names):
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")


def resolve_tasks(tasks=None, suite=None):
    """--tasks a,b | all, or --suite core | lrc (default core) -> task names. Nothing to run is an error, so
    a slip like `--tasks ''` cannot write an empty result over a run's eval.json."""
    if tasks is not None and suite is not None:
        raise ValueError("give --tasks or --suite, not both")
    if tasks is None:
        suite = suite or "core"
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
        return list(SUITES[suite])
    names = list(TASKS) if tasks.strip() == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--tasks {tasks!r} names no task; give some of {', '.join(TASKS)}, 'all', or a --suite")
    check_task_names(names)
    return list(dict.fromkeys(names))        # each once, in the order given


def task_path(name, data_root):
    return os.path.join(data_root, TASKS[name].file)


# ---- reading: every row checked, with its file and line, before any task runs -----------------------------------
def read_rows(path, limit=None):
    """[(line number, row)] of the first `limit` JSON objects of a .jsonl or .jsonl.gz file. Bytes are decoded
    line by line, so a non-UTF-8 byte, like bad JSON, is reported with its line."""
    from prepare_fineweb import json_lines  # the one JSON-lines reader (bytes decoded line by line, gz or not)
    rows = []
    try:
        for n, row in json_lines(path):
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: a JSON object expected, not {type(row).__name__}")
            rows.append((n, row))
            if limit is not None and len(rows) >= limit:
                break
    except (OSError, EOFError) as err:           # a truncated or non-gzip .gz file
        raise ValueError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    return rows


def hub_name(task):
    path, config, split = task.hub
    return f"{path}{'/' + config if config else ''} ({split})"


def hub_rows(name, limit=None):
    """Download the task's split from the Hugging Face hub: [(row index, row)]."""
    task = TASKS[name]
    if task.hub is None:
        raise FileNotFoundError(f"{name}: no hub dataset is known for this task; it exists only as a local file")
    try:
        from datasets import load_dataset
    except ImportError:
        raise FileNotFoundError(f"{name}: --online needs the `datasets` package (pip install datasets)") from None
    path, config, split = task.hub
    try:
        ds = load_dataset(path, config, split=split)
    except Exception as e:   # the library's own errors (no such split/config/dataset, no network): one line
        raise ValueError(f"{name}: cannot load {hub_name(task)} from the hub ({type(e).__name__}: {e})") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return list(enumerate(ds))


def comparability(name, items, from_file):
    """None, or why these items' numbers cannot be set beside the harness's published ones."""
    task, notes = TASKS[name], []
    if from_file and task.file_note:
        notes.append(task.file_note)
    if task.n_choices:
        other = sorted({len(it["pairs"]) for it in items} - {task.n_choices})
        if other:
            notes.append(f"items with {'/'.join(map(str, other))} choices, the harness's {name} has "
                         f"{task.n_choices}: not comparable with published numbers")
    return "; ".join(notes) or None


def load_items(name, data_root=DEFAULT_DATA_ROOT, limit=None, online=False):
    """Task `name`'s first `limit` items, rendered: {"items", "source", "note"}.

    Every row is converted and rendered here, so a malformed row is an error naming the file and the line
    before anything is scored, not a KeyError deep in scoring after other tasks have run."""
    check_task_names([name])
    task, path = TASKS[name], task_path(name, data_root)
    if os.path.exists(path):
        rows, source, where, convert = read_rows(path, limit), path, "line", task.from_file
    elif online:
        rows, source, where, convert = hub_rows(name, limit), hub_name(task), "row", task.from_hub
    else:
        hub = f" or pass --online to fetch {task.hub[0]} with `datasets`" if task.hub else ""
        raise FileNotFoundError(f"{name}: task file {path} not found; point --data_root at the folder that "
                                f"holds {task.file}{hub}")
    if not rows:
        raise ValueError(f"{source}: no {name} items")
    at = (lambda n: f"{source}:{n}") if where == "line" else (lambda n: f"{source}, row {n}")  # file:line | hub row
    items = []
    for n, row in rows:
        try:
            item = RENDER[task.kind](convert(row))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ValueError(f"{at(n)}: not in the {name} format ({type(e).__name__}: {e})") from None
        if "pairs" in item and not (len(item["pairs"]) >= 2 and 0 <= item["gold"] < len(item["pairs"])):
            raise ValueError(f"{at(n)}: gold={item['gold']} with {len(item['pairs'])} choices")
        items.append(item)
    return {"items": items, "source": source, "note": comparability(name, items, source == path)}
