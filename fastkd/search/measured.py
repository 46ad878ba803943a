"""How faithfully the search's ladder ranks mappings, measured against fully distilled students (issue 24).

benchmarks/proxy_vs_final.py distils fixed mappings the way a user would (the whole corpus, at least 10x
the proxy's tokens), judges each student by fine-tuning and by zero-shot STS-B, and ranks every measure
of the proxy (the ladder's rungs and cheaper ones) against that outcome. `--publish` writes the summary
to measured_fidelity.json beside this module (shipped with the package); a search's report.md cites it
for the rungs it ran, and names every way the search differs from what was measured (teacher, student,
corpus, objective, proxy budget, tasks scored), because a correlation measured in one setting is
evidence, not a guarantee, in another.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ..io import atomic_write_json

log = logging.getLogger(__name__)

MEASURED = Path(__file__).with_name("measured_fidelity.json")
SCHEMA = 1  # what cite() reads; a file of another schema is not cited
TARGETS = {"finetuned": "fine-tuned", "zeroshot": "zero-shot STS-B"}
BUDGET_KEYS = ("sequences", "steps", "batch_size", "tasks", "finetune_steps", "finetune_examples", "bf16")


def corpus_name(corpus: str) -> str:
    """How a corpus is named here (a search and the benchmark name theirs alike): a file by its name, a
    directory by its name and its files', a hub dataset as given."""
    path = Path(corpus)
    try:
        if path.is_dir():
            return f"{path.name}/ ({', '.join(sorted(p.name for p in path.iterdir() if p.is_file()))})"
        return path.name if path.exists() else corpus
    except OSError:  # (an unreadable folder: the search read it before, so this is rare; name it as given)
        return corpus


def load(path: Path | None = None) -> dict | None:
    """The measured summary (default: the one shipped), or None where there is none or it cannot be read
    (said in one line: a report without the citation is still a report)."""
    path = path or MEASURED
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s): the search report cites no measured fidelity", path, e)
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        log.warning("%s has another layout than this fastkd reads (schema %s, expected %s): the search report cites "
                    "no measured fidelity", path, data.get("schema") if isinstance(data, dict) else None, SCHEMA)
        return None
    return data


def write(summary: dict, path: Path | None = None) -> Path:
    path = path or MEASURED
    atomic_write_json(path, summary)
    return path


def _interval(r: dict) -> str:
    if not all(math.isfinite(r[k]) for k in ("point", "low", "high")):
        return "-" if not math.isfinite(r["point"]) else f"{r['point']:+.2f}"
    return f"{r['point']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"


def differences(measured: dict, stage: dict, search: dict, proxy: dict) -> list[str]:
    """What of this search differs from the measured setting, one phrase each (empty: the same). search:
    its teacher, student (StudentShape.describe()), corpus (file name), corpus_mode and scored tasks."""
    out = []
    for key, theirs in (("teacher", measured["teacher"]), ("student", measured["student"]),
                        ("corpus", measured["corpus"]), ("corpus_mode", stage["corpus_mode"])):
        if search[key] != theirs:
            out.append(f"{key} {search[key]} (measured: {theirs})")
    config = stage["config"]
    for key in sorted(set(config) | set(proxy)):
        if key == "objective":  # (the measurement is chosen by it)
            continue
        if proxy.get(key) != config.get(key):
            theirs = config[key] if key in config else "not recorded"
            out.append(f"proxy {key} {proxy.get(key, 'not set')} (measured: {theirs})")
    if list(search["tasks"]) != list(config.get("tasks", search["tasks"])):  # (also where --drop-weak-tasks dropped some)
        out.append(f"tasks scored {', '.join(search['tasks'])} (measured: {', '.join(config.get('tasks', []))})")
    return out


def cite(search: dict, proxy, rungs: list[str], measured: dict | None = None) -> list[str]:
    """Markdown lines for a search report: the measured fidelity of the rungs this search ran. search: see
    differences(); proxy: its ProxyConfig; measured: the summary (default: the one shipped)."""
    measured = load() if measured is None else measured
    head = ["## Fidelity against final students (measured on fixed mappings)", ""]
    if measured is None:
        return head + ["No measurement ships with this fastkd: how faithfully any rung ranks mappings for the student "
                       "a user ends up with is unknown (benchmarks/proxy_vs_final.py measures it).", ""]
    try:
        return head + _cited(measured, search, proxy, rungs) + [""]
    except (KeyError, TypeError, IndexError, ValueError) as e:  # a damaged file: the report goes on without it
        log.warning("the measured fidelity cannot be cited (%s: %s): the report goes on without it", type(e).__name__, e)
        return head + [f"The shipped measurement ({MEASURED.name}) is incomplete ({type(e).__name__}: {e}); nothing "
                       "is cited.", ""]


