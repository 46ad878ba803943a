"""Does the objective matter? `minilmv2` against `tinybert` students at the same budget (reported, not asserted).

Both objectives distill the same 3-layer students of the default teacher with the same mapping
(uniform, 2,4,6, unless --mappings) on the same paired seeds: each seed samples the same corpus
batches and fine-tuning examples for both, so the comparison is paired. Each student is scored on
the tasks with signal at this budget (see search_signal.py and the README's search section):
  - SST-2 accuracy after the proxy fine-tuning, on a held-out slice of its train set;
  - zero-shot STS-B Spearman (cosine of mean-pooled embeddings, no training), held-out train rows.
Reported per objective: mean ± SD over seeds; and the paired difference minilmv2 - tinybert with its
95% t interval (an interval containing 0 is no evidence either way).

    python benchmarks/objective_quality.py [--seeds 5 --proxy-steps 200 --mappings 246]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_logs, table, write_result  # noqa: E402
from _search_measure import measure, proxy_args, proxy_from  # noqa: E402

from fastkd.search.config import ProxyConfig  # noqa: E402
from fastkd.search.rungs import Rung  # noqa: E402
from fastkd.search.verdict import paired_interval  # noqa: E402

OBJECTIVES = ("tinybert", "minilmv2")
RUNGS = (Rung("full"), Rung("zeroshot"))
# Which split each number comes from, named in the table and the JSON.
METRICS = {"sst2": "SST-2 accuracy (held-out train rows)", "stsb-zeroshot": "zero-shot STS-B Spearman (held-out train rows)"}


def per_seed(measured: dict, mapping: str) -> dict:
    """metric -> {seed: score} of one objective's students."""
    out = {}
    for rung in measured["task_scores"].values():
        for seed, scores in rung[mapping].items():
            for metric, value in scores.items():
                out.setdefault(metric, {})[seed] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    proxy_args(p, replace(ProxyConfig(), tasks=("sst2",), steps=200))  # float32: bf16 GEMMs are slow on CPUs without AVX512-BF16
    p.add_argument("--seeds", type=int, default=5, help="paired seeds (at least 2: an interval needs them)")
    p.add_argument("--relation-heads", type=int, default=None, help="minilmv2's R (default: the teacher's heads)")
    p.set_defaults(mappings="246")
    args = p.parse_args()
    if args.seeds < 2:
        p.error("--seeds must be at least 2")
    quiet_logs()
    started = time.perf_counter()
    base = proxy_from(args)
    mappings = [",".join(m) for m in args.mappings.split(",")]
    seeds = [1000 * (k + 1) for k in range(args.seeds)]
    measured = {}
    for objective in OBJECTIVES:
        cfg = replace(base, objective=objective,
                      relation_heads=args.relation_heads if objective == "minilmv2" else None)
        measured[objective] = measure(cfg, mappings, seeds, list(RUNGS), args.data_dir,
                                      log=lambda line, o=objective: print(f"{o}: {line}", flush=True))

    rows, summary = [], {}
    for mapping in mappings:
        scores = {o: per_seed(measured[o], mapping) for o in OBJECTIVES}
        for metric, label in METRICS.items():
            by_objective = {o: [scores[o][metric][s] for s in seeds] for o in OBJECTIVES}
            diff = paired_interval(by_objective["minilmv2"], by_objective["tinybert"])
            summary.setdefault(mapping, {})[metric] = {
                "split": label, **{o: {"mean": statistics.fmean(v), "sd": statistics.stdev(v), "per_seed": v}
                                   for o, v in by_objective.items()},
                "minilmv2_minus_tinybert": diff.as_dict()}
            row = {"mapping": mapping, "metric": label}
            for o, v in by_objective.items():
                row[o] = f"{statistics.fmean(v):.4f} ± {statistics.stdev(v):.4f}"
            row["minilmv2 - tinybert (95% paired)"] = f"{diff.mean:+.4f} ± {diff.half_width:.4f}"
            rows.append(row)
    print(table(rows, list(rows[0])))
    minutes = (time.perf_counter() - started) / 60
    print(f"{args.seeds} paired seeds, {base.steps} distillation steps of {base.batch_size} x {base.max_seq_len} tokens "
          f"per student, {base.finetune_steps} SST-2 fine-tuning steps; {minutes:.1f} min")
    write_result("objective_quality", {"proxy": base.as_dict(), "relation_heads": args.relation_heads,
                                       "seeds": seeds, "mappings": mappings, "summary": summary,
                                       "measured": measured, "minutes": round(minutes, 2)})


if __name__ == "__main__":
    main()
