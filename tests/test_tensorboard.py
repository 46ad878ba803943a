"""--report-to tensorboard: every logged metric as TensorBoard scalars, read back with TensorBoard's
own event reader; a resume drops the events after its checkpoint, like the metrics rows."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fastkd.config import DistillConfig
from fastkd.distill import run_distill
from fastkd.errors import UserError


def _cfg(tmp_path, **kw):
    base = dict(output=str(tmp_path / "tb"), corpus=str(kw.pop("corpus")), teacher=str(kw.pop("teacher")),
                student_layers=2, max_seq_len=32, batch_size=4, max_steps=6, lr=1e-3, checkpoint_every=2,
                log_every=2, progress=False, report_to="tensorboard")
    base.update(kw)
    return DistillConfig(**base)


def _scalars(folder):
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_the_logged_metrics_are_tensorboard_scalars_and_a_resume_rewrites_none(tmp_path, tiny_teacher_dir,
                                                                              small_corpus):
    import shutil

    run_distill(_cfg(tmp_path, teacher=tiny_teacher_dir, corpus=small_corpus, checkpoint_every=4))
    # As if killed after logging step 6 but before its checkpoint: the resume from step 4 logs 6 again.
    shutil.rmtree(tmp_path / "tb" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "tb" / "student")
    run_distill(_cfg(tmp_path, teacher=tiny_teacher_dir, corpus=small_corpus, checkpoint_every=4, resume=True))
    rows = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(tmp_path / "tb" / "tensorboard")
    for key in ("loss", "hidden", "attention", "embedding", "lr", "grad_norm", "seq_per_s"):
        assert [s for s, _ in scalars[f"distill/{key}"]] == [r["step"] for r in rows] == [2, 4, 6], key
        for (_, value), row in zip(scalars[f"distill/{key}"], rows):
            assert value == pytest.approx(row[key], rel=1e-6), key  # float32 in the event file


def test_an_unknown_report_target_is_refused(tmp_path, tiny_teacher_dir, small_corpus):
    with pytest.raises(UserError, match="--report-to must be one of none, tensorboard"):
        run_distill(_cfg(tmp_path, teacher=tiny_teacher_dir, corpus=small_corpus, report_to="wandb"))
