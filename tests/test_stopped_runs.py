"""Issue 22 item 2: a fastkd killed or stopped while its tokenizing workers run leaves no worker
behind, no lock that blocks the next run, and (stopped) one line. Real processes: the `fastkd` CLI
in a subprocess, `datasets.map` with two worker processes, a real kill -9 and a real SIGTERM.

Item 8's busy, foreign, refused and stopped outputs: what each is told, and what is left on disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import run_cli
from fastkd.rundir import end_of_command, in_use_by, lock_output


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, wikitext):
    """About 8 MB of real text: two workers tokenize it for several seconds, time enough to catch them."""
    text = wikitext.read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("big") / "wiki-big.txt"
    path.write_text(text * max(1, 8_000_000 // len(text)), encoding="utf-8")
    return path


def _start(tmp_path, teacher, corpus, name):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "fastkd", "distill", "--teacher", str(teacher), "--corpus", str(corpus),
           "--num-proc", "2", "--cache-dir", str(tmp_path / f"cache-{name}"), "--output", str(out),
           "--max-steps", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, out


def _workers(proc, want: int = 2, timeout: float = 90.0) -> list[psutil.Process]:
    """The tokenizing workers once `want` of them run (children of the fastkd process)."""
    deadline = time.monotonic() + timeout
    parent = psutil.Process(proc.pid)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fastkd ended (exit {proc.returncode}) before its workers were seen: {proc.stderr.read()}")
        try:
            children = [c for c in parent.children() if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            children = []
        if len(children) >= want:
            return children
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {want} tokenizing workers appeared within {timeout:.0f} s")


def _gone(workers: list[psutil.Process], timeout: float = 10.0) -> list[int]:
    """The workers still alive after `timeout` (a zombie waiting for its reaper counts as gone)."""
    deadline = time.monotonic() + timeout
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [w for w in alive if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return [w.pid for w in alive]


def _kill_all(workers):
    for w in workers:
        try:
            for p in (*w.children(recursive=True), w):
                p.kill()
        except psutil.NoSuchProcess:
            pass


def test_a_forked_child_does_not_hold_its_parents_run_lock(tmp_path):
    """The lock is a POSIX lock: a child forked while it is held (a datasets worker) does not inherit
    it, so a child outliving its parent (here: no at-fork hook kills it) blocks no resume."""
    out = tmp_path / "o"
    script = ("import os, sys, time\nfrom fastkd.rundir import lock_output\n"
              f"lock_output({str(out)!r}, 'distill')\n"
              "child = os.fork()\n"
              "if child == 0:\n    null = os.open(os.devnull, os.O_RDWR)\n    os.dup2(null, 1)\n    os.dup2(null, 2)\n    time.sleep(60)\n    os._exit(0)\n"
              "print(child, flush=True)\nos._exit(0)\n")
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    child = psutil.Process(int(parent.stdout.split()[0]))
    try:
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        assert in_use_by(out) is None, "a forked child kept its dead parent's run lock"
        lock_output(out, "distill")
    finally:
        end_of_command(failed=False)
        child.kill()


def test_kill_9_while_tokenizing_leaves_no_worker_and_no_lock(tmp_path, tiny_teacher_dir, big_corpus):
    proc, out = _start(tmp_path, tiny_teacher_dir, big_corpus, "killed")
    workers = _workers(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        assert _gone(workers) == [], "tokenizing workers outlived the killed fastkd"
        assert in_use_by(out) is None, "the killed run's lock still blocks the output"
        lock_output(out, "distill")  # what --resume takes first: free
    finally:
        end_of_command(failed=False)
        _kill_all(workers)


def test_sigterm_while_tokenizing_says_one_line_and_leaves_nothing(tmp_path, tiny_teacher_dir, big_corpus):
    proc, out = _start(tmp_path, tiny_teacher_dir, big_corpus, "stopped")
    workers = _workers(proc)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
        err = [line for line in proc.stderr.read().splitlines() if line.startswith("fastkd ")]
        assert code == 128 + signal.SIGTERM
        assert err == ["fastkd distill: stopped by SIGTERM: nothing was written yet; run the same command again"]
        assert _gone(workers) == [], "tokenizing workers outlived the stopped fastkd"
        assert not out.exists(), "the stopped run left an output folder holding only its lock"
        entries = tmp_path / "cache-stopped" / "corpus"
        leftovers = [p.name for p in entries.iterdir()] if entries.exists() else []
        assert leftovers == [], f"the interrupted build left {leftovers} in the corpus cache"
    finally:
        _kill_all(workers)


# --- item 8: what a busy, foreign or refused output is told ----------------------------------------

def _distill(out, teacher, corpus, *extra):
    return ["distill", "--output", str(out), "--teacher", str(teacher), "--corpus", str(corpus), "--max-steps", "2",
            "--batch-size", "2", "--max-seq-len", "32", "--no-progress", *extra]


def test_an_output_a_live_run_holds_is_refused_naming_the_holder(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    """Not "holds this run already: pass --resume" (--resume would be refused too): who holds it."""
    out = tmp_path / "busy"
    assert run_cli(capfd, *_distill(out, tiny_teacher_dir, small_corpus))[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", "import time; from fastkd.rundir import lock_output; "
                               f"lock_output({str(out)!r}, 'distill'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        said = f"--output {out} is in use by a running fastkd run (pid {holder.pid}, fastkd distill): wait for it"
        for argv in (_distill(out, tiny_teacher_dir, small_corpus), _distill(out, tiny_teacher_dir, small_corpus,
                                                                              "--resume"),
                     ["search", "--corpus", str(small_corpus), "--data-dir", str(tmp_path), "--teacher",
                      str(tiny_teacher_dir), "--no-progress", "--output", str(out)],
                     ["glue", "--model", str(tiny_teacher_dir), "--tasks", "rte", "--data-dir", str(tmp_path),
                      "--no-progress", "--output", str(out)]):
            code, err = run_cli(capfd, *argv)
            assert code == 2 and len(err) == 1 and said in err[0], (argv[0], err)
    finally:
        holder.kill()
        holder.wait()


def test_distill_names_the_other_command_whose_run_an_output_holds(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    searched = tmp_path / "searched"
    searched.mkdir()
    (searched / "search-config.json").write_text("{}")
    code, err = run_cli(capfd, *_distill(searched, tiny_teacher_dir, small_corpus))
    assert code == 2 and len(err) == 1 and "holds a fastkd search run, not a distill run" in err[0], err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    code, err = run_cli(capfd, *_distill(notes, tiny_teacher_dir, small_corpus))
    assert code == 2 and len(err) == 1 and "holds files that are not a fastkd distill run (todo.txt)" in err[0], err


def test_a_refused_run_leaves_no_output_folder_behind(capfd, tmp_path, tiny_teacher_dir):
    """glue makes and locks --output, then refuses a decoder: the folder it made must not stay."""
    from transformers import GPT2Config, GPT2Model

    gpt2 = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)).save_pretrained(gpt2)
    shutil.copy(tiny_teacher_dir / "tokenizer.json", gpt2)
    out = tmp_path / "new" / "g"
    code, err = run_cli(capfd, "glue", "--model", str(gpt2), "--tasks", "rte", "--data-dir", str(tmp_path),
                        "--output", str(out), "--no-progress")
    assert code == 2 and len(err) == 1 and "is a gpt2 model" in err[0], err
    assert not out.exists(), f"the refused run left {sorted(p.name for p in out.iterdir())} in {out}"
    assert not out.parent.exists(), "the refused run left the parent folder it made"
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder the user made is theirs: never removed
    run_cli(capfd, "glue", "--model", str(gpt2), "--tasks", "rte", "--data-dir", str(tmp_path), "--output",
            str(kept), "--no-progress")
    assert kept.is_dir()


def test_glue_stopped_by_sigterm_says_one_line(capfd, monkeypatch, tmp_path, tiny_teacher_dir):
    """A scheduler's SIGTERM while glue fine-tunes: exit 143 and one line on what is kept, as distill."""
    import fastkd.glue.run as glue_run

    from conftest import SHARED_DATA

    data = SHARED_DATA / "glue"

    def stopped_while_training(*args, **kwargs):
        # (without the command's handler, the signal would end the whole test session)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "glue runs without a stop handler"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, at once
        raise AssertionError("SIGTERM did not stop glue")

    monkeypatch.setattr(glue_run, "finetune_task", stopped_while_training)
    code, err = run_cli(capfd, "glue", "--model", str(tiny_teacher_dir), "--tasks", "rte", "--data-dir", str(data),
                        "--output", str(tmp_path / "g"), "--no-progress", "--no-zeroshot-stsb")
    assert code == 128 + signal.SIGTERM
    assert err == ["fastkd glue: stopped by SIGTERM: every finished (model, task) result is kept; continue with "
                   "--resume"], err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone with it
