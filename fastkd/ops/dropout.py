"""Dropout for students trained on a CPU: one pass of the C++ extension, the mask never stored.

ATen's CPU dropout draws a Mersenne-Twister number per element (bernoulli_), then multiplies in further
passes; with BERT's default probabilities (0.1 on hidden states and attention probabilities) that was
22% of a bf16 distillation step of a 3-layer student on a 2-core Xeon (torch.profiler,
benchmarks/vs_textbrewer.py --profile). `dropout_mask_scale` (csrc/fused_loss_cpu.cpp) keeps an element
when a 16-bit draw of a counter-based hash of (seed, index) is at least t = round(p * 65536): the same
Bernoulli dropout with p rounded to t / 65536, a kept element scaled by 65536 / (65536 - t) (unbiased for the
rounded rate; a p that rounds to 0 or 1 takes torch's dropout), from a different random stream. The seed of each
call is drawn from torch's default generator, so a seeded run is reproducible and a resumed one (whose
generator state is restored) continues exactly; backward rebuilds the mask from the seed.

Elsewhere (a GPU, an unavailable extension, an unsupported dtype) it is torch's own dropout. `use_fast_dropout`
puts it into a model in place of every nn.Dropout; the attention probabilities' dropout (inside the
attention function, fastkd.capture) calls `dropout` directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..capture import PROBABILITY_DROPOUT
from . import builder

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_ELEMENTS = 2 ** 33  # the kernel's 32-bit draw counter, two elements per draw
LEVELS = 65536  # a draw's 16 bits: the drop probability is rounded to a multiple of 1 / LEVELS


def available(x: torch.Tensor) -> bool:
    """Whether `x` takes the fused path (the CPU extension builds once per machine; None: it could not)."""
    return (x.device.type == "cpu" and x.dtype in DTYPES and x.numel() <= MAX_ELEMENTS
            and builder.load("cpu") is not None)


def representable(p: float) -> bool:
    """Whether p rounds to a drop rate strictly between 0 and 1 in LEVELS steps (elsewhere: torch's dropout)."""
    return 0 < math.floor(p * LEVELS + 0.5) < LEVELS  # the kernel's llround


_faked: set[str] = set()


def _op():
    """The loaded op, its shape function registered once (so torch.compile traces through it)."""
    op = builder.load("cpu").dropout_mask_scale
    name = op._qualified_op_name
    if name not in _faked:
        torch.library.register_fake(name)(lambda t, p, seed: torch.empty_like(t))
        _faked.add(name)
    return op


def prepare_compile() -> None:
    """Before compiled code first runs: the op's shape function registered outside any trace (where the
    extension builds; a CPU run builds it here, once per machine)."""
    if builder.load("cpu") is not None:
        _op()


def _mask_scale(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return _op()(x.contiguous(), p, seed)


class _MaskScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: torch.Tensor):
        ctx.p = p
        ctx.save_for_backward(seed)
        return _mask_scale(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        # the same mask (the same seed and indices) and scale: the map is linear, its backward is itself
        # (through the Function again, so a double backward stays connected)
        return _MaskScale.apply(grad, ctx.p, ctx.saved_tensors[0]), None, None


@torch.compiler.disable  # traced, inductor would draw it from its own generator: not the run's stream
def draw_seed() -> torch.Tensor:
    """One 63-bit seed from torch's default generator (the run's RNG policy: seeded, saved, restored), as a
    0-dim CPU tensor (never a Python int: a compiled graph would recompile for every new value)."""
    return torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """torch.nn.functional.dropout(x, p, training), fused on a CPU (see the module's docstring)."""
    if not training or p == 0.0:
        return x
    if not 0.0 < p < 1.0 or not representable(p) or not available(x):
        return torch.nn.functional.dropout(x, p, training)
    return _MaskScale.apply(x, p, draw_seed())


class FastDropout(nn.Dropout):
    """nn.Dropout through `dropout` (a subclass, so code that looks for nn.Dropout still finds it)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # the fused path makes a new tensor; in-place dropout keeps torch's
            return super().forward(input)
        return dropout(input, self.p, self.training)


def _probabilities_dropout(probs: torch.Tensor, p: float) -> torch.Tensor:
    return dropout(probs, p, True)


def _probabilities_dropout_for(query: torch.Tensor):
    """What fastkd.capture asks of an attention module in training: the fused dropout where it applies (a CPU
    with the extension), else None (SDPA's own, fused on a GPU)."""
    return _probabilities_dropout if available(query) else None


def use_fast_dropout(*models: nn.Module) -> None:
    """In place: every plain nn.Dropout of each model becomes a FastDropout of the same probability, and its
    attention modules (transformers' mark them with `is_causal`) drop their probabilities with `dropout`
    when they run fastkd's attention function on a CPU (fastkd.capture). No parameter or buffer changes, so
    weights save and load as before; on a GPU both stay torch's own (SDPA keeps its fused kernel)."""
    for model in models:
        for parent in model.modules():
            if hasattr(parent, "is_causal"):
                setattr(parent, PROBABILITY_DROPOUT, _probabilities_dropout_for)
            for name, child in list(parent.named_children()):
                if type(child) is nn.Dropout:
                    setattr(parent, name, FastDropout(child.p, child.inplace).train(child.training))
