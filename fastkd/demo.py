"""`fastkd demo`: the whole pipeline on the default teacher.

search (3-layer student) -> full distillation with the winner and with uniform and last -> one GLUE
table of the students beside the teacher (mean ± SD over fine-tuning seeds, official dev sets),
with the search's paired verdict. Every stage writes into its own folder under --output and
resumes, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .config import DemoConfig, DistillConfig
from .device import bf16_absence, bf16_is_native, pick_device
from .distill import run_distill
from .errors import UserError
from .glue.config import FinetuneConfig, GlueConfig
from .glue.finetune import TaskCache
from .glue.report import HEADERS, SHOWN, collapsed
from .glue.run import run_glue
from .glue.tasks import TASKS
from .io import atomic_write_json, atomic_write_text
from .rundir import check_writable_dir
from .mapping import LayerMapping, heuristic
from .models import load_config
from .options import MAX_SEED, seed_problem
from .search.report import verdict_lines
from .search.config import SEED_STRIDE, ProxyConfig, SearchConfig
from .search.run import Search

log = logging.getLogger(__name__)

TEACHER_MARGIN = 0.05  # a final-table task must let the teacher beat the majority class by this much


@dataclass(frozen=True)
class Budget:
    proxy: ProxyConfig
    population: int
    generations: int
    ladder: str
    promote: float
    verdict_seeds: int
    drop_weak_tasks: bool
    distill_steps: int
    distill_batch: int
    distill_seq_len: int
    glue_tasks: str
    glue_steps: int
    glue_examples: int
    glue_seq_len: int
    glue_lr: float
    bf16: bool  # final distillation and GLUE (the proxy's own flag covers the search)
    glue_seeds: int = 2  # fine-tuning seeds of the final table (mean ± SD)
    glue_head: str = "biencoder"  # see the budgets' comment


# Sized for 2 CPU cores with bf16 (AVX512-BF16): full <= 15 minutes, quick <= 5 (measured: README).
# Proxy: SST-2 only, scored on a 2000-row held-out slice of its train set. MRPC and RTE carry no
# signal at this budget (the teacher itself stays within 5 points of the majority class, measured),
# so fine-tuning candidates on them would add noise and cost only. Small students learn SST-2 in 40
# steps only at a high learning rate: 1e-4 left them near chance, 3e-4 made good mappings collapse
# on some seeds, 2e-4 was stable. Ladder: the GA runs on zero-shot STS-B similarity (forward passes
# only, Spearman 0.57 with the fine-tuning rung on one seed of 8 mappings; the linear probe ranked
# them in the opposite order, -0.5), and the best quarter plus uniform and last climb to fine-tuning.
# Four held-out verdict seeds: with a paired SD near 0.008 the 95% half-width is about 1.6 SD.
# Final table: SST-2 and STS-B, where the teacher beats the majority class by far more than 5 points;
# two fine-tuning seeds, 72 steps (80 with the biencoder head took 15.8 minutes in all; 120 steps at 1e-4
# does not fit the 15 minutes either). lr 5e-4 with STS-B's
# output bias started at the mean label (benchmarks/glue_heads.py: the teacher and 3-layer students
# distilled with the tinybert and sentence objectives, 2 seeds, pooler head): students' STS-B 63 and
# 49 where 1.5e-4 gave 44 and 32 (teacher 79 and 81); SST-2 within 2 points either way (teacher 78.6
# vs 80.5, students 77-79 vs 76-77). With the bias from 0 (before), students' STS-B stayed at 8-19
# at either rate and the teacher's collapsed at 5e-4 (7.8). Head: biencoder (each sentence of a pair
# encoded alone, the cosine regressed: sentence-transformers' fine-tuning), since the demo's students
# are sentence-embedding students; on the pooler head (a cross-encoder) the sentence students of
# 2026-12-06's demo reached 43.6 and 19.8 (teacher 76.4), on biencoder 86 (teacher 86.4), lr 5e-4
# (benchmarks/results/glue_heads_biencoder.json). SST-2, a single sentence, gets the pipeline's pooling.
BUDGETS = {
    "full": Budget(ProxyConfig(sequences=1024, steps=30, batch_size=16, max_seq_len=64, tasks=("sst2",),
                               finetune_steps=40, finetune_examples=1280, finetune_lr=2e-4, finetune_seq_len=64,
                               bf16=True, heldout=2000),
                   population=6, generations=2, ladder="zeroshot,full", promote=0.25, verdict_seeds=4,
                   drop_weak_tasks=True, distill_steps=100, distill_batch=32, distill_seq_len=64,
                   glue_tasks="sst2,stsb", glue_steps=72, glue_examples=1920, glue_seq_len=64, glue_lr=5e-4,
                   bf16=True, glue_seeds=2),
    "quick": Budget(ProxyConfig(sequences=256, steps=10, batch_size=8, max_seq_len=64, tasks=("sst2",),
                                finetune_steps=20, finetune_examples=640, finetune_lr=3e-4, finetune_seq_len=64,
                                bf16=True, heldout=1000),
                    population=3, generations=1, ladder="zeroshot,full", promote=0.5, verdict_seeds=2,
                    drop_weak_tasks=False, distill_steps=30, distill_batch=16, distill_seq_len=64,
                    glue_tasks="sst2", glue_steps=30, glue_examples=960, glue_seq_len=64, glue_lr=3e-4,
                    bf16=True, glue_seeds=2, glue_head="pooler"),  # (SST-2 only: the head it was timed with)
}


def for_this_machine(b: Budget) -> Budget:
    """The budget, in float32 where bf16 has no native kernels (said in one line): the budgets were
    sized with native bf16 (AVX512-BF16), and emulated bf16 is far slower than float32 (about 16x, measured)."""
    device = pick_device("auto")
    if (b.bf16 or b.proxy.bf16) and not bf16_is_native(device):
        log.warning("demo: %s: the budget runs in float32, which is faster here; its minutes differ from the "
                    "README's", bf16_absence(device))
        return replace(b, bf16=False, proxy=replace(b.proxy, bf16=False))
    return b


def run_demo(demo: DemoConfig, budget: Budget | None = None, resolved: dict | None = None) -> dict:
    """`fastkd demo`: search, distill the winner, uniform and last, GLUE table. `budget`: another than
    --quick's or the full one (tests). `resolved`: the command's resolved config, written as
    demo-config.json in the budget's folder."""
    output, quick, teacher, student_layers = demo.output, demo.quick, demo.teacher, demo.student_layers
    seed, progress = demo.seed, demo.progress
    data = Path(demo.data_dir)
    corpus, glue = data / "corpus", data / "glue"
    if not corpus.is_dir() or not glue.is_dir():
        raise UserError(f"--data-dir {data} needs corpus/ and glue/ folders (as ../shared/data has): pass --data-dir")
    b = for_this_machine(budget or BUDGETS["quick" if quick else "full"])
    # Seeds derived from --seed (verdict seeds seed + k*1000, fine-tuning seeds seed + k) must seed numpy
    # too: said now, not after the search has run.
    largest = seed + max(b.verdict_seeds * SEED_STRIDE, b.glue_seeds - 1)
    if seed_problem(largest) is not None:
        raise UserError(f"--seed {seed}: the demo derives seeds up to {largest}, past {MAX_SEED}, the largest seed "
                        f"numpy takes: choose a --seed below {MAX_SEED - (largest - seed) + 1}")
    # Each budget has its own folder: a --quick run and a full run never refuse each other's stages.
    out = Path(output) / ("custom" if budget is not None else "quick" if quick else "full")
    corpus, glue = corpus.resolve(), glue.resolve()
    check_writable_dir(out)  # before the search, not when its first file is written
    n_teacher = load_config(teacher).num_hidden_layers
    if resolved is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "demo-config.json", resolved)

    started = time.perf_counter()
    minutes = {}
    log.info("demo 1/3: layer-mapping search")
    search = Search(SearchConfig(output=str(out / "search"), corpus=str(corpus), data_dir=str(glue), teacher=teacher,
                                 student_layers=student_layers, proxy=b.proxy, population=b.population,
                                 generations=b.generations, ladder=b.ladder, promote=b.promote,
                                 verdict_seeds=b.verdict_seeds,
                                 drop_weak_tasks=b.drop_weak_tasks, seed=seed,
                                 resume=(out / "search" / "search.sqlite").exists(), progress=progress))
    result = search.run()
    best = LayerMapping.from_genome(result["winner_genome"], student_layers, n_teacher)
    del search  # frees the teacher copy, evaluator and task cache before the next stages

    minutes["search"] = round((time.perf_counter() - started) / 60, 2)
    students = {"search": best.text}
    for name in ("uniform", "last"):
        students[name] = heuristic(name, student_layers, n_teacher).text
    log.info("demo 2/3: full distillation with %s", ", ".join(f"{k} {v}" for k, v in students.items()))
    exported = {}
    for name, mapping in students.items():
        if mapping in exported.values():  # the winner may be a heuristic: distil it once
            exported[name] = next(p for p in exported.values() if p == mapping)
            continue
        run_dir = out / f"distill-{mapping.replace(',', '-')}"
        cfg = DistillConfig(output=str(run_dir), corpus=str(corpus), teacher=teacher, student_layers=student_layers,
                            mapping=mapping, max_steps=b.distill_steps, batch_size=b.distill_batch,
                            max_seq_len=b.distill_seq_len, seed=seed, bf16=b.bf16,
                            checkpoint_every=max(1, b.distill_steps // 3), resume=(run_dir / "config.json").exists(), progress=progress)
        run_distill(cfg)
        exported[name] = mapping
    dirs = {m: str(out / f"distill-{m.replace(',', '-')}" / "student") for m in dict.fromkeys(students.values())}

    minutes["distill"] = round((time.perf_counter() - started) / 60 - sum(minutes.values()), 2)
    log.info("demo 3/3: GLUE, %d fine-tuning seeds", b.glue_seeds)
    glue_cfg = FinetuneConfig(max_steps=b.glue_steps, max_train_examples=b.glue_examples, lr=b.glue_lr,
                              max_seq_len=b.glue_seq_len, seed=seed, bf16=b.bf16, progress=progress, head=b.glue_head)
    reports = []
    for k in range(b.glue_seeds):
        # A folder per fine-tuning recipe: an output of an earlier recipe is kept and resumes as itself,
        # and this one starts beside it instead of being refused as a different run.
        glue_dir = out / "glue" / f"{b.glue_head}-{b.glue_steps}steps" / f"seed-{seed + k}"
        # (no zero-shot STS-B per seed: it is deterministic, and zero_shot_column below scores it once)
        reports.append(run_glue(GlueConfig(model=list(dirs.values()) + [teacher], tasks=b.glue_tasks, data_dir=str(glue),
                                           output=str(glue_dir), finetune=replace(glue_cfg, seed=seed + k),
                                           resume=(glue_dir / "glue.json").exists(), zeroshot_stsb=False)))
    zero_shot = zero_shot_column(list(dirs.values()) + [teacher], str(glue), out / "glue" / "zeroshot.json", b)
    table, apart = seeds_table(reports, list(dirs.values()), teacher, zero_shot)
    atomic_write_text(out / "glue" / "glue.md", table)
    minutes["glue"] = round((time.perf_counter() - started) / 60 - sum(minutes.values()), 2)
    minutes["total"] = round((time.perf_counter() - started) / 60, 2)  # this invocation (a resume skips done stages)
    log.info("demo minutes: %s", ", ".join(f"{k} {v}" for k, v in minutes.items()))
    summary = {"winner": best.text, "minutes": minutes, "students": students, "verdict": verdict_lines(result),
               "verdicts": {k: v.as_dict() for k, v in result["verdicts"].items()}, "glue_table": table,
               "teacher_apart": apart, "precision": "bf16" if b.bf16 else "float32"}
    atomic_write_json(out / "demo.json", summary)
    return summary


def zero_shot_column(models: list[str], glue_dir: str, path: Path, b: Budget) -> dict:
    """STS-B dev, zero-shot (no training: cosine of mean-pooled embeddings), per model; cached in `path`.

    Deterministic and free of any fine-tuning recipe, so it shows what the students' embeddings carry
    even where a short fine-tuning cannot bring it out.
    """
    from .glue.probe import zero_shot_similarity
    from .io import read_json
    from .models import load_encoder, load_tokenizer

    settings = {"max_seq_len": b.glue_seq_len, "bf16": b.bf16}
    saved = read_json(path, "zero-shot results") or {}
    # Results of other settings are recomputed, never shown under these.
    done = saved.get("models", {}) if saved.get("settings") == settings else {}
    cache = TaskCache(glue_dir)
    for model in models:
        if model not in done:
            result = zero_shot_similarity(load_encoder(model), load_tokenizer(model, "model"), cache,
                                          FinetuneConfig(heldout=0, max_seq_len=b.glue_seq_len, bf16=b.bf16))
            done[model] = {"metrics": result.metrics, "score": result.score, "split": result.eval_split}
            atomic_write_json(path, {"settings": settings, "models": done})
    return done


def _mean_sd(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def seeds_table(reports: list[dict], students: list[str], teacher: str, zero_shot: dict | None = None) -> tuple[str, dict]:
    """One table over fine-tuning seeds: per model and task, mean ± SD of the task score (x100).

    Only the given students and teacher (a resumed GLUE folder may hold other models too). Also says,
    per task, whether the teacher beats the majority class by TEACHER_MARGIN: a task where it does
    not cannot show what compression costs, and the table marks it.
    """
    if not reports:
        raise UserError("the demo's final table needs at least one fine-tuning seed")
    models = list(dict.fromkeys(students + [teacher]))
    entry = {(i, m["path"]): m for i, r in enumerate(reports) for m in r["models"]}
    missing = [p for i in range(len(reports)) for p in models if (i, p) not in entry]
    if missing:
        raise UserError(f"GLUE results of {missing[0]} are missing from a seed's report: remove {missing[0]}'s "
                        "glue folders under the demo output and run again")
    names = {p: entry[(0, p)]["model"] for p in models}
    keys = [k for k in TASKS if all(k in entry[(i, p)]["tasks"] for i in range(len(reports)) for p in models)]
    if not keys:
        raise UserError("no GLUE task was run for every model and seed: check the demo's glue_tasks")
    scores = {(p, k): [entry[(i, p)]["tasks"][k]["score"] for i in range(len(reports))] for p in models for k in keys}
    marks = {(p, k): any(collapsed(entry[(i, p)]["tasks"][k]) for i in range(len(reports))) for p in models for k in keys}
    baseline = {k: reports[0]["majority_baseline"][k]["score"] for k in keys}
    apart = {k: statistics.fmean(scores[(teacher, k)]) - baseline[k] >= TEACHER_MARGIN for k in keys}
    header = [f"{HEADERS[k].split(' (')[0]} ({'/'.join(SHOWN[k])}, mean)" for k in keys]
    zs = zero_shot or {}
    extra = " STS-B zero-shot (P/S) |" if zs else ""
    lines = ["| Model | " + " | ".join(header) + " | avg |" + extra, "| --- |" + " --- |" * (len(keys) + 1 + bool(zs))]
    for p in models:  # students first, the teacher last
        cells = [_mean_sd(scores[(p, k)]) + (" †" if marks[(p, k)] else "") for k in keys]
        avg = [statistics.fmean(scores[(p, k)][i] for k in keys) for i in range(len(reports))]
        z = ""
        if zs:
            m = zs.get(p, {}).get("metrics", {})
            z = f" {100 * m['pearson']:.1f}/{100 * m['spearman']:.1f} |" if m else " - |"
        lines.append(f"| {names[p]} | " + " | ".join(cells) + f" | {_mean_sd(avg)} |" + z)
    lines.append("| majority class | " + " | ".join(f"{100 * baseline[k]:.1f}" for k in keys)
                 + f" | {100 * statistics.fmean(baseline.values()):.1f} |" + (" 0.0/0.0 |" if zs else ""))
    s = reports[0]["settings"]
    weak = [TASKS[k].name for k in keys if not apart[k]]
    lines += ["", f"Official dev sets, scores x100, mean ± SD over {len(reports)} fine-tuning seeds "
                  f"({', '.join(str(r['settings']['seed']) for r in reports)}); a task's score is the mean of its "
                  f"metrics. Fine-tuning: {s['max_steps']} steps, batch {s['batch_size']}, lr {s['lr']:g}, "
                  f"head {s.get('head', 'pooler')}, max length "
                  f"{s['max_seq_len']}, train subsampled to {s['max_train_examples']}. † collapsed on some seed "
                  "(one class for >= 95% of dev)." + (" STS-B zero-shot: no training at all, the cosine of mean-pooled "
                  "sentence embeddings against the gold scores on STS-B dev (Pearson/Spearman), deterministic."
                  if zs else "")]
    if weak:
        lines.append(f"Caution: the teacher does not beat the majority class by {100 * TEACHER_MARGIN:.0f} points on "
                     f"{', '.join(weak)} at this budget, so those columns cannot show what compression costs.")
    return "\n".join(lines) + "\n", apart