def _cited(measured: dict, search: dict, proxy, rungs: list[str]) -> list[str]:
    objective = proxy.objective
    stage = measured["proxies"].get(objective)
    if stage is None:
        return [f"{measured['benchmark']} measured proxy students of {', '.join(sorted(measured['proxies']))}, not of "
                f"this search's objective {objective}: how faithfully its rungs rank mappings for the student a user "
                "ends up with is unknown."]
    final, config = measured["final"], stage["config"]
    n_seeds = len(final["seeds"])
    budget = ", ".join(f"{k} {','.join(config[k]) if k == 'tasks' else config[k]}" for k in BUDGET_KEYS if k in config)
    lines = [
        f"{measured['benchmark']} (published {measured['published']}; final students measured on "
        f"{'; '.join(measured['machines'])}, proxy students on {stage['machine']}): "
        f"{len(measured['mappings'])} fixed mappings ({', '.join(measured['mappings'])}) of the {measured['teacher']} "
        f"teacher into {measured['student']}, each distilled as a user would on {measured['corpus']} "
        f"({final['steps']} steps x {final['batch']} sentences, lr {final['lr']:g}, warmup {final['warmup']:g}, objective "
        f"{final['objective']}) on {n_seeds} seeds, "
        f"then judged by fine-tuning ({final['judge_tasks']}, mean of dev scores) and by zero-shot STS-B (dev). "
        f"Proxy students of objective {objective} ({budget}) on the same {n_seeds} seeds. Spearman of per-mapping "
        "means with 95% bootstrap intervals (mappings and seeds resampled); 'one seed': the mean Spearman of a "
        "single proxy seed, which is how this search ranks (its selection seed).", "",
        "| measure | a rung this search ran | one seed vs fine-tuned | " + " | ".join(f"Spearman vs {v}" for v in
                                                                                   TARGETS.values())
        + " | Kendall vs fine-tuned | seconds per evaluation |",
        "| --- | --- | --- | " + "--- | " * len(TARGETS) + "--- | --- |"]
    measures = stage["measures"]
    for name, m in measures.items():
        if "tied" in m:  # (e.g. a fine-tune that collapses every student to the majority class)
            lines.append(f"| {name} | {'yes' if name in rungs else ''} | ties: {m['tied']['distinct']} distinct scores "
                         f"over {m['tied']['mappings']} mappings, ranks nothing | " + " | ".join("-" for _ in TARGETS)
                         + f" | - | {'-' if m.get('seconds') is None else format(m['seconds'], '.1f')} |")
            continue
        one = _interval(m["finetuned"]["spearman_one_seed"]) if "finetuned" in m else "-"
        cells = [_interval(m[t]["spearman"]) if t in m else "-" for t in TARGETS]
        kendall = "-" if "finetuned" not in m else _interval({**m["finetuned"]["kendall"], "low": math.nan,
                                                               "high": math.nan})  # (its point only)
        secs = "-" if m.get("seconds") is None else f"{m['seconds']:.1f}"
        lines.append(f"| {name} | {'yes' if name in rungs else ''} | {one} | " + " | ".join(cells)
                     + f" | {kendall} | {secs} |")
    for rung in rungs:
        if rung not in measures:
            lines.append(f"| {rung} | yes | not measured | " + " | ".join("-" for _ in TARGETS) + " | - | - |")
    lines += ["", f"Every measure also pays for the proxy distillation: {stage['distill_seconds']:.1f} s per mapping "
                  "and seed there."]
    effect = measured.get("mapping_effect", {}).get("finetuned")
    if effect:
        noise = effect["residual_sd"] / math.sqrt(n_seeds)
        lines.append(f"The final fine-tuned means of the mappings spread over {effect['spread']:.2f} points; one run's "
                     f"noise is {effect['residual_sd']:.2f}, a {n_seeds}-seed mean's {noise:.2f} (mapping effect "
                     f"F({effect['df'][0]}, {effect['df'][1]}) = {effect['F']:.2f}, p = {effect['p']:.3g})."
                     + ("" if effect["p"] < 0.05 else " The mappings' final scores are not told apart from noise at "
                        "this scale, so a correlation with them says little: no rung can rank what does not differ."))
    differ = differences(measured, stage, search, proxy.as_dict())
    lines.append("This search matches the measured teacher, student, corpus, objective and proxy budget; the mappings "
                 "it found were not themselves measured." if not differ else
                 "This search differs from the measured setting in: " + "; ".join(differ)
                 + ". The correlations are evidence for it, not a measurement of it.")
    return lines
