"""Does the search's proxy rank layer mappings the way the student a user ships does? (issue 24)

Ten fixed 3-layer mappings of the default teacher (uniform, last, first and seven others: those of
search_fidelity.py), each on --seeds seeds, measured twice:

final (the truth): `fastkd distill` with its defaults for this teacher (`auto`: the sentence objective
  on one sentence per sequence, the teacher labelling the corpus once) on the whole corpus,
  --final-steps x --final-batch sentences (at least 10x the proxy's tokens), lr 1e-4, warmup 0.1, the
  mapping given (it chooses the teacher layers the student starts from and, for layer-wise
  objectives, the ones that supervise it). Then judged the way a user judges the student: STS-B dev
  zero-shot (the exported pipeline's embeddings), and SST-2, STS-B and MRPC dev after `fastkd glue`'s
  fine-tune with the recipe validated for sentence students (the biencoder head, 72 steps, lr 5e-4;
  the fine-tuning seed is the distillation seed). The final score is the mean of the fine-tuned tasks
  (x100). A mapping and its seed share the batches of every other mapping at that seed (the same
  data order): the design is paired over seeds.
proxy (what the search sees): the demo's proxy budget (fastkd.demo.BUDGETS["full"].proxy, in float32
  where this CPU has no native bf16), with --proxy-objective; all mappings of a seed distilled in
  lockstep as the search distils them, each student scored by every rung of the search's ladder
  (zeroshot, probe, short, full: the held-out train slices the search selects on), by the short and
  full fine-tunes with the biencoder recipe, by its teacher likeness on held-out sentences (CoLA train
  sentences, no labels: fastkd.search.likeness) and by minus its final distillation loss. A proxy
  student that diverges is ranked last by the rungs (as the search ranks it); it leaves the likeness
  and loss measures of its objective out of the table.

Three more rows decouple the two roles a mapping has (issue 24, item 4): SUPERVISION@INIT students
(`fastkd distill --mapping 4,5,6@2,4,6`) ask whether tying them, as the search does by default, loses
anything. With the default `auto` objective (the sentence embedding alone) only the layers kept can
matter; --final-objective tinybert (or minilmv2) measures supervision too. `fastkd search --search-init`
proposes such mappings, so they are scored by the proxy and ranked with the others.

Reported: per proxy measure, Spearman and Kendall of its per-mapping means with the final means (both
the fine-tuned score and zero-shot STS-B), 95% percentile bootstrap intervals (mappings, proxy seeds
and final seeds resampled), and its seconds per evaluation beside the proxy distillation; and the
final spread between mappings against its noise (a two-way mapping x seed ANOVA F test of the
mapping effect; paired t intervals of each mapping against uniform): does the mapping matter at this
scale, and how much.

    python benchmarks/proxy_vs_final.py --stages final            # 4-9 min per mapping and seed (2-core CPUs)
    python benchmarks/proxy_vs_final.py --stages proxy --proxy-objective tinybert --resume
    python benchmarks/proxy_vs_final.py --stages proxy --proxy-objective sentence --resume
    python benchmarks/proxy_vs_final.py --stages report --resume  # the tables from what is measured
    python benchmarks/proxy_vs_final.py --stages report --resume --publish  # ... and what search reports cite
    python benchmarks/proxy_vs_final.py --stages verdicts --resume --searches runs/demo/search,runs/s1

verdicts (issue 24, item 3): each search folder's claims (best_mapping.json: its winner beats / loses
to / is within ±x of `uniform` and `last`) checked against the final table: the paired difference of
the same two mappings over the final seeds. A claim whose interval excludes zero agrees when the final
difference has its sign (confirmed when the final interval excludes zero too, contradicted when it
excludes zero the other way); "keep the heuristic" (within ±x) agrees when the final difference between
the heuristic and the best final mapping is within ±x (x100: the proxy's fitness is in [0, 1]). A
winner the final table does not hold is named, to be added with --mappings.

Each measured row is saved at once; --resume keeps the rows of an earlier run with the same settings
(the table can be completed over several sessions; the cost columns then mix machines, and say so).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, quiet_logs, table, write_result  # noqa: E402
from _search_measure import MAPPINGS  # noqa: E402
from distill_step import DEFAULT_CORPUS  # noqa: E402

from fastkd.config import DistillConfig  # noqa: E402
from fastkd.corpus import default_cache_dir, load_corpus, sample_corpus  # noqa: E402
from fastkd.demo import BUDGETS, for_this_machine  # noqa: E402
from fastkd.distill import run_distill  # noqa: E402
from fastkd.glue import TaskCache, parse_tasks  # noqa: E402
from fastkd.glue.config import FinetuneConfig  # noqa: E402
from fastkd.glue.finetune import evaluate
from fastkd.glue.tasks import task_spec  # noqa: E402
from fastkd.mapping import parse_mapping  # noqa: E402
from fastkd.models import (  # noqa: E402
    load_config,
    load_teacher,
    load_tokenizer,
    resolve_model_path,
    student_shape,
)
from fastkd.search import measured  # noqa: E402
from fastkd.search.likeness import TeacherReference  # noqa: E402
from fastkd.search.proxy import FAILED_FITNESS, ProxyEvaluator, task_collapsed  # noqa: E402
from fastkd.search.rungs import RUNG_ORDER, Rung  # noqa: E402
from fastkd.search.verdict import MIN_SD, paired_interval  # noqa: E402
from fastkd.sentence import read_pooling, zeroshot_stsb  # noqa: E402

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
LIKENESS = ("embedding_cosine", "cka_embedding", "cka_mapped")
BIENCODER_RUNGS = ("short", "full")  # also scored with the biencoder head (named short-biencoder, ...)
# what a kept row must share with this run
PROXY_DECISIVE = ("teacher", "corpus", "data_dir", "mappings", "likeness_sentences")
# Supervision and initialisation apart (issue 24, item 4): does tying them, as the search does by default, lose anything?
DECOUPLED = ("456@246", "246@456", "123@246")
FINAL_DECISIVE = ("teacher", "corpus", "data_dir", "final_objective", "final_steps", "final_batch", "final_lr", "final_warmup", "final_seq_len",
                  "judge_tasks", "judge_steps", "judge_examples", "judge_lr", "judge_seq_len", "judge_head")
BOOTSTRAP = 2000


def final_row(args, mapping: str, seed: int, work: Path, cache: TaskCache, stsb_dev) -> dict:
    """Distill one (mapping, seed) as a user would, judge it, and remove the student. A mapping
    'SUPERVISION@INIT' supervises by the first and initialises the student from the second."""
    output = work / f"{mapping.replace(',', '').replace('@', '-init')}-seed{seed}"
    if output.exists():
        shutil.rmtree(output)  # an interrupted row starts over (it is not saved until judged)
    cfg = DistillConfig(output=str(output), corpus=args.corpus, teacher=args.teacher,
                        student_layers=len(mapping.partition("@")[0].split(",")), mapping=mapping,
                        objective=args.final_objective, max_seq_len=args.final_seq_len,
                        max_steps=args.final_steps, batch_size=args.final_batch, lr=args.final_lr,
                        warmup=args.final_warmup, seed=seed, progress=False, checkpoint_every=10 ** 9,
                        log_every=max(1, args.final_steps // 20))
    started = time.perf_counter()
    student = run_distill(cfg)
    distill_s = time.perf_counter() - started
    info = json.loads((student / "fastkd.json").read_text())
    started = time.perf_counter()
    zeroshot = 100 * zeroshot_stsb(student, stsb_dev, max_seq_len=args.final_seq_len)["spearman"]
    judge = FinetuneConfig(max_steps=args.judge_steps, max_train_examples=args.judge_examples, lr=args.judge_lr,
                           max_seq_len=args.judge_seq_len, seed=seed, progress=False, head=args.judge_head)
    results = evaluate(str(student), load_tokenizer(str(student), "model"), parse_tasks(args.judge_tasks), cache, judge)
    row = {"mapping": mapping, "seed": seed, "objective": info["objective"], "corpus_mode": info["corpus"]["mode"],
           "steps": info["steps"], "final_losses": info["final_losses"], "zeroshot": zeroshot,
           "tasks": {k: 100 * r.score for k, r in results.items()},
           "collapsed": {k: task_collapsed(r.to_dict()) for k, r in results.items()},
           "finetuned": statistics.fmean(100 * r.score for r in results.values()),
           "distill_s": round(distill_s, 1), "judge_s": round(time.perf_counter() - started, 1)}
    shutil.rmtree(output)
    return row


def proxy_corpus_mode(objective: str) -> str:
    """The corpus mode a proxy objective reads, as the search's --corpus-mode auto chooses it."""
    return "sentences" if objective == "sentence" else "packed"


