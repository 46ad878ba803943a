"""Fine-tune an encoder on a GLUE task and score it on dev (or held-out training slices).

The model is any exported student directory, any Hugging Face model directory, `default` (the
teacher), or an in-memory encoder (the search's proxy students: no disk round trip). The task's
tokenized splits come from a TaskCache (glue/data.py), the classifier from glue/heads.py, the rows it
is scored on from glue/heldout.py.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .. import optim, rng
from ..device import pick_device, warn_if_bf16_emulated
from ..errors import UserError
from ..capture import use_registry
from ..families import family_of, model_inputs, usable_positions
from ..ops.dropout import available as fast_dropout_available, use_fast_dropout
from .data import Encoded, TaskCache, TaskResult, padded_batch
from .heads import BiEncoderClassifier, make_classifier
from .heldout import score_splits, scoring_rows
from .config import FinetuneConfig
from .metrics import task_score
from .tasks import TaskSpec

log = logging.getLogger(__name__)

@torch.no_grad()
def predict(classifier, enc: Encoded, pad_id: int, batch_size: int, bf16: bool = False) -> np.ndarray:
    classifier.eval()
    device = next(classifier.parameters()).device
    apart = isinstance(classifier, BiEncoderClassifier) and enc.a_ids is not None
    # length-sorted, less padding: apart, each sentence is padded to its own side's longest
    lengths = ([max(len(a), len(b)) for a, b in zip(enc.a_ids, enc.b_ids)] if apart else
               [len(x) for x in enc.input_ids])
    order = np.argsort(lengths, kind="stable")
    out = np.empty(len(order), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in padded_batch(enc, rows, pad_id, apart).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = classifier(**model_inputs(classifier, batch)).logits.float().cpu()
        out[rows] = logits[:, 0].numpy() if logits.shape[-1] == 1 else logits.argmax(-1).numpy()
    return out


def train_with_fast_dropout(classifier) -> None:
    """fastkd's CPU dropout in the classifier (fastkd.ops.dropout: ATen's draws a Mersenne-Twister number per
    element, a fifth of a bf16 step): every nn.Dropout, and, on a CPU where the fused op runs, the attention
    probabilities of the families whose attention fastkd's function can run (SDPA with dropout on a CPU forms
    them in its math path and drops them with ATen's). On a GPU the classifier keeps SDPA's fused kernel."""
    use_fast_dropout(classifier)
    if not fast_dropout_available(next(classifier.parameters())):
        return
    for module in classifier.modules():
        if (isinstance(module, PreTrainedModel) and family_of(module).capture == "registry"
                and attention_dropout(module.config) > 0):
            use_registry(module)


def attention_dropout(config) -> float:
    """The attention probabilities' dropout rate, under the name the family's config gives it."""
    for name in ("attention_probs_dropout_prob", "attention_dropout"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def finetune_task(model, tokenizer, spec: TaskSpec, cache: TaskCache, cfg: FinetuneConfig,
                  desc: str = "") -> TaskResult:
    """Fine-tune a fresh classifier on train (or its subsample), evaluate on every dev split."""
    started = time.perf_counter()
    data = cache.data(spec)
    pad_id = tokenizer.pad_token_id or 0
    scoring = scoring_rows(data, tokenizer, cache, cfg)
    rows = scoring.train_rows
    train_enc = cache.encoded(data.train, tokenizer, cfg.max_seq_len, cfg.head == "biencoder", rows)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))

    device = pick_device(cfg.device)
    if cfg.bf16:
        warn_if_bf16_emulated(device)
    # fastkd's RNG policy: seeded by the run's seed, the caller's generators untouched (the search
    # fine-tunes between candidates' distillation steps).
    with rng.seeded(cfg.seed, device):
        label_mean = (float(train_enc.labels[rows].mean()) if spec.is_regression and cfg.regression_bias == "label-mean"
                      else None)
        label_max = float(train_enc.labels[rows].abs().max()) if spec.is_regression else None
        classifier = make_classifier(model, spec, cfg.seed, cfg.head, label_mean, label_max).to(device)
        apart = isinstance(classifier, BiEncoderClassifier)
        limit = usable_positions(classifier.config)
        if cfg.max_seq_len > limit:
            raise UserError(f"--max-seq-len {cfg.max_seq_len} exceeds the {limit} tokens the model's position "
                            "embeddings take")
        classifier.train()
        train_with_fast_dropout(classifier)
        # fastkd's one builder and no-decay rule; fused: one kernel per parameter group where the per-tensor loop
        # took about a quarter of a CPU fine-tune's time (measured on the default teacher, SST-2, 20 steps)
        optimizer = optim.adamw([classifier], cfg.lr, cfg.weight_decay, fused=True)
        scheduler = optim.warmup_then_linear(optimizer, cfg.warmup, total_steps)
        gen = torch.Generator().manual_seed(cfg.seed)
        order: list[int] = []
        bar = tqdm(total=total_steps, desc=desc or f"fine-tune {spec.name}", unit="step", disable=not cfg.progress,
                   leave=False, dynamic_ncols=True)
        for step in range(total_steps):
            if len(order) < cfg.batch_size:  # next epoch (the tail of an epoch joins the next one)
                order += rows[torch.randperm(len(rows), generator=gen).numpy()].tolist()
            batch_rows, order = order[:cfg.batch_size], order[cfg.batch_size:]
            batch = {k: v.to(device) for k, v in padded_batch(train_enc, batch_rows, pad_id, apart).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                out = classifier(**model_inputs(classifier, batch), labels=train_enc.labels[batch_rows].to(device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{out.loss.item():.3f}")
        bar.close()

    metrics, baseline, predictions, examples = score_splits(
        spec, data, scoring, lambda enc: predict(classifier, enc, pad_id, cfg.eval_batch_size, cfg.bf16))
    return TaskResult(spec.name, metrics, task_score(metrics), baseline, task_score(baseline), predictions,
                      len(rows), examples, total_steps, round(time.perf_counter() - started, 2),
                      data.train.skipped_rows + sum(d.skipped_rows for d in data.dev), scoring.eval_split)


def evaluate(model, tokenizer, tasks: list[TaskSpec], cache: TaskCache, cfg: FinetuneConfig,
             name: str = "") -> dict[str, TaskResult]:
    """The search's entry point: per-task results for one model (a path or an in-memory encoder)."""
    cfg.validate()
    return {spec.key: finetune_task(model, tokenizer, spec, cache, cfg, desc=f"{name} {spec.name}".strip())
            for spec in tasks}
