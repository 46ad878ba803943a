"""The search's settings (`fastkd search`'s flags are generated from them) and what a fitness value
means (the store key). Light on purpose: the CLI builds its parser from these without importing
torch; what the key needs from the heavy modules is imported where it is computed."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

from ..corpus.cache import check_corpus_source
from ..errors import UserError
from ..file_identity import file_identity, legacy_file_identity
from ..glue.config import FinetuneConfig
from ..glue.tasks import ZERO_SHOT_TASK, parse_tasks, task_spec
from ..options import (CORPUS_MODE_HELP, CORPUS_MODES, LOSS_BACKEND_HELP, LOSS_BACKENDS, MAX_SEED, OBJECTIVE_HELP,
                       OBJECTIVES, PROGRESS_HELP, RELATION_HEADS_HELP, REPORT_TO, option, seed_problem, seed_value)
from .ga import GAConfig
from .rungs import Rung, parse_ladder

RECIPE_VERSION = 3  # bump when proxy training changes what a fitness value means (2: held-out slices;
#                    3: a regression head's bias starts at the mean label)
SEED_STRIDE = 1000  # verdict seeds: seed + k * SEED_STRIDE, k = 1..n

_FINETUNE_FLAGS = {"--batch-size": "--proxy-finetune-batch-size", "--max-seq-len": "--proxy-finetune-seq-len",
                   "--max-steps": "--proxy-finetune-steps", "--max-train-examples": "--proxy-finetune-examples",
                   "--lr ": "--proxy-finetune-lr "}



def proxy_tasks(text: str) -> tuple[str, ...]:
    """--proxy-tasks: task keys, normalised ('SST-2' -> 'sst2'), so equal settings key the store alike."""
    return tuple(t.key for t in parse_tasks(text, "--proxy-tasks"))


# Held-out rows a proxy score is taken on: below MIN_HELDOUT a task's metric is degenerate (refused);
# below MEANINGFUL_HELDOUT its sampling error (about 50/sqrt(n) points) exceeds the 1-2 points mappings
# differ by (the report says so).
MIN_HELDOUT = 4
MEANINGFUL_HELDOUT = 100

# The objectives without a layer-wise term (fastkd.losses.OBJECTIVES, kept here without importing torch, which
# one-line refusals must not wait for; a test checks the two agree): under them a mapping only chooses the
# layers a student starts from.
NO_LAYER_TERMS = ("sentence",)


@dataclass(frozen=True)
class ProxyConfig:
    """Everything that determines a candidate's fitness besides its mapping and seed (the search's
    --proxy-* flags are generated from it)."""

    sequences: int = option(1024, "corpus sequences sampled for proxy distillation (deterministic, by --seed)")
    steps: int = option(100, "distillation steps per candidate")
    batch_size: int = option(16, "distillation batch size")
    max_seq_len: int = option(64, "tokens per proxy sequence", flag="--proxy-seq-len")
    lr: float = option(5e-4, "distillation learning rate")
    init: str = option("teacher", "proxy students start from their mapped teacher layers, or random",
                       choices=("teacher", "random"))
    tasks: tuple[str, ...] = option(("sst2", "mrpc", "rte"), "GLUE tasks whose mean score is the fitness",
                                    parse=proxy_tasks)
    finetune_steps: int = option(100, "fine-tuning steps per proxy task")
    finetune_examples: int = option(1000, "training examples per proxy task")
    finetune_batch: int = option(32, "fine-tuning batch size", flag="--proxy-finetune-batch-size")
    finetune_lr: float = option(1e-4, "fine-tuning learning rate (small students like it high)")
    finetune_seq_len: int = option(128, "fine-tuning max length")
    # autocast for proxy distillation (teacher and students) and fine-tuning
    bf16: bool = option(False, "bf16 autocast for proxy distillation and fine-tuning (faster on CPUs with "
                               "AVX512-BF16/AMX and on GPUs)")
    # Score on this many held-out training rows (disjoint from the fine-tuning examples, the same for
    # every mapping and seed) where a task's train set can spare them; dev otherwise. 0 = dev always.
    heldout: int = option(2000, "score each proxy task on this many held-out training rows (disjoint from the "
                                "fine-tuning examples) where its train set can spare them, else on dev; 0 = always dev")
    # What the proxy students learn: the objective whose mapping is searched (MiniLMv2 found an
    # upper-middle teacher layer better than the last: the search can find that).
    objective: str = option("tinybert", OBJECTIVE_HELP, flag="--objective", choices=OBJECTIVES)
    relation_heads: int | None = option(None, RELATION_HEADS_HELP, flag="--relation-heads")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        if self.objective == "tinybert" and self.relation_heads is None:  # stores from before objectives resume
            d.pop("objective")
            d.pop("relation_heads")
        return d

    def finetune_config(self, seed: int, progress: bool = False, part: str = "selection") -> FinetuneConfig:
        """part: which held-out slice scores ("selection" for the GA and the ladder, "verdict" for the verdict)."""
        return FinetuneConfig(max_steps=self.finetune_steps, max_train_examples=self.finetune_examples,
                              batch_size=self.finetune_batch, lr=self.finetune_lr, max_seq_len=self.finetune_seq_len,
                              seed=seed, bf16=self.bf16, progress=progress, heldout=self.heldout, heldout_part=part)


def _resolved(path: str) -> str:
    return path if path == "hub" or not Path(path).exists() else str(Path(path).resolve())


def _identity(path: Path, name: str, legacy: bool = False) -> list:
    """A file's identity (see fastkd.file_identity); legacy: the [resolved path, size, mtime] that stores
    written before it was a digest hold. A file that cannot be read is one line, not a traceback."""
    if not path.is_file():
        raise UserError(f"{path} is not a regular file: a search reads it (move it out of {path.parent})")
    try:
        return legacy_file_identity(path) if legacy else file_identity(path, name)
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}): make it readable, or move it out of "
                        f"{path.parent}") from None


def _model_path(name: str):
    from ..models import resolve_model_path

    return resolve_model_path(name)


def _model_identity(name: str, legacy: bool = False) -> list:
    path = Path(_model_path(name))
    if not path.is_dir():
        return [name]  # a hub name: its revision is the hub's business
    return [_identity(p, p.name, legacy) for p in sorted(path.iterdir())
            if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt")]


def verdict_seeds_value(text: str):
    """'4' -> 4 (a count); '11,12' -> (11, 12); '11,' -> (11,); anything else is refused in one line."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [int(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a comma-separated list of seeds") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give a count >= 0 or non-negative seeds")
    if len(values) > 1 or "," in text:
        bad = next((v for v in values if seed_problem(v) is not None), None)
        if bad is not None:
            raise argparse.ArgumentTypeError(f"{text!r}: seed {bad} is out of range (0 to {MAX_SEED})")
        return tuple(values)
    return values[0]


