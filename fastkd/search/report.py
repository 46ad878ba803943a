"""Search outputs: best_mapping.json, report.md, fitness.png, layers.png."""

from __future__ import annotations

import math
import statistics
import time

from ..io import atomic_write_json, atomic_write_text
from ..mapping import search_space_size

TOP_FRACTION = 0.25  # layers.png: the top quarter of evaluated mappings (at least 3)


def _task_means(scored) -> dict[str, dict]:
    """Per-task means over the runs the fitness uses (fresh seeds when there are any)."""
    keys = dict.fromkeys(k for r in scored.fresh for k in r.tasks)
    out = {}
    for k in keys:
        runs = [r.tasks[k] for r in scored.fresh if k in r.tasks]
        out[k] = {"score": statistics.fmean(t["score"] for t in runs),
                  "baseline_score": runs[0]["baseline_score"],
                  "collapsed_runs": sum(bool(t.get("collapsed")) for t in runs), "runs": len(runs),
                  "task": runs[0]["task"]}
    return out


def _pm(mean: float, sd: float | None) -> str:
    return f"{mean:.4f}" if sd is None or math.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def verdict_lines(result: dict) -> list[str]:
    w, sd = result["winner"], result["noise_sd"]
    lines = [f"**Winner: `{w.mapping.text}`**, mean fitness {_pm(w.mean, w.sd)} over {len(w.fresh)} fresh seeds; "
             f"noise (pooled SD of one evaluation) {sd:.4f}, so 2 SD = {2 * sd:.4f}." if not math.isnan(sd) else
             f"**Winner: `{w.mapping.text}`**, fitness {w.mean:.4f} (one seed; noise not measured: --repeats 1)."]
    runs = [r for s in result["ranking"] for r in s.runs]
    failed = sum("failed" in r.losses for r in runs)
    if failed:
        lines.append(f"- {failed} evaluation(s) diverged during proxy distillation (non-finite losses) and were "
                     "scored 0; lower --proxy-lr if that is frequent.")
    collapsed = sum(any(t.get("collapsed") for t in r.tasks.values()) for r in runs)
    if runs and collapsed / len(runs) >= 0.5:
        lines.append(f"- **Caution**: {collapsed} of {len(runs)} evaluations collapsed to one class on at least one task, "
                     "so fitness mostly measures collapse; raise the proxy fine-tuning budget or drop weak tasks.")
    for name, c in result["comparisons"].items():
        if c["mapping"] == w.mapping.text:
            lines.append(f"- The winner *is* `{name}`.")
        elif c["beats_by_2sd"] is None:
            lines.append(f"- Against `{name}` ({c['mapping']}, {_pm(c['mean'], c['sd'])}): gap {c['gap']:+.4f}, but the "
                         "noise was not measured (or measured as zero), so no claim either way.")
        elif c["beats_by_2sd"]:
            lines.append(f"- Beats `{name}` ({c['mapping']}, {_pm(c['mean'], c['sd'])}) by {c['gap']:+.4f}, "
                         "more than 2 SD: a real improvement at this budget.")
        else:
            lines.append(f"- Not distinguishable from `{name}` ({c['mapping']}, {_pm(c['mean'], c['sd'])}): "
                         f"the gap {c['gap']:+.4f} is within 2 SD.")
    return lines


