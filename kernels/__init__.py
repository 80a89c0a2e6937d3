"""
kernels/ — hand-written Triton kernels, one concept a file.

Every file is one lesson: the math in its docstring, the Triton kernel(s), a torch.autograd.Function, a
plain-PyTorch twin with the same signature, and a public function that picks between them by asking
`use_triton(...)` below. This module is the *one place* that makes that choice, so a reader can see the
whole policy at once:

    NANOFORGE_KERNELS=auto     (default) Triton when the tensors live on a CUDA GPU and Triton imports,
                               the PyTorch twin everywhere else (CPU, MPS, no Triton installed) -- except the
                               kernels in TWIN_WINS_ON_GPU below, whose twin measured faster in training.
    NANOFORGE_KERNELS=torch    always the twin: the reference, and the escape hatch if a kernel misbehaves.
    NANOFORGE_KERNELS=triton   always Triton; on CPU tensors this needs TRITON_INTERPRET=1 (how CI runs the
                               kernels), otherwise it is an error rather than a silent fallback.
    NANOFORGE_KERNELS=auto,attention=torch   per-kernel overrides after the default, comma separated.

train.py / sft.py expose the same switch as the config key `kernels_backend` (it calls set_backend()).

THE WIRING: one pattern in every kernel file, and why this one. A kernel file has, for each direction of its
operation, one plain Python function that allocates the outputs and launches its Triton kernels through
`launcher(kernel)[grid](...)`; `op("name")` turns that function into the operator nanoforge::name, and a
torch.autograd.Function calls the forward and backward operators. Under torch.compile that is all visible:

  * dynamo traces the autograd.Function (forward and backward) like any PyTorch code;
  * the operator is a `torch.library.triton_op`: AOTAutograd replaces it by the function's body, so the graph
    holds the Triton kernels themselves (the launcher is `torch.library.wrap_triton`), and inductor launches
    them from its own generated code, next to the kernels it writes. Nothing opaque remains: no dispatcher
    round trip and no Triton Python launcher per call inside a compiled step.

The alternatives, and why not: `torch.library.custom_op` keeps each call opaque (tens of microseconds of host
time each, ~400 calls per step at lille_130m's size: small models became host-bound, issue #12). Raw
`kernel[grid]` calls inside an autograd.Function need dynamo to interpret the launcher's Python line by line,
and on CI's torch 2.13 + Triton 3.9 it gave up (it cannot trace Triton's `getenv_bool`); a triton_op's body
is instead run as ordinary Python on shape-only tensors, so the launch rules (tile sizes, SM counts, cached
lookups) need no special care. In eager mode the operator call runs the same function with the raw kernels,
for a few microseconds of dispatch (7 us on CI's CPU) and no second validation: the public functions check
their inputs once, before the autograd.Function.

One trap, handled in the kernels: inductor passes a Python float argument (eps, a softmax scale) as fp64, where
Triton's own launcher passes fp32; every kernel casts such scalars to fp32 first, or its arithmetic silently
turns fp64 (and tl.dot refuses an fp64 accumulator).

Measured (H200, torch 2.11, Triton 3.6, bench/results/e2e_h200/): lille_130m's compiled micro-step (16 x 512,
fused AdamW) ran at 297.6k tokens/s with 'auto' against 212.5k with 'torch' (1.40x, one run; with the opaque
custom ops, issue #12 had measured the defaults through train.py at 0.42x of torch). In a compiled model every
kernel of ours is launched from inductor's own code (tests/test_switch.py, on the GPU).

The interpreter (TRITON_INTERPRET=1, CPU CI): a triton_op cannot trace an interpreted kernel (pytorch#152868:
torch <= 2.11's wrap_triton refuses it), so there `op` makes a plain custom op, whose shape-only ("fake") version
is the same function with its launches skipped. Compiled graphs then keep the kernels opaque, and CI still checks
the autograd wiring and the shapes under torch.compile; the real inlining is checked by the GPU tests.
"""
import os
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import is_fake

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # ImportError, or a broken install: the twins still work
    HAS_TRITON = False

KERNEL_NAMES = ("rmsnorm", "rope", "swiglu", "attention", "cross_entropy", "sophia", "muon")
_CHOICES = ("auto", "triton", "torch")
_backend = {}  # kernel name -> 'auto' | 'triton' | 'torch'

