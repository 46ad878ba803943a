"""Shared by search_fidelity.py and search_signal.py: distill fixed mappings on paired seeds, score
every student on every rung, and summarise (rank correlations, paired noise, verdict half-widths).

Distillation per seed is one lockstep run of all mappings (one teacher forward per batch), so every
mapping of a seed sees the same batches: the pairing the search's verdict relies on.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import statistics
import tempfile
import time
from pathlib import Path

import torch
from scipy import stats

from fastkd.corpus import load_corpus, sample_corpus
from fastkd.demo import BUDGETS
from fastkd.device import bf16_is_native
from fastkd.glue import TaskCache, parse_tasks
from fastkd.mapping import LayerMapping
from fastkd.models import load_teacher, load_tokenizer, student_shape
from fastkd.search.config import ProxyConfig
from fastkd.search.proxy import ProxyEvaluator, task_collapsed
from fastkd.search.rungs import Rung
from fastkd.search.verdict import paired_interval

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# uniform, last, first and seven others spread over the space of 3-of-6 mappings.
MAPPINGS = ["2,4,6", "4,5,6", "1,2,3", "1,3,5", "3,4,6", "2,2,6", "1,4,6", "2,3,5", "3,5,6", "2,5,6"]


def budget_parser(doc: str) -> tuple[argparse.ArgumentParser, str]:
    """A benchmark's parser with --budget (demo: the demo's proxy; default: fastkd search's) read first, so the
    proxy flags take that budget's values as their defaults; returns the parser and the budget."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--budget", choices=["demo", "default"], default="demo")
    budget = pre.parse_known_args()[0].budget
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[pre])
    proxy = BUDGETS["full"].proxy if budget == "demo" else ProxyConfig()
    if proxy.bf16 and not bf16_is_native(torch.device("cpu")):  # measure() runs on the CPU
        proxy = replace(proxy, bf16=False)  # as the demo runs it here: emulated bf16 is 16x slower than float32
    proxy_args(p, proxy)
    return p, budget


def proxy_args(p, d: ProxyConfig) -> None:
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--tasks", default=",".join(d.tasks))
    p.add_argument("--sequences", type=int, default=d.sequences)
    p.add_argument("--proxy-steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps)
    p.add_argument("--finetune-examples", type=int, default=d.finetune_examples)
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--finetune-seq-len", type=int, default=d.finetune_seq_len)
    p.add_argument("--heldout", type=int, default=d.heldout)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d.bf16)
    p.add_argument("--mappings", default=",".join(m.replace(",", "") for m in MAPPINGS),
                   help="digit strings, e.g. 246,456,123")


def proxy_from(args) -> ProxyConfig:
    return ProxyConfig(sequences=args.sequences, steps=args.proxy_steps, batch_size=args.batch_size,
                       max_seq_len=args.seq_len, tasks=tuple(t.key for t in parse_tasks(args.tasks)),
                       finetune_steps=args.finetune_steps, finetune_examples=args.finetune_examples,
                       finetune_lr=args.finetune_lr, finetune_seq_len=args.finetune_seq_len, bf16=args.bf16,
                       heldout=args.heldout)


