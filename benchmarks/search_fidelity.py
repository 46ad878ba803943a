"""How faithful and how cheap is each rung of the search's fidelity ladder?

Ten fixed 3-layer mappings of the default teacher (uniform, last, first and seven others), each
distilled with --seeds paired seeds and scored on every rung (probe, short, full). Reports, per rung:
Spearman and Kendall rank correlation of its per-mapping means with the top rung's, seconds per
evaluation (scoring only; distillation is shared by every rung and reported apart), and the
paired noise against uniform. Target: the default GA rung has Spearman >= 0.8 with the top rung at
<= 1/5 of its cost. Default budget: the demo's (fastkd.demo.BUDGETS["full"].proxy).

    python benchmarks/search_fidelity.py [--seeds 3 --rungs probe,short,full ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_logs, table, write_result  # noqa: E402
from _search_measure import correlations, measure, paired_noise, proxy_args, proxy_from  # noqa: E402

from fastkd.demo import BUDGETS  # noqa: E402
from fastkd.search.rungs import parse_ladder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    proxy_args(p, BUDGETS["full"].proxy)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rungs", default="probe,short,full")
    p.add_argument("--name", default="search_fidelity", help="results file name under benchmarks/results/")
    args = p.parse_args()
    quiet_logs()
    started = time.perf_counter()
    rungs = list(parse_ladder(args.rungs))
    cfg = proxy_from(args)
    mappings = [",".join(m) for m in args.mappings.split(",")]
    measured = measure(cfg, mappings, list(range(args.seeds)), rungs, args.data_dir)
    corr = correlations(measured)
    top_cost = measured["seconds_per_evaluation"]["full"]
    rows = []
    for r in rungs:
        noise = paired_noise(measured, r.name)
        sec = measured["seconds_per_evaluation"][r.name]
        rows.append({"rung": r.name, "spearman": f"{corr[r.name]['spearman']:.3f}",
                     "kendall": f"{corr[r.name]['kendall']:.3f}", "s/eval": f"{sec:.1f}",
                     "cost vs full": f"{sec / top_cost:.2f}", "spread": f"{noise['spread']:.4f}",
                     "paired SD": f"{noise['paired_sd']:.4f}", "median ±95%": f"{noise['median_half_width']:.4f}"})
        measured.setdefault("noise", {})[r.name] = noise
    print(table(rows, list(rows[0])))
    print(f"distillation: {measured['distill_seconds_per_evaluation']:.1f} s per mapping and seed (shared by every rung); "
          f"{(time.perf_counter() - started) / 60:.1f} min in all")
    means_table = [{"mapping": m, **{r.name: f"{sum(measured['fitness'][r.name][m].values()) / args.seeds:.4f}"
                                     for r in rungs}} for m in measured["mappings"]]
    print(table(means_table, ["mapping", *[r.name for r in rungs]]))
    write_result(args.name, {**measured, "correlations": corr, "rows": rows,
                             "minutes": round((time.perf_counter() - started) / 60, 2)})


if __name__ == "__main__":
    main()
