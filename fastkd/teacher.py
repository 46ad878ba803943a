"""One frozen teacher forward per batch, shared by every student of the step.

The teacher runs under torch.inference_mode(). Inference tensors cannot be saved for a student's
backward, so only what the losses read (the mapped layers' hidden states and attention records) is cloned out as
ordinary tensors; everything else is freed with the inference context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import AttentionRecord, check_recorded, recording


@dataclass
class TeacherOutputs:
    """hidden[l]: (B, S, D) for l in the requested layers (0 = embeddings); attention[l]: its record."""

    hidden: dict[int, torch.Tensor]
    attention: dict[int, AttentionRecord]
    attention_mask: torch.Tensor  # (B, S), 1 = real token


class Teacher:
    """Wraps a loaded teacher; counts forwards so callers can prove the teacher ran once per batch."""

    def __init__(self, model, hidden_layers, attention_layers,
                 autocast_dtype: torch.dtype | None = None, values: bool = False):
        self.model = model
        self.values = values  # keep V of the attention layers (the relation terms)
        self.hidden_layers = sorted(set(hidden_layers))
        self.attention_layers = sorted(set(attention_layers))
        self.autocast_dtype = autocast_dtype
        self.forwards = 0

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> TeacherOutputs:
        device = input_ids.device
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        with torch.inference_mode(), autocast, recording(self.attention_layers, self.values) as rec:
            # token_type_ids only when given: DistilBERT, ModernBERT and MPNet take none.
            types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **types,
                             output_hidden_states=True, return_dict=True)
            hidden = {l: out.hidden_states[l] for l in self.hidden_layers}
            records = dict(rec.records)
            del out
        check_recorded(self.model, records, self.attention_layers, "teacher")
        self.forwards += 1
        # A clone taken outside inference_mode is an ordinary tensor a student's backward may save.
        hidden = {l: h.clone() for l, h in hidden.items()}
        attention = {l: r.clone() for l, r in records.items()}
        return TeacherOutputs(hidden, attention, attention_mask)
