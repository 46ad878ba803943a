"""Layer-wise distillation losses: the plain torch reference.

Conventions (TinyBERT for MSE terms, MiniLM for the KL term):
- hidden states: mean over real tokens and teacher dims of (W h_s + b - h_t)^2, W a learned
  projection per mapped student layer when widths differ (identity when they match);
- attention scores: pre-softmax, scaled by each model's own 1/sqrt(head_dim); mean over heads and
  valid (query, key) pairs, a pair being valid when both positions are real tokens;
- heads: equal head counts compare head by head; different counts compare head-averaged scores
  (and head-averaged attention distributions for the KL term);
- each term is the mean over the mapped layer pairs, logged unweighted; total = sum of w * term.

DistillLoss runs its terms through fastkd.fused, which picks a backend (the functions here are the
`torch` one; cpp/triton/cuda are fused kernels checked against them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .capture import AttentionRecord
from .mapping import LayerMapping

TERMS = ("embedding", "hidden", "attention", "attention_kl")


@dataclass(frozen=True)
class LossWeights:
    embedding: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0
    attention_kl: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def pair_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) token mask -> (B, 1, S, S) bool: query i and key j both real."""
    m = attention_mask.bool()
    return (m[:, :, None] & m[:, None, :])[:, None]


def attention_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, H, S, d) x2 -> (B, H, S, S) pre-softmax scores."""
    return torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling


def _match_heads(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if student.shape[1] == teacher.shape[1]:
        return student, teacher
    return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)


def attention_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over heads and valid (i, j) of (s - t)^2. Scores: (B, H, S, S); mask (B, S)."""
    s, t = _match_heads(student_scores.float(), teacher_scores.float())
    valid = pair_mask(attention_mask)
    diff = torch.where(valid, s - t, torch.zeros((), device=s.device))
    count = valid.sum() * s.shape[1]
    return diff.pow(2).sum() / count.clamp(min=1)


def record_scores(record: AttentionRecord) -> torch.Tensor:
    """The layer's pre-softmax scores: recorded ones if the forward kept them, else from Q and K."""
    if record.scores is not None:
        return record.scores.float()
    return attention_scores(record.query, record.key, record.scaling)


def attention_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
    """MiniLM: KL(softmax(t) || softmax(s)) over real keys, mean over heads and real queries."""
    key_valid = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    neg = torch.finfo(torch.float32).min
    s_logp = torch.log_softmax(student_scores.float().masked_fill(~key_valid, neg), dim=-1)
    t_logp = torch.log_softmax(teacher_scores.float().masked_fill(~key_valid, neg), dim=-1)
    if student_scores.shape[1] != teacher_scores.shape[1]:
        # Compare head-averaged distributions.
        s_logp = torch.logsumexp(s_logp, dim=1, keepdim=True) - torch.log(torch.tensor(float(s_logp.shape[1])))
        t_logp = torch.logsumexp(t_logp, dim=1, keepdim=True) - torch.log(torch.tensor(float(t_logp.shape[1])))
    kl = torch.where(key_valid, t_logp.exp() * (t_logp - s_logp), torch.zeros((), device=s_logp.device)).sum(-1)
    query_valid = attention_mask.bool()[:, None, :]  # (B, 1, S)
    count = query_valid.sum() * kl.shape[1]
    return torch.where(query_valid, kl, torch.zeros((), device=kl.device)).sum() / count.clamp(min=1)


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
               projection: nn.Module | None = None) -> torch.Tensor:
    """Mean over real tokens and teacher dims of (proj(h_s) - h_t)^2. Hidden: (B, S, D)."""
    hs = student_hidden.float()
    if isinstance(projection, nn.Linear):
        # In float32 whatever the weights' dtype (DeepSpeed bf16 keeps 16-bit weights, with no autocast).
        bias = None if projection.bias is None else projection.bias.float()
        hs = torch.nn.functional.linear(hs, projection.weight.float(), bias)
    elif projection is not None:  # any other map (tests, custom heads)
        hs = projection(hs)
    mask = attention_mask.bool()[..., None]
    diff = torch.where(mask, hs - teacher_hidden.float(), torch.zeros((), device=hs.device))
    count = mask.sum() * teacher_hidden.shape[-1]
    return diff.pow(2).sum() / count.clamp(min=1)


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]  # unweighted, one per active term

    def scalars(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in self.terms.items()}


