"""Which task head lets `fastkd glue` measure a student? (issue 23, item 3; reported, not asserted)

At the demo's GLUE budget (80 steps, 1920 training examples, max length 64, batch 32, bf16 where
native) the default teacher (all-MiniLM-L6-v2) and two distilled 3-layer students (mapping 2,4,6,
200 steps on WikiText-2 test: the tinybert objective and the sentence objective) are fine-tuned on
STS-B, SST-2 and MRPC (official dev sets) with each head of fastkd.glue.config.HEADS:
  - pooler          the copied CLS pooler (dense + tanh) and the family's classifier (before: the only one)
  - pooler-reinit   the same with a fresh pooler
  - mean            masked mean of the last hidden states -> dropout -> one linear layer
  - pipeline        the pooling mode of the model's sentence-transformers pipeline -> dropout -> linear
                    (here mean: the same as `mean`; results/glue_heads.json's "pipeline+normalize" rows
                    are its first version, which kept the pipeline's Normalize)
at each learning rate of --lrs, over --seeds fine-tuning seeds, with STS-B's output bias started
where --regression-bias says (label-mean, the default now; zero, the recipe before). Then, if
--long-steps, the best head (mean STS-B score over models, at its best learning rate) again at that
rate with that many steps. Each model's zero-shot STS-B (cosine of mean-pooled embeddings, no
training: the demo's column) is measured alongside: what a fine-tuning recipe should preserve, the
students' relation to the teacher. Results are written after every run; --resume continues a stopped
measurement. On a shared CPU, several single-thread workers (--threads 1, one --name each, a part of
the grid each) run faster than one; --merge then writes their runs into results/glue_heads.json.

Make the students first (a few minutes each), e.g.
    fastkd distill --corpus ../shared/data/corpus/wikitext-2-raw-test.txt --mapping 2,4,6 --max-steps 200 \\
        --batch-size 32 --max-seq-len 64 --objective tinybert --output /tmp/glue_heads/tinybert --no-progress
    (and --objective sentence --output /tmp/glue_heads/sentence)

    python benchmarks/glue_heads.py [--models default,/tmp/glue_heads/tinybert/student,...] [--resume]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, quiet_logs, table, write_result  # noqa: E402

from fastkd.device import bf16_is_native, pick_device  # noqa: E402
from fastkd.glue.config import HEADS, FinetuneConfig  # noqa: E402
from fastkd.glue.data import TaskCache  # noqa: E402
from fastkd.glue.finetune import finetune_task
from fastkd.glue.probe import zero_shot_similarity  # noqa: E402
from fastkd.glue.tasks import task_spec  # noqa: E402
from fastkd.models import load_encoder, load_tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NAME = "glue_heads"
STUDENTS = "/tmp/glue_heads/tinybert/student,/tmp/glue_heads/sentence/student"


def _key(run: dict) -> tuple:
    return (run["model"], run["task"], run["head"], run.get("regression_bias", "zero"), run["lr"], run["steps"],
            run["seed"])


def summarize(runs: list[dict]) -> list[dict]:
    """Mean (and SD) over seeds per (model, task, head, lr, steps), score x100."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(_key(r)[:6], []).append(r)
    out = []
    for (model, task, head, bias, lr, steps), rs in groups.items():
        scores = [100 * r["score"] for r in rs]
        out.append({"model": model, "task": task, "head": head, "regression_bias": bias, "lr": lr, "steps": steps,
                    "seeds": len(rs),
                    "mean": round(statistics.fmean(scores), 2),
                    "sd": round(statistics.stdev(scores), 2) if len(scores) > 1 else None,
                    "collapsed_seeds": sum(r["collapsed"] for r in rs)})
    return out


