"""`fastkd search`: GA over layer mappings on a fidelity ladder, judged on held-out seeds.

Flow: check each proxy task's signal (the teacher fine-tuned with the proxy budget must beat the
majority class by 5 points) -> G generations of P candidates scored on the ladder's cheapest rung
with the selection seed, each generation distilled on one teacher stream -> successive halving:
the best `promote` fraction of each rung (and uniform and last) is scored on the next rung -> the
winner is the best on the top rung, still with the selection seed -> the winner, uniform and last
are evaluated on the top rung with held-out verdict seeds, and the verdict is a paired t interval
of the differences (fastkd.search.verdict). Every finished evaluation is stored under its rung.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..corpus import check_cache_dir, load_corpus, sample_corpus
from ..errors import UserError
from ..glue import TaskCache, parse_tasks, task_spec
from ..glue.heldout import heldout_rows
from ..glue.tasks import ZERO_SHOT_TASK
from ..rundir import RunDir, check_writable_dir, refuse_busy_output, refuse_foreign_output
from ..mapping import heuristic
from ..options import resolved_config
from ..families import usable_positions
from ..losses import objective_weights, relation_heads, sentence_pooling
from ..models import load_config, load_teacher, load_tokenizer, student_shape
from ..training.loop import add_scalars, stop_signals, tensorboard_writer
from .dist import Comm
from .ga import GeneticSearch, genome_key
from .config import MEANINGFUL_HELDOUT, SearchConfig
from .evaluator import StoredEvaluator
from .proxy import ProxyEvaluator, task_collapsed
from .rungs import Rung, successive_halving
from .store import Evaluation, Store
from .summary import SearchSummary, fitness_of
from .verdict import PairedInterval, paired_interval

log = logging.getLogger(__name__)

WEAK_TASK_MARGIN = 0.05  # the teacher must beat the majority class by this much on a proxy task
TEACHER_ROW = "teacher"  # the store row holding the teacher's proxy fine-tuning (signal check)
SIGNAL_GENERATION, PROMOTION_GENERATION, VERDICT_GENERATION = -1, -3, -2  # the `generation` of non-GA rows


@dataclass
class Verdict:
    """The winner against one heuristic on the verdict seeds."""

    name: str  # "uniform" or "last"
    mapping: str
    interval: PairedInterval
    winner_runs: list[float]
    reference_runs: list[float]

    def as_dict(self) -> dict:
        return {"name": self.name, "mapping": self.mapping, **self.interval.as_dict(),
                "winner_runs": self.winner_runs, "reference_runs": self.reference_runs}


class Search:
    def __init__(self, cfg: SearchConfig):
        cfg.validate()
        check_cache_dir(cfg.cache_dir)  # first: a refusal leaves no new output folder behind
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # (ranks of one search share its output)
            refuse_busy_output(cfg.output)  # before a corpus is tokenized, not after
        refuse_foreign_output(cfg.output, "search")
        check_writable_dir(cfg.output)  # before the teacher, corpus and tasks are loaded
        self.cfg = cfg
        self.started = time.perf_counter()
        self.rungs = cfg.rungs()
        self.top = self.rungs[-1]
        self.verdict_seeds = cfg.verdict_seed_list()
        teacher_config = load_config(cfg.teacher, "teacher")
        self.N = teacher_config.num_hidden_layers
        self.shape = student_shape(teacher_config, cfg.student_layers, cfg.student_hidden, cfg.student_heads,
                                   cfg.student_ffn)
        self.tasks = parse_tasks(",".join(cfg.proxy.tasks), "--proxy-tasks")
        # the objective's relation heads fit both models, and the family records what it needs
        relation_heads(objective_weights(cfg.proxy.objective), cfg.proxy.relation_heads, teacher_config,
                       self.shape.hidden)
        sentence_pooling(cfg.teacher, objective_weights(cfg.proxy.objective))  # an unreadable pipeline: one line now
        if cfg.proxy.max_seq_len > usable_positions(teacher_config):
            raise UserError(f"--proxy-seq-len {cfg.proxy.max_seq_len} exceeds the {usable_positions(teacher_config)} "
                            "tokens the teacher's position embeddings take")
        self.cache = TaskCache(cfg.data_dir)
        for spec in self.tasks:
            self.cache.data(spec)  # a missing proxy task fails now, in one line
        if any(r.name == "zeroshot" for r in self.rungs):
            stsb = self.cache.data(task_spec(ZERO_SHOT_TASK))  # the zeroshot rung reads STS-B
            if heldout_rows(len(stsb.train), cfg.proxy.heldout, None, min_left=0) is None:
                raise UserError(f"--ladder zeroshot needs 2 x --proxy-heldout ({cfg.proxy.heldout}) STS-B training rows "
                                f"and {stsb.train.source or 'STS-B train'} has {len(stsb.train)}: lower --proxy-heldout "
                                "(else the search would select on the STS-B dev set final tables report)")
        store_path = Path(cfg.output) / "search.sqlite"
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 and store_path.exists():
            # a store of other settings (or one --resume should continue) is refused now, not after the tokenizing
            Store(store_path, cfg.fitness_settings(), cfg.resume, create=False,
                  legacy_settings=lambda: cfg.fitness_settings(legacy=True)).close()
        t0 = time.perf_counter()
        # The corpus before the output folder: a corpus it cannot use leaves nothing behind.
        self.tokenizer = load_tokenizer(cfg.teacher)
        corpus = load_corpus(cfg.corpus, self.tokenizer, cfg.proxy.max_seq_len, cfg.cache_dir, cfg.num_proc,
                             cfg.progress, cfg.corpus_mode_used(), "--proxy-seq-len")
        self.corpus = sample_corpus(corpus, cfg.proxy.sequences, cfg.seed)
        self.comm = Comm()
        self.output = Path(cfg.output)
        self.store = None
        if self.comm.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            if self.comm.world == 1:  # (a refusal on one rank of many would leave the others waiting)
                RunDir(self.output, "search").claim()
            self.store = Store(self.output / "search.sqlite", cfg.fitness_settings(), cfg.resume,
                               legacy_settings=lambda: cfg.fitness_settings(legacy=True))
            # The resolved settings, in the form --config reads (fastkd search --config it reruns this search).
            RunDir(self.output, "search").write_config(resolved_config("search", cfg))
        self.teacher = load_teacher(cfg.teacher).to(self.comm.device())
        self.timings = {"load teacher and corpus (tokenization)": time.perf_counter() - t0}
        self.ga = GeneticSearch(self.shape.layers, self.N, cfg.ga_config())
        self.generations: list[dict] = []
        self.promotions: list[dict] = []
        self.evaluator = StoredEvaluator(
            self.comm, self.store, self.ga.mapping, self.output, cfg.chunk,
            lambda task_specs: ProxyEvaluator(self.teacher, self.tokenizer, self.corpus, self.shape, cfg.proxy,
                                              self.cache, task_specs, progress=cfg.progress,
                                              loss_backend=cfg.loss_backend))
        self.board = None  # TensorBoard writer (--report-to tensorboard, main rank)
        self.signal: dict = {}
        self.heuristics = {name: self.ga.genome(heuristic(name, self.shape.layers, self.N))
                           for name in ("uniform", "last", "first")}

    # --- evaluation through the store ------------------------------------------------------
    @property
    def results(self) -> dict[tuple, dict[int, Evaluation]]:
        return self.evaluator.results

    def fitness(self, genome: tuple, rung: Rung, seed: int) -> float | None:
        return fitness_of(self.results, genome, rung, seed)

    def for_report(self) -> SearchSummary:
        """What the report reads, apart from the live search (its evaluator, store and ranks)."""
        return SearchSummary(self.cfg, self.output, self.shape, self.N, self.rungs, self.top, list(self.tasks),
                             list(self.verdict_seeds), dict(self.heuristics), self.results, list(self.generations),
                             self.signal, dict(self.timings), self.evaluator.reused, self.evaluator.counters,
                             time.perf_counter() - self.started)

    def evaluate(self, genomes: list[tuple], seed: int, generation: int, label: str,
                 rung: Rung, part: str = "selection") -> dict[tuple, Evaluation]:
        return self.evaluator.evaluate(genomes, seed, generation, label, rung, self.tasks, part)

    def teacher_forwards(self) -> int:
        counters = self.evaluator.counters
        return 0 if counters is None else counters.teacher_forwards

    # --- phases -----------------------------------------------------------------------------
    def check_signal(self) -> None:
        """The teacher fine-tuned with the proxy budget: a task it cannot learn carries no signal."""
        top = self.top
        row = self.store.get(TEACHER_ROW, self.cfg.seed, top.name) if self.comm.is_main else None
        row = self.comm.broadcast(row)
        if row is None and self.comm.is_main:
            log.info("signal check: the teacher on %s with the proxy budget (rung %s)",
                     ", ".join(t.name for t in self.tasks), top.name)
            started = time.perf_counter()
            tasks = top.score(self.teacher, self.tokenizer, self.tasks, self.cache,
                              self.cfg.proxy.finetune_config(self.cfg.seed))
            for t in tasks.values():
                t["collapsed"] = task_collapsed(t)
            fitness = statistics.fmean(t["score"] for t in tasks.values())
            self.store.put(Evaluation(TEACHER_ROW, self.cfg.seed, SIGNAL_GENERATION, fitness, tasks, {},
                                      time.perf_counter() - started, top.name))
            row = self.store.get(TEACHER_ROW, self.cfg.seed, top.name)
            self.evaluator.stored += 1
        row, signum = self.comm.broadcast((row, self.evaluator.caught["signum"]))
        self.evaluator.stop_if_signalled([signum] if signum is not None else [])
        self.timings["signal check (teacher fine-tuned)"] = row.seconds
        weak = [k for k, t in row.tasks.items() if t["score"] - t["baseline_score"] < WEAK_TASK_MARGIN - 1e-9]
        self.signal = {"teacher": row.tasks, "teacher_fitness": row.fitness, "weak_tasks": weak}
        for key in weak:
            t = row.tasks[key]
            log.warning("proxy task %s is too weak: the teacher scores %.1f vs majority %.1f (< %d points)%s",
                        t["task"], 100 * t["score"], 100 * t["baseline_score"], round(100 * WEAK_TASK_MARGIN),
                        "; dropped (--drop-weak-tasks)" if self.cfg.drop_weak_tasks else "")
        for t in row.tasks.values():
            if 0 < t.get("dev_examples", 0) < MEANINGFUL_HELDOUT:
                log.warning("proxy task %s is scored on %d rows (%s): its sampling error, about %.0f points, exceeds "
                            "the 1-2 points mappings differ by; the ranking means little (score on at least %d rows)",
                            t["task"], t["dev_examples"], t.get("eval_split", "dev"), 50 / t["dev_examples"] ** 0.5,
                            MEANINGFUL_HELDOUT)
        if self.cfg.drop_weak_tasks and weak:
            kept = [t for t in self.tasks if t.key not in weak]
            if not kept:
                raise UserError("every proxy task is too weak for this teacher and budget: raise "
                                "--proxy-finetune-steps or choose other --proxy-tasks")
            self.tasks = kept

    def run_generations(self) -> None:
        cfg, rung = self.cfg, self.rungs[0]
        population = self.ga.initial_population()
        main_fitness: dict[tuple, float] = {}
        for gen in range(cfg.generations):
            before = self.teacher_forwards()
            results = self.evaluate(population, cfg.seed, gen, f"generation {gen + 1}/{cfg.generations}", rung)
            for g in population:
                main_fitness[g] = results[g].fitness
            values = [main_fitness[g] for g in population]
            self.generations.append({
                "generation": gen + 1, "best": max(values), "mean": statistics.fmean(values),
                "best_so_far": max(main_fitness.values()), "evaluated": len(population),
                "teacher_forwards": self.teacher_forwards() - before})
            log.info("generation %d (rung %s): best %.4f, mean %.4f, best so far %.4f", gen + 1, rung.name, max(values),
                     statistics.fmean(values), max(main_fitness.values()))
            if self.board is not None:  # (teacher_forwards left out: on --resume it counts this process's work)
                add_scalars(self.board, f"search/{rung.name}", {k: v for k, v in self.generations[-1].items()
                                                                if k in ("best", "mean", "best_so_far", "evaluated")},
                            gen + 1)
            if gen + 1 < cfg.generations:
                population = self.ga.next_generation({g: main_fitness[g] for g in population}, set(main_fitness))
                if not population:
                    break
        self.main_fitness = main_fitness

    def climb(self) -> None:
        """Successive halving up the ladder, on the selection seed; uniform and last climb every rung."""
        seed = self.cfg.seed
        fitness = dict(self.main_fitness)
        for lower, rung in zip(self.rungs, self.rungs[1:]):
            promoted = successive_halving(fitness, self.cfg.promote)
            group = list(dict.fromkeys(promoted + [self.heuristics["uniform"], self.heuristics["last"]]))
            results = self.evaluate(group, seed, PROMOTION_GENERATION, f"rung {rung.name}", rung)
            self.promotions.append({"from": lower.name, "to": rung.name, "candidates": len(fitness),
                                    "promoted": len(promoted), "evaluated": len(group)})
            fitness = {g: results[g].fitness for g in group}
        self.top_fitness = fitness

    def choose_winner(self) -> tuple:
        """Best on the top rung with the selection seed; ties go to a heuristic (the simpler claim)."""
        priority = {self.heuristics["uniform"]: 0, self.heuristics["last"]: 1}
        return min(self.top_fitness, key=lambda g: (-self.top_fitness[g], priority.get(g, 2), genome_key(g)))

    def judge(self, winner: tuple) -> dict[str, Verdict]:
        """Winner, uniform and last on the top rung with every verdict seed: paired differences."""
        group = list(dict.fromkeys([winner, self.heuristics["uniform"], self.heuristics["last"]]))
        for k, seed in enumerate(self.verdict_seeds, start=1):
            # Scored on the verdict slice: rows the winner was never chosen on.
            self.evaluate(group, seed, VERDICT_GENERATION, f"verdict seed {k}/{len(self.verdict_seeds)}", self.top,
                          part="verdict")
        verdicts = {}
        for name in ("uniform", "last"):
            ref = self.heuristics[name]
            if name == "last" and ref == self.heuristics["uniform"]:
                continue  # the same mapping: one comparison, named uniform
            seeds = [s for s in self.verdict_seeds
                     if self.fitness(winner, self.top, s) is not None and self.fitness(ref, self.top, s) is not None]
            a = [self.fitness(winner, self.top, s) for s in seeds]
            b = [self.fitness(ref, self.top, s) for s in seeds]
            verdicts[name] = Verdict(name, self.mapping_text(ref), paired_interval(a, b), a, b)
        return verdicts

    # --- summary --------------------------------------------------------------------------------
    def mapping_text(self, genome: tuple) -> str:
        return self.ga.mapping(genome).text

    def rank_correlations(self) -> dict[str, dict]:
        """Each lower rung against the top rung, over the mappings scored on both (selection seed).

        Only promoted mappings reach the top rung, so this is measured on a range-restricted set:
        benchmarks/search_fidelity.py measures it on fixed mappings over seeds.
        """
        from scipy import stats

        out = {}
        seed = self.cfg.seed
        for rung in self.rungs[:-1]:
            both = [g for (g, r) in self.results if r == rung.name and self.fitness(g, self.top, seed) is not None
                    and self.fitness(g, rung, seed) is not None]
            x = [self.fitness(g, rung, seed) for g in both]
            y = [self.fitness(g, self.top, seed) for g in both]
            if len(both) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
                out[rung.name] = {"n": len(both), "spearman": float(stats.spearmanr(x, y)[0]),
                                  "kendall": float(stats.kendalltau(x, y)[0])}
            else:
                out[rung.name] = {"n": len(both), "spearman": None, "kendall": None}
        return out

    def summary(self, winner: tuple, verdicts: dict[str, Verdict]) -> dict:
        names: dict = {}
        for n, g in self.heuristics.items():  # uniform first: with M = N (or M = 1) uniform and last coincide
            names.setdefault(g, n)
        return {"winner": self.mapping_text(winner), "winner_genome": winner, "verdicts": verdicts,
                "heuristic_names": names, "rank_correlations": self.rank_correlations(),
                "verdict_seeds": self.verdict_seeds, "selection_seed": self.cfg.seed}

    def run(self) -> dict:
        ok = False
        self.board = None
        if self.comm.is_main and self.cfg.report_to == "tensorboard":
            # Every scalar is written again on --resume (finished generations are replayed from the
            # store), so the old events go first: no step appears twice.
            shutil.rmtree(self.output / "tensorboard", ignore_errors=True)
            self.board = tensorboard_writer(self.cfg, self.output, 0)
        try:
            then = ("stopping now (during proxy distillation) or after the evaluation in flight" if self.comm.world == 1
                    else "stopping after the evaluation in flight")
            with stop_signals(then) as caught:
                self.evaluator.caught = caught
                result = self._run()
            ok = True
            return result
        finally:
            self.evaluator.caught = {"signum": None}
            if self.board is not None:
                self.board.close()
            self.comm.close(ok)

    def _run(self) -> dict:
        self.check_signal()
        phase = time.perf_counter()
        self.run_generations()
        self.climb()
        winner = self.choose_winner()
        self.timings["GA and ladder (selection seed)"] = time.perf_counter() - phase
        phase = time.perf_counter()
        verdicts = self.judge(winner)
        self.timings["verdict (held-out seeds)"] = time.perf_counter() - phase
        result = self.summary(winner, verdicts)
        if self.board is not None:
            for name, v in sorted(verdicts.items()):  # the paired difference, winner - heuristic
                add_scalars(self.board, f"search/verdict_vs_{name}", {"mean_difference": v.interval.mean,
                                                                      "low": v.interval.low, "high": v.interval.high,
                                                                      "seeds": v.interval.n}, 1)
        if self.comm.is_main:
            from .report import write_outputs  # matplotlib only when there is something to draw

            write_outputs(self.for_report(), result)
        return result
