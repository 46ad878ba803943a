"""The proxy setting: short distillation of a whole generation on one teacher stream, then one rung
of the fidelity ladder (a frozen-feature probe or proxy GLUE fine-tuning: fastkd.search.rungs).

All candidates of a chunk are distilled in lockstep on the same batches. The teacher runs once per
batch (its outputs hold every layer any candidate needs) and serves every student of the step, so
the cost of a generation is steps x (T + P x S) instead of P x steps x (T + S). Both counts are kept:
`teacher_forwards` and `student_steps`. A distilled student is kept (a bounded LRU) so that a
mapping promoted to a higher rung at the same seed is scored again without distilling it again:
distillation is deterministic in (mapping, seed), so this changes cost, never a result.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..corpus import BatchStream
from .. import rng
from ..training import LocalEngine, NonFiniteAbort, TrainConfig
from ..glue import TaskCache
from ..glue.report import COLLAPSE_FRACTION
from ..losses import DistillLoss, objective_weights, relation_heads, sentence_pooling
from ..mapping import LayerMapping
from ..models import StudentShape, build_student
from ..teacher import Teacher
from .config import ProxyConfig
from .rungs import Rung

log = logging.getLogger(__name__)

FAILED_FITNESS = -1.0  # a candidate whose distillation diverged


@dataclass
class CandidateResult:
    mapping: LayerMapping
    seed: int
    fitness: float
    tasks: dict  # task key -> TaskResult dict (+ "collapsed")
    losses: dict  # mean of the last distillation steps
    seconds: float
    rung: str = "full"


@dataclass
class Counters:
    teacher_forwards: int = 0
    student_steps: int = 0
    teacher_seconds: float = 0.0
    student_seconds: float = 0.0
    build_seconds: float = 0.0  # student and loss construction (model construction)
    scoring_seconds: dict = field(default_factory=dict)  # rung -> seconds spent scoring students
    distilled: int = 0  # students distilled
    reused_students: int = 0  # promoted students scored again without distilling again



def task_collapsed(result: dict) -> bool:
    return any(p.get("majority_prediction_fraction", 0.0) >= COLLAPSE_FRACTION for p in result["predictions"].values())


class ProxyEvaluator:
    def __init__(self, teacher_model, tokenizer, corpus, shape: StudentShape, cfg: ProxyConfig, task_cache: TaskCache,
                 task_specs, weights=None, progress: bool = True, loss_backend: str | None = None,
                 keep_students: int = 16):
        self.teacher_model = teacher_model
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.shape = shape
        self.cfg = cfg
        self.cache = task_cache
        self.task_specs = task_specs
        self.weights = weights or objective_weights(cfg.objective)
        # validated by the search before any work (one line for a bad R or a family without Q/K/V)
        self.relation_heads = relation_heads(self.weights, cfg.relation_heads, teacher_model.config, shape.hidden)
        self.pooling = sentence_pooling(teacher_model.name_or_path, self.weights)  # read once, for every candidate
        self.progress = progress
        self.loss_backend = loss_backend  # changes rounding only, so not part of what a fitness means
        self.counters = Counters()
        self.device = next(teacher_model.parameters()).device
        self.keep_students = keep_students
        self._students: OrderedDict = OrderedDict()  # (mapping text, seed) -> (student, losses, seconds)
        # Called after each lockstep step: raises to stop at once (a stop signal), losing only work nothing
        # has stored yet. None: never (on several ranks the stop is agreed per stored result, in keep).
        self.interrupt = None

    def _train_config(self) -> TrainConfig:
        return TrainConfig(max_steps=self.cfg.steps, batch_size=self.cfg.batch_size, lr=self.cfg.lr,
                           bf16=self.cfg.bf16, log_every=max(1, min(10, self.cfg.steps)), progress=False,
                           max_seq_len=self.cfg.max_seq_len)

    def distill(self, mappings: list[LayerMapping], seed: int, desc: str = "proxy distill") -> list[tuple]:
        """Distill every mapping in lockstep; returns [(student, final_losses, seconds)].

        Each candidate draws its initialisation and dropout from its own RNG state (swapped in around
        its step), so its result depends only on (mapping, seed): not on which other candidates share
        the generation, their order, or the chunking. Lockstep therefore equals sequential exactly.
        """
        cfg = self._train_config()
        with rng.isolated(self.device):  # the caller's streams go on as if this had not run
            criteria, students, rng_states = [], [], []
            built = time.perf_counter()
            for mapping in mappings:
                torch.manual_seed(seed)
                criteria.append(DistillLoss.for_teacher(mapping, self.shape.hidden, self.teacher_model, self.weights,
                                                        self.loss_backend, self.relation_heads,
                                                        self.pooling).to(self.device))
                students.append(build_student(self.teacher_model, self.shape, self.cfg.init, mapping, seed=seed).to(self.device))
                rng_states.append(rng.capture(self.device))
            self.counters.build_seconds += time.perf_counter() - built
            teacher = Teacher.serving(self.teacher_model, criteria, cfg.bf16)
            stream = BatchStream(self.corpus, cfg.batch_size, seed)
            engines = [LocalEngine(cfg, teacher, s, c, stream) for s, c in zip(students, criteria)]
            student_seconds = [0.0] * len(engines)
            failed: list[str | None] = [None] * len(engines)
            teacher_seconds = 0.0
            bar = tqdm(total=cfg.max_steps, desc=desc, unit="step", disable=not self.progress, leave=False, dynamic_ncols=True)
            for _ in range(cfg.max_steps):
                t0 = time.perf_counter()
                batch = {k: v.to(self.device) for k, v in stream.next().items()}
                shared = [(batch, teacher(batch["input_ids"], batch["attention_mask"]))]  # the one teacher forward
                teacher_seconds += time.perf_counter() - t0
                for i, d in enumerate(engines):
                    if failed[i]:
                        continue
                    t0 = time.perf_counter()
                    rng.restore(rng_states[i], self.device)
                    try:
                        d.train_step(shared)
                        if d.step % cfg.log_every == 0 or d.step == cfg.max_steps:
                            d.read()  # the numbers reach the host here (one sync), and a divergence is seen
                    except NonFiniteAbort:
                        # One diverging candidate is a (bad) result, not the end of the search.
                        failed[i] = f"diverged at step {d.step}: {d.bad_steps} non-finite steps"
                        d.optimizer.zero_grad(set_to_none=True)
                        continue
                    finally:
                        rng_states[i] = rng.capture(self.device)
                        student_seconds[i] += time.perf_counter() - t0
                bar.update(1)
                if self.interrupt is not None:
                    self.interrupt()
            bar.close()
        self.counters.teacher_forwards += teacher.forwards
        self.counters.student_steps += cfg.max_steps * len(engines)
        self.counters.teacher_seconds += teacher_seconds
        self.counters.student_seconds += sum(student_seconds)
        share = teacher_seconds / max(len(engines), 1)
        out = []
        for d, s, why in zip(engines, student_seconds, failed):
            d.optimizer.zero_grad(set_to_none=True)  # the students wait for fine-tuning without gradients
            out.append((d.student, {"failed": why} if why else d.final_losses(), s + share))
        return out

    def score(self, student, seed: int, rung: Rung, part: str = "selection") -> dict:
        started = time.perf_counter()
        out = rung.score(student, self.tokenizer, self.task_specs, self.cache, self.cfg.finetune_config(seed, part=part))
        self.counters.scoring_seconds[rung.name] = self.counters.scoring_seconds.get(rung.name, 0.0) + (
            time.perf_counter() - started)
        for d in out.values():
            d["collapsed"] = task_collapsed(d)
        return out

    def _distilled(self, mappings: list[LayerMapping], seed: int, desc: str) -> dict:
        """(mapping text) -> (student, losses, seconds): kept students first, the rest distilled together."""
        out = {}
        missing = []
        for m in mappings:
            key = (m.text, seed)
            if key in self._students:
                self._students.move_to_end(key)
                student, losses, _ = self._students[key]
                out[m.text] = (student, losses, 0.0)  # no distillation this time
                self.counters.reused_students += 1
            else:
                missing.append(m)
        if missing:
            for m, item in zip(missing, self.distill(missing, seed, desc)):
                out[m.text] = item
                self.counters.distilled += 1
                if self.keep_students > 0 and "failed" not in item[1]:
                    self._students[(m.text, seed)] = item
                    while len(self._students) > self.keep_students:
                        self._students.popitem(last=False)
        return out

    def evaluate(self, mappings: list[LayerMapping], seed: int, chunk: int, on_result=None,
                 desc: str = "proxy distill", rung: Rung = Rung("full"), part: str = "selection") -> list[CandidateResult]:
        """Distill in chunks of `chunk` candidates, score each on `rung` (held-out slice `part`), report each
        as it finishes."""
        results = []
        for start in range(0, len(mappings), chunk):
            group = mappings[start:start + chunk]
            distilled = self._distilled(group, seed, desc)
            for mapping in group:
                student, losses, seconds = distilled.pop(mapping.text)
                started = time.perf_counter()
                if "failed" in losses:
                    # The floor of every metric (correlations and MCC reach -1): ranked last, and kept in
                    # the store so it is not retried.
                    tasks, fitness = {}, FAILED_FITNESS
                else:
                    student.eval()
                    tasks = self.score(student, seed, rung, part)
                    fitness = float(np.mean([t["score"] for t in tasks.values()]))
                result = CandidateResult(mapping, seed, fitness, tasks, losses,
                                         round(seconds + time.perf_counter() - started, 2), rung.name)
                results.append(result)
                if on_result is not None:
                    on_result(result)  # stored at once: a kill loses at most the work in progress
                del student
        return results
