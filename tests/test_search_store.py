import sqlite3
import subprocess
import sys
import textwrap

import pytest

from fastkd.errors import UserError
from fastkd.search.store import Evaluation, Store

SETTINGS = {"teacher": "default", "student_layers": 3, "proxy_steps": 100, "tasks": ["sst2", "mrpc", "rte"]}


def _eval(mapping, seed=0, fitness=0.5):
    return Evaluation(mapping, seed, 0, fitness, {"rte": {"score": fitness}}, {"loss": 1.0}, 2.5)


def test_put_get_once_and_survive_reopen(tmp_path):
    path = tmp_path / "search.sqlite"
    store = Store(path, SETTINGS, resume=False)
    assert store.put(_eval("2,4,6")) and not store.put(_eval("2,4,6", fitness=0.9))  # first write wins
    assert store.put(_eval("2,4,6", seed=1, fitness=0.6))
    store.close()
    again = Store(path, SETTINGS, resume=True)
    got = again.get("2,4,6", 0)
    assert got.fitness == 0.5 and got.tasks == {"rte": {"score": 0.5}} and again.count() == 2
    assert again.get("1,2,3", 0) is None
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_refuses_other_settings_foreign_and_corrupt_files(tmp_path):
    path = tmp_path / "search.sqlite"
    Store(path, SETTINGS, resume=False).close()
    with pytest.raises(UserError, match="holds a search already: pass --resume"):
        Store(path, SETTINGS, resume=False)
    with pytest.raises(UserError, match=r"settings differ from the saved run: proxy_steps \(saved 100, now 200\)"):
        Store(path, {**SETTINGS, "proxy_steps": 200}, resume=True)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE people (name TEXT)")
    with pytest.raises(UserError, match="not a fastkd search store"):
        Store(foreign, SETTINGS, resume=True)
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(UserError, match="not a usable fastkd search store"):
        Store(corrupt, SETTINGS, resume=True)


WRITER = textwrap.dedent("""
    import sys
    from fastkd.search.store import Evaluation, Store
    settings = {settings!r}
    store = Store(sys.argv[1], settings, resume=True)
    for i in range(60):
        mapping = f"{{i % 6 + 1}},{{(i // 6) % 6 + 1}},{{sys.argv[2]}}"
        store.put(Evaluation(mapping, 0, 0, float(i), {{}}, {{}}, 0.0))
    store.close()
""")


def test_two_processes_writing_one_store(tmp_path):
    path = tmp_path / "search.sqlite"
    Store(path, SETTINGS, resume=False).close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(settings=SETTINGS))
    procs = [subprocess.Popen([sys.executable, str(script), str(path), tag]) for tag in ("1", "2")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = Store(path, SETTINGS, resume=True)
    rows = store.all()
    assert len(rows) == 72 and len({(r.mapping, r.seed) for r in rows}) == 72  # 36 distinct mappings per writer
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_empty_file_left_by_a_kill_is_new_and_refusal_names_the_nested_setting(tmp_path):
    path = tmp_path / "search.sqlite"
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").fetchone()  # a file with no tables yet
    Store(path, {"proxy": {"steps": 3, "lr": 1e-3}}, resume=False, create=False).close()  # a check writes nothing
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    Store(path, {"proxy": {"steps": 3, "lr": 1e-3}}, resume=False).close()
    with pytest.raises(UserError, match=r"proxy\.steps \(saved 3, now 4\)"):
        Store(path, {"proxy": {"steps": 4, "lr": 1e-3}}, resume=True)


def test_rungs_are_keyed_apart(tmp_path):
    store = Store(tmp_path / "search.sqlite", SETTINGS, resume=False)
    probe = Evaluation("2,4,6", 0, 0, 0.61, {}, {}, 1.0, rung="probe")
    full = Evaluation("2,4,6", 0, -3, 0.78, {}, {}, 9.0, rung="full")
    assert store.put(probe) and store.put(full)  # same mapping and seed, two rungs: two rows
    assert store.get("2,4,6", 0, "probe").fitness == 0.61 and store.get("2,4,6", 0, "full").fitness == 0.78
    assert store.get("2,4,6", 0, "short") is None
    assert {(e.rung, e.fitness) for e in store.all()} == {("probe", 0.61), ("full", 0.78)}


def test_a_store_from_before_digest_identities_resumes_while_its_files_are_unchanged(tmp_path, tiny_teacher_dir,
                                                                                    small_corpus):
    """Stores written before file identities were digests hold [path, size, mtime]: they keep their
    evaluations while those files are unchanged, and are refused, as before, once a file's time moves."""
    import os

    from fastkd.search.config import SearchConfig

    data = tmp_path / "glue"
    (data / "SST-2").mkdir(parents=True)
    (data / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood film\t1\n")
    cfg = SearchConfig(output=str(tmp_path / "o"), corpus=str(small_corpus), data_dir=str(data),
                       teacher=str(tiny_teacher_dir))
    old = cfg.fitness_settings(legacy=True)
    assert isinstance(old["corpus"]["files"][0][2], int) and isinstance(old["task_files"][0][2], int)
    path = tmp_path / "search.sqlite"
    with_old_key = Store(path, old, resume=False)
    with_old_key.put(_eval("2,4,6", fitness=0.7))
    with_old_key.close()
    now = cfg.fitness_settings()
    store = Store(path, now, resume=True, legacy_settings=lambda: cfg.fitness_settings(legacy=True))
    assert store.get("2,4,6", 0).fitness == 0.7
    store.close()
    os.utime(small_corpus, ns=(10**9, 10**9))
    assert cfg.fitness_settings() == now  # by digest, the same files
    with pytest.raises(UserError, match="settings differ from the saved run: corpus"):
        Store(path, cfg.fitness_settings(), resume=True, legacy_settings=lambda: cfg.fitness_settings(legacy=True))


def test_a_digest_keyed_store_takes_a_copy_of_its_files_for_the_same(tmp_path, tiny_teacher_dir, small_corpus):
    import os
    import shutil

    from fastkd.search.config import SearchConfig

    copy = tmp_path / "copy" / small_corpus.name
    copy.parent.mkdir()
    shutil.copy(small_corpus, copy)
    os.utime(copy, ns=(10**9, 10**9))
    settings = [SearchConfig(output="o", corpus=str(c), data_dir=str(tmp_path), teacher=str(tiny_teacher_dir))
                .fitness_settings() for c in (small_corpus, copy)]
    assert settings[0]["corpus"] == settings[1]["corpus"] and settings[0]["teacher_files"]
