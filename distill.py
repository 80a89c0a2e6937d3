"""
distill.py — Low-Rank Clone: a small model cut out of a big one's weights, then taught by it.

    python distill.py config/distill_small.py          # a gpt2_124m teacher (OpenStax) -> a d=256 student
    python distill.py config/distill_lrc_1p5b.py       # Llama-3.2-3B-Instruct -> the lrc_1p5b shape (8 GPUs)
    python chat.py out/distill_small                   # the student is an ordinary nanoforge checkpoint

Hao et al. 2025, "A Token is Worth over 1,000 Tokens: Efficient Knowledge Distillation through Low-Rank Clone"
(arXiv 2505.12781, github.com/CURRENTF/LowRankClone) made LRC-1.5B this way from Llama-3.2-3B-Instruct with 10B
tokens. The method, as this file writes it from the paper's equations:

**The student's shape.** The teacher's depth, heads, head size and FFN width; only the residual stream narrows,
d_t -> d_s. (q then has H*D > d_s dims, which model.py allows through head_dim.)

**Soft pruning.** The student's weights are not free parameters. Each is a teacher weight, frozen, times a
trainable projection P of shape (d_t, d_s). Hard pruning deletes d_t - d_s residual dimensions; a projection
instead learns which mixtures of them to keep, so nothing of the teacher is thrown away at the start. In
nn.Linear's layout (a weight is (out, in) and y = x W^T):

    input side    W_s = W_t P        q, k, v, gate, up (d_s inputs; H*D or F outputs, the teacher's)
                  E_s = E_t P_emb    the embedding (and a learned position table); a tied lm_head is E_s itself,
                                     an untied one W_s = W_t P_head
    output side   W_s = P^T W_t      o, down (the teacher's H*D or F inputs; d_s outputs)

One projection per weight type and layer, seven a layer (P_q P_k P_v P_o P_gate P_up P_down; a plain SiLU MLP
has no gate), plus the student's own RMSNorm gains (a gain over d_t has no meaning over d_s: they start at 1).

**The loss.**  L = CE(student, next token)  +  T^2 KL(softmax(z_t / T) || softmax(z_s / T))
                   +  alpha * sum over layers of the clone terms

The clone terms are mean squared errors between the student's activations and the teacher's at the points
where the projections act: q, k, v (before RoPE), gate and up have the teacher's width in both models and are
compared as they are. o and down live in d_s in the student, so the teacher's are mapped by the same projection:

    MSE(o_s, o_t P_o),   MSE(down_s, down_t P_down)       o_s = y_s W_o^T P_o, so o_s = o_t P_o when y_s = y_t

i.e. every layer is asked to be the teacher's layer seen through P. (The reference code compares attention's
output in d_t, before P_o; here o is treated as down is, the same mapping for both.) The FFN's signals are the
paper's point: they carry most of a layer's weights and, in other distillation methods, go unused.
Weights: alpha = 0.2 and T = 40 in the LRC-1.5B recipe. The reference code reduces the KL with "batchmean" (summed
over a row's 2048 positions): per token a factor 2048, close to T^2 = 1600 at T = 40. We write the conventional
T^2 (Hinton et al. 2015), which keeps the term's gradient the same size whatever T.

**Teacher activations** come from one forward pass under no_grad, read by forward hooks on its linear layers
(bf16 weights on a GPU: half the memory; fp32 on the CPU). The student runs model.py's own GPT.forward on the
projected weights (torch.func.functional_call on a weightless copy of the student's GPT), with the same hooks:
one forward, the same code chat.py will run, so the multiplied-out checkpoint gives the same logits.

**At the end** the products are multiplied out once: an ordinary ckpt.pt with the student's GPTConfig, which
chat.py, eval.py, sft.py and export.py use unchanged. The loop (data windows, DDP, schedule, checkpoints, exact
resume, logs, loss plot) is train.py's: this file builds the model and hands it over (run_training).
Validation reports the student's plain next-token loss and bits per byte, comparable to any other run's.

Baselines: --clone_weight=0 (logit-only KD through the projections), --free_student=True (logit-only KD of an
ordinary randomly initialised student) and train.py with the same shape (from scratch). config/distill_small.py
has the commands; bench/distill_study.py runs all three and compares them.
"""
import copy
import dataclasses
import filecmp
import json
import os
import sys
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import checkpoint
from configurator import configure, run_script, script_defaults
from device import pick_device
from kernels.rope import rope_tables
from model import GPT, GPTConfig, sinusoidal_table
from train import DEFAULTS as TRAIN_DEFAULTS, leave