def best_head(summary: list[dict], steps: int, bias: str) -> tuple[str, float]:
    """The head with the best mean STS-B score over models (at its best lr), and that lr."""
    by: dict[tuple, list[float]] = {}
    for s in summary:
        if s["steps"] == steps and s["task"] == "stsb" and s["regression_bias"] == bias:
            by.setdefault((s["head"], s["lr"]), []).append(s["mean"])
    (head, lr), _ = max(by.items(), key=lambda kv: statistics.fmean(kv[1]))
    return head, lr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="default," + STUDENTS)
    p.add_argument("--tasks", default="stsb,sst2,mrpc", help="in this order: the question is STS-B's")
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--other-heads", default="", help="heads for the tasks other than STS-B (default: --heads); "
                                                     "a shorter list where the CPU is shared")
    p.add_argument("--other-seeds", type=int, default=0, help="seeds for the tasks other than STS-B (0: --seeds)")
    p.add_argument("--regression-bias", default="label-mean", choices=("label-mean", "zero"),
                   help="where STS-B's output bias starts (the runs before this setting existed: zero)")
    p.add_argument("--lrs", default="1.5e-4,5e-4")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--long-steps", type=int, default=240, help="the best head again with this many steps (0: no)")
    p.add_argument("--long-tasks", default="stsb,sst2,mrpc", help="tasks of the --long-steps runs")
    p.add_argument("--examples", type=int, default=1920)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-dir", default=str(SHARED / "glue"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice; 1 on a CPU shared "
                                                            "with other jobs, where 2 spinning threads crawl)")
    p.add_argument("--resume", action="store_true", help="keep the runs of results/NAME.json and add the rest")
    p.add_argument("--name", default=NAME, help="results/NAME.json (one per worker where several share the grid)")
    p.add_argument("--note", default="", help="a note kept in the results (e.g. how a shared CPU cut the grid)")
    p.add_argument("--relabel", default="", help="OLD=NEW: runs of head OLD in the kept results are shown as NEW "
                                                 "(a head whose definition changed after they ran)")
    p.add_argument("--merge", default="", help="comma-separated results/*.json of other workers: their runs count "
                                               "as done and are written into results/NAME.json")
    args = p.parse_args()
    quiet_logs()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bf16 = bf16_is_native(pick_device("auto"))  # as the demo: bf16 where native, else float32
    models = args.models.split(",")
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "name", "merge", "note", "relabel")}
    settings["bf16"] = bf16
    if args.merge:  # the grid is the union of the workers' runs (listed), not this call's flags
        settings = {k: settings[k] for k in ("examples", "seq_len", "batch_size", "data_dir", "bf16", "threads")}
    runs: list[dict] = []
    zero_shot: dict = {}
    path = RESULTS / f"{args.name}.json"
    for source in ([path] if args.resume and path.is_file() else []) + [Path(f) for f in args.merge.split(",") if f]:
        saved = json.loads(source.read_text())
        known = {_key(r) for r in runs}
        runs += [r for r in saved.get("runs", []) if _key(r) not in known]
        zero_shot = {**saved.get("zero_shot_stsb", {}), **zero_shot}
    if args.relabel:
        old, new = args.relabel.split("=")
        runs = [{**r, "head": new} if r["head"] == old else r for r in runs]
    done = {_key(r) for r in runs}
    cache = TaskCache(args.data_dir)
    tokenizers = {m: load_tokenizer(m, "model") for m in models}

    def save(final: bool = False) -> None:
        summary = summarize(runs)
        write_result(args.name, {"machine": machine(), "settings": settings, "split": "official dev sets, score x100",
                            "complete": final, "note": args.note, "zero_shot_stsb": zero_shot, "runs": runs, "summary": summary,
                            "minutes": round((time.perf_counter() - started) / 60, 1)})

    for model in models:
        if model not in zero_shot:
            r = zero_shot_similarity(load_encoder(model), tokenizers[model], cache,
                                     FinetuneConfig(heldout=0, max_seq_len=args.seq_len, bf16=bf16, progress=False))
            zero_shot[model] = {k: round(100 * v, 2) for k, v in r.metrics.items()}
            print(f"{model}: zero-shot STS-B {zero_shot[model]}", flush=True)

    def run(model: str, task: str, head: str, lr: float, steps: int, seed: int) -> None:
        if (model, task, head, args.regression_bias, lr, steps, seed) in done:
            return
        cfg = FinetuneConfig(max_steps=steps, max_train_examples=args.examples, batch_size=args.batch_size, lr=lr,
                             max_seq_len=args.seq_len, seed=seed, bf16=bf16, progress=False, head=head,
                             regression_bias=args.regression_bias)
        result = finetune_task(model, tokenizers[model], task_spec(task), cache, cfg)
        collapsed = any(s.get("majority_prediction_fraction", 0) >= 0.95 for s in result.predictions.values())
        runs.append({"model": model, "task": task, "head": head, "regression_bias": args.regression_bias, "lr": lr,
                     "steps": steps, "seed": seed,
                     "score": result.score, "metrics": result.metrics, "collapsed": collapsed,
                     "seconds": result.seconds})
        print(f"{model} {task} {head} bias {args.regression_bias} lr {lr:g} {steps} steps seed {seed}: "
              f"{100 * result.score:.1f} "
              f"({result.seconds:.0f} s)", flush=True)
        save()

    lrs = [float(x) for x in args.lrs.split(",")]
    # Task outermost (STS-B first: the question), then seeds: a stopped run has every cell of the
    # tasks it reached once before any twice.
    for task in args.tasks.split(","):
        heads = (args.heads if task == "stsb" or not args.other_heads else args.other_heads).split(",")
        for seed in range(args.seeds if task == "stsb" or not args.other_seeds else args.other_seeds):
            for model in models:
                for head in heads:
                    for lr in lrs:
                        run(model, task, head, lr, args.steps, seed)
    if args.long_steps:
        head, lr = best_head(summarize(runs), args.steps, args.regression_bias)
        settings["long"] = {"head": head, "lr": lr, "steps": args.long_steps}
        print(f"best head at {args.steps} steps: {head}, lr {lr:g}; again with {args.long_steps} steps", flush=True)
        for task in args.long_tasks.split(","):
            for seed in range(args.seeds):
                for model in models:
                    run(model, task, head, lr, args.long_steps, seed)
    save(final=True)
    shown = [{"model": s["model"].replace("/tmp/glue_heads/", "").replace("/student", ""), "task": s["task"],
              "head": s["head"], "bias": s["regression_bias"] if s["task"] == "stsb" else "-", "lr": f"{s['lr']:g}", "steps": s["steps"], "mean": f"{s['mean']:.1f}",
              "SD": "-" if s["sd"] is None else f"{s['sd']:.1f}", "collapsed": s["collapsed_seeds"]}
             for s in sorted(summarize(runs), key=lambda s: (s["task"], s["model"], s["head"], s["regression_bias"],
                                                              s["lr"], s["steps"]))]
    print(table(shown, list(shown[0])))
    print(f"zero-shot STS-B: {zero_shot}; {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
