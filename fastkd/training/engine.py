"""The step engine: what every training loop (distill, ZeRO, the search's proxy, bench) drives.

A StepEngine makes one optimizer step at a time, keeps that step's numbers on the device until the
loop reads them (one host sync at logging and checkpoint steps), guards against non-finite steps the
same way everywhere (counted, skipped, the run stopped after --max-bad-steps), writes and restores
its own checkpoint format with an atomic completeness marker, and hands the trained student over for
export. Two implementations: `LocalEngine` (one process, fastkd.training.local) and `ZeroEngine`
(DeepSpeed ZeRO, fastkd.training.zero). The loop (fastkd.training.loop) knows only this interface.
"""

from __future__ import annotations

import abc
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..capture import check_recorded, recording
from ..errors import UserError
from .. import ops
from ..device import isolate_compile_cache
from ..families import compile_layers
from ..ops.dropout import prepare_compile, use_fast_dropout
from ..losses import DistillLoss, LossOutput, RunShapes
from ..teacher import TeacherOutputs

log = logging.getLogger(__name__)

COMPLETE = "fastkd-complete"  # written last into a checkpoint: the checkpoint is whole


class NonFiniteAbort(UserError):
    pass


def student_loss(student, criterion: DistillLoss, batch: dict, teacher_out: TeacherOutputs) -> LossOutput:
    """One student forward with attention capture, scored against the shared teacher outputs."""
    layers = criterion.student_attention_layers()
    with recording(layers, criterion.needs_values()) as rec:
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True, return_dict=True)
    check_recorded(student, rec.records, layers, "student")
    return criterion(out.hidden_states, rec.records, teacher_out)


@dataclass
class StepResult:
    """One optimizer step's numbers, left where they were computed: reading them is a host sync, so
    the loops read them in one go at logging and checkpoint steps (`read`), never per micro-batch."""

    loss: torch.Tensor                 # 0-dim: the mean over micro-batches of the weighted total
    terms: dict[str, torch.Tensor]     # 0-dim each: unweighted, averaged over micro-batches
    grad_norm: torch.Tensor            # 0-dim; nan where not computed
    skipped: torch.Tensor              # 0-dim bool: non-finite, no update


@dataclass
class StepRecord:
    """A StepResult once read: plain numbers, for metrics.jsonl, the window and the skip count."""

    step: int
    loss: float
    terms: dict[str, float]
    grad_norm: float
    skipped: bool


def read_steps(pending: list[tuple[int, StepResult]], reduce=None) -> list[StepRecord]:
    """Every pending step as numbers, with one device-to-host copy (after `reduce`, which may average
    the table over ranks: one collective instead of one per micro-batch)."""
    if not pending:
        return []
    names = sorted(set().union(*(r.terms for _, r in pending)))
    nan = torch.full((), float("nan"), device=pending[0][1].loss.device)
    table = torch.stack([torch.stack([r.loss.float(), r.grad_norm.float(), r.skipped.float()]
                                     + [r.terms.get(k, nan).float() for k in names]) for _, r in pending]).double()
    if reduce is not None:
        table = reduce(table)
    records = []
    for (step, _), row in zip(pending, table.tolist()):
        records.append(StepRecord(step, row[0], dict(zip(names, row[3:])), row[1], row[2] > 0.5))
    return records


def window_means(window) -> dict[str, float]:
    """Mean of each logged quantity over the last window of steps (less noisy than the last step)."""
    keys = [k for k in (window[-1] if window else {}) if k != "step"]
    return {k: float(np.mean([row[k] for row in window if k in row])) for k in keys}


