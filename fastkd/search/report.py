"""Search outputs: best_mapping.json, report.md, fitness.png, layers.png, ladder.png, verdict.png, written
from a SearchSummary (fastkd.search.summary), never from the live search."""

from __future__ import annotations

import math
import statistics

from ..io import atomic_write_json, atomic_write_text
from ..mapping import search_space_size
from . import measured
from .config import MEANINGFUL_HELDOUT
from .ga import genome_key
from .verdict import CONFIDENCE, overall, sentence

TOP_FRACTION = 0.25  # layers.png: the top quarter of evaluated mappings (at least 3)


def _pm(mean: float, sd: float | None) -> str:
    return f"{mean:.4f}" if sd is None or math.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def _runs(summary, genome, rung, seeds) -> list:
    return [summary.results[(genome, rung.name)][s] for s in seeds if s in summary.results.get((genome, rung.name), {})]


def _task_means(runs) -> dict[str, dict]:
    keys = dict.fromkeys(k for r in runs for k in r.tasks)
    out = {}
    for k in keys:
        rs = [r.tasks[k] for r in runs if k in r.tasks]
        out[k] = {"score": statistics.fmean(t["score"] for t in rs), "baseline_score": rs[0]["baseline_score"],
                  "collapsed_runs": sum(bool(t.get("collapsed")) for t in rs), "runs": len(rs), "task": rs[0]["task"],
                  "split": rs[0].get("eval_split", "dev")}
    return out


def verdict_lines(result: dict) -> list[str]:
    w = result["winner"]
    seeds = result["verdict_seeds"]
    lines = [f"**Winner: `{w}`** (best on the top rung with the selection seed {result['selection_seed']}); "
             f"judged on {len(seeds)} held-out verdict seed(s) {', '.join(map(str, seeds)) or '-'}:"]
    for name, v in result["verdicts"].items():
        lines.append("- " + sentence(w, name, v.mapping, v.interval))
    lines.append("- " + overall(w, [(name, v.mapping, v.interval) for name, v in result["verdicts"].items()]))
    return lines


def _splits(summary) -> str:
    teacher = summary.signal.get("teacher", {})
    return ", ".join(f"{t['task']} on {t.get('eval_split', 'dev')}" for t in teacher.values())