SEARCH_GROUPS = {"models": "models", "data": "data", "proxy": "proxy setting (what a fitness value means)",
                 "ga": "genetic algorithm, fidelity ladder and verdict", "output": "output"}


@dataclass
class SearchConfig:
    """`fastkd search`: every setting, its flag and its help (the CLI is generated from this)."""

    output: str = option(None, "search directory", group="output", required=True)
    corpus: str = option(None, "text file/directory or hub dataset, as for distill", group="data", required=True)
    data_dir: str = option(None, "glue_data-style directory with the proxy tasks, or 'hub'", group="data",
                           required=True)
    teacher: str = option("default", "teacher directory, hub name, 'default' (all-MiniLM-L6-v2) or 'mpnet-base' (all-mpnet-base-v2)", group="models")
    student_layers: int = option(3, "number of student layers M", group="models")
    student_hidden: int | None = option(None, "student hidden size (default: the teacher's)", group="models")
    student_heads: int | None = option(None, "student heads (default: keep the head width)", group="models")
    student_ffn: int | None = option(None, "student FFN size", group="models")
    proxy: ProxyConfig = option(factory=ProxyConfig, group="proxy")
    drop_weak_tasks: bool = option(False, "drop a proxy task on which the teacher itself does not beat the majority "
                                          "class by 5 points", group="proxy")
    population: int = option(8, "mappings per generation (P)", group="ga")
    generations: int = option(4, "generations (G)", group="ga")
    monotone: bool = option(False, "only non-decreasing mappings", group="ga")
    unsupervised: bool = option(False, "also propose mappings that leave some student layers without a teacher layer "
                                       "(MiniLM-style, '-' in the mapping: such a layer is not supervised and starts "
                                       "from the uniform mapping's teacher layer)", group="ga")
    search_init: bool = option(False, "also search which teacher layers the student starts from, apart from the ones "
                                      "that supervise it (sentence-transformers' layers_to_keep; written "
                                      "SUPERVISION@INIT, e.g. 4,5,6@2,4,6, which fastkd distill --mapping takes): the "
                                      "space grows N^M times (C(N+M-1, M) with --monotone, whose initial layers are "
                                      "non-decreasing too); without it each student layer starts from the layer "
                                      "supervising it", group="ga")
    ladder: str = option("zeroshot,full", "rungs from cheap to faithful, ending in full: zeroshot (STS-B similarity "
                                          "of mean-pooled embeddings, no training), probe (frozen features + a linear "
                                          "model per proxy task), short (a quarter of the fine-tuning steps), full "
                                          "(the proxy fine-tuning); the GA runs on the first", group="ga")
    promote: float = option(0.5, "fraction of a rung's mappings scored on the next rung", group="ga")
    verdict_seeds: int | tuple[int, ...] = option(
        4, "held-out seeds judging the winner against uniform and last: a count N (seeds SEED+1000, ..., "
           "SEED+N*1000) or a list like 11,12,13 (one explicit seed: '11,'); fewer than 2 means no claim",
        group="ga", parse=verdict_seeds_value)
    chunk: int = option(8, "candidates distilled together (lower it to save memory)", group="ga",
                        flag="--proxy-chunk")
    loss_backend: str | None = option(None, LOSS_BACKEND_HELP, group="ga", choices=LOSS_BACKENDS)  # rounding only
    seed: int = option(0, "seeds the GA, the corpus sample and the evaluations", group="ga", parse=seed_value)
    resume: bool = option(False, "continue an interrupted search; finished evaluations are reused", group="output")
    report_to: str = option("none", "also write each generation's numbers as TensorBoard scalars under "
                                    "OUTPUT/tensorboard", group="output", choices=REPORT_TO)
    progress: bool = option(True, PROGRESS_HELP, group="output")
    corpus_mode: str = option("auto", CORPUS_MODE_HELP + "; auto: sentences for the sentence objective, else packed",
                              group="data", choices=("auto", *CORPUS_MODES))
    cache_dir: str | None = option(None, "tokenized corpus cache (default $FASTKD_CACHE or ~/.cache/fastkd)",
                                   group="data")
    num_proc: int | None = option(None, "processes tokenizing the corpus (default: the machine's cores, at most 8)",
                                  group="data")

    def ga_config(self) -> GAConfig:
        return GAConfig(population=self.population, generations=self.generations, monotone=self.monotone,
                        allow_none=self.unsupervised, search_init=self.search_init, seed=self.seed)

    def rungs(self) -> tuple[Rung, ...]:
        return parse_ladder(self.ladder)

    def verdict_seed_list(self) -> list[int]:
        """Held-out seeds for the verdict; never the selection seed (the GA chose the winner on it)."""
        if isinstance(self.verdict_seeds, int):
            return [self.seed + k * SEED_STRIDE for k in range(1, self.verdict_seeds + 1)]
        return list(dict.fromkeys(int(s) for s in self.verdict_seeds))

    def fitness_settings(self, legacy: bool = False) -> dict:
        """What determines a fitness value (the store key), apart from the mapping and the seed:
        the settings, and the identity (name, size, SHA-256) of the teacher, corpus and task files,
        so a re-exported teacher or edited data is not mistaken for the old one, and a copied one is.
        legacy: the files' identities as stores written before they were digests hold them (path, size,
        mtime), so such a store still resumes while its files are unchanged."""
        from ..corpus import corpus_identity, legacy_corpus_identity  # (heavy: imported when a search runs)
        from ..losses import objective_weights
        from ..sentence import read_pooling

        tasks = parse_tasks(",".join(self.proxy.tasks))
        if any(r.name == "zeroshot" for r in self.rungs()):
            tasks = list(dict.fromkeys(tasks + [task_spec(ZERO_SHOT_TASK)]))  # its files matter too
        data = Path(self.data_dir)
        task_files = [] if str(self.data_dir) == "hub" else [
            _identity(p, f"{t.name}/{p.name}", legacy) for t in tasks for p in sorted((data / t.name).glob("*.tsv"))]
        # (recipe 3 changed only how a regression task is fine-tuned: other stores keep their key, and resume)
        recipe = RECIPE_VERSION if any(t.is_regression for t in parse_tasks(",".join(self.proxy.tasks))) else 2
        corpus = legacy_corpus_identity(self.corpus) if legacy else corpus_identity(self.corpus)
        return {"recipe": recipe, "teacher": self.teacher, "teacher_files": _model_identity(self.teacher, legacy),
                "student": [self.student_layers, self.student_hidden, self.student_heads, self.student_ffn],
                "corpus": corpus, "data_dir": _resolved(self.data_dir), "task_files": task_files,
                "proxy": self.proxy.as_dict(), "drop_weak_tasks": self.drop_weak_tasks, "sample_seed": self.seed,
                "ladder": [r.name for r in self.rungs()],
                **({"corpus_mode": self.corpus_mode_used()} if self.corpus_mode_used() != "packed" else {}),  # (older keys stay)
                # how the sentence term pools is part of what a fitness means (only where it runs: older keys stay)
                **({"sentence_pooling": read_pooling(_model_path(self.teacher)).describe()}
                   if objective_weights(self.proxy.objective).sentence else {})}

    def corpus_mode_used(self) -> str:
        """--corpus-mode, `auto` made concrete as distill makes it: sentences for the sentence objective."""
        if self.corpus_mode != "auto":
            return self.corpus_mode
        return "sentences" if self.proxy.objective == "sentence" else "packed"

    def validate(self) -> None:
        self.ga_config().validate()
        self.rungs()
        if self.search_init and self.proxy.init != "teacher":
            raise UserError(f"--search-init searches which teacher layers a student copies, but --proxy-init "
                            f"{self.proxy.init} copies none: use --proxy-init teacher or drop --search-init")
        if self.search_init and self.proxy.objective in NO_LAYER_TERMS:
            raise UserError(f"--search-init with --objective {self.proxy.objective}: no layer is supervised, so the "
                            "mapping only chooses the layers a student starts from, which the search already "
                            "ranges over without --search-init: drop it, or choose a layer-wise objective")
        if not (isinstance(self.promote, (int, float)) and 0 < self.promote <= 1):
            raise UserError(f"--promote is the fraction of a rung's mappings promoted to the next rung: give a "
                            f"number in (0, 1] (got {self.promote})")
        if self.num_proc is not None and self.num_proc < 1:
            raise UserError(f"--num-proc must be at least 1 (got {self.num_proc})")
        if isinstance(self.verdict_seeds, int) and self.verdict_seeds < 0:
            raise UserError(f"--verdict-seeds must be a count >= 0 or a list of seeds (got {self.verdict_seeds})")
        if seed_problem(self.seed) is not None:
            raise UserError(seed_problem(self.seed))
        if isinstance(self.verdict_seeds, int) and self.seed + self.verdict_seeds * SEED_STRIDE > MAX_SEED:
            # (said before the list is made: a count of 10**10 would take the machine's memory first)
            raise UserError(f"--verdict-seeds {self.verdict_seeds}: held-out seed "
                            f"{self.seed + self.verdict_seeds * SEED_STRIDE} is past {MAX_SEED}, the largest seed "
                            f"numpy takes (a count N uses --seed + 1000, ..., --seed + N*1000): choose a smaller "
                            "--seed or count, or list the seeds")
        if self.seed in self.verdict_seed_list():
            raise UserError(f"--verdict-seeds {','.join(map(str, self.verdict_seed_list()))} include the selection seed "
                            f"{self.seed}: verdict seeds must be held out from selection; choose other seeds")
        if any(s < 0 for s in self.verdict_seed_list()):
            raise UserError("--verdict-seeds must be non-negative")
        past = [s for s in self.verdict_seed_list() if seed_problem(s) is not None]
        if past:  # a list from a config file
            raise UserError(f"--verdict-seeds: held-out seed {past[0]} is past {MAX_SEED}, the largest seed numpy "
                            "takes: list smaller seeds")
        if self.proxy.heldout < 0:
            raise UserError(f"--proxy-heldout must be 0 (score on dev) or a number of rows (got {self.proxy.heldout})")
        if 0 < self.proxy.heldout < MIN_HELDOUT:  # correlations and MCC are 0 or +-1 there: every fitness ties
            raise UserError(f"--proxy-heldout {self.proxy.heldout} is too few rows to score a task on (Pearson, "
                            f"Spearman and MCC mean nothing below {MIN_HELDOUT}): give at least "
                            f"{MEANINGFUL_HELDOUT} rows (or 0 to score on dev)")
        if self.proxy.heldout == 0 and any(r.name == "zeroshot" for r in self.rungs()):
            raise UserError("--ladder zeroshot needs held-out STS-B training rows (--proxy-heldout > 0): with 0 it would "
                            "select on the STS-B dev set that final tables report")
        if self.corpus:
            check_corpus_source(self.corpus)  # (light: no torch) a mistaken path is one line before anything loads
        try:
            self.proxy.finetune_config(self.seed).validate()
        except UserError as exc:  # name the search's own flag, not the GLUE one
            message = str(exc)
            for glue_flag, search_flag in _FINETUNE_FLAGS.items():
                message = message.replace(glue_flag, search_flag)
            raise UserError(message) from None
        for name, value, low in (("--proxy-chunk", self.chunk, 1), ("--proxy-steps", self.proxy.steps, 1),
                                 ("--proxy-sequences", self.proxy.sequences, 1),
                                 ("--proxy-finetune-steps", self.proxy.finetune_steps, 1)):
            if value < low:
                raise UserError(f"{name} must be at least {low} (got {value})")
