"""Per-layer Q and K from any BERT-family model, without forking it.

transformers lets a custom attention function be registered and selected per model. fastkd's
records what the distillation losses need and otherwise behaves like SDPA attention, so models
run their fused attention for their own forward.

Trap (why the mask function is registered too): the encoder builds its 4D mask with the mask
function registered under the *same name* as the attention implementation. A custom attention
function registered alone receives attention_mask=None, and padding is silently ignored.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .errors import UserError

ATTN_NAME = "fastkd_capture"


@dataclass
class AttentionRecord:
    """What one layer's attention left behind. Shapes: q, k (B, H, S, d); the pre-softmax scores are
    scaling * q k^T (the losses form them, or never do on the fused backends)."""

    query: torch.Tensor
    key: torch.Tensor
    scaling: float


@dataclass
class Recorder:
    """Collects records of one forward, indexed by 1-based layer number (call order)."""

    layers: frozenset[int] | None = None  # None: keep every layer
    records: dict[int, AttentionRecord] = field(default_factory=dict)
    calls: int = 0


_active: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("fastkd_recorder", default=None)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query/key/value: (B, H, S, d); attention_mask: (B, 1, S, S) additive, or None without padding.
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if attention_mask is not None and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)  # bf16 autocast: SDPA wants matching dtypes
    recorder = _active.get()
    layer = None
    if recorder is not None:
        recorder.calls += 1
        layer = recorder.calls
        if recorder.layers is not None and layer not in recorder.layers:
            layer = None
    if layer is not None:
        recorder.records[layer] = AttentionRecord(query, key, scaling)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    AttentionInterface.register(ATTN_NAME, _capture_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


_register()


def enable_capture(model) -> None:
    """Route the model's attention through the capture function (a no-op outside `recording`)."""
    model.set_attn_implementation(ATTN_NAME)


def disable_capture(model, implementation: str = "sdpa") -> None:
    """Back to a stock attention implementation (before export: saved configs stay clean)."""
    model.set_attn_implementation(implementation)


@contextlib.contextmanager
def recording(layers=None):
    """Record attention of the forward run inside the block.

    layers: 1-based layer numbers to keep (others are not held in memory); None keeps all.
    """
    recorder = Recorder(frozenset(layers) if layers is not None else None)
    token = _active.set(recorder)
    try:
        yield recorder
    finally:
        _active.reset(token)


def check_recorded(model, records, layers, role: str) -> None:
    """The capture guard: every layer a loss needs recorded its attention. A family whose attention
    bypasses the attention-function registry (or a model loaded with another implementation)
    records nothing: one clear line instead of a KeyError inside the loss."""
    missing = sorted(set(layers) - set(records))
    if missing:
        config = getattr(model, "config", None)
        family = getattr(config, "model_type", type(model).__name__)
        implementation = getattr(config, "_attn_implementation", None)
        raise UserError(f"the {role} (a {family} model, attention implementation {implementation!r}) recorded no "
                        f"attention for layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}: its "
                        f"attention does not go through fastkd's capture; use a supported family or load it with "
                        f"fastkd (attn_implementation {ATTN_NAME!r})")
