"""The one training core: the step loop drives any StepEngine through its interface alone, and each
engine's checkpoint format is told apart by its completeness marker."""

import json
from dataclasses import MISSING, fields
import signal

import pytest
import torch

from fastkd.config import DistillConfig
from fastkd.training import Preempted, StepEngine, StepResult, TrainConfig, train
from fastkd.training.engine import COMPLETE
from fastkd.training.local import checkpoints
from fastkd.training.zero import complete_tags


class ScriptedStream:
    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def real_tokens(self):
        return None  # a stream that does not count its tokens: the rate assumes full-length sequences


class ScriptedEngine(StepEngine):
    """A StepEngine that is neither the local nor the ZeRO one: the loop must need nothing else."""

    def __init__(self, cfg, losses, signal_at=None):
        super().__init__(cfg, teacher=None, student=torch.nn.Linear(1, 1), criterion=None, stream=ScriptedStream(),
                         device=torch.device("cpu"))
        self.losses, self.signal_at, self.saved = losses, signal_at, []

    def train_step(self, shared=None):
        loss = torch.tensor(self.losses[self.step])
        self.step += 1
        self.stream.position += 1
        result = StepResult(loss, {"hidden": loss / 2}, torch.tensor(1.5), ~torch.isfinite(loss))
        self.pending.append((self.step, result))
        if self.step == self.signal_at:
            signal.raise_signal(signal.SIGUSR1)
        return result

    def lr(self):
        return 0.1 * self.step

    def save_checkpoint(self, output, keep):
        self.read()
        self.saved.append((self.step, self.bad_steps, self.stream.position))
        return output

    def load_checkpoint(self, output):
        return None

    def trained_student(self):
        return self.student


def _cfg(tmp_path, **kw):
    return TrainConfig(max_steps=6, batch_size=32, log_every=2, checkpoint_every=4, progress=False, **kw)


def test_the_core_defaults_are_distills_and_distill_hands_its_settings_over():
    """The proxy and bench build a TrainConfig with the defaults: they must train as a distillation would."""
    distill = {f.name: f.default for f in fields(DistillConfig)}
    core = [f for f in fields(TrainConfig) if f.default is not MISSING]
    assert core and all(f.name in distill for f in fields(TrainConfig))
    assert {f.name: f.default for f in core} == {f.name: distill[f.name] for f in core}
    cfg = DistillConfig(output="o", corpus="c", max_steps=7, batch_size=3, lr=1e-3, warmup=0.2, grad_accum=2,
                        clip_grad=0.5, bf16=True, log_every=4, stop_at_step=5, report_to="tensorboard")
    train_cfg = cfg.train_config()
    assert [getattr(train_cfg, f.name) for f in fields(TrainConfig)] == [getattr(cfg, f.name) for f in fields(TrainConfig)]
    assert train_cfg.grad_accum == 2 and train_cfg.report_to == "tensorboard"


def test_the_loop_logs_checkpoints_and_counts_skips_through_the_interface(tmp_path):
    engine = ScriptedEngine(_cfg(tmp_path), [1.0, 2.0, float("nan"), 4.0, 5.0, 6.0])
    train(engine, tmp_path, tmp_path / "metrics.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert [r["loss"] for r in rows] == [2.0, 4.0, 6.0] and [r["hidden"] for r in rows] == [1.0, 2.0, 3.0]
    assert [r["lr"] for r in rows] == pytest.approx([0.2, 0.4, 0.6])
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]  # step 3 was non-finite, read at step 4
    assert engine.saved == [(4, 1, 4), (6, 1, 6)]  # checkpoint_every and the last step
    assert engine.final_losses()["loss"] == pytest.approx(5.5)  # the window (log_every=2) holds steps 5-6
    assert engine.final_steps() == [5, 6]


def test_after_skipped_last_steps_the_final_losses_say_which_steps_they_are(tmp_path):
    """Issue 22 item 3: 4 of 6 steps non-finite at the end; the final losses are step 1-2's, and the
    summary says so and counts the skipped steps (not "final losses" as if they were the last)."""
    from fastkd.cli import _distilled_summary

    nan = float("nan")
    engine = ScriptedEngine(_cfg(tmp_path, max_bad_steps=10), [1.0, 2.0, nan, nan, nan, nan])
    train(engine, tmp_path, tmp_path / "metrics.jsonl")
    assert engine.bad_steps == 4 and engine.final_steps() == [1, 2]
    info = {"steps": engine.step, "seconds": 1.0, "mapping": "1,2", "skipped_steps": engine.bad_steps,
            "final_losses": engine.final_losses(), "final_losses_steps": engine.final_steps()}
    said = _distilled_summary(info)
    assert "6 steps" in said and "4 skipped as non-finite" in said and "(mean of steps 1-2): loss 1.5000" in said


def test_a_stop_signal_checkpoints_that_step_and_raises_preempted(tmp_path):
    engine = ScriptedEngine(_cfg(tmp_path), [1.0] * 6, signal_at=3)
    with pytest.raises(Preempted, match="stopped by SIGUSR1 after step 3: checkpoint written; continue with --resume"):
        train(engine, tmp_path, tmp_path / "metrics.jsonl")
    assert engine.saved == [(3, 0, 3)] and engine.step == 3


def test_each_engine_lists_only_its_own_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for name, marker in (("step-00000001", {"engine": "local"}), ("step-00000002", {"engine": "zero", "world": 2}),
                         ("step-00000003", None), ("step-00000004", {"world": 2})):  # 4: a ZeRO tag of before
        (root / name).mkdir(parents=True)
        (root / name / "state.pt").write_bytes(b"x")
        if marker is not None:
            (root / name / COMPLETE).write_text(json.dumps(marker))
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000001", "step-00000003"]
    assert [p.name for p in complete_tags(tmp_path)] == ["step-00000002", "step-00000004"]
