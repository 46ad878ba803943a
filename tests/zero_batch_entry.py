"""Several `fastkd` commands in one deepspeed launch (the tests' ZeRO runs).

    deepspeed --num_gpus 2 tests/zero_batch_entry.py RUNS.json

RUNS.json: [{"name": ..., "argv": ["distill", ...]}, ...]. Each rank runs them in order through
fastkd's own `main` (the same code path as launch/fastkd_entry.py) and writes
RUNS.json.rank<N>.json: each finished run's exit code (a failed run ends the launch). One launch pays the launcher's, the imports' and the
process group's start-up once for all the runs (about 12 s each on 2 cores), which is most of what a
tiny ZeRO run costs.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))

from fastkd_entry import _take_local_rank  # noqa: E402

from fastkd.cli import main  # noqa: E402


def run_all(spec: Path) -> int:
    """Each run in turn; the exit codes so far are written after each one. A run that fails on this
    rank ends the launch (os._exit, so the launcher stops every rank): the other rank may still be
    inside that run's collectives, and starting the next run beside it would hang both."""
    rank = os.environ.get("RANK", "0")
    out = spec.with_name(f"{spec.name}.rank{rank}.json")
    results = {}
    for run in json.loads(spec.read_text()):
        start = time.monotonic()
        try:
            rc = main(run["argv"])
        except SystemExit as exc:  # refused by the parser
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 (a traceback is this run's failure, reported below)
            traceback.print_exc()
            rc = 1
        print(f"zero-batch: {run['name']} exited {rc} on rank {rank} after {time.monotonic() - start:.1f} s", flush=True)
        results[run["name"]] = rc
        out.write_text(json.dumps(results))
        if rc != 0:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    return 0


if __name__ == "__main__":
    args = _take_local_rank(sys.argv[1:])
    sys.exit(run_all(Path(args[0])))
