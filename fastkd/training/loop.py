"""The step loop every distillation runs (one process or every ZeRO rank): metrics rows, TensorBoard
scalars, the progress bar, checkpoints every N steps, and the schedulers' stop signals."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..io import atomic_write_text
from ..processes import STOP_SIGNALS
from .engine import StepEngine

log = logging.getLogger(__name__)



class Preempted(Exception):
    """SIGTERM or SIGUSR1 (what schedulers send before they kill a job): the run checkpointed at the
    step boundary after the signal and stops; --resume continues exactly there."""

    def __init__(self, signum: int, step: int | None = None, what: str = "checkpoint written", where: str | None = None):
        self.signum, self.step = signum, step
        self.where, self.what = where or f"after step {step}", what
        self.resume_hint = "continue with --resume"  # `fastkd demo` says its own (it resumes when run again)
        super().__init__(signum, step, what, where)

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} {self.where}: {self.what}; {self.resume_hint}"


@contextlib.contextmanager
def stop_signals(then: str = "checkpointing at the end of this step"):
    """Catch the schedulers' stop signals for the duration of a loop: the first one is noted (the
    loop stops at its next boundary, `then` says what it does first); a second one stops at once, as
    without fastkd's handler; outside the loop the old handlers apply."""
    caught: dict[str, int | None] = {"signum": None}

    def note(signum, _frame):
        if caught["signum"] is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.warning("received %s: %s", signal.Signals(signum).name, then)
        caught["signum"] = signum

    if threading.current_thread() is not threading.main_thread():  # handlers only work there
        yield caught
        return
    old = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    try:
        yield caught
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def tensorboard_writer(cfg, output: Path, step: int):
    """A SummaryWriter under OUTPUT/tensorboard for --report-to tensorboard, else None. On --resume
    the events after `step` are dropped (purge_step), as the metrics rows after it are."""
    if getattr(cfg, "report_to", "none") != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=step + 1 if step > 0 else None)


def add_scalars(board, prefix: str, row: dict, step: int) -> None:
    """Every number of a metrics row as a TensorBoard scalar (flags and the step itself left out)."""
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            board.add_scalar(f"{prefix}/{key}", value, step)
    board.flush()


def strict_json_row(row: dict) -> str:
    """Strict JSON (jq, pandas): a non-finite value (a skipped step's) is written as null."""
    row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(row, allow_nan=False)


def train(engine: StepEngine, output: Path, metrics_path: Path) -> None:
    """Step `engine` to cfg.max_steps (or --stop-at-step). Checkpoints are collectives under
    DeepSpeed, so every rank runs this loop; only the main one writes metrics and shows the bar."""
    cfg = engine.cfg
    is_main = engine.is_main
    bar = tqdm(total=cfg.max_steps, initial=engine.step, desc="distill", unit="step",
               disable=not (cfg.progress and is_main), dynamic_ncols=True)
    last_time, last_step, last_tokens = time.perf_counter(), engine.step, engine.tokens_seen()
    last = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    board = tensorboard_writer(cfg, output, engine.step) if is_main else None
    with open(metrics_path if is_main else os.devnull, "a", encoding="utf-8") as metrics, stop_signals() as caught, \
            contextlib.closing(board) if board is not None else contextlib.nullcontext():
        while engine.step < last:
            t0 = time.perf_counter()
            engine.stop_requested = caught["signum"] is not None  # (ZeRO agrees on it inside the step)
            engine.train_step()
            step = engine.step
            stopping = engine.agree_to_stop(caught["signum"] is not None)
            logging_step = step % cfg.log_every == 0 or step == cfg.max_steps
            checkpoint_step = step % cfg.checkpoint_every == 0 or step == last or stopping
            # The steps' numbers reach the host here, not every step (timed: it waits for the device).
            result = engine.read() if logging_step or checkpoint_step else None
            engine.elapsed += time.perf_counter() - t0
            bar.update(1)
            if logging_step:
                now = time.perf_counter()
                rate = (step - last_step) * engine.seqs_per_step / max(now - last_time, 1e-9)
                # Real tokens (padding not counted), from this rank's share of the global batch.
                served = engine.tokens_seen()
                per_seq = (cfg.max_seq_len if served is None else
                           (served - last_tokens) / max(1, (step - last_step) * cfg.batch_size * cfg.grad_accum))
                last_time, last_step, last_tokens = now, step, served
                row = {"step": step, "loss": result.loss, **result.terms, "lr": engine.lr(),
                       "grad_norm": result.grad_norm, "seq_per_s": round(rate, 2),
                       "tokens_per_s": round(rate * per_seq, 1), "skipped": result.skipped,
                       "skipped_steps": engine.bad_steps}
                metrics.write(strict_json_row(row) + "\n")
                metrics.flush()
                if board is not None:
                    add_scalars(board, "distill", row, step)
                bar.set_postfix(loss=f"{result.loss:.4f}", seq_s=f"{rate:.1f}")
            if checkpoint_step:
                engine.save_checkpoint(output, cfg.keep_checkpoints)
            if stopping:
                bar.close()
                raise Preempted(caught["signum"] or signal.SIGTERM, step)
        if engine.agree_to_stop_now(caught["signum"] is not None):  # arrived during the last step
            bar.close()
            raise Preempted(caught["signum"] or signal.SIGTERM, engine.step)  # its checkpoint is written
    bar.close()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
        if row.get("step", step + 1) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
