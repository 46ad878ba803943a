"""The single-process step engine and its checkpoint format.

Exact resume: a checkpoint holds the student, the loss projections, optimizer, scheduler, every
RNG state (fastkd.rng) and the data stream position (one integer), so 10 steps + resume + 10 steps
gives the same parameters as 20 straight steps on a CPU.

Format: OUTPUT/checkpoints/step-NNNNNNNN/ holding state.pt and the completeness marker, staged under
a temporary name, fsynced and renamed into place: a checkpoint directory is complete or absent.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch

from .. import optim, rng
from ..device import warn_if_bf16_emulated
from ..errors import UserError
from ..io import no_space_is_one_line, staging_dir
from ..teacher import TeacherOutputs
from .engine import COMPLETE, StepEngine, StepResult, student_loss

log = logging.getLogger(__name__)

FORMAT = 1  # of state.pt, recorded in the marker


class LocalEngine(StepEngine):
    """One student, its loss projections and its optimizer in this process."""

    def __init__(self, cfg, teacher, student, criterion, stream, labels=None):
        super().__init__(cfg, teacher, student, criterion, stream, next(student.parameters()).device)
        self.labels = labels  # SentenceLabels: the teacher's embeddings of every row, computed once
        self.params = [p for m in (student, criterion) for p in m.parameters() if p.requires_grad]
        # fused: one kernel per parameter group, and it skips a non-finite step on the device
        # (found_inf, see train_step) without the host ever looking at the gradient norm.
        self.optimizer = optim.adamw([student, criterion], cfg.lr, cfg.weight_decay, fused=True)
        self.scheduler = optim.warmup_then_linear(self.optimizer, cfg.warmup, cfg.max_steps)
        self.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
        if cfg.bf16:
            warn_if_bf16_emulated(self.device)

    def describe(self) -> dict:
        if self.labels is None:
            return {}
        how = (f"read from the labels store ({self.labels.path.name})" if self.labels.stored else "computed once"
               + (f" (the first {self.labels.resumed_rows} by an interrupted run, their seconds not counted)"
                  if self.labels.resumed_rows else ""))
        return {"teacher_labels": f"sentence embeddings of all {len(self.labels.labels)} corpus rows, {how}",
                "teacher_labels_s": round(self.labels.seconds, 1)}

    def next_inputs(self) -> tuple[dict, TeacherOutputs]:
        """The next micro-batch and the teacher's outputs for it (one teacher forward, or its labels)."""
        rows, batch = self.stream.take()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.labels is not None:
            return batch, self.labels.outputs(rows, batch["attention_mask"])
        return batch, self.teacher(batch["input_ids"], batch["attention_mask"])

    def train_step(self, shared=None) -> StepResult:
        """One optimizer step with no host sync: a non-finite loss or gradient skips the update on the
        device, and the numbers stay there until `read`."""
        cfg = self.cfg
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch, teacher_out = shared[micro] if shared is not None else self.next_inputs()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_dtype is not None):
                out = self.compute_loss(batch, teacher_out)
            loss = out.total / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach().float()
            for k, v in out.detached().items():
                totals[k] = totals.get(k, 0.0) + v.float() / cfg.grad_accum
        max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # a device tensor
        skipped = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
        # The protocol torch.amp.GradScaler uses: fused AdamW leaves parameters, moments and its step
        # count untouched where found_inf is 1. The schedule still advances (it counts steps taken,
        # known without a sync); a run with skipped steps is as reproducible as any other.
        self.optimizer.found_inf, self.optimizer.grad_scale = skipped.float(), None
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf, self.optimizer.grad_scale
        self.scheduler.step()
        self.step += 1
        result = StepResult(loss_sum, totals, grad_norm.detach(), skipped)
        self.pending.append((self.step, result))
        return result

    def compute_loss(self, batch: dict, teacher_out: TeacherOutputs):
        return student_loss(self.student, self.criterion, batch, teacher_out)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def trained_student(self):
        return self.student

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.read()  # the skip count and window must be current in a checkpoint
        return {**self.bookkeeping(),
                "student": self.student.state_dict(), "criterion": self.criterion.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng.capture(self.device)}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.criterion.load_state_dict(state["criterion"])
        optimizer = state["optimizer"]
        for group in optimizer["param_groups"]:
            # A checkpoint from before the fused optimizer carries fused=None, which would replace the
            # live setting and refuse the on-device skip (found_inf): the state itself is the same.
            group["fused"], group["foreach"] = True, None
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.restore_bookkeeping(state)
        rng.restore(state["rng"], self.device)

    def save_checkpoint(self, output: Path, keep: int) -> Path:
        self.read()  # before staging: a run stopped by --max-bad-steps here leaves nothing half-written
        target = checkpoint_dir(output) / f"step-{self.step:08d}"
        staged = staging_dir(target)
        try:
            with no_space_is_one_line(target / "state.pt"), open(staged / "state.pt", "wb") as f:
                torch.save(self.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())  # durable before it becomes visible under its final name
            (staged / COMPLETE).write_text(json.dumps({"step": self.step, "engine": "local", "format": FORMAT}) + "\n")
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)  # a full disk must not be filled further by leftovers
            raise
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)  # a checkpoint directory is complete or absent
        # Older than the one just written only: after a fallback to an older checkpoint, newer (damaged)
        # ones must not make it prune the checkpoint it has just written.
        finished = [p for p in checkpoints(output) if p <= target]
        for old in finished[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def load_checkpoint(self, output: Path) -> Path | None:
        path, state = load_latest_checkpoint(output)
        if path is not None:
            self.load_state_dict(state)
        return path


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def checkpoints(output: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first. Renamed into place only once whole, so a folder with
    a state.pt is complete (those of before the marker too); the marker says so explicitly, and a
    folder whose marker is another engine's (a ZeRO tag) is not this engine's."""
    done = []
    for p in sorted(checkpoint_dir(output).glob("step-*")):
        if not (p / "state.pt").is_file():
            continue
        marker = p / COMPLETE
        if marker.is_file():
            try:
                if json.loads(marker.read_text()).get("engine", "zero") != "local":  # unnamed: ZeRO's, of before
                    continue
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass  # a garbled marker: the state itself decides below
        done.append(p)
    return done


def latest_checkpoint(output: Path) -> Path | None:
    done = checkpoints(output)
    return done[-1] if done else None


def load_latest_checkpoint(output: Path) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads, newest first: a damaged one (a truncated state.pt, a disk
    error) is one warning and the next older one is taken; (None, None) when none exists."""
    done = checkpoints(output)[::-1]
    for path in done:
        try:
            # On the CPU first: a checkpoint too large for the device is not a damaged one.
            state = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
        except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:  # a torn or garbled file
            first = " ".join(str(exc).split())[:160] or type(exc).__name__
            log.warning("checkpoint %s is damaged (%s: %s); trying the one before it", path, type(exc).__name__, first)
            continue
        return path, state
    if done:  # never start over silently on top of checkpoints that exist
        raise UserError(f"--resume: none of the {len(done)} checkpoints in {checkpoint_dir(output)} loads (each is "
                        "damaged); remove them to start over, or restore one from a backup")
    return None, None
