"""The settings of `fastkd glue` and of every fine-tune (the search's proxy tasks too): dataclasses
whose fields generate the flags. Light on purpose: the CLI builds its parser from them without
importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from ..options import PROGRESS_HELP, option, seed_value

# What the task head reads:
#   pooler          the copied CLS pooler (dense + tanh) and the family's classifier, as
#                   AutoModelForSequenceClassification builds it
#   pooler-reinit   the same, the pooler re-initialised (seeded)
#   mean            masked mean of the last hidden states -> dropout -> one linear layer
#   pipeline        the pooling mode (mean, cls or max) of the model's sentence-transformers pipeline
#                   (modules.json) -> dropout -> one linear layer; mean for a model without one. Without
#                   the pipeline's Normalize: unit-length features left the teacher's STS-B regression
#                   collapsed (6.5 and 0.0 at lr 1.5e-4 and 5e-4, where mean reached 76.5 and 74.4)
# Measured (benchmarks/glue_heads.py, results/glue_heads.json: the default teacher and two distilled
# 3-layer students, the demo's budget, 2 seeds): what held the students' fine-tuned STS-B near 15 was
# not the head but where the regression bias starts (below). With the bias at the mean label, pooler
# and mean are within seed noise (STS-B at lr 5e-4: students 63.4 and 49.2 with pooler, 54.1 and 47.3
# with mean, seed SDs up to 12; the teacher 79.3 and 82.3; SST-2 within 2.3 points, one seed), so the
# default stays the pooler.
HEADS = ("pooler", "pooler-reinit", "mean", "pipeline", "biencoder")
DEFAULT_HEAD = "pooler"
HEAD_HELP = ("what the task head reads: pooler (the checkpoint's CLS pooler and the family's classifier, as "
             "transformers builds it), pooler-reinit (the same with a fresh pooler), mean (masked mean of the last "
             "hidden states, then one linear layer), pipeline (the pooling mode of the model's sentence-transformers "
             "pipeline, mean without one) or biencoder (sentence-transformers' fine-tuning: each sentence of a pair "
             "encoded alone and pooled as pipeline does; the cosine regressed on a similarity label, a linear layer "
             "on (u, v, |u-v|) for a pair class; single sentences as pipeline)")

# Where a regression head's output bias starts. At lr 1.5e-4 the bias moves about 0.01 in 80 steps,
# far from STS-B's mean label (2.7): from 0, the short budget went into moving every prediction up,
# and the students' STS-B stayed at 8-19 with every head (the teacher's pooler collapsed at lr 5e-4:
# 11.5 and 4.0). Started at the mean label of the fine-tuning examples: students 44-46 and 32 at lr
# 1.5e-4 and 54-63 and 47-49 at 5e-4, the teacher 79-82 (2 seeds, benchmarks/glue_heads.py).
REGRESSION_BIASES = ("label-mean", "zero")
REGRESSION_BIAS_HELP = ("where a regression task's (STS-B's) output bias starts: label-mean (the mean label of the "
                        "fine-tuning examples) or zero (transformers' default)")

HELDOUT_PARTS = ("selection", "verdict")  # two disjoint slices of one fixed permutation


@dataclass
class FinetuneConfig:
    """How each (model, task) is fine-tuned and scored (`fastkd glue`'s flags are generated from it)."""

    epochs: float = option(3.0, "training epochs (ignored with --max-steps)")
    max_steps: int | None = option(None, "optimizer steps per task (overrides --epochs)")
    max_train_examples: int | None = option(None, "fine-tune on a deterministic subsample of this many training "
                                                  "examples")
    batch_size: int = option(32, "training batch size")
    lr: float = option(5e-5, "peak AdamW learning rate")
    warmup: float = option(0.1, "linear warmup, as a fraction of the steps")
    weight_decay: float = option(0.01, "AdamW weight decay (not biases/LayerNorm)")
    max_seq_len: int = option(128, "truncate each example to this many tokens")
    seed: int = option(0, "seeds the head, data order and subsample", parse=seed_value)
    bf16: bool = option(False, "bf16 autocast")
    eval_batch_size: int = option(128, "evaluation batch size")
    progress: bool = option(True, PROGRESS_HELP)
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    head: str = option(DEFAULT_HEAD, HEAD_HELP, choices=HEADS)
    regression_bias: str = option("label-mean", REGRESSION_BIAS_HELP, choices=REGRESSION_BIASES)
    # > 0: score on this many held-out *training* rows (disjoint from the fine-tuning examples, the
    # same rows for every seed and model) instead of dev, where the training set is large enough.
    heldout: int = option(0, cli=False)
    # Which of the two disjoint held-out slices scores: "selection" (a search choosing its winner)
    # or "verdict" (the held-out seeds judging it), so the winner is never judged on the rows that
    # chose it. Both slices are always kept out of the fine-tuning rows.
    heldout_part: str = option("selection", cli=False)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.eval_batch_size < 1:
            raise UserError(f"--eval-batch-size must be at least 1 (got {self.eval_batch_size})")
        if self.max_steps is None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise UserError(f"--epochs must be a positive number (got {self.epochs})")
        if self.max_seq_len < 8:
            raise UserError(f"--max-seq-len must be at least 8 (got {self.max_seq_len})")
        if not 0 <= self.warmup < 1:
            raise UserError(f"--warmup is a fraction of the steps in [0, 1) (got {self.warmup})")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay must be non-negative (got {self.weight_decay})")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1 (got {self.max_steps})")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise UserError(f"--max-train-examples must be at least 1 (got {self.max_train_examples})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be positive (got {self.lr})")
        if self.head not in HEADS:
            raise UserError(f"--head must be one of {', '.join(HEADS)} (got {self.head!r})")
        if self.regression_bias not in REGRESSION_BIASES:
            raise UserError(f"--regression-bias must be one of {', '.join(REGRESSION_BIASES)} "
                            f"(got {self.regression_bias!r})")
        if self.heldout < 0:
            raise UserError(f"the held-out slice must be 0 (score on dev) or a number of rows (got {self.heldout})")
        if self.heldout_part not in HELDOUT_PARTS:
            raise ValueError(f"heldout_part must be one of {HELDOUT_PARTS} (got {self.heldout_part!r})")


