"""Distillation as a run: check the settings, load teacher, student and corpus, build the step
engine (one process: local.py, or DeepSpeed ZeRO with --deepspeed: zero.py), resume, train, export.

corpus -> teacher (once per batch) -> losses -> student; the step engines and the loop are
fastkd.training's, shared with the search's proxy and bench.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import __version__
from ..config import DistillConfig
from ..corpus import corpus_identity, describe_corpus
from ..export import export_student
from ..io import atomic_write_json, no_space_is_one_line
from ..losses import loss_weights
from ..models import resolve_model_path
from ..training import train
from ..training.loop import truncate_metrics
from .setup import Run, resolve_auto

log = logging.getLogger(__name__)


def build_run(cfg: DistillConfig) -> Run:
    """Validate, lock the output, load teacher, student and corpus, build the step engine (DeepSpeed
    ZeRO with --deepspeed: every rank builds its own; else one process), then resume or start over
    and write the run's resolved config."""
    cfg.validate()
    cfg = resolve_auto(cfg)
    if cfg.deepspeed is not None:
        from .zero import build_zero_run  # (DeepSpeed is imported only for a ZeRO run)

        run = build_zero_run(cfg)
    else:
        from .local import build_local_run

        run = build_local_run(cfg)
    start(run)
    return run


def start(run: Run) -> None:
    """Resume from the newest complete checkpoint under --resume (or start over), and write the run's
    resolved config (main process)."""
    cfg, engine, output = run.cfg, run.engine, run.output
    resumed_from = engine.load_checkpoint(output) if cfg.resume else None
    # Every op self-checked (and, under auto, timed on the run's shapes) before the first step, on every
    # rank; a resumed run keeps the backends its start chose, so it continues on the same arithmetic.
    loss_ops = engine.prepare_losses(_saved_selections(output, engine.device) if resumed_from is not None else [])
    # The main process's bookkeeping; a refusal there (a full disk) is said on every rank.
    engine.on_main(lambda: _start_outputs(run, resumed_from, loss_ops))


def _saved_selections(output: Path, device) -> list[dict]:
    """The loss-op choices the run's start recorded in its config.json; for a run started before they were
    recorded, its loss_ops ({op: {dtypes: backend}}, what auto's fixed order gave it), pinned at any shapes."""
    try:
        resolved = json.loads((output / "config.json").read_text())["resolved"]
        if "loss_selections" in resolved:
            return list(resolved["loss_selections"])
        return [{"op": op, "device": str(device), "dtype": dtypes, "backend": backend, "requested": "auto",
                 "decided": "resumed", "shape": None}
                for op, by_dtype in resolved.get("loss_ops", {}).items() for dtypes, backend in by_dtype.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _start_outputs(run: Run, resumed_from: Path | None, loss_ops: dict) -> None:
    cfg, engine, output = run.cfg, run.engine, run.output
    metrics_path = output / "metrics.jsonl"
    if resumed_from is not None:
        truncate_metrics(metrics_path, engine.step)
        log.info("resumed from %s (step %d)", resumed_from, engine.step)
    else:
        if cfg.resume:
            log.info("--resume: no complete checkpoint in %s yet, starting from step 0", output)
        metrics_path.unlink(missing_ok=True)
    with no_space_is_one_line(output / "config.json"):
        _write_run_config(run, loss_ops)
    log.info("student: %s (%.1fM parameters), mapping %s, %s, global batch %d, %s loss "
             "backend%s", run.shape.describe(), run.parameters / 1e6, run.mapping.text,
             describe_corpus(engine.stream.dataset, cfg.max_seq_len), engine.seqs_per_step, engine.criterion.backend(engine.device),
             "".join(f"; {k}: {v}" for k, v in engine.describe().items()))


def _write_run_config(run: Run, loss_ops: dict) -> None:
    cfg, engine = run.cfg, run.engine
    atomic_write_json(run.output / "config.json", {
        "fastkd_version": __version__, "command": "distill", "config": cfg.to_dict(),  # the form --config reads
        "resolved": {"mapping": run.mapping.text, "teacher_layers": run.mapping.teacher_layers,
                     "student": {**run.shape.__dict__, "parameters": run.parameters},
                     "corpus_sequences": run.corpus_sequences, "global_batch": engine.seqs_per_step,
                     "corpus_identity": corpus_identity(cfg.corpus),  # checked on --resume
                     "loss_backend": engine.criterion.backend(engine.device),
                     # Each op self-checked, for the dtypes this run feeds it (engine.prepare_losses),
                     "loss_ops": loss_ops,
                     # and how each was chosen: under auto, every passing backend's time on the run's shapes.
                     "loss_selections": engine.criterion.selections(),
                     **run.resolved},
    })


def run_distill(cfg: DistillConfig) -> Path | None:
    """Distill, checkpoint, export (one process or every ZeRO rank). Returns OUTPUT/student on the
    main process (None on the others, and when stopped early by --stop-at-step)."""
    run = build_run(cfg)
    engine = run.engine
    train(engine, run.output, run.output / "metrics.jsonl")
    if engine.step < cfg.max_steps:
        if engine.is_main:
            log.info("stopped at step %d of %d; continue with --resume", engine.step, cfg.max_steps)
        return None
    student = engine.trained_student()  # a collective under ZeRO (gathers the partitions)
    dense = engine.trained_sentence_dense()  # (also a collective)
    return engine.on_main(lambda: export_run(run, student, dense))


def export_run(run: Run, student, sentence_dense: dict | None = None) -> Path:
    """Export `student` (the engine's trained student, float32) with its fastkd.json and model card;
    `sentence_dense`: a narrower student's learned projection (engine.trained_sentence_dense)."""
    cfg, engine, mapping = run.cfg, run.engine, run.mapping
    info = {
        "teacher": cfg.teacher, "teacher_layers": mapping.teacher_layers, "mapping": mapping.text,
        "mapping_spec": cfg.mapping, "init": cfg.init if cfg.student is None else f"from {cfg.student}",
        **({"supervision": mapping.supervision_text, "init_layers": ",".join(map(str, mapping.initial_layers))}
           if cfg.student is None and cfg.init == "teacher" else {}),
        "student": {**run.shape.__dict__, "parameters": run.parameters},
        "objective": cfg.objective, "relation_heads": engine.criterion.relation_heads,
        "loss_weights": loss_weights(cfg).as_dict(),
        **({"sentence_pooling": engine.criterion.pooling.describe()} if loss_weights(cfg).sentence else {}),
        "corpus": {"source": cfg.corpus, "mode": cfg.corpus_mode, "sequences": run.corpus_sequences,
                   "max_seq_len": cfg.max_seq_len, "sample": cfg.corpus_sample},
        "steps": engine.step, "global_batch": engine.seqs_per_step, "lr": cfg.lr, "seed": cfg.seed,
        "bf16": cfg.bf16, "loss_backend": engine.criterion.backend(engine.device),
        "loss_ops": engine.criterion.ran_on(),  # what each op ran on, after its self-check
        "skipped_steps": engine.bad_steps, "seconds": round(engine.elapsed, 1),
        "final_losses": engine.final_losses(), "final_losses_steps": engine.final_steps(), **engine.describe(),
    }
    return export_student(student, run.tokenizer, run.output / "student", info,
                          pipeline_from=resolve_model_path(cfg.teacher), probe=engine.stream.sample(),
                          sentence_dense=sentence_dense)
