"""Layer-wise distillation losses: DistillLoss, the terms it sums, their weights.

Conventions (TinyBERT for MSE terms, MiniLM for the KL term):
- hidden states: mean over real tokens and teacher dims of (W h_s + b - h_t)^2, W a learned
  projection per mapped student layer when widths differ (identity when they match);
- attention scores: pre-softmax, scaled by each model's own 1/sqrt(head_dim); mean over heads and
  valid (query, key) pairs, a pair being valid when both positions are real tokens;
- heads: equal head counts compare head by head; different counts compare head-averaged scores
  (and head-averaged attention distributions for the KL term);
- families whose scores are more than a scaled Q K^T (DeBERTa's disentangled terms, MPNet's
  relative bias) record their full scores, and a local-attention layer (ModernBERT) its window: such
  pairs run the torch reference on the (B, H, S, S) scores, valid pairs being the window's as well as
  real tokens (the narrower window where a local and a global layer meet), and ran_on says so;
- sentence embedding (sentence-transformers' layer-reduction recipe, arXiv 2004.09813): both models'
  last layers pooled (and normalised) as the teacher's pipeline does; the term is the squared L2
  distance of the two embeddings, mean over the batch (sentence-transformers' MSELoss x D, so its
  scale sits beside the other terms); a narrower student's pooled embedding goes through a learned
  linear projection to the teacher's width first (its pipeline's Dense after export);
- each term is the mean over the mapped layer pairs, logged unweighted; total = sum of w * term.

The terms themselves are ops (fastkd.ops: one module each, with the torch reference and the fused
backends); each runs on the backend fastkd.ops.select chose and self-checked for its inputs.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import ops
from .capture import AttentionRecord
from .mapping import LayerMapping
from .errors import UserError
from .families import family_of
from .sentence import SentencePooling, SentenceProjection, read_pooling, sentence_embedding

log = logging.getLogger(__name__)

TERMS = ("embedding", "hidden", "attention", "attention_kl", "value_kl", "relation", "sentence")
_SAID_REFERENCE: set[tuple[str, str]] = set()
RELATION_OP = "relation_kl"  # how ran_on reports the relation terms (the attention_kl op on relation heads)


@dataclass(frozen=True)
class LossWeights:
    embedding: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0
    attention_kl: float = 0.0
    value_kl: float = 0.0  # MiniLM: KL of the value relations softmax(V V^T / sqrt(d)), per relation head
    relation: float = 0.0  # MiniLMv2: Q-Q + K-K + V-V relation KLs over R relation heads
    sentence: float = 0.0  # the teacher pipeline's sentence embedding of the last layers (squared L2 distance)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# The objectives as whole recipes (each a preset of the weights; a weight given explicitly overrides it):
#   tinybert  TinyBERT: embedding and hidden-state MSE, pre-softmax attention-score MSE
#   minilm    MiniLM (arXiv 2002.10957): attention-distribution KL and value-relation KL
#   minilmv2  MiniLMv2 (arXiv 2012.15828): Q-Q, K-K and V-V self-attention relation KL
#   sentence  sentence-transformers' layer reduction: the sentence embedding alone
OBJECTIVES = {
    "tinybert": LossWeights(),
    "minilm": LossWeights(embedding=0.0, hidden=0.0, attention=0.0, attention_kl=1.0, value_kl=1.0),
    "minilmv2": LossWeights(embedding=0.0, hidden=0.0, attention=0.0, relation=1.0),
    "sentence": LossWeights(embedding=0.0, hidden=0.0, attention=0.0, sentence=1.0),
}


def objective_weights(objective: str, **overrides: float | None) -> LossWeights:
    """The objective's weights with the given (non-None) ones in their place."""
    base = asdict(OBJECTIVES[objective])
    base.update({k: v for k, v in overrides.items() if v is not None})
    return LossWeights(**base)


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]  # unweighted, one per active term, on the device

    def detached(self) -> dict[str, torch.Tensor]:
        """The terms as device tensors without their graph (read them at logging steps only)."""
        return {k: v.detach() for k, v in self.terms.items()}

    def scalars(self) -> dict[str, float]:
        """The terms as floats: a host sync, for tests and one-off reports."""
        return {k: float(v.detach()) for k, v in self.terms.items()}


