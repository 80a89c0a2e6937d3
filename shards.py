"""
shards.py — the on-disk token format, shared by every script that writes or reads tokens.

A shard is the llm.c / modded-nanogpt layout, so their tools read ours and ours read theirs:

    header: 256 int32 = 1024 bytes
        [0] magic 20240520
        [1] version: 1 = tokens are uint16 (llm.c's own), 2 = tokens are uint32 (vocabularies over 65535)
        [2] number of tokens
        [3] tokenizer vocabulary size (0 = unknown: an llm.c file)     [4] end-of-text id (or 0)
    body: the tokens, little-endian, nothing else.

A dataset is a folder: {val,train}_000000.bin, train_000001.bin, ... (shard 0 is validation). Supervised
fine-tuning adds a parallel `<same name>.mask.bin` of uint8, 1 where a token is trained on, and may add
`<same name>.docs.bin`: int64 offsets where each document (conversation) starts, for training that keeps packed
documents apart (train.py's doc_mask; without the file, documents start at each end-of-text token).
Readers memory-map the body, so a 10-billion-token dataset costs no RAM until its pages are touched.
TokenWindows, at the bottom, is how train.py reads a dataset: fixed windows, shuffled by a seeded permutation.
"""
import glob
import json
import os

import numpy as np
import torch

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DTYPES = {1: np.uint16, 2: np.uint32}


class ShardError(ValueError):
    pass


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shard(path, tokens, vocab_size, eot=0, mask=None, doc_starts=None):
    """Write tokens (any int array) as a shard, atomically (a temporary file, then rename); with its mask
    (uint8 per token) and document start offsets (sorted ints in [0, n_tokens)) if given."""
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ShardError(f"{path}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    # every check before the first byte is written: a refused shard leaves nothing half-made behind
    if mask is not None:
        mask = np.asarray(mask, dtype=np.uint8)
        if mask.shape != tokens.shape:
            raise ShardError(f"{path}: mask has {mask.size} entries for {tokens.size} tokens")
    if doc_starts is not None:
        doc_starts = np.asarray(doc_starts, dtype=np.int64)
        if doc_starts.size and (np.any(np.diff(doc_starts) <= 0) or doc_starts[0] < 0
                                or doc_starts[-1] >= tokens.size):
            raise ShardError(f"{path}: document starts must be increasing offsets in [0, {tokens.size})")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:5] = [MAGIC, 1 if dtype == np.uint16 else 2, tokens.size, vocab_size, eot]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())
    os.replace(tmp, path)
    if mask is not None:
        with open(mask_path(path) + ".tmp", "wb") as f:
            f.write(mask.tobytes())
        os.replace(mask_path(path) + ".tmp", mask_path(path))
    if doc_starts is not None:
        with open(docs_path(path) + ".tmp", "wb") as f:
            f.write(doc_starts.tobytes())
        os.replace(docs_path(path) + ".tmp", docs_path(path))


def mask_path(path):
    return path[:-len(".bin")] + ".mask.bin"


def docs_path(path):
    return path[:-len(".bin")] + ".docs.bin"


def read_header(path):
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no such shard")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic number {header[0]} (expected {MAGIC}): not a token shard")
    if header[1] not in DTYPES:
        raise ShardError(f"{path}: unsupported version {header[1]} (expected 1 = uint16 or 2 = uint32)")
    dtype, n = DTYPES[int(header[1])], int(header[2])
    expected = HEADER_BYTES + n * np.dtype(dtype).itemsize
    if size != expected:
        raise ShardError(f"{path}: truncated or padded: header promises {n} tokens ({expected} bytes), "
                         f"file has {size} bytes")
    return {"dtype": dtype, "n_tokens": n, "vocab_size": int(header[3]), "eot": int(header[4])}


def open_shard(path, vocab_size=None, check_ids=True):
    """Memory-map a shard's tokens (and mask, if present), validating the header and, once, the token ids."""
    info = read_header(path)
    tokens = np.memmap(path, dtype=info["dtype"], mode="r", offset=HEADER_BYTES, shape=(info["n_tokens"],))
    if vocab_size is not None and check_ids and info["n_tokens"]:
        # one pass in 64M-token chunks: cheap next to training on it, and it catches a shard made with another
        # tokenizer before it silently indexes past the embedding table
        top = max(int(tokens[i:i + 2**26].max()) for i in range(0, info["n_tokens"], 2**26))
        if top >= vocab_size:
            raise ShardError(f"{path}: token id {top} >= the model's vocabulary size {vocab_size} "
                             f"(was it prepared with another tokenizer?)")
    mask = None
    if os.path.exists(mask_path(path)):
        mask = np.memmap(mask_path(path), dtype=np.uint8, mode="r")
        if mask.size != info["n_tokens"]:
            raise ShardError(f"{mask_path(path)}: {mask.size} mask entries for {info['n_tokens']} tokens")
    info["doc_starts"] = None
    if os.path.exists(docs_path(path)):
        starts = np.fromfile(docs_path(path), dtype=np.int64)
        if starts.size and (np.any(np.diff(starts) <= 0) or starts[0] < 0 or starts[-1] >= info["n_tokens"]):
            raise ShardError(f"{docs_path(path)}: not increasing offsets in [0, {info['n_tokens']})")
        info["doc_starts"] = starts
    return tokens, mask, info


