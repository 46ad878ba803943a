"""glue.json (everything measured) and glue.md (one GLUE-style row per model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__
from ..io import atomic_write_json, atomic_write_text, read_json
from .tasks import TASKS

COLLAPSE_FRACTION = 0.95  # a classifier predicting one class this often has learned nothing

# GLUE's column headers: the metrics shown per task, in leaderboard order.
HEADERS = {"cola": "CoLA (MCC)", "sst2": "SST-2 (acc)", "mrpc": "MRPC (F1/acc)", "stsb": "STS-B (P/S)",
            "qqp": "QQP (F1/acc)", "mnli": "MNLI (m/mm)", "qnli": "QNLI (acc)", "rte": "RTE (acc)", "wnli": "WNLI (acc)"}
SHOWN = {"cola": ["mcc"], "sst2": ["accuracy"], "mrpc": ["f1", "accuracy"], "stsb": ["pearson", "spearman"],
          "qqp": ["f1", "accuracy"], "mnli": ["accuracy_m", "accuracy_mm"], "qnli": ["accuracy"], "rte": ["accuracy"],
          "wnli": ["accuracy"]}


def glue_average(task_results: dict[str, dict]) -> float:
    return float(np.mean([r["score"] for r in task_results.values()])) if task_results else float("nan")


def collapsed(result: dict) -> bool:
    return any(p.get("majority_prediction_fraction", 0.0) >= COLLAPSE_FRACTION for p in result["predictions"].values())


def build_report(settings: dict, models: list[dict]) -> dict:
    """models: [{"model": name, "path": str, "tasks": {key: TaskResult dict}}]"""
    baseline = {}
    for entry in models:
        for key, result in entry["tasks"].items():
            baseline.setdefault(key, {"metrics": result["baseline_metrics"], "score": result["baseline_score"]})
    for entry in models:
        entry["glue_average"] = glue_average(entry["tasks"])
    return {"fastkd_version": __version__, "settings": settings, "models": models,
            "majority_baseline": baseline, "majority_baseline_average": glue_average(baseline)}


def _cell(key: str, metrics: dict, mark: str = "") -> str:
    return "/".join(f"{100 * metrics[m]:.1f}" for m in SHOWN[key] if m in metrics) + mark


def markdown(report: dict) -> str:
    keys = [k for k in TASKS if any(k in m["tasks"] for m in report["models"])]
    zeroshot = any("zeroshot" in m for m in report["models"])
    extra = " STS-B zero-shot (S) |" if zeroshot else ""
    lines = ["| Model | " + " | ".join(HEADERS[k] for k in keys) + " | GLUE avg |" + extra,
             "| --- | " + " | ".join("---" for _ in keys) + " | --- |" + (" --- |" if zeroshot else "")]
    for entry in report["models"]:
        cells = []
        for k in keys:
            r = entry["tasks"].get(k)
            cells.append("-" if r is None else _cell(k, r["metrics"], " †" if collapsed(r) else ""))
        partial = "" if all(k in entry["tasks"] for k in keys) else f" ({len(entry['tasks'])} tasks)"
        stsb = entry.get("zeroshot", {}).get("stsb")
        zs = (f" {100 * stsb['spearman']:.1f} |" if stsb else " - |") if zeroshot else ""
        lines.append(f"| {entry['model']} | " + " | ".join(cells) + f" | {100 * entry['glue_average']:.1f}{partial} |" + zs)
    base = report["majority_baseline"]
    lines.append("| majority class | " + " | ".join(_cell(k, base[k]["metrics"]) if k in base else "-" for k in keys)
                 + f" | {100 * report['majority_baseline_average']:.1f} |" + (" - |" if zeroshot else ""))
    s = report["settings"]
    budget = f"{s['max_steps']} steps" if s.get("max_steps") else f"{s['epochs']:g} epochs"
    subsample = f", train subsampled to {s['max_train_examples']}" if s.get("max_train_examples") else ""
    head = f", head {s.get('head', 'pooler')}"
    lines += ["", f"Dev-set scores x100. Fine-tuning: {budget}, batch {s['batch_size']}, lr {s['lr']:g}{head}, "
                  f"max length {s['max_seq_len']}, seed {s['seed']}{subsample}. GLUE avg = mean of task scores "
                  "(a task's score is the mean of its metrics).",
              f"† collapsed: one class predicted for at least {COLLAPSE_FRACTION:.0%} of dev examples. "
              "An average marked (n tasks) covers only the tasks that model ran."]
    if zeroshot:
        lines.append("STS-B zero-shot: Spearman x100 of the cosine of the model's sentence-transformers pipeline "
                     "embeddings with the gold scores on STS-B dev, no training; not in the GLUE average.")
    return "\n".join(lines) + "\n"


def write_reports(output: Path, report: dict) -> None:
    atomic_write_json(output / "glue.json", report)
    atomic_write_text(output / "glue.md", markdown(report))


def read_report(output: Path) -> dict | None:
    return read_json(output / "glue.json", "GLUE report")
