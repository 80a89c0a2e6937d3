"""
parallel.py — one model trained by many processes: DDP or FSDP2, activation checkpointing, one checkpoint format.

    torchrun --standalone --nproc_per_node=8 train.py config/auto_g_nano_1b.py                     # DDP
    torchrun --standalone --nproc_per_node=8 train.py config/auto_g_nano_1b.py --parallel=fsdp \\
        --activation_checkpointing=blocks                                                          # FSDP2

Where the bytes go. AdamW training in mixed precision keeps, for each parameter, an fp32 weight (4 bytes), an fp32
gradient (4) and two fp32 moments (8): 16 bytes, so a 1B model needs 16 GB before a single activation.
  * DDP (PyTorch's DistributedDataParallel) gives every process all of it. The processes only share the work:
    each takes its own micro-batches, and the backward averages the gradients (an all-reduce) as it goes.
  * FSDP2 (`torch.distributed.fsdp.fully_shard`, PyTorch's own) gives each of N processes 1/N of every weight,
    gradient and moment. Before a Block runs, its weights are gathered from all processes (an all-gather, in bf16
    under MixedPrecisionPolicy), used, and freed; after its backward, its gradients are averaged and split again
    (a reduce-scatter, in fp32). So a process holds 16/N bytes a parameter plus one or two whole Blocks at a time.
    Sharding each Block separately is what makes the gathered part one Block and not the model.
  * Activation checkpointing keeps only each checkpointed Block's input during the forward and recomputes the
    rest during the backward: about a third more compute for a fraction of the activation memory, which at long
    contexts is most of the memory (`python model.py config/X.py --memory` prints both).

One checkpoint format, whatever the split: rank 0 writes the same ckpt.pt a single process writes. Under FSDP the
weights and the optimizer's state are first gathered whole to the CPU (torch.distributed.checkpoint's
get_model_state_dict / get_optimizer_state_dict, full_state_dict=True); the optimizer's state is keyed by
parameter number, as torch.optim.Optimizer.state_dict() keys it, so chat.py, eval.py, export.py and a resume with
any number of processes read it unchanged. Resuming under FSDP hands the whole state to every process and each
keeps its shard.

The optimizers on slices. AdamW and Sophia are elementwise: each process updates its slice of every parameter
(Sophia's fused kernel addresses the local slices; its state stays sliced like the parameters, so checkpoints
gather it). Muon's momentum is elementwise too, but its Newton-Schulz orthogonalisation needs each whole matrix:
the update is gathered (an all-gather a matrix), orthogonalised (the matrices shared out among the processes, as
under DDP), and each process applies its own rows.

distill.py's LRC student under FSDP: its projections (and their gradients and moments) are sharded as one unit,
since each step multiplies out every layer's weights W_t P at once; the frozen teacher stays whole on every
process, as those products need its whole matrices each step (sharding it would only add an all-gather of it).
"""
from contextlib import nullcontext

import torch
import torch.distributed as dist

PARALLEL = ("ddp", "fsdp")


def init(run):
    """The process group: torchrun's processes meet (NCCL between GPUs, gloo between CPU processes). FSDP also
    needs one for a single process (a run that shards nothing but uses FSDP's bf16 weights, or its
    checkpointing), made here in memory."""
    backend = "nccl" if run.device.type == "cuda" else "gloo"
    if run.world > 1:
        dist.init_process_group(backend)
    elif run.parallel == "fsdp":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def check(run):
    """What cannot run under this split, named before anything is allocated."""
    checkpointed_blocks(run, run.n_layer)  # a bad activation_checkpointing is named now, not after allocating
    if run.parallel == "fsdp" and run.compile_mode == "reduce-overhead":
        raise ValueError("compile_mode='reduce-overhead' (CUDA graphs) cannot hold FSDP's gathers: use 'default'")


def checkpointed_blocks(run, n_layer):
    """activation_checkpointing: 'none' | 'blocks' (all of them) | a number of Blocks (the first ones)."""
    setting = str(run.activation_checkpointing)
    if setting == "none":
        return 0
    if setting == "blocks":
        return n_layer
    if setting.isdigit() and 0 <= int(setting) <= n_layer:
        return int(setting)
    raise ValueError(f"activation_checkpointing={run.activation_checkpointing!r}: expected 'none', 'blocks' or a "
                     f"number of blocks from 0 to n_layer={n_layer}")


