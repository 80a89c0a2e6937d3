"""
model.py — one decoder-only transformer that expresses every nanoforge recipe.

    tokens ─► embedding (+ sinusoidal or learned positions) ─► n_layer × Block ─► RMSNorm ─► lm_head ─► logits
    Block:  x = x + Attention(RMSNorm(x))        causal, grouped-query, RoPE on q and k
            x = x + MLP(RMSNorm(x))               SwiGLU: W2(silu(Wg x) * Wu x)   or plain: W2(silu(W1 x))

The knobs (GPTConfig) are exactly what differs between the seeds:
  * n_head query heads share n_kv_head key/value heads (GQA): with n_kv_head = 2 and n_head = 10, each K/V head
    serves 5 query heads, so the KV cache is 5x smaller. n_kv_head = n_head is classic multi-head attention.
  * head_dim need not be n_embd / n_head (lrc_1p5b: d = 1536 but 24 heads of 128 = 3072 query dims).
  * positions by RoPE (rotating q and k; relative by construction), fixed sinusoids, or a learned table.
  * tied embeddings share one (vocab, d) matrix between input embedding and output head.
  * the vocabulary may be padded up to a multiple of 64/128: matmuls with "round" shapes run faster, and the
    spare rows host chat special tokens later. Padding rows are not counted as the seed's parameters.

The heavy operations go through kernels/ (RMSNorm, RoPE, SwiGLU, attention): Triton on a GPU, a PyTorch twin
elsewhere, one switch in kernels/__init__.py. This file never needs to know which one runs.

`python model.py config/lille_130m.py` prints the architecture, the exact parameter count and the FLOPs per
token without allocating any weights (the model is built on PyTorch's "meta" device).
"""
import math
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels.attention import attention
from kernels.cross_entropy import linear_cross_entropy
from kernels.rmsnorm import rmsnorm
from kernels.rope import apply_rope, rope_tables
from kernels.swiglu import swiglu_packed


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int = 12             # = n_head: multi-head; < n_head: grouped-query; 1: multi-query
    head_dim: int = 0               # 0 means n_embd // n_head
    ffn_hidden: int = 2048          # hidden width F of the MLP (SwiGLU: gate and up are both F wide)
    mlp: str = "swiglu"             # 'swiglu' (gated) | 'silu' (plain W2 silu(W1 x))
    pos: str = "rope"               # 'rope' | 'sinusoidal' | 'learned'
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    vocab_size: int = 50257         # the tokenizer's vocabulary
    vocab_pad_multiple: int = 64    # the embedding has ceil(vocab_size / this) * this rows; 1 = no padding
    block_size: int = 1024          # the longest context the model is trained for
    norm_eps: float = 1e-5
    # the smallest value each size may take (head_dim 0 = n_embd // n_head); checked in __post_init__
    LOWEST = {"n_layer": 1, "n_embd": 1, "n_head": 1, "n_kv_head": 1, "head_dim": 0, "ffn_hidden": 1,
              "vocab_size": 1, "vocab_pad_multiple": 1, "block_size": 1, "norm_eps": 0.0}

    def __post_init__(self):
        # every field's type and range first: a config comes from flags, presets, checkpoints and Hugging Face
        # folders alike, and a value that slipped through (n_layer=-2, n_head=0) would fail far from its cause
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, f.type) or isinstance(value, bool) != (f.type is bool):
                raise ValueError(f"{f.name}={value!r}: must be a{'n' if f.type is int else ''} {f.type.__name__}")
            if f.name in self.LOWEST and value < self.LOWEST[f.name]:
                raise ValueError(f"{f.name}={value!r}: must be >= {self.LOWEST[f.name]}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta!r}: must be > 0")
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if not 1 <= self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.mlp not in ("swiglu", "silu"):
            raise ValueError(f"mlp='{self.mlp}': expected 'swiglu' or 'silu'")
        if self.pos not in ("rope", "sinusoidal", "learned"):
            raise ValueError(f"pos='{self.pos}': expected 'rope', 'sinusoidal' or 'learned'")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.pos == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")

    @property
    def qkv_sizes(self):
        """c_attn's output, one matmul for all three: [q | k | v] = [Hq*D, Hkv*D, Hkv*D] columns."""
        return [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]

    @property
    def padded_vocab_size(self):
        m = max(1, self.vocab_pad_multiple)
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_dict(cls, d, where=None):
        """Build from any dict (a training config, a checkpoint's config): keys that are not ours are ignored.
        where: the file the dict came from, named in the error when a value is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"{where or 'config'}: expected a dict of model settings, found a {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ValueError as e:
            raise ValueError(f"{where}: {e}" if where else str(e)) from None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w. No mean subtraction, no bias: cheaper than LayerNorm, as good."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one position of work.

    Shapes: (n_layer, B, n_kv_head, max_len, head_dim). With GQA the cache holds only the KV heads, which is
    the point of GQA at inference. `pos` is how many positions are filled (the next token's position)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    def append(self, layer, k, v):
        """Store k, v (B, Hkv, T, D) at positions pos..pos+T-1 and return all keys and values so far."""
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} + {T} positions > capacity {self.max_len}")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def reorder(self, batch_indices):
        """Beam search: keep the caches of the chosen beams (a gather on the batch dimension)."""
        self.k = self.k.index_select(1, batch_indices)
        self.v = self.v.index_select(1, batch_indices)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qkv_sizes = config.qkv_sizes  # one matmul produces q, k and v: [q (Hq*D) | k (Hkv*D) | v (Hkv*D)]
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=False)
        self.c_proj = nn.Linear(self.qkv_sizes[0], config.n_embd, bias=False)

    def forward(self, x, rope_cos_sin, cache, layer, doc_mask=None):
        """x (B, T, d) -> (B, T, d). Training and prefill: T queries against the same T keys. Decoding with a
        KV cache: the T new queries against every key so far, the cache's and their own; kernels' attention()
        sees Tq < Tk and builds the mask for queries that are the last positions, so this code is the same in
        every case. RoPE rotates q and k *before* k enters the cache: cached keys keep their own positions."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split(self.qkv_sizes, dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if rope_cos_sin is not None:
            q, k = apply_rope(q, k, *rope_cos_sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D) views, no copies
        if cache is not None:  # decoding: attend to every cached position too (attention() builds the mask)
            k, v = cache.append(layer, k, v)
        y = attention(q, k, v, causal=True, mask=doc_mask)  # doc_mask: packed documents kept apart
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.c_proj(y)