# Measured, not assumed (bench/results/attention.md and e2e_attention_h100/, H100, 2026-11-22): our flash attention
# beats SDPA's FlashAttention-2 backend (1.17-1.23x forward + backward) but not cuDNN's (0.68-0.80x), and SDPA's
# default runs as fast as cuDNN there: training is 1.7% (gpt2_124m, compiled) and 2.2% (auto_g_nano_1b) slower
# with ours. So 'auto' keeps SDPA for attention; `NANOFORGE_KERNELS=auto,attention=triton` opts in.
TWIN_WINS_ON_GPU = ("attention",)


def interpreting():
    """True when Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_backend(spec):
    """Parse 'auto' | 'triton' | 'torch', optionally followed by ',name=choice' overrides."""
    parsed = {}
    for i, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        name, _, choice = part.rpartition("=")
        if choice not in _CHOICES:
            raise ValueError(f"kernels: '{choice}' is not one of {_CHOICES} (in '{spec}')")
        if name == "":
            if i != 0:
                raise ValueError(f"kernels: the default choice must come first (in '{spec}')")
            parsed.update({k: choice for k in KERNEL_NAMES})
        elif name in KERNEL_NAMES:
            parsed[name] = choice
        else:
            raise ValueError(f"kernels: unknown kernel '{name}', known: {KERNEL_NAMES}")
    _backend.clear()
    _backend.update({k: "auto" for k in KERNEL_NAMES})
    _backend.update(parsed)


@contextmanager
def backend_as(spec):
    """set_backend(spec) for the length of a `with` block; the previous choices come back afterwards, whatever
    happens (export.py's ONNX trace through the twins, bench/optim.py's twin timings)."""
    previous = dict(_backend)
    set_backend(spec)
    try:
        yield
    finally:
        _backend.clear()
        _backend.update(previous)


def backend(name):
    return _backend[name]


def use_triton(name, *tensors):
    """Decide, for one call of kernel `name` on `tensors`, whether the Triton kernel runs."""
    choice = _backend[name]
    if choice == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        return HAS_TRITON and on_cuda and name not in TWIN_WINS_ON_GPU
    # forced 'triton': refuse loudly rather than quietly run something else
    if not HAS_TRITON:
        raise RuntimeError(f"kernels: {name} forced to 'triton' but Triton is not installed")
    if not on_cuda and not interpreting():
        raise RuntimeError(f"kernels: {name} forced to 'triton' on CPU tensors; set TRITON_INTERPRET=1 "
                           f"to run the kernel in Triton's interpreter, or NANOFORGE_KERNELS=torch")
    return True


# ----------------------------------------------------------------------------------------------------------
# The wiring (see the docstring): op() and launcher()
# ----------------------------------------------------------------------------------------------------------
def op(name):
    """Decorator: a function that allocates outputs and launches Triton kernels -> the operator nanoforge::name.
    Its type annotations are the operator's schema; it must not modify its inputs."""
    def make(fn):
        if HAS_TRITON and not interpreting():
            return torch.library.triton_op(f"nanoforge::{name}", fn, mutates_args=())
        custom = torch.library.custom_op(f"nanoforge::{name}", fn, mutates_args=())
        custom.register_fake(fn)  # shapes: the same function, whose launches skip shape-only tensors
        return custom
    return make


def launcher(kernel):
    """kernel, ready for `[grid](*args)`: wrap_triton(kernel), so that the compiler records the launch (in eager
    mode it is the kernel itself), or, under the interpreter, the kernel with launches on shape-only tensors
    skipped (there is nothing to compute when the compiler only asks for output shapes)."""
    if interpreting():
        return _Interpreted(kernel)
    return torch.library.wrap_triton(kernel)


def as_rows(t, n):
    """A 2D (rows, n) view of t with unit stride along its last dimension, as a row-wise kernel addresses it;
    copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1 and n > 1:
        t2 = t2.contiguous()
    return t2


class _Interpreted:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                self.kernel[grid](*args, **kwargs)
        return run


set_backend(os.environ.get("NANOFORGE_KERNELS", "auto"))
