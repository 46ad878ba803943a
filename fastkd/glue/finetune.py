"""Fine-tune an encoder on a GLUE task and score it on dev.

The model is any exported student directory, any Hugging Face model directory, `default` (the
teacher), or an in-memory encoder (the search's proxy students: no disk round trip). Tokenized
splits are cached in a TaskCache so a search tokenizes each task once for all its candidates.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .. import optim, rng
from ..device import pick_device, warn_if_bf16_emulated
from ..errors import UserError
from ..families import model_inputs, stock_attention, usable_positions
from ..tokenizer_identity import tokenizer_fingerprint
from ..models import load_encoder, resolve_model_path
from ..padding import pad_batch
from ..sentence import SentencePooling, has_pipeline, read_pooling, sentence_embedding
from .config import HEADS, HELDOUT_PARTS, FinetuneConfig
from .metrics import compute_metrics, majority_baseline, prediction_summary, task_score
from .tasks import Split, TaskData, TaskSpec, load_task

log = logging.getLogger(__name__)

@dataclass
class Encoded:
    """A tokenized split: variable-length id lists (padded per batch) and labels."""

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

    def encoded(self, split: Split, tokenizer, max_seq_len: int, apart: bool = False) -> Encoded:
        """`apart`: also each sentence of a pair on its own (the biencoder head), tokenized once when first asked."""
        key = (split.task.key, split.name, split.source, self.fingerprint(tokenizer), max_seq_len)
        if key not in self._encoded:
            enc = tokenizer(split.text_a, split.text_b, truncation=True, max_length=max_seq_len,
                            return_token_type_ids=True)
            dtype = torch.float32 if split.task.is_regression else torch.long
            self._encoded[key] = Encoded(enc["input_ids"], enc["token_type_ids"], torch.tensor(split.labels, dtype=dtype))
        enc = self._encoded[key]
        if apart and split.text_b is not None and enc.a_ids is None:
            enc.a_ids, enc.b_ids = (tokenizer(texts, truncation=True, max_length=max_seq_len)["input_ids"]
                                    for texts in (split.text_a, split.text_b))
        return enc


def subsample(n: int, k: int | None, seed: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


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


def subset_rows(enc: Encoded, rows) -> Encoded:
    pick = (lambda ids: None if ids is None else [ids[i] for i in rows])  # noqa: E731
    return Encoded(pick(enc.input_ids), pick(enc.token_type_ids), enc.labels[rows], pick(enc.a_ids), pick(enc.b_ids))


def scoring_rows(data: TaskData, tokenizer, cache: "TaskCache", cfg: FinetuneConfig,
                 min_left: int = MIN_TRAIN_LEFT) -> Scoring:
    """min_left: training rows that must remain beside the slices (0 where nothing is trained)."""
    apart = cfg.head == "biencoder"
    train_enc = cache.encoded(data.train, tokenizer, cfg.max_seq_len, apart)
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


def padded_batch(enc: Encoded, rows, pad_id: int, apart: bool = False) -> dict[str, torch.Tensor]:
    """The rows as one padded batch; apart (the biencoder head on a pair task): each sentence its own
    batch, the second one's keys ending in _b."""
    if apart and enc.a_ids is not None:
        first, second = (pad_batch([ids[i] for i in rows], pad_id) for ids in (enc.a_ids, enc.b_ids))
        return {**first, **{f"{k}_b": v for k, v in second.items()}}
    return pad_batch([enc.input_ids[i] for i in rows], pad_id, [enc.token_type_ids[i] for i in rows])


