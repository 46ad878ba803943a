from pathlib import Path

import pytest

from fastkd.corpus import load_corpus, sample_corpus
from fastkd.glue import TaskCache, parse_tasks
from fastkd.mapping import LayerMapping
from fastkd.models import load_teacher, student_shape
from fastkd.search.config import ProxyConfig
from fastkd.search.proxy import ProxyEvaluator

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
PROXY = ProxyConfig(sequences=64, steps=4, batch_size=4, max_seq_len=32, tasks=("wnli", "qnli"),
                    finetune_steps=2, finetune_examples=8, finetune_batch=4, finetune_seq_len=32)


@pytest.fixture
def evaluator_factory(tiny_teacher_dropout_dir, default_tokenizer, small_corpus):
    teacher = load_teacher(str(tiny_teacher_dropout_dir))  # dropout on: RNG isolation matters
    corpus = sample_corpus(load_corpus(str(small_corpus), default_tokenizer, PROXY.max_seq_len), PROXY.sequences, 0)
    shape = student_shape(teacher.config, 2)
    cache = TaskCache(str(FIXTURES))

    def make():
        return ProxyEvaluator(teacher, default_tokenizer, corpus, shape, PROXY, cache, parse_tasks("wnli,qnli"),
                              progress=False)
    return make


MAPPINGS = [LayerMapping(g, 4) for g in ((2, 4), (3, 4), (1, 2))]


def _summary(results):
    return [(r.mapping.text, r.fitness, r.losses) for r in results]


def test_lockstep_generation_equals_sequential_and_counts_teacher_forwards(evaluator_factory):
    together = evaluator_factory()
    lockstep = together.evaluate(MAPPINGS, seed=3, chunk=3)
    assert together.counters.teacher_forwards == PROXY.steps  # one forward per batch for all three
    assert together.counters.student_steps == PROXY.steps * 3

    alone = evaluator_factory()
    sequential = [alone.evaluate([m], seed=3, chunk=1)[0] for m in MAPPINGS]
    assert alone.counters.teacher_forwards == PROXY.steps * 3
    assert _summary(lockstep) == _summary(sequential)  # sharing the teacher changes nothing

    reordered = evaluator_factory().evaluate(MAPPINGS[::-1], seed=3, chunk=2)
    assert _summary(reordered[::-1]) == _summary(lockstep)  # nor do order and chunking


def test_result_fields_and_seed_matters(evaluator_factory):
    ev = evaluator_factory()
    stored = []
    (result,) = ev.evaluate(MAPPINGS[:1], seed=0, chunk=8, on_result=stored.append)
    assert stored == [result]
    assert set(result.tasks) == {"wnli", "qnli"}
    assert result.fitness == pytest.approx(sum(t["score"] for t in result.tasks.values()) / 2)
    assert {"loss", "hidden", "attention"} <= set(result.losses) and result.seconds > 0
    assert all(isinstance(t["collapsed"], bool) for t in result.tasks.values())
    other = ev.evaluate(MAPPINGS[:1], seed=1, chunk=8)[0]
    assert other.losses != result.losses


def test_a_kept_student_scores_exactly_like_a_fresh_distillation(evaluator_factory):
    """Promotion reuses the distilled student: the same numbers as distilling it again, less work."""
    from fastkd.search.rungs import Rung

    ev = evaluator_factory()
    ev.evaluate(MAPPINGS[:2], seed=5, chunk=2, rung=Rung("probe"))
    steps = ev.counters.student_steps
    promoted = ev.evaluate(MAPPINGS[:2], seed=5, chunk=2, rung=Rung("full"))
    assert ev.counters.student_steps == steps and ev.counters.reused_students == 2  # nothing distilled again
    fresh = evaluator_factory().evaluate(MAPPINGS[:2], seed=5, chunk=2, rung=Rung("full"))
    assert _summary(promoted) == _summary(fresh)
    assert all(r.rung == "full" for r in promoted)
    # A kept student is one of that seed only.
    ev.evaluate(MAPPINGS[:1], seed=6, chunk=1, rung=Rung("full"))
    assert ev.counters.student_steps == steps + PROXY.steps


def test_the_held_out_part_reaches_the_scoring(evaluator_factory, monkeypatch):
    """Selection and verdict evaluations are scored on their own held-out slices."""
    from fastkd.search.rungs import Rung

    seen = []
    real = Rung.score

    def score(self, model, tokenizer, task_specs, cache, cfg):
        seen.append(cfg.heldout_part)
        return real(self, model, tokenizer, task_specs, cache, cfg)

    monkeypatch.setattr(Rung, "score", score)
    ev = evaluator_factory()
    ev.evaluate(MAPPINGS[:2], seed=0, chunk=1, rung=Rung("full"))
    ev.evaluate(MAPPINGS[:2], seed=1000, chunk=2, rung=Rung("full"), part="verdict")
    assert seen == ["selection", "selection", "verdict", "verdict"]


def test_a_mapping_that_leaves_a_layer_unsupervised_is_distilled_and_scored(evaluator_factory):
    """--unsupervised lets the GA propose '-' genes: such a candidate trains only its mapped layers."""
    from fastkd.search.config import SearchConfig

    assert SearchConfig(output="o", corpus="c", data_dir="d", unsupervised=True).ga_config().allow_none
    assert not SearchConfig(output="o", corpus="c", data_dir="d").ga_config().allow_none
    ev = evaluator_factory()
    partial, full = ev.evaluate([LayerMapping((None, 4), 4), LayerMapping((2, 4), 4)], seed=0, chunk=2)
    assert partial.mapping.text == "-,4" and "failed" not in partial.losses and set(partial.tasks) == {"wnli", "qnli"}
    assert partial.losses["hidden"] != full.losses["hidden"]  # one supervised layer's hidden loss, not two

