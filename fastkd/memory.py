"""How much memory one distillation step needs, estimated from the shapes alone, and the refusal of
a step that cannot fit the machine, before anything is allocated.

Why: a batch nobody can hold (`--batch-size 100000000`, or 10**30 in a config file) otherwise starts
loading, then sits in one step for minutes swapping and is OOM-killed with no message. The estimate
is linear in the batch, `fixed + per_sequence x batch`, so the largest batch that fits follows from
it and the refusal can name it.

It is an upper-bound-ish count of the tensors a step holds at its peak (measured within about 2x of
the real peak on a CPU for the sizes people run; tests/test_memory_limits.py): the teacher's and
the student's weights, the student's gradients and AdamW state, the activations the student keeps
for its backward, the teacher's captured outputs, the loss terms' (B, H, S, S) tensors on the
reference path, and the batch. Allocator slack and the interpreter itself are not counted: they are
already in what the machine reports as used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal

import torch

from .errors import UserError
from .families import family_of

FLOAT32 = 4
HALF = 2  # bf16 autocast: matmul outputs in 16 bits (softmax, losses and LayerNorm stay float32)
ADAMW_BYTES = FLOAT32 * 4  # weight, gradient, exp_avg, exp_avg_sq
INT64 = 8


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one step: `fixed` whatever the batch, plus `per_sequence` for each sequence of it."""

    fixed: int
    per_sequence: int

    def total(self, batch: int) -> int:
        return self.fixed + self.per_sequence * batch

    def max_batch(self, available: int) -> int:
        """The largest batch whose step fits in `available` bytes (0: not even one sequence)."""
        return max(0, (available - self.fixed) // self.per_sequence)


@dataclass(frozen=True)
class Shape:
    """What the count needs of one model: layers, widths, heads, vocabulary and positions."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    positions: int
    glu: bool = False  # ModernBERT's FFN input is 2 x ffn wide (gated)

    def parameters(self) -> int:
        h, f = self.hidden, self.ffn
        embeddings = (self.vocab + self.positions + 2) * h + 2 * h + h * h + h  # with LayerNorm and pooler
        ffn_in = (2 if self.glu else 1) * h * f
        layer = 4 * (h * h + h) + ffn_in + f + f * h + h + 4 * h  # Q K V O, FFN in and out, two LayerNorms
        return embeddings + self.layers * layer


def teacher_shape(config) -> Shape:
    layers, hidden, heads, ffn = family_of(config).sizes(config)
    return Shape(layers, hidden, heads, ffn, config.vocab_size, config.max_position_embeddings,
                 glu=getattr(config, "model_type", None) == "modernbert")


def student_of(teacher: Shape, shape) -> Shape:
    """A fastkd.models.StudentShape as counted here: the teacher's vocabulary and positions."""
    return Shape(shape.layers, shape.hidden, shape.heads, shape.ffn, teacher.vocab, teacher.positions, teacher.glu)


def step_memory(teacher_config, student_shape, pairs: int, seq_len: int, weights=None, *, bf16: bool = False,
                relation_heads: int | None = None, partitions: int = 1) -> StepMemory:
    """The estimate for distilling `student_shape` (a StudentShape) from the teacher of `teacher_config`
    with `pairs` supervised layer pairs, sequences of `seq_len` tokens, loss `weights` (LossWeights;
    None counts every term) and bf16 autocast or not. `partitions`: the ranks ZeRO splits the
    gradients and AdamW state over (every stage splits the optimizer state; counted as split)."""
    t = teacher_shape(teacher_config)
    s = student_of(t, student_shape)
    fixed = t.parameters() * FLOAT32 + s.parameters() * (FLOAT32 + (ADAMW_BYTES - FLOAT32) // max(1, partitions))
    # Hidden-state projections (student width -> teacher width), trained like the student.
    if s.hidden != t.hidden:
        fixed += (pairs + 1) * (s.hidden * t.hidden + t.hidden) * ADAMW_BYTES
    if bf16:  # autocast keeps a 16-bit copy of each weight it casts
        fixed += (t.parameters() + s.parameters()) * HALF
    per_sequence = (_student_activations(s, seq_len, bf16) + _teacher_outputs(t, seq_len, pairs, bf16)
                    + _loss_terms(s, t, seq_len, pairs, weights, relation_heads) + _batch(seq_len))
    return StepMemory(fixed, per_sequence)


def _student_activations(s: Shape, seq: int, bf16: bool) -> int:
    """What the student keeps for its backward, per sequence: per layer the inputs and outputs of
    its linear layers (Q, K, V, context, output, FFN, LayerNorms: about 12 x hidden + 3 x FFN per
    token) and, where attention runs unfused, the scores and probabilities; one more layer for the
    activation gradients alive during the backward, and the embeddings."""
    act = HALF if bf16 else FLOAT32
    linear = seq * (12 * s.hidden + 3 * s.ffn) * act
    scores = 2 * s.heads * seq * seq * FLOAT32
    embeddings = 4 * seq * s.hidden * FLOAT32
    return (s.layers + 1) * (linear + scores) + embeddings


def _teacher_outputs(t: Shape, seq: int, pairs: int, bf16: bool) -> int:
    """The teacher runs without gradients, but asks for every hidden state (all layers alive until
    the forward ends), keeps Q, K and V of the captured layers and clones them out; at its peak one
    layer's temporaries are alive too."""
    act = HALF if bf16 else FLOAT32
    hidden_states = (t.layers + 1) * seq * t.hidden * act
    captured = 2 * (pairs + 1) * 4 * seq * t.hidden * FLOAT32  # hidden, Q, K, V; and their clones
    one_layer = seq * (4 * t.hidden + 2 * t.ffn) * act + 2 * t.heads * seq * seq * FLOAT32
    return hidden_states + captured + one_layer


def _loss_terms(s: Shape, t: Shape, seq: int, pairs: int, weights, relation_heads: int | None) -> int:
    """Per supervised pair, the reference path's tensors (the fused backends form fewer): for each
    attention term both models' (B, H, S, S) scores, their difference or softmaxes, kept for the
    backward; for each relation term R x S x S relations of both models and their softmaxes; for the
    hidden term the projected student state and its difference to the teacher's."""
    def weight(name: str) -> float:
        return 1.0 if weights is None else getattr(weights, name)

    scores = (s.heads + t.heads) * seq * seq * FLOAT32
    attention = sum(2 * scores for name in ("attention", "attention_kl") if weight(name))
    r = relation_heads or t.heads
    relations = (1 if weight("value_kl") else 0) + (3 if weight("relation") else 0)
    relation = relations * 4 * r * seq * seq * FLOAT32
    hidden = 2 * seq * t.hidden * FLOAT32 if weight("hidden") else 0
    embedding = 2 * seq * t.hidden * FLOAT32 if weight("embedding") else 0
    # The sentence term: both last layers in float32 and the masked product kept for the backward.
    sentence = 3 * seq * t.hidden * FLOAT32 if weight("sentence") else 0
    return pairs * (attention + relation + hidden) + embedding + sentence


def _batch(seq: int) -> int:
    """input_ids and attention_mask as int64, with the copies made on their way from the dataset;
    and the batch's index (a Python int) in the data stream."""
    return 4 * 2 * seq * INT64 + 64


# --- what the machine has --------------------------------------------------------------------------

def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free for this step, where): a GPU's free memory, else the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    import psutil

    available, where = psutil.virtual_memory().available, "of RAM available on this machine"
    room = _cgroup_room()
    if room is not None and room < available:  # a container's or a Slurm job's limit, not the host's RAM
        available, where = room, "left under this job's memory limit (cgroup)"
    return available, where


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still take (v2 memory.max, else v1's limit), or None unlimited."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:  # ("max", or v1's huge number: no limit)
            return max(0, int(limit) - usage)
    return None


def size_text(n: int) -> str:
    """Bytes in GiB, also for the absurd sizes a float cannot hold (10**400 sequences)."""
    gib = Decimal(n) / Decimal(2 ** 30)
    return f"{gib:.1f} GiB" if gib < 10 ** 6 else f"{gib:.2e} GiB"


def check_step_fits(memory: StepMemory, batch: int, seq_len: int, device: torch.device, *,
                    batch_flag: str = "--batch-size", seq_flag: str = "--max-seq-len", sharing: int = 1,
                    what: str = "a distillation step") -> None:
    """Refuse in one line a step whose estimate exceeds the memory available (split between the
    `sharing` processes of this run on one machine, each holding its own step), naming both and the
    batch that would fit. FASTKD_MEMORY_CHECK=0 skips it: the estimate errs high (up to about 2x),
    and a user who knows the step fits must not be locked out."""
    if os.environ.get("FASTKD_MEMORY_CHECK", "1").strip() == "0":
        return
    available, where = available_memory(device)
    share = available // max(1, sharing)
    need = memory.total(batch)
    if need <= share:
        return
    have = f"{size_text(available)} {where}" if sharing <= 1 else \
        f"{size_text(share)} per rank ({size_text(available)} {where}, {sharing} ranks)"
    fits = memory.max_batch(share)
    if fits >= 1:
        fix = f"lower {batch_flag} (at most about {fits} fits)"
    else:
        fix = f"even {batch_flag} 1 does not fit: lower {seq_flag} or use a smaller student or teacher"
    raise UserError(f"{what} at {batch_flag} {batch} and {seq_flag} {seq_len} needs about {size_text(need)} "
                    f"(estimated from the model shapes), but {have}: {fix} (FASTKD_MEMORY_CHECK=0 skips this check)")
