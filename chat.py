"""
chat.py — talk to a checkpoint.

    python chat.py out/sft_alpaca                          # a conversation (/reset clears it, /quit leaves)
    python chat.py out/sft_alpaca -p "Name three colours." # one answer, then exit
    python chat.py out/sft_alpaca --context doc.txt -p "Who wrote it?"    # answer from a passage
    python chat.py out/gpt2_124m --format none -p "The capital of France is" --temperature 0
    python chat.py out/sft_alpaca --num_beams 4 --no_repeat_ngram_size 3 -p "..."
    python chat.py out/sft_alpaca --smoke                  # fixed prompts, two temperatures, a verdict table

The prompt is rendered by chat_format.py exactly as prepare_sft.py rendered the training data, with the
assistant's turn left open; the answer is decoded from a KV cache (generation.py) and printed token by token
until the format's end token. The format defaults to the one the checkpoint was fine-tuned with (sft.py stores
`chat_format` in its config), else `none` (plain completion, for a pretrained model).

Each turn re-renders the whole conversation and prefills it: simple, and cheap next to generating. When the
history no longer fits the context (leaving room for an answer: min(max_new_tokens, block_size / 4) tokens),
the oldest turns are dropped, with a notice; a message that cannot fit even alone is an error.
"""
import argparse
import re
import sys

import torch

from chat_format import FORMATS, ChatFormat
from generation import GenerationConfig, beam_search, stream
from checkpoint import load_model
from configurator import run_script
from device import pick_device, pick_dtype
from tokenizer import check_same, get_encoding


class PromptTooLong(ValueError):
    pass


