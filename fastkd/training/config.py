"""What the training core (the step engines and the loop) is told: the optimisation, precision, logging
and checkpoint cadence of one run, nothing about where its data, teacher or output come from.

`fastkd distill` projects its settings onto it (DistillConfig.train_config); the search's proxy and
`fastkd bench` build one directly. The defaults are distill's (a test holds them equal), so the proxy
trains as a distillation does unless it says otherwise."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int
    batch_size: int  # sequences per micro-batch
    lr: float = 5e-4  # peak AdamW learning rate
    warmup: float = 0.06  # linear warmup, a fraction of max_steps
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.01
    clip_grad: float = 1.0  # gradient-norm clipping (0 = off)
    bf16: bool = False  # autocast
    compile: bool = False  # torch.compile each layer of the student and the teacher (fastkd.families.compile_layers)
    max_bad_steps: int = 20  # non-finite steps before the run stops
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    stop_at_step: int | None = None
    progress: bool = True
    report_to: str = "none"  # or "tensorboard"
    max_seq_len: int = 128  # the rate's tokens per sequence where a stream does not count them