class HiddenProjection(nn.Linear):
    """A learned width projection (student -> teacher hidden size) whose forward *is* the hidden-state
    loss through it. Being called as a module is what lets DeepSpeed ZeRO-3 gather its partitioned
    weight around the fused kernels, which read the weight without ever forming the projection."""

    def forward(self, student_hidden, teacher_hidden, attention_mask, backend: str) -> torch.Tensor:
        return ops.hidden_mse.hidden_mse(student_hidden, teacher_hidden, attention_mask, self, backend)


@dataclass(frozen=True)
class RunShapes:
    """The sizes a run's loss ops see in one step (one micro-batch of `batch` x `seq` tokens), for `auto` to
    time the backends on (DistillLoss.prepare)."""

    batch: int
    seq: int
    student_hidden: int
    student_heads: int
    teacher_hidden: int
    teacher_heads: int

    @property
    def student_head_dim(self) -> int:
        return self.student_hidden // self.student_heads

    @property
    def teacher_head_dim(self) -> int:
        return self.teacher_hidden // self.teacher_heads

    @classmethod
    def of(cls, student_config, teacher_config, batch: int, seq: int) -> "RunShapes":
        (_, s_hidden, s_heads, _), (_, t_hidden, t_heads, _) = (family_of(c).sizes(c)
                                                                for c in (student_config, teacher_config))
        return cls(batch, seq, s_hidden, s_heads, t_hidden, t_heads)

    def label(self) -> str:
        return (f"B{self.batch} x S{self.seq}, student {self.student_heads}x{self.student_head_dim}, "
                f"teacher {self.teacher_heads}x{self.teacher_head_dim}")


