"""Which objective carries the sentence embedding? (issue 23, first measurement; reported, not asserted)

The default teacher (all-MiniLM-L6-v2, a sentence-transformers model: mean pooling -> Normalize) is
distilled into the 3-layer student that keeps its layers 2, 4, 6 (teacher-initialised, mapping
2,4,6) on WikiText-2 test text, with the same steps, batch and seeds for every objective:
  - tinybert            today's default (embedding, hidden-state and attention-score MSE)
  - sentence            the sentence embedding alone (sentence-transformers' layer-reduction recipe
                        on fastkd's engine)
  - tinybert+sentence   both (--w-sentence 1 on top of tinybert)
A variant may name its corpus mode, `sentence@sentences`: one sentence per sequence (at most
--unit-seq-len tokens, length-bucketed) instead of --seq-len packed tokens.
Each exported student is judged zero-shot on STS-B dev (Spearman x 100 of the cosine of its
pipeline's embeddings, sentence-transformers' own encode), beside the untrained kept layers and the
teacher. Seeds are paired (each seed starts from the same teacher-initialised student and, within a
corpus mode, draws the same batches); the paired difference to --reference gets a 95% t interval where
there are >= 2 seeds. --reuse FILE takes the runs of an earlier result with the same settings instead
of running them again.

    python benchmarks/sentence_objective.py [--steps 200 --seq-len 64 --seeds 2]
    python benchmarks/sentence_objective.py --student-hidden 192 --name sentence_objective_narrow \
        --variants tinybert,sentence@sentences,tinybert+sentence@sentences
    python benchmarks/sentence_objective.py --variants sentence@sentences,tinybert+sentence@sentences \
        --reuse benchmarks/results/sentence_objective.json --name sentence_objective_modes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, quiet_logs, table, write_result  # noqa: E402

from fastkd.config import DistillConfig  # noqa: E402
from fastkd.distill import run_distill  # noqa: E402
from fastkd.glue import TaskCache, task_spec  # noqa: E402
from fastkd.models import resolve_model_path  # noqa: E402
from fastkd.search.verdict import paired_interval  # noqa: E402
from fastkd.sentence import zeroshot_stsb  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = {"tinybert": {"objective": "tinybert"}, "sentence": {"objective": "sentence"},
            "tinybert+sentence": {"objective": "tinybert", "w_sentence": 1.0}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64, help="tokens per packed sequence")
    p.add_argument("--unit-seq-len", type=int, default=128, help="the longest sentence kept, in the sentences mode")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--student-hidden", type=int, default=None,
                   help="a narrower student (teacher-initialised from the first rows; the sentence term learns a "
                        "projection to the teacher's width, exported as its pipeline's Dense)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--corpus", default=str(SHARED / "corpus" / "wikitext-2-raw-test.txt"))
    p.add_argument("--data-dir", default=str(SHARED / "glue"))
    p.add_argument("--reference", default="tinybert", help="the variant every other one is compared with")
    p.add_argument("--reuse", help="an earlier result JSON whose runs (same settings) are taken, not rerun")
    p.add_argument("--name", default="sentence_objective", help="results/NAME.json")
    args = p.parse_args()
    quiet_logs()
    started = time.perf_counter()
    dev = TaskCache(args.data_dir).data(task_spec("stsb")).dev[0]
    teacher = resolve_model_path("default")
    rows, scores = reused_runs(args)
    for row in rows:
        scores.setdefault(row["variant"], {})[row["seed"]] = row["stsb_dev_spearman"]
    scores["teacher"] = {0: 100 * zeroshot_stsb(teacher, dev)["spearman"]}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name in args.variants.split(","):
                recipe, _, mode = name.partition("@")
                cfg = DistillConfig(output=f"{tmp}/{recipe}-{mode}-{seed}", corpus=args.corpus, mapping="2,4,6",
                                    max_steps=args.steps, batch_size=args.batch_size,
                                    max_seq_len=args.unit_seq_len if mode else args.seq_len, corpus_mode=mode or "packed",
                                    lr=args.lr, seed=seed, progress=False, checkpoint_every=10 ** 9,
                                    student_hidden=args.student_hidden,
                                    **VARIANTS[recipe])
                t0 = time.perf_counter()
                student = run_distill(cfg)
                seconds = time.perf_counter() - t0
                scores.setdefault(name, {})[seed] = 100 * zeroshot_stsb(student, dev)["spearman"]
                print(f"seed {seed} {name}: STS-B dev zero-shot {scores[name][seed]:.2f} ({seconds:.0f} s)", flush=True)
                rows.append({"variant": name, "seed": seed, "stsb_dev_spearman": scores[name][seed],
                             "seconds": round(seconds, 1)})
    summary = []
    for name, by_seed in scores.items():
        values = list(by_seed.values())
        line = {"variant": name, "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else None, "seeds": len(values)}
        ref = scores.get(args.reference, {})
        paired = sorted(set(by_seed) & set(ref))
        if name not in ("teacher", args.reference) and len(paired) > 1:
            iv = paired_interval([by_seed[s] for s in paired], [ref[s] for s in paired])
            line["minus_reference"] = {"mean": iv.mean, "low": iv.mean - iv.half_width, "high": iv.mean + iv.half_width}
        summary.append(line)
    shown = [{"variant": s["variant"], "STS-B dev zero-shot": f"{s['mean']:.2f}",
              "SD": "-" if s["sd"] is None else f"{s['sd']:.2f}", "seeds": s["seeds"],
              f"minus {args.reference} (95% CI)": "-" if "minus_reference" not in s else
              f"{s['minus_reference']['mean']:+.2f} [{s['minus_reference']['low']:+.2f}, {s['minus_reference']['high']:+.2f}]"}
             for s in summary]
    print(table(shown, list(shown[0])))
    write_result(args.name, {
        "machine": machine(), "split": "STS-B dev (zero-shot, Spearman x 100)",
        "settings": {k: v for k, v in vars(args).items()}, "runs": rows, "summary": summary,
        "minutes": round((time.perf_counter() - started) / 60, 1)})


def reused_runs(args) -> tuple[list, dict]:
    """The runs of --reuse whose settings match this invocation's (those that decide a run's score)."""
    if not args.reuse:
        return [], {}
    import json

    earlier = json.loads(Path(args.reuse).read_text())
    decisive = ("steps", "batch_size", "seq_len", "lr", "corpus", "student_hidden")
    differ = [k for k in decisive if earlier["settings"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--reuse {args.reuse}: its runs differ in {', '.join(differ)}; run them again instead")
    return [r for r in earlier["runs"] if r["seed"] < args.seeds], {}


if __name__ == "__main__":
    main()
