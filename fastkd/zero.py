"""Distillation under DeepSpeed ZeRO: `fastkd distill ... --deepspeed CONFIG.json`.

Started by the deepspeed launcher (one node or many), by torchrun, or as one plain process. Against
the single-process Distiller, four things change:

- the student and its projection layers are one module wrapped by `deepspeed.initialize`, so ZeRO
  shards optimizer states (stage 1), gradients (2) and parameters (3); the teacher stays outside the
  engine, frozen, one inference copy per rank (bf16/fp16 on GPUs);
- every rank reads its own slice of each global batch from the same deterministic stream (global
  batch = micro-batch x accumulation x world size, checked against the ds_config);
- checkpoints are `engine.save_checkpoint` plus the stream position and every rank's RNG states,
  and a checkpoint counts only once all of it is written (a `complete` marker), so `--resume` after
  a rank was killed continues exactly;
- the export gathers ZeRO-3 partitions and writes the same Hugging Face directory as single-process
  distillation (float32 weights).

The loss, its terms and the gradients mean the same as with one process: DeepSpeed averages the
ranks' gradients, and the logged terms are averaged over ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DistillConfig
from .corpus import BatchStream, corpus_identity, load_corpus, sample_corpus
from . import optim, rng
from .distill import (NonFiniteAbort, Run, StepRecord, StepResult, _truncate_metrics, build_models, export_run,
                      prepare_output, read_pending, resolve, student_loss, train, window_means)
from .errors import UserError
from .io import atomic_write_json, lock_output
from .rng import seed_everything
from .losses import DistillLoss
from .teacher import Teacher

log = logging.getLogger(__name__)

COMPLETE = "fastkd-complete"  # written last into a checkpoint tag: the tag is whole


# --- the ds_config against the flags ------------------------------------------------------------

def _check(config: dict, key: str, wanted, flag: str, path: str) -> None:
    value = config.get(key, "auto")
    if value == "auto":
        config[key] = wanted
    elif value != wanted:
        raise UserError(f"--deepspeed {path}: {key} is {value!r} but the flags give {wanted!r} ({flag}): "
                        f"make them agree, or set it to \"auto\"")


def load_ds_config(path: str, cfg: DistillConfig, world: int, hidden: int) -> dict:
    """The ds_config with every "auto" filled from the flags; a disagreement is one line (exit 2).

    `hidden` is the student's width: "auto" bucket sizes follow it (the Hugging Face convention:
    reduce bucket hidden^2, ZeRO-3 prefetch 0.9 hidden^2, parameters under 10 hidden elements kept
    whole), so a small student is not handed buckets sized for billions of parameters."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--deepspeed {path}: no such file (see launch/ for ready configs)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--deepspeed {path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed {path}: the file must hold a JSON object")
    global_batch = cfg.batch_size * cfg.grad_accum * world
    _check(config, "train_micro_batch_size_per_gpu", cfg.batch_size, "--batch-size", path)
    _check(config, "gradient_accumulation_steps", cfg.grad_accum, "--grad-accum", path)
    _check(config, "train_batch_size", global_batch,
           f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {world} ranks", path)
    _check(config, "gradient_clipping", cfg.clip_grad, "--clip-grad", path)
    for half in ("bf16", "fp16"):
        section = config.setdefault(half, {})
        if section.get("enabled") == "auto":
            section["enabled"] = cfg.bf16 if half == "bf16" else False
    if config["bf16"].get("enabled") and not cfg.bf16:
        raise UserError(f"--deepspeed {path}: bf16 is enabled in the config: pass --bf16 (or disable it there)")
    if cfg.bf16 and not config["bf16"].get("enabled"):
        if config["fp16"].get("enabled"):
            raise UserError(f"--deepspeed {path}: fp16 is enabled in the config but --bf16 was passed: choose one")
        config["bf16"]["enabled"] = True
    if config["fp16"].get("enabled") and not torch.cuda.is_available():
        raise UserError(f"--deepspeed {path}: fp16 training needs a GPU; use bf16 or fp32 on a CPU")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"--deepspeed {path}: zero_optimization must be a JSON object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise UserError(f"--deepspeed {path}: zero_optimization.stage is {stage!r}; ZeRO stages are 0, 1, 2 and 3")
    for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value
    optimizer = config.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        for key, value in (("lr", cfg.lr), ("weight_decay", cfg.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    scheduler = config.get("scheduler")
    if scheduler is not None:
        params = scheduler.setdefault("params", {})
        for key, value in (("total_num_steps", cfg.max_steps), ("warmup_num_steps", int(cfg.warmup * cfg.max_steps)),
                           ("warmup_max_lr", cfg.lr), ("warmup_min_lr", 0.0)):
            if params.get(key) == "auto":
                params[key] = value
    config.setdefault("steps_per_print", 10 ** 9)  # fastkd logs its own metrics
    config.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW as the client optimizer
    config.setdefault("wall_clock_breakdown", False)
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


# --- processes ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank), starting the process group; one plain process becomes a world of 1."""
    if "RANK" not in os.environ:  # no launcher: a single-rank world on this machine
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        # Ranks on one CPU share its cores: one thread pool each would oversubscribe it.
        # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE: ranks on this node.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local_rank


# --- the engine's module ------------------------------------------------------------------------

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


class ZeroDistiller:
    """The Distiller's training-loop interface (train_step, step, window, ...) over a DeepSpeed engine."""

    def __init__(self, cfg: DistillConfig, engine, teacher: Teacher, stream: BatchStream, world: int, rank: int):
        self.cfg = cfg
        self.engine = engine
        self.module = engine.module
        self.student = self.module.student
        self.criterion = self.module.criterion
        self.teacher = teacher
        self.stream = stream
        self.world = world
        self.rank = rank
        self.device = engine.device
        self.step = 0
        self.bad_steps = 0
        self.elapsed = 0.0
        self.window: deque[dict] = deque(maxlen=max(1, cfg.log_every))
        self.pending: list[tuple[int, StepResult]] = []
        self.stop_requested = False  # set by the step loop: a stop signal arrived on this rank
        self._stop_agreed = False
        self.seqs_per_step = cfg.batch_size * cfg.grad_accum * world
        self.stage = int(engine.zero_optimization_stage())

    @property
    def scheduler(self):
        return self.engine.lr_scheduler

    def _mean_over_ranks(self, table: torch.Tensor) -> torch.Tensor:
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

    def train_step(self) -> StepResult:
        """One optimizer step over the engine. Loss terms stay on the device until `read` (one
        all-reduce of everything logged, at logging steps). One collective per step remains: before
        the update every rank must know whether any micro-batch was non-finite, because a rank that
        stepped alone would desynchronise ZeRO and DeepSpeed's bf16/fp32 ZeRO-3 optimizer applies a
        non-finite gradient instead of skipping it. It runs once per optimizer step, at the last
        micro-batch, not per micro-batch."""
        cfg = self.cfg
        self.engine.train()
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.stream.next().items()}
            teacher_out = self.teacher(batch["input_ids"], batch["attention_mask"])
            loss, terms = self.engine(batch["input_ids"], batch["attention_mask"], teacher_out)
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
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
            self.engine.step()  # updates (and steps the schedule) only at the accumulation boundary
            loss_sum += loss.detach().float() / cfg.grad_accum
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        norm = self.engine.get_global_grad_norm()
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

    def read(self) -> StepRecord | None:
        """Distiller.read over ranks: the logged numbers averaged over ranks in one all-reduce (a
        collective: every rank calls it at the same steps, as `train` and the checkpoints do)."""
        return read_pending(self, "loss", self._mean_over_ranks)

    def final_losses(self) -> dict[str, float]:
        return window_means(self.window)


# --- checkpoints ------------------------------------------------------------------------------------

def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def complete_tags(output: Path) -> list[Path]:
    """Checkpoint tags whose every part was written, oldest first."""
    root = checkpoint_root(output)
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def save_zero_checkpoint(d: ZeroDistiller, output: Path, keep: int) -> Path:
    """Collective: every rank calls it. Per-rank RNG first, then DeepSpeed's shards, then the marker."""
    d.read()  # collective too: the skip count and window must be current in the checkpoint
    root = checkpoint_root(output)
    tag = f"step-{d.step:08d}"
    target = root / tag
    if d.rank == 0:
        (target / COMPLETE).unlink(missing_ok=True)  # a tag being rewritten is not whole until the end
    torch.distributed.barrier()
    target.mkdir(parents=True, exist_ok=True)
    rng_file = target / f"rng-rank{d.rank}.pt"
    tmp = rng_file.with_suffix(".tmp")
    torch.save(rng.capture(d.device), tmp)
    os.replace(tmp, rng_file)
    client_state = {"fastkd": {"step": d.step, "bad_steps": d.bad_steps, "elapsed": d.elapsed,
                               "stream": d.stream.state_dict(), "window": list(d.window), "world": d.world}}
    d.engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    torch.distributed.barrier()  # every rank's shards are on disk
    if d.rank == 0:
        (target / COMPLETE).write_text(json.dumps({"step": d.step, "world": d.world, "stage": d.stage}) + "\n")
        for old in complete_tags(output)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for torn in checkpoint_root(output).glob("step-*"):  # a save killed half-way, older than this one
            if torn.name < tag and not (torn / COMPLETE).is_file():
                shutil.rmtree(torn, ignore_errors=True)
    torch.distributed.barrier()
    return target


def load_zero_checkpoint(d: ZeroDistiller, output: Path) -> Path | None:
    tags = complete_tags(output)
    if not tags:
        return None
    tag = tags[-1]
    # Checked before DeepSpeed reads its shards, which would fail with a traceback on another layout.
    written = json.loads((tag / COMPLETE).read_text())
    if written.get("world") != d.world:
        raise UserError(f"cannot --resume {tag} on {d.world} ranks: it was written by {written.get('world')} "
                        "(each rank's shards, data slice and RNG state belong to its world size)")
    if written.get("stage", d.stage) != d.stage:
        raise UserError(f"cannot --resume {tag} with ZeRO-{d.stage}: it was written with ZeRO-{written.get('stage')}")
    _, client_state = d.engine.load_checkpoint(str(checkpoint_root(output)), tag=tag.name)
    state = (client_state or {}).get("fastkd")
    if state is None:
        raise UserError(f"cannot --resume: checkpoint {tag} holds no fastkd state")
    d.stream.load_state_dict(state["stream"])
    d.step, d.bad_steps, d.elapsed = state["step"], state["bad_steps"], state["elapsed"]
    d.window = deque(state["window"], maxlen=d.window.maxlen)
    rng.restore(torch.load(tag / f"rng-rank{d.rank}.pt", weights_only=False), d.device)
    return tag


# --- the run ------------------------------------------------------------------------------------------

def _teacher_dtype(config: dict) -> torch.dtype | None:
    if not torch.cuda.is_available():
        return None  # CPU: the teacher runs in float32 (or under bf16 autocast with --bf16)
    if config["fp16"].get("enabled"):
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class ZeroRun:
    distiller: ZeroDistiller
    tokenizer: object
    mapping: object
    shape: object
    corpus_sequences: int
    output: Path
    ds_config: dict


def build_zero_run(cfg: DistillConfig) -> ZeroRun:
    """Every rank: check the config, join the process group, build the engine, the teacher and the stream."""
    teacher_config, shape, mapping = resolve(cfg)
    # Checked before any process group exists: a bad config is one line on every rank, not a hang.
    if cfg.device != "auto":
        raise UserError("--device does not apply with --deepspeed: each rank takes its own GPU (LOCAL_RANK), or the CPU")
    ds_config = load_ds_config(cfg.deepspeed, cfg, int(os.environ.get("WORLD_SIZE", "1")), shape.hidden)
    output = prepare_output(cfg)  # read-only, so every rank checks and refuses alike (no rank left waiting)
    rank, world, _ = init_distributed()
    import deepspeed

    # Rank 0 holds the output's lock; a refusal is said on every rank (none is left waiting).
    box = [None]
    if rank == 0:
        try:
            lock_output(output)
        except UserError as exc:
            box[0] = str(exc)
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    seed_everything(cfg.seed)

    tokenizer, teacher_model, student, criterion = build_models(cfg, shape, mapping)
    half = _teacher_dtype(ds_config)
    teacher_model = teacher_model.to(device=device, dtype=half) if half is not None else teacher_model.to(device)
    teacher = Teacher(teacher_model, criterion.teacher_hidden_layers(), criterion.teacher_attention_layers(),
                      autocast_dtype=torch.bfloat16 if cfg.bf16 and half is None else None)

    module = DistillModule(student, criterion)
    client_optimizer, client_scheduler = None, None
    if "optimizer" not in ds_config:  # the same AdamW as single-process distillation (DeepSpeed steps it)
        client_optimizer = optim.adamw([student, criterion], cfg.lr, cfg.weight_decay)
    if "scheduler" not in ds_config:  # linear warmup then linear decay, as single-process
        def client_scheduler(optimizer):
            return optim.warmup_then_linear(optimizer, cfg.warmup, cfg.max_steps)
    params = None if client_optimizer is not None else optim.param_groups([student, criterion], cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=client_optimizer, model_parameters=params,
                                           lr_scheduler=client_scheduler, config=ds_config)

    # Rank 0 tokenizes and caches the corpus first; the others read the cache. A bad corpus is rank 0's
    # finding, passed to every rank so all of them stop with the same line instead of waiting.
    corpus, error = None, None
    if rank == 0:
        try:
            corpus = load_corpus(cfg.corpus, tokenizer, cfg.max_seq_len, cfg.cache_dir)
        except UserError as exc:
            error = str(exc)
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    if rank != 0:
        corpus = load_corpus(cfg.corpus, tokenizer, cfg.max_seq_len, cfg.cache_dir)
    corpus = sample_corpus(corpus, cfg.corpus_sample, cfg.seed)
    stream = BatchStream(corpus, cfg.batch_size, cfg.seed, rank=rank, world_size=world)
    distiller = ZeroDistiller(cfg, engine, teacher, stream, world, rank)
    return ZeroRun(distiller, tokenizer, mapping, shape, len(corpus), output, ds_config)


def run_distill_deepspeed(cfg: DistillConfig) -> Path | None:
    """Distill on every rank of the job; rank 0 writes metrics, config and the export."""
    run = build_zero_run(cfg)
    d, output = run.distiller, run.output
    metrics_path = output / "metrics.jsonl"
    resumed = load_zero_checkpoint(d, output) if cfg.resume else None
    if d.rank == 0:
        if resumed is not None:
            _truncate_metrics(metrics_path, d.step)
            log.info("resumed from %s (step %d) on %d ranks", resumed, d.step, d.world)
        else:
            if cfg.resume:
                log.info("--resume: no complete checkpoint in %s yet, starting from step 0", output)
            metrics_path.unlink(missing_ok=True)
        parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in d.student.parameters())
        atomic_write_json(output / "config.json", {
            "config": cfg.to_dict(),
            "resolved": {"mapping": run.mapping.text, "teacher_layers": run.mapping.teacher_layers,
                         "student": {**run.shape.__dict__, "parameters": parameters},
                         "corpus_sequences": run.corpus_sequences, "global_batch": d.seqs_per_step,
                         "corpus_identity": corpus_identity(cfg.corpus),
                         "loss_backend": d.criterion.backend(d.device),
                         "loss_ops": d.criterion.prepare(d.device, _op_dtypes(d, run.ds_config)),
                         "deepspeed": {"world_size": d.world, "zero_stage": zero_stage(run.ds_config),
                                       "config": run.ds_config}},
        })
        log.info("student: %s, mapping %s, %d sequences of %d tokens; ZeRO-%d on %d ranks, global batch %d",
                 run.shape.describe(), run.mapping.text, run.corpus_sequences, cfg.max_seq_len,
                 zero_stage(run.ds_config), d.world, d.seqs_per_step)

    train(d, output, metrics_path, save=save_zero_checkpoint, is_main=d.rank == 0)
    if d.step < cfg.max_steps:
        return None
    target = export_zero(d, run.tokenizer, run.mapping, run.shape, run.corpus_sequences, output, run.ds_config)
    torch.distributed.barrier()
    return target


def _op_dtypes(d: ZeroDistiller, ds_config: dict) -> list[tuple[torch.dtype, torch.dtype]]:
    """The (student, teacher) input dtypes the loss ops will see: the engine's module computes in its
    parameters' dtype (no autocast under DeepSpeed); the teacher in its own, or under its autocast
    (its Q/K then 16-bit, its LayerNorm outputs float32)."""
    student = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    teacher = d.teacher.autocast_dtype or next(d.teacher.model.parameters()).dtype
    return list(dict.fromkeys([(student, teacher), (student, torch.float32)]))


def export_zero(d: ZeroDistiller, tokenizer, mapping, shape, corpus_sequences: int, output: Path,
                ds_config: dict) -> Path | None:
    """Gather the student (ZeRO-3 partitions included) and export its float32 weights from rank 0."""
    import deepspeed

    params = list(d.student.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage(ds_config) == 3):
        state = {k: v.detach().float().cpu().clone() for k, v in d.student.state_dict().items()} if d.rank == 0 else None
    if ds_config["bf16"].get("enabled") or ds_config["fp16"].get("enabled"):
        # The module holds 16-bit copies; the float32 weights are the optimizer's masters (a collective
        # under ZeRO-3, so every rank asks for every parameter in the same order).
        for name, p in d.student.named_parameters():
            full = deepspeed.utils.safe_get_full_fp32_param(p)
            if d.rank == 0:
                if full is None:
                    log.warning("no float32 master for %s: exported from its 16-bit copy", name)
                else:
                    state[name] = full.detach().float().cpu().clone()
    # Rank 0's finding, said on every rank (a refusal on rank 0 alone would leave the others waiting).
    box = [None]
    if d.rank == 0:
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            box[0] = (f"not exporting {output / 'student'}: {len(bad)} weight tensors hold non-finite values "
                      f"(first: {bad[0]}); lower --lr and distill again")
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    if d.rank != 0:
        return None
    student = type(d.student)(d.student.config)
    student.load_state_dict(state)
    student.to(torch.float32)
    run = Run(d.cfg, _ExportView(d, student), tokenizer, mapping, shape, corpus_sequences, output)
    target = export_run(run, extra={"deepspeed": {"world_size": d.world, "zero_stage": zero_stage(ds_config)}})
    return target


class _ExportView:
    """What export_run reads from a distiller, with the gathered float32 student."""

    def __init__(self, d: ZeroDistiller, student):
        self.student = student
        self.criterion = d.criterion
        self.device = d.device  # export_run records the loss backend this device used
        self.step, self.bad_steps, self.elapsed = d.step, d.bad_steps, d.elapsed
        self.seqs_per_step = d.seqs_per_step
        self.final_losses = d.final_losses

