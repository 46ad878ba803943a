"""The verdict's statistics, the ladder's rules and the seed discipline, on fixed numbers."""

import math

import pytest
from scipy import stats

from fastkd.errors import UserError
from fastkd.search.config import ProxyConfig
from fastkd.search.rungs import Rung, parse_ladder, successive_halving
from fastkd.search.config import SearchConfig
from fastkd.search.verdict import paired_interval, sentence

WINNER = [0.812, 0.797, 0.820, 0.805, 0.811]
UNIFORM = [0.790, 0.781, 0.802, 0.779, 0.800]


def test_paired_interval_matches_scipy_ttest_rel():
    iv = paired_interval(WINNER, UNIFORM)
    ci = stats.ttest_rel(WINNER, UNIFORM).confidence_interval(0.95)  # scipy's own paired t
    assert iv.n == 5 and iv.low == pytest.approx(ci.low, abs=1e-12) and iv.high == pytest.approx(ci.high, abs=1e-12)
    assert iv.mean == pytest.approx(0.0186, abs=1e-12)
    # Pairing matters: the unpaired (Welch) interval of the same numbers is wider.
    welch = stats.ttest_ind(WINNER, UNIFORM, equal_var=False).confidence_interval(0.95)
    assert iv.half_width < (welch.high - welch.low) / 2
    assert paired_interval(WINNER, UNIFORM, 0.99).half_width > iv.half_width


def test_too_few_or_degenerate_pairs_claim_nothing():
    one = paired_interval([0.8], [0.7])
    assert one.n == 1 and math.isnan(one.half_width) and not one.measured
    assert "no claim" in sentence("2,2,6", "uniform", "2,4,6", one)
    flat = paired_interval([0.8, 0.9], [0.7, 0.8])  # the same difference twice: SD 0, no interval
    assert flat.sd < 1e-12 and not flat.measured and "no claim" in sentence("2,2,6", "uniform", "2,4,6", flat)
    assert "no claim" in sentence("2,2,6", "uniform", "2,4,6", paired_interval([0.5, 0.5], [0.5, 0.5]))
    with pytest.raises(ValueError):
        paired_interval([0.1, 0.2], [0.1])


def test_sentences_say_what_the_interval_supports():
    beats = paired_interval(WINNER, UNIFORM)
    assert sentence("2,2,6", "uniform", "2,4,6", beats).startswith("Beats `uniform` (2,4,6) by +0.0186 ± ")
    loses = paired_interval(UNIFORM, WINNER)
    assert sentence("2,2,6", "uniform", "2,4,6", loses).startswith("Loses to `uniform`")
    tie = paired_interval([0.80, 0.81, 0.79, 0.80], [0.79, 0.81, 0.80, 0.80])
    text = sentence("2,2,6", "uniform", "2,4,6", tie)
    assert text.startswith("`uniform` (2,4,6) is within ±") and "keep `uniform`" in text
    assert "itself" in sentence("2,4,6", "uniform", "2,4,6", tie)


def test_successive_halving_promotes_exactly_the_top_fraction_ties_deterministic():
    fitness = {(1, 2, 3): 0.7, (2, 4, 6): 0.8, (4, 5, 6): 0.8, (1, 3, 5): 0.6, (3, 4, 6): 0.75}
    assert successive_halving(fitness, 0.4) == [(2, 4, 6), (4, 5, 6)]  # ceil(0.4 x 5) = 2; the tie by genome
    assert successive_halving(fitness, 0.5) == [(2, 4, 6), (4, 5, 6), (3, 4, 6)]  # ceil(2.5) = 3
    assert successive_halving(fitness, 1.0) == sorted(fitness, key=lambda g: (-fitness[g], g))
    assert successive_halving(fitness, 0.01) == [(2, 4, 6)]  # at least one
    shuffled = dict(reversed(list(fitness.items())))
    assert successive_halving(shuffled, 0.4) == successive_halving(fitness, 0.4)  # insertion order is irrelevant


def test_ladder_parsing():
    assert parse_ladder("probe,full") == (Rung("probe"), Rung("full"))
    assert parse_ladder(" Probe , short, FULL ") == (Rung("probe"), Rung("short"), Rung("full"))
    assert [r.finetune_steps(40) for r in parse_ladder("probe,short,full")] == [0, 10, 40]
    for bad, why in (("", "empty"), ("probe,cheap,full", "unknown rung 'cheap'"), ("full,probe", "cheap-to-faithful"),
                     ("probe,probe,full", "cheap-to-faithful"), ("probe,short", "must end with the top rung")):
        with pytest.raises(UserError, match=why):
            parse_ladder(bad)


def _cfg(**kw):
    return SearchConfig(output="x", corpus="c", data_dir="d", proxy=ProxyConfig(), **kw)


def test_verdict_seeds_are_held_out_from_selection():
    assert _cfg(seed=7, verdict_seeds=3).verdict_seed_list() == [1007, 2007, 3007]
    assert _cfg(seed=0, verdict_seeds=(5, 9, 5)).verdict_seed_list() == [5, 9]
    for kw in ({"seed": 5, "verdict_seeds": (5, 9)}, {"seed": 0, "verdict_seeds": (0,)}):
        with pytest.raises(UserError, match="include the selection seed"):
            _cfg(**kw).validate()
    for promote in (0, -0.1, 1.01):
        with pytest.raises(UserError, match=r"in \(0, 1\]"):
            _cfg(promote=promote).validate()
    with pytest.raises(UserError, match="unknown rung"):
        _cfg(ladder="probe,fine").validate()
    _cfg(verdict_seeds=0).validate()  # allowed: the report then says no claim


def test_overall_recommends_the_searched_mapping_only_when_it_beats_every_heuristic():
    from fastkd.search.verdict import overall

    beats, tie = paired_interval(WINNER, UNIFORM), paired_interval([0.80, 0.81, 0.79], [0.80, 0.80, 0.80])
    assert overall("2,2,6", [("uniform", "2,4,6", beats), ("last", "4,5,6", beats)]).startswith("Overall: use `2,2,6`")
    assert overall("2,2,6", [("uniform", "2,4,6", beats), ("last", "4,5,6", tie)]).startswith("Overall: keep `uniform`")
    assert "keep `uniform`" in overall("2,4,6", [("uniform", "2,4,6", tie), ("last", "4,5,6", beats)])
    # The winner is `last` but not shown better than uniform: keep uniform, the simpler choice.
    assert overall("4,5,6", [("uniform", "2,4,6", tie), ("last", "4,5,6", tie)]).startswith("Overall: keep `uniform`")
    assert overall("4,5,6", [("uniform", "2,4,6", beats), ("last", "4,5,6", tie)]).startswith(
        "Overall: use `4,5,6` (= `last`): it beats `uniform`")
