"""A distillation in one process: the models on one device, the teacher once per batch or, where it
pays, once for the whole corpus (its sentence embeddings reused every pass)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import DistillConfig
from ..corpus import BatchStream, check_cache_dir, load_corpus, sample_corpus
from ..device import pick_device
from ..rundir import lock_output
from ..losses import DistillLoss
from ..memory import StepMemory, available_memory
from ..rng import seed_everything
from ..teacher import SentenceLabels, Teacher, labels_pay_off
from ..training import LocalEngine
from .setup import Run, build_models, check_memory, prepare_output, resolve

log = logging.getLogger(__name__)


def build_local_run(cfg: DistillConfig) -> Run:
    teacher_config, shape, mapping = resolve(cfg)
    device = pick_device(cfg.device)
    memory = check_memory(cfg, teacher_config, shape, mapping, device)
    output, saved = prepare_output(cfg)
    lock_output(output, "distill")  # one run per output directory; leftovers of a killed one are removed
    seed_everything(cfg.seed)

    tokenizer, teacher_model, student, criterion = build_models(cfg, shape, mapping)
    teacher_model.to(device)
    student.to(device)
    criterion.to(device)
    teacher = Teacher.serving(teacher_model, [criterion], cfg.bf16)

    corpus = load_corpus(cfg.corpus, tokenizer, cfg.max_seq_len, cfg.cache_dir, cfg.num_proc, cfg.progress,
                         cfg.corpus_mode)
    corpus = sample_corpus(corpus, cfg.corpus_sample, cfg.seed)
    stream = BatchStream(corpus, cfg.batch_size, cfg.seed)
    labels = None
    if _label_once(cfg, saved, criterion, len(corpus), teacher_model.config.hidden_size,
                   _room_beside_step(memory, cfg.batch_size, device, teacher_model, student, criterion)):
        labels = SentenceLabels(teacher, stream, criterion.pooling, criterion.mapping.teacher_layers, device,
                                cfg.progress, batch_size=cfg.batch_size, store=check_cache_dir(cfg.cache_dir) / "labels")
        teacher.release()  # never runs again: its accelerator memory and its bf16 copy go to the student
        log.info("teacher: the sentence embeddings of all %d corpus rows %s in %.0f s, reused for the "
                 "run's %.1f passes (no teacher forward per step)", len(corpus),
                 f"read from {labels.path}" if labels.stored else "computed once", labels.seconds,
                 cfg.max_steps * cfg.batch_size * cfg.grad_accum / len(corpus))
    engine = LocalEngine(cfg.train_config(), teacher, student, criterion, stream, labels)
    return Run(cfg, engine, tokenizer, mapping, shape, len(corpus), output,
               resolved={"teacher_labels": labels is not None})


def _room_beside_step(memory: StepMemory, batch: int, device: torch.device, *models: nn.Module) -> int:
    """Bytes the device has left once the step is whole: the estimate's, less the weights already
    resident (the models are on the device by now; gradients, optimizer state and activations are not)."""
    resident = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return available_memory(device)[0] - (memory.total(batch) - resident)


def _label_once(cfg: DistillConfig, saved: dict | None, criterion: DistillLoss, corpus_rows: int, width: int,
                room: int) -> bool:
    """Whether the teacher labels the corpus once (teacher.labels_pay_off); a resumed run keeps the choice
    its start made (`saved`: its config.json), so it continues exactly whatever the memory free now or
    --max-steps."""
    if saved is not None and "teacher_labels" in saved.get("resolved", {}):
        return bool(saved["resolved"]["teacher_labels"])
    return labels_pay_off(criterion.weights, cfg.max_steps * cfg.batch_size * cfg.grad_accum, corpus_rows, width,
                          room)