def proxy_stage(args, results: dict, save) -> None:
    proxy = replace(for_this_machine(BUDGETS["full"]).proxy, objective=args.proxy_objective,
                    **{k: v for k, v in (("steps", args.proxy_steps), ("finetune_steps", args.proxy_finetune_steps))
                       if v is not None})
    key = args.proxy_objective
    earlier = results["proxy"].get(key)
    if earlier is not None and earlier["config"] != json.loads(json.dumps(proxy.as_dict())):
        raise SystemExit(f"--resume: the saved {key} proxy ran another proxy budget ({earlier['config']}); "
                         "choose another --name")
    if proxy.steps < 1 or proxy.finetune_steps < 1:
        raise SystemExit("--proxy-steps and --proxy-finetune-steps must be at least 1")
    # seconds are kept per (measure, mapping, seed) and distillation per seed: a seed run again replaces its own
    stage = results["proxy"].setdefault(key, {"config": proxy.as_dict(), "fitness": {}, "seconds": {},
                                              "distill_seconds": {}, "machine": machine()})
    tokenizer, teacher = load_tokenizer(args.teacher), load_teacher(args.teacher)
    mode = proxy_corpus_mode(proxy.objective)
    corpus = sample_corpus(load_corpus(args.corpus, tokenizer, proxy.max_seq_len, progress=False, mode=mode),
                           proxy.sequences, 0)
    cache = TaskCache(args.data_dir)
    tasks = parse_tasks(",".join(proxy.tasks))
    student_layers = len(args.mappings[0].partition("@")[0].split(","))
    mappings = [parse_mapping(m, student_layers, teacher.config.num_hidden_layers) for m in args.mappings]
    ev = ProxyEvaluator(teacher, tokenizer, corpus, student_shape(teacher.config, len(mappings[0].layers)), proxy,
                        cache, tasks, progress=False)
    held = cache.data(task_spec("cola")).train.text_a[:args.likeness_sentences]
    # the likeness is judged by the teacher's own sentence embedding, whatever the proxy objective trains
    reference = TeacherReference(teacher, tokenizer, held, read_pooling(resolve_model_path(args.teacher)),
                                 max_seq_len=proxy.max_seq_len)
    measures = ([*RUNG_ORDER, *(f"{r}-biencoder" for r in BIENCODER_RUNGS), *LIKENESS, "neg_final_loss"])
    fitness = stage["fitness"]
    for seed in args.seed_list:
        # (a proxy student depends only on its mapping and seed, not on what shares its lockstep: the missing
        # ones alone are distilled, and the kept rows stay)
        missing = [mp for mp in mappings if not all(str(seed) in fitness.get(m, {}).get(mp.text, {}) for m in measures)]
        if not missing:
            continue
        started = time.perf_counter()
        distilled = ev.distill(missing, seed, desc=f"seed {seed}")
        stage["distill_seconds"][str(seed)] = (time.perf_counter() - started) / len(missing)
        for mapping, (student, losses, _) in zip(missing, distilled):
            student.eval()
            scores, seconds = {}, {}
            if "failed" in losses:  # a diverged proxy student: ranked last by the rungs, as the search ranks it;
                print(f"proxy {key} seed {seed} {mapping.text}: {losses['failed']}", flush=True)  # no likeness
                scores = {name: (None if name in (*LIKENESS, "neg_final_loss") else 100 * FAILED_FITNESS)
                          for name in measures}
            for name in (measures if "failed" not in losses else ()):
                started = time.perf_counter()
                if name in LIKENESS:  # one pass gives all three; each is charged that pass's time
                    if name == LIKENESS[0]:
                        likeness = reference.likeness(student, mapping)
                        likeness_s = time.perf_counter() - started
                    scores[name] = likeness[name]
                    seconds[name] = likeness_s
                    continue
                elif name == "neg_final_loss":
                    scores[name] = -float(sum(v for k, v in losses.items() if k != "loss") if "loss" not in losses
                                          else losses["loss"])
                else:
                    rung, _, head = name.partition("-")
                    cfg = proxy.finetune_config(seed)
                    out = Rung(rung).score(student, tokenizer, tasks, cache, replace(cfg, head=head or cfg.head))
                    scores[name] = 100 * statistics.fmean(t["score"] for t in out.values())
                seconds[name] = time.perf_counter() - started
            for name in measures:
                fitness.setdefault(name, {}).setdefault(mapping.text, {})[str(seed)] = scores[name]
                if name in seconds:
                    stage["seconds"].setdefault(name, {}).setdefault(mapping.text, {})[str(seed)] = seconds[name]
            print(f"proxy {key} seed {seed} {mapping.text}: " + ", ".join(
                f"{n} {scores[n]:.3f}" for n in measures if scores[n] is not None), flush=True)
        save()