def list_shards(data_dir, split):
    if not os.path.isdir(data_dir):
        raise ShardError(f"data folder not found: {data_dir} (run prepare_fineweb.py or prepare_sft.py first)")
    paths = sorted(p for p in glob.glob(os.path.join(data_dir, f"{split}_*.bin"))
                   if not p.endswith((".mask.bin", ".docs.bin")))
    if not paths:
        raise ShardError(f"{data_dir}: no {split}_*.bin shards")
    return paths


def read_meta(data_dir):
    """The data folder's meta.json: written last by prepare_fineweb.py / prepare_sft.py, so it also says the
    folder is complete (a crash mid-prepare leaves shards and no meta.json)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data folder not found: {data_dir} (make it with prepare_fineweb.py)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the folder is incomplete (prepare_fineweb.py / prepare_sft.py "
                                f"write it last; an interrupted prepare leaves none): run the prepare step again")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(f"{path}: not valid JSON ({e}): run the prepare step again") from None
    need = {"tokenizer": str, "vocab_size": int, "eot": int}  # what every reader of a data folder relies on
    wrong = [k for k, kind in need.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if wrong:
        raise ShardError(f"{path}: {', '.join(wrong)} missing or of the wrong type (expected a JSON object with "
                         f"tokenizer: a string, vocab_size and eot: integers, as prepare_*.py write it)")
    return meta


def check_headers(data_dir, meta, block_size):
    """Every shard's header against meta.json (shards of two runs mixed are refused), and each split holds at
    least one window of block_size. Returns the number of training windows of block_size (n_windows below)."""
    windows, tokens = {"val": 0, "train": 0}, {"val": [], "train": []}
    for split in windows:
        for path in list_shards(data_dir, split):
            head = read_header(path)
            if head["vocab_size"] and (head["vocab_size"], head["eot"]) != (meta["vocab_size"], meta["eot"]):
                raise ShardError(f"{path}: header says vocabulary {head['vocab_size']} / end-of-text "
                                 f"{head['eot']}, meta.json says {meta['vocab_size']} / {meta['eot']}: shards from "
                                 f"different runs")
            windows[split] += n_windows(head["n_tokens"], block_size)
            tokens[split].append(head["n_tokens"])
        if not windows[split]:
            raise too_small(data_dir, split, tokens[split], block_size)
    return windows["train"]


def too_small(data_dir, split, shard_tokens, block_size):
    """The error for a split with no whole window: each needs block_size + 1 tokens of one shard."""
    return ShardError(f"{data_dir}: the {split} split ({sum(shard_tokens):,} tokens in {len(shard_tokens)} shard(s)) "
                      f"holds no window of block_size + 1 = {block_size + 1} tokens: use more data or a smaller "
                      f"block_size")


# ---- reading them for training ------------------------------------------------------------------------------
# Data: fixed windows of block_size + 1 tokens, shuffled once per epoch by a seeded permutation. Sample number g
# of the run is window perm_epoch[g % n] of epoch g // n, so the data is a pure function of (seed, g): resuming
# at step s, or splitting a step over ranks, reads exactly the windows an uninterrupted single process would.
def n_windows(n_tokens, block_size):
    """Training windows in a shard of n_tokens: block_size inputs + the next token as the last target."""
    return max(0, n_tokens - 1) // block_size


class TokenWindows:
    """A split of a dataset as fixed windows, read by sample number: batch(first, count) returns samples
    first .. first+count-1, whatever came before, so the data order is one formula (train.first_sample).

    Why it is written for speed: a GPU step of a 130M model takes ~30 ms, and the host must have the next batch
    on the device before then, every micro-step, while it also launches the step's kernels. So a batch is one
    vectorised gather per shard (no Python loop over windows), written into page-locked (pinned) host buffers that
    are allocated once and reused round-robin, and sent with an asynchronous copy that the GPU runs in stream
    order, before the kernels that read it. A buffer is refilled only after the copy that last read it has
    finished (a CUDA event per buffer), so a copy in flight never sees its source change."""

    RING = 4  # pinned buffers per batch shape: the host may run this many batches ahead of the GPU

    def __init__(self, data_dir, split, block_size, vocab_size, seed, shuffle):
        self.shards = [open_shard(p, vocab_size) for p in list_shards(data_dir, split)]
        self.first = np.cumsum([0] + [n_windows(info["n_tokens"], block_size) for _, _, info in self.shards])  # starts
        self.n, self.block_size, self.seed, self.shuffle = int(self.first[-1]), block_size, seed, shuffle
        if self.n == 0:
            raise too_small(data_dir, split, [info["n_tokens"] for _, _, info in self.shards], block_size)
        self._perm_epoch = self._perm = None
        self._rings = {}  # (count, with doc starts) -> [pinned buffers, their copy events, next slot]

    def window_index(self, g):
        epoch, i = divmod(g, self.n)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen).numpy(), epoch
        return int(self._perm[i])

    def windows(self, first_sample, count):
        """Window numbers of samples first_sample .. first_sample+count-1 (an epoch boundary may fall inside)."""
        return np.array([self.window_index(g) for g in range(first_sample, first_sample + count)], dtype=np.int64)

    def batch(self, first_sample, count, device, doc_starts=False):
        """Samples first_sample .. first_sample+count-1 as (x, y, starts), y = x shifted by one. Where the shard
        has a mask (SFT), targets on untrained positions are -1, which the loss ignores. starts (with doc_starts,
        else None): a bool (B, T) tensor, True where a document begins in x: from the shard's .docs.bin
        (prepare_sft.py), else at each end-of-text token (prepare_fineweb.py starts every document with one)."""
        T, w = self.block_size, self.windows(first_sample, count)
        shard_of = np.searchsorted(self.first, w, side="right") - 1
        offset = (w - self.first[shard_of]) * T  # first token of each window in its shard
        host = self._host_buffers(count, doc_starts, device)
        x, y = host[0].numpy(), host[1].numpy()
        span = np.arange(T + 1)
        for s in np.unique(shard_of):  # one gather per shard the batch touches (usually one)
            rows = np.nonzero(shard_of == s)[0]
            tokens, mask, info = self.shards[s]
            idx = offset[rows, None] + span  # (rows, T + 1) token positions
            chunk = tokens[idx]
            x[rows], y[rows] = chunk[:, :-1], chunk[:, 1:]  # y_t = x_{t+1}: predict the next token everywhere
            if mask is not None:  # SFT: untrained targets become -1
                y[rows] = np.where(mask[idx[:, 1:]] == 0, -1, y[rows])
            if doc_starts:
                host[2].numpy()[rows] = self._doc_starts(x[rows], offset[rows], info)
        return self._to_device(host, count, doc_starts, device) + ((None,) if not doc_starts else ())

    def _doc_starts(self, x, offsets, info):
        """(rows, T) bool: True where a document begins in each window."""
        if info["doc_starts"] is None:
            return x == info["eot"]
        flags = np.zeros(x.shape, dtype=bool)
        for r, start in enumerate(offsets):
            lo, hi = np.searchsorted(info["doc_starts"], [start, start + self.block_size])
            flags[r, info["doc_starts"][lo:hi] - start] = True
        return flags

    def _host_buffers(self, count, doc_starts, device):
        """Host tensors to fill: fresh ones for a CPU run (the caller keeps them), else the ring's next pinned set,
        once the copy that last read it is done."""
        shapes = [(count, self.block_size, torch.int64)] * 2 + ([(count, self.block_size, torch.bool)] if doc_starts else [])
        if device.type != "cuda":
            return [torch.empty(s[:2], dtype=s[2]) for s in shapes]
        key = (count, doc_starts)
        if key not in self._rings:
            self._rings[key] = [[[torch.empty(s[:2], dtype=s[2]).pin_memory() for s in shapes]
                                 for _ in range(self.RING)], [None] * self.RING, 0]
        buffers, events, slot = self._rings[key]
        if events[slot] is not None:
            events[slot].synchronize()  # only waits if the host is RING batches ahead of the GPU
        return buffers[slot]

    def _to_device(self, host, count, doc_starts, device):
        if device.type != "cuda":
            return tuple(host)
        ring = self._rings[(count, doc_starts)]
        out = tuple(t.to(device, non_blocking=True) for t in host)
        ring[1][ring[2]] = torch.cuda.Event()
        ring[1][ring[2]].record()  # after the copies on the current stream
        ring[2] = (ring[2] + 1) % self.RING
        return out
