"""Hugging Face export: save_pretrained weights, config and tokenizer, fastkd.json and a model card."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from . import __version__
from .families import disable_capture, enable_capture, family_of
from .sentence import copy_pipeline, describe_pipeline, has_pipeline
from .errors import UserError
from .io import follow_umask, no_space_is_one_line, replace_dir, staging_dir

log = logging.getLogger(__name__)


def _skipped(info: dict) -> str:
    skipped = info.get("skipped_steps", 0)
    return f"; {skipped} of {info['steps']} steps were skipped as non-finite" if skipped and "steps" in info else ""


def refuse_diverged(student, target: Path, info: dict, probe: dict[str, torch.Tensor] | None) -> None:
    """Never ship a broken model (an --lr that diverged, say): every weight finite, and the outputs on
    a real batch too (weights of 1e30 are finite, the attention scores they make are not)."""
    bad = [name for name, t in student.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"not exporting {target}: {len(bad)} weight tensors hold non-finite values (first: "
                        f"{bad[0]}){_skipped(info)}: the run diverged; lower --lr and distill again")
    if probe is None:
        return
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            out = student(**{k: v.to(device) for k, v in probe.items()}, output_hidden_states=True)
    finally:
        student.train(was_training)
    # Beyond float16's range is as broken as inf: no trained encoder's hidden states come near it, and
    # the model could not run in half precision (an --lr of 1e6 leaves finite outputs of 1e6).
    broken = [i for i, h in enumerate(out.hidden_states)
              if not torch.isfinite(h).all() or h.abs().max().item() > torch.finfo(torch.float16).max]
    if broken:
        largest = max(t.abs().max().item() for t in student.state_dict().values() if t.is_floating_point())
        raise UserError(f"not exporting {target}: the student's hidden states on a corpus batch are not finite or "
                        f"beyond float16's range from layer {broken[0]} on (its largest weight is {largest:.3g})"
                        f"{_skipped(info)}: the run diverged; lower --lr (and keep --clip-grad above 0) and distill "
                        "again")


def export_student(student, tokenizer, target: Path, info: dict, pipeline_from=None,
                   probe: dict[str, torch.Tensor] | None = None, sentence_dense: dict | None = None) -> Path:
    """Write `target` (e.g. OUTPUT/student) atomically; `info` becomes fastkd.json and the card.

    pipeline_from: the teacher's directory; when it is a sentence-transformers model, its pipeline
    (pooling, normalisation) is exported with the student (fastkd.sentence). probe: a batch of real
    input the student's outputs must be finite on. sentence_dense: a narrower student's learned
    projection to the teacher's width (the sentence term's), a Dense module of that pipeline."""
    refuse_diverged(student, target, info, probe)
    if sentence_dense is not None and not all(torch.isfinite(t).all() for t in sentence_dense.values()):
        raise UserError(f"not exporting {target}: the sentence term's learned projection holds non-finite values"
                        f"{_skipped(info)}: the run diverged; lower --lr and distill again")
    staged = staging_dir(target)
    try:
        with no_space_is_one_line(target):
            # Saved with a stock attention implementation so the export loads without fastkd installed.
            disable_capture(student)
            try:
                student.save_pretrained(staged, safe_serialization=True)
            finally:
                enable_capture(student)
            tokenizer.save_pretrained(staged)
            info = {"fastkd_version": __version__, "family": family_of(student).name, **info}
            carried = False
            if pipeline_from is not None and not Path(pipeline_from).is_dir():
                log.info("the teacher %s is a hub name: its sentence-transformers pipeline (if any) is not exported "
                         "with the student; distill from its local directory to keep it", pipeline_from)
            elif has_pipeline(pipeline_from):
                skipped = copy_pipeline(pipeline_from, staged, student.config.hidden_size, sentence_dense)
                if skipped:
                    log.warning("the teacher's sentence-transformers pipeline is not exported with the student: %s",
                                skipped)
                else:
                    carried = True
                    info["sentence_pipeline"] = describe_pipeline(staged)
            if sentence_dense is not None:
                width = tuple(sentence_dense["weight"].shape[::-1])
                if carried:
                    info["sentence_dense"] = f"{width[0]} -> {width[1]}, learned with the sentence term"
                else:
                    log.warning("the sentence term's learned projection (%d -> %d) is not exported: it lives in the "
                                "teacher's sentence-transformers pipeline, which the student did not get; the "
                                "student's own embeddings are %d wide", *width, width[0])
            (staged / "fastkd.json").write_text(json.dumps(info, indent=2) + "\n")
            (staged / "README.md").write_text(model_card(info))
        follow_umask(staged)  # other users of a shared machine can load it, as the umask says
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)  # nothing half-written stays behind
        raise
    replace_dir(staged, target)
    return target


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# How the student learned, by objective: the model card's first sentence.
_HOW = {
    "tinybert": "by layer-wise knowledge distillation (hidden states and pre-softmax attention scores)",
    "minilm": "by MiniLM-style distillation (attention distributions and value relations)",
    "minilmv2": "by MiniLMv2-style distillation (query, key and value relations)",
    "sentence": "by learning to reproduce the teacher's sentence embeddings (sentence-transformers' layer reduction)",
}


def model_card(info: dict) -> str:
    shape = info.get("student", {})
    losses = info.get("final_losses", {})
    weights = info.get("loss_weights", {})
    corpus = info.get("corpus", {})
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- knowledge-distillation",
        "- fastkd",
        *(["- sentence-transformers"] if info.get("sentence_pipeline") else []),
        "---",
        "",
        f"# Distilled {info.get('family', 'BERT')} student ({shape.get('layers', '?')} layers)",
        "",
        f"Distilled task-agnostically with fastkd {info.get('fastkd_version', '')} from teacher "
        f"`{info.get('teacher', '?')}` {_HOW.get(info.get('objective', 'tinybert'), _HOW['tinybert'])}.",
        "",
        "## Student",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| layers | {shape.get('layers')} |",
        f"| hidden size | {shape.get('hidden')} |",
        f"| attention heads | {shape.get('heads')} |",
        f"| FFN size | {shape.get('ffn')} |",
        f"| parameters | {shape.get('parameters', '?'):,} |" if isinstance(shape.get("parameters"), int) else "| parameters | ? |",
        f"| initialisation | {info.get('init')} |",
        "",
        "## Layer mapping",
        "",
        f"Student layer m learns teacher layer g[m]: `{info.get('supervision', info.get('mapping'))}` (requested as "
        f"`{info.get('mapping_spec')}`; teacher has {info.get('teacher_layers')} layers; `-` means unsupervised)."
        + (f" Student layer m started as a copy of teacher layer `{info['init_layers']}`[m]." if info.get("init_layers")
           else "")
        + (" The embedding output learns the teacher's." if (info.get("loss_weights") or {}).get("embedding", 1.0) else "")
        + (f" The last layer's sentence embedding learns the teacher's ({info['sentence_pooling']})."
           if info.get("sentence_pooling") else ""),
        "",
        "## Distillation",
        "",
        f"- corpus: `{corpus.get('source')}`, " + (
            f"{corpus.get('sequences', '?')} sequences of {corpus.get('max_seq_len', '?')} tokens"
            if corpus.get("mode", "packed") == "packed" else
            f"{corpus.get('sequences', '?')} {corpus['mode']} of at most {corpus.get('max_seq_len', '?')} tokens")
        + (f" (sample {corpus.get('sample')})" if corpus.get("sample") else ""),
        f"- steps: {info.get('steps')} at batch {info.get('global_batch')}, lr {info.get('lr')}, seed {info.get('seed')}",
        f"- objective: {info.get('objective', 'tinybert')}"
        + (f" ({info['relation_heads']} relation heads)" if info.get("relation_heads") else ""),
        "- loss weights: " + ", ".join(f"{k} {_fmt(v)}" for k, v in weights.items()),
        *([f"- teacher: {info['teacher_labels']} (no teacher forward per step)"] if info.get("teacher_labels") else []),
        "- final losses (mean of the last logged window): " + ", ".join(f"{k} {_fmt(v)}" for k, v in losses.items()),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "encoder = AutoModel.from_pretrained(PATH)",
        "classifier = AutoModelForSequenceClassification.from_pretrained(PATH, num_labels=2)  # then fine-tune",
        "```",
        "",
    ]
    if info.get("sentence_pipeline"):
        lines += [f"Sentence embeddings with the teacher's pipeline ({info['sentence_pipeline']}):", "",
                  "```python", "from sentence_transformers import SentenceTransformer",
                  "embeddings = SentenceTransformer(PATH).encode(sentences)", "```", ""]
    return "\n".join(lines)