def bootstrap_rank(proxy: np.ndarray, final: np.ndarray, rng: np.random.Generator) -> dict:
    """Spearman and Kendall of per-mapping means (rows: mappings, columns: seeds), with 95% percentile
    intervals from resampling mappings, proxy seeds and final seeds (each with replacement); and
    spearman_one_seed: the mean over proxy seeds of one seed's Spearman with the final means, the fidelity
    of a search, which scores every rung with its one selection seed."""

    def rank(fn, a: np.ndarray, b: np.ndarray) -> float:
        return 0.0 if np.ptp(a) == 0 else fn(a, b).statistic  # a proxy that ties every mapping ranks nothing

    def measures(p: np.ndarray, f: np.ndarray) -> dict:
        means = f.mean(1)
        return {"spearman": rank(stats.spearmanr, p.mean(1), means), "kendall": rank(stats.kendalltau, p.mean(1), means),
                "spearman_one_seed": float(np.mean([rank(stats.spearmanr, p[:, j], means) for j in range(p.shape[1])]))}

    point = {k: float(v) for k, v in measures(proxy, final).items()}
    draws = {k: [] for k in point}
    m = proxy.shape[0]
    for _ in range(BOOTSTRAP):
        rows = rng.integers(0, m, m)
        if len(set(rows.tolist())) < 3:
            continue
        p = proxy[rows][:, rng.integers(0, proxy.shape[1], proxy.shape[1])]
        f = final[rows][:, rng.integers(0, final.shape[1], final.shape[1])]
        if np.ptp(f.mean(1)) == 0:  # (the final outcome ties every drawn mapping: no ranking to match)
            continue
        for k, v in measures(p, f).items():
            if np.isfinite(v):
                draws[k].append(v)
    return {k: {"point": v, "low": float(np.percentile(draws[k], 2.5)) if draws[k] else float("nan"),
                "high": float(np.percentile(draws[k], 97.5)) if draws[k] else float("nan")} for k, v in point.items()}


