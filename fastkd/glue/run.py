"""`fastkd glue`: fine-tune and evaluate several models on several tasks, one table."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from ..rundir import RunDir
from ..device import pick_device
from ..families import is_encoder, supported, usable_positions
from ..sentence import describe_pipeline, has_pipeline, zeroshot_stsb
from ..models import check_finite_weights, check_weight_files, load_config, load_tokenizer, resolve_model_path
from .config import FinetuneConfig, GlueConfig
from .data import TaskCache
from .finetune import finetune_task
from .heads import head_pooling
from .report import build_report, read_report, write_reports
from .tasks import TASKS, parse_tasks, task_spec

log = logging.getLogger(__name__)


def display_name(model: str) -> str:
    """'default' -> the teacher's name; an exported student -> its path with shape and mapping."""
    if model == "default":
        return "teacher all-MiniLM-L6-v2 (default)"
    info_path = Path(resolve_model_path(model)) / "fastkd.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            return f"{model} ({info['student']['layers']}L, mapping {info['mapping']})"
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return model


def _zeroshot_stsb(entry: dict, cache: TaskCache, cfg: FinetuneConfig) -> dict | None:
    """Zero-shot STS-B of one sentence-embedding model, or None (said once) where it cannot run."""
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        _say_once("zero-shot STS-B needs the sentence-transformers package (pip install 'fastkd[sentence]'): skipped")
        return None
    try:
        dev = cache.data(task_spec("stsb")).dev[0]
    except UserError as exc:
        _say_once(f"zero-shot STS-B skipped: {exc}")
        return None
    result = zeroshot_stsb(resolve_model_path(entry["path"]), dev, device=pick_device(cfg.device),
                           max_seq_len=cfg.max_seq_len)
    log.info("%s zero-shot STS-B (%s, %s): Spearman %.1f", entry["model"], result["pipeline"], result["split"],
             100 * result["spearman"])
    return result


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.info(message)


# Settings a --resume may change: they do not change what is computed (progress bars; the device, as
# before this list was glue's own).
GLUE_NON_DETERMINING = frozenset({"progress", "device", "output", "resume"})


def run_glue(glue: GlueConfig, resolved: dict | None = None) -> dict:
    """`fastkd glue`: every model fine-tuned and scored on every task. `resolved`: the command's resolved
    config, written as OUTPUT/glue-config.json once the run may begin."""
    glue.validate()
    models, data_dir, output, cfg = glue.model, glue.data_dir, glue.output, glue.finetune
    resume, skip_bad_rows, zeroshot_stsb = glue.resume, glue.skip_bad_rows, glue.zeroshot_stsb
    tasks = parse_tasks(glue.tasks)
    run_dir = RunDir(Path(output), "glue")
    out = run_dir.refuse_unusable()  # never what is not ours; writable before any fine-tuning, not after all of it
    run_dir.claim()
    # Everything that can fail is checked before the first hour of training, not after it.
    tokenizers = {}
    for model in models:
        config = load_config(model, "model")
        if not is_encoder(config):  # a decoder (GPT-2, ...) pools and pads otherwise, if at all
            raise UserError(f"--model {model} is a {config.model_type or 'unknown'} model: fastkd glue fine-tunes "
                            f"encoders of these families: {supported()}")
        if cfg.max_seq_len > usable_positions(config):
            raise UserError(f"--max-seq-len {cfg.max_seq_len} exceeds the {usable_positions(config)} tokens the position "
                            f"embeddings of {model} take")
        tokenizers[model] = load_tokenizer(model, "model")
        check_weight_files(model, "model")
        check_finite_weights(model, f"--model {model}")  # a diverged model would score as the majority class
        if zeroshot_stsb and has_pipeline(resolve_model_path(model)):
            describe_pipeline(resolve_model_path(model))  # a damaged modules.json is one line now
        if cfg.head in ("pipeline", "biencoder"):
            head_pooling(model, cfg.head)  # an unreadable pipeline is one line now; says what the head pools like
    cache = TaskCache(data_dir, skip_bad_rows)
    for spec in tasks:
        cache.data(spec)

    settings = {**asdict(cfg), "data_dir": str(data_dir), "skip_bad_rows": skip_bad_rows}
    settings.pop("progress", None)
    if not cfg.heldout:  # dev scoring, as before held-out slices existed: older outputs still resume
        settings.pop("heldout", None)
        settings.pop("heldout_part", None)
    previous = read_report(out)
    done: dict[tuple[str, str], dict] = {}
    if previous is not None:
        # Results from before --head and --regression-bias existed: the copied pooler, a bias from 0.
        before = {"head": "pooler", "regression_bias": "zero", **previous.get("settings", {})}
        now = dict(settings)
        regression = any(t.is_regression for t in tasks) or any(
            task_spec(k).is_regression for m in previous["models"] for k in m["tasks"] if k in TASKS)
        if not regression:  # the bias is never used: it cannot make two runs differ
            before.pop("regression_bias", None)
            now.pop("regression_bias", None)
        run_dir.refuse_other_run(before, now, resume, GLUE_NON_DETERMINING, holds="GLUE results")
        done = {(m["path"], k): r for m in previous["models"] for k, r in m["tasks"].items()}
    if resolved is not None:
        run_dir.write_config(resolved)

    # Results of models or tasks this call does not run are kept, never dropped by a resume.
    entries = [{"model": display_name(m), "path": m, "tasks": {}} for m in models]
    kept = {}
    if previous is not None:
        for old in previous["models"]:
            kept[old["path"]] = {k: r for k, r in old["tasks"].items()}
        entries += [{"model": old["model"], "path": old["path"], "tasks": dict(old["tasks"]),
                     **({"zeroshot": old["zeroshot"]} if "zeroshot" in old else {})}
                    for old in previous["models"] if old["path"] not in models]
    for entry in entries:
        if entry["path"] not in models:
            continue
        entry["tasks"] = {k: r for k, r in kept.get(entry["path"], {}).items() if k not in {t.key for t in tasks}}
        tokenizer = tokenizers[entry["path"]]
        for spec in tasks:
            key = (entry["path"], spec.key)
            if key in done:
                log.info("%s %s: reusing the finished result", entry["model"], spec.name)
                entry["tasks"][spec.key] = done[key]
            else:
                result = finetune_task(entry["path"], tokenizer, spec, cache, cfg, desc=f"{spec.name}")
                entry["tasks"][spec.key] = result.to_dict()
                log.info("%s %s: score %.1f (majority baseline %.1f) in %.0f s", entry["model"], spec.name,
                         100 * result.score, 100 * result.baseline_score, result.seconds)
            # Written after every task: an interrupted run loses at most the task in progress.
            write_reports(out, build_report(settings, [e for e in entries if e["tasks"]]))
        if zeroshot_stsb and has_pipeline(resolve_model_path(entry["path"])):
            stsb = _zeroshot_stsb(entry, cache, cfg)
            if stsb is not None:
                entry["zeroshot"] = {"stsb": stsb}
                write_reports(out, build_report(settings, [e for e in entries if e["tasks"]]))
    report = build_report(settings, entries)
    write_reports(out, report)
    return report