def load_chat(path, fmt=None, device="cpu", dtype="float32"):
    """(model in eval mode, ChatFormat, the checkpoint's config), or a clear error: unknown format, missing
    checkpoint, a tokenizer that does not match the model, a vocabulary without room for the format's tokens."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown chat format '{fmt}': expected one of {', '.join(FORMATS)}")
    model, cfg = load_model(path, device)
    trained_format = cfg.get("chat_format") or None
    name = fmt or trained_format or "none"
    if fmt and trained_format and fmt != trained_format:
        print(f"warning: {path} was fine-tuned with format '{trained_format}', you asked for '{fmt}'",
              file=sys.stderr)
    spec = cfg.get("tokenizer", "gpt2")
    check_same(spec, cfg.get("tokenizer_sha256"), path)  # the file may have been retrained since: gibberish
    chat = ChatFormat(name, get_encoding(spec))
    chat.check_model(model.config.vocab_size, model.config.padded_vocab_size, where=path)
    return cast_weights(model, dtype), chat, cfg


def cast_weights(model, dtype):
    """Weights in bf16/fp16 for inference: half the memory traffic per token. (model.py keeps its position
    tables in fp32 through the cast.) dtype: a torch.dtype or a name (auto | float32 | bfloat16 | float16)."""
    if isinstance(dtype, str):
        dtype = pick_dtype(dtype, model.wte.weight.device, key="--dtype")
    return model.to(dtype)


class Conversation:
    """The history: an optional system prompt and context (both kept when old turns are dropped), and the
    (user, assistant) turns so far."""

    def __init__(self, system=None, context=None):
        self.system, self.context, self.turns = system, context, []

    def messages(self, user, first_turn=0):
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        if self.context:
            msgs.append({"role": "context", "content": self.context})
        for u, a in self.turns[first_turn:]:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": user}]

    def prompt(self, chat, user, block_size, room):
        """Prompt ids for the next answer and how many old turns had to go to fit (they are forgotten)."""
        for first in range(len(self.turns) + 1):
            ids, _ = chat.render(self.messages(user, first), open_assistant=True)
            if len(ids) + room <= block_size:
                self.turns = self.turns[first:]
                return ids, first
        raise PromptTooLong(f"the prompt needs {len(ids)} tokens plus {room} for the answer, more than the "
                            f"context of {block_size} tokens: shorten it or lower --max_new_tokens")


def respond(model, chat, prompt_ids, gen, on_text=None, generator=None):
    """Generate one answer. Returns (text, stopped: it ended at a stop token, tokens generated). Sampling and
    greedy stream each piece of text to on_text as soon as it is whole; beam search prints at the end."""
    allowed = chat.allowed_mask(model.config.padded_vocab_size, model.wte.weight.device)
    if gen.num_beams > 1:
        ids, _ = beam_search(model, prompt_ids, gen, allowed)
        stopped = bool(ids) and ids[-1] in chat.stop_ids
        text = chat.decode(ids[:-1] if stopped else ids)
        if on_text:
            on_text(text)
        return text, stopped, len(ids)
    decoder, pieces, n, stopped = chat.stream_decoder(), [], 0, False
    for token in stream(model, prompt_ids, gen, allowed, generator):
        n += 1
        if token in chat.stop_ids:
            stopped = True
            break
        pieces.append(decoder.push(token))
        if on_text and pieces[-1]:
            on_text(pieces[-1])
    pieces.append(decoder.flush())
    if on_text and pieces[-1]:
        on_text(pieces[-1])
    return "".join(pieces), stopped, n


# ---- --smoke: a quick, honest look at a fine-tuned model -----------------------------------------------------
SMOKE_PROMPTS = [  # (prompt, words an on-topic answer is likely to use besides the prompt's own)
    ("What is the capital of France?", {"paris"}),
    ("Give three tips for staying healthy.", {"exercise", "sleep", "diet", "water", "eat"}),
    ("Explain what photosynthesis is in one or two sentences.", {"plants", "light", "sunlight", "energy"}),
    ("Tom has 3 apples and buys 5 more. How many apples does he have now?", {"8", "eight"}),
    ("Write a short poem about the sea.", {"waves", "ocean", "blue", "shore"}),
]
STOPWORDS = set("""a an the is are was were be been being of to in on for and or with what which who whom how why
when where does do did can could would should will this that these those it its as at by from about into your you
me my i give write explain describe tell name list one two three short sentence sentences now more has have he
she they them their there than then so not no yes""".split())


def content_words(text):
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS and (len(w) > 2 or w.isdigit())}


def repeated_ngram_ratio(ids, n=4):
    """Fraction of the answer's token n-grams that already occurred in it: 0 for fresh text, -> 1 for a loop."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def smoke_verdict(answer, stopped, on_topic, repetition):
    """OK: on topic, stops by itself, no loop. WEAK: one of those fails. FAIL: two do, a strong loop, or nothing."""
    if not answer.strip() or repetition > 0.5:
        return "FAIL"
    issues = (not on_topic) + (not stopped) + (repetition > 0.2)
    return ("OK", "WEAK")[issues] if issues < 2 else "FAIL"


def smoke(model, chat, gen, seed=1337, temperatures=(0.0, 0.8), out=print):
    """Every SMOKE_PROMPTS prompt at each temperature -> printed table; returns the rows."""
    rows = []
    for temperature in temperatures:
        g = GenerationConfig(**{**gen.__dict__, "temperature": temperature})
        generator = torch.Generator(model.wte.weight.device).manual_seed(seed)
        for prompt, expected in SMOKE_PROMPTS:
            ids, _ = chat.render([{"role": "user", "content": prompt}], open_assistant=True)
            answer, stopped, n = respond(model, chat, ids, g, generator=generator)
            on_topic = bool(content_words(answer) & (content_words(prompt) | expected))
            repetition = repeated_ngram_ratio(chat.enc.encode_ordinary(answer))
            rows.append({"temperature": temperature, "prompt": prompt, "answer": answer, "tokens": n,
                         "stopped": stopped, "on_topic": on_topic, "repetition": repetition,
                         "verdict": smoke_verdict(answer, stopped, on_topic, repetition)})
    out(f"{'temp':>4} | {'verdict':7} | stop | topic | rep4 | {'tok':>4} | {'prompt':34} | answer")
    out("-" * 120)
    for r in rows:
        answer = r["answer"].replace("\n", "\\n")
        out(f"{r['temperature']:4.1f} | {r['verdict']:7} | {'yes' if r['stopped'] else 'no':4} | "
            f"{'yes' if r['on_topic'] else 'no':5} | {r['repetition']:4.2f} | {r['tokens']:4d} | "
            f"{r['prompt'][:34]:34} | {answer[:60]}")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("OK", "WEAK", "FAIL")}
    out(f"smoke: {counts['OK']} OK, {counts['WEAK']} WEAK, {counts['FAIL']} FAIL (format '{chat.name}')")
    return rows


