"""Can the verdict say something? Paired noise of the top rung against the spread between mappings.

Fixed 3-layer mappings of the default teacher (uniform first), each distilled and fine-tuned on the
same --seeds paired seeds at a budget (`--budget demo`: the demo's proxy; `--budget default`:
fastkd search's defaults). Mappings that collapsed on some seed are excluded (a collapsed mapping
is easy to reject and would inflate the spread). Reports the spread of the kept mappings' means,
the SD of a paired difference against uniform (pooled over mappings), their ratio, and the 95%
half-width of the paired t interval the verdict would print with this many seeds.
Targets: half-width <= 0.02 at the demo budget, <= 0.01 at the default budget.

    python benchmarks/search_signal.py --budget demo [--seeds 4 --mappings 246,456,226]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_logs, table, write_result  # noqa: E402
from _search_measure import budget_parser, measure, paired_noise, proxy_from  # noqa: E402

from fastkd.search.rungs import Rung  # noqa: E402

TARGET = {"demo": 0.02, "default": 0.01}


def main() -> None:
    p, budget = budget_parser(__doc__)
    p.add_argument("--seeds", type=int, default=4, help="paired seeds (at least 2: an interval needs them)")
    p.set_defaults(mappings="246,456,226,346,146,135")
    args = p.parse_args()
    if args.seeds < 2:
        p.error("--seeds must be at least 2")
    quiet_logs()
    started = time.perf_counter()
    cfg = proxy_from(args)
    mappings = [",".join(m) for m in args.mappings.split(",")]
    measured = measure(cfg, mappings, [1000 * (k + 1) for k in range(args.seeds)], [Rung("full")], args.data_dir)
    noise = paired_noise(measured, "full")
    rows = [{"mapping": m, **{f"seed {s}": f"{measured['fitness']['full'][m][s]:.4f}"
                              + (" †" if measured["collapsed"]["full"][m][s] else "") for s in measured["seeds"]},
             "vs uniform": "-" if m not in noise["intervals_vs_uniform"] else
             f"{noise['intervals_vs_uniform'][m]['mean']:+.4f} ± {noise['intervals_vs_uniform'][m]['half_width'] or float('nan'):.4f}"}
            for m in measured["mappings"]]
    print(table(rows, list(rows[0])))
    hw = noise["median_half_width"]
    print(f"budget {budget}: spread {noise['spread']:.4f} over {len(noise['kept_mappings'])} kept mappings "
          f"(excluded as collapsed: {', '.join(noise['excluded_collapsed']) or 'none'}); paired SD {noise['paired_sd']:.4f} "
          f"(unpaired SD of uniform {noise['unpaired_sd_uniform']:.4f}); spread / paired SD = "
          f"{noise['spread_over_paired_sd']:.2f}; 95% half-width with {args.seeds} seeds: median {hw:.4f}, max "
          f"{noise['max_half_width']:.4f} (target <= {TARGET[budget]}); {(time.perf_counter() - started) / 60:.1f} min")
    write_result(f"search_signal_{budget}", {**measured, "budget": budget, "noise": noise, "target_half_width": TARGET[budget],
                                             "meets_target": bool(hw <= TARGET[budget]),
                                             "minutes": round((time.perf_counter() - started) / 60, 2)})


if __name__ == "__main__":
    main()
