"""Runs that survive real clusters: damaged inputs, full disks, stale leftovers, locks, stop signals.

Each case as a user meets it: one line on stderr and exit 2 for a mistake or a damaged input,
nothing half-written left behind, and a stopped run that resumes exactly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastkd.config import DistillConfig
from fastkd.distill import build_run, run_distill
from fastkd.training import Preempted, train
from fastkd.errors import UserError

from conftest import run_cli


def _distill_argv(out, teacher, corpus, *extra):
    return ["distill", "--output", str(out), "--teacher", str(teacher), "--corpus", str(corpus), "--max-steps", "2",
            "--batch-size", "2", "--max-seq-len", "32", "--no-progress", *extra]


def _cfg(tmp_path, name, teacher, corpus, **kw):
    base = dict(output=str(tmp_path / name), corpus=str(corpus), teacher=str(teacher), student_layers=2,
                max_seq_len=32, batch_size=4, max_steps=8, lr=1e-3, checkpoint_every=4, log_every=2, progress=False)
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_unwritable_output_is_one_line_before_any_work(capfd, tmp_path, tiny_teacher_dir, small_corpus, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "run" if where == "under_a_file" else "/proc/fastkd-run"
    for argv in (_distill_argv(out, tiny_teacher_dir, small_corpus),
                 ["glue", "--model", str(tiny_teacher_dir), "--tasks", "rte", "--data-dir", str(tmp_path),
                  "--output", str(out), "--no-progress"]):
        code, err = run_cli(capfd, *argv)
        assert code == 2 and len(err) == 1, err
        assert "cannot be written" in err[0] and str(out) in err[0], err


def test_damaged_weights_and_foreign_models_are_one_line(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    for content in (b"", os.urandom(4096), None):
        bad = tmp_path / f"teacher-{len(content) if content is not None else 'half'}"
        shutil.copytree(tiny_teacher_dir, bad)
        weights = bad / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(content if content is not None else data[: len(data) // 2])
        code, err = run_cli(capfd, *_distill_argv(tmp_path / "out", bad, small_corpus))
        assert code == 2 and len(err) == 1 and "model.safetensors is damaged" in err[0], err
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(gpt2)
    shutil.copy(tiny_teacher_dir / "tokenizer.json", gpt2)
    code, err = run_cli(capfd, *_distill_argv(tmp_path / "out2", gpt2, small_corpus))
    assert code == 2 and len(err) == 1 and "is a gpt2 model; fastkd distills these encoder families" in err[0], err


@pytest.mark.parametrize("flags,message", [
    (["--seed", "-1"], "invalid seed -1"),
    (["--lr", "inf"], "--lr must be a positive finite number"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
])
def test_bad_values_are_refused(capfd, tmp_path, tiny_teacher_dir, small_corpus, flags, message):
    code, err = run_cli(capfd, *_distill_argv(tmp_path / "out", tiny_teacher_dir, small_corpus, *flags))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "config.json").exists()


def test_dev_null_as_corpus_and_empty_proxy_tasks(capfd, tmp_path, tiny_teacher_dir):
    code, err = run_cli(capfd, *_distill_argv(tmp_path / "out", tiny_teacher_dir, "/dev/null"))
    assert code == 2 and "is not a regular file or directory" in err[0], err
    from fastkd.glue.tasks import parse_tasks

    with pytest.raises(UserError, match="--proxy-tasks is empty"):
        parse_tasks(",", "--proxy-tasks")


def test_a_ds_config_with_an_unknown_stage(tmp_path, tiny_teacher_dir, small_corpus):
    from fastkd.distill.zero import load_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    with pytest.raises(UserError, match="zero_optimization.stage is 7; ZeRO stages are 0, 1, 2 and 3"):
        load_ds_config(str(path), _cfg(tmp_path, "z", tiny_teacher_dir, small_corpus), 1, 32)


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_teacher_dir, small_corpus, caplog):
    straight = run_distill(_cfg(tmp_path, "straight", tiny_teacher_dir, small_corpus, max_steps=12))
    run_distill(_cfg(tmp_path, "cut", tiny_teacher_dir, small_corpus, max_steps=12, stop_at_step=8))  # ckpts 4, 8
    state = tmp_path / "cut" / "checkpoints" / "step-00000008" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    with caplog.at_level("INFO"):
        resumed = run_distill(_cfg(tmp_path, "cut", tiny_teacher_dir, small_corpus, max_steps=12, resume=True))
    messages = [r.getMessage() for r in caplog.records]
    assert any("step-00000008 is damaged" in m for m in messages), messages
    assert any("resumed from" in m and "step-00000004 (step 4)" in m for m in messages), messages
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # from step 4: bit-identical
    rows = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(2, 13, 2))  # the rows after step 4 were written once, by the resumed run


def test_when_no_checkpoint_loads_resume_refuses_instead_of_starting_over(tmp_path, tiny_teacher_dir, small_corpus):
    run_distill(_cfg(tmp_path, "gone", tiny_teacher_dir, small_corpus, max_steps=12, stop_at_step=8))
    for state in (tmp_path / "gone" / "checkpoints").glob("step-*/state.pt"):
        state.write_bytes(b"garbage")
    with pytest.raises(UserError, match="none of the 2 checkpoints .* loads"):
        run_distill(_cfg(tmp_path, "gone", tiny_teacher_dir, small_corpus, max_steps=12, resume=True))


def test_a_full_disk_leaves_no_staging_and_is_one_line(tmp_path, tiny_teacher_dir, small_corpus, monkeypatch):
    run = build_run(_cfg(tmp_path, "full", tiny_teacher_dir, small_corpus))
    run.engine.train_step()

    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match="no space left on device writing .*state.pt"):
        run.engine.save_checkpoint(run.output, 2)
    assert list((run.output / "checkpoints").iterdir()) == []


def test_a_non_finite_model_is_never_exported(tmp_path, tiny_teacher_dir, small_corpus):
    from fastkd.export import export_student

    run = build_run(_cfg(tmp_path, "inf", tiny_teacher_dir, small_corpus))
    with torch.no_grad():
        next(run.engine.student.parameters()).fill_(float("inf"))
    with pytest.raises(UserError, match="non-finite values"):
        export_student(run.engine.student, run.tokenizer, run.output / "student", {})
    assert not (run.output / "student").exists()


def test_leftovers_of_a_killed_run_are_removed_and_files_follow_the_umask(tmp_path, tiny_teacher_dir, small_corpus):
    out = tmp_path / "left"
    ckpt = out / "checkpoints"
    old = os.umask(0o022)
    try:
        run_distill(_cfg(tmp_path, "left", tiny_teacher_dir, small_corpus, max_steps=8, stop_at_step=4))
        # What kill -9 during a checkpoint write and during a config write leaves behind:
        (ckpt / ".step-00000008.tmp-abc").mkdir()
        (ckpt / ".step-00000008.tmp-abc" / "state.pt").write_bytes(b"x" * 1000)
        (out / ".config.json.x1.tmp").write_text("{")
        student = run_distill(_cfg(tmp_path, "left", tiny_teacher_dir, small_corpus, max_steps=8, resume=True))
    finally:
        os.umask(old)
    assert not (ckpt / ".step-00000008.tmp-abc").exists() and not (out / ".config.json.x1.tmp").exists()
    for path, mode in ((student, 0o755), (student / "model.safetensors", 0o644), (student / "fastkd.json", 0o644),
                       (out / "config.json", 0o644)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path, oct(path.stat().st_mode))


def test_a_stale_tokenization_folder_is_removed(tmp_path, tiny_teacher_dir, small_corpus):
    from fastkd.corpus import load_corpus
    from fastkd.corpus.cache import host_name
    from fastkd.models import load_tokenizer

    cache = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = cache / "corpus" / f".build-{host_name()}-{dead}-xyz"
    stale.mkdir(parents=True)
    alive = cache / "corpus" / f".build-{host_name()}-{os.getpid()}-xyz"
    alive.mkdir()
    load_corpus(str(small_corpus), load_tokenizer(str(tiny_teacher_dir)), 32, cache)
    assert not stale.exists() and alive.exists()  # a live process's build is left alone


def test_a_damaged_corpus_cache_is_rebuilt(tmp_path, tiny_teacher_dir, small_corpus, caplog):
    from fastkd.corpus import load_corpus
    from fastkd.models import load_tokenizer

    tok = load_tokenizer(str(tiny_teacher_dir))
    first = load_corpus(str(small_corpus), tok, 32, tmp_path)
    rows = [first[i]["input_ids"] for i in range(len(first))]
    (arrow,) = (tmp_path / "corpus").glob("*/*.arrow")
    del first
    arrow.write_bytes(os.urandom(arrow.stat().st_size))
    with caplog.at_level("WARNING"):
        again = load_corpus(str(small_corpus), tok, 32, tmp_path)
    assert any("is damaged" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert [again[i]["input_ids"] for i in range(len(again))] == rows


def test_a_tiny_sample_warns(tmp_path, tiny_teacher_dir, small_corpus, caplog):
    with caplog.at_level("WARNING"):
        build_run(_cfg(tmp_path, "one", tiny_teacher_dir, small_corpus, corpus_sample="1"))
    assert any("fewer than one global batch" in r.getMessage() for r in caplog.records)


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(tmp_path):
    from fastkd.rundir import lock_output

    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastkd.rundir import lock_output; "
                               f"lock_output({str(out)!r}, 'search'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by a running fastkd run \(pid {holder.pid}, fastkd search\)"):
            lock_output(out, "distill")
    finally:
        holder.kill()
        holder.wait()
    lock_output(out, "distill")  # released by the kernel when the holder died (kill -9 included)


def test_sigterm_checkpoints_and_resume_is_bit_identical(tmp_path, tiny_teacher_dropout_dir, small_corpus):
    straight = run_distill(_cfg(tmp_path, "straight", tiny_teacher_dropout_dir, small_corpus, max_steps=10))
    run = build_run(_cfg(tmp_path, "stopped", tiny_teacher_dropout_dir, small_corpus, max_steps=10))
    d = run.engine
    real = d.train_step

    def step_then_signal(*args, **kwargs):
        out = real(*args, **kwargs)
        if d.step == 3:  # the scheduler's SIGTERM arrives during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    d.train_step = step_then_signal
    with pytest.raises(Preempted, match="stopped by SIGTERM after step 3: checkpoint written; continue with --resume"):
        train(d, run.output, run.output / "metrics.jsonl")
    assert (run.output / "checkpoints" / "step-00000003" / "state.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the loop
    resumed = run_distill(_cfg(tmp_path, "stopped", tiny_teacher_dropout_dir, small_corpus, max_steps=10, resume=True))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_through_the_cli_exits_143_with_one_line(tmp_path, tiny_teacher_dir, small_corpus):
    out = tmp_path / "cli"
    code = ("import os, signal, sys\n"
            "import fastkd.training.local as d\n"
            "real = d.LocalEngine.train_step\n"
            "def step(self, *a, **k):\n"
            "    r = real(self, *a, **k)\n"
            "    if self.step == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return r\n"
            "d.LocalEngine.train_step = step\n"
            "from fastkd.cli import main\n"
            f"sys.exit(main({_distill_argv(out, tiny_teacher_dir, small_corpus, '--max-steps', '6')!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last == "fastkd distill: stopped by SIGTERM after step 2: checkpoint written; continue with --resume"
    assert (out / "checkpoints" / "step-00000002" / "state.pt").is_file()


def test_resume_checks_the_corpus_files_not_only_their_path(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    run_distill(_cfg(tmp_path, "ident", tiny_teacher_dir, small_corpus, stop_at_step=4))
    with open(small_corpus, "a", encoding="utf-8") as f:
        f.write("A paragraph added after the run began changes what the next batches would be.\n")
    with pytest.raises(UserError, match="the corpus .* changed since the run began"):
        run_distill(_cfg(tmp_path, "ident", tiny_teacher_dir, small_corpus, stop_at_step=8, resume=True))


def test_resume_after_the_corpus_was_restored_from_a_copy(tmp_path, tiny_teacher_dir, small_corpus):
    """A copy keeps the bytes and changes the modification time (a data volume mounted afresh, rsync
    without -t): the run resumes and ends as an uninterrupted one."""
    straight = run_distill(_cfg(tmp_path, "straight", tiny_teacher_dir, small_corpus))
    run_distill(_cfg(tmp_path, "copied", tiny_teacher_dir, small_corpus, stop_at_step=4))
    data = small_corpus.read_bytes()
    small_corpus.unlink()
    small_corpus.write_bytes(data)  # a new file (inode), the same bytes
    os.utime(small_corpus, ns=(10**9, 10**9))
    resumed = run_distill(_cfg(tmp_path, "copied", tiny_teacher_dir, small_corpus, resume=True))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_recorded_with_modification_times_resumes_while_its_corpus_is_unchanged(tmp_path, tiny_teacher_dir,
                                                                                      small_corpus):
    run_distill(_cfg(tmp_path, "old", tiny_teacher_dir, small_corpus, stop_at_step=2))
    record = tmp_path / "old" / "config.json"

    def record_the_old_way():  # as runs made before identities were digests recorded their corpus
        saved = json.loads(record.read_text())
        st = small_corpus.stat()
        saved["resolved"]["corpus_identity"] = {"files": [[str(small_corpus.resolve()), st.st_size, st.st_mtime_ns]]}
        record.write_text(json.dumps(saved))

    record_the_old_way()
    run_distill(_cfg(tmp_path, "old", tiny_teacher_dir, small_corpus, stop_at_step=4, resume=True))
    record_the_old_way()
    os.utime(small_corpus, ns=(10**9, 10**9))  # the old record cannot tell a copy: it refuses, as it always did
    with pytest.raises(UserError, match="the corpus .* changed since the run began"):
        run_distill(_cfg(tmp_path, "old", tiny_teacher_dir, small_corpus, resume=True))


def test_the_launcher_may_put_local_rank_before_the_command(capfd, monkeypatch, tmp_path):
    """`deepspeed $(which fastkd) distill ...` runs `fastkd --local_rank=N distill ...`."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    code, err = run_cli(capfd, "--local_rank=1", "distill", "--corpus", str(tmp_path / "missing.txt"),
                     "--output", str(tmp_path / "o"), "--no-progress")
    assert code == 2 and "not found" in err[0], err  # parsed as distill's own flags, refused for the corpus
    assert os.environ["LOCAL_RANK"] == "1"
