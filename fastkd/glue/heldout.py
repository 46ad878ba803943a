"""Where a fine-tuned model is scored: dev, or held-out slices of the training set (the search
selects on one slice and gives its verdict on another, so neither the selection nor the verdict ever
sees the dev set a final table reports). The slices are fixed across seeds and models
(HELDOUT_SEED), disjoint from the fine-tuning rows by index and by text."""

from __future__ import annotations


import logging
from dataclasses import dataclass

import numpy as np

from .data import TaskCache, subsample, subset_rows
from .config import HELDOUT_PARTS, FinetuneConfig
from .metrics import compute_metrics, majority_baseline, prediction_summary
from .tasks import Split, TaskData, TaskSpec

log = logging.getLogger(__name__)


HELDOUT_SEED = 7919  # fixed, not the run's seed: every seed and model is scored on the same rows
MIN_TRAIN_LEFT = 1000  # held-out slices are cut only when at least this many training rows remain
_TOLD: set = set()


@dataclass
class Scoring:
    """Which training rows a run learns from and which rows score it (dev splits, or a held-out slice)."""

    train_rows: np.ndarray
    eval_splits: list  # [(name, Encoded, labels list)]
    eval_split: str  # "dev" or "train-heldout-<part>[N]"
    held: np.ndarray | None = None  # the held-out train rows, when scored on them
    baseline_rows: np.ndarray | None = None  # training rows the majority class is read from (None: all)


def heldout_rows(n_train: int, heldout: int, max_train_examples: int | None,
                 part: str = "selection", min_left: int = MIN_TRAIN_LEFT) -> np.ndarray | None:
    """One of the two held-out slices of train (`heldout` rows each), or None when train cannot spare both.

    Large enough = after both slices the rest still holds the fine-tuning subsample and at least
    MIN_TRAIN_LEFT rows. (Without a subsample, fine-tuning learns from the rest: 2 x heldout fewer rows.)
    """
    if heldout <= 0 or n_train - 2 * heldout < max(max_train_examples or 0, min_left):
        return None
    order = np.random.default_rng(HELDOUT_SEED).permutation(n_train)
    start = HELDOUT_PARTS.index(part) * heldout
    return np.sort(order[start:start + heldout])


def _text(split: Split, i: int) -> tuple:
    return (split.text_a[i], None if split.text_b is None else split.text_b[i])


def _texts(split: Split, rows) -> set:
    b = split.text_b
    return {(split.text_a[i], None if b is None else b[i]) for i in rows}


def scoring_rows(data: TaskData, tokenizer, cache: "TaskCache", cfg: FinetuneConfig,
                 min_left: int = MIN_TRAIN_LEFT) -> Scoring:
    """min_left: training rows that must remain beside the slices (0 where nothing is trained)."""
    apart = cfg.head == "biencoder"
    held = heldout_rows(len(data.train), cfg.heldout, cfg.max_train_examples, cfg.heldout_part, min_left)
    if held is None:
        if cfg.heldout > 0 and (data.task.key, len(data.train), cfg.heldout) not in _TOLD:
            _TOLD.add((data.task.key, len(data.train), cfg.heldout))  # once per task, not once per evaluation
            log.warning("%s: %d training rows are too few to hold out 2 x %d; scoring on dev (selection and "
                        "verdict then share its rows)", data.task.name, len(data.train), cfg.heldout)
        rows = subsample(len(data.train), cfg.max_train_examples, cfg.seed)
        evals = [(dev.name, cache.encoded(dev, tokenizer, cfg.max_seq_len, apart), dev.labels) for dev in data.dev]
        return Scoring(rows, evals, "dev")
    both = np.concatenate([heldout_rows(len(data.train), cfg.heldout, cfg.max_train_examples, part, min_left)
                           for part in HELDOUT_PARTS])
    # Disjoint by text, not only by index: SST-2 train repeats phrases, and a copy of a scored
    # row among the fine-tuning examples would leak it.
    seen = _texts(data.train, both)
    rest = np.array([i for i in np.setdiff1d(np.arange(len(data.train)), both, assume_unique=True)
                     if _text(data.train, i) not in seen], dtype=np.int64)
    rows = rest[subsample(len(rest), cfg.max_train_examples, cfg.seed)]
    if cfg.heldout_part == "verdict":  # nor does the verdict score a text the selection slice holds
        chosen = _texts(data.train, heldout_rows(len(data.train), cfg.heldout, cfg.max_train_examples, "selection",
                                                 min_left))
        held = np.array([i for i in held if _text(data.train, i) not in chosen], dtype=np.int64)
    labels = [data.train.labels[i] for i in held]
    train_enc = cache.encoded(data.train, tokenizer, cfg.max_seq_len, apart, held)
    return Scoring(rows, [("heldout", subset_rows(train_enc, held), labels)],
                   f"train-heldout-{cfg.heldout_part}[{len(held)}]", held, rest)


def score_splits(spec: TaskSpec, data: TaskData, scoring: Scoring, predict_fn, by_name: bool = False) -> tuple:
    """Metrics of predict_fn on every scoring split (suffixed like GLUE), the majority baseline, spreads.

    predict_fn takes the split's Encoded rows, or its name with by_name (the probe encodes its own way).
    """
    metrics, baseline, predictions, examples = {}, {}, {}, 0
    suffixes = {"dev": "", "heldout": "", "dev_matched": "_m", "dev_mismatched": "_mm"}
    # The majority class of every training row the run may learn from: not the seed's subsample, so it
    # is the same for every seed.
    train_labels = (data.train.labels if scoring.baseline_rows is None
                    else [data.train.labels[i] for i in scoring.baseline_rows])
    for name, enc, labels in scoring.eval_splits:
        preds = predict_fn(name if by_name else enc)
        if not spec.is_regression:
            preds = preds.astype(np.int64)
        suffix = suffixes.get(name, "_" + name)
        metrics.update({k + suffix: v for k, v in compute_metrics(spec, preds, labels).items()})
        baseline.update({k + suffix: v for k, v in majority_baseline(spec, train_labels, labels).items()})
        predictions[name] = prediction_summary(spec, preds)
        examples += len(labels)
    return metrics, baseline, predictions, examples
