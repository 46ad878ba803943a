"""`fastkd search`: GA over layer mappings in the proxy setting, with its noise measured.

Flow: check each proxy task's signal (the teacher fine-tuned with the proxy budget must beat the
majority class by 5 points) -> G generations of P candidates, each generation distilled on one
teacher stream, every finished evaluation stored -> the heuristics and the finalists re-evaluated
with fresh seeds -> winner by mean fitness, compared with uniform and last against 2 SD of the noise.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..corpus import corpus_identity, load_corpus, sample_corpus
from ..errors import UserError
from ..glue import TaskCache, evaluate, parse_tasks
from ..io import atomic_write_json
from ..mapping import LayerMapping, heuristic, parse_mapping, search_space_size
from ..models import load_config, load_teacher, load_tokenizer, resolve_model_path, student_shape
from .dist import Comm
from .ga import GAConfig, GeneticSearch
from .proxy import CandidateResult, ProxyConfig, ProxyEvaluator, task_collapsed
from .store import Evaluation, Store

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when proxy training changes what a fitness value means
WEAK_TASK_MARGIN = 0.05  # the teacher must beat the majority class by this much on a proxy task
TEACHER_ROW = "teacher"  # the store row holding the teacher's proxy fine-tuning (signal check)
SEED_STRIDE = 1000  # repeat seeds: seed + k * SEED_STRIDE


def _resolved(path: str) -> str:
    return path if path == "hub" or not Path(path).exists() else str(Path(path).resolve())


def _identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _model_identity(name: str) -> list:
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return [name]  # a hub name: its revision is the hub's business
    return [_identity(p) for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt")]


@dataclass
class SearchConfig:
    output: str
    corpus: str
    data_dir: str
    teacher: str = "default"
    student_layers: int = 3
    student_hidden: int | None = None
    student_heads: int | None = None
    student_ffn: int | None = None
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    population: int = 8
    generations: int = 4
    monotone: bool = False
    repeats: int = 3  # seeds for uniform, last and each finalist
    finalists: int = 3
    drop_weak_tasks: bool = False
    chunk: int = 8  # candidates distilled together (memory)
    seed: int = 0
    resume: bool = False
    progress: bool = True
    cache_dir: str | None = None
    loss_backend: str | None = None  # rounding only: not in fitness_settings

    def ga_config(self) -> GAConfig:
        return GAConfig(population=self.population, generations=self.generations, monotone=self.monotone,
                        seed=self.seed)

    def fitness_settings(self) -> dict:
        """What determines a fitness value (the store key), apart from the mapping and the seed:
        the settings, and the identity (path, size, mtime) of the teacher, corpus and task files,
        so a re-exported teacher or edited data is not mistaken for the old one."""
        tasks = parse_tasks(",".join(self.proxy.tasks))
        data = Path(self.data_dir)
        task_files = [] if str(self.data_dir) == "hub" else [
            _identity(p) for t in tasks for p in sorted((data / t.name).glob("*.tsv"))]
        return {"recipe": RECIPE_VERSION, "teacher": self.teacher, "teacher_files": _model_identity(self.teacher),
                "student": [self.student_layers, self.student_hidden, self.student_heads, self.student_ffn],
                "corpus": corpus_identity(self.corpus), "data_dir": _resolved(self.data_dir), "task_files": task_files,
                "proxy": self.proxy.as_dict(), "drop_weak_tasks": self.drop_weak_tasks, "sample_seed": self.seed}

    def validate(self) -> None:
        self.ga_config().validate()
        for name, value, low in (("--repeats", self.repeats, 1), ("--finalists", self.finalists, 1),
                                 ("--proxy-chunk", self.chunk, 1), ("--proxy-steps", self.proxy.steps, 1),
                                 ("--proxy-sequences", self.proxy.sequences, 1),
                                 ("--proxy-finetune-steps", self.proxy.finetune_steps, 1)):
            if value < low:
                raise UserError(f"{name} must be at least {low} (got {value})")


@dataclass
class Scored:
    """All evaluations of one mapping (one per seed)."""

    mapping: LayerMapping
    runs: list[Evaluation] = field(default_factory=list)
    selection_seed: int = 0

    @property
    def fresh(self) -> list[Evaluation]:
        """Runs on fresh seeds (not the seed the GA selected on): unbiased for the verdict."""
        fresh = [r for r in self.runs if r.seed != self.selection_seed]
        return fresh or self.runs

    @property
    def mean(self) -> float:
        return statistics.fmean(r.fitness for r in self.fresh)

    @property
    def sd(self) -> float:
        runs = self.fresh
        return statistics.stdev([r.fitness for r in runs]) if len(runs) > 1 else float("nan")


def _evaluation(result: CandidateResult, generation: int) -> Evaluation:
    return Evaluation(result.mapping.text, result.seed, generation, result.fitness, result.tasks, result.losses,
                      result.seconds)


class Search:
    def __init__(self, cfg: SearchConfig):
        cfg.validate()
        self.cfg = cfg
        self.started = time.perf_counter()
        teacher_config = load_config(cfg.teacher, "teacher")
        self.N = teacher_config.num_hidden_layers
        self.shape = student_shape(teacher_config, cfg.student_layers, cfg.student_hidden, cfg.student_heads,
                                   cfg.student_ffn)
        self.tasks = parse_tasks(",".join(cfg.proxy.tasks))
        if cfg.proxy.max_seq_len > teacher_config.max_position_embeddings:
            raise UserError(f"--proxy-seq-len {cfg.proxy.max_seq_len} exceeds the teacher's "
                            f"{teacher_config.max_position_embeddings} position embeddings")
        self.cache = TaskCache(cfg.data_dir)
        for spec in self.tasks:
            self.cache.data(spec)  # a missing proxy task fails now, in one line
        self.comm = Comm()
        self.output = Path(cfg.output)
        self.store = None
        if self.comm.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            self.store = Store(self.output / "search.sqlite", cfg.fitness_settings(), cfg.resume)
        self.tokenizer = load_tokenizer(cfg.teacher)
        self.teacher = load_teacher(cfg.teacher).to(self.comm.device())
        corpus = load_corpus(cfg.corpus, self.tokenizer, cfg.proxy.max_seq_len, cfg.cache_dir)
        self.corpus = sample_corpus(corpus, cfg.proxy.sequences, cfg.seed)
        self.ga = GeneticSearch(self.shape.layers, self.N, cfg.ga_config())
        self.scored: dict[tuple, Scored] = {}
        self.generations: list[dict] = []
        self.reused = 0
        self.signal: dict = {}

    # --- evaluation through the store ------------------------------------------------------
    def _evaluator(self, task_specs) -> ProxyEvaluator:
        if not hasattr(self, "_ev") or self._ev.task_specs != task_specs:
            self._ev = ProxyEvaluator(self.teacher, self.tokenizer, self.corpus, self.shape, self.cfg.proxy, self.cache,
                                      task_specs, progress=self.cfg.progress, loss_backend=self.cfg.loss_backend)
        return self._ev

    def evaluate(self, genomes: list[tuple], seed: int, generation: int, label: str) -> dict[tuple, Evaluation]:
        """Stored results where present; the rest evaluated (spread over ranks) and stored one by one.

        The store's row is the truth: when another process stored the same (mapping, seed) first, its
        value is used, so every process and every resume sees the same fitness.
        """
        found, missing = {}, []
        for g in genomes:
            known = next((r for r in self.scored[g].runs if r.seed == seed), None) if g in self.scored else None
            if known is not None:  # evaluated earlier in this search (an elite carried over)
                found[g] = known
        if self.comm.is_main:
            for g in genomes:
                if g in found:
                    continue
                row = self.store.get(LayerMapping(g, self.N).text, seed)
                if row is not None:  # finished before an interruption, or by a concurrent search
                    found[g] = row
                    self.reused += 1
                else:
                    missing.append(g)
        found, missing, self.reused = self.comm.broadcast((found, missing, self.reused))
        if missing:
            if self.comm.is_main:
                log.info("%s: evaluating %d mappings (%d known)%s", label, len(missing), len(found),
                         f" on {self.comm.world} ranks" if self.comm.world > 1 else "")
            by_text = {LayerMapping(g, self.N).text: g for g in missing}
            mine = [LayerMapping(g, self.N) for g in missing[self.comm.rank::self.comm.world]]
            rounds = -(-len(missing) // self.comm.world)

            def keep(result: CandidateResult | None) -> None:
                # One round per finished candidate on every rank (None pads the shorter slices), so
                # rank 0 stores each result as it finishes: a kill loses only the work in flight.
                gathered = [e for e in self.comm.all_gather(None if result is None else _evaluation(result, generation))
                            if e is not None]
                stored = []
                if self.comm.is_main:
                    for e in gathered:
                        self.store.put(e)
                        stored.append(self.store.get(e.mapping, e.seed))
                for e in self.comm.broadcast(stored):
                    found[by_text[e.mapping]] = e

            if mine:
                self._evaluator(self.tasks).evaluate(mine, seed, self.cfg.chunk, desc=label, on_result=keep)
            for _ in range(rounds - len(mine)):
                keep(None)
        for g, row in found.items():
            entry = self.scored.setdefault(g, Scored(LayerMapping(g, self.N), selection_seed=self.cfg.seed))
            if all(r.seed != row.seed for r in entry.runs):
                entry.runs.append(row)
        return found

    # --- phases -----------------------------------------------------------------------------
    def check_signal(self) -> None:
        """The teacher fine-tuned with the proxy budget: a task it cannot learn carries no signal."""
        row = self.store.get(TEACHER_ROW, self.cfg.seed) if self.comm.is_main else None
        row = self.comm.broadcast(row)
        if row is None and self.comm.is_main:
            log.info("signal check: fine-tuning the teacher on %s with the proxy budget",
                     ", ".join(t.name for t in self.tasks))
            started = time.perf_counter()
            results = evaluate(self.teacher, self.tokenizer, self.tasks, self.cache,
                               self.cfg.proxy.finetune_config(self.cfg.seed))
            tasks = {k: {**r.to_dict(), "collapsed": task_collapsed(r.to_dict())} for k, r in results.items()}
            fitness = statistics.fmean(t["score"] for t in tasks.values())
            self.store.put(Evaluation(TEACHER_ROW, self.cfg.seed, -1, fitness, tasks, {}, time.perf_counter() - started))
            row = self.store.get(TEACHER_ROW, self.cfg.seed)
        row = self.comm.broadcast(row)
        weak = [k for k, t in row.tasks.items() if t["score"] - t["baseline_score"] < WEAK_TASK_MARGIN - 1e-9]
        self.signal = {"teacher": row.tasks, "teacher_fitness": row.fitness, "weak_tasks": weak}
        for key in weak:
            t = row.tasks[key]
            log.warning("proxy task %s is too weak: the teacher scores %.1f vs majority %.1f (< %d points)%s",
                        t["task"], 100 * t["score"], 100 * t["baseline_score"], round(100 * WEAK_TASK_MARGIN),
                        "; dropped (--drop-weak-tasks)" if self.cfg.drop_weak_tasks else "")
        if self.cfg.drop_weak_tasks and weak:
            kept = [t for t in self.tasks if t.key not in weak]
            if not kept:
                raise UserError("every proxy task is too weak for this teacher and budget: raise "
                                "--proxy-finetune-steps or choose other --proxy-tasks")
            self.tasks = kept

    def run_generations(self) -> None:
        cfg = self.cfg
        population = self.ga.initial_population()
        main_fitness: dict[tuple, float] = {}
        for gen in range(cfg.generations):
            before = self._ev.counters.teacher_forwards if hasattr(self, "_ev") else 0
            results = self.evaluate(population, cfg.seed, gen, f"generation {gen + 1}/{cfg.generations}")
            for g in population:
                main_fitness[g] = results[g].fitness
            values = [main_fitness[g] for g in population]
            self.generations.append({
                "generation": gen + 1, "best": max(values), "mean": statistics.fmean(values),
                "best_so_far": max(main_fitness.values()), "evaluated": len(population),
                "teacher_forwards": (self._ev.counters.teacher_forwards if hasattr(self, "_ev") else 0) - before})
            log.info("generation %d: best %.4f, mean %.4f, best so far %.4f", gen + 1, max(values),
                     statistics.fmean(values), max(main_fitness.values()))
            if gen + 1 < cfg.generations:
                population = self.ga.next_generation({g: main_fitness[g] for g in population}, set(main_fitness))
                if not population:
                    break
        self.main_fitness = main_fitness

    def measure_noise(self) -> None:
        """uniform, last and the finalists get `repeats` seeds in all; the winner is chosen by mean."""
        M, N = self.shape.layers, self.N
        heuristics = [heuristic(name, M, N).layers for name in ("uniform", "last")]
        ranked = sorted(self.main_fitness, key=lambda g: -self.main_fitness[g])
        finalists = [g for g in ranked if g not in heuristics][: self.cfg.finalists]
        self.finalist_genomes = finalists
        group = list(dict.fromkeys(heuristics + finalists))
        if self.cfg.repeats < 2:
            return  # noise not measured; the verdict says so
        # Fresh seeds only count for the verdict: a finalist's selection seed is biased upwards.
        for k in range(1, self.cfg.repeats + 1):
            self.evaluate(group, self.cfg.seed + k * SEED_STRIDE, -2, f"noise: seed {k}/{self.cfg.repeats}")

    # --- verdict ------------------------------------------------------------------------------
    def summary(self) -> dict:
        M, N = self.shape.layers, self.N
        repeated = [s for s in self.scored.values() if len(s.fresh) >= 2]
        # Pooled within-mapping SD over fresh seeds: the noise of one fitness value.
        pooled = math.sqrt(sum((len(s.fresh) - 1) * s.sd ** 2 for s in repeated) /
                           max(sum(len(s.fresh) - 1 for s in repeated), 1)) if repeated else float("nan")
        names = {heuristic(n, M, N).layers: n for n in ("uniform", "last", "first")}
        priority = {"uniform": 3, "last": 2, "first": 1}

        def rank_key(s: Scored):
            # Best mean first; on a tie, the better-measured mapping, then a heuristic (the simpler claim).
            return (-s.mean, -len(s.fresh), -priority.get(names.get(s.mapping.layers, ""), 0), s.mapping.text)

        ranking = sorted(self.scored.values(), key=rank_key)
        winner = next((s for s in ranking if len(s.fresh) >= 2), ranking[0])
        comparisons = {}
        for name in ("uniform", "last"):
            ref = self.scored.get(heuristic(name, M, N).layers)
            if ref is None:
                continue
            gap = winner.mean - ref.mean
            # No claim without a measured, non-zero noise: a zero SD (say, every run collapsed alike)
            # would make any gap look "significant".
            measured = not math.isnan(pooled) and pooled > 0
            comparisons[name] = {"mapping": ref.mapping.text, "mean": ref.mean,
                                 "sd": None if math.isnan(ref.sd) else ref.sd, "runs": len(ref.fresh), "gap": gap,
                                 "beats_by_2sd": bool(gap > 2 * pooled) if measured else None}
        return {"winner": winner, "noise_sd": pooled, "comparisons": comparisons, "ranking": ranking,
                "heuristic_names": names}

    def run(self) -> dict:
        ok = False
        try:
            self.check_signal()
            self.run_generations()
            self.measure_noise()
            result = self.summary()
            if self.comm.is_main:
                from .report import write_outputs  # matplotlib only when there is something to draw

                write_outputs(self, result)
            ok = True
            return result
        finally:
            self.comm.close(ok)
