"""One generation's proxy distillation: one shared teacher forward per batch vs the sequential loop.

P candidates distilled in lockstep (the teacher runs once per batch and serves all P students) vs
each candidate with its own teacher forwards. Reports both times (the step loops: teacher forwards,
student forward/backward/update; student construction excluded, it is the same in both), their
ratio, and the ideal ratio P(T+S)/(T+P*S) from the measured teacher-forward time T and
student-step time S. Target: measured >= 0.9 x ideal.

    (a) the default teacher (all-MiniLM-L6-v2) -> 3-layer student
    (b) a BERT-base-shaped teacher (12 layers, 768 wide, random weights) -> 4-layer 312-wide student

    python benchmarks/search_generation.py [--population 8 --steps 3 --batch-size 16 --seq-len 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_logs, table, write_result  # noqa: E402

from fastkd.families import enable_capture  # noqa: E402
from fastkd.corpus import load_corpus, sample_corpus  # noqa: E402
from fastkd.mapping import heuristic  # noqa: E402
from fastkd.models import load_teacher, load_tokenizer, student_shape  # noqa: E402
from fastkd.search.ga import GAConfig, GeneticSearch  # noqa: E402
from fastkd.search.config import ProxyConfig  # noqa: E402
from fastkd.search.proxy import ProxyEvaluator  # noqa: E402

DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


def bert_base_teacher(tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072)
    model = BertModel(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    enable_capture(model)
    return model


def mappings(M: int, N: int, P: int):
    ga = GeneticSearch(M, N, GAConfig(population=P, seed=0))
    return [heuristic("uniform", M, N)] + [type(heuristic("uniform", M, N))(g, N) for g in ga.initial_population()[1:P]]


def measure(name, teacher, tokenizer, corpus, shape, P, steps, batch, seq_len) -> dict:
    proxy = ProxyConfig(sequences=len(corpus), steps=steps, batch_size=batch, max_seq_len=seq_len)
    cands = mappings(shape.layers, teacher.config.num_hidden_layers, P)
    # Warm-up with the larger (shared) working set, so neither timed mode pays allocator growth.
    ProxyEvaluator(teacher, tokenizer, corpus, shape, proxy, None, [], progress=False).distill(cands, seed=1)

    shared = ProxyEvaluator(teacher, tokenizer, corpus, shape, proxy, None, [], progress=False)
    t0 = time.perf_counter()
    shared.distill(cands, seed=0)
    shared_wall = time.perf_counter() - t0
    alone = ProxyEvaluator(teacher, tokenizer, corpus, shape, proxy, None, [], progress=False)
    t0 = time.perf_counter()
    for m in cands:
        alone.distill([m], seed=0)
    sequential_wall = time.perf_counter() - t0

    c, s = shared.counters, alone.counters
    T = c.teacher_seconds / c.teacher_forwards
    S = c.student_seconds / c.student_steps
    shared_loop = c.teacher_seconds + c.student_seconds
    sequential_loop = s.teacher_seconds + s.student_seconds
    measured = sequential_loop / shared_loop
    ideal = P * (T + S) / (T + P * S)
    return {"setting": name, "P": P, "steps": steps, "batch": batch, "seq_len": seq_len,
            "student": shape.describe(), "T_s": round(T, 4), "S_s": round(S, 4),
            "shared_s": round(shared_loop, 2), "sequential_s": round(sequential_loop, 2),
            "shared_wall_s": round(shared_wall, 2), "sequential_wall_s": round(sequential_wall, 2),
            "teacher_forwards_shared": c.teacher_forwards, "teacher_forwards_sequential": s.teacher_forwards,
            "ratio": round(measured, 3), "ideal": round(ideal, 3), "of_ideal": round(measured / ideal, 3),
            "meets_target": measured >= 0.9 * ideal}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--only", choices=["a", "b"], default=None)
    args = p.parse_args()
    quiet_logs()

    tokenizer = load_tokenizer("default")
    with tempfile.TemporaryDirectory() as cache:
        corpus = load_corpus(args.corpus, tokenizer, args.seq_len, cache)
    corpus = sample_corpus(corpus, 512, seed=0)
    rows = []
    if args.only in (None, "a"):
        teacher = load_teacher("default")
        rows.append(measure("(a) MiniLM-L6 -> 3 layers", teacher, tokenizer, corpus, student_shape(teacher.config, 3),
                            args.population, args.steps, args.batch_size, args.seq_len))
    if args.only in (None, "b"):
        teacher = bert_base_teacher(tokenizer)
        shape = student_shape(teacher.config, 4, hidden=312, heads=12, ffn=1200)
        rows.append(measure("(b) BERT-base shape -> 4x312", teacher, tokenizer, corpus, shape,
                            args.population, args.steps, args.batch_size, args.seq_len))
    print(table(rows, ["setting", "P", "T_s", "S_s", "shared_s", "sequential_s", "ratio", "ideal", "of_ideal",
                       "meets_target"]))
    path = write_result("search_generation", {"threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
