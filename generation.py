"""
generation.py — the one decode loop (KV cache) and its sampling strategies, on top of model.GPT and its KVCache.

    prompt ids ─► prefill (one forward over the prompt, filling the KV cache) ─► logits of the last position
        loop:  logits ─► process_logits (allowed ids, bias, repetition penalty, n-gram ban, min length)
                      ─► sample_next (greedy | temperature, top-k, top-p)   or   beam bookkeeping
                      ─► feed the new token alone (the cache holds everything before it)

Why a KV cache: without one, step t recomputes attention keys/values for all t previous tokens, O(T^2) work for
T new tokens; with one, each step runs the model on one position and attends to the stored keys/values.
`stream` yields each token as it is chosen (chat.py prints it at once); `beam_search` cannot stream, because
which beam wins is only known at the end.

Logit processing, applied to fp32 logits z (one row per sequence s = prompt + tokens generated so far):
  * allowed:              z_i = -inf for ids the model may not produce (padding rows, the pad token).
  * logit_bias:           z_i += b_i (OpenAI's logit_bias; tests use it to force a token).
  * repetition_penalty p (CTRL, Keskar et al. 2019, as Hugging Face applies it): for every distinct id i in s,
                          z_i = z_i / p if z_i > 0 else z_i * p. p > 1 makes repeats less likely whatever the sign
                          of z_i; each id is penalised once however often it occurred. p = 1 is off.
  * no_repeat_ngram n:    if the last n-1 tokens of s occurred earlier in s followed by token t, z_t = -inf: no
                          n-gram appears twice. n = 0 is off.
  * min_new_tokens m:     the stop ids get -inf while fewer than m tokens have been generated.
The prompt counts as part of s for both repetition rules, as in Hugging Face's generate().
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import KVCache


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.8          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    repetition_penalty: float = 1.0   # 1 = off
    no_repeat_ngram_size: int = 0     # 0 = off
    num_beams: int = 1                # > 1: beam search (deterministic; temperature/top-k/top-p unused)
    length_penalty: float = 1.0       # beam score = sum of log-probs / (generated length ** length_penalty)
    stop_ids: tuple = ()
    logit_bias: dict = field(default_factory=dict)

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (0 <= self.min_new_tokens <= self.max_new_tokens, "need 0 <= min_new_tokens <= max_new_tokens"),
                  (self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must lie in (0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
                  (self.num_beams >= 1, "num_beams must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) fp32 -> next token ids (B,). temperature 0 is greedy; top_k keeps the k most likely tokens;
    top_p keeps the smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2019)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token if the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]



def apply_repetition_penalty(logits, seqs, penalty):
    """logits (B, V), seqs (B, T) long -> logits with every id present in its row's sequence penalised once."""
    if penalty == 1.0 or seqs.shape[1] == 0:
        return logits
    seen = logits.gather(1, seqs)  # a repeated id is gathered (and scattered back) with the same value
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, seqs, seen)


def ban_repeated_ngrams(logits, seqs, n):
    """logits (B, V), seqs (B, T) -> logits with -inf on every token that would complete an n-gram already in
    the row. Vectorised: compare the last n-1 tokens with every earlier (n-1)-token window, ban what followed."""
    B, T = seqs.shape
    if n <= 0 or T < n:
        return logits
    if n == 1:  # every token already used
        return logits.scatter(1, seqs, float("-inf"))
    tail = seqs[:, T - n + 1:]                                # (B, n-1): the n-gram we are about to complete
    windows = seqs[:, :T - 1].unfold(1, n - 1, 1)             # (B, T-n+1, n-1): window i = seqs[i : i+n-1]
    hit = (windows == tail[:, None, :]).all(-1)               # (B, T-n+1): window i equals the tail
    followers = seqs[:, n - 1:]                               # (B, T-n+1): the token after window i
    banned = torch.zeros_like(logits).scatter_reduce(1, followers, hit.to(logits.dtype), reduce="amax")
    return logits.masked_fill(banned > 0, float("-inf"))


def process_logits(logits, seqs, n_generated, gen, allowed=None):
    """The whole logit pipeline of the module docstring, in order. logits (B, V) any dtype -> fp32."""
    logits = logits.to(torch.float32, copy=True)  # a private copy: the edits below may be in place
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    for token, bias in gen.logit_bias.items():
        logits[:, token] += bias
    logits = apply_repetition_penalty(logits, seqs, gen.repetition_penalty)
    logits = ban_repeated_ngrams(logits, seqs, gen.no_repeat_ngram_size)
    if n_generated < gen.min_new_tokens and gen.stop_ids:
        logits[:, list(gen.stop_ids)] = float("-inf")
    return logits


def _budget(model, n_prompt, max_new_tokens):
    """How many tokens fit after the prompt in the model's context; a clear error if none do."""
    room = model.config.block_size - n_prompt
    if n_prompt == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to start from")
    if room < 1:
        raise ValueError(f"the prompt has {n_prompt} tokens: no room left in the context of "
                         f"{model.config.block_size} tokens")
    return min(max_new_tokens, room)


