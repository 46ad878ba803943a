"""How like its teacher a distilled student is on held-out text: forward passes only, no task.

Candidate cheap rungs for the fidelity ladder (issue 24 measures them against the student a user
ships, benchmarks/proxy_vs_final.py):

- `embedding_cosine`: the mean cosine between the student's and the teacher's sentence embedding
  (the teacher's pipeline pooling) of each held-out sentence: the distance the sentence objective
  closes, taken on text neither model trained on.
- `cka_embedding`: linear CKA (Kornblith et al. 2019, arXiv 1905.00414) between the two models'
  sentence embeddings over the held-out sentences: whether they arrange the sentences alike,
  whatever rotation or scale separates them.
- `cka_mapped`: the mean, over supervised student layers, of the linear CKA between the student
  layer's mean-pooled states and those of the teacher layer the mapping assigns it.

The teacher's side is computed once (TeacherReference) and serves every candidate.
"""

from __future__ import annotations

import torch

from ..mapping import LayerMapping
from ..padding import pad_batch
from ..sentence import SentencePooling, sentence_embedding


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples (n x d1, n x d2), in float64:
    ||Y'^T X'||_F^2 / (||X'^T X'||_F ||Y'^T Y'||_F) with X', Y' centred over the examples. 1 for
    representations equal up to rotation and isotropic scale; 0 for unrelated ones (as n grows)."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"linear_cka needs the same n >= 2 examples on both sides (got {x.shape[0]} and {y.shape[0]})")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


@torch.no_grad()
def pooled_states(model, ids: list[list[int]], pad_id: int, pooling: SentencePooling,
                  batch_size: int = 64) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer (0 = embeddings), the mean-pooled hidden states of every sentence (n x d, float32),
    and the sentence embedding under `pooling`; eval mode, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    layers: list[list[torch.Tensor]] = []
    embeddings = []
    mean = SentencePooling("mean", normalize=False)
    for start in range(0, len(ids), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(ids[start:start + batch_size], pad_id).items()}
        hidden_states = model(**batch, output_hidden_states=True).hidden_states
        if not layers:
            layers = [[] for _ in hidden_states]
        for i, h in enumerate(hidden_states):
            layers[i].append(sentence_embedding(h, batch["attention_mask"], mean).float().cpu())
        embeddings.append(sentence_embedding(hidden_states[-1], batch["attention_mask"], pooling).float().cpu())
    model.train(was_training)
    return [torch.cat(parts) for parts in layers], torch.cat(embeddings)


class TeacherReference:
    """The teacher's pooled layers and sentence embeddings of the held-out sentences, computed once."""

    def __init__(self, teacher_model, tokenizer, sentences: list[str], pooling: SentencePooling,
                 max_seq_len: int = 64, batch_size: int = 64):
        if len(sentences) < 2:
            raise ValueError("TeacherReference needs at least 2 held-out sentences")
        self.ids = tokenizer(list(sentences), truncation=True, max_length=max_seq_len)["input_ids"]
        self.pad_id = tokenizer.pad_token_id or 0
        self.pooling = pooling
        self.batch_size = batch_size
        self.layers, self.embedding = pooled_states(teacher_model, self.ids, self.pad_id, pooling, batch_size)

    def likeness(self, student, mapping: LayerMapping) -> dict[str, float]:
        """embedding_cosine, cka_embedding and cka_mapped of `student` (see the module)."""
        layers, embedding = pooled_states(student, self.ids, self.pad_id, self.pooling, self.batch_size)
        if len(layers) - 1 != len(mapping.layers):
            raise ValueError(f"the student has {len(layers) - 1} layers, the mapping {mapping.text} maps "
                             f"{len(mapping.layers)}")
        cosine = torch.nn.functional.cosine_similarity(embedding.double(), self.embedding.double(), dim=-1)
        mapped = [linear_cka(layers[i + 1], self.layers[t]) for i, t in enumerate(mapping.layers) if t is not None]
        return {"embedding_cosine": float(cosine.mean()), "cka_embedding": linear_cka(embedding, self.embedding),
                "cka_mapped": sum(mapped) / len(mapped) if mapped else None}  # None: no layer supervised