class MLP(nn.Module):
    """SwiGLU: c_proj(silu(gate) * up), with gate and up from one matmul, so the kernel reads both halves of
    its output in place (kernels/swiglu.py); or the plain c_proj(silu(c_fc(x)))."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        # SwiGLU fuses its gate and up projections into one (2F, d) matmul: [gate | up]
        self.c_fc = nn.Linear(config.n_embd, (2 if self.gated else 1) * config.ffn_hidden, bias=False)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        return self.c_proj(swiglu_packed(h) if self.gated else F.silu(h))


class Block(nn.Module):
    """One pre-norm layer: each branch reads a normalised copy of the residual stream and adds its output back.
    (kernels/rmsnorm.py's second lesson fuses such an add into the next norm; the model keeps the textbook form.)"""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope_cos_sin, cache, layer, doc_mask=None):
        x = x + self.attn(self.ln_1(x), rope_cos_sin, cache, layer, doc_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def sinusoidal_table(n_pos, dim):
    """The original Transformer's fixed positions: pe[t, 2i] = sin(t / 10000^(2i/d)), pe[t, 2i+1] = cos(...)."""
    t = torch.arange(n_pos, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(n_pos, dim, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(t * inv), torch.cos(t * inv)
    return pe.float()


def weight_decayed(name, param):
    """The weight-decay rule for a GPT's parameters (train.py's AdamW and Sophia, Muon's AdamW part): the matrices
    decay; the norms' gains do not (their scale is the point of them), nor, by choice, the embedding and position
    tables, whose rows for rare tokens would otherwise decay towards zero."""
    return param.dim() >= 2 and not name.startswith(("wte.", "wpe."))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        if config.pos == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        else:  # rope: fp32 cos/sin tables for every position, sliced at the current offset in forward()
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        self.checkpoint_blocks = 0  # the first N Blocks recompute their activations in the backward (parallel.py)
        # GPT-2's trick: each residual branch ends in a projection scaled by 1/sqrt(2 n_layer), so the residual
        # stream's variance does not grow with depth at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _apply(self, fn, recurse=True):
        """model.to(bf16) / .half() / .cuda() all end here. The position tables (fp32 cos/sin or sinusoids) move
        with the model but keep fp32: rounded to bf16, the angles of late positions would be off by whole
        radians' worth of bits. So set them aside, convert everything else, then move them, device only."""
        tables = dict(self._buffers)
        self._buffers.clear()
        super()._apply(fn, recurse)
        device = self.wte.weight.device
        self._buffers.update({name: t.to(device) for name, t in tables.items()})
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, last_only=False, doc_starts=None):
        """idx (B, T) token ids -> logits (B, T, V_padded), and the mean cross entropy if targets are given.

        targets == -1 marks positions that do not count (SFT's prompt tokens, padding). With a KV cache, idx
        holds only the new tokens and positions continue from cache.pos. last_only computes logits for the last
        position alone (generation: saves a (T, V) matmul).
        doc_starts: (B, T) bool, True where a document (or conversation) begins. Windows packed with several then
        attend only within their own document: token i sees j <= i with doc(j) == doc(i), where doc(t) counts
        the starts up to t (a window's first tokens may continue a document begun before it). Learned /
        sinusoidal positions restart at each document; RoPE needs no restart (its scores depend only on i - j),
        so a document scores exactly as it would alone."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context ({self.config.block_size})")
        doc_mask = None
        if doc_starts is not None:
            if cache is not None:
                raise ValueError("doc_starts is for training on packed windows, not for KV-cache generation")
            if doc_starts.shape != idx.shape:
                raise ValueError(f"doc_starts {tuple(doc_starts.shape)} must have idx's shape {tuple(idx.shape)}")
            doc_starts = doc_starts.bool()
            doc = torch.cumsum(doc_starts.int(), dim=1)                                      # (B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            doc_mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]              # (B, 1, T, T)
        x = self.wte(idx)
        rope_cos_sin = None
        if self.config.pos == "rope":
            rope_cos_sin = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        else:  # absolute positions
            pos = torch.arange(start, start + T, device=idx.device)
            if doc_starts is not None:  # restart at each document: minus the last start at or before t
                pos = pos - torch.cummax(torch.where(doc_starts, pos, torch.zeros_like(pos)), dim=1).values
            if self.config.pos == "learned":
                x = x + self.wpe(pos)
            else:
                # sinusoidal, as in "Attention Is All You Need": embeddings scaled by sqrt(d) so the
                # unit-amplitude sinusoids do not drown the token signal (embeddings are initialised at std 0.02)
                x = x * math.sqrt(self.config.n_embd) + self.pe[pos].to(x.dtype)
        for layer, block in enumerate(self.blocks):
            if layer < self.checkpoint_blocks and torch.is_grad_enabled():  # keep the input, recompute the rest
                x = checkpoint(block, x, rope_cos_sin, cache, layer, doc_mask, use_reentrant=False)
            else:
                x = block(x, rope_cos_sin, cache, layer, doc_mask)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        if targets is None:
            return self.lm_head(x), None
        # with targets, the head and the loss are one op that never keeps the (tokens x vocab) logits
        # (kernels/cross_entropy.py; its twin is F.linear + F.cross_entropy on fp32 logits): no logits come back
        return None, linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1)

    # ---- counting -----------------------------------------------------------------------------------------
    def num_params(self, count_padding=False):
        """Parameters, each shared tensor once. Without count_padding, the vocabulary's padding rows are left
        out, so the number matches the seed's published count for the unpadded tokenizer vocabulary."""
        n = sum(p.numel() for p in self.parameters())  # .parameters() yields a tied weight once
        if not count_padding:
            pad_rows = self.config.padded_vocab_size - self.config.vocab_size
            n -= pad_rows * self.config.n_embd * (1 if self.config.tie_embeddings else 2)
        return n

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward = 3x forward), PaLM's appendix-B accounting:
        6 per weight of every matmul (the lm_head's too, over the padded vocabulary, since it is computed), plus
        attention's own 2 matmuls, QK^T and PV: 2 * 2 * n_head * head_dim * T forward per token per layer.
        Causal masking halves the attention part in practice; the convention counts it whole, as nanoGPT does."""
        c = self.config
        matmul_weights = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and n != "wpe.weight")
        if c.tie_embeddings:
            matmul_weights += self.lm_head.weight.numel()  # counted once above as wte; used again as the head
        embedding_lookup = self.wte.weight.numel()           # a lookup, not a matmul
        return 6 * (matmul_weights - embedding_lookup) + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size


# ---- python model.py config/X.py ------------------------------------------------------------------------------
def describe(config):
    """Build the model on the meta device (shapes only, no memory) and report its size and cost."""
    with torch.device("meta"):
        model = GPT(config)
    n = model.num_params()
    n_padded = model.num_params(count_padding=True)
    emb = config.vocab_size * config.n_embd * (1 if config.tie_embeddings else 2)
    lines = [str(model), "",
             f"parameters:           {n:,}  (vocabulary {config.vocab_size})",
             f"  with vocab padding: {n_padded:,}  (vocabulary padded to {config.padded_vocab_size})",
             f"  non-embedding:      {n - emb:,}",
             f"FLOPs per token:      {model.flops_per_token() / 1e9:.3f} GFLOP (training, context {config.block_size})"]
    return "\n".join(lines)


def main(argv):
    """python model.py config/<preset>.py [--memory]: the architecture, its size and cost; with --memory, what each
    parallel setting needs a GPU (parallel.py)."""
    from configurator import read_config_file
    if len(argv) not in (1, 2) or argv[1:] not in ([], ["--memory"]):
        sys.exit("usage: python model.py config/<preset>.py [--memory]")
    preset = read_config_file(argv[0])
    config = GPTConfig.from_dict(preset)
    print(describe(config))
    if "--memory" in argv:
        from parallel import memory_table
        print("\n" + memory_table(config, preset.get("batch_size", 16), optimizer=preset.get("optimizer", "adamw")))


if __name__ == "__main__":
    from configurator import run_script  # a missing or broken preset is one line, not a traceback
    run_script(main, sys.argv[1:])