class DistillLoss(nn.Module):
    """Holds the mapping, the term weights and the learned width projections (trained with the student)."""

    def __init__(self, mapping: LayerMapping, student_hidden: int, teacher_hidden: int,
                 weights: LossWeights = LossWeights(), backend: str | None = None, relation_heads: int | None = None,
                 pooling: SentencePooling | None = None):
        super().__init__()
        self.mapping = mapping
        self.weights = weights
        self.pooling = pooling or SentencePooling()  # how the sentence term pools (the teacher's pipeline)
        # A narrower student's sentence embedding reaches the teacher's width through a learned linear
        # projection (sentence-transformers' recipe for students of another width): trained with the
        # student, exported as a Dense module of its pipeline (fastkd.sentence.copy_pipeline).
        self.sentence_projection = (SentenceProjection(student_hidden, teacher_hidden)
                                    if weights.sentence and student_hidden != teacher_hidden else None)
        self.relation_heads = relation_heads  # R of the relation terms (value_kl, relation); None: each side's heads
        if (weights.value_kl or weights.relation) and relation_heads is None:
            raise ValueError("the relation terms need relation_heads")
        self.backend_request = backend  # None: $FASTKD_LOSS_BACKEND or auto, resolved per op, device and dtype
        self._ran: dict[tuple, str] = {}  # (op, device, dtypes) -> backend, as this loss ran them
        self._reference: dict[tuple, str] = {}  # (op, device, dtypes) -> why some pairs ran the reference
        # Each op's timing at the run's shapes, once prepare() has them (`auto` decides per shapes); built
        # once, not at every call of the step.
        self._timings: dict[str, ops.select.Timing] = {}
        needs_projection = student_hidden != teacher_hidden
        projected = ([0] if weights.embedding else []) + ([m for m, _ in mapping.pairs()] if weights.hidden else [])
        self.projections = nn.ModuleDict(
            {str(m): HiddenProjection(student_hidden, teacher_hidden) for m in projected} if needs_projection else {}
        )

    @classmethod
    def for_teacher(cls, mapping: LayerMapping, student_hidden: int, teacher_model, weights: LossWeights,
                    backend: str | None = None, requested_relation_heads: int | None = None,
                    pooling: SentencePooling | None = None) -> "DistillLoss":
        """The loss of a student under `teacher_model` as every run builds it (distill, ZeRO, the search's
        proxy, bench): R for the relation terms resolved against both widths, the sentence term pooling
        as the teacher's pipeline does (`pooling`: already read, as the search reads it once for all its
        candidates). Draws its projections' initialisation from the global RNG."""
        return cls(mapping, student_hidden, teacher_model.config.hidden_size, weights, backend=backend,
                   relation_heads=relation_heads(weights, requested_relation_heads, teacher_model.config,
                                                 student_hidden),
                   pooling=pooling or sentence_pooling(teacher_model.name_or_path, weights))

    # Which layers each side must expose, so nothing else is kept in memory.
    def student_hidden_layers(self) -> list[int]:
        return sorted(set(([0] if self.weights.embedding else []) + ([m for m, _ in self.mapping.pairs()]
                          if self.weights.hidden else []) + ([self.mapping.student_layers] if self.weights.sentence else [])))

    def teacher_hidden_layers(self) -> list[int]:
        return sorted(set(([0] if self.weights.embedding else []) + ([g for _, g in self.mapping.pairs()]
                          if self.weights.hidden else []) + ([self.mapping.teacher_layers] if self.weights.sentence else [])))

    def _uses_attention(self) -> bool:
        w = self.weights
        return bool(w.attention or w.attention_kl or w.value_kl or w.relation)

    def needs_values(self) -> bool:
        """Whether the records must carry V (the value relations)."""
        return bool(self.weights.value_kl or self.weights.relation)

    def student_attention_layers(self) -> list[int]:
        return [m for m, _ in self.mapping.pairs()] if self._uses_attention() else []

    def teacher_attention_layers(self) -> list[int]:
        return sorted({g for _, g in self.mapping.pairs()}) if self._uses_attention() else []

    def active_ops(self) -> list[str]:
        """The fastkd.ops this loss runs."""
        w, pairs = self.weights, self.mapping.pairs()
        names = [ops.hidden_mse.NAME] if w.embedding or (w.hidden and pairs) else []
        if pairs and w.attention:
            names.append(ops.attention_mse.NAME)
        if pairs and (w.attention_kl or w.value_kl or w.relation):
            names.append(ops.attention_kl.NAME)
        return names

    def backend(self, device: torch.device) -> str:
        """The backend requested and present on `device` (each op may still fall back after its self-check)."""
        return ops.resolve_backend(self.backend_request, device)

    def prepare(self, device: torch.device, dtypes, shapes: "RunShapes | None" = None) -> dict[str, dict[str, str]]:
        """Self-check every active op now (not in the middle of the first step) for each dtype in
        `dtypes`: a dtype for both models, or a (student, teacher) pair; returns {op: {dtype: backend}}
        for the run's config. With the run's `shapes`, `auto` times the passing backends on them and
        keeps the fastest (fastkd.ops.select; the timings are in ops.selections())."""
        pairs = [d if isinstance(d, tuple) else (d, d) for d in dtypes]
        self._timings = {} if shapes is None else {op: self._timing(op, shapes) for op in self.active_ops()}
        return {op: {ops.select.dtype_label(s, t): ops.backend_for(op, self.backend_request, device, s, t,
                                                                   self._timings.get(op))
                     for s, t in pairs} for op in self.active_ops()}

    def selections(self) -> list[dict]:
        """The process's decisions (fastkd.ops.select) for this loss's ops and request: its check, and under
        auto the shapes and each passing backend's time."""
        request = ops.backends.requested(self.backend_request)
        return [s for s in ops.selections() if s["op"] in self.active_ops() and s["requested"] == request
                and s["shape"] == self._shape_label(s["op"])]

    def _shape_label(self, op: str) -> str | None:
        """The shapes `op`'s decisions for this loss are kept under: its timing's label under a timed auto,
        else None."""
        timing = self._timings.get(op)
        return timing.shape if timing is not None and ops.backends.requested(self.backend_request) == "auto" else None

    def _timing(self, op: str, shapes: "RunShapes | None") -> "ops.select.Timing | None":
        """What `op` computes in one step of this loss at `shapes`, for `auto` to time the backends on: one
        case per kind of call (a hidden pair with or without the projection; attention scores; each
        relation of Q, K or V), each as large as one layer pair's."""
        if shapes is None:
            return None
        w, B, S = self.weights, shapes.batch, shapes.seq
        wide = shapes.student_hidden != shapes.teacher_hidden
        scores = op == ops.attention_mse.NAME or (op == ops.attention_kl.NAME and bool(w.attention_kl))
        relations = (3 if w.relation else 0) + (1 if w.value_kl else 0) if op == ops.attention_kl.NAME else 0
        # The label names what is timed, so no other loss at the same sizes reuses the choice.
        label = shapes.label() + ("" if op != ops.hidden_mse.NAME else ", projected" if wide else ", same width")
        if op == ops.attention_kl.NAME:
            label += (", scores" if scores else "") + (f", {relations} relations of {self.relation_heads} heads"
                                                       if relations else "")

        def cases(device, dtype, teacher_dtype, gen):
            def qk(heads_s, d_s, heads_t, d_t):
                q_s, k_s = (torch.randn(B, heads_s, S, d_s, generator=gen).to(device, dtype) for _ in range(2))
                q_t, k_t = (torch.randn(B, heads_t, S, d_t, generator=gen).to(device, teacher_dtype) for _ in range(2))
                return q_s, k_s, q_t, k_t

            mask = torch.ones(B, S, dtype=torch.long, device=device)  # every position real: the costliest batch
            if op == ops.hidden_mse.NAME:
                h_s = torch.randn(B, S, shapes.student_hidden, generator=gen).to(device, dtype)
                h_t = torch.randn(B, S, shapes.teacher_hidden, generator=gen).to(device, teacher_dtype)
                projection = None
                if wide:
                    projection = nn.utils.skip_init(nn.Linear, shapes.student_hidden, shapes.teacher_hidden,
                                                    device=device)
                    with torch.no_grad():
                        projection.weight.copy_(torch.randn(projection.weight.shape, generator=gen) * 0.02)
                        projection.bias.zero_()
                return [((h_s, h_t, mask, projection), (0,))]
            out = []
            q_s, k_s, q_t, k_t = qk(shapes.student_heads, shapes.student_head_dim, shapes.teacher_heads,
                                    shapes.teacher_head_dim)
            if scores:
                out.append(((q_s, k_s, q_t, k_t, mask, shapes.student_head_dim ** -0.5,
                             shapes.teacher_head_dim ** -0.5), (0, 1)))
            if relations:  # as relation_kl calls the op: each model's heads regrouped into R (strided views)
                r_s = ops.attention_kl.relation_heads(q_s, self.relation_heads)
                r_t = ops.attention_kl.relation_heads(q_t, self.relation_heads)
                relation = ((r_s, r_s, r_t, r_t, mask, r_s.shape[-1] ** -0.5, r_t.shape[-1] ** -0.5), (0,))
                out += [relation] * relations
            return out

        return ops.select.Timing(label, cases)

    def _op_backend(self, op: str, student: torch.Tensor, teacher: torch.Tensor, report: str | None = None) -> str:
        """The backend `op` runs on for these inputs, noted under `report` (default: the op's name) as
        what actually ran: a fused backend that hands these inputs to the reference says so."""
        backend = ops.backend_for(op, self.backend_request, student.device, student.dtype, teacher.dtype,
                                  self._timings.get(op))
        effective = backend
        if op == ops.attention_mse.NAME and ops.attention_mse.merged_too_wide(student, teacher, backend):
            effective = "torch (heads too wide for the GPU tiles)"
        why = ops.attention_kl.reference_reason(student, teacher, backend) if op == ops.attention_kl.NAME else None
        if why:
            effective = f"torch ({why})"
        self._ran[(report or op, str(student.device), ops.select.dtype_label(student.dtype, teacher.dtype))] = effective
        return backend

    def _ran_reference(self, op: str, rs: AttentionRecord, rt: AttentionRecord) -> None:
        """Note (and say once per op and reason) that a layer pair ran the reference on full scores."""
        reason = "full scores" if rs.scores is not None or rt.scores is not None else "local attention window"
        s, t = (r.scores if r.scores is not None else r.query for r in (rs, rt))
        key = (op, str(s.device), ops.select.dtype_label(s.dtype, t.dtype))
        if (op, reason) not in _SAID_REFERENCE:
            _SAID_REFERENCE.add((op, reason))
            log.info("%s: the torch reference runs on the (B, H, S, S) scores of layers with %s (the fused "
                     "backends take plain global Q K^T scores only)", op, reason)
        self._reference[key] = reason

    def ran_on(self) -> list[dict]:
        """What each op of this loss ran on, per device and dtypes, with its self-check's outcome
        (for fastkd.json and fastkd bench); only what this loss ran, not the whole process."""
        out = []
        for key in dict.fromkeys([*self._ran, *self._reference]):
            op, device, dtypes = key
            backend = self._ran.get(key)
            if key in self._reference:
                reference = f"torch ({self._reference[key]})"
                backend = reference if backend is None else f"{backend}; {reference} for the other layers"
            checked = ops.attention_kl.NAME if op == RELATION_OP else op  # relations run the attention KL op
            check = next((s["check"] for s in ops.selections() if s["op"] == checked and s["device"] == device
                          and s["dtype"] == dtypes and s["requested"] == ops.backends.requested(self.backend_request)
                          and s["shape"] == self._shape_label(checked)), None)
            out.append({"op": op, "device": device, "dtype": dtypes, "backend": backend, "check": check})
        return out

    def _hidden_term(self, student_hidden, teacher_hidden, mask, layer: int) -> torch.Tensor:
        backend = self._op_backend(ops.hidden_mse.NAME, student_hidden, teacher_hidden)
        projection = self.projections[str(layer)] if str(layer) in self.projections else None
        if projection is None:
            return ops.hidden_mse.hidden_mse(student_hidden, teacher_hidden, mask, None, backend)
        return projection(student_hidden, teacher_hidden, mask, backend)

    def _attention_terms(self, rs: AttentionRecord, rt: AttentionRecord, mask) -> dict[str, torch.Tensor]:
        """The attention-based terms of one (student, teacher) layer pair."""
        w, out = self.weights, {}
        if w.attention or w.attention_kl:
            if not (rs.plain and rt.plain):
                # A family's full scores or a local window: the reference on (B, H, S, S) scores.
                window = min((r.window for r in (rs, rt) if r.window is not None), default=None)
                s_scores, t_scores = rs.full_scores(), rt.full_scores()
                if w.attention:
                    self._ran_reference(ops.attention_mse.NAME, rs, rt)
                    out["attention"] = ops.attention_mse.scores_mse(s_scores, t_scores, mask, window)
                if w.attention_kl:
                    self._ran_reference(ops.attention_kl.NAME, rs, rt)
                    out["attention_kl"] = ops.attention_kl.scores_kl(s_scores, t_scores, mask, window)
            else:
                args = (rs.query, rs.key, rt.query, rt.key, mask, rs.scaling, rt.scaling)
                if w.attention:  # from Q and K: the fused backends never form an S x S tensor
                    out["attention"] = ops.attention_mse.attention_mse_qk(
                        *args, self._op_backend(ops.attention_mse.NAME, rs.query, rt.query))
                if w.attention_kl:
                    out["attention_kl"] = ops.attention_kl.attention_kl_qk(
                        *args, self._op_backend(ops.attention_kl.NAME, rs.query, rt.query))
        if self.needs_values():
            # Relations are over all real tokens of both models (a local layer's window is its own
            # business: the relation is a property of its Q, K or V, not of its attention).
            def relation(xs, xt):
                r = self.relation_heads
                backend = self._op_backend(ops.attention_kl.NAME, ops.attention_kl.relation_heads(xs, r),
                                           ops.attention_kl.relation_heads(xt, r), report=RELATION_OP)
                return ops.attention_kl.relation_kl(xs, xt, mask, r, backend)
            if w.value_kl:
                out["value_kl"] = relation(rs.value, rt.value)
            if w.relation:
                out["relation"] = relation(rs.query, rt.query) + relation(rs.key, rt.key) + relation(rs.value, rt.value)
        return out

    def forward(self, student_hidden, student_attention: dict[int, AttentionRecord], teacher) -> LossOutput:
        """student_hidden: indexable by layer (0 = embeddings); teacher: TeacherOutputs."""
        mask = teacher.attention_mask
        w = self.weights
        pairs = self.mapping.pairs()
        terms: dict[str, torch.Tensor] = {}
        if w.embedding:
            terms["embedding"] = self._hidden_term(student_hidden[0], teacher.hidden[0], mask, 0)
        if w.hidden and pairs:
            terms["hidden"] = torch.stack([
                self._hidden_term(student_hidden[m], teacher.hidden[g], mask, m) for m, g in pairs
            ]).mean()
        if self._uses_attention() and pairs:
            per_pair: dict[str, list[torch.Tensor]] = {}
            for m, g in pairs:
                for name, value in self._attention_terms(student_attention[m], teacher.attention[g], mask).items():
                    per_pair.setdefault(name, []).append(value)
            terms.update({name: torch.stack(values).mean() for name, values in per_pair.items()})
        if w.sentence:  # the last layers, whatever the mapping: the embedding the pipelines put out
            s_embedding = sentence_embedding(student_hidden[self.mapping.student_layers], mask, self.pooling,
                                             self.sentence_projection)
            t_embedding = (teacher.sentence if teacher.sentence is not None else  # (labelled once: SentenceLabels)
                           sentence_embedding(teacher.hidden[self.mapping.teacher_layers], mask, self.pooling))
            terms["sentence"] = (s_embedding - t_embedding).pow(2).sum(-1).mean()
        if not terms:
            raise ValueError("no active loss term: every weight is zero or the mapping supervises nothing")
        total = sum(getattr(w, name) * value for name, value in terms.items())
        return LossOutput(total, terms)