def markdown(search, result: dict, seconds: float) -> str:
    cfg = search.cfg
    M, N = search.shape.layers, search.N
    counters = search._ev.counters if hasattr(search, "_ev") else None
    names = result["heuristic_names"]
    lines = [f"# Layer-mapping search: {cfg.teacher} ({N} layers) -> {search.shape.describe()}", ""]
    lines += verdict_lines(result) + [""]
    space = search_space_size(M, N, monotone=cfg.monotone)
    evaluations = sum(len(s.runs) for s in search.scored.values())
    lines += ["## Search", "",
              f"- search space: {space:,} mappings ({'non-decreasing' if cfg.monotone else 'any order'}); "
              f"{len(search.scored)} distinct mappings evaluated ({evaluations} evaluations, {search.reused} read back from the store)",
              f"- GA: population {cfg.population}, generations {len(search.generations)}/{cfg.generations}, seed {cfg.seed}; "
              f"noise: {cfg.repeats} seeds for uniform, last and the top {cfg.finalists}",
              f"- proxy: {cfg.proxy.sequences} sequences of {cfg.proxy.max_seq_len} tokens, {cfg.proxy.steps} distillation steps "
              f"at batch {cfg.proxy.batch_size}, lr {cfg.proxy.lr:g}, init {cfg.proxy.init}; fine-tuning "
              f"{cfg.proxy.finetune_steps} steps on {cfg.proxy.finetune_examples} examples per task, lr {cfg.proxy.finetune_lr:g}",
              f"- proxy tasks: {', '.join(t.name for t in search.tasks)}",
              ]
    if counters is not None:
        lines.append(f"- this invocation: {counters.teacher_forwards} teacher forwards for {counters.student_steps} student "
                     f"steps (teacher {counters.teacher_seconds:.0f} s, students {counters.student_seconds:.0f} s, "
                     f"fine-tuning {counters.finetune_seconds:.0f} s)")
    lines += [f"- wall time: {seconds / 60:.1f} min", ""]

    sig = search.signal
    lines += ["## Signal check (teacher fine-tuned with the proxy budget)", "",
              "| task | teacher | majority class | margin | verdict |", "| --- | --- | --- | --- | --- |"]
    for key, t in sig.get("teacher", {}).items():
        margin = t["score"] - t["baseline_score"]
        weak = key in sig.get("weak_tasks", [])
        verdict = ("too weak, dropped" if cfg.drop_weak_tasks else "too weak (--drop-weak-tasks drops it)") if weak else "ok"
        lines.append(f"| {t['task']} | {100 * t['score']:.1f} | {100 * t['baseline_score']:.1f} | {100 * margin:+.1f} | {verdict} |")
    lines.append("")

    task_keys = [t.key for t in search.tasks]
    header = "| rank | mapping | heuristic | fitness | seeds | " + " | ".join(
        f"{search.cache.data(t).task.name} (vs majority)" for t in search.tasks) + " |"
    lines += ["## Every evaluated mapping", "", "Fitness and task scores (x100) are means over fresh seeds where a mapping "
              "has them (the GA's selection seed is left out: it is biased for the finalists), else the one selection "
              "run; the change against the majority class in brackets; † = collapsed (one class for >= 95% of dev) "
              "in at least one seed.", "", header,
              "|" + " --- |" * (5 + len(task_keys))]
    for rank, s in enumerate(result["ranking"], start=1):
        tasks = _task_means(s)
        cells = []
        for k in task_keys:
            t = tasks.get(k)
            cells.append("-" if t is None else f"{100 * t['score']:.1f} ({100 * (t['score'] - t['baseline_score']):+.1f})"
                         + (" †" if t["collapsed_runs"] else ""))
        mark = names.get(s.mapping.layers, "")
        text = f"**{s.mapping.text}**" if s is result["winner"] else s.mapping.text
        lines.append(f"| {rank} | {text} | {mark} | {_pm(s.mean, s.sd)} | {len(s.fresh)} | " + " | ".join(cells) + " |")
    lines += ["", "## Generations", "", "| generation | best | mean | best so far | teacher forwards |", "| --- | --- | --- | --- | --- |"]
    for g in search.generations:
        lines.append(f"| {g['generation']} | {g['best']:.4f} | {g['mean']:.4f} | {g['best_so_far']:.4f} | {g['teacher_forwards']} |")
    return "\n".join(lines) + "\n"


def plot_fitness(search, result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [g["generation"] for g in search.generations]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(gens, [g["best"] for g in search.generations], "o-", label="best of generation")
    ax.plot(gens, [g["mean"] for g in search.generations], "s--", label="mean of generation")
    ax.plot(gens, [g["best_so_far"] for g in search.generations], ":", color="black", label="best so far")
    colors = {"uniform": "tab:green", "last": "tab:red", "first": "tab:purple"}
    for genome, name in result["heuristic_names"].items():
        s = search.scored.get(genome)
        if s is not None:
            ax.axhline(s.mean, color=colors[name], alpha=0.7, linewidth=1, label=f"{name} ({s.mapping.text})")
    sd = result["noise_sd"]
    if not math.isnan(sd):
        w = result["winner"]
        ax.axhspan(w.mean - 2 * sd, w.mean + 2 * sd, color="gray", alpha=0.15, label="winner ± 2 SD")
    ax.set_xlabel("generation")
    ax.set_ylabel("proxy fitness (mean task score)")
    ax.set_xticks(gens)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Layer-mapping search")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_layers(search, result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ranking = result["ranking"]
    top = ranking[: max(3, math.ceil(TOP_FRACTION * len(ranking)))]
    M, N = search.shape.layers, search.N
    counts = np.zeros((M, N))
    for s in top:
        for m, g in enumerate(s.mapping.layers):
            if g is not None:
                counts[m, g - 1] += 1
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * N, 1.2 + 0.5 * M), dpi=120)
    im = ax.imshow(counts, cmap="Blues", aspect="auto")
    for m in range(M):
        for g in range(N):
            if counts[m, g]:
                ax.text(g, m, int(counts[m, g]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(N), [str(g + 1) for g in range(N)])
    ax.set_yticks(range(M), [str(m + 1) for m in range(M)])
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("student layer")
    ax.set_title(f"teacher layer chosen, top {len(top)} mappings", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(search, result: dict) -> None:
    out = search.output
    seconds = time.perf_counter() - search.started
    w = result["winner"]
    atomic_write_json(out / "best_mapping.json", {
        "mapping": list(w.mapping.layers), "text": w.mapping.text, "teacher_layers": search.N,
        "fitness": w.mean, "fitness_sd": None if math.isnan(w.sd) else w.sd, "seeds": len(w.fresh),
        "tasks": _task_means(w), "noise_sd": None if math.isnan(result["noise_sd"]) else result["noise_sd"],
        "comparisons": result["comparisons"], "weak_tasks": search.signal.get("weak_tasks", []),
    })
    atomic_write_text(out / "report.md", markdown(search, result, seconds))
    for name, plot in (("fitness.png", plot_fitness), ("layers.png", plot_layers)):
        tmp = out / f".{name}.tmp.png"
        plot(search, result, tmp)
        tmp.replace(out / name)
