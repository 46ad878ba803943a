"""Single-process distillation: corpus -> teacher (once per batch) -> losses -> student.

Exact resume: a checkpoint holds the student, the loss projections, optimizer, scheduler, every
RNG state and the data stream position (one integer), so 10 steps + resume + 10 steps gives the
same parameters as 20 straight steps on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, optim, rng
from .rng import seed_everything
from .capture import recording
from .config import DistillConfig, differing_settings, read_run_config
from .device import pick_device
from .corpus import BatchStream, corpus_identity, load_corpus, parse_sample, sample_corpus
from .errors import UserError
from .export import export_student
from .io import (atomic_write_json, atomic_write_text, check_writable_dir, is_bookkeeping, lock_output,
                 no_space_is_one_line, staging_dir)
from .losses import DistillLoss, LossOutput, LossWeights
from .mapping import LayerMapping, parse_mapping
from .models import (build_student, check_weight_files, load_config, load_student_dir, load_teacher, load_tokenizer,
                     student_shape)
from .teacher import Teacher, TeacherOutputs

log = logging.getLogger(__name__)

DEFAULT_STUDENT_LAYERS = 3


def student_loss(student, criterion: DistillLoss, batch: dict, teacher_out: TeacherOutputs) -> LossOutput:
    """One student forward with attention capture, scored against the shared teacher outputs."""
    with recording(criterion.student_attention_layers()) as rec:
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True, return_dict=True)
    return criterion(out.hidden_states, rec.records, teacher_out)


def loss_weights(cfg: DistillConfig) -> LossWeights:
    return LossWeights(cfg.w_embedding, cfg.w_hidden, cfg.w_attention, cfg.w_attention_kl)




class NonFiniteAbort(UserError):
    pass


class Preempted(Exception):
    """SIGTERM or SIGUSR1 (what schedulers send before they kill a job): the run checkpointed at the
    step boundary after the signal and stops; --resume continues exactly there."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint written; "
                         "continue with --resume")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def stop_signals():
    """Catch the schedulers' stop signals for the duration of the step loop: the first one is noted
    (the loop checkpoints at the next step boundary); outside the loop the old handlers apply."""
    caught: dict[str, int | None] = {"signum": None}

    def note(signum, _frame):
        if caught["signum"] is not None:  # a second one: stop now, as without fastkd's handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)
        caught["signum"] = signum

    if threading.current_thread() is not threading.main_thread():  # handlers only work there
        yield caught
        return
    old = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    try:
        yield caught
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def count_bad_step(distiller, step: int, what: str) -> None:
    """A skipped step (non-finite `what`): counted, logged, and the run stopped after --max-bad-steps."""
    cfg = distiller.cfg
    distiller.bad_steps += 1
    log.warning("step %d: non-finite %s, update skipped (%d so far)", step, what, distiller.bad_steps)
    if distiller.bad_steps >= cfg.max_bad_steps:
        raise NonFiniteAbort(
            f"aborted at step {step}: {distiller.bad_steps} steps had a non-finite {what} "
            f"(limit --max-bad-steps {cfg.max_bad_steps}); lower --lr, drop --bf16, or check the corpus")


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


def read_pending(distiller, what: str, reduce=None) -> StepRecord | None:
    """The read both distillers share: every pending step as numbers (`reduce`: over ranks), skipped
    ones counted (`what` was non-finite), the others into the window; the latest step's record."""
    records, distiller.pending = read_steps(distiller.pending, reduce), []
    for r in records:
        if r.skipped:
            count_bad_step(distiller, r.step, what)
        else:
            distiller.window.append({"loss": r.loss, **r.terms})
    return records[-1] if records else None


def window_means(window) -> dict[str, float]:
    """Mean of each logged quantity over the last window of steps (less noisy than the last step)."""
    keys = list(window[-1]) if window else []
    return {k: float(np.mean([row[k] for row in window if k in row])) for k in keys}