# --- the weights and settings a run's loss resolves to (distill, ZeRO, the search's proxy, bench) ---

def loss_weights(cfg) -> LossWeights:
    """The objective's weights with the --w-* given in their place."""
    return objective_weights(cfg.objective, embedding=cfg.w_embedding, hidden=cfg.w_hidden, attention=cfg.w_attention,
                             attention_kl=cfg.w_attention_kl, value_kl=cfg.w_value_kl, relation=cfg.w_relation,
                             sentence=getattr(cfg, "w_sentence", None))


def relation_heads(weights: LossWeights, requested: int | None, teacher_config, student_hidden: int) -> int | None:
    """R for the relation terms (None when none is active): the teacher's heads unless given; both
    models' concatenated heads (their hidden sizes) must split into R equal slices."""
    if not (weights.value_kl or weights.relation):
        if requested is not None:  # silently ignoring it would leave the user believing relations were learned
            raise UserError(f"--relation-heads {requested} has no effect: these loss weights have no relation term; "
                            "use --objective minilm or minilmv2, or set --w-relation / --w-value-kl above 0")
        return None
    family = family_of(teacher_config)
    _, t_hidden, t_heads, _ = family.sizes(teacher_config)
    heads = requested or t_heads
    for who, width in (("teacher", t_hidden), ("student", student_hidden)):
        if width % heads:
            raise UserError(f"--relation-heads {heads} does not divide the {who}'s hidden size {width}: pick R so "
                            f"that both {t_hidden} and {student_hidden} split into R equal slices")
    return heads


def sentence_pooling(teacher: str, weights: LossWeights):
    """How the sentence term pools (the teacher's pipeline), or None without the term; a pipeline fastkd
    cannot read is refused in one line. (A narrower student learns a projection: losses.DistillLoss.)"""
    if not weights.sentence:
        return None
    from .models import resolve_model_path  # (models builds students from the teacher; nothing there needs the losses)

    return read_pooling(resolve_model_path(teacher))
