import itertools
import re

import pytest

from fastkd.errors import UserError
from fastkd.mapping import LayerMapping, heuristic, parse_mapping, search_space_size


@pytest.mark.parametrize("n, m, uniform, last, first", [
    (12, 4, (3, 6, 9, 12), (9, 10, 11, 12), (1, 2, 3, 4)),
    (12, 6, (2, 4, 6, 8, 10, 12), (7, 8, 9, 10, 11, 12), (1, 2, 3, 4, 5, 6)),
    (6, 3, (2, 4, 6), (4, 5, 6), (1, 2, 3)),
    (6, 4, (2, 3, 5, 6), (3, 4, 5, 6), (1, 2, 3, 4)),  # round half up: 1.5 -> 2, 4.5 -> 5
    (6, 6, (1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 6)),
    (24, 1, (24,), (24,), (1,)),
    (5, 2, (3, 5), (4, 5), (1, 2)),  # 2.5 -> 3
])
def test_heuristics(n, m, uniform, last, first):
    assert heuristic("uniform", m, n).layers == uniform
    assert heuristic("last", m, n).layers == last
    assert heuristic("first", m, n).layers == first


def test_student_deeper_than_teacher_stays_valid():
    for name in ("uniform", "last", "first"):
        mapping = heuristic(name, 8, 6)
        assert len(mapping.layers) == 8 and all(1 <= g <= 6 for g in mapping.layers)


def test_random_is_seeded_and_valid():
    a, b, c = (heuristic("random", 6, 12, seed=s) for s in (7, 7, 8))
    assert a == b and a != c
    assert all(1 <= g <= 12 for g in a.layers)
    mono = heuristic("random", 6, 12, seed=3, monotone=True)
    assert mono.is_monotone()


def test_parse_text_and_round_trip():
    mapping = parse_mapping("3, 6,-,12", 4, 12)
    assert mapping.layers == (3, 6, None, 12)
    assert mapping.text == "3,6,-,12"
    assert parse_mapping(mapping.text, 4, 12) == mapping
    assert mapping.pairs() == [(1, 3), (2, 6), (4, 12)]
    assert parse_mapping("random:7", 4, 12) == heuristic("random", 4, 12, seed=7)
    assert parse_mapping("uniform", 4, 12).text == "3,6,9,12"


def test_initial_layers_apart_from_the_supervising_ones():
    """SUPERVISION@INIT: the student starts from other teacher layers than those supervising it; the default init
    is not written, so each mapping has one text (the search's store key) and one genome."""
    apart = parse_mapping("4,5,6@2,4,6", 3, 6)
    assert apart.layers == (4, 5, 6) and apart.initial_layers == (2, 4, 6) and apart.text == "4,5,6@2,4,6"
    assert apart.supervision_text == "4,5,6" and apart.pairs() == [(1, 4), (2, 5), (3, 6)]
    assert parse_mapping("last@uniform", 3, 6) == apart and parse_mapping(apart.text, 3, 6) == apart
    tied = parse_mapping("2,4,6@2,4,6", 3, 6)
    assert tied == parse_mapping("2,4,6", 3, 6) and tied.text == "2,4,6" and tied.init is None
    # an unsupervised layer starts from the uniform mapping's layer unless '@' says otherwise
    assert parse_mapping("-,-,6", 3, 6).initial_layers == (2, 4, 6)
    assert parse_mapping("-,-,6@2,4,6", 3, 6).text == "-,-,6"
    assert parse_mapping("-,-,6@1,1,6", 3, 6).text == "-,-,6@1,1,6"
    for mapping in (apart, tied, parse_mapping("-,3,6@1,1,6", 3, 6)):
        assert LayerMapping.from_genome(mapping.genome(True), 3, 6) == mapping
        assert len(mapping.genome(True)) == 6 and mapping.genome(False) == mapping.layers
    assert LayerMapping.from_genome(apart.genome(False), 3, 6).text == "4,5,6"  # M genes: tied


@pytest.mark.parametrize("text, message", [
    ("2,4,6@1,-,3", "every student layer needs a teacher layer to copy after '@'"),
    ("2,4,6@1,3", "after '@' (the initial layers): mapping '1,3' has 2 entries"),
    ("2,4,6@1,3,7", "after '@' (the initial layers): layer mapping '1,3,7'"),
    ("2,4,6@", "after '@'"),
])
def test_initial_layer_errors(text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_mapping(text, 3, 6)


@pytest.mark.parametrize("text, message", [
    ("3,6,9", "has 3 entries but the student has 4"),
    ("3,6,9,13", "maps to teacher layer 13"),
    ("0,6,9,12", "maps to teacher layer 0"),
    ("3;6;9;12", "cannot parse"),
    ("a,b,c,d", "cannot parse"),
    ("random:x", "integer seed"),
    ("middle", "cannot parse"),
])
def test_parse_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_mapping(text, 4, 12)


def test_monotone():
    assert LayerMapping((1, None, 3, 3), 4).is_monotone()
    assert not LayerMapping((2, 1), 4).is_monotone()


@pytest.mark.parametrize("n, m", [(4, 2), (6, 3), (5, 4), (3, 3)])
def test_search_space_size_matches_enumeration(n, m):
    values = list(range(1, n + 1))
    with_none = values + [None]
    every = list(itertools.product(values, repeat=m))
    every_none = [g for g in itertools.product(with_none, repeat=m) if any(x is not None for x in g)]  # supervises one
    mono = lambda g: LayerMapping(tuple(g), n).is_monotone()  # noqa: E731
    assert search_space_size(m, n) == len(every)
    assert search_space_size(m, n, allow_none=True) == len(every_none)
    assert search_space_size(m, n, monotone=True) == sum(map(mono, every))
    assert search_space_size(m, n, allow_none=True, monotone=True) == sum(map(mono, every_none))
    # with the initial layers apart: every (supervision, init) pair is one distinct mapping (its text)
    for allow_none, monotone in ((False, False), (True, True)):
        supervision = [g for g in (every_none if allow_none else every) if not monotone or mono(g)]
        inits = [g for g in every if not monotone or mono(g)]
        texts = {LayerMapping(tuple(s), n, tuple(i)).text for s in supervision for i in inits}
        assert search_space_size(m, n, allow_none, monotone, with_init=True) == len(texts)