def _new_cache(model, batch, length, device):
    return KVCache(model.config, batch, length, device, model.wte.weight.dtype)


@torch.no_grad()
def stream(model, prompt_ids, gen, allowed=None, generator=None):
    """Yield new token ids (ints) one at a time, the stop id included if one is produced (then it ends).
    Greedy when gen.temperature == 0, else sampling with temperature / top-k / top-p (sample_next)."""
    device = model.wte.weight.device
    max_new = _budget(model, len(prompt_ids), gen.max_new_tokens)
    seq = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = _new_cache(model, 1, seq.shape[1] + max_new, device)
    stops, x = set(gen.stop_ids), seq
    for step in range(max_new):
        logits = model(x, cache=cache, last_only=True)[0][:, -1, :]
        logits = process_logits(logits, seq, step, gen, allowed)
        token = sample_next(logits, gen.temperature, gen.top_k or None, gen.top_p, generator)
        yield int(token)
        if int(token) in stops:
            return
        seq = torch.cat([seq, token[:, None]], dim=1)
        x = token[:, None]


@torch.no_grad()
def beam_search(model, prompt_ids, gen, allowed=None):
    """Keep the num_beams most likely continuations (sum of log-probabilities) at every step.

    Step: every live beam b proposes every token t with score s_b + log p(t | beam b); the 2K best proposals are
    read in order: a stop token among the first K closes a hypothesis (scored s / length^length_penalty), other
    tokens extend a beam until K beams are live again. The cache rows are gathered to follow their beams
    (KVCache.reorder). Ends when K hypotheses are closed (early stopping) or at max_new_tokens; returns
    (new ids, the stop id included if it stopped, normalised score). With num_beams=1 this is greedy decoding."""
    device, K = model.wte.weight.device, gen.num_beams
    max_new = _budget(model, len(prompt_ids), gen.max_new_tokens)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = _new_cache(model, 1, prompt.shape[1] + max_new, device)
    logits = model(prompt, cache=cache, last_only=True)[0][:, -1, :]
    # all beams start as the prompt, but only beam 0 is live: K copies would propose the same tokens K times
    cache.reorder(torch.zeros(K, dtype=torch.long, device=device))
    logits, seqs = logits.expand(K, -1), prompt.expand(K, -1)
    scores = torch.full((K,), float("-inf"), device=device)
    scores[0] = 0.0
    stops, finished, n0 = set(gen.stop_ids), [], prompt.shape[1]

    def normalised(score, length):
        return score / (length ** gen.length_penalty)
    for step in range(max_new):
        logp = F.log_softmax(process_logits(logits, seqs, step, gen, allowed), dim=-1)   # (live, V)
        V = logp.shape[1]
        proposals = (scores[:, None] + logp).view(-1)
        top_scores, top_index = proposals.topk(min(2 * K, proposals.numel()))
        beams, tokens, new_scores = [], [], []
        for rank, (s, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
            if s == float("-inf"):
                break
            b, t = divmod(index, V)
            if t in stops:
                if rank < K:
                    finished.append((normalised(s, step + 1), seqs[b, n0:].tolist() + [t]))
                continue
            beams.append(b), tokens.append(t), new_scores.append(s)
            if len(beams) == K:
                break
        if len(finished) >= K or not beams:
            break
        index = torch.tensor(beams, device=device)
        token = torch.tensor(tokens, device=device)
        cache.reorder(index)
        seqs = torch.cat([seqs[index], token[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=device)
        if step == max_new - 1:  # out of budget: the live beams compete, unfinished, with the closed ones
            finished += [(normalised(s, step + 1), seqs[i, n0:].tolist()) for i, s in enumerate(new_scores)]
            break
        logits = model(token[:, None], cache=cache, last_only=True)[0][:, -1, :]
    if not finished:  # every proposal was banned at the first step
        return [], float("-inf")
    best_score, best = max(finished, key=lambda f: f[0])
    return best, best_score


def generate(model, prompt_ids, gen, allowed=None, generator=None):
    """New token ids as a list (beam search when gen.num_beams > 1, else `stream`), stop id included if any."""
    if gen.num_beams > 1:
        return beam_search(model, prompt_ids, gen, allowed)[0]
    return list(stream(model, prompt_ids, gen, allowed, generator))


def sample_text(model, tokenizer, prompt, max_new_tokens=48, temperature=0.8, top_k=50, seed=0):
    """A short seeded continuation of `prompt` as text: what train.py prints at the end with sample_prompt."""
    from tokenizer import get_encoding
    enc = get_encoding(tokenizer)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    device = model.wte.weight.device
    was_training = model.training
    ids = generate(model.eval(), enc.encode_ordinary(prompt), gen, generator=torch.Generator(device).manual_seed(seed))
    model.train(was_training)
    return prompt + enc.decode([i for i in ids if i < enc.n_vocab])
