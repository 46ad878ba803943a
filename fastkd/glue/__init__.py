"""GLUE: task loaders, official metrics, fine-tuning and reports.

API for the search: `evaluate(model, tokenizer, tasks, cache, FinetuneConfig(...))` fine-tunes an
in-memory encoder (or a path) on each task and returns per-task TaskResult; a TaskCache shares
loaded and tokenized task data across every candidate.
"""

from .finetune import FinetuneConfig, TaskCache, TaskResult, evaluate, finetune_task
from .tasks import TASKS, TaskSpec, load_task, parse_tasks, task_spec

__all__ = ["FinetuneConfig", "TaskCache", "TaskResult", "evaluate", "finetune_task", "TASKS", "TaskSpec",
           "load_task", "parse_tasks", "task_spec"]