def wrap(raw_model, run):
    """The module the loop runs: raw_model compiled, then DDP-wrapped or sharded in place by FSDP2.
    raw_model stays the one whose names a checkpoint uses (no compile or DDP prefixes; FSDP keeps the names)."""
    blocks = getattr(raw_model, "blocks", None)  # distill.py's LRC student has none: see below
    if blocks is None and checkpointed_blocks(run, run.n_layer):
        raise ValueError("activation_checkpointing recomputes GPT's Blocks; distill.py's LRC student makes its "
                         "weights from the teacher's each step and has none: leave activation_checkpointing='none'")
    if blocks is not None:
        raw_model.checkpoint_blocks = checkpointed_blocks(run, len(blocks))
    model = raw_model
    if run.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # compute in the run's precision (bf16 on a GPU), average gradients in fp32, keep fp32 master weights
        mp = MixedPrecisionPolicy(param_dtype=run.amp_dtype, reduce_dtype=torch.float32)
        for block in blocks or []:  # one all-gather per Block: only the Block at work is ever whole
            fully_shard(block, mp_policy=mp)
        # the rest (embedding, final norm, head); for the LRC student, all its projections in one unit, since
        # each step multiplies out every layer's weights at once (its frozen teacher is not sharded)
        fully_shard(raw_model, mp_policy=mp)
    if run.compile and run.device.type == "cuda":
        model = torch.compile(model, mode=None if run.compile_mode == "default" else run.compile_mode)
    if run.parallel == "ddp" and run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return model


def for_evaluation(model):
    """The module to evaluate with: DDP's inner module (no gradient hooks in evaluation); FSDP's is itself."""
    return model.module if hasattr(model, "no_sync") else model


def accumulating(model, last_micro):
    """Gradients are averaged across processes only on the step's last micro-batch: the others accumulate
    locally (DDP's no_sync; FSDP2's requires_gradient_sync), saving N-1 all-reduces a step."""
    if hasattr(model, "no_sync"):  # DDP
        return nullcontext() if last_micro else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last_micro)
    return nullcontext()


def local(t):
    """Under FSDP a parameter (its gradient, its optimizer state) is a DTensor: this process's slice of it is an
    ordinary tensor, which elementwise updates (AdamW, Sophia, Muon's momentum) need and nothing more. Anything
    else is returned as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def shard_like(p, tensor):
    """Optimizer state for parameter p, from this process's slice: a DTensor sliced as p is, so that the
    checkpoint (full_state below) gathers it whole; for an ordinary parameter, the tensor itself."""
    if not hasattr(p, "to_local"):
        return tensor
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(tensor, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def plain(tensor):
    """A 0-dim result that may be a DTensor under FSDP (a gradient norm) as an ordinary tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ---- one checkpoint format -------------------------------------------------------------------------------------
def full_state(raw_model, optimizer, run):
    """(weights, optimizer state) whole, as a single process's state_dict()s: for DDP or one process the
    state_dict()s themselves (no copies); under FSDP gathered to rank 0's CPU (a collective: every rank must call
    it; the others receive empty dicts)."""
    if run.parallel != "fsdp":
        return raw_model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(raw_model, options=options)
    by_name = get_optimizer_state_dict(raw_model, optimizer, options=options)
    return weights, numbered(by_name) if by_name else {}  # ranks other than 0 receive nothing


def numbered(by_name):
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) -> keyed by number, in the
    order of the param groups, which is how Optimizer.state_dict() numbers them."""
    order = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def named(numbered_state, raw_model, optimizer):
    """The inverse of numbered(), for this optimizer's param groups."""
    names = {id(p): n for n, p in raw_model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in numbered_state["param_groups"]]
    return {"state": {order[i]: s for i, s in numbered_state["state"].items()}, "param_groups": groups}


def load_optimizer_state(raw_model, optimizer, state, run):
    """A checkpoint's (numbered, whole) optimizer state into this run's optimizer: as is for DDP or one process;
    under FSDP each process keeps its slice of every moment."""
    if run.parallel != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(raw_model, optimizer, named(state, raw_model, optimizer),
                             options=StateDictOptions(full_state_dict=True))


# ---- python model.py config/X.py --memory ----------------------------------------------------------------------
OPTIMIZER_BYTES = {"adamw": 8, "sophia": 8, "muon": 8}  # fp32 state a parameter: AdamW's m and v, Sophia's m and h;
# Muon keeps one momentum for its matrices but AdamW's two moments for the rest: 8 is its upper bound


