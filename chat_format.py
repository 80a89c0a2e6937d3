"""
chat_format.py — the one place that turns a conversation into token ids, and back.

prepare_sft.py renders every training conversation with `render`, chat.py renders the prompt with the same
function (the assistant turn left open), so what the model sees when you talk to it is, token for token, what it
was trained on. A conversation is a list of messages:

    [{"role": "system",    "content": "You are terse."},        # optional, first
     {"role": "context",   "content": "<a retrieved passage>"}, # optional, right before a user message
     {"role": "user",      "content": "Summarise it."},
     {"role": "assistant", "content": "..."}, ...]               # user and assistant alternate

    ids, mask = render(messages, "alpaca", enc)                  # training: ends with an assistant message
    ids, _    = render(messages[:-1], "alpaca", enc, open_assistant=True)   # chat: ends with a user message
    # the second is exactly a prefix of the first: the model continues from where training taught it to

mask[i] = 1 on the tokens the loss trains on: every assistant turn's content AND its end token (so the model
learns to stop), 0 elsewhere (system, context, user, the template's own text). Every rendering begins with the
tokenizer's end-of-text token, as every pretraining document does (shards.py): it says "a new document starts".

The formats (name on the command line -> the text the model sees; S(x) is one special token id):

  alpaca     S(eot) "Below is an instruction that describes a task[, paired with an input that provides further
             context]. Write a response that appropriately completes the request.\\n\\n### Instruction:\\n{user}\\n\\n
             [### Input:\\n{context}\\n\\n]### Response:\\n" {assistant} S(eot)
             A system message replaces the "Below is ..." preamble. Later turns (our multi-turn extension; Alpaca
             itself is single-turn) continue right after the previous S(eot) with "### Instruction:\\n...".
  lime       S(eot) [{system}\\n][{context}\\n] S(<user>) {user} S(<assistant>) {assistant} S(eot) S(<user>) ...
             LIME-1B's `[context] <user> instruction <assistant> response <eos>`. We make <user> and <assistant>
             special tokens (padding slots), not text: the turn boundary is then one unambiguous id that no user text
             can forge, and the model cannot confuse "<user>" written in a document with a turn change.
  parchment  S(eot) "system\\n{system}" S(eot) "\\nuser\\n{user}[\\n\\n{context}]" S(eot) "\\nassistant\\n" {assistant}
             S(eot) "\\nuser\\n" ...
             ParchmentLM's template: end-of-text both separates turns and stops generation. The system prompt
             defaults to ParchmentLM's "You are a helpful assistant.", a context is appended to the user text as
             its sft_train.py did with Dolly's context. The pad token is distinct from end-of-text: cl100k_base's
             <|endofprompt|> (as ParchmentLM), or the padding slot <|pad|> for tokenizers without it (gpt2).
  chatml     S(eot) S(<|im_start|>) "system\\n{system}" S(<|im_end|>) "\\n" S(<|im_start|>) "user\\n{user}"
             S(<|im_end|>) "\\n" S(<|im_start|>) "assistant\\n" {assistant} S(<|im_end|>) "\\n" ...
             A context is a message of its own with the role "context".
  none       S(eot) [{system}\\n\\n][{context}\\n\\n]{user}{assistant} S(eot): plain text completion, no template. The
             only format whose contents are not stripped of surrounding whitespace (" Paris" continues "The
             capital of France is"); elsewhere stripping keeps a dataset's stray trailing newline from teaching the
             model to print one before it stops.

Special tokens. A string the tokenizer already knows as special keeps its id (<|endoftext|>, cl100k_base's
<|endofprompt|>). Any other lives in the model's vocabulary padding (model.py pads the embedding to a multiple of
64/128 rows): EXTRA_TOKENS[i] gets id n_vocab + i, for every format alike, so one string always has one id.
With gpt2 (n_vocab 50257, padded to 50304): <|pad|> 50257, <|im_start|> 50258, <|im_end|> 50259, <user> 50260,
<assistant> 50261. Text in messages is encoded with encode_ordinary: "<|im_end|>" typed by a user is plain text.
"""
import codecs

import torch

FORMATS = ("alpaca", "lime", "parchment", "chatml", "none")
ROLES = ("system", "context", "user", "assistant")
EOT = "<|endoftext|>"
EXTRA_TOKENS = ("<|pad|>", "<|im_start|>", "<|im_end|>", "<user>", "<assistant>")  # id = n_vocab + index

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.")
PARCHMENT_SYSTEM = "You are a helpful assistant."


def special_token_id(text, enc):
    """The id of a special token: the tokenizer's own if it has one, else its padding slot n_vocab + i."""
    if text in enc.special_tokens_set:
        return enc.encode_single_token(text)
    return enc.n_vocab + EXTRA_TOKENS.index(text)