class HiddenProjection(nn.Linear):
    """A learned width projection (student -> teacher hidden size) whose forward *is* the hidden-state
    loss through it. Being called as a module is what lets DeepSpeed ZeRO-3 gather its partitioned
    weight around the fused kernels, which read the weight without ever forming the projection."""

    def forward(self, student_hidden, teacher_hidden, attention_mask, backend: str) -> torch.Tensor:
        from . import fused

        return fused.hidden_mse(student_hidden, teacher_hidden, attention_mask, self, backend)


class DistillLoss(nn.Module):
    """Holds the mapping, the term weights and the learned width projections (trained with the student)."""

    def __init__(self, mapping: LayerMapping, student_hidden: int, teacher_hidden: int,
                 weights: LossWeights = LossWeights(), backend: str | None = None):
        super().__init__()
        self.mapping = mapping
        self.weights = weights
        self.backend_request = backend  # None: $FASTKD_LOSS_BACKEND or auto, resolved on the inputs' device
        needs_projection = student_hidden != teacher_hidden
        projected = ([0] if weights.embedding else []) + ([m for m, _ in mapping.pairs()] if weights.hidden else [])
        self.projections = nn.ModuleDict(
            {str(m): HiddenProjection(student_hidden, teacher_hidden) for m in projected} if needs_projection else {}
        )

    # Which layers each side must expose, so nothing else is kept in memory.
    def student_hidden_layers(self) -> list[int]:
        return ([0] if self.weights.embedding else []) + ([m for m, _ in self.mapping.pairs()] if self.weights.hidden else [])

    def teacher_hidden_layers(self) -> list[int]:
        return ([0] if self.weights.embedding else []) + ([g for _, g in self.mapping.pairs()] if self.weights.hidden else [])

    def _uses_attention(self) -> bool:
        return bool(self.weights.attention or self.weights.attention_kl)

    def student_attention_layers(self) -> list[int]:
        return [m for m, _ in self.mapping.pairs()] if self._uses_attention() else []

    def teacher_attention_layers(self) -> list[int]:
        return sorted({g for _, g in self.mapping.pairs()}) if self._uses_attention() else []

    def _projection(self, layer: int):
        return self.projections[str(layer)] if str(layer) in self.projections else None

    def _hidden_term(self, student_hidden, teacher_hidden, mask, layer: int, backend: str) -> torch.Tensor:
        from . import fused

        projection = self._projection(layer)
        if projection is None:
            return fused.hidden_mse(student_hidden, teacher_hidden, mask, None, backend)
        return projection(student_hidden, teacher_hidden, mask, backend)

    def backend(self, device: torch.device) -> str:
        from . import fused

        return fused.resolve_backend(self.backend_request, device)

    def forward(self, student_hidden, student_attention: dict[int, AttentionRecord], teacher) -> LossOutput:
        """student_hidden: indexable by layer (0 = embeddings); teacher: TeacherOutputs."""
        from . import fused

        mask = teacher.attention_mask
        backend = self.backend(mask.device)
        w = self.weights
        pairs = self.mapping.pairs()
        terms: dict[str, torch.Tensor] = {}
        if w.embedding:
            terms["embedding"] = self._hidden_term(student_hidden[0], teacher.hidden[0], mask, 0, backend)
        if w.hidden and pairs:
            terms["hidden"] = torch.stack([
                self._hidden_term(student_hidden[m], teacher.hidden[g], mask, m, backend)
                for m, g in pairs
            ]).mean()
        if self._uses_attention() and pairs:
            mse, kl = [], []
            for m, g in pairs:
                rs, rt = student_attention[m], teacher.attention[g]
                if w.attention:
                    if rs.scores is not None and rt.scores is not None:
                        mse.append(fused.attention_mse_scores(rs.scores, rt.scores, mask, backend))
                    else:  # from Q and K: the fused backends never form an S x S tensor
                        mse.append(fused.attention_mse_qk(rs.query, rs.key, rt.query, rt.key, mask, rs.scaling,
                                                          rt.scaling, backend))
                if w.attention_kl:
                    kl.append(attention_kl(record_scores(rs), record_scores(rt), mask))
            if mse:
                terms["attention"] = torch.stack(mse).mean()
            if kl:
                terms["attention_kl"] = torch.stack(kl).mean()
        if not terms:
            raise ValueError("no active loss term: every weight is zero or the mapping supervises nothing")
        total = sum(getattr(w, name) * value for name, value in terms.items())
        return LossOutput(total, terms)
