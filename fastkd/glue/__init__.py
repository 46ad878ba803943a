"""GLUE: task loaders, official metrics, fine-tuning and reports.

API for the search: `evaluate(model, tokenizer, tasks, cache, FinetuneConfig(...))` fine-tunes an
in-memory encoder (or a path) on each task and returns per-task TaskResult; a TaskCache shares
loaded and tokenized task data across every candidate.

The names are resolved on first use (PEP 562), so importing `fastkd.glue.config` or
`fastkd.glue.tasks` (the CLI's parser, a settings check) does not import torch.
"""

from importlib import import_module

_WHERE = {"FinetuneConfig": "config", "TaskCache": "data", "TaskResult": "data", "evaluate": "finetune",
          "finetune_task": "finetune", "TASKS": "tasks", "TaskSpec": "tasks", "load_task": "tasks",
          "parse_tasks": "tasks", "task_spec": "tasks"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
