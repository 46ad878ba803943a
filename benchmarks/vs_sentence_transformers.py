"""sentence-transformers' own layer-reduction distillation vs fastkd's, at equal wall-clock (issue 23, item 4;
reported, not asserted)

sentence-transformers' recipe (examples/sentence_transformer/training/distillation/
model_distillation_layer_reduction.py), run by the real library: the student is the teacher with only --layers
of its layers kept (fastkd's uniform mapping, so 6 -> 3 keeps layers 2,4,6 and 12 -> 4 keeps 3,6,9,12), the
teacher labels the training sentences once (teacher.encode), and SentenceTransformerTrainer trains
losses.MSELoss to reproduce those embeddings (lr 1e-4, batch 64, warmup 0.1; the library's other defaults).
Beside it fastkd's engine distills the same teacher into the same kept layers with its sentence objective
(--fastkd-variants: also tinybert+sentence) in --corpus-mode sentences, with the same lr, batch and warmup;
its teacher labels the corpus once where a run reads it 1.5 times or more (the sentence objective alone),
else runs every step. Both see the same sentences: fastkd.corpus's own functions split the same
corpus file (read_paragraphs, text_units) and those longer than --max-seq-len tokens are dropped.

Equal wall-clock: neither trainer stops on a clock, so each recipe is first timed for --calibrate-steps steps
after as many warm-up steps (their extra time is counted once) and each of --budgets (seconds) becomes steps
for each side. The labelling is
part of sentence-transformers' cost: each of its runs labels the sentences it trains on (teacher.encode,
timed, charged to its budget): a seeded random draw of steps x 64 of them for one epoch when the budget
pays for fewer than the corpus holds, else all of them, for the steps the rest of the budget pays for.
Timed on both sides: the step loop (fastkd: the engine's seconds, the teacher's forward or labels included; for
sentence-transformers from train begin to the last step) plus that labelling; setup (loading the models and
the cached corpus, exporting) is left out of both and reported apart as wall_s.
Judges, identical for both: STS-B dev zero-shot (Spearman x 100 of the cosine, sentence-transformers' own
encode: fastkd.sentence.zeroshot_stsb) and SST-2 dev accuracy x 100 after fastkd glue's short fine-tune.
Seeds are paired (seed s on both sides); fastkd - sentence-transformers gets a 95% paired t interval with >= 2
seeds. The teacher and the untrained kept layers are scored too. Where an earlier result of this benchmark
holds the teacher's SST-2 scores for as many seeds under the same recipe (settings.sst2_recipe: teacher, data,
the whole fine-tune config, device), they are taken from it and named in references.teacher.sst2_from (the
kept layers do not change the teacher; --measure-teacher-sst2 measures them anyway). Needs sentence-transformers
and accelerate (SentenceTransformerTrainer's requirement), both in the dev extra make install installs.

    python benchmarks/vs_sentence_transformers.py [--teacher default --layers 3 --budgets 150,300,600 --seeds 2]
    python benchmarks/vs_sentence_transformers.py --teacher mpnet-base --layers 4 --no-sst2 --name vs_st_mpnet
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, fresh_label_store, machine, quiet_logs, table, write_result  # noqa: E402

from fastkd import zoo  # noqa: E402
from fastkd.config import DistillConfig  # noqa: E402
from fastkd.corpus import corpus_files, read_paragraphs, text_units  # noqa: E402
from fastkd.device import pick_device  # noqa: E402
from fastkd.distill import run_distill  # noqa: E402
from fastkd.glue import TaskCache, task_spec  # noqa: E402
from fastkd.glue.config import FinetuneConfig  # noqa: E402
from fastkd.glue.finetune import evaluate
from fastkd.mapping import heuristic  # noqa: E402
from fastkd.models import DEFAULT_TEACHER, load_config, load_tokenizer, resolve_model_path  # noqa: E402
from fastkd.search.verdict import paired_interval  # noqa: E402
from fastkd.sentence import zeroshot_stsb  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH, LR, WARMUP = 64, 1e-4, 0.1  # the sentence-transformers example's, used by both sides
ST = "sentence-transformers"
VARIANTS = {"sentence": {"objective": "sentence"}, "tinybert+sentence": {"objective": "tinybert", "w_sentence": 1.0}}


def sst2_config(args, seed: int) -> FinetuneConfig:
    """The short SST-2 fine-tune that judges every model of this benchmark."""
    return FinetuneConfig(max_steps=args.sst2_steps, max_train_examples=args.sst2_examples, lr=args.sst2_lr,
                          max_seq_len=args.sst2_seq_len, seed=seed, progress=False)


def sst2_recipe(args) -> dict:
    """Everything the teacher's SST-2 scores depend on besides the seed: the teacher, the data, the whole
    fine-tune config (its defaults included) and the device it runs on. (Not the kept layers.)"""
    cfg = {k: v for k, v in asdict(sst2_config(args, 0)).items() if k not in ("seed", "progress")}
    return {"teacher": args.teacher, "data_dir": args.data_dir, "finetune": cfg,
            "device": pick_device(cfg["device"]).type}


def earlier_teacher_sst2(args, recipe: dict) -> tuple[list[float], str] | None:
    """The teacher's SST-2 scores (seeds 0..--seeds-1) from an earlier result of this benchmark with the same
    recipe (two fine-tunes of the 12-layer teacher take 20 minutes here), and where they were measured. Only
    for a teacher fastkd builds itself: a local folder may hold other weights by the next run."""
    if args.teacher not in (DEFAULT_TEACHER, zoo.MPNET_BASE) or Path(args.teacher).exists():
        return None
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem == args.name:  # this run's own file, about to be rewritten
            continue
        try:
            earlier = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not (isinstance(earlier, dict) and {"calibration", "references", "settings"} <= earlier.keys()):
            continue  # another benchmark's result
        teacher = (earlier["references"] or {}).get("teacher") or {}
        scores = teacher.get("sst2") or []
        if (earlier["settings"].get("sst2_recipe") == recipe and len(scores) >= args.seeds
                and None not in scores):
            cpu = (earlier.get("machine") or {}).get("cpu", "an unnamed machine")
            # (scores reused in turn keep the name of the run that measured them)
            measured_in = f"results/{path.name} ({earlier.get('date')}, {cpu})"
            return scores[:args.seeds], teacher.get("sst2_from") or measured_in
    return None


def corpus_sentences(corpus: str, tokenizer, max_seq_len: int) -> list[str]:
    """The sentences fastkd's `--corpus-mode sentences` trains on: its own split, the same length limit."""
    units = [u for p in read_paragraphs(corpus_files(corpus)) for u in text_units(p, "sentences")]
    ids = tokenizer(units, add_special_tokens=False, verbose=False)["input_ids"]
    return [u for u, i in zip(units, ids) if 0 < len(i) <= max_seq_len - 2]


