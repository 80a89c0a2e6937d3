"""
tokenizer.py — the one way every nanoforge script gets a tokenizer: `get_encoding(spec)`.

    enc = get_encoding("gpt2")                          # a tiktoken name (gpt2 ships with the repo: works offline)
    enc = get_encoding("cl100k_base")                   # other tiktoken names: tiktoken's cache or its download
    enc = get_encoding("data/tokenizers/lille32k.json") # our own BPE, written by prepare_tokenizer.py
    enc = get_encoding("hf_model/tokenizer.json")       # a Hugging Face tokenizer (via the `tokenizers` library)
    ids = enc.encode_ordinary("The cell membrane is")   # text -> ids ("<|endoftext|>" in text stays plain text)
    enc.decode(ids), enc.n_vocab, enc.eot_token, enc.decode_single_token_bytes(ids[0]), enc.special_tokens_set

Whatever the spec, the object answers tiktoken's interface (the subset nanoforge uses), so prepare_fineweb.py,
prepare_sft.py, chat_format.py, train.py (bits per byte) and eval.py never ask what kind of tokenizer they hold.
The spec string itself is what a data folder's meta.json and a checkpoint's config record; a later script calls
get_encoding with it again and gets the same tokenizer.

Why gpt2 is special: a fresh clone with no network and no ../shared must still tokenize the quick start's sample,
so GPT-2's BPE ranks ship in assets/gpt2.tiktoken (835 KB, the file openai-whisper distributes under MIT; its
sha256 is the one tiktoken itself checks for these ranks). "gpt2" is built from that file every time, so it is
the same tokenizer with or without network, and identical, id for id, to `tiktoken.get_encoding("gpt2")`
(tests/test_tokenizer.py compares them where tiktoken's cache is available).

Our own tokenizer file (prepare_tokenizer.py writes it) is a small JSON document holding exactly what a
`tiktoken.Encoding` is made of:

    {"format": "nanoforge-bpe", "name": ..., "pat_str": <the split regex>,
     "mergeable_ranks": [<base64 of token 0's bytes>, <token 1's>, ...],   # rank = position = token id
     "special_tokens": {"<|endoftext|>": 32762, ...}, "eot": "<|endoftext|>"}

so loading it is four lines of tiktoken (see `load_nanoforge`): tiktoken, not a Python BPE, does the encoding.
"""
import base64
import functools
import json
import os

from device import shared_dir

ROOT = os.path.dirname(os.path.abspath(__file__))
GPT2_RANKS = os.path.join(ROOT, "assets", "gpt2.tiktoken")
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # what tiktoken checks for r50k
# tiktoken's cache folder in the offline data beside the checkout (used only when TIKTOKEN_CACHE_DIR is unset)
SHARED_CACHE = shared_dir("tokenizers", "tiktoken_cache")
# the names an end-of-text token goes by in the tokenizers we meet (GPT-2/4, Llama 3, SentencePiece models)
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|eot_id|>", "<eos>", "<|im_end|>")


