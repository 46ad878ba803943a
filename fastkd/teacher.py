"""One frozen teacher forward per batch, shared by every student of the step.

The teacher runs under torch.inference_mode(). Inference tensors cannot be saved for a student's
backward, so only what the losses read (the mapped layers' hidden states and attention records) is cloned out as
ordinary tensors; everything else is freed with the inference context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .capture import AttentionRecord, check_recorded, recording


@dataclass
class TeacherOutputs:
    """hidden[l]: (B, S, D) for l in the requested layers (0 = embeddings); attention[l]: its record."""

    hidden: dict[int, torch.Tensor]
    attention: dict[int, AttentionRecord]
    attention_mask: torch.Tensor  # (B, S), 1 = real token
    sentence: torch.Tensor | None = None  # (B, D): the pipeline's sentence embeddings, where labelled once (below)


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

    @classmethod
    def serving(cls, model, criteria, bf16: bool = False) -> "Teacher":
        """The teacher one forward of which serves every loss in `criteria` (DistillLoss-like: the layers
        each reads, and whether it needs V): one student's run, or a whole search generation's."""
        return cls(model, sorted({l for c in criteria for l in c.teacher_hidden_layers()}),
                   sorted({l for c in criteria for l in c.teacher_attention_layers()}),
                   autocast_dtype=torch.bfloat16 if bf16 else None, values=any(c.needs_values() for c in criteria))

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


LABEL_BATCH = 64  # rows per teacher forward while labelling (length-sorted, so little padding)
LABELS_MAX_BYTES = 2 * 2 ** 30  # above this, the labels would crowd out the run: the teacher runs per batch
LABELS_MIN_EPOCHS = 1.5  # labelling costs one pass over the corpus: worth it where a run reads it more often


class SentenceLabels:
    """The teacher's sentence embedding of every corpus row, computed once and reused every epoch.

    For an objective that reads nothing of the teacher but its sentence embedding (`sentence`), a
    teacher forward per batch is wasted after the first epoch; sentence-transformers' recipe labels its
    sentences once for the same reason. The rows are labelled in a fixed order (length-sorted batches of
    LABEL_BATCH, or the run's batch if smaller), whatever the seed or the stream's position, so a resumed run
    reads the very same labels.
    """

    def __init__(self, teacher: Teacher, stream, pooling, layer: int, device: torch.device, progress: bool = False,
                 batch_size: int = LABEL_BATCH):
        from tqdm.auto import tqdm

        from .sentence import sentence_embedding

        started = time.perf_counter()
        order = np.argsort(stream.lengths, kind="stable") if stream.lengths is not None else np.arange(stream.n)
        self.labels = None
        size = min(LABEL_BATCH, batch_size)  # (the run's memory check allowed its own batch, not more)
        for start in tqdm(range(0, stream.n, size), desc="teacher labels", unit="batch", leave=False,
                          disable=not progress):
            rows = order[start:start + size].tolist()
            batch = {k: v.to(device) for k, v in stream.rows(rows).items()}
            out = teacher(batch["input_ids"], batch["attention_mask"])
            embedding = sentence_embedding(out.hidden[layer], batch["attention_mask"], pooling)
            if self.labels is None:
                self.labels = torch.empty((stream.n, embedding.shape[-1]), dtype=torch.float32, device=device)
            self.labels[torch.as_tensor(rows, device=device)] = embedding.float()
        self.seconds = time.perf_counter() - started

    def outputs(self, rows: list[int], attention_mask: torch.Tensor) -> TeacherOutputs:
        return TeacherOutputs({}, {}, attention_mask, self.labels[torch.as_tensor(rows, device=self.labels.device)])


def labels_pay_off(weights, rows_read: int, corpus_rows: int, width: int, room: int | None = None) -> bool:
    """Whether a run should label its corpus once instead of running the teacher per batch: its objective
    reads only the sentence embedding, it reads the corpus LABELS_MIN_EPOCHS times or more, and the labels
    (float32, kept on the run's device) stay under LABELS_MAX_BYTES and under `room`, the bytes the device
    has left beside the step (None: not known)."""
    only_sentence = weights.sentence and not any(v for k, v in weights.as_dict().items() if k != "sentence")
    size = corpus_rows * width * 4
    return bool(only_sentence and rows_read >= LABELS_MIN_EPOCHS * corpus_rows
                and size <= LABELS_MAX_BYTES and (room is None or size <= room))
