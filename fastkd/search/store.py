"""The search's memory: one SQLite file (WAL mode) of finished evaluations.

A row is keyed by a hash of every setting that determines fitness (teacher, student shape, proxy
budget, tasks, ladder, ...), the mapping text, the evaluation seed and the rung of the fidelity
ladder that scored it (a probe score and a fine-tuning score of one mapping are different rows), so a resumed or concurrent search
never evaluates the same thing twice and a row is never half-written (one transaction each).
The store also remembers the settings of the search that created it, so `--resume` with different
settings is refused naming the setting.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io import is_full_disk
from ..rundir import other_run_refusal

SCHEMA_VERSION = 2  # 2: the rung is part of a row's key
MARKER = "fastkd-search-store"


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"proxy": {"steps": 3}} -> {"proxy.steps": 3}: a refusal names the exact setting."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Evaluation:
    mapping: str
    seed: int
    generation: int
    fitness: float
    tasks: dict  # task key -> TaskResult dict
    losses: dict  # final distillation losses
    seconds: float
    rung: str = "full"  # the ladder rung that scored it (fastkd.search.rungs)

    def row(self, key: str) -> tuple:
        return (key, self.mapping, self.seed, self.rung, self.generation, self.fitness, json.dumps(self.tasks),
                json.dumps(self.losses), self.seconds, time.time())


def _has_legacy_identity(settings: dict) -> bool:
    """Whether a store's settings name files by [path, size, mtime] (before identities were digests)."""
    files = [*(settings.get("teacher_files") or []), *(settings.get("task_files") or []),
             *((settings.get("corpus") or {}).get("files") or [])]
    return any(isinstance(f, list) and len(f) == 3 and isinstance(f[2], int) for f in files)


class Store:
    def __init__(self, path: str | Path, settings: dict, resume: bool, create: bool = True, legacy_settings=None):
        """create=False: only check an existing store (its refusals), writing nothing: an empty file, left
        by a kill during creation, is left for the search that creates it. legacy_settings: a function giving
        the settings as a store written before file identities were digests holds them; such a store whose
        settings equal them is continued under its own key."""
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings, sort_keys=True))  # as stored: tuples become lists
        self.key = settings_hash(self.settings)
        self.legacy_settings = legacy_settings
        try:
            self.db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)  # autocommit; explicit txns
            self.db.execute("PRAGMA busy_timeout=60000")
            self.db.execute("PRAGMA journal_mode=WAL")
            # Check-or-create under the write lock: two searches starting together serialise here, and
            # a file left empty by a kill during creation is simply created again.
            with self._transaction():
                tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables:
                    self._check_existing(tables, resume)
                elif create:
                    self._create()
        except sqlite3.DatabaseError as exc:
            if is_full_disk(exc):  # SQLite's "database or disk is full": the store is fine, the disk is not
                raise UserError(f"no space left on device for the search store {self.path}: free some space and run "
                                "the same command again") from None
            raise UserError(f"{self.path} is not a usable fastkd search store ({exc}): remove it or choose another --output") from None

    def _create(self) -> None:
        self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.execute(
            "CREATE TABLE evaluations (settings TEXT NOT NULL, mapping TEXT NOT NULL, "
            "seed INTEGER NOT NULL, rung TEXT NOT NULL, generation INTEGER NOT NULL, fitness REAL NOT NULL, "
            "tasks TEXT NOT NULL, losses TEXT NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL, "
            "PRIMARY KEY (settings, mapping, seed, rung))")
        self.db.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("marker", MARKER), ("schema", str(SCHEMA_VERSION)), ("settings", json.dumps(self.settings, sort_keys=True))])

    def _check_existing(self, tables: set, resume: bool) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        if meta.get("marker") != MARKER or "evaluations" not in tables:
            raise UserError(f"{self.path} is an SQLite file but not a fastkd search store: remove it or choose another --output")
        if int(meta.get("schema", -1)) != SCHEMA_VERSION:
            raise UserError(f"{self.path} was written by another fastkd version (store schema {meta.get('schema')})")
        stored = json.loads(meta["settings"])
        if stored != self.settings and self.legacy_settings is not None and _has_legacy_identity(stored) \
                and stored == json.loads(json.dumps(self.legacy_settings(), sort_keys=True)):
            self.settings, self.key = stored, settings_hash(stored)  # its evaluations keep their key
        why = other_run_refusal(self.path.parent, _flatten(stored), _flatten(self.settings), resume, holds="a search")
        if why is not None:
            raise UserError(why)

    class _Txn:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks

        def __exit__(self, exc_type, *_):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _transaction(self):
        return Store._Txn(self.db)

    _COLUMNS = "mapping, seed, generation, fitness, tasks, losses, seconds, rung"

    @staticmethod
    def _evaluation(r) -> Evaluation:
        return Evaluation(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), r[6], r[7])

    def get(self, mapping: str, seed: int, rung: str = "full") -> Evaluation | None:
        row = self.db.execute(
            f"SELECT {self._COLUMNS} FROM evaluations WHERE settings=? AND mapping=? AND seed=? AND rung=?",
            (self.key, mapping, seed, rung)).fetchone()
        return None if row is None else self._evaluation(row)

    def put(self, evaluation: Evaluation) -> bool:
        """Insert once; False when the row was already there (another process got there first)."""
        with self._transaction():
            cur = self.db.execute("INSERT OR IGNORE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                  evaluation.row(self.key))
        return cur.rowcount == 1

    def all(self) -> list[Evaluation]:
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM evaluations WHERE settings=? ORDER BY created",
                               (self.key,)).fetchall()
        return [self._evaluation(r) for r in rows]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM evaluations WHERE settings=?", (self.key,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()
