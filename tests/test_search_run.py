import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastkd.cli import main, parse_config
from fastkd.mapping import LayerMapping, parse_mapping
from fastkd.search import run as search_run
from fastkd.search.run import Search

FIXTURES = Path(__file__).parent / "fixtures" / "glue"


def _argv(teacher, corpus, output, *extra):
    return ["search", "--teacher", str(teacher), "--student-layers", "2", "--corpus", str(corpus),
            "--data-dir", str(FIXTURES), "--proxy-tasks", "wnli,qnli", "--proxy-sequences", "32", "--proxy-seq-len", "32",
            "--proxy-steps", "3", "--proxy-batch-size", "4", "--proxy-finetune-steps", "2",
            "--proxy-finetune-examples", "8", "--proxy-finetune-batch-size", "4", "--proxy-finetune-seq-len", "32",
            "--population", "4", "--generations", "3", "--proxy-heldout", "4", "--output", str(output), "--no-progress",
            *extra]


def _search(argv) -> Search:
    return Search(parse_config(argv)[1])


def _rows(db_path):
    with sqlite3.connect(db_path) as db:
        return {(m, s, r) for m, s, r in db.execute("SELECT mapping, seed, rung FROM evaluations WHERE mapping != 'teacher'")}


def test_search_writes_every_output(tmp_path, tiny_teacher_dropout_dir, small_corpus):
    out = tmp_path / "s"
    search = _search(_argv(tiny_teacher_dropout_dir, small_corpus, out, "--verdict-seeds", "3"))
    result = search.run()
    best = json.loads((out / "best_mapping.json").read_text())
    assert best["text"] == result["winner"] and len(best["mapping"]) == 2
    assert set(best["tasks"]) == {"wnli", "qnli"} and best["verdict_seeds"] == [1000, 2000, 3000]
    assert set(best["verdicts"]) == {"uniform", "last"} and best["ladder"] == ["zeroshot", "full"]
    report = (out / "report.md").read_text()
    for part in ("search space: 16 mappings", "| uniform |", "Signal check", "Fidelity ladder", "paired differences",
                 "Where the time went"):
        assert part in report, part
    # the shipped measurement is cited, and this tiny teacher is named as not what was measured
    assert "This search differs from the measured setting in: teacher " in report
    # The fixtures' tasks are scored on a handful of dev rows: the report says the ranking means little.
    rows_scored = {t["task"]: t["dev_examples"] for t in search.signal["teacher"].values()}
    assert all(n < 100 for n in rows_scored.values()) and "**The ranking below means little:**" in report
    assert all(f"{task} is scored on {n} rows" in report for task, n in rows_scored.items())
    for png in ("fitness.png", "layers.png", "ladder.png", "verdict.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The resolved settings, in the form --config reads back: the same search.
    assert parse_config(["search", "--config", str(out / "search-config.json")])[1] == search.cfg
    # One teacher forward per batch for each generation, whatever the population.
    assert all(g["teacher_forwards"] == 3 for g in search.generations)
    assert search.generations[0]["evaluated"] == 4
    rows = _rows(out / "search.sqlite")
    # The GA scored on the first rung only, with the selection seed.
    cheap = {(m, s) for m, s, r in rows if r == "zeroshot"}
    assert {s for _, s in cheap} == {0} and len(cheap) == len(search.main_fitness)
    # Successive halving: ceil(0.5 x zeroshot-scored) mappings plus uniform and last reach the top rung at seed 0.
    promoted = {m for m, s, r in rows if r == "full" and s == 0}
    assert {"2,4", "3,4"} <= promoted and len(promoted) <= -(-len(cheap) // 2) + 2
    # The verdict: winner, uniform and last on every held-out seed, never on the selection seed.
    verdict = {(m, s) for m, s, r in rows if r == "full" and s != 0}
    assert {s for _, s in verdict} == {1000, 2000, 3000}
    assert {m for m, _ in verdict} == {result["winner"], "2,4", "3,4"}


def test_kill_9_then_resume_repeats_nothing(tmp_path, tiny_teacher_dropout_dir, small_corpus):
    fewer = ("--generations", "2", "--verdict-seeds", "2")
    reference = tmp_path / "reference"
    _search(_argv(tiny_teacher_dropout_dir, small_corpus, reference, *fewer)).run()
    expected = _rows(reference / "search.sqlite")

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fastkd", *_argv(tiny_teacher_dropout_dir, small_corpus, out, *fewer)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "search.sqlite"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                # Killed while the top rung is being climbed (a rung above the GA's): the hard case.
                if any(r == "full" and s == 0 for _, s, r in _rows(db)):
                    break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    # Said plainly when the run could not be caught on the top rung (a slow machine, or a fast one).
    assert proc.poll() is None, f"the search ended (exit {proc.returncode}) before it could be killed on the top rung"
    assert time.time() < deadline, "no top-rung row within 240 s: the search is far slower than expected here"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _rows(db)
    assert any(r == "full" for _, _, r in before) and len(before) < len(expected), "killed in the middle of a rung"

    resumed = _search(_argv(tiny_teacher_dropout_dir, small_corpus, out, *fewer, "--resume", "--report-to",
                            "tensorboard"))
    resumed.run()
    after = _rows(db)
    assert after == expected  # the same evaluations as an uninterrupted run
    # TensorBoard: each generation once (the resume replays the stored ones), read back with its reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("best", "mean", "best_so_far", "evaluated"):
        got = [(e.step, e.value) for e in events.Scalars(f"search/zeroshot/{key}")]
        assert got == [(g["generation"], pytest.approx(g[key])) for g in resumed.generations], key
    assert {"search/verdict_vs_uniform/mean_difference", "search/verdict_vs_last/seeds"} <= set(events.Tags()["scalars"])
    assert resumed.evaluator.reused == len(before)  # every finished one read back, none computed again
    counters = resumed.evaluator.counters
    assert counters.distilled + counters.reused_students == len(expected) - len(before)
    assert counters.student_steps == 3 * counters.distilled
    with sqlite3.connect(reference / "search.sqlite") as a, sqlite3.connect(db) as b:
        query = "SELECT mapping, seed, rung, fitness FROM evaluations ORDER BY mapping, seed, rung"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()  # the same numbers, not only the same rows


def _one_line(capfd, argv):
    code = main(argv)
    err = [l for l in capfd.readouterr().err.splitlines() if l.strip() and " INFO " not in l and "WARNING" not in l
           and "it/s]" not in l and "examples/s]" not in l]
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_bad_inputs(tmp_path, tiny_teacher_dir, small_corpus, capfd, monkeypatch):
    argv = lambda out, *extra: _argv(tiny_teacher_dir, small_corpus, tmp_path / out, *extra)  # noqa: E731
    assert "--population must be at least 2" in _one_line(capfd, argv("a", "--population", "1"))
    assert "--generations must be at least 1" in _one_line(capfd, argv("b", "--generations", "0"))
    assert "has no SST-2 folder" in _one_line(capfd, argv("c", "--proxy-tasks", "sst2"))
    assert "unknown GLUE task" in _one_line(capfd, argv("c", "--proxy-tasks", "sst3"))
    assert "unknown rung 'cheap'" in _one_line(capfd, argv("c", "--ladder", "cheap,full"))
    assert "not cheap-to-faithful" in _one_line(capfd, argv("c", "--ladder", "full,probe"))
    assert "must end with the top rung" in _one_line(capfd, argv("c", "--ladder", "probe,short"))
    assert "in (0, 1]" in _one_line(capfd, argv("c", "--promote", "0"))
    assert "in (0, 1]" in _one_line(capfd, argv("c", "--promote", "1.5"))
    assert "--proxy-init random copies none" in _one_line(capfd, argv("c", "--search-init", "--proxy-init", "random"))
    assert "no layer is supervised" in _one_line(capfd, argv("c", "--search-init", "--objective", "sentence"))
    assert "include the selection seed 0" in _one_line(capfd, argv("c", "--verdict-seeds", "0,1000"))
    with pytest.raises(SystemExit) as exit_info:  # refused by the parser itself, before any work
        main(argv("c", "--verdict-seeds", "two"))
    assert exit_info.value.code == 2 and "neither a count nor" in capfd.readouterr().err
    assert main(argv("d", "--generations", "1", "--verdict-seeds", "1")) == 0

    def no_tokenizing(*_, **__):
        raise AssertionError("the corpus was loaded before the store's settings were checked")

    monkeypatch.setattr(search_run, "load_corpus", no_tokenizing)  # each refusal below comes before it
    line = _one_line(capfd, argv("d", "--generations", "1", "--verdict-seeds", "1", "--proxy-steps", "4", "--resume"))
    assert "settings differ" in line and "proxy" in line
    line = _one_line(capfd, argv("d", "--generations", "1", "--verdict-seeds", "1", "--ladder", "full", "--resume"))
    assert "settings differ" in line and "ladder (saved ['zeroshot', 'full'], now ['full'])" in line
    assert "pass --resume" in _one_line(capfd, argv("d", "--generations", "1", "--verdict-seeds", "1"))
    (tmp_path / "e").mkdir()
    with sqlite3.connect(tmp_path / "e" / "search.sqlite") as db:
        db.execute("CREATE TABLE notes (t TEXT)")
    assert "not a fastkd search store" in _one_line(capfd, argv("e", "--resume"))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "search.sqlite").write_bytes(b"garbage" * 200)
    assert "not a usable fastkd search store" in _one_line(capfd, argv("f", "--resume"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_search_matches_one_rank(tmp_path, tiny_teacher_dropout_dir, small_corpus):
    """torchrun, gloo, 2 CPU ranks: each evaluates its slice; rank 0 writes; same result as 1 rank."""
    import os

    single = tmp_path / "single"
    # One thread in both runs: the zeroshot rung's fitness is a correlation over a few fixture pairs,
    # and float rounding that depends on the thread count can reorder near ties.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "fastkd", *_argv(tiny_teacher_dropout_dir, small_corpus, single,
                                                                 "--generations", "2", "--verdict-seeds", "2")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    double = tmp_path / "double"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), "-m", "fastkd",
                           *_argv(tiny_teacher_dropout_dir, small_corpus, double, "--generations", "2", "--verdict-seeds", "2")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with sqlite3.connect(single / "search.sqlite") as a, sqlite3.connect(double / "search.sqlite") as b:
        query = "SELECT mapping, seed, rung, fitness FROM evaluations ORDER BY mapping, seed, rung"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()
    assert json.loads((double / "best_mapping.json").read_text())["text"] == \
        json.loads((single / "best_mapping.json").read_text())["text"]
    assert proc.stdout.count("Winner") == 1  # only rank 0 reports


def test_diverging_candidate_is_scored_not_fatal_and_unmeasured_noise_claims_nothing(
        tmp_path, tiny_teacher_dir, small_corpus, monkeypatch):
    from fastkd.training import LocalEngine, NonFiniteAbort

    real = LocalEngine.train_step

    def train_step(self, shared=None):
        if self.criterion.mapping.text == "2,4":  # uniform diverges
            raise NonFiniteAbort("aborted: 20 steps had a non-finite loss")
        return real(self, shared)

    monkeypatch.setattr(LocalEngine, "train_step", train_step)
    out = tmp_path / "s"
    result = _search(_argv(tiny_teacher_dir, small_corpus, out, "--generations", "1", "--verdict-seeds", "1")).run()
    rows = {m: f for m, s, f in sqlite3.connect(out / "search.sqlite").execute(
        "SELECT mapping, seed, fitness FROM evaluations WHERE mapping != 'teacher' AND rung = 'zeroshot'")}
    assert rows["2,4"] == -1.0 and len(rows) == 4  # the floor, stored (never retried); the others evaluated
    assert result["winner"] != "2,4"
    best = json.loads((out / "best_mapping.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert all(v["half_width"] is None and v["n"] == 1 for v in best["verdicts"].values())  # 1 verdict seed: no claim
    report = (out / "report.md").read_text()
    assert "so no claim" in report and "diverged" in report


def test_top_rung_only_and_no_verdict_seeds_report_without_claims(tmp_path, tiny_teacher_dir, small_corpus):
    """(With --search-init: the initial layers are searched apart from the supervising ones.)"""
    out = tmp_path / "s"
    result = _search(_argv(tiny_teacher_dir, small_corpus, out, "--generations", "1", "--ladder", "full",
                           "--verdict-seeds", "0", "--search-init")).run()
    rows = _rows(out / "search.sqlite")
    assert {r for _, _, r in rows} == {"full"} and {s for _, s, _ in rows} == {0}  # the GA ran on the top rung
    best = json.loads((out / "best_mapping.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert best["verdict_seeds"] == [] and best["ladder"] == ["full"]
    assert all(v["n"] == 0 for v in best["verdicts"].values())
    report = (out / "report.md").read_text()
    assert "no claim" in report or "itself" in report
    # the population: uniform, last and first tied, and a random genome starting from other layers (SUPERVISION@INIT)
    mappings = {m for m, _, _ in rows}
    assert {"2,4", "3,4", "1,2"} < mappings and any("@" in m for m in mappings), mappings
    assert "search space: 256 mappings" in report and "initial layers searched" in report
    assert len(best["mapping"]) == len(best["init_layers"]) == 2
    assert parse_mapping(best["text"], 2, 4) == LayerMapping(tuple(best["mapping"]), 4, tuple(best["init_layers"]))
    for png in ("ladder.png", "verdict.png", "layers.png"):  # (layers.png: the supervising and the initial layers)
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with sqlite3.connect(out / "search.sqlite") as db:
        top = dict(db.execute("SELECT mapping, fitness FROM evaluations WHERE mapping != 'teacher' AND seed = 0"))
    assert top[result["winner"]] == max(top.values())  # the winner is the best of the top rung


def test_sigterm_stops_after_the_evaluation_in_flight_and_resume_repeats_none(tmp_path, tiny_teacher_dropout_dir,
                                                                              small_corpus):
    out = tmp_path / "stopped"
    argv = _argv(tiny_teacher_dropout_dir, small_corpus, out, "--generations", "1", "--verdict-seeds", "2")
    code = ("import os, signal, sys\n"
            "from fastkd.search import store\n"
            "real = store.Store.put\n"
            "count = [0]\n"
            "def put(self, e):\n"
            "    real(self, e)\n"
            "    count[0] += 1\n"
            "    if count[0] == 2: os.kill(os.getpid(), signal.SIGTERM)  # while the 2nd is being stored\n"
            "store.Store.put = put\n"
            "from fastkd.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last == (f"fastkd search: stopped by SIGTERM after 2 evaluations: each finished one is stored in "
                    f"{out / 'search.sqlite'}; continue with --resume"), last
    with sqlite3.connect(out / "search.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 2  # the teacher's and one mapping
    resumed = _search([*argv, "--resume"])
    resumed.run()
    assert resumed.evaluator.reused == 1 and (out / "best_mapping.json").is_file()  # the stored mapping is not evaluated again


def test_sigterm_during_proxy_distillation_stops_at_once(tmp_path, tiny_teacher_dropout_dir, small_corpus):
    out = tmp_path / "stopped"
    argv = _argv(tiny_teacher_dropout_dir, small_corpus, out, "--generations", "1", "--verdict-seeds", "2")
    code = ("import os, signal, sys\n"
            "from fastkd.training import local\n"
            "real = local.LocalEngine.train_step\n"
            "sent = []\n"
            "def step(self, *a, **k):\n"
            "    r = real(self, *a, **k)\n"
            "    if self.step == 2 and not sent:  # Slurm's warning, once, in the middle of a chunk\n"
            "        sent.append(1); os.kill(os.getpid(), signal.SIGUSR1)\n"
            "    return r\n"
            "local.LocalEngine.train_step = step\n"
            "from fastkd.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    # Only the teacher's signal check was stored: the chunk in distillation is dropped, not finished.
    assert last.startswith("fastkd search: stopped by SIGUSR1 after 1 evaluations:"), last
    with sqlite3.connect(out / "search.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 1
