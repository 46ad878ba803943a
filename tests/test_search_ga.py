import itertools

import pytest

from fastkd.errors import UserError
from fastkd.search.ga import GAConfig, GeneticSearch


def _fitness(g):
    """A toy landscape: the best mapping is (2, 4, 6, ...)-like, scored without noise."""
    return -sum(abs((x or 0) - 2 * (i + 1)) for i, x in enumerate(g))


@pytest.mark.parametrize("monotone, allow_none, search_init", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, False),
    (False, False, True), (True, True, True)])
def test_operators_always_give_valid_genomes(monotone, allow_none, search_init):
    ga = GeneticSearch(4, 12, GAConfig(population=6, monotone=monotone, allow_none=allow_none, search_init=search_init,
                                       seed=1, mutation_rate=0.6))
    pool = [(g, _fitness(g)) for g in ga.initial_population()]
    for _ in range(500):
        a, b = ga.tournament_select(pool), ga.tournament_select(pool)
        child = ga.repair(ga.mutate(ga.crossover(a, b)))
        assert ga.is_valid(child), child
        ga.mapping(child)  # a valid genome is a valid mapping (LayerMapping checks it again)
    genes = 8 if search_init else 4
    for g in itertools.islice(itertools.product([None, 0, 1, 7, 12, 13], repeat=genes), 0, None, 7 ** (genes // 4)):
        assert ga.is_valid(ga.repair(g)), g
    if search_init:  # an initial layer is never None, whatever the supervision allows
        assert not ga.is_valid((2, 4, 6, 8, 2, None, 6, 8)) and ga.is_valid((2, None, 6, 8, 2, 4, 6, 8)) == allow_none


def test_search_init_proposes_initial_layers_apart_and_seeds_the_tied_heuristics():
    """--search-init: M more genes, the layers the student starts from; the heuristics start tied, the random
    genomes mostly not, and no mapping (text) is proposed twice."""
    ga = GeneticSearch(3, 6, GAConfig(population=8, seed=0, search_init=True))
    assert ga.space == 6 ** 3 * 6 ** 3  # supervision x initial layers
    population = ga.initial_population()
    assert [ga.mapping(g).text for g in population[:3]] == ["2,4,6", "4,5,6", "1,2,3"]
    assert population[0] == (2, 4, 6, 2, 4, 6)
    assert sum("@" in ga.mapping(g).text for g in population[3:]) >= 3
    scored, texts = {}, []
    for _ in range(4):
        for g in population:
            if g not in scored:
                scored[g] = _fitness(g)
                texts.append(ga.mapping(g).text)
        population = ga.next_generation({g: scored[g] for g in population}, set(scored))
    assert len(texts) == len(set(texts)) == len(scored) > 8


def test_unsupervised_search_starts_from_minilm_too():
    """With unsupervised layers allowed, MiniLM's choice (only the last student layer, by the last teacher layer)
    is in the first generation beside the heuristics."""
    population = GeneticSearch(3, 6, GAConfig(population=6, seed=0, allow_none=True)).initial_population()
    assert population[:4] == [(2, 4, 6), (4, 5, 6), (1, 2, 3), (None, None, 6)]


def test_first_generation_holds_the_heuristics_then_random_unique():
    ga = GeneticSearch(3, 6, GAConfig(population=8, seed=0))
    population = ga.initial_population()
    assert population[:3] == [(2, 4, 6), (4, 5, 6), (1, 2, 3)]
    assert len(population) == 8 and len(set(population)) == 8


def _run(seed, generations=4, monotone=False):
    ga = GeneticSearch(4, 8, GAConfig(population=6, generations=generations, seed=seed, monotone=monotone))
    scored, history = {}, []
    population = ga.initial_population()
    for gen in range(generations):
        new = [g for g in population if g not in scored]
        for g in new:
            scored[g] = _fitness(g)
        history.append(population)
        best = max(scored.values())
        if gen + 1 < generations:
            population = ga.next_generation({g: scored[g] for g in population}, set(scored))
            # Elitism: the best of this generation survives into the next.
            assert max(scored[g] for g in population if g in scored) >= max(scored[g] for g in history[-1])
    return history, scored, best


def test_same_seed_same_search_and_different_seed_differs():
    assert _run(3)[0] == _run(3)[0]
    assert _run(3)[0] != _run(4)[0]


def test_no_genome_is_proposed_twice_and_search_improves():
    history, scored, best = _run(0, generations=6)
    proposed_new = []
    seen = set()
    for population in history:
        fresh = [g for g in population if g not in seen]
        proposed_new += fresh
        seen.update(population)
    assert len(proposed_new) == len(set(proposed_new)) == len(scored)
    first_best = max(_fitness(g) for g in history[0])
    assert best >= first_best


def test_monotone_search_stays_monotone():
    history, scored, _ = _run(5, monotone=True)
    assert all(all(a <= b for a, b in zip(g, g[1:])) for g in scored)


def test_tiny_space_runs_dry_without_looping_forever():
    ga = GeneticSearch(1, 3, GAConfig(population=4, seed=0))  # only 3 mappings exist
    population = ga.initial_population()
    assert sorted(population) == [(1,), (2,), (3,)]
    scores = {(1,): 0.1, (2,): 0.5, (3,): 0.2}
    # Every mapping is evaluated: the next generation is just the elite, returned promptly.
    assert ga.next_generation(scores, set(scores)) == [(2,)]


@pytest.mark.parametrize("kwargs, message", [
    ({"population": 1}, "--population must be at least 2"),
    ({"generations": 0}, "--generations must be at least 1"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(UserError, match=message):
        GeneticSearch(3, 6, GAConfig(**kwargs))
