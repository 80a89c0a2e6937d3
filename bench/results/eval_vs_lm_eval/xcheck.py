"""
eval.py against lm-evaluation-harness 0.4.8 itself, offline: the same items, scored by both.

    python bench/results/eval_vs_lm_eval/xcheck.py CKPT HF_FOLDER OUT_DIR [N]

CKPT is a nanoforge checkpoint, HF_FOLDER its `export.py` Hugging Face folder. The hub is not reachable here,
so each harness task is the harness's own YAML (`include:`) with its dataset pointed at a local JSON file of
hub-format rows: the first N rows of the offline llm-foundry files turned back into the hub's fields (ARC-Easy,
PIQA, BoolQ, COPA, WinoGrande) and the hand-written stand-ins in tests/data/evals (ARC-Challenge, SciQ, LogiQA,
MMLU) plus two hand-written 5-choice CommonsenseQA items. eval.py renders the same rows with eval_tasks'
from_hub converters. Compared per request: the (context, continuation) strings, and the log-likelihoods.
"""
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT)
import eval as nf                      # noqa: E402
import eval_tasks as T                 # noqa: E402

LF = os.path.join(T.DEFAULT_DATA_ROOT, "llm_foundry")
STAND = os.path.join(ROOT, "tests", "data", "evals")
HARNESS = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
           "boolq": "super_glue/boolq/default.yaml", "copa": "super_glue/copa/default.yaml",
           "commonsense_qa": "commonsense_qa/default.yaml", "winogrande": "winogrande/default.yaml",
           "sciq": "sciq/sciq.yaml", "logiqa": "logiqa/logiqa.yaml", "mmlu_anatomy": "mmlu/default/mmlu_anatomy.yaml",
           "mmlu_elementary_mathematics": "mmlu/default/mmlu_elementary_mathematics.yaml"}


def local_rows(name, n):
    return [r for _, r in T.read_rows(os.path.join(LF, name + ".jsonl"), n)]


def hub_docs(n):
    """Hub-format rows for every task, from the offline files."""
    docs = {"arc_easy": [{"question": r["query"][len("Question: "):], "answerKey": "ABCDE"[r["gold"]],
                          "choices": {"text": r["choices"], "label": list("ABCDE"[:len(r["choices"])])}}
                         for r in local_rows("arc_easy", n)],
            "piqa": [{"goal": r["query"].strip()[len("Question: "):], "sol1": r["choices"][0], "sol2": r["choices"][1],
                      "label": r["gold"]} for r in local_rows("piqa", n)],
            "boolq": [dict(zip(("passage", "question"), r["query"][len("Passage: "):].rsplit("\nQuestion: ", 1)),
                           label=r["gold"]) for r in local_rows("boolq", n)],
            "copa": [{"premise": r["query"].rsplit(", ", 1)[0] + ".", "choice1": r["choices"][0],
                      "choice2": r["choices"][1], "label": r["gold"],
                      "question": {"because": "cause", "therefore": "effect"}[r["query"].rsplit(" ", 1)[1]]}
                     for r in local_rows("copa", n)],
            "commonsense_qa": [{"question": "Where would you put a wet umbrella?", "answerKey": "A", "choices": {
                "label": list("ABCDE"), "text": ["stand", "oven", "bed", "fridge", "drawer"]}},
                {"question": "What do you use to cut paper?", "answerKey": "B", "choices": {
                    "label": list("ABCDE"), "text": ["spoon", "scissors", "sponge", "pillow", "glue"]}}]}
    for d in docs["boolq"]:
        d["question"] = d["question"].removesuffix("?")       # the harness adds the question mark back
    docs["winogrande"] = []
    for r in local_rows("winogrande", n):                          # sentence = the shared prefix + "_" + the rest
        a, b = r["context_options"]
        cut = os.path.commonprefix([a, b]).rfind(" ") + 1
        doc = {"sentence": a[:cut] + "_ " + r["continuation"], "option1": a[cut:], "option2": b[cut:],
               "answer": str(r["gold"] + 1)}
        if T.winogrande_from_hub(doc)["context_options"] == [a, b]:
            docs["winogrande"].append(doc)
    for name, path in [("arc_challenge", None), ("sciq", "sciq/sciq_test.jsonl"), ("logiqa", "logiqa/logiqa_test.jsonl"),
                       ("mmlu", "mmlu/mmlu_test.jsonl")]:
        if path:
            docs[name] = [r for _, r in T.read_rows(os.path.join(STAND, path))]
    docs["arc_challenge"] = [{"question": r["query"][len("Question: "):], "answerKey": "ABCDE"[r["gold"]],
                              "choices": {"text": r["choices"], "label": list("ABCDE"[:len(r["choices"])])}}
                             for _, r in T.read_rows(os.path.join(STAND, "llm_foundry", "arc_challenge.jsonl"))]
    for subject in ("anatomy", "elementary_mathematics"):
        docs["mmlu_" + subject] = [r for r in docs["mmlu"] if r["subject"] == subject]
    del docs["mmlu"]
    return docs