class ChatFormat:
    """A format bound to a tokenizer: its special ids, the renderer, the decoder.

    Attributes: name, enc, ids (role -> id: 'bos', 'end', 'pad', and the format's tags), stop_ids (generation
    stops at any of these), specials (id -> string, for decoding), vocab_size (the smallest vocabulary holding
    every id a rendering can contain, padding aside: what prepare_sft.py writes into the shard header)."""

    def __init__(self, name, enc):
        if name not in FORMATS:
            raise ValueError(f"unknown chat format '{name}': expected one of {', '.join(FORMATS)}")
        self.name, self.enc = name, enc
        eot = enc.eot_token
        pad = "<|endofprompt|>" if "<|endofprompt|>" in enc.special_tokens_set else "<|pad|>"
        self.ids = {"bos": eot, "end": eot, "pad": special_token_id(pad, enc)}
        if name == "lime":
            self.ids["user"] = special_token_id("<user>", enc)
            self.ids["assistant"] = special_token_id("<assistant>", enc)
        if name == "chatml":
            self.ids["im_start"] = special_token_id("<|im_start|>", enc)
            self.ids["end"] = special_token_id("<|im_end|>", enc)
        # generation stops at the end token, at end-of-text (a pretraining habit), and at any tag that would open
        # a new turn: whatever the model writes after it is not this answer any more
        self.stop_ids = sorted({self.ids["end"], eot, self.ids.get("user", eot), self.ids.get("im_start", eot)})
        self.specials = {enc.encode_single_token(t): t for t in enc.special_tokens_set}
        for t in EXTRA_TOKENS:
            if special_token_id(t, enc) in self.ids.values():
                self.specials[special_token_id(t, enc)] = t
        # padding is only written by prepare_sft.py's --layout pad, which widens this itself
        self.vocab_size = max(enc.n_vocab, 1 + max(i for role, i in self.ids.items() if role != "pad"))

    # ---- checks --------------------------------------------------------------------------------------------
    def check_model(self, vocab_size, padded_vocab_size, where="the checkpoint"):
        """Raise a clear ValueError unless a model with this vocabulary can run this format with this tokenizer."""
        if self.enc.n_vocab > vocab_size:
            raise ValueError(f"tokenizer mismatch: '{self.enc.name}' has {self.enc.n_vocab} tokens but {where} "
                             f"has a vocabulary of {vocab_size}")
        if self.vocab_size > padded_vocab_size:
            need = {t: i for i, t in self.specials.items() if i >= padded_vocab_size and i != self.ids["pad"]}
            raise ValueError(f"{where}'s vocabulary ({padded_vocab_size} rows) cannot hold the special tokens of "
                             f"format '{self.name}' {need}: pretrain with vocab_pad_multiple >= 64, or use a format "
                             f"without extra tokens (alpaca, none)")

    def allowed_mask(self, padded_vocab_size, device=None):
        """Bool (V,) of ids generation may produce: the tokenizer's ordinary tokens and this format's own specials
        except padding. The other padding rows were never trained as outputs, so they are masked."""
        allowed = torch.zeros(padded_vocab_size, dtype=torch.bool, device=device)
        allowed[:self.enc.n_vocab] = True
        for i in self.specials:  # the tokenizer's own specials (fill-in-the-middle, ...) are not ours to produce
            if i < padded_vocab_size:
                allowed[i] = False
        for role, i in self.ids.items():
            if role != "pad" and i < padded_vocab_size:
                allowed[i] = True
        return allowed

    # ---- rendering -----------------------------------------------------------------------------------------
    def _turns(self, messages, open_assistant):
        """Validate the message list; return (system or None, [(context or None, user, assistant or None)])."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("a conversation is a non-empty list of {'role', 'content'} messages")
        system, turns, context, expect_user = None, [], None, True
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r:.80}")
            role = m["role"]
            text = m["content"] if self.name == "none" else m["content"].strip()
            if role == "system":
                if i != 0:
                    raise ValueError(f"message {i}: a system message may only come first")
                system = text
            elif role == "context":
                if not expect_user or context is not None:
                    raise ValueError(f"message {i}: a context must come right before a user message")
                context = text
            elif role == "user":
                if not expect_user:
                    raise ValueError(f"message {i}: two user messages in a row (user and assistant alternate)")
                turns.append([context, text, None])
                context, expect_user = None, False
            else:
                if expect_user:
                    raise ValueError(f"message {i}: an assistant message must follow a user message")
                turns[-1][2] = text
                expect_user = True
        if context is not None or not turns:
            raise ValueError("the conversation must contain a user message, after any context")
        if open_assistant and turns[-1][2] is not None:
            raise ValueError("open_assistant=True: the conversation must end with a user message")
        if not open_assistant and turns[-1][2] is None:
            raise ValueError("the conversation must end with an assistant message (or pass open_assistant=True)")
        return system, turns

    def _segments(self, system, turns):
        """The conversation as pieces (text or one special id, trained?). Each user turn ends with the header
        that opens the assistant's answer, so leaving the last answer out gives chat.py its prompt."""
        ids, P, A = self.ids, False, True  # P: prompt (not trained), A: assistant (trained)
        seg = [(ids["bos"], P)]
        if self.name == "alpaca":
            has_input = turns[0][0] is not None
            preamble = system if system is not None else (ALPACA_PREAMBLE_INPUT if has_input else ALPACA_PREAMBLE)
            seg.append((preamble + "\n\n", P))
        elif self.name == "lime" and system:
            seg.append((system + "\n", P))
        elif self.name == "parchment":
            seg += [("system\n" + (PARCHMENT_SYSTEM if system is None else system), P), (ids["end"], P)]
        elif self.name == "chatml" and system is not None:
            seg += [(ids["im_start"], P), ("system\n" + system, P), (ids["end"], P)]
        elif self.name == "none" and system:
            seg.append((system + "\n\n", P))
        for context, user, answer in turns:
            # parchment and chatml put a newline after an end token when another turn follows it
            nl = "\n" if len(seg) > 1 and self.name in ("parchment", "chatml") else ""
            if self.name == "alpaca":
                block = f"### Input:\n{context}\n\n" if context is not None else ""
                seg.append((f"### Instruction:\n{user}\n\n{block}### Response:\n", P))
            elif self.name == "lime":
                seg += [(context + "\n", P)] if context else []
                seg += [(ids["user"], P), (user, P), (ids["assistant"], P)]
            elif self.name == "parchment":
                user = user + "\n\n" + context if context else user
                seg += [(nl + "user\n" + user, P), (ids["end"], P), ("\nassistant\n", P)]
            elif self.name == "chatml":
                if context is not None:
                    seg += [(nl, P), (ids["im_start"], P), ("context\n" + context, P), (ids["end"], P)]
                    nl = "\n"
                seg += [(nl, P), (ids["im_start"], P), ("user\n" + user, P), (ids["end"], P), ("\n", P),
                        (ids["im_start"], P), ("assistant\n", P)]
            else:  # none
                seg.append(((context + "\n\n" if context else "") + user, P))
            if answer is not None:
                seg += [(answer, A), (ids["end"], A)]
        return seg

    def render(self, messages, open_assistant=False):
        """messages -> (ids, mask), two lists of ints of equal length. See the module docstring."""
        system, turns = self._turns(messages, open_assistant)
        ids, mask, prompt = [], [], ""

        def flush():  # consecutive prompt text is encoded as one string: the natural BPE of the template
            nonlocal prompt
            toks = self.enc.encode_ordinary(prompt)
            ids.extend(toks)
            mask.extend([0] * len(toks))
            prompt = ""
        for piece, trained in self._segments(system, turns):
            if isinstance(piece, str) and not trained:
                prompt += piece
                continue
            flush()
            toks = [piece] if isinstance(piece, int) else self.enc.encode_ordinary(piece)
            ids.extend(toks)
            mask.extend([int(trained)] * len(toks))
        flush()
        return ids, mask

    # ---- decoding ------------------------------------------------------------------------------------------
    def token_bytes(self, i):
        """The bytes one id stands for. Specials render as their strings; an id outside the tokenizer and this
        format (a padding row, a hole in cl100k_base's numbering) as <|id:N|>."""
        if i in self.specials:
            return self.specials[i].encode()
        try:
            return self.enc.decode_single_token_bytes(i)
        except KeyError:
            return f"<|id:{i}|>".encode()

    def decode(self, ids):
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        return StreamDecoder(self)


class StreamDecoder:
    """Text as tokens arrive. One character may span tokens (byte-level BPE splits "é" or "🙂" into pieces that
    are not valid UTF-8 alone), so bytes go through an incremental UTF-8 decoder that holds back an incomplete
    character until the token that completes it arrives: push() never prints half a character."""

    def __init__(self, fmt):
        self.fmt = fmt
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self._utf8.decode(self.fmt.token_bytes(int(token_id)))

    def flush(self):
        return self._utf8.decode(b"", final=True)


def render(messages, fmt, enc, open_assistant=False):
    """render(messages, 'alpaca' | 'lime' | 'parchment' | 'chatml' | 'none', tiktoken encoding) -> (ids, mask)."""
    return ChatFormat(fmt, enc).render(messages, open_assistant)