class StepEngine(abc.ABC):
    """One student (and its loss projections) trained step by step against a frozen teacher.

    The bookkeeping every engine shares lives here: the step count, skipped steps, elapsed seconds,
    the window of recent losses the final numbers are averaged over, and the steps not read yet."""

    # What a non-finite step means in the warning (the local engine checks the gradient too).
    nonfinite_what = "loss or gradient"

    def __init__(self, cfg, teacher, student, criterion: DistillLoss, stream, device: torch.device):
        self.cfg = cfg
        self.teacher = teacher
        self.student = student
        use_fast_dropout(student)  # ATen's CPU dropout was a fifth of a bf16 step (fastkd.ops.dropout)
        if cfg.compile:
            isolate_compile_cache()
            if device.type == "cpu":
                prepare_compile()
            compile_layers(student)
            if teacher is not None:
                compile_layers(teacher.model)
        self.criterion = criterion
        self.stream = stream
        self.device = device
        self.step = 0
        self.bad_steps = 0
        self.elapsed = 0.0
        self.window: deque[dict] = deque(maxlen=max(1, cfg.log_every))
        self.pending: list[tuple[int, StepResult]] = []  # steps not read yet (see read)
        self.stop_requested = False  # set by the loop before a step: a stop signal arrived here

    # --- what each engine implements ------------------------------------------------------------
    @abc.abstractmethod
    def train_step(self, shared: list[tuple[dict, TeacherOutputs]] | None = None) -> StepResult:
        """One optimizer step, appended to `pending`. `shared`: micro-batches with teacher outputs
        computed once for several students (the search's generation); None: the engine reads its own
        stream and teacher."""

    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate of the step just taken."""

    @abc.abstractmethod
    def save_checkpoint(self, output: Path, keep: int) -> Path:
        """Write a checkpoint of this step under OUTPUT/checkpoints (complete or absent), keep the newest
        `keep`. A collective where there are several ranks: every rank calls it at the same steps."""

    @abc.abstractmethod
    def load_checkpoint(self, output: Path) -> Path | None:
        """Restore the newest complete checkpoint under `output`; None when there is none."""

    @abc.abstractmethod
    def trained_student(self):
        """The student as float32 weights for export, on the main process; None on the others. A
        collective where there are several ranks."""

    def trained_sentence_dense(self) -> dict | None:
        """The sentence term's learned projection of a narrower student (losses.DistillLoss), as float32
        {"weight", "bias"} for its pipeline's Dense, on the main process; None without one and on the
        other processes. A collective where there are several ranks."""
        projection = None if self.criterion is None else self.criterion.sentence_projection
        if projection is None:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in projection.state_dict().items()}

    @property
    def seqs_per_step(self) -> int:
        """Sequences one optimizer step learns from (over every rank)."""
        return self.cfg.batch_size * self.cfg.grad_accum

    @property
    def is_main(self) -> bool:
        """The process that writes metrics, the run's config and the export."""
        return True

    def reduce_over_ranks(self, table: torch.Tensor) -> torch.Tensor:
        """The logged numbers' table averaged over ranks (identity for one process)."""
        return table

    def agree_to_stop(self, local: bool) -> bool:
        """Whether to stop after the step just taken (a stop signal arrived); `local`: on this process."""
        return local

    def agree_to_stop_now(self, local: bool) -> bool:
        """The same question asked once after the last step."""
        return local

    def tokens_seen(self) -> int | None:
        """Real (unpadded) tokens this rank has read, for the logged rate; None where its stream does not
        count them (the rate then assumes full-length sequences)."""
        return None if self.stream is None else self.stream.real_tokens()

    def describe(self) -> dict:
        """Engine-specific facts for the run's config and the model card (empty for one process)."""
        return {}

    def run_shapes(self) -> RunShapes:
        """The sizes of one micro-batch for the loss ops: the run's batch, and its corpus's typical length
        (packed rows are all --max-seq-len long; a batch of sentences pads to its own longest)."""
        seq = self.cfg.max_seq_len if self.stream is None else self.stream.typical_length()
        return RunShapes.of(self.student.config, self.teacher.model.config, self.cfg.batch_size, seq)

    def prepare_losses(self, pinned: list[dict] = ()) -> dict:
        """Self-check every loss op before the first step and, under `auto`, time the passing backends on
        the run's shapes (fastkd.ops.select); `pinned`: the choices a resumed run's start made
        (its config.json's loss_selections), kept. Returns {op: {dtypes: backend}}."""
        ops.select.pin(list(pinned))
        return self.criterion.prepare(self.device, self.loss_input_dtypes(), self.run_shapes())

    def loss_input_dtypes(self) -> list:
        """The dtypes the loss ops will see (a dtype for both models, or (student, teacher) pairs),
        for their self-check before the first step: float32, and bf16 under --bf16 autocast."""
        return [torch.float32] + ([torch.bfloat16] if self.cfg.bf16 else [])

    def on_main(self, work):
        """`work()` on the main process only (its result there, None elsewhere); its UserError is
        every process's."""
        return work()

    # --- shared ---------------------------------------------------------------------------------
    def count_bad_step(self, step: int) -> None:
        """A skipped step: counted, logged, and the run stopped after --max-bad-steps."""
        cfg, what = self.cfg, self.nonfinite_what
        self.bad_steps += 1
        log.warning("step %d: non-finite %s, update skipped (%d so far)", step, what, self.bad_steps)
        if self.bad_steps >= cfg.max_bad_steps:
            raise NonFiniteAbort(
                f"aborted at step {step}: {self.bad_steps} steps had a non-finite {what} "
                f"(limit --max-bad-steps {cfg.max_bad_steps}); lower --lr, drop --bf16, or check the corpus")

    def read(self) -> StepRecord | None:
        """Read every step since the last read (one host sync; over ranks, one collective): skipped
        steps are counted (and the run stopped after --max-bad-steps), the others enter the window.
        Returns the latest step's record."""
        records, self.pending = read_steps(self.pending, self.reduce_over_ranks), []
        for r in records:
            if r.skipped:
                self.count_bad_step(r.step)
            else:
                self.window.append({"step": r.step, "loss": r.loss, **r.terms})
        return records[-1] if records else None

    def final_losses(self) -> dict[str, float]:
        return window_means(self.window)

    def final_steps(self) -> list[int] | None:
        """The first and last step the final losses average over (skipped steps are not in the
        window: after a run of them, the window is older than the last step, and says so)."""
        if not self.window or not all("step" in row for row in self.window):  # (a checkpoint's rows from before)
            return None
        return [self.window[0]["step"], self.window[-1]["step"]]

    def bookkeeping(self) -> dict:
        """The loop's state in a checkpoint (besides weights, optimizer and RNG)."""
        return {"step": self.step, "bad_steps": self.bad_steps, "elapsed": self.elapsed,
                "stream": self.stream.state_dict(), "window": list(self.window)}

    def restore_bookkeeping(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.step, self.bad_steps, self.elapsed = state["step"], state["bad_steps"], state["elapsed"]
        self.window = deque(state["window"], maxlen=self.window.maxlen)