def st_student(teacher: str, keep: list[int], max_seq_len: int):
    """The example's student: the teacher with only the kept layers (0-based) of its encoder."""
    import torch
    from sentence_transformers.sentence_transformer import SentenceTransformer

    student = SentenceTransformer(teacher)
    student.max_seq_length = max_seq_len
    auto = student[0].auto_model
    auto.encoder.layer = torch.nn.ModuleList([m for i, m in enumerate(auto.encoder.layer) if i in keep])
    auto.config.num_hidden_layers = len(keep)
    return student


def st_train(student, data, steps: int, seed: int, out: str) -> tuple[list[float], list[float]]:
    """SentenceTransformerTrainer + losses.MSELoss for `steps` steps: (step-end times from train begin, losses)."""
    from sentence_transformers.sentence_transformer import (SentenceTransformerTrainer,
                                                            SentenceTransformerTrainingArguments, losses)
    from transformers import PrinterCallback, TrainerCallback

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times[:] = [time.perf_counter()]

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    targs = SentenceTransformerTrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR, warmup_steps=WARMUP,
        seed=seed, save_strategy="no", report_to="none", logging_steps=max(1, steps // 10), disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=student, args=targs, train_dataset=data,
                                         loss=losses.MSELoss(model=student), callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [t - times[0] for t in times], [r["loss"] for r in trainer.state.log_history if "loss" in r]


def st_data(encoder, sentences: list[str], count: int, seed: int):
    """The example's dataset: `count` sentences (a seeded draw) and their teacher embeddings, labelled now
    with teacher.encode; and the seconds the labelling took."""
    import datasets

    chosen = [sentences[i] for i in np.sort(np.random.default_rng(seed).permutation(len(sentences))[:count])]
    t0 = time.perf_counter()
    labels = encoder.encode(chosen, batch_size=BATCH, convert_to_numpy=True, show_progress_bar=False)
    seconds = time.perf_counter() - t0
    return datasets.Dataset.from_dict({"sentence": chosen, "label": labels}), seconds


def fastkd_train(args, teacher: str, mapping: str, variant: str, steps: int, seed: int, out: str,
                 log_every: int | None = None, labels: bool | None = None) -> tuple[Path, dict, list[dict]]:
    """One fastkd run; `labels` True/False forces the teacher's labels on or off (a calibration of either
    route), None leaves the choice to fastkd (as a user gets it)."""
    import fastkd.teacher

    saved = fastkd.teacher.LABELS_MIN_EPOCHS
    if labels is not None:
        fastkd.teacher.LABELS_MIN_EPOCHS = 0.0 if labels else float("inf")
    try:
        return _fastkd_train(args, teacher, mapping, variant, steps, seed, out, log_every)
    finally:
        fastkd.teacher.LABELS_MIN_EPOCHS = saved


def _fastkd_train(args, teacher, mapping, variant, steps, seed, out, log_every):
    with fresh_label_store() as cache_dir:  # each run labels its corpus itself, as each peer run does
        cfg = DistillConfig(output=out, corpus=args.corpus, teacher=teacher, mapping=mapping,
                            student_layers=args.layers, corpus_mode="sentences", max_seq_len=args.max_seq_len,
                            max_steps=steps, batch_size=BATCH, lr=LR, warmup=WARMUP, seed=seed, progress=False,
                            checkpoint_every=10 ** 9, log_every=log_every or max(1, steps // 10), cache_dir=cache_dir,
                            **VARIANTS[variant])
        student = run_distill(cfg)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return student, json.loads((student / "fastkd.json").read_text()), rows


def mean_ci(a: list[float], b: list[float]) -> dict:
    iv = paired_interval(a, b)
    return {"mean": iv.mean, "low": iv.mean - iv.half_width, "high": iv.mean + iv.half_width, "n": iv.n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="default", help="default (all-MiniLM-L6-v2) or mpnet-base (all-mpnet-base-v2)")
    p.add_argument("--layers", type=int, default=3, help="teacher layers kept (fastkd's uniform mapping)")
    p.add_argument("--budgets", default="150,300,600", help="seconds of training per run, comma-separated")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--fastkd-variants", default="sentence", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--max-seq-len", type=int, default=128, help="the longest sentence kept, in tokens")
    p.add_argument("--calibrate-steps", type=int, default=8, help="steps timed per recipe (after as many warm-up)")
    p.add_argument("--corpus", default=str(SHARED / "corpus" / "wikitext-2-raw-test.txt"))
    p.add_argument("--data-dir", default=str(SHARED / "glue"))
    p.add_argument("--no-sst2", action="store_true", help="skip the SST-2 fine-tune")
    p.add_argument("--sst2-steps", type=int, default=150)
    p.add_argument("--sst2-examples", type=int, default=3000)
    p.add_argument("--sst2-lr", type=float, default=1e-4)
    p.add_argument("--sst2-seq-len", type=int, default=64)
    p.add_argument("--measure-teacher-sst2", action="store_true",
                   help="fine-tune the teacher on SST-2 even where an earlier result with the same recipe holds "
                        "its scores")
    p.add_argument("--name", default="vs_sentence_transformers", help="results/NAME.json (an absolute NAME: NAME.json)")
    args = p.parse_args()
    quiet_logs()
    from sentence_transformers.sentence_transformer import SentenceTransformer

    started = time.perf_counter()
    variants = args.fastkd_variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--fastkd-variants: unknown {', '.join(unknown)} (use {', '.join(VARIANTS)})")
    budgets = [float(b) for b in args.budgets.split(",")]
    teacher = resolve_model_path(args.teacher)
    mapping = heuristic("uniform", args.layers, load_config(teacher).num_hidden_layers).text
    keep = [int(g) - 1 for g in mapping.split(",")]
    cache = TaskCache(args.data_dir)
    dev = cache.data(task_spec("stsb")).dev[0]

    def stsb(path) -> float:
        return 100 * zeroshot_stsb(path, dev, max_seq_len=args.max_seq_len)["spearman"]

    def sst2(path, seed: int) -> float | None:
        if args.no_sst2:
            return None
        result = evaluate(str(path), load_tokenizer(str(path), "model"), [task_spec("sst2")], cache,
                          sst2_config(args, seed))
        return 100 * next(iter(result.values())).score

    sentences = corpus_sentences(args.corpus, load_tokenizer(teacher), args.max_seq_len)
    encoder = SentenceTransformer(teacher)  # the labelling teacher
    encoder.max_seq_length = args.max_seq_len
    encoder.encode(sentences[:BATCH], batch_size=BATCH, show_progress_bar=False)  # warm-up
    print(f"{len(sentences)} sentences, kept layers {mapping}", flush=True)
    refs, runs, calibration = {"teacher": {"stsb": stsb(teacher)}, "untrained": {}}, [], {}
    settings = {**vars(args), "teacher_path": teacher, "mapping": mapping, "sentences": len(sentences),
                "batch_size": BATCH, "lr": LR, "warmup": WARMUP, "sst2_recipe": sst2_recipe(args)}

    def save(final: bool = False) -> Path:
        return write_result(args.name, {
            "machine": machine(), "settings": settings, "complete": final, "calibration": calibration,
            "judges": "STS-B dev zero-shot Spearman x100; SST-2 dev accuracy x100 after fastkd glue's fine-tune",
            "references": refs, "runs": runs, "summary": summarize(runs, variants) if final else None,
            "minutes": round((time.perf_counter() - started) / 60, 1)})

    with tempfile.TemporaryDirectory() as tmp:
        untrained = st_student(teacher, keep, args.max_seq_len)
        untrained.save(f"{tmp}/untrained")
        refs["untrained"]["stsb"] = stsb(f"{tmp}/untrained")
        k = args.calibrate_steps
        data, label_s = st_data(encoder, sentences, 2 * k * BATCH, 0)
        times, _ = st_train(untrained, data, 2 * k, 0, f"{tmp}/cal-st")
        step_s = (times[2 * k] - times[k]) / k
        calibration[ST] = {"step_s": step_s, "first_s": max(0.0, times[k] - k * step_s),
                           "label_s_per_sentence": label_s / (2 * k * BATCH)}
        for v in variants:
            _, info, rows = fastkd_train(args, teacher, mapping, v, 2 * k, 0, f"{tmp}/cal-{v}", log_every=k,
                                         labels=False)
            step_s = BATCH / rows[1]["seq_per_s"]
            calibration[v] = {"step_s": step_s, "first_s": max(0.0, info["seconds"] - 2 * k * step_s)}
            if VARIANTS[v] == {"objective": "sentence"}:  # the route fastkd takes when the run reads the corpus twice
                _, info, rows = fastkd_train(args, teacher, mapping, v, 2 * k, 0, f"{tmp}/cal-{v}-labels",
                                             log_every=k, labels=True)
                step_s = BATCH / rows[1]["seq_per_s"]
                calibration[v]["labelled"] = {"step_s": step_s, "label_s": info["teacher_labels_s"],
                                              "first_s": max(0.0, info["seconds"] - 2 * k * step_s)}
        print("calibration: " + ", ".join(f"{n} {c['step_s']:.3f} s/step (+{c['first_s']:.1f} s once)"
                                          for n, c in calibration.items()), flush=True)
        if not args.no_sst2:
            kept = None if args.measure_teacher_sst2 else earlier_teacher_sst2(args, settings["sst2_recipe"])
            if kept:
                refs["teacher"]["sst2"], refs["teacher"]["sst2_from"] = kept
            else:
                refs["teacher"]["sst2"] = [sst2(teacher, s) for s in range(args.seeds)]
            refs["untrained"]["sst2"] = [sst2(f"{tmp}/untrained", s) for s in range(args.seeds)]
        print(f"teacher {refs['teacher']}; untrained kept layers {refs['untrained']}", flush=True)
        for budget in budgets:
            for seed in range(args.seeds):
                out = f"{tmp}/st-{budget:g}-{seed}"
                step_s, label_each = calibration[ST]["step_s"], calibration[ST]["label_s_per_sentence"]
                left = budget - calibration[ST]["first_s"]  # the first steps' extra time (warm-up) is paid once
                steps = int(left / (step_s + BATCH * label_each))
                if steps * BATCH >= len(sentences):  # every sentence labelled: the rest of the budget trains
                    steps = int((left - len(sentences) * label_each) / step_s)
                steps = max(1, steps)
                used = min(len(sentences), steps * BATCH)
                t0 = time.perf_counter()
                data, label_s = st_data(encoder, sentences, used, seed)
                student = st_student(teacher, keep, args.max_seq_len)
                times, loss = st_train(student, data, steps, seed, out)
                student.save(f"{out}/student")
                runs.append({"side": ST, "budget_s": budget, "seed": seed, "steps": steps,
                             "sentences_seen": steps * BATCH, "distinct_sentences": used,
                             "train_s": round(times[-1], 1), "label_s": round(label_s, 1),
                             "seconds": round(times[-1] + label_s, 1),
                             "wall_s": round(time.perf_counter() - t0, 1),
                             "loss_first": loss[0], "loss_last": loss[-1],
                             "stsb": stsb(f"{out}/student"), "sst2": sst2(f"{out}/student", seed)})
                print(json.dumps(runs[-1]), flush=True)
                for v in variants:
                    steps = max(1, round((budget - calibration[v]["first_s"]) / calibration[v]["step_s"]))
                    lab = calibration[v].get("labelled")
                    if lab is not None:  # labelled once, if the budget then reads the corpus 1.5 times or more
                        labelled = int((budget - lab["first_s"] - lab["label_s"]) / lab["step_s"])
                        if labelled * BATCH >= 1.5 * len(sentences):
                            steps = labelled
                    route = None if lab is None else steps == labelled  # the calibrated route, no other
                    t0 = time.perf_counter()
                    student, info, rows = fastkd_train(args, teacher, mapping, v, steps, seed,
                                                       f"{tmp}/{v}-{budget:g}-{seed}", labels=route)
                    runs.append({"side": v, "budget_s": budget, "seed": seed, "steps": steps,
                                 "sentences_seen": steps * BATCH, "train_s": info["seconds"],
                                 "label_s": info.get("teacher_labels_s", 0.0),
                                 "seconds": round(info["seconds"] + info.get("teacher_labels_s", 0.0), 1),
                                 "wall_s": round(time.perf_counter() - t0, 1),
                                 "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                                 "stsb": stsb(student), "sst2": sst2(student, seed)})
                    print(json.dumps(runs[-1]), flush=True)
                save()
    path = save(final=True)
    summary = summarize(runs, variants)
    shown = [{"budget s": f"{s['budget_s']:g}", "side": s["side"], "seconds": f"{s['seconds']:.0f}",
              "steps": f"{s['steps']:.0f}", "STS-B": f"{s['stsb']:.2f}",
              "SST-2": "-" if s["sst2"] is None else f"{s['sst2']:.1f}",
              **{f"{j} minus ST (95% CI)": ci_text(s.get(f"{key}_minus_st"))
                 for j, key in (("STS-B", "stsb"), ("SST-2", "sst2"))}}
             for s in summary]
    print(f"teacher {refs['teacher']}; untrained kept layers {refs['untrained']}")
    print(table(shown, list(shown[0])))
    print(f"wrote {path}")


def summarize(runs: list[dict], variants: list[str]) -> list[dict]:
    """Per budget and side: means over seeds, and for fastkd the paired difference to sentence-transformers."""
    out = []
    for budget in sorted({r["budget_s"] for r in runs}):
        by_side = {side: {r["seed"]: r for r in runs if r["budget_s"] == budget and r["side"] == side}
                   for side in [ST, *variants]}
        for side, rows in by_side.items():
            if not rows:
                continue
            mean = lambda key: None if any(r[key] is None for r in rows.values()) else statistics.fmean(  # noqa: E731
                r[key] for r in rows.values())
            line = {"budget_s": budget, "side": side, "seeds": len(rows), "seconds": mean("seconds"),
                    "steps": mean("steps"), "stsb": mean("stsb"), "sst2": mean("sst2")}
            paired = sorted(set(rows) & set(by_side[ST]))
            if side != ST and paired:
                for key in ("stsb", "sst2"):
                    if line[key] is not None:
                        line[f"{key}_minus_st"] = mean_ci([rows[s][key] for s in paired],
                                                          [by_side[ST][s][key] for s in paired])
            out.append(line)
    return out


def ci_text(d: dict | None) -> str:
    if not d:
        return "-"
    if d["n"] < 2:
        return f"{d['mean']:+.2f} (1 seed)"
    if d["low"] == d["high"]:  # the same difference on every seed: a t interval of width 0 claims too much
        return f"{d['mean']:+.2f} (the same on all {d['n']} seeds)"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


if __name__ == "__main__":
    main()
