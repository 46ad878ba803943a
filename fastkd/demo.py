"""`fastkd demo`: the whole pipeline on the default teacher.

search (3-layer student) -> full distillation with the winner and with uniform and last -> one GLUE
table of the three students beside the teacher, with the search's noise band. Every stage writes
into its own folder under --output and resumes, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .config import DistillConfig
from .distill import run_distill
from .errors import UserError
from .glue.finetune import FinetuneConfig
from .glue.report import markdown as glue_markdown
from .glue.run import run_glue
from .io import atomic_write_json
from .mapping import heuristic
from .models import load_config
from .search.proxy import ProxyConfig
from .search.report import verdict_lines
from .search.run import Search, SearchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    proxy: ProxyConfig
    population: int
    generations: int
    repeats: int
    finalists: int
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


# Sized for 2 CPU cores with bf16 (AVX512-BF16): full <= 15 minutes, quick <= 5 (measured: README).
# Small students learn a GLUE task in a few dozen steps only at a high learning rate: for the proxy's
# 40 SST-2 steps, 1e-4 left them near chance, 3e-4 made good mappings collapse on some seeds, 2e-4
# was stable (SD about 0.01 over seeds); the final fine-tuning (60 steps) takes 3e-4. Inputs are cut
# at 64 tokens, which covers SST-2 and most MRPC pairs. The signal check drops a proxy task the
# teacher itself cannot learn at this budget (MRPC and RTE, measured), so candidates are not
# fine-tuned on noise.
BUDGETS = {
    "full": Budget(ProxyConfig(sequences=1024, steps=30, batch_size=16, max_seq_len=64, finetune_steps=40,
                               finetune_examples=1280, finetune_lr=2e-4, finetune_seq_len=64, bf16=True),
                   population=4, generations=2, repeats=2, finalists=1, drop_weak_tasks=True,
                   distill_steps=100, distill_batch=32, distill_seq_len=64,
                   glue_tasks="sst2,mrpc,rte", glue_steps=60, glue_examples=1920, glue_seq_len=64, glue_lr=3e-4,
                   bf16=True),
    "quick": Budget(ProxyConfig(sequences=256, steps=10, batch_size=8, max_seq_len=64, tasks=("sst2",),
                                finetune_steps=20, finetune_examples=640, finetune_lr=3e-4, finetune_seq_len=64,
                                bf16=True),
                    population=3, generations=1, repeats=2, finalists=1, drop_weak_tasks=False,
                    distill_steps=30, distill_batch=16, distill_seq_len=64,
                    glue_tasks="sst2,mrpc", glue_steps=30, glue_examples=960, glue_seq_len=64, glue_lr=3e-4,
                    bf16=True),
}


def run_demo(data_dir: str, output: str, quick: bool = False, teacher: str = "default", student_layers: int = 3,
             seed: int = 0, progress: bool = True, budget: Budget | None = None) -> dict:
    data = Path(data_dir)
    corpus, glue = data / "corpus", data / "glue"
    if not corpus.is_dir() or not glue.is_dir():
        raise UserError(f"--data-dir {data} needs corpus/ and glue/ folders (as ../shared/data has): pass --data-dir")
    b = budget or BUDGETS["quick" if quick else "full"]
    # Each budget has its own folder: a --quick run and a full run never refuse each other's stages.
    out = Path(output) / ("custom" if budget is not None else "quick" if quick else "full")
    corpus, glue = corpus.resolve(), glue.resolve()
    n_teacher = load_config(teacher).num_hidden_layers

    started = time.perf_counter()
    minutes = {}
    log.info("demo 1/3: layer-mapping search")
    search = Search(SearchConfig(output=str(out / "search"), corpus=str(corpus), data_dir=str(glue), teacher=teacher,
                                 student_layers=student_layers, proxy=b.proxy, population=b.population,
                                 generations=b.generations, repeats=b.repeats, finalists=b.finalists,
                                 drop_weak_tasks=b.drop_weak_tasks, seed=seed,
                                 resume=(out / "search" / "search.sqlite").exists(), progress=progress))
    result = search.run()
    best = result["winner"].mapping
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
    log.info("demo 3/3: GLUE")
    glue_cfg = FinetuneConfig(max_steps=b.glue_steps, max_train_examples=b.glue_examples, lr=b.glue_lr,
                              max_seq_len=b.glue_seq_len, seed=seed, bf16=b.bf16, progress=progress)
    glue_dir = out / "glue"
    report = run_glue(list(dirs.values()) + [teacher], b.glue_tasks, str(glue), str(glue_dir), glue_cfg,
                      resume=(glue_dir / "glue.json").exists())
    minutes["glue"] = round((time.perf_counter() - started) / 60 - sum(minutes.values()), 2)
    minutes["total"] = round((time.perf_counter() - started) / 60, 2)  # this invocation (a resume skips done stages)
    log.info("demo minutes: %s", ", ".join(f"{k} {v}" for k, v in minutes.items()))
    summary = {"winner": best.text, "minutes": minutes, "students": students, "verdict": verdict_lines(result),
               "noise_sd": result["noise_sd"], "glue_table": glue_markdown(report)}
    atomic_write_json(out / "demo.json", summary)
    return summary