def mapping_effect(scores: np.ndarray) -> dict:
    """Two-way (mapping x seed) ANOVA without replication: F test of the mapping effect against the
    mapping-by-seed residual; the residual SD is the noise of one (mapping, seed) run."""
    m, s = scores.shape
    grand = scores.mean()
    ss_map = s * ((scores.mean(1) - grand) ** 2).sum()
    ss_seed = m * ((scores.mean(0) - grand) ** 2).sum()
    ss_res = ((scores - grand) ** 2).sum() - ss_map - ss_seed
    df_map, df_res = m - 1, (m - 1) * (s - 1)
    f = (ss_map / df_map) / (ss_res / df_res) if ss_res > 0 else float("inf")
    return {"F": float(f), "df": [df_map, df_res], "p": float(stats.f.sf(f, df_map, df_res)),
            "residual_sd": float(np.sqrt(ss_res / df_res)), "spread": float(np.ptp(scores.mean(1)))}


def report(args, results: dict) -> list[dict]:
    final = results["final"]
    seeds = sorted({int(s) for rows in final.values() for s in rows})
    complete = [m for m in args.mappings if all(str(s) in final.get(m, {}) for s in seeds)]
    if len(complete) < 3 or len(seeds) < 2:
        too_few = (f"final: {len(complete)} mappings on {len(seeds)} seeds measured: too few to rank (3 mappings, "
                   "2 seeds at least)")
        if args.publish:
            raise SystemExit(f"--publish: nothing published: {too_few}")
        print(too_few)
        return []
    targets = {"finetuned": np.array([[final[m][str(s)]["finetuned"] for s in seeds] for m in complete]),
               "zeroshot": np.array([[final[m][str(s)]["zeroshot"] for s in seeds] for m in complete])}
    effect, versus = {}, {}
    for target, scores in targets.items():
        effect[target] = mapping_effect(scores)
        versus[target] = {m: paired_interval(list(scores[i]), list(scores[0])) for i, m in enumerate(complete)}
        effect[target]["vs_uniform"] = {m: iv.as_dict() for m, iv in versus[target].items() if m != complete[0]}

    def against_uniform(target: str, m: str) -> str:
        iv = versus[target][m]
        return "-" if m == complete[0] or not iv.measured else f"{iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}]"

    means = [{"mapping": m, "fine-tuned": f"{targets['finetuned'][i].mean():.2f}",
              f"- {complete[0]}, 95% t": against_uniform("finetuned", m),
              "zero-shot": f"{targets['zeroshot'][i].mean():.2f}",
              f"- {complete[0]}, 95% t ": against_uniform("zeroshot", m),
              **{t: f"{statistics.fmean(final[m][str(s)]['tasks'][t] for s in seeds):.1f}"
                 for t in final[m][str(seeds[0])]["tasks"]}} for i, m in enumerate(complete)]
    print(f"final, {len(seeds)} seeds, dev (x100):")
    print(table(means, list(means[0])))
    for target, e in effect.items():
        print(f"{target}: spread of the mapping means {e['spread']:.2f}, one run's noise (residual SD) "
              f"{e['residual_sd']:.2f}; mapping effect F({e['df'][0]}, {e['df'][1]}) = {e['F']:.2f}, p = {e['p']:.3g}")
    rows = []
    rng = np.random.default_rng(0)
    ranked = complete  # (every mapping measured: the search proposes SUPERVISION@INIT ones too, with --search-init)
    results["correlations"] = {}  # (rebuilt from what is measured now, never kept from an earlier report)
    for objective, stage in results["proxy"].items():
        for name, by_mapping in stage["fitness"].items():
            if not all(m in by_mapping and all(str(s) in by_mapping[m] for s in seeds) for m in ranked):
                continue
            values = np.array([[np.nan if by_mapping[m][str(s)] is None else by_mapping[m][str(s)] for s in seeds]
                               for m in ranked], dtype=float)
            if np.isnan(values).any():
                print(f"{objective} {name}: left out (a proxy student diverged, or the measure is undefined for a mapping)")
                continue
            secs = [s for by_seed in stage["seconds"].get(name, {}).values() for s in by_seed.values()]
            distinct = len(np.unique(np.round(values.mean(1), 6)))
            if distinct <= len(ranked) // 2:  # e.g. a fine-tune that collapses every student to the majority class
                print(f"{objective} {name}: {distinct} distinct scores over {len(ranked)} mappings: ties, ranks nothing")
                results["correlations"].setdefault(objective, {})[name] = {
                    "tied": {"distinct": distinct, "mappings": len(ranked)},
                    "seconds": statistics.fmean(secs) if secs else None}
                continue
            row = {"proxy objective": objective, "measure": name,
                   "s/eval": f"{statistics.fmean(secs):.1f}" if secs else "-"}
            for target, scores in targets.items():
                r = bootstrap_rank(values, scores[[complete.index(m) for m in ranked]], rng)
                row[f"Spearman vs {target}"] = (f"{r['spearman']['point']:+.2f} "
                                                f"[{r['spearman']['low']:+.2f}, {r['spearman']['high']:+.2f}]")
                row[f"Kendall vs {target}"] = f"{r['kendall']['point']:+.2f}"
                row[f"one seed vs {target}"] = f"{r['spearman_one_seed']['point']:+.2f}"
                results.setdefault("correlations", {}).setdefault(objective, {}).setdefault(name, {})[target] = r
            results["correlations"][objective][name]["seconds"] = statistics.fmean(secs) if secs else None
            rows.append(row)
    if rows:
        cost = ", ".join(f"{o} {statistics.fmean(st['distill_seconds'][str(s)] for s in seeds):.1f} s"
                         for o, st in results["proxy"].items() if all(str(s) in st["distill_seconds"] for s in seeds))
        print(f"proxy measures against the final outcome ({len(ranked)} mappings, seeds {seeds}; proxy "
              f"distillation per mapping and seed, shared by every measure: {cost}):")
        print(table(rows, list(rows[0])))
    results["effect"] = effect
    if args.publish:
        publish(args, results, seeds, complete)
    return rows