# ----------------------------------------------------------------------------------------------------------------
# Distillation defaults, on top of train.py's (config/distill_*.py and --key=value override them).
teacher = ""                        # a nanoforge run folder / .pt file, or hf:<folder> (a Hugging Face model)
clone_weight = 0.2                  # alpha on the activation-clone terms; 0 = logit-only KD (+ next-token CE)
kl_temperature = 40.0               # T of the KL term (the LRC-1.5B recipe's)
free_student = False                # True: ordinary free student weights, logit-only KD (the baseline)
out_dir = "out/distill"             # the student's ckpt.pt; train.py's own run (state, logs) in out_dir/distill/
tokenizer = ""                      # '' = the teacher's; anything else must be the teacher's
weight_decay = 0.0                  # the recipe's: decay would pull the projections, not weights, towards 0
# The student's shape. None = the teacher's, which LRC keeps (depth, heads, head size, FFN width, vocabulary);
# a value that differs from the teacher's is an error. n_embd, the student's width, must be given.
n_embd = None
block_size = None                   # None = the teacher's context; shorter is allowed
norm_eps = None
n_layer = n_head = n_kv_head = head_dim = ffn_hidden = mlp = pos = rope_theta = None
tie_embeddings = vocab_size = vocab_pad_multiple = None
DEFAULTS = {**TRAIN_DEFAULTS, **script_defaults(globals())}
TYPES = {f.name: f.type for f in dataclasses.fields(GPTConfig)}  # what the None-default shape keys must be

CLONED = ("n_layer", "n_head", "n_kv_head", "head_dim", "ffn_hidden", "mlp", "pos", "rope_theta",
          "tie_embeddings", "vocab_size", "vocab_pad_multiple")
# The linear layers whose outputs the clone terms compare (names inside model.py's Block).
CLONE_POINTS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def student_config(teacher_config, **given):
    """The student's GPTConfig: the teacher's shape with the given width (and context, norm eps). A given value
    of any other field must equal the teacher's, since LRC cannot change it; each mistake gets one line."""
    t = teacher_config
    if given.get("n_embd") is None:
        raise ValueError("n_embd (the student's width) is not set: e.g. --n_embd=256")
    if given["n_embd"] > t.n_embd:
        raise ValueError(f"student n_embd={given['n_embd']} is wider than the teacher's {t.n_embd}: a Low-Rank "
                         f"Clone projects the teacher down (d_s <= d_t)")
    for key in CLONED:
        if given.get(key) is not None and given[key] != getattr(t, key):
            raise ValueError(f"{key}={given[key]!r} but the teacher has {key}={getattr(t, key)!r}: LRC keeps the "
                             f"teacher's {key} (only n_embd, block_size and norm_eps may differ)")
    if given.get("block_size") is not None and given["block_size"] > t.block_size:
        raise ValueError(f"block_size={given['block_size']} is longer than the teacher's context {t.block_size}")
    fields = {k: getattr(t, k) for k in CLONED}
    fields.update(n_embd=given["n_embd"], block_size=given.get("block_size") or t.block_size,
                  norm_eps=given.get("norm_eps") or t.norm_eps)
    return GPTConfig(**fields)


