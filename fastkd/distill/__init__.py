"""`fastkd distill`: setup.py (settings checked, models built), local.py (one process), zero.py
(DeepSpeed ZeRO), run.py (resume, train, export)."""

from .run import build_run, export_run, run_distill, start
from .setup import DEFAULT_STUDENT_LAYERS, Run, comparable, prepare_output, resolve, resolve_auto

__all__ = ["DEFAULT_STUDENT_LAYERS", "Run", "build_run", "comparable", "export_run", "prepare_output", "resolve",
           "resolve_auto", "run_distill", "start"]