def activation_bytes_per_token(c):
    """What autograd keeps between a Block's forward and its backward, per token, in bytes, with bf16 autocast and
    nanoforge's GPU kernels: the fp32 residual stream at each norm's input (4d twice), the bf16 normed inputs of
    the two matmul groups (2d twice); for attention the whole [q | k | v] matmul output (v is a view of it, so it
    all stays), q and k after RoPE, the output with its fp32 log-sum-exp per head, and that output again in the
    (B, T, Hq*D) layout c_proj reads; and the MLP's hidden (SwiGLU: gate and up, then their product; SiLU: W1 x,
    silu)."""
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    attention = 2 * (q + 2 * kv) + 2 * (q + kv) + 2 * q + 4 * c.n_head + 2 * q
    mlp = 2 * 3 * c.ffn_hidden if c.mlp == "swiglu" else 2 * 2 * c.ffn_hidden
    return 4 * c.n_embd * 2 + 2 * c.n_embd * 2 + attention + mlp


def memory_estimate(model, batch_size, world, parallel, checkpoint_blocks, optimizer="adamw"):
    """Bytes a GPU holds at its peak, by kind, for training `model` (built on the meta device) at micro-batch
    batch_size x block_size on `world` GPUs. Weights, gradients and optimizer state are fp32 (16 bytes a parameter
    with AdamW); DDP keeps all of them on every GPU, FSDP 1/world. The bf16 copies that the forward computes
    with: autocast's cache of every weight under DDP; under FSDP the gathered Blocks (the one at work and the
    one prefetched) and the root's embedding and head, which stay gathered through the step.
    Checked against the peaks measured so far: auto_g_nano_1b under DDP on 2 H200s at 16 x 1024, 50.6 GiB
    (bench/results/ddp_h200x2; estimate 47.2, -7%), and lrc_1p5b on one GPU at 8 x 2048, 61.8 GiB (estimate 69.1,
    +12%). FSDP and checkpointing rows are not measured yet."""
    c = model.config
    n = model.num_params(count_padding=True)
    shard = world if parallel == "fsdp" else 1
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    bf16 = 2 * n if parallel == "ddp" else 2 * (2 * per_block + (n - c.n_layer * per_block))
    tokens = batch_size * c.block_size
    stored = activation_bytes_per_token(c)
    # a checkpointed Block keeps only its fp32 input, then recomputes everything in its backward (one at a time)
    kept = (c.n_layer - checkpoint_blocks) * stored + checkpoint_blocks * 4 * c.n_embd + (stored if checkpoint_blocks else 0)
    head = 4 * c.n_embd + 2 * c.n_embd + 4 + 8  # final norm's input and output, the loss's log-sum-exp, the ids
    # DDP averages gradients through flat buckets of its own: a second fp32 copy of the gradients
    gradients = 4 * n / shard + (4 * n if parallel == "ddp" and world > 1 else 0)
    return {"weights": 4 * n / shard, "gradients": gradients, "optimizer": OPTIMIZER_BYTES[optimizer] * n / shard,
            "bf16 copies": bf16, "activations": tokens * (kept + head)}


def memory_table(config, batch_size, gpus=(1, 2, 8), optimizer="adamw"):
    """The per-GPU memory of each setting a user can pick, before renting the GPUs: DDP and FSDP at each GPU
    count, with and without activation checkpointing of every Block."""
    from model import GPT
    with torch.device("meta"):
        model = GPT(config)
    lines = [f"per-GPU memory at micro-batch {batch_size} x {config.block_size} ({optimizer}, bf16 autocast; "
             f"GiB; an estimate: allocator slack and temporaries come on top, typically 5-15%)", "",
             "| GPUs | parallel | activation checkpointing | weights | gradients | optimizer | bf16 copies | "
             "activations | total |", "|---|---|---|---|---|---|---|---|---|"]
    for world in gpus:
        for parallel in PARALLEL:
            for blocks in (0, config.n_layer):
                part = memory_estimate(model, batch_size, world, parallel, blocks, optimizer)
                cells = " | ".join(f"{v / 2**30:.1f}" for v in part.values())
                lines.append(f"| {world} | {parallel} | {'blocks' if blocks else 'none'} | {cells} | "
                             f"{sum(part.values()) / 2**30:.1f} |")
    return "\n".join(lines)