def publish(args, results: dict, seeds: list[int], complete: list[str]) -> None:
    """What a search's report cites (fastkd.search.measured): the correlations of every proxy measure with
    the final outcome, the setting they were measured in, and the size of the mapping effect."""
    if not results.get("correlations"):
        raise SystemExit("--publish: no proxy measure is ranked yet (run --stages proxy first)")
    proxies = {}
    for objective, by_measure in results["correlations"].items():
        stage = results["proxy"][objective]
        proxies[objective] = {"config": stage["config"], "seeds": seeds,  # (the proxy seeds ranked: the final ones)
                              "corpus_mode": proxy_corpus_mode(objective),
                              "machine": f"{stage['machine']['cpu']} ({', '.join(stage['machine']['isa'])})",
                              "distill_seconds": statistics.fmean(stage["distill_seconds"][str(s)] for s in seeds),
                              "measures": by_measure}
    path = measured.write({
        "schema": measured.SCHEMA, "benchmark": "benchmarks/proxy_vs_final.py", "published": time.strftime("%Y-%m-%d"),
        "machines": [f"{m['cpu']} ({m['cores']} cores; {', '.join(m['isa'])})" for m in results["machines"]], "teacher": args.teacher,
        "student": student_shape(load_config(args.teacher, "teacher"), len(complete[0].partition("@")[0].split(",")))
        .describe(), "corpus": measured.corpus_name(args.corpus), "mappings": complete,
        "final": {"objective": results["final"][complete[0]][str(seeds[0])]["objective"],  # (auto resolved)
                  "steps": args.final_steps, "batch": args.final_batch, "lr": args.final_lr, "warmup": args.final_warmup,
                  "judge_tasks": args.judge_tasks, "judge_steps": args.judge_steps, "seeds": seeds},
        "mapping_effect": {k: {f: v for f, v in e.items() if f != "vs_uniform"} for k, e in results["effect"].items()},
        "proxies": proxies})
    print(f"published: {path} (fastkd search reports cite it)")


