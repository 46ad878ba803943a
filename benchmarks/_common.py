"""Shared bits of the benchmark scripts: machine description, RSS, JSON results."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def quiet_logs() -> None:
    """Warnings and errors only, no transformers progress bars: the benchmark prints its own lines."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def machine() -> dict:
    """The CPU and its kernel-deciding flags, the torch build and the libraries (fastkd.machine)."""
    from fastkd.machine import describe

    return describe()


def _status_kib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Linux: restart the peak-RSS high-water mark, so each measurement has its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mib() -> float:
    return (_status_kib("VmRSS") or 0.0) / 1024


def peak_rss_mib() -> float:
    hwm = _status_kib("VmHWM")  # honours reset_peak_rss; getrusage does not
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    line = lambda values: "| " + " | ".join(str(v).ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line([r.get(c, "") for c in columns]) for r in rows)])


@contextlib.contextmanager
def fresh_label_store():
    """A --cache-dir whose corpus entries are the fastkd cache's (linked: nothing is tokenized again) but
    whose teacher-labels store starts empty, so a run timed against a peer that labels its sentences every
    run pays for its own labelling too (fastkd keeps labels for the next student of the same teacher and
    corpus; a benchmark that compares whole runs must not let one run's labels speed another's)."""
    import tempfile

    from fastkd.corpus import default_cache_dir

    shared = default_cache_dir() / "corpus"
    shared.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastkd-fresh-labels-") as root:
        (Path(root) / "corpus").symlink_to(shared, target_is_directory=True)
        yield root