# ---- the command line ----------------------------------------------------------------------------------------
def add_model_args(p):
    """Which model to load, in which format, where and in what precision: chat.py's and serve.py's options."""
    p.add_argument("checkpoint", help="a run folder (its ckpt.pt), a .pt file, or a Hugging Face folder "
                                      "(hf:<folder>, or one holding config.json + model.safetensors)")
    p.add_argument("--format", default=None, help=f"{' | '.join(FORMATS)} (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU that has it) | float32 | bfloat16 | "
                                                   "float16")


def load_from_args(args):
    """(model, ChatFormat, device) from add_model_args' options; the dtype is checked before the (maybe large)
    checkpoint loads."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device, key="--dtype")
    model, chat, _ = load_chat(args.checkpoint, args.format, device, dtype)
    return model, chat, device


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--context", default=None, help="a text file given to the model as retrieved context")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50, help="0 = off")
    p.add_argument("--top_p", type=float, default=0.95, help="1 = off")
    p.add_argument("--repetition_penalty", type=float, default=1.1, help="1 = off")
    p.add_argument("--no_repeat_ngram_size", type=int, default=0, help="0 = off")
    p.add_argument("--min_new_tokens", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--num_beams", type=int, default=1, help="> 1: beam search (no streaming)")
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--smoke", action="store_true", help="run the fixed smoke prompts and print a verdict table")
    return p.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    model, chat, device = load_from_args(args)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           repetition_penalty=args.repetition_penalty,
                           no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams,
                           length_penalty=args.length_penalty, stop_ids=tuple(chat.stop_ids))
    if args.smoke:
        smoke(model, chat, gen, seed=args.seed)
        return
    context = None
    if args.context:
        try:
            with open(args.context, encoding="utf-8") as f:  # FileNotFoundError -> a clear message below
                context = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"--context {args.context}: not UTF-8 text (byte {e.start}): give a text file") from None
    conv = Conversation(args.system, context)
    block = model.config.block_size
    room = min(args.max_new_tokens, block // 4)
    generator = torch.Generator(device).manual_seed(args.seed)

    def answer(user):
        ids, dropped = conv.prompt(chat, user, block, room)
        if dropped:
            print(f"[the conversation outgrew the context of {block} tokens: dropped the {dropped} oldest "
                  f"turn(s)]", file=sys.stderr)
        text, stopped, n = respond(model, chat, ids, gen, lambda s: print(s, end="", flush=True), generator)
        print("" if stopped else f" [stopped after {n} tokens: --max_new_tokens or the context]")
        conv.turns.append((user, text))

    if args.prompt is not None:
        answer(args.prompt)
        return
    print(f"{args.checkpoint}: {model.num_params() / 1e6:.1f}M parameters, format '{chat.name}', context {block}, "
          f"on {device.type}. /reset clears the conversation, /quit leaves.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            conv.turns.clear()
            print("[conversation cleared]")
            continue
        if not line:
            continue
        print("bot> ", end="", flush=True)
        try:
            answer(line)
        except PromptTooLong as e:
            print(f"\n[{e}]")
        except KeyboardInterrupt:
            print(" [interrupted]")


if __name__ == "__main__":
    run_script(main, sys.argv[1:], expected=(RuntimeError,))