def measure(cfg: ProxyConfig, mapping_texts: list[str], seeds: list[int], rungs: list[Rung], data_dir: str,
            log=print) -> dict:
    """fitness[rung][mapping][seed], per-task scores, seconds per evaluation per rung and of distillation."""
    tokenizer, teacher = load_tokenizer("default"), load_teacher("default")
    with tempfile.TemporaryDirectory() as cache_dir:
        corpus = sample_corpus(load_corpus(str(Path(data_dir) / "corpus"), tokenizer, cfg.max_seq_len, cache_dir),
                               cfg.sequences, 0)
    tasks = parse_tasks(",".join(cfg.tasks))
    cache = TaskCache(str(Path(data_dir) / "glue"))
    N = teacher.config.num_hidden_layers
    mappings = [LayerMapping(tuple(int(c) for c in m.replace(",", "")), N) for m in mapping_texts]
    ev = ProxyEvaluator(teacher, tokenizer, corpus, student_shape(teacher.config, len(mappings[0].layers)), cfg, cache,
                        tasks, progress=False)
    fitness = {r.name: {m.text: {} for m in mappings} for r in rungs}
    task_scores = {r.name: {m.text: {} for m in mappings} for r in rungs}
    collapsed = {r.name: {m.text: {} for m in mappings} for r in rungs}
    seconds = {r.name: [] for r in rungs}
    distill_seconds = []
    for seed in seeds:
        t0 = time.perf_counter()
        distilled = ev.distill(mappings, seed, desc=f"seed {seed}")
        distill_seconds.append((time.perf_counter() - t0) / len(mappings))
        for m, (student, losses, _) in zip(mappings, distilled):
            student.eval()
            for r in rungs:
                t0 = time.perf_counter()
                res = r.score(student, tokenizer, tasks, cache, cfg.finetune_config(seed))
                seconds[r.name].append(time.perf_counter() - t0)
                fitness[r.name][m.text][seed] = statistics.fmean(t["score"] for t in res.values())
                task_scores[r.name][m.text][seed] = {k: t["score"] for k, t in res.items()}
                collapsed[r.name][m.text][seed] = any(task_collapsed(t) for t in res.values())
            log(f"seed {seed} {m.text}: " + ", ".join(f"{r.name} {fitness[r.name][m.text][seed]:.4f}" for r in rungs))
    return {"proxy": cfg.as_dict(), "seeds": seeds, "mappings": [m.text for m in mappings], "fitness": fitness,
            "task_scores": task_scores, "collapsed": collapsed,
            "seconds_per_evaluation": {k: statistics.fmean(v) for k, v in seconds.items()},
            "distill_seconds_per_evaluation": statistics.fmean(distill_seconds),
            "split": {t.key: ("train-heldout" if cfg.heldout else "dev") for t in tasks}}


def means(fitness_by_mapping: dict) -> dict:
    return {m: statistics.fmean(v.values()) for m, v in fitness_by_mapping.items()}


def correlations(measured: dict, top: str = "full") -> dict:
    """Spearman and Kendall of each rung's per-mapping means with the top rung's."""
    top_means = means(measured["fitness"][top])
    order = list(top_means)
    out = {}
    for rung, by_mapping in measured["fitness"].items():
        m = means(by_mapping)
        out[rung] = {"spearman": float(stats.spearmanr([m[k] for k in order], [top_means[k] for k in order])[0]),
                     "kendall": float(stats.kendalltau([m[k] for k in order], [top_means[k] for k in order])[0])}
    return out


def paired_noise(measured: dict, rung: str, exclude_collapsed: bool = True) -> dict:
    """Against uniform: per-mapping paired intervals, the pooled SD of a paired difference, the spread."""
    fit, col = measured["fitness"][rung], measured["collapsed"][rung]
    seeds = measured["seeds"]
    uniform = measured["mappings"][0]
    kept = [m for m in measured["mappings"]
            if not (exclude_collapsed and any(col[m][s] for s in seeds))]
    intervals = {}
    for m in kept:
        if m == uniform:
            continue
        iv = paired_interval([fit[m][s] for s in seeds], [fit[uniform][s] for s in seeds])
        intervals[m] = iv.as_dict()
    sds = [iv["sd"] for iv in intervals.values() if iv["sd"] is not None]
    pooled = (statistics.fmean(sd ** 2 for sd in sds)) ** 0.5 if sds else float("nan")
    m = means(fit)
    spread = max(m[k] for k in kept) - min(m[k] for k in kept) if kept else float("nan")
    halves = [iv["half_width"] for iv in intervals.values() if iv["half_width"] is not None]
    return {"rung": rung, "kept_mappings": kept, "excluded_collapsed": [k for k in measured["mappings"] if k not in kept],
            "spread": spread, "paired_sd": pooled, "spread_over_paired_sd": spread / pooled if pooled else float("inf"),
            "median_half_width": statistics.median(halves) if halves else float("nan"),
            "max_half_width": max(halves) if halves else float("nan"), "intervals_vs_uniform": intervals,
            "unpaired_sd_uniform": statistics.stdev(fit[uniform].values()) if len(seeds) > 1 else float("nan")}
