"""The classifier a GLUE fine-tune trains on an encoder: the copied CLS pooler, a re-initialised
pooler, mean pooling, the sentence pipeline's pooling, or a bi-encoder over the pipeline's sentence
embeddings (fastkd glue --head); each seeded, and a regression head's bias started at the label
mean where asked."""

from __future__ import annotations


import copy
import logging

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from ..errors import UserError
from ..families import model_inputs, stock_attention
from ..models import load_encoder, resolve_model_path
from ..sentence import SentencePooling, has_pipeline, read_pooling, sentence_embedding
from .config import HEADS
from .tasks import TaskSpec

log = logging.getLogger(__name__)


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