def make_classifier(model: str | PreTrainedModel, spec: TaskSpec, seed: int, head: str = "pooler",
                    label_mean: float | None = None, label_max: float | None = None) -> nn.Module:
    """A fresh float32 classifier for the task: the encoder's weights and a new head seeded by `seed`.

    One path for a directory, `default` and an in-memory encoder: a checkpoint that already has a
    task head (even one with another label count) contributes only its encoder. `head`: one of HEADS
    (pooler and pooler-reinit: the family's AutoModelForSequenceClassification; mean and pipeline: a
    PooledClassifier; biencoder: a BiEncoderClassifier for a pair task, else as pipeline). `label_mean`: a
    regression head's output bias starts there (None: at 0). `label_max`: the biencoder's similarity
    scale (a cosine of 1 predicts it; the largest |label| of the fine-tuning rows).
    """
    if head not in HEADS:
        raise UserError(f"--head must be one of {', '.join(HEADS)} (got {head!r})")
    encoder = model if isinstance(model, PreTrainedModel) else load_encoder(model)
    if head == "biencoder" and spec.text_b is not None:
        return BiEncoderClassifier(_fresh_encoder(encoder), spec, head_pooling(model, head), seed, label_max)
    if head in ("mean", "pipeline", "biencoder"):
        pooling = head_pooling(model, head) if head != "mean" else SentencePooling(source="--head mean")
        return _start_bias(PooledClassifier(_fresh_encoder(encoder), spec, pooling, seed), spec, label_mean)
    config = copy.deepcopy(encoder.config)
    config.num_labels = spec.num_labels
    config.problem_type = "regression" if spec.is_regression else "single_label_classification"
    if spec.labels is not None:
        config.id2label = dict(enumerate(spec.labels))
        config.label2id = {label: i for i, label in enumerate(spec.labels)}
    torch.manual_seed(seed)
    classifier = AutoModelForSequenceClassification.from_config(
        config, attn_implementation=stock_attention(type(encoder)), dtype=torch.float32)
    _copy_encoder_weights(encoder, classifier.base_model, "the classifier")
    if head == "pooler-reinit":
        # Families whose classifier has no pooler in the encoder (DistilBERT, MPNet, RoBERTa, DeBERTa,
        # ModernBERT) bring a fresh head of their own: nothing copied to re-initialise.
        pooler = getattr(classifier.base_model, "pooler", None)
        if pooler is not None:
            torch.manual_seed(seed + 1)  # not the classifier's draw again
            _reinit(pooler, getattr(config, "initializer_range", 0.02))
    return _start_bias(classifier, spec, label_mean)


def _start_bias(classifier: nn.Module, spec: TaskSpec, label_mean: float | None) -> nn.Module:
    """A regression head's output bias set to `label_mean` (its output layer: the last linear layer
    with one output, whatever the family calls it)."""
    if spec.is_regression and label_mean is not None:
        out = [m for m in classifier.modules() if isinstance(m, nn.Linear) and m.out_features == spec.num_labels][-1]
        with torch.no_grad():
            out.bias.fill_(label_mean)
    return classifier


def _reinit(module: nn.Module, std: float) -> None:
    """BERT's initialisation: linear weights N(0, std), biases 0, LayerNorm 1 and 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _copy_encoder_weights(encoder: PreTrainedModel, target: nn.Module, what: str) -> None:
    """`encoder`'s weights, as float32, into `target` (a stock encoder of its family). A pooler may be on
    one side only (MPNet's and RoBERTa's classifiers bring their own head instead); anything else that
    does not fit is a bug, not a user's mistake."""
    state = {k: v.float() for k, v in encoder.state_dict().items()}
    missing, unexpected = target.load_state_dict(state, strict=False)
    if [k for k in unexpected + missing if not k.startswith("pooler.")]:
        raise ValueError(f"encoder weights do not fit {what}: missing {missing}, unexpected {unexpected}")


def _fresh_encoder(encoder: PreTrainedModel) -> PreTrainedModel:
    """A float32 copy of the encoder's weights in a stock model of its family, without its pooler
    (the caller's encoder, maybe the search's capture-enabled student, is left untouched)."""
    fresh = AutoModel.from_config(copy.deepcopy(encoder.config), attn_implementation=stock_attention(type(encoder)),
                                  dtype=torch.float32)
    _copy_encoder_weights(encoder, fresh, "the encoder")
    if getattr(fresh, "pooler", None) is not None:
        fresh.pooler = None  # unused by a pooled head: no forward cost, no parameters without gradients
    return fresh


_HEAD_TOLD: set = set()


def head_pooling(model, head: str = "pipeline") -> SentencePooling:
    """The pooling `--head pipeline` (or `biencoder`, named by `head` in what is said) uses for `model`:
    its sentence-transformers pipeline's pooling mode (not its Normalize: see HEADS), or mean for a
    model without one (said once per model and head)."""
    if isinstance(model, PreTrainedModel):
        return SentencePooling(source="an in-memory encoder has no pipeline; mean")
    path = resolve_model_path(model)
    if not has_pipeline(path):
        pooling = SentencePooling(source="no sentence-transformers pipeline (modules.json); mean")
    else:
        pooling = read_pooling(path, head=f"--head {head}")
        pooling = SentencePooling(pooling.mode, source=pooling.source + ", only its pooling")
    if (str(model), head) not in _HEAD_TOLD:
        _HEAD_TOLD.add((str(model), head))
        log.info("--head %s: %s: %s", head, model, pooling.describe())
    return pooling


