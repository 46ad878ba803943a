"""The proxy setting: short distillation of a whole generation on one teacher stream, then proxy GLUE.

All candidates of a chunk are distilled in lockstep on the same batches. The teacher runs once per
batch (its outputs hold every layer any candidate needs) and serves every student of the step, so
the cost of a generation is steps x (T + P x S) instead of P x steps x (T + S). Both counts are kept:
`teacher_forwards` and `student_steps`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import DistillConfig
from ..corpus import BatchStream
from ..distill import Distiller, NonFiniteAbort, loss_weights
from ..glue import FinetuneConfig, TaskCache, evaluate
from ..glue.report import COLLAPSE_FRACTION
from ..losses import DistillLoss
from ..mapping import LayerMapping
from ..models import StudentShape, build_student
from ..teacher import Teacher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProxyConfig:
    """Everything that determines a candidate's fitness besides its mapping and seed."""

    sequences: int = 1024  # corpus sample (deterministic, by --seed)
    steps: int = 100  # distillation steps per candidate
    batch_size: int = 16
    max_seq_len: int = 64
    lr: float = 5e-4
    init: str = "teacher"
    tasks: tuple[str, ...] = ("sst2", "mrpc", "rte")
    finetune_steps: int = 100
    finetune_examples: int = 1000
    finetune_batch: int = 32
    finetune_lr: float = 1e-4
    finetune_seq_len: int = 128
    bf16: bool = False  # autocast for proxy distillation (teacher and students) and fine-tuning

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    def finetune_config(self, seed: int, progress: bool = False) -> FinetuneConfig:
        return FinetuneConfig(max_steps=self.finetune_steps, max_train_examples=self.finetune_examples,
                              batch_size=self.finetune_batch, lr=self.finetune_lr, max_seq_len=self.finetune_seq_len,
                              seed=seed, bf16=self.bf16, progress=progress)


@dataclass
class CandidateResult:
    mapping: LayerMapping
    seed: int
    fitness: float
    tasks: dict  # task key -> TaskResult dict (+ "collapsed")
    losses: dict  # mean of the last distillation steps
    seconds: float


@dataclass
class Counters:
    teacher_forwards: int = 0
    student_steps: int = 0
    teacher_seconds: float = 0.0
    student_seconds: float = 0.0
    finetune_seconds: float = 0.0
    per_generation: list = field(default_factory=list)


def _rng_state():
    # Only this process's own GPU: touching every device would open a context on each.
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def task_collapsed(result: dict) -> bool:
    return any(p.get("majority_prediction_fraction", 0.0) >= COLLAPSE_FRACTION for p in result["predictions"].values())


