"""Per-layer attention from any supported encoder family, without forking it.

Two mechanisms, chosen per family (fastkd.families):
- the registry: transformers lets a custom attention function be registered and selected per model.
  fastkd's records Q and K (after any rotary embedding) and the sliding window, and otherwise behaves
  like SDPA attention, so models run their fused attention for their own forward;
- score hooks, for families whose attention bypasses the registry (DeBERTa-v2/v3, MPNet) and whose
  scores are not a plain scaled Q K^T anyway (relative-position terms): a forward pre-hook on the
  self-attention module enters a TorchFunctionMode that keeps the first softmax input, the full
  pre-softmax scores exactly as the family computes them; the forward hook leaves the mode.

Trap (why the mask function is registered too): the encoder builds its 4D mask with the mask
function registered under the *same name* as the attention implementation. A custom attention
function registered alone receives attention_mask=None, and padding is silently ignored.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .errors import UserError

ATTN_NAME = "fastkd_capture"
# Set on a model's attention modules by whoever trains it (fastkd.ops.dropout.use_fast_dropout, a layer above
# this one): a callable taking the layer's query and returning the dropout to apply to its probabilities,
# (probabilities, p) -> dropped, or None where it does not pay (a GPU, no extension). With dropout in training,
# SDPA on a CPU leaves its fused kernel for its math path, which forms the probabilities anyway and drops them
# with ATen's slow per-element draw; the capture function then forms them itself, as that path does (in
# float32), and drops them with the fused op.
PROBABILITY_DROPOUT = "fastkd_probability_dropout"


@dataclass
class AttentionRecord:
    """What one layer's attention left behind.

    Plain records (query, key, scaling; shapes (B, H, S, d)): the pre-softmax scores are
    scaling * q k^T, which the losses form, or never do on the fused backends. Families whose scores
    carry more (relative-position terms) record `scores`, the (B, H, S, S) softmax input (padding
    already filled with a large negative value). `window`: a local-attention layer's keys are those
    with |i - j| <= window (ModernBERT); None = global attention."""

    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    scaling: float | None = None
    scores: torch.Tensor | None = None
    window: int | None = None
    value: torch.Tensor | None = None  # (B, H, S, d), when the recording asked for values

    @property
    def plain(self) -> bool:
        """Global attention whose scores are scaling * q k^T: what the fused ops take."""
        return self.scores is None and self.window is None

    def full_scores(self) -> torch.Tensor:
        """(B, H, S, S) pre-softmax scores in float32."""
        if self.scores is not None:
            return self.scores.float()
        return torch.matmul(self.query.float(), self.key.float().transpose(-1, -2)) * self.scaling

    def clone(self) -> "AttentionRecord":
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return AttentionRecord(c(self.query), c(self.key), self.scaling, c(self.scores), self.window, c(self.value))


@dataclass
class Recorder:
    """Collects records of one forward, indexed by 1-based layer number (call order)."""

    layers: frozenset[int] | None = None  # None: keep every layer
    values: bool = False  # keep V too (the value relations need it)
    records: dict[int, AttentionRecord] = field(default_factory=dict)
    calls: int = 0
    open_modes: list = field(default_factory=list)  # score-hook modes entered and not yet left


_active: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("fastkd_recorder", default=None)


@torch.compiler.disable  # (--compile: a ContextVar and the recorder's counters stay Python, never traced)
def _next_layer() -> tuple[Recorder | None, int | None]:
    """Count one attention call of the active forward; the layer number when it is to be kept."""
    recorder = _active.get()
    if recorder is None:
        return None, None
    recorder.calls += 1
    layer = recorder.calls
    if recorder.layers is not None and layer not in recorder.layers:
        return recorder, None
    return recorder, layer


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query/key/value: (B, H, S, d); attention_mask: (B, 1, S, S) additive, or None without padding.
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    mask = attention_mask  # as built: float32, additive (the own path below adds it in float32)
    if attention_mask is not None and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)  # bf16 autocast: SDPA wants matching dtypes
    recorder, layer = _next_layer()
    if layer is not None:
        # transformers' encoders pass a local layer's window in flash-attention's convention (the
        # mask keeps |i - j| <= window, the kwarg is window + 1); the family test checks it against
        # the mask the model builds.
        window = kwargs.get("sliding_window")
        recorder.records[layer] = AttentionRecord(query, key, scaling,
                                                  window=None if window is None else int(window) - 1,
                                                  value=value if recorder.values else None)
    p = dropout if module.training else 0.0
    choose = getattr(module, PROBABILITY_DROPOUT, None) if p > 0.0 else None
    drop = choose(query) if choose is not None else None
    if drop is not None:
        # SDPA's math path in float32, as it computes 16-bit inputs; the scale on Q (not on S x S scores); the
        # dropped probabilities multiply V in its dtype (bf16 under autocast, as a fused kernel's P V would).
        with torch.autocast(query.device.type, enabled=False):
            scores = torch.matmul(query.float() * scaling, key.float().transpose(-1, -2))
            if mask is not None:
                scores = scores + mask.float()
            out = torch.matmul(drop(torch.softmax(scores, dim=-1), p).to(value.dtype), value)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=p, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    AttentionInterface.register(ATTN_NAME, _capture_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


_register()


def use_registry(model) -> None:
    """Route the model's attention through the capture function (a no-op outside `recording`)."""
    model.set_attn_implementation(ATTN_NAME)