class Distiller:
    """Owns one student, its loss projections and optimizer; the teacher and data are given."""

    def __init__(self, cfg: DistillConfig, teacher: Teacher, student, criterion: DistillLoss,
                 stream: BatchStream):
        self.cfg = cfg
        self.teacher = teacher
        self.student = student
        self.criterion = criterion
        self.stream = stream
        self.params = [p for m in (student, criterion) for p in m.parameters() if p.requires_grad]
        # fused: one kernel per parameter group, and it skips a non-finite step on the device
        # (found_inf, see train_step) without the host ever looking at the gradient norm.
        self.optimizer = optim.adamw([student, criterion], cfg.lr, cfg.weight_decay, fused=True)
        self.scheduler = optim.warmup_then_linear(self.optimizer, cfg.warmup, cfg.max_steps)
        self.step = 0
        self.bad_steps = 0
        self.elapsed = 0.0
        self.window: deque[dict] = deque(maxlen=max(1, cfg.log_every))
        self.pending: list[tuple[int, StepResult]] = []  # steps not read yet (see read)
        self.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
        self.device = next(student.parameters()).device

    # --- one optimizer step -------------------------------------------------------------
    def next_inputs(self) -> tuple[dict, TeacherOutputs]:
        """The next micro-batch and the teacher's outputs for it (one teacher forward)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.stream.next().items()}
        return batch, self.teacher(batch["input_ids"], batch["attention_mask"])

    def train_step(self, shared: list[tuple[dict, TeacherOutputs]] | None = None) -> StepResult:
        """One optimizer step, with no host sync: a non-finite loss or gradient skips the update on
        the device, and the numbers stay there until `read`. `shared`: micro-batches with teacher
        outputs computed once for several students (the search's generation); None: this distiller
        reads its own stream and teacher."""
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

    def agree_to_stop(self, local: bool) -> bool:
        """Whether to stop now (a stop signal arrived); one process decides alone."""
        return local

    agree_to_stop_now = agree_to_stop  # (after the last step: the same, for one process)

    def read(self) -> StepRecord | None:
        """Read every step since the last read (one host sync): skipped steps are counted (and the run
        stopped after --max-bad-steps), the others enter the window. Returns the latest step's record."""
        return read_pending(self, "loss or gradient")

    def compute_loss(self, batch, teacher_out) -> LossOutput:
        return student_loss(self.student, self.criterion, batch, teacher_out)

    # --- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.read()  # the skip count and window must be current in a checkpoint
        return {
            "step": self.step, "bad_steps": self.bad_steps, "elapsed": self.elapsed,
            "student": self.student.state_dict(), "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(), "window": list(self.window),
            "rng": rng.capture(self.device),
        }

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
        self.stream.load_state_dict(state["stream"])
        self.step, self.bad_steps, self.elapsed = state["step"], state["bad_steps"], state["elapsed"]
        self.window = deque(state["window"], maxlen=self.window.maxlen)
        rng.restore(state["rng"], self.device)

    def final_losses(self) -> dict[str, float]:
        return window_means(self.window)


# --- checkpoint files -------------------------------------------------------------------

def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def checkpoints(output: Path) -> list[Path]:
    """Checkpoint folders holding a state.pt, oldest first."""
    return sorted(p for p in checkpoint_dir(output).glob("step-*") if (p / "state.pt").is_file())


def latest_checkpoint(output: Path) -> Path | None:
    done = checkpoints(output)
    return done[-1] if done else None


def load_latest_checkpoint(output: Path, device) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads, newest first: a damaged one (a truncated state.pt, a disk
    error) is one warning and the next older one is taken; (None, None) when none loads."""
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


def save_checkpoint(distiller: Distiller, output: Path, keep: int) -> Path:
    distiller.read()  # before staging: a run stopped by --max-bad-steps here leaves nothing half-written
    target = checkpoint_dir(output) / f"step-{distiller.step:08d}"
    staged = staging_dir(target)
    try:
        with no_space_is_one_line(target / "state.pt"), open(staged / "state.pt", "wb") as f:
            torch.save(distiller.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())  # durable before it becomes visible under its final name
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


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
        if row.get("step", step + 1) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# --- a whole run ------------------------------------------------------------------------

def prepare_output(cfg: DistillConfig) -> Path:
    """Refuse to mix runs: an existing run needs --resume with the same settings."""
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file: give a directory")
    saved = read_run_config(output)
    check_writable_dir(output)  # before the corpus and the teacher are loaded, not after
    if saved is None:
        if output.exists() and any(not is_bookkeeping(p.name) for p in output.iterdir()):
            raise UserError(f"--output {output} is not empty and holds no fastkd run: choose an empty or new directory")
        return output
    if not cfg.resume:
        diffs = differing_settings(saved.get("config", {}), cfg.to_dict())
        what = "a different run (" + "; ".join(diffs[:3]) + ")" if diffs else "this run already"
        raise UserError(f"--output {output} holds {what}: pass --resume to continue it, or choose another --output")
    diffs = differing_settings(saved.get("config", {}), cfg.to_dict())
    if diffs:
        raise UserError(f"cannot --resume {output}: settings differ from the saved run: " + "; ".join(diffs))
    identity = saved.get("resolved", {}).get("corpus_identity")
    if identity is not None and identity != json.loads(json.dumps(corpus_identity(cfg.corpus))):  # as saved
        raise UserError(f"cannot --resume {output}: the corpus {cfg.corpus} changed since the run began (its files' "
                        "size or modification time): restore it, or start a new run in another --output")
    return output


def resolve(cfg: DistillConfig):
    """Everything that can be checked before loading weights or data."""
    cfg.validate()
    teacher_config = load_config(cfg.teacher, "teacher")
    check_weight_files(cfg.teacher, "teacher")
    if cfg.student is not None:
        check_weight_files(cfg.student, "student")
    n_teacher = teacher_config.num_hidden_layers
    if cfg.max_seq_len > teacher_config.max_position_embeddings:
        raise UserError(f"--max-seq-len {cfg.max_seq_len} exceeds the teacher's {teacher_config.max_position_embeddings} "
                        "position embeddings: use a smaller --max-seq-len")
    if cfg.student is not None:
        s_config = load_config(cfg.student, "student")
        shape = student_shape(s_config, s_config.num_hidden_layers)
        if cfg.max_seq_len > s_config.max_position_embeddings:
            raise UserError(f"--max-seq-len {cfg.max_seq_len} exceeds the student's {s_config.max_position_embeddings} position embeddings")
    else:
        shape = student_shape(teacher_config, DEFAULT_STUDENT_LAYERS if cfg.student_layers is None else cfg.student_layers, cfg.student_hidden,
                              cfg.student_heads, cfg.student_ffn)
    mapping = parse_mapping(cfg.mapping, shape.layers, n_teacher)
    parse_sample(cfg.corpus_sample)
    weights = loss_weights(cfg)
    if not (weights.embedding or ((weights.hidden or weights.attention or weights.attention_kl) and mapping.pairs())):
        raise UserError("nothing to distill: every loss weight is zero or the mapping supervises no layer")
    return teacher_config, shape, mapping


@dataclass
class Run:
    """A distillation ready to train: the distiller plus what export and logs need."""

    cfg: DistillConfig
    distiller: Distiller
    tokenizer: object
    mapping: LayerMapping
    shape: object
    corpus_sequences: int
    output: Path

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.distiller.student.parameters())


def build_models(cfg: DistillConfig, shape, mapping):
    """Tokenizer, teacher, student (built or loaded) and the loss with its projections, on the CPU.
    Call after seeding: the student's and the projections' initialisation draw from the global RNG."""
    tokenizer = load_tokenizer(cfg.teacher)
    teacher_model = load_teacher(cfg.teacher)
    if cfg.student is not None:
        student = load_student_dir(cfg.student, teacher_model, tokenizer)
    else:
        student = build_student(teacher_model, shape, cfg.init, mapping, seed=cfg.seed)
    criterion = DistillLoss(mapping, student.config.hidden_size, teacher_model.config.hidden_size, loss_weights(cfg),
                            backend=cfg.loss_backend)
    return tokenizer, teacher_model, student, criterion


def build_run(cfg: DistillConfig) -> Run:
    """Validate, load teacher/student/corpus, and restore the latest checkpoint under --resume."""
    teacher_config, shape, mapping = resolve(cfg)
    output = prepare_output(cfg)
    lock_output(output)  # one run per output directory; leftovers of a killed one are removed
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)

    tokenizer, teacher_model, student, criterion = build_models(cfg, shape, mapping)
    teacher_model.to(device)
    student.to(device)
    criterion.to(device)
    teacher = Teacher(teacher_model, criterion.teacher_hidden_layers(), criterion.teacher_attention_layers(),
                      autocast_dtype=torch.bfloat16 if cfg.bf16 else None)

    corpus = load_corpus(cfg.corpus, tokenizer, cfg.max_seq_len, cfg.cache_dir)
    corpus = sample_corpus(corpus, cfg.corpus_sample, cfg.seed)
    distiller = Distiller(cfg, teacher, student, criterion, BatchStream(corpus, cfg.batch_size, cfg.seed))
    run = Run(cfg, distiller, tokenizer, mapping, shape, len(corpus), output)

    metrics_path = output / "metrics.jsonl"
    resumed_from, state = load_latest_checkpoint(output, device) if cfg.resume else (None, None)
    if resumed_from is not None:
        distiller.load_state_dict(state)
        del state
        _truncate_metrics(metrics_path, distiller.step)
        log.info("resumed from %s (step %d)", resumed_from, distiller.step)
    else:
        if cfg.resume:
            log.info("--resume: no checkpoint in %s yet, starting from step 0", output)
        metrics_path.unlink(missing_ok=True)

    atomic_write_json(output / "config.json", {
        "fastkd_version": __version__, "config": cfg.to_dict(),
        "resolved": {"mapping": mapping.text, "teacher_layers": mapping.teacher_layers,
                     "student": {**shape.__dict__, "parameters": run.parameters},
                     "corpus_sequences": run.corpus_sequences, "global_batch": cfg.batch_size * cfg.grad_accum,
                     "corpus_identity": corpus_identity(cfg.corpus),  # checked on --resume
                     "loss_backend": criterion.backend(device),
                     # Each op self-checked now, for the dtypes this run feeds it (bf16 autocast: both).
                     "loss_ops": criterion.prepare(device, [torch.float32] + ([torch.bfloat16] if cfg.bf16 else []))},
    })
    log.info("student: %s (%.1fM parameters), mapping %s, %d sequences of %d tokens, %s loss backend",
             shape.describe(), run.parameters / 1e6, mapping.text, run.corpus_sequences, cfg.max_seq_len,
             criterion.backend(device))
    return run


def run_distill(cfg: DistillConfig) -> Path | None:
    """Distill, checkpoint, export. Returns OUTPUT/student (None when stopped early by stop_at_step)."""
    run = build_run(cfg)
    distiller = run.distiller
    train(distiller, run.output, run.output / "metrics.jsonl")
    if distiller.step < cfg.max_steps:
        log.info("stopped at step %d of %d; continue with --resume", distiller.step, cfg.max_steps)
        return None
    return export_run(run)


def export_run(run: Run, extra: dict | None = None) -> Path:
    cfg, distiller, mapping = run.cfg, run.distiller, run.mapping
    info = {
        "teacher": cfg.teacher, "teacher_layers": mapping.teacher_layers, "mapping": mapping.text,
        "mapping_spec": cfg.mapping, "init": cfg.init if cfg.student is None else f"from {cfg.student}",
        "student": {**run.shape.__dict__, "parameters": run.parameters},
        "loss_weights": loss_weights(cfg).as_dict(),
        "corpus": {"source": cfg.corpus, "sequences": run.corpus_sequences, "max_seq_len": cfg.max_seq_len,
                   "sample": cfg.corpus_sample},
        "steps": distiller.step, "global_batch": getattr(distiller, "seqs_per_step", cfg.batch_size * cfg.grad_accum),
        "lr": cfg.lr, "seed": cfg.seed,
        "bf16": cfg.bf16, "loss_backend": distiller.criterion.backend(distiller.device),
        "loss_ops": distiller.criterion.ran_on(),  # what each op ran on, after its self-check
        "skipped_steps": distiller.bad_steps, "seconds": round(distiller.elapsed, 1),
        "final_losses": distiller.final_losses(), **(extra or {}),
    }
    return export_student(distiller.student, run.tokenizer, run.output / "student", info)


def _tensorboard(cfg, output: Path, step: int):
    """A SummaryWriter under OUTPUT/tensorboard for --report-to tensorboard, else None. On --resume
    the events after the checkpoint's step are dropped (purge_step), as the metrics rows after it are."""
    if getattr(cfg, "report_to", "none") != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=step + 1 if step > 0 else None)