@dataclass
class GlueConfig:
    """`fastkd glue`: which models on which tasks, and how each is fine-tuned (flags generated from it)."""

    model: list[str] | None = option(None, "an exported student, any Hugging Face model directory or hub name, or "
                                           "'default' (the teacher); repeat for several models in one table",
                                     action="append", required=True, metavar="DIR|default")
    tasks: str | None = option(None, "comma-separated tasks (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli; any "
                                     "case, dashes optional) or 'all'", required=True)
    data_dir: str | None = option(None, "glue_data-style directory (TASK/train.tsv, TASK/dev.tsv), or 'hub' for "
                                        "nyu-mll/glue", required=True)
    finetune: FinetuneConfig = option(factory=FinetuneConfig, prefix="")
    skip_bad_rows: bool = option(False, "skip (and count) malformed TSV rows instead of stopping at the first")
    zeroshot_stsb: bool = option(True, "also score each sentence-embedding model (a sentence-transformers pipeline: "
                                       "modules.json) zero-shot on STS-B dev: Spearman of the cosine of its embeddings, "
                                       "no training; needs STS-B under --data-dir and the sentence-transformers package")
    output: str | None = option(None, "directory for glue.json and glue.md", required=True)
    resume: bool = option(False, "reuse finished (model, task) results in --output")

    def validate(self) -> None:
        from .tasks import parse_tasks  # (light: a task name mistake is one line before torch loads)

        parse_tasks(self.tasks)
        self.finetune.validate()
