"""What a search's report reads (fastkd.search.report): the settings, the stored results and the
bookkeeping of a finished or stopped search, handed over as one object instead of the live `Search`
with its evaluator, store and process group."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..mapping import LayerMapping
from .config import SearchConfig
from .rungs import Rung


def fitness_of(results: dict, genome: tuple, rung: Rung, seed: int) -> float | None:
    """The stored fitness of `genome` on `rung` at `seed`, or None where it was not evaluated."""
    row = results.get((genome, rung.name), {}).get(seed)
    return None if row is None else row.fitness


@dataclass(frozen=True)
class SearchSummary:
    cfg: SearchConfig
    output: Path  # the search directory
    shape: object  # the student's StudentShape
    N: int  # teacher layers
    rungs: tuple[Rung, ...]
    top: Rung
    tasks: list  # the proxy TaskSpecs kept after the signal check
    verdict_seeds: list[int]
    heuristics: dict  # name -> genome
    results: dict  # (genome, rung name) -> {seed: Evaluation}
    generations: list[dict]
    signal: dict
    timings: dict[str, float]
    reused: int  # evaluations read back from the store
    counters: object | None  # this invocation's proxy.Counters; None where nothing was evaluated here
    seconds: float  # this invocation's wall time so far

    def fitness(self, genome: tuple, rung: Rung, seed: int) -> float | None:
        return fitness_of(self.results, genome, rung, seed)

    def mapping(self, genome: tuple) -> LayerMapping:
        return LayerMapping.from_genome(genome, self.shape.layers, self.N)

    def mapping_text(self, genome: tuple) -> str:
        return self.mapping(genome).text
