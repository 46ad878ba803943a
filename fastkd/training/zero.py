"""The DeepSpeed ZeRO step engine and its checkpoint format.

The student and its projection layers are one module wrapped by `deepspeed.initialize` (ZeRO shards
optimizer states, gradients and parameters); the teacher stays outside, frozen, one copy per rank.
Every rank reads its own slice of each global batch from the same deterministic stream.

Format: OUTPUT/checkpoints/step-NNNNNNNN/, DeepSpeed's shards with fastkd's bookkeeping as client
state, plus every rank's RNG file, and the completeness marker written last by rank 0 after a
barrier: a tag without it (a rank killed half-way) is never resumed from and is removed later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .. import rng
from ..errors import UserError
from ..io import no_space_is_one_line
from ..losses import DistillLoss
from .engine import COMPLETE, NonFiniteAbort, StepEngine, StepResult, student_loss

log = logging.getLogger(__name__)


class DistillModule(nn.Module):
    """The student and its projection layers: everything the optimizer updates, in one module."""

    def __init__(self, student: nn.Module, criterion: DistillLoss):
        super().__init__()
        self.student = student
        self.criterion = criterion

    def forward(self, input_ids, attention_mask, teacher_out):
        out = student_loss(self.student, self.criterion, {"input_ids": input_ids, "attention_mask": attention_mask},
                           teacher_out)
        return out.total, out.terms


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def on_rank0(rank: int, work):
    """`work()` on rank 0 (its result there, None elsewhere). Whatever stops it there stops every rank,
    so none is left waiting in a collective: a UserError (a bad corpus, a non-finite model, a full
    disk) with the same line everywhere; anything else is raised on rank 0 and named on the others."""
    box, result, failure = [None], None, None
    if rank == 0:
        try:
            result = work()
        except UserError as exc:
            box[0] = ("user", str(exc))
        except Exception as exc:  # a bug or a system error: rank 0 shows the traceback
            box[0], failure = ("error", f"{type(exc).__name__}: {exc}"), exc
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        kind, message = box[0]
        if kind == "user":
            raise UserError(message)
        if failure is not None:
            raise failure
        raise RuntimeError(f"rank 0 stopped: {message}")
    return result


class ZeroEngine(StepEngine):
    """A StepEngine over a DeepSpeed engine, one per rank."""

    nonfinite_what = "loss"  # DeepSpeed clips and steps inside engine.step: the gradient is not seen

    def __init__(self, cfg, ds_engine, teacher, stream, world: int, rank: int, ds_config: dict):
        module = ds_engine.module
        super().__init__(cfg, teacher, module.student, module.criterion, stream, ds_engine.device)
        self.ds_engine = ds_engine
        self.world = world
        self.rank = rank
        self.ds_config = ds_config
        self.stage = int(ds_engine.zero_optimization_stage())
        self._stop_agreed = False

    @property
    def seqs_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def scheduler(self):
        return self.ds_engine.lr_scheduler

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.ds_engine.get_lr()[0]

    def describe(self) -> dict:
        return {"deepspeed": {"world_size": self.world, "zero_stage": zero_stage(self.ds_config)}}

    def loss_input_dtypes(self) -> list:
        """(student, teacher) input dtypes: the engine's module computes in its parameters' dtype (no
        autocast under DeepSpeed); the teacher in its own, or under its autocast (its Q/K then 16-bit,
        its LayerNorm outputs float32)."""
        student = torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else (
            torch.float16 if self.ds_config.get("fp16", {}).get("enabled") else torch.float32)
        teacher = self.teacher.autocast_dtype or next(self.teacher.model.parameters()).dtype
        return list(dict.fromkeys([(student, teacher), (student, torch.float32)]))

    def on_main(self, work):
        return on_rank0(self.rank, work)

    def prepare_losses(self, pinned: list[dict] = ()) -> dict:
        """Every op self-checked before the first step; `auto` keeps its fixed order here (untimed): a ZeRO
        run on the torch reference was seen not to resume bit-identically, and a timed choice may land
        there (docs/kernels.md, known gap)."""
        return self.criterion.prepare(self.device, self.loss_input_dtypes())

    def reduce_over_ranks(self, table: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            table = table.clone()
            torch.distributed.all_reduce(table)
            table /= self.world
        return table

    def _every_rank(self, flag: torch.Tensor) -> bool:
        """Whether `flag` (0-dim bool) holds on every rank, and (as self._stop_agreed) whether any rank
        asked to stop: one all-reduce and one host read for both."""
        stop = 1.0 if self.stop_requested else 0.0
        t = torch.stack([flag.to(torch.float32).reshape(()), torch.tensor(1.0 - stop, device=flag.device)])
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        finite, keep_going = t.tolist()
        self._stop_agreed = keep_going < 0.5
        return finite == 1.0

    def train_step(self, shared=None) -> StepResult:
        """One optimizer step over the engine. Loss terms stay on the device until `read` (one
        all-reduce of everything logged, at logging steps). One collective per step remains: before
        the update every rank must know whether any micro-batch was non-finite, because a rank that
        stepped alone would desynchronise ZeRO and DeepSpeed's bf16/fp32 ZeRO-3 optimizer applies a
        non-finite gradient instead of skipping it. It runs once per optimizer step, at the last
        micro-batch, not per micro-batch."""
        if shared is not None:
            raise NotImplementedError("a ZeRO engine reads its own rank's slice of the stream")
        cfg = self.cfg
        self.ds_engine.train()
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.stream.next().items()}
            teacher_out = self.teacher(batch["input_ids"], batch["attention_mask"])
            loss, terms = self.ds_engine(batch["input_ids"], batch["attention_mask"], teacher_out)
            finite = finite & torch.isfinite(loss.detach())
            if micro == cfg.grad_accum - 1 and not self._every_rank(finite):
                if cfg.grad_accum > 1:
                    raise NonFiniteAbort(
                        f"step {self.step + 1}: a non-finite loss in a micro-batch of {cfg.grad_accum}; under "
                        "--deepspeed a partly accumulated step cannot be skipped: lower --lr, drop --bf16, or use "
                        "--grad-accum 1; --resume continues from the last checkpoint")
                self.step += 1
                if self.scheduler is not None:
                    self.scheduler.step()  # as the single-process skip: the schedule counts steps taken
                nan = torch.full((), float("nan"), device=self.device)
                result = StepResult(nan, {}, nan, torch.ones((), dtype=torch.bool, device=self.device))
                self.pending.append((self.step, result))
                return result
            self.ds_engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
            self.ds_engine.step()  # updates (and steps the schedule) only at the accumulation boundary
            loss_sum += loss.detach().float() / cfg.grad_accum
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        norm = self.ds_engine.get_global_grad_norm()
        norm = torch.full((), float("nan")) if norm is None else torch.as_tensor(norm)
        self.step += 1
        result = StepResult(loss_sum, totals, norm.to(self.device, torch.float32),
                            torch.zeros((), dtype=torch.bool, device=self.device))
        self.pending.append((self.step, result))
        return result

    def agree_to_stop(self, local: bool) -> bool:
        """Whether any rank had caught a stop signal before this step: every rank checkpoints at the
        same step. Agreed in the step's own finiteness collective (no collective of its own), so a
        signal that arrives during a step is acted on after the next one."""
        return self._stop_agreed

    def agree_to_stop_now(self, local: bool) -> bool:
        """Whether any rank caught a stop signal, asked once after the last step (one collective, so
        that every rank either stops there or goes on to the export together)."""
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, output: Path, keep: int) -> Path:
        """Collective. Per-rank RNG first, then DeepSpeed's shards, then rank 0's marker."""
        self.read()  # collective too: the skip count and window must be current in the checkpoint
        root = checkpoint_root(output)
        tag = f"step-{self.step:08d}"
        target = root / tag
        if self.rank == 0:
            (target / COMPLETE).unlink(missing_ok=True)  # a tag being rewritten is not whole until the end
        torch.distributed.barrier()
        target.mkdir(parents=True, exist_ok=True)
        rng_file = target / f"rng-rank{self.rank}.pt"
        tmp = rng_file.with_suffix(".tmp")
        try:
            with no_space_is_one_line(target):  # this rank's line; the launcher then stops the others
                torch.save(rng.capture(self.device), tmp)
                os.replace(tmp, rng_file)
                client_state = {"fastkd": {**self.bookkeeping(), "world": self.world}}
                self.ds_engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
        except UserError:
            # A full disk: this tag never gets its marker, so nothing of it is ever read. Each rank
            # removes the files it names itself (another may still be writing beside them); DeepSpeed's
            # shards of the torn tag go at the next checkpoint written (its sweep of unfinished tags).
            for own in (tmp, rng_file):
                with contextlib.suppress(OSError):
                    own.unlink()
            raise
        torch.distributed.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            marker = {"step": self.step, "engine": "zero", "world": self.world, "stage": self.stage}
            (target / COMPLETE).write_text(json.dumps(marker) + "\n")
            for old in complete_tags(output)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            for torn in root.glob("step-*"):  # a save killed half-way, older than this one
                if torn.name < tag and not (torn / COMPLETE).is_file():
                    shutil.rmtree(torn, ignore_errors=True)
        torch.distributed.barrier()
        return target

    def load_checkpoint(self, output: Path) -> Path | None:
        tags = complete_tags(output)
        if not tags:
            return None
        tag = tags[-1]
        # Checked before DeepSpeed reads its shards, which would fail with a traceback on another layout.
        written = json.loads((tag / COMPLETE).read_text())
        if written.get("world") != self.world:
            raise UserError(f"cannot --resume {tag} on {self.world} ranks: it was written by {written.get('world')} "
                            "(each rank's shards, data slice and RNG state belong to its world size)")
        if written.get("stage", self.stage) != self.stage:
            raise UserError(f"cannot --resume {tag} with ZeRO-{self.stage}: it was written with "
                            f"ZeRO-{written.get('stage')}")
        _, client_state = self.ds_engine.load_checkpoint(str(checkpoint_root(output)), tag=tag.name)
        state = (client_state or {}).get("fastkd")
        if state is None:
            raise UserError(f"cannot --resume: checkpoint {tag} holds no fastkd state")
        self.restore_bookkeeping(state)
        rng.restore(torch.load(tag / f"rng-rank{self.rank}.pt", weights_only=False), self.device)
        return tag

    # --- export ---------------------------------------------------------------------------------
    def trained_student(self):
        """Collective: gather the student (ZeRO-3 partitions included) with its float32 weights (the
        optimizer's masters under bf16/fp16) into a plain module on rank 0; None on the others."""
        state = self._float32_state(self.student)
        if self.rank != 0:
            return None
        student = type(self.student)(self.student.config)
        student.load_state_dict(state)
        return student.to(torch.float32)

    def trained_sentence_dense(self) -> dict | None:
        projection = self.criterion.sentence_projection
        if projection is None:
            return None
        return self._float32_state(projection)  # (every rank asks: a collective under ZeRO-3)

    def _float32_state(self, module: nn.Module) -> dict | None:
        """Collective: `module`'s whole state as float32 CPU tensors on rank 0 (None on the others): its
        ZeRO-3 partitions gathered, and under bf16/fp16 the optimizer's float32 masters in place of the
        module's 16-bit copies."""
        import deepspeed

        params = list(module.parameters())
        stage3 = zero_stage(self.ds_config) == 3
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=stage3):
            state = ({k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
                     if self.rank == 0 else None)
        if self.ds_config["bf16"].get("enabled") or self.ds_config["fp16"].get("enabled"):
            # (a collective under ZeRO-3, so every rank asks for every parameter in the same order)
            for name, p in module.named_parameters():
                full = deepspeed.utils.safe_get_full_fp32_param(p)
                if self.rank == 0:
                    if full is None:
                        log.warning("no float32 master for %s: exported from its 16-bit copy", name)
                    else:
                        state[name] = full.detach().float().cpu().clone()
        return state


def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def _is_zero_tag(tag: Path) -> bool:
    try:  # markers before the "engine" field were all ZeRO's
        return json.loads((tag / COMPLETE).read_text()).get("engine", "zero") == "zero"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False  # absent or garbled: not a complete tag


def complete_tags(output: Path) -> list[Path]:
    """Checkpoint tags whose every part was written, oldest first."""
    root = checkpoint_root(output)
    return sorted(p for p in root.glob("step-*") if _is_zero_tag(p)) if root.is_dir() else []