@contextmanager
def recording(model, on=True):
    """Forward hooks for the duration of a `with` block: each clone point's output lands in the yielded dict
    as store[(layer, name)]. Removed afterwards, so no hook stays behind on the caller's teacher."""
    store, handles = {}, []
    for i, block in enumerate(model.blocks if on else []):
        for name in CLONE_POINTS:
            def hook(module, args, output, key=(i, name)):
                store[key] = output
            handles.append(block.get_submodule(name).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def weights_signature(model):
    """Sum of squares and of magnitudes of the weights, rounded to bf16 first (so the teacher in fp32 or bf16
    signs alike), in fp64. Stored with the student's state: resuming against another teacher is an error."""
    sq = ab = 0.0
    for p in model.parameters():
        w = p.detach().to(torch.bfloat16).double()
        sq, ab = sq + (w * w).sum().item(), ab + w.abs().sum().item()
    return torch.tensor([sq, ab], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
class LRCStudent(nn.Module):
    """A student GPT whose weights are the frozen teacher's through trainable projections.

    forward(idx, targets, doc_starts) returns (logits, loss) like GPT.forward, so train.py trains it unchanged:
    in training mode the loss is the distillation loss above, in eval mode the plain next-token loss (what
    validation reports for every run). state_dict() holds only what is trained (projections, norm gains) and
    the teacher's signature, not the teacher: it is loaded again from its path. to_gpt() multiplies out."""

    def __init__(self, teacher, config, clone_weight=0.2, kl_temperature=40.0, free_student=False, seed=0):
        super().__init__()
        student_config(teacher.config, **{k: getattr(config, k) for k in CLONED + ("n_embd", "block_size")})
        if free_student and clone_weight > 0:
            raise ValueError(f"free_student=True has no projections to map o and down into the student's width: "
                             f"set clone_weight=0 (logit-only KD), not {clone_weight}")
        self.config, self.clone_weight, self.kl_temperature = config, clone_weight, kl_temperature
        self.free_student = free_student
        # the teacher and the weightless shape are kept out of the module tree (so out of state_dict, the
        # optimizer and DDP's buckets); _apply below moves the teacher with the student
        teacher.requires_grad_(False).eval()
        self.__dict__["teacher"] = teacher
        self.register_buffer("teacher_signature", weights_signature(teacher))
        gen = torch.Generator().manual_seed(seed)
        if free_student:  # the baseline: an ordinary GPT of the same shape, random initialisation
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.student = GPT(config)
            return
        # shapes only (meta device: no memory); functional_call supplies every weight and table each forward
        with torch.device("meta"):
            self.__dict__["shape"] = GPT(config)
        if config.pos == "rope":
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif config.pos == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        d_t, d_s = teacher.config.n_embd, config.n_embd

        def projection():  # N(0, 0.02), as the reference code initialises its projections
            return nn.Parameter(torch.randn(d_t, d_s, generator=gen) * 0.02)
        kinds = ("q", "k", "v", "o") + (("gate", "up") if config.mlp == "swiglu" else ("up",)) + ("down",)
        self.layers = nn.ModuleList(
            nn.ParameterDict({**{k: projection() for k in kinds},
                              "ln_1": nn.Parameter(torch.ones(d_s)), "ln_2": nn.Parameter(torch.ones(d_s))})
            for _ in range(config.n_layer))
        self.p_emb = projection()
        self.p_head = None if config.tie_embeddings else projection()
        self.ln_f = nn.Parameter(torch.ones(d_s))

    def _apply(self, fn, recurse=True):
        """.to(device) and friends: the teacher (outside the module tree) goes where the student goes."""
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    # ---- the student's weights ----------------------------------------------------------------------------
    def student_weights(self):
        """Every weight of the student's GPT, by model.py's names, as teacher weight x projection (fp32
        products: the teacher may be held in bf16, the projections are fp32; under autocast they run bf16)."""
        if self.free_student:
            return dict(self.student.state_dict(keep_vars=True))
        t, c = self.teacher, self.config

        def inp(w, p):   # input side: W_t P
            return w.type_as(p) @ p

        def out(p, w):   # output side: P^T W_t
            return p.T @ w.type_as(p)
        w = {"wte.weight": inp(t.wte.weight, self.p_emb), "ln_f.weight": self.ln_f}
        if c.pos == "learned":
            w["wpe.weight"] = inp(t.wpe.weight, self.p_emb)
        for i, (block, p) in enumerate(zip(t.blocks, self.layers)):
            q, k, v = block.attn.c_attn.weight.split(self.config.qkv_sizes)
            fc = block.mlp.c_fc.weight  # SwiGLU packs [gate | up]; a plain MLP has up only
            fc_s = (torch.cat([inp(h, p[k]) for h, k in zip(fc.chunk(2), ("gate", "up"))]) if c.mlp == "swiglu"
                    else inp(fc, p["up"]))
            w.update({f"blocks.{i}.ln_1.weight": p["ln_1"], f"blocks.{i}.ln_2.weight": p["ln_2"],
                      f"blocks.{i}.attn.c_attn.weight": torch.cat([inp(q, p["q"]), inp(k, p["k"]), inp(v, p["v"])]),
                      f"blocks.{i}.attn.c_proj.weight": out(p["o"], block.attn.c_proj.weight),
                      f"blocks.{i}.mlp.c_fc.weight": fc_s,
                      f"blocks.{i}.mlp.c_proj.weight": out(p["down"], block.mlp.c_proj.weight)})
        w["lm_head.weight"] = w["wte.weight"] if c.tie_embeddings else inp(t.lm_head.weight, self.p_head)
        return w

    def student_forward(self, idx, targets=None, doc_starts=None):
        """model.py's GPT.forward on the projected weights: (logits, next-token loss)."""
        if self.free_student:
            return self.student(idx, targets, doc_starts=doc_starts)
        w = self.student_weights()
        if self.config.tie_embeddings:
            del w["lm_head.weight"]  # functional_call ties it to wte.weight, as the GPT module does
        tables = {name: buf for name, buf in self.named_buffers() if name != "teacher_signature"}
        return functional_call(self.shape, {**w, **tables}, (idx, targets), {"doc_starts": doc_starts})

    def to_gpt(self):
        """The student multiplied out: an ordinary GPT (fp32, on the CPU, eval mode)."""
        with torch.no_grad():
            if self.free_student:
                return copy.deepcopy(self.student).cpu().float().eval()
            gpt = GPT(self.config)
            gpt.load_state_dict({k: v.detach().float().cpu() for k, v in self.student_weights().items()})
        return gpt.eval()

    # ---- the loss -----------------------------------------------------------------------------------------
    def forward(self, idx, targets=None, doc_starts=None):
        if not self.training or targets is None:  # validation, generation: the student alone
            return self.student_forward(idx, targets, doc_starts)
        clone = self.clone_weight > 0
        with torch.no_grad(), recording(self.teacher, clone) as t_acts:
            t_logits, _ = self.teacher(idx, doc_starts=doc_starts)
        with recording(self.student if self.free_student else self.shape, clone) as s_acts:
            logits, _ = self.student_forward(idx, doc_starts=doc_starts)  # the KL needs the logits themselves,
        # so the next-token loss is taken from them (GPT.forward with targets fuses head and loss, returning none)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        loss = ce + self.kl_loss(logits, t_logits, targets)
        if clone:
            loss = loss + self.clone_weight * self.clone_loss(s_acts, t_acts)
        return logits, loss

    def kl_loss(self, s_logits, t_logits, targets):
        """T^2 KL(p_t || p_s) at temperature T, per position averaged over the positions that count (targets
        != -1), over the tokenizer's vocabulary (the padding rows are never targets)."""
        V, T = self.config.vocab_size, self.kl_temperature
        log_s = F.log_softmax(s_logits[..., :V].float() / T, dim=-1)
        log_t = F.log_softmax(t_logits[..., :V].float() / T, dim=-1)
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
        keep = (targets != -1).float()
        return T * T * (per_token * keep).sum() / keep.sum().clamp(min=1)

    def clone_loss(self, s, t):
        """Sum over layers of MSE(student activation, teacher activation [x P where the widths differ])."""
        total, qkv = 0.0, self.config.qkv_sizes
        for i, p in enumerate(self.layers):
            pairs = list(zip(s[i, "attn.c_attn"].split(qkv, -1), t[i, "attn.c_attn"].split(qkv, -1)))
            if self.config.mlp == "swiglu":  # [gate | up], as model.py packs them
                pairs += zip(s[i, "mlp.c_fc"].chunk(2, -1), t[i, "mlp.c_fc"].chunk(2, -1))
            else:
                pairs.append((s[i, "mlp.c_fc"], t[i, "mlp.c_fc"]))
            pairs.append((s[i, "attn.c_proj"], t[i, "attn.c_proj"].type_as(p["o"]) @ p["o"]))
            pairs.append((s[i, "mlp.c_proj"], t[i, "mlp.c_proj"].type_as(p["down"]) @ p["down"]))
            total = total + sum(F.mse_loss(a.float(), b.float()) for a, b in pairs)
        return total

    # ---- what train.py asks of a model --------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict=True, assign=False):
        saved = state_dict.get("teacher_signature")
        if saved is not None and not torch.allclose(saved.cpu(), self.teacher_signature.cpu(), rtol=1e-9):
            raise ValueError("this distillation state was trained against another teacher (its weights' "
                             "signature differs): resume with the same teacher, or start a new out_dir")
        return super().load_state_dict(state_dict, strict, assign)

    def num_params(self, count_padding=False):
        """The student's size (what the multiplied-out checkpoint will have), as GPT.num_params counts it."""
        return (self.student if self.free_student else self.shape).num_params(count_padding)

    def trainable_params(self):
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_token(self):
        """The student's training FLOPs plus the teacher's forward (1/3 of its training FLOPs). Not counted:
        the weight products W_t P, 6 d_s N_t FLOPs per micro-batch whatever its size (at LRC-1.5B's 3 x 2048
        tokens, 4.8 GFLOP a token against these ~16: MFU reads about a quarter low there)."""
        student = self.student if self.free_student else self.shape
        return student.flops_per_token() + self.teacher.flops_per_token() // 3


# ----------------------------------------------------------------------------------------------------------------
def load_teacher(spec):
    """A nanoforge checkpoint (run folder or .pt file) or hf:<folder> -> (GPT on the CPU, its run config), through
    checkpoint.py, the one resolver (it also refuses distill.py's own training state as a teacher)."""
    if not spec:
        raise ValueError("teacher is not set: --teacher=out/<run> (a nanoforge checkpoint) or --teacher=hf:<folder>")
    try:
        return checkpoint.load_model(spec, "cpu")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"teacher='{spec}': {e}") from None


def same_tokenizer(a, b):
    """A tiktoken name, or a tokenizer file (a Hugging Face teacher's tokenizer.json): the same name, or two paths
    to files with the same bytes."""
    return a == b or (os.path.isfile(a) and os.path.isfile(b) and filecmp.cmp(a, b, shallow=False))


def student_from_teacher(cfg, teacher_config, teacher_run):
    """Fill cfg's student shape and tokenizer from the teacher, checking what LRC cannot change. Returns the
    student's GPTConfig; cfg then carries its fields (train.py builds and checkpoints from them)."""
    config = student_config(teacher_config, **{k: cfg[k] for k in CLONED + ("n_embd", "block_size", "norm_eps")})
    cfg.update({k: getattr(config, k) for k in TRAIN_DEFAULTS if hasattr(config, k)})
    t_tok = teacher_run.get("tokenizer", "gpt2")
    if cfg["tokenizer"] and not same_tokenizer(cfg["tokenizer"], t_tok):
        raise ValueError(f"tokenizer='{cfg['tokenizer']}' but the teacher '{cfg['teacher']}' was trained with "
                         f"'{t_tok}': teacher and student must share one vocabulary")
    cfg["tokenizer"] = t_tok
    meta_path = os.path.join(cfg["data_dir"], "meta.json")
    if os.path.isfile(meta_path):  # shards record their tokenizer: a teacher of another vocabulary cannot teach on them
        with open(meta_path) as f:
            meta = json.load(f)
        if not same_tokenizer(meta.get("tokenizer", t_tok), t_tok):
            raise ValueError(f"{meta_path}: the shards were tokenized with '{meta['tokenizer']}' but the teacher "
                             f"uses '{t_tok}'")
        cfg["tokenizer"] = meta.get("tokenizer", t_tok)  # the same tokenizer, named as the shards name it (train.resolve)
    if cfg["init_from"] not in ("scratch", "resume"):
        raise ValueError(f"init_from='{cfg['init_from']}': distill.py starts from the teacher ('scratch') or "
                         f"continues its own run ('resume'); the teacher is set by --teacher")
    return config


def run_training(cfg, model):
    """The one place where distill.py reaches into train.py: its loop trains the LRCStudent built here (train()'s
    model hook checks it has the student's shape). Everything else, from the data windows to exact resume, is
    train.py's."""
    import train
    return train.train(cfg, model=model)


def main(argv):
    cfg = configure(DEFAULTS, argv, TYPES)
    teacher_model, teacher_run = load_teacher(cfg["teacher"])
    config = student_from_teacher(cfg, teacher_model.config, teacher_run)
    want_cuda = pick_device(cfg["device"]).type == "cuda"
    # the teacher only runs forward: on a GPU bf16 halves its memory (autocast would round it anyway)
    teacher_model = teacher_model.to(torch.bfloat16 if want_cuda else torch.float32)
    model = LRCStudent(teacher_model, config, cfg["clone_weight"], cfg["kl_temperature"], cfg["free_student"],
                       cfg["seed"])
    master = int(os.environ.get("RANK", "0")) == 0
    if master:
        print(f"teacher {cfg['teacher']}: {teacher_model.num_params():,} parameters, d={teacher_model.config.n_embd}"
              f" -> student d={config.n_embd}: {model.num_params():,} parameters, {model.trainable_params():,} "
              f"trained ({'free student, logit-only KD' if cfg['free_student'] else 'LRC projections'})")
    student_dir = cfg["out_dir"]
    run = run_training({**cfg, "out_dir": os.path.join(student_dir, "distill")}, model)
    if master and cfg["save_checkpoints"]:
        fresh = LRCStudent(teacher_model, config, cfg["clone_weight"], cfg["kl_temperature"], cfg["free_student"])
        write_student(fresh, cfg, student_dir)
    return run


def write_student(model, cfg, student_dir):
    """The multiplied-out student as an ordinary checkpoint: checkpoint.load_model, chat.py, eval.py, sft.py's
    init_from and export.py read it like any of train.py's. The trained projections come from the state train.py
    saved last (whole, whatever the parallelism: under FSDP the trained module holds only slices), loaded into
    `model`, a fresh LRCStudent of the same teacher; the config is the run's (the student's shape, tokenizer)."""
    state = checkpoint.load(os.path.join(student_dir, "distill", "ckpt.pt"), mmap=True)
    model.load_state_dict(state["model"])
    gpt = model.to_gpt()
    payload = {"model": gpt.state_dict(), "config": {**cfg, "distilled_from": cfg["teacher"]},
               "step": state["step"], "best_val_loss": state["best_val_loss"]}
    checkpoint.save(os.path.join(student_dir, "ckpt.pt"), payload)
    print(f"student written to {os.path.join(student_dir, 'ckpt.pt')} (step {state['step']}); "
          f"resumable distillation state in {os.path.join(student_dir, 'distill')}")


if __name__ == "__main__":
    run_script(main, sys.argv[1:])  # an expected error: one line, exit 1
    leave()  # a torchrun process skips the interpreter's teardown (train.leave says why)