def markdown(summary, result: dict, seconds: float) -> str:
    cfg = summary.cfg
    M, N = summary.shape.layers, summary.N
    counters = summary.counters
    names = result["heuristic_names"]
    seed = cfg.seed
    lines = [f"# Layer-mapping search: {cfg.teacher} ({N} layers) -> {summary.shape.describe()}", ""]
    lines += verdict_lines(result) + [""]
    runs = [r for rows in summary.results.values() for r in rows.values()]
    failed = sum("failed" in r.losses for r in runs)
    if failed:
        lines.append(f"- {failed} evaluation(s) diverged during proxy distillation (non-finite losses) and were "
                     "scored -1 (the floor); lower --proxy-lr if that is frequent.")
    heldout = any(t.get("eval_split", "dev") != "dev" for t in summary.signal.get("teacher", {}).values())
    lines += [f"Scores come from: {_splits(summary)}" + (
        " (train-heldout = a slice of the training set, disjoint from the fine-tuning examples and the same for "
        "every mapping and seed; the official dev sets stay for final tables)" if heldout else "")
        + ". Fitness = mean task score, in [0, 1].", ""]

    lines += ["## Verdict: paired differences on held-out seeds", "",
              f"Every mapping below was distilled and scored on the same verdict seeds (same batches, fine-tuning "
              f"examples, order and head initialisation per seed), on the verdict slice of held-out rows where a task "
              f"has one (disjoint from the rows the winner was selected on). Interval: Student's t on the per-seed "
              f"differences winner - reference, {100 * CONFIDENCE:.0f}%.", "",
              "| reference | mapping | winner - reference | ±95% | seeds | per-seed differences |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, v in result["verdicts"].items():
        iv = v.interval
        diffs = ", ".join(f"{a - b:+.4f}" for a, b in zip(v.winner_runs, v.reference_runs))
        hw = "-" if math.isnan(iv.half_width) else f"{iv.half_width:.4f}"
        mean = "-" if math.isnan(iv.mean) else f"{iv.mean:+.4f}"
        lines.append(f"| {name} | {v.mapping} | {mean} | {hw} | {iv.n} | {diffs or '-'} |")
    group = list(dict.fromkeys([result["winner_genome"], summary.heuristics["uniform"], summary.heuristics["last"]]))
    lines += ["", "| mapping | role | top-rung fitness, verdict seeds (mean ± SD) | " +
              " | ".join(t.name for t in summary.tasks) + " |", "|" + " --- |" * (3 + len(summary.tasks))]
    for g in group:
        vr = _runs(summary, g, summary.top, summary.verdict_seeds)
        fits = [r.fitness for r in vr]
        sd = statistics.stdev(fits) if len(fits) > 1 else None
        role = "winner" if g == result["winner_genome"] else names.get(g, "")
        if g == result["winner_genome"] and g in names:
            role = f"winner = {names[g]}"
        tasks = _task_means(vr)
        cells = [("-" if t.key not in tasks else f"{100 * tasks[t.key]['score']:.1f}") for t in summary.tasks]
        lines.append(f"| {summary.mapping_text(g)} | {role} | {_pm(statistics.fmean(fits), sd) if fits else '-'} | "
                     + " | ".join(cells) + " |")
    lines.append("")

    lines += ["## Fidelity ladder", "",
              f"The GA scores every candidate on the first rung; the best {cfg.promote:g} of each rung (ceil, at "
              "least one) and uniform and last are scored on the next, all with the selection seed. Rank correlation "
              "with the top rung is over the mappings this search scored on both (a promoted, range-restricted set: "
              "benchmarks/search_fidelity.py measures it on fixed mappings).", "",
              "| rung | what | evaluations | seconds scoring | Spearman vs top | Kendall vs top | n |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    corr = result["rank_correlations"]
    for rung in summary.rungs:
        count = sum(1 for (g, r), rows in summary.results.items() if r == rung.name for _ in rows)
        secs = counters.scoring_seconds.get(rung.name, 0.0) if counters else 0.0
        c = corr.get(rung.name)
        sp = "1 (itself)" if rung is summary.top else ("-" if c is None or c["spearman"] is None else f"{c['spearman']:.2f}")
        kd = "1 (itself)" if rung is summary.top else ("-" if c is None or c["kendall"] is None else f"{c['kendall']:.2f}")
        n = "-" if rung is summary.top or c is None else str(c["n"])
        lines.append(f"| {rung.name} | {rung.describe(cfg.proxy)} | {count} | {secs:.0f} | {sp} | {kd} | {n} |")
    lines.append("")
    lines += measured.cite({"teacher": cfg.teacher, "student": summary.shape.describe(), "corpus": measured.corpus_name(cfg.corpus),
                            "corpus_mode": cfg.corpus_mode_used(), "tasks": [t.key for t in summary.tasks]},
                           cfg.proxy, [r.name for r in summary.rungs])

    lines += ["## Where the time went", "", "Phases, then what they spent it on (this invocation; a resumed "
              "search reads finished evaluations back and spends nothing on them).", "",
              "| part | seconds |", "| --- | --- |"]
    parts = dict(summary.timings)
    if counters is not None:
        parts.update({"of which: teacher forwards (proxy distillation)": counters.teacher_seconds,
                      "of which: student steps (proxy distillation)": counters.student_seconds,
                      "of which: student and loss construction": counters.build_seconds})
        parts.update({f"of which: scoring on rung {k}": v for k, v in counters.scoring_seconds.items()})
    for k, v in parts.items():
        lines.append(f"| {k} | {v:.0f} |")
    lines += [f"| wall time, this invocation | {seconds:.0f} |", ""]

    space = search_space_size(M, N, allow_none=cfg.unsupervised, monotone=cfg.monotone, with_init=cfg.search_init)
    evaluations = len(runs)
    packed = cfg.corpus_mode_used() == "packed"
    lines += ["## Search", "",
              f"- search space: {space:,} mappings ({'non-decreasing' if cfg.monotone else 'any order'}"
              f"{', unsupervised layers (-) allowed' if cfg.unsupervised else ''}"
              f"{', initial layers searched apart from the supervising ones (@)' if cfg.search_init else ''}); "
              f"{len({g for g, _ in summary.results})} distinct mappings evaluated ({evaluations} evaluations, "
              f"{summary.reused} read back from the store)",
              f"- GA: population {cfg.population}, generations {len(summary.generations)}/{cfg.generations}, selection "
              f"seed {seed}; ladder {' -> '.join(r.name for r in summary.rungs)}, promote {cfg.promote:g}; verdict seeds "
              f"{', '.join(map(str, summary.verdict_seeds)) or 'none'}",
              f"- proxy: {cfg.proxy.sequences} {'sequences' if packed else cfg.corpus_mode_used()} of "
              f"{'' if packed else 'at most '}{cfg.proxy.max_seq_len} tokens, {cfg.proxy.steps} distillation steps "
              f"at batch {cfg.proxy.batch_size}, lr {cfg.proxy.lr:g}, init {cfg.proxy.init}; fine-tuning "
              f"{cfg.proxy.finetune_steps} steps on {cfg.proxy.finetune_examples} examples per task, lr {cfg.proxy.finetune_lr:g}; "
              f"held-out slice {cfg.proxy.heldout} rows",
              f"- proxy tasks: {', '.join(t.name for t in summary.tasks)}"]
    if counters is not None:
        lines.append(f"- this invocation: {counters.teacher_forwards} teacher forwards for {counters.student_steps} student "
                     f"steps; {counters.distilled} students distilled, {counters.reused_students} promoted students "
                     "scored again without distilling again")
    lines.append("")

    sig = summary.signal
    lines += [f"## Signal check (teacher, rung {summary.top.name}, selection seed)", "",
              "| task | split | teacher | majority class | margin | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for key, t in sig.get("teacher", {}).items():
        margin = t["score"] - t["baseline_score"]
        weak = key in sig.get("weak_tasks", [])
        verdict = ("too weak, dropped" if cfg.drop_weak_tasks else "too weak (--drop-weak-tasks drops it)") if weak else "ok"
        lines.append(f"| {t['task']} | {t.get('eval_split', 'dev')} | {100 * t['score']:.1f} | {100 * t['baseline_score']:.1f} | "
                     f"{100 * margin:+.1f} | {verdict} |")
    lines.append("")
    few = {t["task"]: t["dev_examples"] for t in sig.get("teacher", {}).values()
           if 0 < t.get("dev_examples", 0) < MEANINGFUL_HELDOUT}
    if few:
        lines += [f"**The ranking below means little:** {', '.join(f'{k} is scored on {n} rows' for k, n in few.items())}; "
                  f"a score on n rows has a sampling error of about 50/sqrt(n) points (±{50 / min(few.values()) ** 0.5:.0f} "
                  f"here), more than the 1-2 points mappings differ by. Score on at least {MEANINGFUL_HELDOUT} rows "
                  "(--proxy-heldout, or tasks with larger dev sets).", ""]

    lines += ["## Every evaluated mapping (selection seed)", "",
              "Fitness per rung with the selection seed (biased upwards for the best: the verdict above uses held-out "
              "seeds only); † = collapsed (one class for >= 95% of the scored rows) on some task.", "",
              "| rank | mapping | heuristic | " + " | ".join(r.name for r in summary.rungs) + " |",
              "|" + " --- |" * (3 + len(summary.rungs))]
    genomes = {g for g, _ in summary.results if (g, summary.rungs[0].name) in summary.results}

    def best_rung_key(g):
        for depth in range(len(summary.rungs) - 1, -1, -1):
            f = summary.fitness(g, summary.rungs[depth], seed)
            if f is not None:
                return (-depth, -f, genome_key(g))
        return (1, 0.0, genome_key(g))

    for rank, g in enumerate(sorted(genomes, key=best_rung_key), start=1):
        cells = []
        for rung in summary.rungs:
            row = summary.results.get((g, rung.name), {}).get(seed)
            cells.append("-" if row is None else f"{row.fitness:.4f}" + (" †" if any(t.get("collapsed") for t in row.tasks.values()) else ""))
        text = f"**{summary.mapping_text(g)}**" if g == result["winner_genome"] else summary.mapping_text(g)
        lines.append(f"| {rank} | {text} | {names.get(g, '')} | " + " | ".join(cells) + " |")
    lines += ["", f"## Generations (rung {summary.rungs[0].name})", "",
              "| generation | best | mean | best so far | teacher forwards |", "| --- | --- | --- | --- | --- |"]
    for g in summary.generations:
        lines.append(f"| {g['generation']} | {g['best']:.4f} | {g['mean']:.4f} | {g['best_so_far']:.4f} | {g['teacher_forwards']} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fitness(summary, result: dict, path) -> None:
    plt = _pyplot()
    rung0 = summary.rungs[0]
    gens = [g["generation"] for g in summary.generations]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(gens, [g["best"] for g in summary.generations], "o-", label="best of generation")
    ax.plot(gens, [g["mean"] for g in summary.generations], "s--", label="mean of generation")
    ax.plot(gens, [g["best_so_far"] for g in summary.generations], ":", color="black", label="best so far")
    colors = {"uniform": "tab:green", "last": "tab:red", "first": "tab:purple"}
    for genome, name in result["heuristic_names"].items():
        f = summary.fitness(genome, rung0, summary.cfg.seed)
        if f is not None:
            ax.axhline(f, color=colors[name], alpha=0.7, linewidth=1, label=f"{name} ({summary.mapping_text(genome)})")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"fitness on rung {rung0.name} (selection seed)")
    ax.set_xticks(gens)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Layer-mapping search: the GA")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ladder(summary, result: dict, path) -> None:
    """Each lower rung's fitness against the top rung's, per mapping scored on both (selection seed)."""
    plt = _pyplot()
    lower = summary.rungs[:-1]
    fig, axes = plt.subplots(1, max(1, len(lower)), figsize=(4.2 * max(1, len(lower)), 3.8), dpi=120, squeeze=False)
    seed = summary.cfg.seed
    for ax, rung in zip(axes[0], lower or [summary.top]):
        pts = [(summary.fitness(g, rung, seed), summary.fitness(g, summary.top, seed), g)
               for (g, r) in summary.results if r == rung.name]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18)
        for x, y, g in pts:
            label = result["heuristic_names"].get(g)
            if label or g == result["winner_genome"]:
                ax.annotate(label or "winner", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        c = result["rank_correlations"].get(rung.name, {})
        title = f"rung {rung.name} vs {summary.top.name}"
        if c.get("spearman") is not None:
            title += f" (Spearman {c['spearman']:.2f}, n={c['n']})"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"{rung.name} fitness")
        ax.set_ylabel(f"{summary.top.name} fitness")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_verdict(summary, result: dict, path) -> None:
    """The winner minus uniform and minus last on the verdict seeds: mean, 95% interval, each seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 2.8), dpi=120)
    labels = []
    for i, (name, v) in enumerate(result["verdicts"].items()):
        iv = v.interval
        diffs = [a - b for a, b in zip(v.winner_runs, v.reference_runs)]
        ax.scatter(diffs, [i] * len(diffs), color="gray", s=12, zorder=2)
        if iv.n >= 1:
            err = 0 if math.isnan(iv.half_width) else iv.half_width
            ax.errorbar([iv.mean], [i], xerr=[[err], [err]], fmt="o", color="tab:blue", capsize=4, zorder=3)
        labels.append(f"vs {name} ({v.mapping})")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.set_xlabel(f"winner {result['winner']} - reference, top-rung fitness (95% paired t)")
    ax.set_title(f"verdict over {len(result['verdict_seeds'])} held-out seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_layers(summary, result: dict, path) -> None:
    plt = _pyplot()
    import numpy as np

    rung0, seed = summary.rungs[0], summary.cfg.seed
    genomes = [g for (g, r) in summary.results if r == rung0.name and summary.fitness(g, rung0, seed) is not None]
    ranking = sorted(genomes, key=lambda g: (-summary.fitness(g, rung0, seed), genome_key(g)))
    top = ranking[: max(3, math.ceil(TOP_FRACTION * len(ranking)))]
    M, N = summary.shape.layers, summary.N
    # the supervising layers; with --search-init also the layers the students start from
    panels = [("supervising", lambda mp: mp.layers)] + (
        [("copied at the start", lambda mp: mp.initial_layers)] if summary.cfg.search_init else [])
    fig, axes = plt.subplots(1, len(panels), figsize=((1.0 + 0.5 * N) * len(panels), 1.2 + 0.5 * M), dpi=120,
                             squeeze=False)
    for ax, (what, layers_of) in zip(axes[0], panels):
        counts = np.zeros((M, N))
        for g in top:
            for m, layer in enumerate(layers_of(summary.mapping(g))):
                if layer is not None:
                    counts[m, layer - 1] += 1
        im = ax.imshow(counts, cmap="Blues", aspect="auto")
        for m in range(M):
            for t in range(N):
                if counts[m, t]:
                    ax.text(t, m, int(counts[m, t]), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(N), [str(t + 1) for t in range(N)])
        ax.set_yticks(range(M), [str(m + 1) for m in range(M)])
        ax.set_xlabel("teacher layer")
        ax.set_ylabel("student layer")
        ax.set_title(f"teacher layer {what}, top {len(top)} on rung {rung0.name}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


PLOTS = {"fitness.png": plot_fitness, "layers.png": plot_layers, "ladder.png": plot_ladder, "verdict.png": plot_verdict}


def write_outputs(summary, result: dict) -> None:
    out = summary.output
    seconds = summary.seconds
    w = result["winner_genome"]
    top_runs = _runs(summary, w, summary.top, summary.verdict_seeds)
    fits = [r.fitness for r in top_runs]
    # No verdict seeds: the per-task numbers fall back to the selection run, and say so.
    tasks_from = "verdict seeds" if top_runs else "selection seed"
    if not top_runs:
        top_runs = _runs(summary, w, summary.top, [summary.cfg.seed])
    atomic_write_json(out / "best_mapping.json", {
        # (the supervising layers, null where unsupervised, and the ones the student starts from)
        "mapping": list(summary.mapping(w).layers), "init_layers": list(summary.mapping(w).initial_layers),
        "text": result["winner"], "teacher_layers": summary.N,
        "selection_seed": summary.cfg.seed, "selection_fitness": summary.fitness(w, summary.top, summary.cfg.seed),
        "ladder": [r.name for r in summary.rungs], "verdict_seeds": summary.verdict_seeds,
        "verdict_fitness": statistics.fmean(fits) if fits else None,
        "verdict_fitness_sd": statistics.stdev(fits) if len(fits) > 1 else None,
        "tasks": _task_means(top_runs), "tasks_from": tasks_from, "verdicts": {k: v.as_dict() for k, v in result["verdicts"].items()},
        "verdict": verdict_lines(result), "rank_correlations": result["rank_correlations"],
        "weak_tasks": summary.signal.get("weak_tasks", []), "timings_seconds": {k: round(v, 1) for k, v in summary.timings.items()},
    })
    atomic_write_text(out / "report.md", markdown(summary, result, seconds))
    for name, plot in PLOTS.items():
        tmp = out / f".{name}.tmp.png"
        plot(summary, result, tmp)
        tmp.replace(out / name)
