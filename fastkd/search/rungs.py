"""The fidelity ladder: ways to score a proxy student, from cheap to faithful.

Every rung scores the same distilled student (distillation depends only on the mapping and the
seed); rungs differ in what happens after it:

| rung       | what                                                                 | cost                  |
| ---------- | -------------------------------------------------------------------- | --------------------- |
| `zeroshot` | STS-B similarity of mean-pooled embeddings, no training (task-agnostic) | forward passes only |
| `probe`    | frozen features + a linear model per proxy task (fastkd.glue.probe)   | forward passes + a linear fit |
| `short` | fine-tuning with a quarter of the proxy fine-tuning steps            | ~1/4 of `full`'s tuning |
| `full`  | the proxy fine-tuning of the paper's setting (the top rung)          | the reference         |

A ladder is a cheap-to-faithful subsequence ending in `full`, e.g. `zeroshot,full`. The GA spends its
evaluations on the first rung; successive halving promotes the best fraction (and uniform and last)
upward; the best on the top rung wins, and it and the heuristics are judged on the top rung with
held-out verdict seeds. A rung's name is part of
every stored evaluation's key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import UserError

RUNG_ORDER = ("zeroshot", "probe", "short", "full")  # cheap to faithful
SHORT_FRACTION = 0.25  # the short rung's share of the proxy fine-tuning steps


@dataclass(frozen=True)
class Rung:
    name: str

    def finetune_steps(self, full_steps: int) -> int:
        if self.name in ("zeroshot", "probe"):
            return 0
        return full_steps if self.name == "full" else max(1, math.ceil(SHORT_FRACTION * full_steps))

    def describe(self, proxy) -> str:
        if self.name == "zeroshot":
            return "zero-shot STS-B similarity (cosine of mean-pooled embeddings, no training)"
        if self.name == "probe":
            return "frozen-feature probe (mean-pooled features, linear model)"
        return f"fine-tuning, {self.finetune_steps(proxy.finetune_steps)} steps per task"

    def score(self, model, tokenizer, task_specs, cache, cfg) -> dict:
        """task key -> TaskResult dict for one model (cache: a glue TaskCache; cfg: a FinetuneConfig)."""
        from ..glue.finetune import finetune_task  # (heavy: not for the CLI's parser, which parses ladders)
        from ..glue.probe import probe_task, zero_shot_similarity

        if self.name == "zeroshot":
            return {"stsb-zeroshot": zero_shot_similarity(model, tokenizer, cache, cfg).to_dict()}
        out = {}
        for spec in task_specs:
            if self.name == "probe":
                result = probe_task(model, tokenizer, spec, cache, cfg)
            else:
                steps = replace(cfg, max_steps=self.finetune_steps(cfg.max_steps))
                result = finetune_task(model, tokenizer, spec, cache, steps, desc=f"{spec.name} ({self.name})")
            out[spec.key] = result.to_dict()
        return out


def parse_ladder(text: str) -> tuple[Rung, ...]:
    """'probe,full' -> (Rung('probe'), Rung('full')); one clear line for anything else."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if not names:
        raise UserError("--ladder is empty: give rungs from cheap to faithful, e.g. probe,full")
    unknown = [n for n in names if n not in RUNG_ORDER]
    if unknown:
        raise UserError(f"--ladder names an unknown rung {unknown[0]!r}: choose from {', '.join(RUNG_ORDER)}")
    positions = [RUNG_ORDER.index(n) for n in names]
    if positions != sorted(set(positions)):
        raise UserError(f"--ladder {text!r} is not cheap-to-faithful without repeats: order rungs as "
                        f"{' < '.join(RUNG_ORDER)}, e.g. probe,full")
    if names[-1] != "full":
        raise UserError(f"--ladder {text!r} must end with the top rung 'full' (the proxy fine-tuning verdicts are judged on)")
    return tuple(Rung(n) for n in names)


def successive_halving(fitness: dict, fraction: float) -> list:
    """The best ceil(fraction x n) genomes (at least one), best first; ties broken by the genome."""
    from .ga import genome_key

    ranked = sorted(fitness, key=lambda g: (-fitness[g], genome_key(g)))
    k = max(1, math.ceil(fraction * len(ranked) - 1e-9))
    return ranked[:k]
