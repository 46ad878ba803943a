"""One training core, told what to do by its own TrainConfig (config): the step engine interface (engine), its single-process (local) and DeepSpeed
ZeRO (zero) implementations with their checkpoint formats, and the step loop (loop)."""

from .config import TrainConfig
from .engine import NonFiniteAbort, StepEngine, StepRecord, StepResult, read_steps, student_loss, window_means
from .local import LocalEngine, latest_checkpoint
from .loop import Preempted, stop_signals, train

__all__ = ["LocalEngine", "NonFiniteAbort", "Preempted", "StepEngine", "StepRecord", "StepResult", "latest_checkpoint",
           "read_steps", "stop_signals", "student_loss", "train", "TrainConfig", "window_means"]
