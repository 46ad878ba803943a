"""Distillation-step throughput: sequences/s, tokens/s and peak RSS, teacher -> student.

Default: the real default teacher (all-MiniLM-L6-v2) -> 3-layer student, S=128, B=32, uniform
mapping, on the shared WikiText-2 corpus. Times whole optimizer steps (teacher forward, student
forward, losses, backward, AdamW) after warm-up, and separately the teacher forward, so the share of
the step the teacher costs is known.

    python benchmarks/distill_step.py [--bf16 --backends torch,cpp --steps 10 --batch-size 32 --seq-len 128]

Each loss backend is measured in the same process, the torch reference first; the speedup column
is the reference's step time over the backend's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, reset_peak_rss, rss_mib, table, write_result  # noqa: E402

from fastkd.bench import trim_heap  # noqa: E402
from fastkd.config import DistillConfig  # noqa: E402
from fastkd.distill import build_run  # noqa: E402

DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: DistillConfig, steps: int, warmup: int) -> dict:
    run = build_run(cfg)
    d = run.engine
    trim_heap()  # memory freed by an earlier measurement goes back to the OS: each starts even
    reset_peak_rss()
    before = rss_mib()  # weights, corpus map, libraries
    for _ in range(warmup):
        d.train_step()
    step_times = []
    for _ in range(steps):
        _sync(d.device)
        t0 = time.perf_counter()
        d.train_step()
        _sync(d.device)
        step_times.append(time.perf_counter() - t0)
    teacher_times = []
    for _ in range(steps):
        batch = {k: v.to(d.device) for k, v in d.stream.next().items()}
        _sync(d.device)
        t0 = time.perf_counter()
        d.teacher(batch["input_ids"], batch["attention_mask"])
        _sync(d.device)
        teacher_times.append(time.perf_counter() - t0)
    step = statistics.median(step_times)
    teacher = statistics.median(teacher_times)
    seqs = cfg.batch_size * cfg.grad_accum
    return {
        "mode": "bf16" if cfg.bf16 else "fp32", "loss_backend": d.criterion.backend(d.device), "batch": seqs, "seq_len": cfg.max_seq_len,
        "student": run.shape.describe(), "mapping": run.mapping.text,
        "step_s": round(step, 4), "step_s_stdev": round(statistics.pstdev(step_times), 4),
        "teacher_forward_s": round(teacher, 4), "teacher_share": round(teacher / step, 3),
        "seq_per_s": round(seqs / step, 2), "tokens_per_s": round(seqs * cfg.max_seq_len / step, 1),
        "rss_before_mib": round(before, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="default")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="also measure bf16 autocast")
    p.add_argument("--backends", default="torch,cpp", help="loss backends to compare (torch = the reference)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = []
    for bf16 in ([False, True] if args.bf16 else [False]):
        reference = None
        for backend in args.backends.split(","):
            with tempfile.TemporaryDirectory() as out:
                cfg = DistillConfig(output=out, corpus=args.corpus, teacher=args.teacher,
                                    student_layers=args.student_layers, max_seq_len=args.seq_len,
                                    batch_size=args.batch_size, max_steps=args.steps + args.warmup + 1, bf16=bf16,
                                    progress=False, loss_backend=backend, objective="tinybert", corpus_mode="packed")
                row = measure(cfg, args.steps, args.warmup)
            reference = reference or row
            row["speedup_vs_torch"] = round(reference["step_s"] / row["step_s"], 3)
            rows.append(row)
    print(table(rows, ["mode", "loss_backend", "batch", "seq_len", "seq_per_s", "tokens_per_s", "step_s",
                       "speedup_vs_torch", "teacher_share", "rss_before_mib", "peak_rss_mib"]))
    path = write_result("distill_step", {"teacher": args.teacher, "threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
