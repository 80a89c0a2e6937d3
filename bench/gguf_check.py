"""
bench/gguf_check.py — how close does llama.cpp run a checkpoint? Export, convert (f32 and q8_0), compare.

    python bench/gguf_check.py out/tiny_gpt2                 # 8 OpenStax documents, 128 tokens each

The checkpoint goes through export.py's Hugging Face folder and llama.cpp's own convert_hf_to_gguf.py (built by
tests/gguf_tools.py), and llama.cpp's next-token distribution is compared with ours at every position of held-out
text: mean and max KL(ours || llama.cpp), where the top-1 token agrees, and the largest logit difference.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import export  # noqa: E402
import gguf_tools  # noqa: E402
from checkpoint import load_model  # noqa: E402
from tokenizer import get_encoding  # noqa: E402

TEXT = os.path.join(ROOT, "..", "shared", "data", "openstax_edu_text", "sample_50.jsonl")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (its ckpt.pt)")
    p.add_argument("--docs", type=int, default=8, help="documents of the held-out text")
    p.add_argument("--tokens", type=int, default=128, help="tokens of each (at most the model's context)")
    p.add_argument("--text", default=TEXT, help=".jsonl with a 'text' field")
    args = p.parse_args(argv)
    gguf_tools.build()
    model, config = load_model(args.run)
    model.eval()
    enc = get_encoding(config.get("tokenizer", "gpt2"))
    n = min(args.tokens, model.config.block_size)
    docs = [json.loads(line)["text"] for line in open(args.text, encoding="utf-8")][:args.docs]
    ids = [[enc.eot_token] + enc.encode_ordinary(d)[:n - 1] for d in docs]
    hf_dir = export.export(args.run, os.path.join(args.run, "hf"))
    for kind in ("f32", "q8_0"):
        path = os.path.join(args.run, f"model-{kind}.gguf")
        gguf_tools.convert(hf_dir, path, kind)
        with gguf_tools.llama(path) as llm:
            r = gguf_tools.compare(model, llm, ids)
        print(f"{kind:>5}: {r['positions']} positions of {len(ids)} documents: mean KL(ours || llama.cpp) "
              f"{r['kl']:.2e} nats (max {r['kl_max']:.2e}), top-1 agrees at {r['top1']}/{r['positions']}, "
              f"max |logit difference| {r['logit_diff']:.2e}; our entropy {r['entropy']:.2f} nats")


if __name__ == "__main__":
    main()
