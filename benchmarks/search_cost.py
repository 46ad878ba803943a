"""Seconds per evaluation of the search at a budget, and the fitness each evaluation gave (issue 26, item 4).

Fixed 3-layer mappings of the default teacher, distilled in lockstep (one teacher forward per batch, as a
generation) and scored on the top rung, on --seeds seeds. Prints the seconds per evaluation (distillation,
then scoring) and every fitness, so two runs of this script on two versions of the code, on one machine,
compare the cost and say whether the results moved.

    python benchmarks/search_cost.py [--budget demo] [--seeds 1] [--mappings 246,456] [--name search_cost]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, quiet_logs, write_result  # noqa: E402
from _search_measure import budget_parser, measure, proxy_from  # noqa: E402

from fastkd.search.rungs import Rung  # noqa: E402


def main() -> None:
    p, budget = budget_parser(__doc__)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--name", default="search_cost", help="results/NAME.json")
    p.set_defaults(mappings="246,456")
    args = p.parse_args()
    quiet_logs()
    host = machine()
    print(f"{host['cpu']}, {host['cores']} cores, {', '.join(host['isa'])}", flush=True)
    started = time.perf_counter()
    mappings = [",".join(m) for m in args.mappings.split(",")]
    measured = measure(proxy_from(args), mappings, [1000 * (k + 1) for k in range(args.seeds)], [Rung("full")],
                       args.data_dir)
    distill, score = measured["distill_seconds_per_evaluation"], measured["seconds_per_evaluation"]["full"]
    print(f"budget {budget}: {distill + score:.2f} s per evaluation (distillation {distill:.2f}, scoring "
          f"{score:.2f}); {(time.perf_counter() - started) / 60:.1f} min")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    write_result(args.name, {**measured, "budget": budget, "commit": commit,
                             "seconds_per_evaluation_total": round(distill + score, 3),
                             "minutes": round((time.perf_counter() - started) / 60, 2)})


if __name__ == "__main__":
    main()