class ProxyEvaluator:
    def __init__(self, teacher_model, tokenizer, corpus, shape: StudentShape, cfg: ProxyConfig, task_cache: TaskCache,
                 task_specs, weights=None, progress: bool = True, loss_backend: str | None = None):
        self.teacher_model = teacher_model
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.shape = shape
        self.cfg = cfg
        self.cache = task_cache
        self.task_specs = task_specs
        self.weights = weights or loss_weights(DistillConfig(output="", corpus=""))
        self.progress = progress
        self.loss_backend = loss_backend  # changes rounding only, so not part of what a fitness means
        self.counters = Counters()
        self.device = next(teacher_model.parameters()).device

    def _distill_config(self, seed: int) -> DistillConfig:
        return DistillConfig(output="", corpus="", max_steps=self.cfg.steps, batch_size=self.cfg.batch_size,
                             max_seq_len=self.cfg.max_seq_len, lr=self.cfg.lr, init=self.cfg.init, seed=seed,
                             bf16=self.cfg.bf16, log_every=max(1, min(10, self.cfg.steps)), progress=False)

    def distill(self, mappings: list[LayerMapping], seed: int, desc: str = "proxy distill") -> list[tuple]:
        """Distill every mapping in lockstep; returns [(student, final_losses, seconds)].

        Each candidate draws its initialisation and dropout from its own RNG state (swapped in around
        its step), so its result depends only on (mapping, seed): not on which other candidates share
        the generation, their order, or the chunking. Lockstep therefore equals sequential exactly.
        """
        cfg = self._distill_config(seed)
        criteria, students, rng_states = [], [], []
        for mapping in mappings:
            torch.manual_seed(seed)
            criteria.append(DistillLoss(mapping, self.shape.hidden, self.teacher_model.config.hidden_size,
                                        self.weights, backend=self.loss_backend).to(self.device))
            students.append(build_student(self.teacher_model, self.shape, cfg.init, mapping, seed=seed).to(self.device))
            rng_states.append(_rng_state())
        teacher = Teacher(self.teacher_model, sorted({l for c in criteria for l in c.teacher_hidden_layers()}),
                          sorted({l for c in criteria for l in c.teacher_attention_layers()}),
                          autocast_dtype=torch.bfloat16 if cfg.bf16 else None)
        stream = BatchStream(self.corpus, cfg.batch_size, seed)
        distillers = [Distiller(cfg, teacher, s, c, stream) for s, c in zip(students, criteria)]
        student_seconds = [0.0] * len(distillers)
        failed: list[str | None] = [None] * len(distillers)
        teacher_seconds = 0.0
        outer_rng = _rng_state()
        bar = tqdm(total=cfg.max_steps, desc=desc, unit="step", disable=not self.progress, leave=False, dynamic_ncols=True)
        for _ in range(cfg.max_steps):
            t0 = time.perf_counter()
            batch = {k: v.to(self.device) for k, v in stream.next().items()}
            shared = [(batch, teacher(batch["input_ids"], batch["attention_mask"]))]  # the one teacher forward
            teacher_seconds += time.perf_counter() - t0
            for i, d in enumerate(distillers):
                if failed[i]:
                    continue
                t0 = time.perf_counter()
                _set_rng_state(rng_states[i])
                try:
                    result = d.train_step(shared)
                except NonFiniteAbort:
                    # One diverging candidate is a (bad) result, not the end of the search.
                    failed[i] = f"diverged at step {d.step}: {d.bad_steps} non-finite steps"
                    d.optimizer.zero_grad(set_to_none=True)
                    continue
                finally:
                    rng_states[i] = _rng_state()
                    student_seconds[i] += time.perf_counter() - t0
                if not result.skipped:
                    d.window.append({"loss": result.loss, **result.terms})
            bar.update(1)
        bar.close()
        _set_rng_state(outer_rng)
        self.counters.teacher_forwards += teacher.forwards
        self.counters.student_steps += cfg.max_steps * len(distillers)
        self.counters.teacher_seconds += teacher_seconds
        self.counters.student_seconds += sum(student_seconds)
        share = teacher_seconds / max(len(distillers), 1)
        out = []
        for d, s, why in zip(distillers, student_seconds, failed):
            d.optimizer.zero_grad(set_to_none=True)  # the students wait for fine-tuning without gradients
            out.append((d.student, {"failed": why} if why else d.final_losses(), s + share))
        return out

    def finetune(self, student, seed: int) -> dict:
        started = time.perf_counter()
        results = evaluate(student, self.tokenizer, self.task_specs, self.cache, self.cfg.finetune_config(seed))
        self.counters.finetune_seconds += time.perf_counter() - started
        out = {}
        for key, r in results.items():
            d = r.to_dict()
            d["collapsed"] = task_collapsed(d)
            out[key] = d
        return out

    def evaluate(self, mappings: list[LayerMapping], seed: int, chunk: int, on_result=None,
                 desc: str = "proxy distill") -> list[CandidateResult]:
        """Distill in chunks of `chunk` candidates, fine-tune each, report each as it finishes."""
        results = []
        for start in range(0, len(mappings), chunk):
            part = mappings[start:start + chunk]
            distilled = self.distill(part, seed, desc)
            for i, mapping in enumerate(part):
                student, losses, seconds = distilled[i]
                distilled[i] = None  # released once fine-tuned
                started = time.perf_counter()
                if "failed" in losses:
                    tasks, fitness = {}, 0.0  # the floor: ranked last, kept in the store so it is not retried
                else:
                    student.eval()
                    tasks = self.finetune(student, seed)
                    fitness = float(np.mean([t["score"] for t in tasks.values()]))
                result = CandidateResult(mapping, seed, fitness, tasks, losses,
                                         round(seconds + time.perf_counter() - started, 2))
                results.append(result)
                if on_result is not None:
                    on_result(result)  # stored at once: a kill loses at most the work in progress
                del student
        return results