def stored_interval(v: dict) -> tuple[float, float, float] | None:
    """(mean, low, high) of a stored verdict (best_mapping.json: mean and half_width), None where it makes no
    claim (fewer than 2 seeds, or no spread), as fastkd.search.verdict decides it."""
    if v.get("n", 0) < 2 or not v.get("sd") or v["sd"] <= MIN_SD or v.get("half_width") is None:
        return None
    return v["mean"], v["mean"] - v["half_width"], v["mean"] + v["half_width"]


def claim_of(v: dict) -> str:
    iv = stored_interval(v)
    if iv is None:
        return "no claim"
    return "beats" if iv[1] > 0 else "loses to" if iv[2] < 0 else "within"


def check_verdicts(args, results: dict, n_teacher: int) -> list[dict]:
    """Each search's claims against the final outcome (see the module's doc)."""
    final = results["final"]
    seeds = sorted({int(s) for rows in final.values() for s in rows})
    complete = [m for m in final if all(str(s) in final[m] for s in seeds)]
    if len(complete) < 2 or len(seeds) < 2:
        print("verdicts: the final table is too small to check a claim (2 mappings on 2 seeds at least)")
        return []
    means = {m: statistics.fmean(final[m][str(s)]["finetuned"] for s in seeds) for m in complete}
    best = max(means, key=means.get)
    rows = []
    for folder in [f for f in (args.searches or "").split(",") if f]:
        path = Path(folder) / "best_mapping.json"
        if not path.is_file():
            raise SystemExit(f"--searches: {path} does not exist (a finished fastkd search writes it)")
        found = json.loads(path.read_text())
        if found.get("teacher_layers") != n_teacher:
            raise SystemExit(f"--searches: {folder} searched a {found.get('teacher_layers')}-layer teacher; this table's "
                             f"teacher {args.teacher} has {n_teacher} layers")
        winner = found["text"]
        for name, v in found["verdicts"].items():
            claim, reference, proxy = claim_of(v), v["mapping"], stored_interval(v)
            row = {"search": folder, "winner": winner, "reference": f"{name} ({reference})", "claim": claim,
                   "proxy (95% t)": "-" if proxy is None else f"{proxy[0]:+.4f} [{proxy[1]:+.4f}, {proxy[2]:+.4f}]"}
            if winner not in complete or reference not in complete:
                missing = [m for m in (winner, reference) if m not in complete]
                row.update({"final (95% t)": f"not in the final table: add {', '.join(missing)} to --mappings",
                            "agrees": "-"})
                rows.append(row)
                continue
            a = [final[winner][str(s)]["finetuned"] for s in seeds]
            b = [final[reference][str(s)]["finetuned"] for s in seeds]
            iv = paired_interval(a, b)
            row["final (95% t)"] = f"{iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}]" if iv.measured else f"{iv.mean:+.2f}"
            if claim == "no claim":
                agrees = "-"
            elif claim == "within":
                bound = 100 * max(abs(proxy[1]), abs(proxy[2]))
                gap = means[best] - means[reference]
                agrees = (f"{'yes' if gap <= bound else 'no'}: the best final mapping ({best}) is {gap:.2f} above "
                          f"{name}, the claim allows {bound:.2f}")
                if iv.measured and (iv.low > bound or iv.high < -bound):  # the keep is right, the ±x is not
                    agrees += f"; the winner's own final difference ({iv.mean:+.2f}) lies outside ±{bound:.2f}"
            else:
                sign = 1 if claim == "beats" else -1
                low, high = sorted((sign * iv.low, sign * iv.high))  # the final interval in the claim's direction
                if iv.measured and low > 0:
                    agrees = "yes, confirmed"
                elif iv.measured and high < 0:
                    agrees = "no, contradicted"
                else:
                    agrees = f"{'yes' if sign * iv.mean > 0 else 'no'} in sign, the final interval covers 0"
            row["agrees"] = agrees
            rows.append(row)
    results["verdict_checks"] = rows
    if rows:
        print(f"the searches' claims against the final outcome (fine-tuned mean x100, {len(seeds)} final seeds, paired):")
        print(table(rows, list(rows[0])))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="final,proxy,report", help="final, proxy, report and/or verdicts, comma-separated")
    p.add_argument("--searches", default=None, help="search folders whose claims the verdicts stage checks, comma-separated")
    p.add_argument("--teacher", default="default")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--data-dir", default=str(GLUE))
    p.add_argument("--mappings", default=None,
                   help="digit strings, uniform first, e.g. 246,456,123; SUPERVISION@INIT (456@246) supervises by "
                        "one and initialises from the other (fastkd search --search-init proposes these). Default: the "
                        "ten of search_fidelity.py, and with a layer-wise --final-objective also " + ", ".join(DECOUPLED)
                        + " (under the sentence objective a decoupled student is its INIT mapping's, bit for bit)")
    p.add_argument("--final-objective", default="auto",
                   help="what final students learn (fastkd distill --objective): auto (the sentence embedding for "
                        "this teacher, so the mapping only chooses the layers kept) or a layer-wise one (tinybert, "
                        "minilmv2), where it also chooses the supervision")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--final-steps", type=int, default=400)
    p.add_argument("--final-batch", type=int, default=64)
    p.add_argument("--final-lr", type=float, default=1e-4)
    p.add_argument("--final-warmup", type=float, default=0.1)
    p.add_argument("--final-seq-len", type=int, default=128, help="the longest sentence kept, in tokens")
    p.add_argument("--judge-tasks", default="sst2,stsb,mrpc")
    p.add_argument("--judge-steps", type=int, default=72)
    p.add_argument("--judge-examples", type=int, default=1920)
    p.add_argument("--judge-lr", type=float, default=5e-4)
    p.add_argument("--judge-seq-len", type=int, default=64)
    p.add_argument("--judge-head", default="biencoder")
    p.add_argument("--proxy-objective", default=BUDGETS["full"].proxy.objective,
                   help="the objective proxy students learn (the search's --objective)")
    p.add_argument("--proxy-steps", type=int, default=None, help="the proxy's distillation steps (default: the demo's)")
    p.add_argument("--proxy-finetune-steps", type=int, default=None,
                   help="the proxy's fine-tuning steps, the full rung's (default: the demo's)")
    p.add_argument("--likeness-sentences", type=int, default=2000,
                   help="held-out sentences the likeness measures read (linear CKA is biased upwards when few)")
    p.add_argument("--work", default=None, help="where final students are distilled (default: the fastkd cache)")
    p.add_argument("--resume", action="store_true", help="keep the rows of results/NAME.json with the same settings")
    p.add_argument("--name", default="proxy_vs_final", help="results/NAME.json")
    p.add_argument("--publish", action="store_true",
                   help="with the report stage: write the correlations to fastkd/search/measured_fidelity.json, "
                        "which every fastkd search report cites")
    args = p.parse_args()
    if args.mappings is None:
        args.mappings = ",".join([m.replace(",", "") for m in MAPPINGS]
                                 + (list(DECOUPLED) if args.final_objective not in ("auto", "sentence") else []))
    args.mappings = ["@".join(",".join(part) for part in m.split("@")) for m in args.mappings.split(",")]
    # each in its one text (a default init is not written): the final and proxy tables key by it
    n_teacher = load_config(args.teacher, "teacher").num_hidden_layers
    args.mappings = list(dict.fromkeys(parse_mapping(m, len(m.partition("@")[0].split(",")), n_teacher).text
                                       for m in args.mappings))
    args.seed_list = list(range(args.seeds))
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if args.publish and "report" not in stages:
        raise SystemExit("--publish writes what the report stage ranks: add report to --stages")
    if stages <= {"report", "verdicts"} and not args.resume:
        raise SystemExit(f"--stages {args.stages} reads results/{args.name}.json: add --resume (without it the file "
                         "would be written again empty)")
    quiet_logs()
    logging.getLogger("fastkd").setLevel(logging.WARNING)
    started = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k not in ("stages", "resume", "work", "seed_list")}
    results = {"final": {}, "proxy": {}}
    if args.resume and (RESULTS / f"{args.name}.json").is_file():
        earlier = json.loads((RESULTS / f"{args.name}.json").read_text())
        earlier["settings"].setdefault("final_objective", "auto")  # (files from before the option: auto ran)
        differ = [k for k in FINAL_DECISIVE if earlier["settings"].get(k) != settings[k]] if earlier["final"] else []
        differ += [k for k in PROXY_DECISIVE if earlier["settings"].get(k) != settings[k] and earlier["proxy"]]
        if differ:
            raise SystemExit(f"--resume: results/{args.name}.json differs in {', '.join(dict.fromkeys(differ))}; "
                             "choose another --name")
        results = {k: earlier[k] for k in ("final", "proxy", "machines") if k in earlier}
    machines = results.setdefault("machines", [])  # the machines that measured (not those that only reported)
    if machine() not in machines and stages & {"final", "proxy"}:
        machines.append(machine())

    def save() -> Path:
        return write_result(args.name, {
            "settings": settings, **results, "machine": machine(),
            "note": "final: dev scores x100 (fine-tuned: mean of the judge tasks); proxy: the search's held-out "
                    "train slices (x100 for task rungs); cost columns may mix machines (see machines)",
            "minutes_this_run": round((time.perf_counter() - started) / 60, 1)})

    if "final" in stages:
        cache = TaskCache(args.data_dir)
        stsb_dev = cache.data(task_spec("stsb")).dev[0]
        work = Path(args.work) if args.work else default_cache_dir() / "bench" / args.name
        for seed in args.seed_list:  # seed-major: a partial table has every mapping at the first seeds
            for mapping in args.mappings:
                if str(seed) in results["final"].get(mapping, {}):
                    continue
                row = final_row(args, mapping, seed, work, cache, stsb_dev)
                results["final"].setdefault(mapping, {})[str(seed)] = row
                print(f"final {mapping} seed {seed}: fine-tuned {row['finetuned']:.2f} {row['tasks']}, zero-shot "
                      f"{row['zeroshot']:.2f} ({row['distill_s']:.0f} s + {row['judge_s']:.0f} s)", flush=True)
                save()
    if "proxy" in stages:
        proxy_stage(args, results, save)
    if "report" in stages:
        report(args, results)
    if "verdicts" in stages:
        check_verdicts(args, results, n_teacher)
    save()


if __name__ == "__main__":
    main()
