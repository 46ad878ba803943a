"""Is the proxy fitness a signal? Fitness SD of `uniform` over seeds vs the spread over fixed mappings.

On the default teacher and a 3-layer student with the given proxy budget (default: fastkd search's
defaults): `uniform` evaluated with --seeds seeds gives the noise SD; six fixed mappings (uniform,
last, first and three others) evaluated with seed 0 give the spread (max - min). Target: spread >=
3 x SD. Also reports per-task scores, collapse and the teacher's margin over the majority class.

    python benchmarks/search_signal.py [--seeds 4 --proxy-steps 100 --finetune-steps 100 ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_result  # noqa: E402

from fastkd.corpus import load_corpus, sample_corpus  # noqa: E402
from fastkd.glue import TaskCache, evaluate, parse_tasks  # noqa: E402
from fastkd.mapping import LayerMapping, heuristic  # noqa: E402
from fastkd.models import load_teacher, load_tokenizer, student_shape  # noqa: E402
from fastkd.search.proxy import ProxyConfig, ProxyEvaluator  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OTHERS = [(1, 3, 5), (3, 4, 6), (2, 2, 6)]


def main() -> None:
    d = ProxyConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--tasks", default=",".join(d.tasks))
    p.add_argument("--sequences", type=int, default=d.sequences)
    p.add_argument("--proxy-steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--init", default=d.init)
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps)
    p.add_argument("--finetune-examples", type=int, default=d.finetune_examples)
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--finetune-seq-len", type=int, default=d.finetune_seq_len)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    cfg = ProxyConfig(sequences=args.sequences, steps=args.proxy_steps, batch_size=args.batch_size,
                      max_seq_len=args.seq_len, init=args.init, tasks=tuple(t.key for t in parse_tasks(args.tasks)),
                      finetune_steps=args.finetune_steps, finetune_examples=args.finetune_examples,
                      finetune_lr=args.finetune_lr, finetune_seq_len=args.finetune_seq_len)
    started = time.perf_counter()
    tokenizer, teacher = load_tokenizer("default"), load_teacher("default")
    with tempfile.TemporaryDirectory() as cache_dir:
        corpus = sample_corpus(load_corpus(str(Path(args.data_dir) / "corpus"), tokenizer, cfg.max_seq_len, cache_dir),
                               cfg.sequences, 0)
    tasks = parse_tasks(args.tasks)
    cache = TaskCache(str(Path(args.data_dir) / "glue"))
    teacher_results = evaluate(teacher, tokenizer, tasks, cache, cfg.finetune_config(0))
    ev = ProxyEvaluator(teacher, tokenizer, corpus, student_shape(teacher.config, 3), cfg, cache, tasks, progress=False)
    N = teacher.config.num_hidden_layers
    uniform = heuristic("uniform", 3, N)
    noise = [ev.evaluate([uniform], seed=s, chunk=1)[0] for s in range(args.seeds)]
    fixed = [heuristic(n, 3, N) for n in ("uniform", "last", "first")] + [LayerMapping(g, N) for g in OTHERS]
    spread_runs = [noise[0]] + ev.evaluate(fixed[1:], seed=0, chunk=8)
    sd = statistics.stdev(r.fitness for r in noise)
    spread = max(r.fitness for r in spread_runs) - min(r.fitness for r in spread_runs)
    rows = [{"mapping": r.mapping.text, "seed": r.seed, "fitness": round(r.fitness, 4),
             **{k: f"{100 * t['score']:.1f}{' †' if t['collapsed'] else ''}" for k, t in r.tasks.items()}}
            for r in noise + spread_runs[1:]]
    print(table(rows, ["mapping", "seed", "fitness", *[t.key for t in tasks]]))
    for k, r in teacher_results.items():
        print(f"teacher {r.task}: {100 * r.score:.1f} vs majority {100 * r.baseline_score:.1f}")
    ratio = spread / sd if sd > 0 else float("inf")
    print(f"uniform SD over {args.seeds} seeds: {sd:.4f}; spread over 6 mappings: {spread:.4f}; "
          f"spread/SD = {ratio:.2f} (target >= 3); {(time.perf_counter() - started) / 60:.1f} min")
    write_result("search_signal", {"proxy": cfg.as_dict(), "seeds": args.seeds, "sd": sd, "spread": spread,
                                   "ratio": ratio, "meets_target": ratio >= 3, "rows": rows,
                                   "teacher": {k: r.to_dict() for k, r in teacher_results.items()},
                                   "minutes": round((time.perf_counter() - started) / 60, 2)})


if __name__ == "__main__":
    main()
