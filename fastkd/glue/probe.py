"""Frozen-feature probes: how much of a task an encoder's features carry, with forward passes only.

The encoder is not trained. A sentence becomes the mean of its last hidden states over real tokens
(u); a pair (MRPC, STS-B, RTE, ...) is encoded one sentence at a time and becomes [|u - v|, u * v],
the symmetric pair features of SentEval and Sentence-BERT (a pair encoded as one sequence and
mean-pooled loses the relation: STS-B Pearson 0.16 that way with all-MiniLM-L6-v2, measured). A
linear model on standardised features (logistic regression for classes, ridge for STS-B) learns
from the same training rows fine-tuning would use and is scored on the same rows (dev or the
held-out slice).
Deterministic given the encoder: no head initialisation, no batch order, so its only noise is the
encoder's own (for the search: the distillation seed). This is the search's cheap rung.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..device import pick_device
from ..families import model_inputs
from ..models import load_encoder
from .config import FinetuneConfig
from .data import Encoded, TaskCache, TaskResult, padded_batch, subset_rows
from .heldout import score_splits, scoring_rows
from .metrics import task_score
from .tasks import ZERO_SHOT_TASK, TaskSpec, task_spec

PROBE_C = 1.0  # inverse L2 strength of the logistic probe (standardised features)
PROBE_ALPHA = 1.0  # ridge strength for regression tasks


@torch.no_grad()
def mean_pooled(encoder, enc: Encoded, pad_id: int, batch_size: int, bf16: bool = False) -> np.ndarray:
    """(rows, hidden) float64: last hidden states averaged over each row's real tokens."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    order = np.argsort([len(x) for x in enc.input_ids])  # length-sorted: less padding
    out = np.empty((len(order), encoder.config.hidden_size), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in padded_batch(enc, rows, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = encoder(**model_inputs(encoder, batch)).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out[rows] = ((hidden * mask).sum(1) / mask.sum(1)).cpu().double().numpy()
    encoder.train(was_training)
    return out


def probe_task(model, tokenizer, spec: TaskSpec, cache: TaskCache, cfg: FinetuneConfig) -> TaskResult:
    """Score frozen features of `model` (a path or an in-memory encoder) on one task."""
    started = time.perf_counter()
    encoder = model if isinstance(model, torch.nn.Module) else load_encoder(model)
    encoder.to(pick_device(cfg.device))
    data = cache.data(spec)
    pad_id = tokenizer.pad_token_id or 0
    scoring = scoring_rows(data, tokenizer, cache, cfg)
    rows = scoring.train_rows
    pair = spec.text_b is not None

    def pool(enc: Encoded) -> np.ndarray:
        return mean_pooled(encoder, enc, pad_id, cfg.eval_batch_size, cfg.bf16)

    def features(split, which) -> np.ndarray:
        """Features of rows `which` of `split` (a Split of the task)."""
        if not pair:
            return pool(subset_rows(cache.encoded(split, tokenizer, cfg.max_seq_len, rows=which), which))
        u = pool(cache.sentences(split, "text_a", tokenizer, cfg.max_seq_len, which))
        v = pool(cache.sentences(split, "text_b", tokenizer, cfg.max_seq_len, which))
        return np.concatenate([np.abs(u - v), u * v], axis=1)

    x = features(data.train, rows)
    y = np.asarray([data.train.labels[i] for i in rows])
    held = None if scoring.eval_split == "dev" else scoring.held
    if spec.is_regression:
        head = make_pipeline(StandardScaler(), Ridge(alpha=PROBE_ALPHA))
    else:
        # lbfgs on standardised features: deterministic, converges in well under max_iter here.
        head = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=2000))
    one_class = not spec.is_regression and len(np.unique(y)) < 2
    if not one_class:
        head.fit(x, y)
    dev_by_name = {d.name: d for d in data.dev}

    def predict_fn(name: str) -> np.ndarray:
        split, which = (data.train, held) if name == "heldout" else (dev_by_name[name], np.arange(len(dev_by_name[name])))
        if one_class:
            return np.full(len(which), int(y[0]))
        return head.predict(features(split, which))

    metrics, baseline, predictions, examples = score_splits(spec, data, scoring, predict_fn, by_name=True)
    return TaskResult(spec.name, metrics, task_score(metrics), baseline, task_score(baseline), predictions,
                      len(rows), examples, 0, round(time.perf_counter() - started, 2),
                      data.train.skipped_rows + sum(d.skipped_rows for d in data.dev), scoring.eval_split, "probe")




def zero_shot_similarity(model, tokenizer, cache: TaskCache, cfg: FinetuneConfig) -> TaskResult:
    """STS-B without training anything: cosine of the two sentences' mean-pooled embeddings against
    the gold similarity (Pearson and Spearman). Task-agnostic (no proxy task involved) and
    deterministic given the encoder. Scored on a held-out slice of STS-B *train* when cfg.heldout
    allows it, so a search that selects on it never looks at the dev set a final table reports.
    """
    started = time.perf_counter()
    spec = task_spec(ZERO_SHOT_TASK)
    encoder = model if isinstance(model, torch.nn.Module) else load_encoder(model)
    encoder.to(pick_device(cfg.device))
    data = cache.data(spec)
    pad_id = tokenizer.pad_token_id or 0
    cfg = replace(cfg, max_train_examples=None)  # nothing is trained: only the slices need the rows
    scoring = scoring_rows(data, tokenizer, cache, cfg, min_left=0)
    dev_by_name = {d.name: d for d in data.dev}

    def cosine(name: str) -> np.ndarray:
        split, which = ((data.train, scoring.held) if name == "heldout"
                        else (dev_by_name[name], np.arange(len(dev_by_name[name]))))
        u, v = (mean_pooled(encoder, cache.sentences(split, side, tokenizer, cfg.max_seq_len, which), pad_id,
                            cfg.eval_batch_size, cfg.bf16) for side in ("text_a", "text_b"))
        return (u * v).sum(1) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1), 1e-12)

    metrics, baseline, predictions, examples = score_splits(spec, data, scoring, cosine, by_name=True)
    return TaskResult(f"{spec.name} zero-shot", metrics, task_score(metrics), baseline, task_score(baseline), predictions,
                      0, examples, 0, round(time.perf_counter() - started, 2), 0, scoring.eval_split, "zero-shot")