@functools.lru_cache(maxsize=None)
def get_encoding(spec):
    """spec -> a tokenizer with tiktoken's interface. One ValueError/RuntimeError line for a spec that cannot be
    loaded, naming it and what would work. Cached: a script may ask for the same tokenizer many times."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer must be a tiktoken name or a file path, got {spec!r}")
    # the order matters: "gpt2" is ours (offline) before tiktoken's; a file that exists wins over a name
    if spec == "gpt2":
        return load_gpt2()
    if os.path.isfile(spec):
        return load_file(spec)
    if not os.path.isabs(spec) and os.path.isfile(os.path.join(ROOT, spec)):
        return load_file(os.path.join(ROOT, spec))  # a repository file (assets/...) from any working directory
    import tiktoken
    # a name tiktoken knows (cl100k_base, o200k_base, ...): its own loader, from its cache or the network
    if spec in tiktoken.list_encoding_names():
        return load_tiktoken_name(spec)
    looks_like_path = os.sep in spec or spec.endswith((".json", ".tiktoken"))
    raise ValueError(f"unknown tokenizer '{spec}': " + (
        "no such file" if looks_like_path else
        f"not a file and not a tiktoken name ({', '.join(tiktoken.list_encoding_names())}); a tokenizer file "
        "is one written by prepare_tokenizer.py or a Hugging Face tokenizer.json"))


def content_hash(spec):
    """sha256 of what the tokenizer *is*, not what it is called: a path can be retrained in place and a name
    can point elsewhere on another machine. For a tiktoken encoding (gpt2, cl100k_base, our BPE files): its split
    pattern, its byte sequences in rank order and its special tokens; for a Hugging Face tokenizer.json, the file.
    prepare_*.py record it in meta.json, train.py in the checkpoint; check_same() compares them later."""
    import hashlib
    enc = get_encoding(spec)
    if isinstance(enc, HFEncoding):
        with open(enc.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    h = hashlib.sha256(enc._pat_str.encode())
    for token in sorted(enc._mergeable_ranks, key=enc._mergeable_ranks.get):
        h.update(len(token).to_bytes(2, "little") + token)
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    return h.hexdigest()


def check_same(spec, recorded, where, now=None):
    """The tokenizer `spec` must still be the one `where` recorded (its content_hash, `recorded`); a record made
    before hashes were kept (None) is taken on trust. now: the hash to compare with (default: spec's today)."""
    if not recorded:
        return
    now = now or content_hash(spec)
    if recorded != now:
        raise ValueError(f"tokenizer '{spec}' has changed: {where} recorded sha256 {recorded[:12]}..., the tokenizer "
                         f"is {now[:12]}... now (retrained or replaced?); its ids would decode to other text: "
                         f"restore the original file, or prepare the data (and train) again with this one")


def load_gpt2():
    """GPT-2's tokenizer from the ranks shipped in assets/ (exactly tiktoken's "gpt2": same ranks, split pattern,
    end-of-text id 50256, n_vocab 50257)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    if not os.path.isfile(GPT2_RANKS):
        raise RuntimeError(f"{GPT2_RANKS} is missing: it ships with the repository (restore it with git checkout)")
    # The .tiktoken format: one line per token, "<base64 of its bytes> <rank>"; rank = id = merge priority.
    ranks = load_tiktoken_bpe(GPT2_RANKS, expected_hash=GPT2_SHA256)  # a damaged file is refused, not used
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def load_tiktoken_name(name):
    """cl100k_base, o200k_base, ...: tiktoken's own loader. Offline it needs its cache: TIKTOKEN_CACHE_DIR, or
    the folder in ../shared when that exists."""
    import tiktoken
    if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(SHARED_CACHE):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(SHARED_CACHE)
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # no network and no cached file
        raise RuntimeError(f"cannot load tokenizer '{name}' ({type(e).__name__}: {str(e)[:200]}); offline, set "
                           f"TIKTOKEN_CACHE_DIR to a folder holding its file (e.g. "
                           f"../shared/data/tokenizers/tiktoken_cache), or use gpt2, which ships with nanoforge") \
            from None


def load_file(path):
    """A tokenizer file: ours (prepare_tokenizer.py) or a Hugging Face tokenizer.json, told apart by content."""
    # Both kinds are JSON; what is inside tells them apart: ours says "format": "nanoforge-bpe", a Hugging Face
    # file has "model" (the BPE/Unigram/WordPiece tables) and "added_tokens" (the special tokens with their ids).
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer file {path}: not JSON ({e}); expected prepare_tokenizer.py's output or a "
                         f"Hugging Face tokenizer.json") from None
    if isinstance(obj, dict) and obj.get("format") == "nanoforge-bpe":
        return load_nanoforge(obj, path)
    if isinstance(obj, dict) and "model" in obj and "added_tokens" in obj:
        return HFEncoding(path)
    raise ValueError(f"tokenizer file {path}: neither prepare_tokenizer.py's format (\"format\": \"nanoforge-bpe\") "
                     f"nor a Hugging Face tokenizer.json (keys \"model\" and \"added_tokens\")")


def load_nanoforge(obj, path):
    """prepare_tokenizer.py's JSON -> a real tiktoken.Encoding (the four lines the docstring promises)."""
    import tiktoken
    # tiktoken.Encoding is all a BPE needs: the split regex, {token bytes: rank}, and the special tokens (which
    # are matched as whole strings before the regex, and only when encode() is told they are allowed)
    try:
        ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(obj["mergeable_ranks"])}
        enc = tiktoken.Encoding(obj["name"], pat_str=obj["pat_str"], mergeable_ranks=ranks,
                                special_tokens=obj["special_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"tokenizer file {path}: damaged ({type(e).__name__}: {e})") from None
    if obj.get("eot", "<|endoftext|>") != "<|endoftext|>":
        raise ValueError(f"tokenizer file {path}: its end-of-text token must be <|endoftext|> (tiktoken's eot_token)")
    return enc


def bytes_to_unicode():
    """GPT-2's byte <-> printable-character table: byte-level BPE libraries (Hugging Face `tokenizers` among them)
    store each byte as one visible character, e.g. the space 0x20 as 'Ġ'. Printable Latin-1 bytes stand for
    themselves; the other 68 are shifted to 256 + n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


class HFEncoding:
    """A Hugging Face tokenizer.json behind tiktoken's interface. Special-token strings inside text are plain text
    unless `allowed_special` names them, as in tiktoken. decode_single_token_bytes undoes the byte-level
    alphabet (GPT-2 style, 'Ġ' = space) or SentencePiece's ('▁' = space, '<0x0A>' = one byte)."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        self.path = self.name = path
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust library's own error type: a damaged or unsupported file
            raise ValueError(f"tokenizer file {path}: damaged or unsupported ({str(e)[:160]})") from None
        self.tok.encode_special_tokens = True  # encode_ordinary: "<|endoftext|>" in a document is just text
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        self.specials = {t["content"]: t["id"] for t in spec["added_tokens"] if t.get("special")}
        self.special_tokens_set = set(self.specials)
        self.n_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        eot = next((t for t in EOT_NAMES if t in self.specials), None)
        if eot is None:
            raise ValueError(f"tokenizer file {path}: no end-of-text token among its special tokens "
                             f"{sorted(self.specials)[:8]} (looked for {', '.join(EOT_NAMES)})")
        self.eot_token = self.specials[eot]
        # how a vocabulary entry maps back to bytes: byte-level BPE (GPT-2, Llama 3, ours) spells every byte as one
        # printable character; SentencePiece-style models (Llama 2, T5) spell a space as '▁' and rare bytes as
        # '<0xNN>'. The decoder named in the file says which convention it uses.
        self.byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        self.unbyte = {c: b for b, c in bytes_to_unicode().items()}

    def encode_ordinary(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, text, allowed_special=(), disallowed_special="all"):
        """tiktoken's rules: an allowed special string becomes its id; a disallowed one found in text is an error.
        The text is cut at each allowed special string (earliest first), the pieces between are encoded as plain
        text, and the special ids go between them."""
        allowed = self.special_tokens_set if allowed_special == "all" else set(allowed_special)
        disallowed = self.special_tokens_set - allowed if disallowed_special == "all" else set(disallowed_special)
        for s in disallowed:
            if s in text:
                raise ValueError(f"text contains the special token {s!r}: pass allowed_special to encode it as "
                                 f"one, or use encode_ordinary to encode it as text")
        ids, rest = [], text
        while rest:
            hits = [(rest.find(s), s) for s in allowed if s in rest]
            if not hits:
                break
            at, s = min(hits)
            ids += self.encode_ordinary(rest[:at]) + [self.specials[s]]
            rest = rest[at + len(s):]
        return ids + (self.encode_ordinary(rest) if rest else [])

    def encode_single_token(self, text):
        if text in self.specials:
            return self.specials[text]
        i = self.tok.token_to_id(text)
        if i is None:
            raise KeyError(f"{text!r} is not a single token of {self.path}")
        return i

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_single_token_bytes(self, i):
        piece = self.tok.id_to_token(int(i))
        if piece is None:
            raise KeyError(f"token id {i} is outside {self.path}'s vocabulary of {self.n_vocab}")
        if piece in self.specials:
            return piece.encode("utf-8")
        if self.byte_level:
            return bytes(self.unbyte[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")