def _seeded_linear(inputs: int, outputs: int, config, seed: int) -> nn.Linear:
    """A task head drawn from its own generator: the same head for a seed whatever the model (and
    whatever else drew from the global RNG), weights N(0, the family's initializer_range), bias 0."""
    head = nn.Linear(inputs, outputs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, getattr(config, "initializer_range", 0.02), generator=gen)
        head.bias.zero_()
    return head


class PooledClassifier(nn.Module):
    """encoder -> pooled last hidden states (mean, cls or max) -> dropout -> one linear layer; MSE for
    regression, cross-entropy otherwise. Called like a transformers classifier (input_ids,
    attention_mask, token_type_ids, labels -> .loss, .logits)."""

    def __init__(self, encoder: PreTrainedModel, spec: TaskSpec, pooling: SentencePooling, seed: int):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.config = encoder.config
        self.is_regression = spec.is_regression
        p = getattr(encoder.config, "hidden_dropout_prob", None)
        self.dropout = nn.Dropout(0.1 if p is None else p)
        self.classifier = _seeded_linear(encoder.config.hidden_size, spec.num_labels, encoder.config, seed)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        inputs = model_inputs(self.encoder, batch)  # without token_type_ids for a family that takes none
        hidden = self.encoder(**inputs).last_hidden_state
        pooled = self.dropout(sentence_embedding(hidden, attention_mask, self.pooling))  # float32
        with torch.autocast(pooled.device.type, enabled=False):  # bf16 logits would tie STS-B's near predictions
            logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            if self.is_regression:
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class BiEncoderClassifier(nn.Module):
    """sentence-transformers' way to fine-tune a sentence model on a pair task: each sentence encoded
    alone and pooled (u, v). A similarity label (regression): the prediction is label_max * cos(u, v)
    and the loss the MSE of cos(u, v) against label / label_max (its CosineSimilarityLoss). A pair
    class: one linear layer on (u, v, |u - v|), cross-entropy (its SoftmaxLoss). The same encoder
    reads both sentences; called with input_ids/attention_mask and input_ids_b/attention_mask_b."""

    def __init__(self, encoder: PreTrainedModel, spec: TaskSpec, pooling: SentencePooling, seed: int,
                 label_max: float | None):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.config = encoder.config
        self.is_regression = spec.is_regression
        self.label_max = float(label_max or 1.0)
        self.classifier = (None if spec.is_regression else
                           _seeded_linear(3 * encoder.config.hidden_size, spec.num_labels, encoder.config, seed))

    def _embed(self, input_ids, attention_mask) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return sentence_embedding(hidden, attention_mask, self.pooling)  # float32

    def forward(self, input_ids, attention_mask, input_ids_b, attention_mask_b, labels=None) -> SequenceClassifierOutput:
        u, v = self._embed(input_ids, attention_mask), self._embed(input_ids_b, attention_mask_b)
        with torch.autocast(u.device.type, enabled=False):
            if self.is_regression:
                cosine = nn.functional.cosine_similarity(u, v, dim=-1)
                logits = (self.label_max * cosine).unsqueeze(-1)
                loss = None if labels is None else nn.functional.mse_loss(cosine, labels.float() / self.label_max)
            else:
                logits = self.classifier(torch.cat([u, v, (u - v).abs()], dim=-1))
                loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


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


def finetune_task(model, tokenizer, spec: TaskSpec, cache: TaskCache, cfg: FinetuneConfig,
                  desc: str = "") -> TaskResult:
    """Fine-tune a fresh classifier on train (or its subsample), evaluate on every dev split."""
    started = time.perf_counter()
    data = cache.data(spec)
    pad_id = tokenizer.pad_token_id or 0
    train_enc = cache.encoded(data.train, tokenizer, cfg.max_seq_len, cfg.head == "biencoder")
    scoring = scoring_rows(data, tokenizer, cache, cfg)
    rows = scoring.train_rows
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
        optimizer = optim.adamw([classifier], cfg.lr, cfg.weight_decay)  # fastkd's one builder and no-decay rule
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
