"""A task's data as the fine-tuning loop takes it: tokenized splits (Encoded), cached per tokenizer
and length in a TaskCache so a search tokenizes each task once for all its candidates (and only the
rows something reads: a 3,000-row fine-tune of SST-2 does not tokenize its 67,349 training rows);
rows picked out of them and padded into batches."""

from __future__ import annotations


import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..tokenizer_identity import tokenizer_fingerprint
from ..padding import pad_batch
from .tasks import Split, TaskData, TaskSpec, load_task

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """A tokenized split: variable-length id lists (padded per batch) and labels. A row not yet asked
    for holds None (TaskCache.encoded tokenizes the rows its caller names)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: torch.Tensor
    # A pair task's two sentences tokenized apart ([CLS] a [SEP], [CLS] b [SEP]), for the biencoder head.
    a_ids: list[list[int]] | None = None
    b_ids: list[list[int]] | None = None


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    score: float
    baseline_metrics: dict[str, float]
    baseline_score: float
    predictions: dict  # label distribution or variance, per dev split
    train_examples: int
    dev_examples: int  # rows scored (dev, or the held-out slice: see eval_split)
    steps: int
    seconds: float
    skipped_rows: int = 0
    eval_split: str = "dev"  # where the score comes from: "dev" or "train-heldout-<part>[N]"
    method: str = "finetune"  # "finetune", or "probe" (frozen features, a linear model on top)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskCache:
    """Loaded task data and tokenized splits, shared by every model evaluated in one process."""

    data_dir: str
    skip_bad_rows: bool = False
    _data: dict = field(default_factory=dict)
    _encoded: dict = field(default_factory=dict)
    _fingerprints: dict = field(default_factory=dict)  # id -> (tokenizer, fingerprint): the reference pins the id

    def data(self, spec: TaskSpec) -> TaskData:
        if spec.key not in self._data:
            self._data[spec.key] = load_task(self.data_dir, spec, self.skip_bad_rows)
        return self._data[spec.key]

    def fingerprint(self, tokenizer) -> str:
        if id(tokenizer) not in self._fingerprints:
            self._fingerprints[id(tokenizer)] = (tokenizer, tokenizer_fingerprint(tokenizer))
        return self._fingerprints[id(tokenizer)][1]

    def encoded(self, split: Split, tokenizer, max_seq_len: int, apart: bool = False, rows=None) -> Encoded:
        """The split's Encoded, with `rows` (default: every row) tokenized; each row is tokenized once,
        when first asked for. `apart`: also each sentence of a pair on its own (the biencoder head)."""
        key = (split.task.key, split.name, split.source, self.fingerprint(tokenizer), max_seq_len)
        if key not in self._encoded:
            dtype = torch.float32 if split.task.is_regression else torch.long
            self._encoded[key] = Encoded([None] * len(split), [None] * len(split),
                                         torch.tensor(split.labels, dtype=dtype))
        enc = self._encoded[key]
        wanted = range(len(split)) if rows is None else rows
        tokenize_rows(enc.input_ids, enc.token_type_ids, tokenizer, split.text_a, split.text_b, wanted, max_seq_len)
        if apart and split.text_b is not None:
            if enc.a_ids is None:
                enc.a_ids, enc.b_ids = [None] * len(split), [None] * len(split)
            tokenize_rows(enc.a_ids, None, tokenizer, split.text_a, None, wanted, max_seq_len)
            tokenize_rows(enc.b_ids, None, tokenizer, split.text_b, None, wanted, max_seq_len)
        return enc

    def sentences(self, split: Split, side: str, tokenizer, max_seq_len: int, rows) -> Encoded:
        """Rows `rows` of one side of a split (text_a or text_b), each sentence tokenized alone with its
        token type ids (the frozen-feature probe and zero-shot similarity encode pairs this way)."""
        key = ("sentences", split.task.key, split.name, split.source, side, self.fingerprint(tokenizer), max_seq_len)
        if key not in self._encoded:
            self._encoded[key] = Encoded([None] * len(split), [None] * len(split), torch.zeros(len(split)))
        enc = self._encoded[key]
        tokenize_rows(enc.input_ids, enc.token_type_ids, tokenizer, getattr(split, side), None, rows, max_seq_len)
        return subset_rows(enc, rows)


def tokenize_rows(ids: list, types: list | None, tokenizer, a: list[str], b: list[str] | None, rows,
                  max_seq_len: int) -> None:
    """Tokenize the rows (of texts `a`, paired with `b` when given) that `ids` does not hold yet, in one
    call, into `ids` and, when given, `types` (their token type ids)."""
    missing = [i for i in dict.fromkeys(int(r) for r in rows) if ids[i] is None]
    if not missing:
        return
    out = tokenizer([a[i] for i in missing], None if b is None else [b[i] for i in missing], truncation=True,
                    max_length=max_seq_len, return_token_type_ids=types is not None)
    for n, i in enumerate(missing):
        ids[i] = out["input_ids"][n]
        if types is not None:
            types[i] = out["token_type_ids"][n]


def subsample(n: int, k: int | None, seed: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def subset_rows(enc: Encoded, rows) -> Encoded:
    pick = (lambda ids: None if ids is None else [ids[i] for i in rows])  # noqa: E731
    return Encoded(pick(enc.input_ids), pick(enc.token_type_ids), enc.labels[rows], pick(enc.a_ids), pick(enc.b_ids))


def padded_batch(enc: Encoded, rows, pad_id: int, apart: bool = False) -> dict[str, torch.Tensor]:
    """The rows as one padded batch; apart (the biencoder head on a pair task): each sentence its own
    batch, the second one's keys ending in _b."""
    if apart and enc.a_ids is not None:
        first, second = (pad_batch([ids[i] for i in rows], pad_id) for ids in (enc.a_ids, enc.b_ids))
        return {**first, **{f"{k}_b": v for k, v in second.items()}}
    return pad_batch([enc.input_ids[i] for i in rows], pad_id, [enc.token_type_ids[i] for i in rows])
