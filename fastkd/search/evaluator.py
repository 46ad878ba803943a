"""The search's evaluations through its store: a (mapping, seed, rung) already stored is read back, the
rest are evaluated by the proxy (spread over the ranks) and stored one by one, as each finishes, so
a kill loses only the work in flight and a --resume repeats nothing. A stop signal caught on any rank
travels with the results: every rank stops after the same stored evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

from ..training.loop import Preempted
from .dist import Comm
from .proxy import CandidateResult, ProxyEvaluator
from .rungs import Rung
from .store import Evaluation, Store

log = logging.getLogger(__name__)


def as_evaluation(result: CandidateResult, generation: int) -> Evaluation:
    return Evaluation(result.mapping.text, result.seed, generation, result.fitness, result.tasks, result.losses,
                      result.seconds, result.rung)


class StoredEvaluator:
    """Evaluations of one search: its store (rank 0 only, None elsewhere), its ranks, the results it has
    seen (`results`: (genome, rung name) -> {seed: Evaluation}), and the proxy that computes the rest,
    built on first use by `make_proxy(task_specs)`. `mapping_of` reads a genome (GeneticSearch.mapping)."""

    def __init__(self, comm: Comm, store: Store | None, mapping_of, output: Path, chunk: int, make_proxy):
        self.comm = comm
        self.store = store
        self.mapping_of = mapping_of
        self.output = output
        self.chunk = chunk
        self.make_proxy = make_proxy
        self.proxy: ProxyEvaluator | None = None
        self.results: dict[tuple, dict[int, Evaluation]] = {}
        self.reused = 0  # read back from the store (finished before an interruption, or by a concurrent search)
        self.stored = 0  # evaluations stored by this process (the stop line says how many)
        self.caught = {"signum": None}  # a stop signal, while the search listens for one

    @property
    def counters(self):
        """The proxy's work counters, or None before anything was evaluated."""
        return None if self.proxy is None else self.proxy.counters

    def proxy_for(self, task_specs) -> ProxyEvaluator:
        if self.proxy is None or self.proxy.task_specs != task_specs:
            self.proxy = self.make_proxy(task_specs)
            if self.comm.world == 1:  # one process stops at once; ranks agree per stored result (keep)
                self.proxy.interrupt = self.stop_now
        return self.proxy

    def evaluate(self, genomes: list[tuple], seed: int, generation: int, label: str, rung: Rung, task_specs,
                 part: str = "selection") -> dict[tuple, Evaluation]:
        """Stored results where present; the rest evaluated (spread over ranks) and stored one by one.

        The store's row is the truth: when another process stored the same (mapping, seed, rung)
        first, its value is used, so every process and every resume sees the same fitness.
        """
        found, missing = {}, []
        for g in genomes:
            known = self.results.get((g, rung.name), {}).get(seed)
            if known is not None:  # evaluated earlier in this search (an elite carried over)
                found[g] = known
        if self.comm.is_main:
            for g in genomes:
                if g in found:
                    continue
                row = self.store.get(self.mapping_of(g).text, seed, rung.name)
                if row is not None:
                    found[g] = row
                    self.reused += 1
                else:
                    missing.append(g)
        found, missing, self.reused = self.comm.broadcast((found, missing, self.reused))
        if missing:
            if self.comm.is_main:
                log.info("%s: evaluating %d mappings on rung %s (%d known)%s", label, len(missing), rung.name,
                         len(found), f" on {self.comm.world} ranks" if self.comm.world > 1 else "")
            by_text = {self.mapping_of(g).text: g for g in missing}
            mine = [self.mapping_of(g) for g in missing[self.comm.rank::self.comm.world]]
            rounds = -(-len(missing) // self.comm.world)

            def keep(result: CandidateResult | None) -> None:
                # One round per finished candidate on every rank (None pads the shorter slices), so
                # rank 0 stores each result as it finishes: a kill loses only the work in flight. A
                # stop signal on any rank travels with the round: every rank stops at the same one.
                rounds_out = self.comm.all_gather((None if result is None else as_evaluation(result, generation),
                                                   self.caught["signum"]))
                gathered = [e for e, _ in rounds_out if e is not None]
                stored = []
                if self.comm.is_main:
                    for e in gathered:
                        self.store.put(e)
                        stored.append(self.store.get(e.mapping, e.seed, e.rung))
                # Rank 0's signal is read again after storing (it may have come meanwhile): with the
                # ranks' signals from the round, every rank gets the same answer.
                stored, main_signum = self.comm.broadcast((stored, self.caught["signum"]))
                for e in stored:
                    found[by_text[e.mapping]] = e
                self.stored += len(gathered)
                signums = [s for _, s in rounds_out if s is not None] + ([main_signum] if main_signum is not None else [])
                self.stop_if_signalled(signums)

            if mine:
                self.proxy_for(task_specs).evaluate(mine, seed, self.chunk, desc=label, on_result=keep, rung=rung,
                                                    part=part)
            for _ in range(rounds - len(mine)):
                keep(None)
        for g, row in found.items():
            self.results.setdefault((g, rung.name), {})[row.seed] = row
        return found

    def stop_now(self) -> None:
        """One process, between proxy steps: a stop signal stops at once (what is lost was not stored)."""
        if self.caught["signum"] is not None:
            self.stop_if_signalled([self.caught["signum"]])

    def stop_if_signalled(self, signums: list[int]) -> None:
        """After a stored evaluation: a SIGTERM/SIGUSR1 caught on any rank stops the search here; every
        finished evaluation is in the store, so --resume repeats none of them."""
        if signums:
            raise Preempted(signums[0], where=f"after {self.stored} evaluations",
                            what=f"each finished one is stored in {self.output / 'search.sqlite'}")
