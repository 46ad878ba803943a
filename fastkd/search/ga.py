"""The genetic algorithm over layer mappings. Pure Python (no torch), seeded, deterministic.

A genome is a mapping: a tuple of M teacher layers (1..N), or None where allowed, optionally
non-decreasing; with `search_init`, M more genes follow: the teacher layers the student starts from
(never None, non-decreasing too when monotone; LayerMapping.genome/from_genome). The first generation
holds the heuristics uniform, last and first (and, with None allowed, MiniLM's choice: only the last
student layer supervised, by the teacher's last), the rest random;
later generations keep the elite and fill up with children made by tournament selection, crossover
(uniform or one-point) and per-gene mutation (a random layer or a +-1 step), then repaired to
validity. A genome already evaluated is never proposed again: the caller passes what it has scored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UserError
from ..mapping import LayerMapping, heuristic, search_space_size

Genome = tuple  # of int | None


@dataclass(frozen=True)
class GAConfig:
    population: int = 8
    generations: int = 4
    tournament: int = 2
    crossover_rate: float = 0.9
    mutation_rate: float | None = None  # per gene; None = 1/M
    step_mutation: float = 0.5  # share of mutations that move a gene by +-1 instead of re-drawing it
    elitism: int = 1
    monotone: bool = False
    allow_none: bool = False
    search_init: bool = False  # the initial layers are genes too (else tied to the supervising ones)
    seed: int = 0

    def validate(self) -> None:
        if self.population < 2:
            raise UserError(f"--population must be at least 2 (got {self.population})")
        if self.generations < 1:
            raise UserError(f"--generations must be at least 1 (got {self.generations})")
        if not 0 <= self.elitism < self.population:
            raise UserError(f"elitism must be in [0, population) (got {self.elitism})")
        if self.tournament < 1:
            raise UserError(f"tournament size must be at least 1 (got {self.tournament})")


def genome_key(g: Genome) -> tuple[int, ...]:
    """A sortable form (None sorts first)."""
    return tuple(0 if x is None else x for x in g)


class GeneticSearch:
    def __init__(self, student_layers: int, teacher_layers: int, cfg: GAConfig):
        cfg.validate()
        self.M, self.N, self.cfg = student_layers, teacher_layers, cfg
        self.genes = 2 * student_layers if cfg.search_init else student_layers
        self.rng = random.Random(cfg.seed)
        self.mutation_rate = cfg.mutation_rate if cfg.mutation_rate is not None else 1.0 / self.genes
        self.space = search_space_size(student_layers, teacher_layers, cfg.allow_none, cfg.monotone, cfg.search_init)

    # --- genomes and mappings -------------------------------------------------------------
    def genome(self, mapping: LayerMapping) -> Genome:
        return mapping.genome(self.cfg.search_init)

    def mapping(self, genome: Genome) -> LayerMapping:
        return LayerMapping.from_genome(genome, self.M, self.N)

    # --- validity -------------------------------------------------------------------------
    def is_valid(self, g: Genome) -> bool:
        if len(g) != self.genes:
            return False
        supervision, init = g[:self.M], g[self.M:]
        if any(x is None for x in supervision) and not self.cfg.allow_none:
            return False
        if any(x is None for x in init) or any(x is not None and not 1 <= x <= self.N for x in g):
            return False
        if all(x is None for x in supervision):
            return False  # supervises nothing
        for part in (supervision, init):
            chosen = [x for x in part if x is not None]
            if self.cfg.monotone and any(a > b for a, b in zip(chosen, chosen[1:])):
                return False
        return True

    def repair(self, g: Genome) -> Genome:
        """Clamp out-of-range layers, drop forbidden Nones, sort the supervised (and initial) layers if monotone."""
        fixed = [None if x is None and self.cfg.allow_none and i < self.M else min(max(x if x is not None else 1, 1), self.N)
                 for i, x in enumerate(g)]
        if all(x is None for x in fixed[:self.M]):
            fixed[self.rng.randrange(self.M)] = self.rng.randint(1, self.N)
        if self.cfg.monotone:
            for lo, hi in ((0, self.M), (self.M, len(fixed))):
                values = iter(sorted(x for x in fixed[lo:hi] if x is not None))
                fixed[lo:hi] = [None if x is None else next(values) for x in fixed[lo:hi]]
        return tuple(fixed)

    # --- operators ------------------------------------------------------------------------
    def random_genome(self) -> Genome:
        genes = [self._random_gene(i) for i in range(self.genes)]
        return self.repair(tuple(genes))

    def _random_gene(self, index: int):
        if index < self.M and self.cfg.allow_none and self.rng.random() < 1.0 / (self.N + 1):
            return None  # (an initial layer is never None)
        return self.rng.randint(1, self.N)

    def tournament_select(self, scored: list[tuple[Genome, float]]) -> Genome:
        contenders = [scored[self.rng.randrange(len(scored))] for _ in range(self.cfg.tournament)]
        return max(contenders, key=lambda item: item[1])[0]

    def crossover(self, a: Genome, b: Genome) -> Genome:
        if self.rng.random() >= self.cfg.crossover_rate or self.genes == 1:
            return a
        if self.rng.random() < 0.5:  # uniform
            return tuple(x if self.rng.random() < 0.5 else y for x, y in zip(a, b))
        cut = self.rng.randrange(1, self.genes)  # one-point
        return a[:cut] + b[cut:]

    def mutate(self, g: Genome) -> Genome:
        genes = list(g)
        for i, x in enumerate(genes):
            if self.rng.random() >= self.mutation_rate:
                continue
            if x is not None and self.rng.random() < self.cfg.step_mutation:
                genes[i] = x + self.rng.choice((-1, 1))
            else:
                genes[i] = self._random_gene(i)
        return tuple(genes)

    # --- generations ----------------------------------------------------------------------
    def initial_population(self, evaluated: set[Genome] = frozenset()) -> list[Genome]:
        seeds = [self.genome(heuristic(name, self.M, self.N)) for name in ("uniform", "last", "first")]
        if self.cfg.allow_none:  # MiniLM's choice (arXiv 2002.10957): the last student layer only, by the last teacher layer
            seeds.append(self.genome(LayerMapping((None,) * (self.M - 1) + (self.N,), self.N)))
        population: list[Genome] = []
        for g in seeds:
            g = self.repair(g)
            if g not in population:
                population.append(g)
        return self._fill(population[: self.cfg.population], lambda: self.random_genome(), evaluated,
                          keep_evaluated=True)

    def next_generation(self, scored: dict[Genome, float], evaluated: set[Genome]) -> list[Genome]:
        """Elite (already scored, kept) + new children never evaluated before."""
        ranked = sorted(scored.items(), key=lambda item: (-item[1], genome_key(item[0])))  # ties: deterministic
        elite = [g for g, _ in ranked[: self.cfg.elitism]]
        pool = ranked

        def child() -> Genome:
            a, b = self.tournament_select(pool), self.tournament_select(pool)
            return self.repair(self.mutate(self.crossover(a, b)))

        return self._fill(list(elite), child, evaluated | set(elite))

    def _fill(self, population: list[Genome], make, evaluated: set[Genome], keep_evaluated: bool = False):
        """Add genomes from make() until full; unseen ones only. Gives up (short) if the space runs dry."""
        seen = set(population)
        attempts = 0
        limit = 200 * self.cfg.population
        while len(population) < self.cfg.population and attempts < limit:
            attempts += 1
            g = make() if attempts < limit // 2 else self.random_genome()  # diversify when children repeat
            if g in seen or (g in evaluated and not keep_evaluated):
                continue
            seen.add(g)
            population.append(g)
        return population