def train(distiller, output: Path, metrics_path: Path, save=None, is_main: bool = True) -> None:
    """The step loop: metrics rows, progress bar and checkpoints every N steps.

    `distiller` is a Distiller or a ZeroDistiller (same interface); `save(distiller, output, keep)`
    writes a checkpoint (a collective under DeepSpeed, so every rank calls it); only the main rank
    writes metrics and shows the bar."""
    cfg = distiller.cfg
    save = save or save_checkpoint
    seqs_per_step = getattr(distiller, "seqs_per_step", cfg.batch_size * cfg.grad_accum)
    bar = tqdm(total=cfg.max_steps, initial=distiller.step, desc="distill", unit="step",
               disable=not (cfg.progress and is_main), dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), distiller.step
    last = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    board = _tensorboard(cfg, output, distiller.step) if is_main else None
    with open(metrics_path if is_main else os.devnull, "a", encoding="utf-8") as metrics, stop_signals() as caught, \
            contextlib.closing(board) if board is not None else contextlib.nullcontext():
        while distiller.step < last:
            t0 = time.perf_counter()
            distiller.stop_requested = caught["signum"] is not None  # (ZeRO agrees on it inside the step)
            distiller.train_step()
            step = distiller.step
            stopping = distiller.agree_to_stop(caught["signum"] is not None)
            logging_step = step % cfg.log_every == 0 or step == cfg.max_steps
            checkpoint_step = step % cfg.checkpoint_every == 0 or step == last or stopping
            # The steps' numbers reach the host here, not every step (timed: it waits for the device).
            result = distiller.read() if logging_step or checkpoint_step else None
            distiller.elapsed += time.perf_counter() - t0
            bar.update(1)
            if logging_step:
                now = time.perf_counter()
                rate = (step - last_step) * seqs_per_step / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                row = {"step": step, "loss": result.loss, **result.terms,
                       "lr": distiller.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm,
                       "seq_per_s": round(rate, 2), "tokens_per_s": round(rate * cfg.max_seq_len, 1),
                       "skipped": result.skipped, "skipped_steps": distiller.bad_steps}
                # Strict JSON (jq, pandas): a non-finite value of a skipped step is written as null.
                row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                metrics.write(json.dumps(row, allow_nan=False) + "\n")
                metrics.flush()
                if board is not None:
                    for key, value in row.items():
                        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                            board.add_scalar(f"distill/{key}", value, step)
                    board.flush()
                bar.set_postfix(loss=f"{result.loss:.4f}", seq_s=f"{rate:.1f}")
            if checkpoint_step:
                save(distiller, output, cfg.keep_checkpoints)
            if stopping:
                bar.close()
                raise Preempted(caught["signum"] or signal.SIGTERM, step)
        if distiller.agree_to_stop_now(caught["signum"] is not None):  # arrived during the last step
            bar.close()
            raise Preempted(caught["signum"] or signal.SIGTERM, distiller.step)  # its checkpoint is written
    bar.close()