class _FirstSoftmaxInput(TorchFunctionMode):
    """Inside one self-attention forward: keeps the input of its first softmax (the scores)."""

    def __init__(self):
        super().__init__()
        self.scores = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.scores is None and func is torch.nn.functional.softmax:
            self.scores = args[0]
        return func(*args, **(kwargs or {}))


def _scores_pre_hook(module, args):
    recorder, layer = _next_layer()
    if layer is not None:
        mode = _FirstSoftmaxInput()
        mode.__enter__()
        module._fastkd_scores = (mode, recorder, layer, [None, None, None])
        recorder.open_modes.append((module, mode))


def _projection_hook(owner, index, submodule, args, output):
    """The first output of the owner's Q (0), K (1) or V (2) projection in a recorded forward (DeBERTa
    projects K and Q again for its relative terms: those later calls are not Q/K)."""
    state = owner.__dict__.get("_fastkd_scores")
    if state is not None and state[1].values and state[3][index] is None:
        state[3][index] = output


def _scores_post_hook(module, args, output):
    state = module.__dict__.pop("_fastkd_scores", None)
    if state is None:
        return
    mode, recorder, layer, projected = state
    mode.__exit__(None, None, None)
    recorder.open_modes.remove((module, mode))
    if mode.scores is not None:  # else the guard names the layer
        # Q, K, V as (B, H, S, d) for the relation terms, when asked for (values) and seen.
        q, k, v = (None if x is None else x.view(*x.shape[:2], module.num_attention_heads, -1).transpose(1, 2)
                   for x in projected)
        recorder.records[layer] = AttentionRecord(query=q, key=k, scores=mode.scores, value=v)


def hook_scores(modules, projections: tuple[str, ...] = ()) -> None:
    """Record the pre-softmax scores of each self-attention module (once per module; the hooks do
    nothing outside `recording`). Call order numbers the layers, as for the registry.
    projections: the module's Q, K and V linear submodules, whose outputs a recording with values
    keeps too (the relation terms)."""
    for module in modules:
        if "_fastkd_hooks" not in module.__dict__:
            handles = [module.register_forward_pre_hook(_scores_pre_hook),
                       module.register_forward_hook(_scores_post_hook, always_call=True)]
            for index, name in enumerate(projections):
                handles.append(getattr(module, name).register_forward_hook(
                    functools.partial(_projection_hook, module, index)))
            module._fastkd_hooks = tuple(handles)


def unhook_scores(modules) -> None:
    for module in modules:
        for handle in module.__dict__.pop("_fastkd_hooks", ()):
            handle.remove()


@contextlib.contextmanager
def recording(layers=None, values: bool = False):
    """Record attention of the forward run inside the block.

    layers: 1-based layer numbers to keep (others are not held in memory); None keeps all.
    values: keep each kept layer's V as well (registry families).
    """
    recorder = Recorder(frozenset(layers) if layers is not None else None, values)
    token = _active.set(recorder)
    try:
        yield recorder
    finally:
        _active.reset(token)
        # torch runs always_call forward hooks after an Exception only: a KeyboardInterrupt or
        # SystemExit inside a hooked attention would leave its mode on torch's stack for good.
        for module, mode in reversed(recorder.open_modes):
            module.__dict__.pop("_fastkd_scores", None)
            mode.__exit__(None, None, None)
        recorder.open_modes.clear()


def check_recorded(model, records, layers, role: str) -> None:
    """The capture guard: every layer a loss needs recorded its attention. A model whose capture was
    never enabled (or was switched back to a stock implementation) records nothing: one clear line
    instead of a KeyError inside the loss."""
    missing = sorted(set(layers) - set(records))
    if missing:
        config = getattr(model, "config", None)
        family = getattr(config, "model_type", type(model).__name__)
        implementation = getattr(config, "_attn_implementation", None)
        raise UserError(f"the {role} (a {family} model, attention implementation {implementation!r}) recorded no "
                        f"attention for layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}: its "
                        f"attention does not go through fastkd's capture; enable it on the model "
                        f"(fastkd.families.enable_capture, as load_teacher and build_student do)")
