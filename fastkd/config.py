"""The resolved settings of a distillation run: written beside its outputs, checked on resume."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import UserError
from .io import read_json

# Settings that do not change what is computed: they may differ between a run and its resume.
NON_DETERMINING = frozenset({"output", "resume", "log_every", "keep_checkpoints", "cache_dir", "progress",
                             "stop_at_step", "checkpoint_every", "max_bad_steps", "device", "loss_backend",
                             "report_to"})
REPORT_TO = ("none", "tensorboard")


@dataclass
class DistillConfig:
    output: str
    corpus: str
    teacher: str = "default"
    student: str | None = None  # an existing student directory instead of building one
    student_layers: int | None = None  # None: 3, or the --student directory's depth
    student_hidden: int | None = None
    student_heads: int | None = None
    student_ffn: int | None = None
    init: str = "teacher"
    mapping: str = "uniform"
    corpus_sample: str | None = None  # fraction or count of sequences; None = all
    max_seq_len: int = 128
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 5e-4
    warmup: float = 0.06  # fraction of max_steps
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    w_embedding: float = 1.0
    w_hidden: float = 1.0
    w_attention: float = 1.0
    w_attention_kl: float = 0.0
    seed: int = 0
    bf16: bool = False
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    max_bad_steps: int = 20
    cache_dir: str | None = None
    resume: bool = False
    stop_at_step: int | None = None  # checkpoint and exit early (job time limits); --resume continues
    progress: bool = True
    device: str = "auto"  # auto = cuda when available, else cpu
    loss_backend: str | None = None  # None: $FASTKD_LOSS_BACKEND or auto (fastkd.ops.backends)
    deepspeed: str | None = None  # a ds_config JSON: distill under DeepSpeed ZeRO (fastkd.zero)
    report_to: str = "none"  # or "tensorboard": every logged metric also under OUTPUT/tensorboard

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1 (got {self.grad_accum})"),
            (self.max_steps >= 1, f"--max-steps must be at least 1 (got {self.max_steps})"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive finite number (got {self.lr})"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be a finite number >= 0 (got {self.weight_decay})"),
            (math.isfinite(self.clip_grad) and self.clip_grad >= 0,
             f"--clip-grad must be a finite number >= 0, 0 = off (got {self.clip_grad})"),
            (self.seed >= 0, f"--seed must be >= 0 (got {self.seed})"),
            (self.report_to in REPORT_TO, f"--report-to must be one of {', '.join(REPORT_TO)} (got {self.report_to!r})"),
            (0 <= self.warmup < 1, f"--warmup is a fraction of the steps in [0, 1) (got {self.warmup})"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})"),
            (self.max_bad_steps >= 1, f"--max-bad-steps must be at least 1 (got {self.max_bad_steps})"),
            (self.log_every >= 1, f"--log-every must be at least 1 (got {self.log_every})"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1 (got {self.keep_checkpoints})"),
            (self.stop_at_step is None or self.stop_at_step >= 1,
             f"--stop-at-step must be at least 1 (got {self.stop_at_step})"),
            (self.student is None or not any(v is not None for v in (self.student_layers, self.student_hidden,
                                                                      self.student_heads, self.student_ffn)),
             "--student DIR fixes the student's shape: drop --student-layers/-hidden/-heads/-ffn"),
            (all(math.isfinite(w) and w >= 0 for w in (self.w_embedding, self.w_hidden, self.w_attention,
                                                       self.w_attention_kl)),
             "loss weights must be finite and non-negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def differing_settings(saved: dict, current: dict) -> list[str]:
    """Settings that change the computation and differ between a saved run and this one."""
    keys = sorted((set(saved) | set(current)) - NON_DETERMINING)
    return [f"{k} (saved {saved.get(k)!r}, now {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


def read_run_config(output: Path) -> dict | None:
    return read_json(output / "config.json", "run")