def write_tasks(docs, out):
    """One YAML per task: the harness's own file, its data swapped for a local JSON file."""
    import lm_eval
    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    os.makedirs(os.path.join(out, "tasks"), exist_ok=True)
    for name, rows in docs.items():
        data = os.path.join(out, "data", name + ".jsonl")
        os.makedirs(os.path.dirname(data), exist_ok=True)
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(out, "tasks", f"xc_{name}.yaml"), "w") as f:
            f.write(f"include: {os.path.join(tasks_dir, HARNESS[name])}\ntask: xc_{name}\ndataset_path: json\n"
                    f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {data}\ntraining_split: null\n"
                    f"validation_split: null\ntest_split: test\nfewshot_split: null\n")


def ours(ckpt, docs):
    """eval.py's renderings (from_hub) and per-request log-likelihoods, fp32 on the CPU."""
    import tiktoken
    import torch
    from checkpoint import load_model
    model, cfg = load_model(ckpt, "cpu")
    enc = tiktoken.get_encoding(cfg.get("tokenizer", "gpt2"))
    encode = nf.encoder(enc)
    out = {}
    for name, rows in docs.items():
        task = T.TASKS["mmlu" if name.startswith("mmlu") else name]
        items = [T.RENDER[task.kind](task.from_hub(r)) for r in rows]
        reqs = [(c, x) for it in items for c, x in it["pairs"]]
        ids = [(encode(c), encode(x)) for c, x in reqs]
        scored = nf.score_requests(model, ids, model.config.block_size, enc.n_vocab, torch.device("cpu"))
        # the exported head keeps the vocabulary's padding rows (chat tokens live there) and the harness's
        # softmax runs over all of them; eval.py renormalises over the tokenizer's entries. Both, to tell apart.
        every_row = nf.score_requests(model, ids, model.config.block_size, model.config.padded_vocab_size,
                                      torch.device("cpu"))
        out[name] = {"items": items, "requests": reqs, "logprob": scored["logprob"].tolist(),
                     "logprob_all_rows": every_row["logprob"].tolist()}
    return out


def main(ckpt, hf, out, n=100):
    docs = hub_docs(n)
    write_tasks(docs, out)
    mine = ours(ckpt, docs)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    res = simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=[f"xc_{k}" for k in docs],
                          num_fewshot=0, batch_size=8, device="cpu", log_samples=True,
                          task_manager=TaskManager(include_path=os.path.join(out, "tasks")))
    lines = ["| task | items | identical (context, continuation) strings | max abs diff log-lik (nats) | "
             "same, softmax over all rows | same acc prediction | acc eval.py / harness | acc_norm eval.py / harness |",
             "|---|---|---|---|---|---|---|---|"]
    for name in docs:
        samples = sorted(res["samples"][f"xc_{name}"], key=lambda s: s["doc_id"])
        theirs = [(tuple(a[0] for a in s["arguments"]), [float(r[0][0]) for r in s["resps"]]) for s in samples]
        reqs = [tuple(a) for s in samples for a in s["arguments"]]
        same = sum(tuple(r[:2]) == m for r, m in zip(reqs, mine[name]["requests"]))
        lls = [ll for _, l in theirs for ll in l]
        diff = max(abs(a - b) for a, b in zip(lls, mine[name]["logprob"]))
        diff_all = max(abs(a - b) for a, b in zip(lls, mine[name]["logprob_all_rows"]))
        k, agree, acc_o, acc_t, norm_o, norm_t = 0, 0, [], [], [], []
        for it, s in zip(mine[name]["items"], samples):
            m = len(it["pairs"])
            lo, lt = mine[name]["logprob"][k:k + m], [float(r[0][0]) for r in s["resps"]]
            chars = [len(t) for t in it["norm_texts"]]
            po, pt = max(range(m), key=lambda i: lo[i]), max(range(m), key=lambda i: lt[i])
            agree += po == pt
            acc_o.append(po == it["gold"]), acc_t.append(s["acc"])
            norm_o.append(max(range(m), key=lambda i: lo[i] / chars[i]) == it["gold"])
            norm_t.append(s.get("acc_norm"))
            k += m
        mean = lambda v: sum(v) / len(v)   # noqa: E731
        norm = (f"{mean(norm_o):.4f} / {mean(norm_t):.4f}" if None not in norm_t else "- (harness: acc only)")
        lines.append(f"| {name} | {len(samples)} | {same}/{len(reqs)} | {diff:.2e} | {diff_all:.2e} | {agree}/{len(samples)} | "
                     f"{mean(acc_o):.4f} / {mean(acc_t):.4f} | {norm} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
