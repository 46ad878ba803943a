"""Held-out scoring slices and the frozen-feature probe, on real SST-2 and MRPC."""

import numpy as np
import pytest
import torch

from fastkd.glue import FinetuneConfig, TaskCache, task_spec
from fastkd.glue.heldout import heldout_rows, scoring_rows
from fastkd.glue.probe import probe_task

from conftest import SHARED_DATA


@pytest.fixture(scope="module")
def cache():
    return TaskCache(str(SHARED_DATA / "glue"))


def test_heldout_slice_is_disjoint_from_finetuning_rows_and_the_same_for_every_seed(cache, default_tokenizer):
    data = cache.data(task_spec("sst2"))
    slices, train_rows = [], []
    text = lambda i: data.train.text_a[i]  # noqa: E731 (SST-2 has one text column)
    for seed in (0, 1, 2):
        for part in ("selection", "verdict"):
            cfg = FinetuneConfig(max_train_examples=1280, heldout=2000, seed=seed, max_seq_len=64, heldout_part=part)
            scoring = scoring_rows(data, default_tokenizer, cache, cfg)
            name, enc, labels = scoring.eval_splits[0]
            held = heldout_rows(len(data.train), 2000, 1280, part)
            assert scoring.eval_split == f"train-heldout-{part}[2000]" and name == "heldout" and len(labels) == 2000
            assert (scoring.held == held).all() and labels == [data.train.labels[i] for i in held]
            assert enc.input_ids[0] == cache.encoded(data.train, default_tokenizer, 64, rows=held[:1]).input_ids[held[0]]
            # Never scored on what it learned from: not the same rows, and not the same text either
            # (SST-2 train repeats phrases).
            assert len(np.intersect1d(scoring.train_rows, held)) == 0
            assert not {text(i) for i in scoring.train_rows} & {text(i) for i in held}
            assert len(scoring.train_rows) == 1280 and len(set(scoring.train_rows.tolist())) == 1280
            slices.append((part, tuple(held)))
            train_rows.append((seed, tuple(scoring.train_rows)))
    assert len(set(slices)) == 2  # one fixed slice per part, the same for every seed (paired)
    selection, verdict = (dict(slices)[p] for p in ("selection", "verdict"))
    assert not set(selection) & set(verdict)  # the verdict never scores on the rows that selected
    assert len(set(train_rows)) == 3  # a seed's fine-tuning rows do not depend on the part: same CRN
    # Without the text check, duplicates would leak: the slices' texts do occur elsewhere in train.
    held_texts = {text(i) for i in selection}
    assert sum(text(i) in held_texts for i in range(len(data.train))) > len(selection)


def test_small_train_sets_fall_back_to_dev(cache, default_tokenizer):
    data = cache.data(task_spec("rte"))  # 2490 rows: 2 x 1000 held out would leave fewer than 1000
    scoring = scoring_rows(data, default_tokenizer, cache, FinetuneConfig(max_train_examples=1280, heldout=1000))
    assert scoring.eval_split == "dev" and [n for n, _, _ in scoring.eval_splits] == ["dev"]
    assert heldout_rows(3668, 1000, 1280) is not None and heldout_rows(3668, 1000, 2000) is None
    assert heldout_rows(67349, 0, None) is None


def test_probe_is_deterministic_and_the_real_teacher_carries_sst2(cache, default_tokenizer):
    from fastkd.models import load_teacher

    teacher = load_teacher("default")
    cfg = FinetuneConfig(max_train_examples=300, heldout=400, max_seq_len=64, seed=0)
    spec = task_spec("sst2")
    first = probe_task(teacher, default_tokenizer, spec, cache, cfg)
    again = probe_task(teacher, default_tokenizer, spec, cache, cfg)
    assert first.method == "probe" and first.eval_split == "train-heldout-selection[400]" and first.steps == 0
    assert first.metrics == again.metrics  # no head initialisation, no batch order: no noise of its own
    # all-MiniLM-L6-v2's mean-pooled features separate sentiment far better than the majority class.
    assert first.score > first.baseline_score + 0.15, (first.score, first.baseline_score)
    # A random encoder of the same shape carries much less.
    from transformers import AutoModel

    torch.manual_seed(0)
    random_encoder = AutoModel.from_config(teacher.config)
    worse = probe_task(random_encoder, default_tokenizer, spec, cache, cfg)
    assert worse.score < first.score - 0.05
    stsb = probe_task(teacher, default_tokenizer, task_spec("stsb"), cache, cfg)  # ridge for regression
    assert set(stsb.metrics) == {"pearson", "spearman"} and stsb.score > 0.3


def test_zero_shot_similarity_reads_the_teacher_and_holds_out_train(cache, default_tokenizer):
    from transformers import AutoModel

    from fastkd.glue.probe import zero_shot_similarity
    from fastkd.models import load_teacher

    teacher = load_teacher("default")
    cfg = FinetuneConfig(heldout=500, max_seq_len=64)
    result = zero_shot_similarity(teacher, default_tokenizer, cache, cfg)
    assert result.eval_split == "train-heldout-selection[500]" and result.dev_examples == 500
    assert result.method == "zero-shot"
    # A sentence-embedding model ranks STS-B pairs well with no training at all; a random one does not.
    assert result.metrics["spearman"] > 0.7, result.metrics
    assert zero_shot_similarity(teacher, default_tokenizer, cache, cfg).metrics == result.metrics  # deterministic
    torch.manual_seed(0)
    random_encoder = AutoModel.from_config(teacher.config)
    assert zero_shot_similarity(random_encoder, default_tokenizer, cache, cfg).score < result.score - 0.2
