"""What a distillation run is before it trains: its settings checked against the teacher and the
output folder (nothing loaded yet), `auto` made concrete, and the models and loss built. Shared by the
one-process run (local.py) and the ZeRO run (zero.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import NON_DETERMINING, DistillConfig, read_run_config
from ..corpus import check_cache_dir, parse_sample, same_corpus
from ..errors import UserError
from ..device import pick_device
from ..families import compile_refusal, family_of, usable_positions
from ..rundir import RunDir, check_writable_dir, refuse_busy_output, refuse_foreign_output
from ..losses import OBJECTIVES, DistillLoss, loss_weights, objective_weights, relation_heads, sentence_pooling
from ..mapping import LayerMapping, parse_mapping
from ..memory import StepMemory, check_step_fits, step_memory
from ..models import (build_student, check_weight_files, load_config, load_student_dir, load_teacher, load_tokenizer,
                      require_teacher_family, resolve_model_path, student_shape)
from ..sentence import has_pipeline, read_pooling
from ..training import StepEngine

log = logging.getLogger(__name__)

DEFAULT_STUDENT_LAYERS = 3


LOSS_KEYS = ("objective", "w_embedding", "w_hidden", "w_attention", "w_attention_kl", "w_value_kl", "w_relation",
             "w_sentence")


def comparable(config: dict) -> dict:
    """A run's settings with the loss given as the weights it resolves to: `--objective minilm` and the
    same weights spelled with --w-* are one run, and a config.json from before objectives (explicit
    weights, no objective) still resumes."""
    objective = config.get("objective") or "tinybert"
    if objective not in OBJECTIVES:
        return config  # refused by validate with one line
    weights = objective_weights(objective, **{k[2:]: config.get(k) for k in LOSS_KEYS[1:]})
    out = {k: v for k, v in config.items() if k not in LOSS_KEYS}
    out["loss_weights"] = weights.as_dict()
    out["corpus_mode"] = config.get("corpus_mode") or "packed"  # (a config.json from before the corpus modes)
    if not (weights.value_kl or weights.relation):
        out.pop("relation_heads", None)  # unused without a relation term
    return out


# --- before any weights or data ------------------------------------------------------------------

def prepare_output(cfg: DistillConfig) -> tuple[Path, dict | None]:
    """Refuse to mix runs: an existing run needs --resume with the same settings. Returns the output
    folder and the run config saved there (None for a new run)."""
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file: give a directory")
    refuse_busy_output(output)  # first: neither --resume nor another folder's advice helps while a run works there
    saved = read_run_config(output)
    check_cache_dir(cfg.cache_dir)  # a refusal leaves no new output folder behind
    check_writable_dir(output)  # before the corpus and the teacher are loaded, not after
    if saved is None:
        refuse_foreign_output(output, "distill")
        return output, None
    RunDir(output, "distill").refuse_other_run(comparable(saved.get("config", {})), comparable(cfg.to_dict()),
                                               cfg.resume, NON_DETERMINING, holds="a distill run")
    identity = saved.get("resolved", {}).get("corpus_identity")
    if identity is not None and not same_corpus(identity, cfg.corpus):
        raise UserError(f"cannot --resume {output}: the corpus {cfg.corpus} changed since the run began (its files' "
                        "names, sizes or contents): restore it, or start a new run in another --output")
    return output, saved


def resolve(cfg: DistillConfig):
    """Everything that can be checked before loading weights or data."""
    cfg.validate()
    teacher_config = load_config(cfg.teacher, "teacher")
    check_weight_files(cfg.teacher, "teacher")
    if cfg.student is not None:
        check_weight_files(cfg.student, "student")
    n_teacher = teacher_config.num_hidden_layers
    if cfg.compile:
        refusal = compile_refusal(pick_device(cfg.device), teacher_config,
                                  *([load_config(cfg.student, "student")] if cfg.student is not None else []))
        if refusal is not None:
            raise UserError(refusal)
    if cfg.max_seq_len > usable_positions(teacher_config):
        raise UserError(f"--max-seq-len {cfg.max_seq_len} exceeds the {usable_positions(teacher_config)} tokens the "
                        "teacher's position embeddings take: use a smaller --max-seq-len")
    if cfg.student is not None:
        s_config = load_config(cfg.student, "student")
        require_teacher_family(s_config, teacher_config, cfg.student)
        shape = student_shape(s_config, s_config.num_hidden_layers)
        if cfg.max_seq_len > usable_positions(s_config):
            raise UserError(f"--max-seq-len {cfg.max_seq_len} exceeds the {usable_positions(s_config)} tokens the "
                            "student's position embeddings take")
    else:
        shape = student_shape(teacher_config, DEFAULT_STUDENT_LAYERS if cfg.student_layers is None else cfg.student_layers, cfg.student_hidden,
                              cfg.student_heads, cfg.student_ffn)
    try:
        mapping = parse_mapping(cfg.mapping, shape.layers, n_teacher)
    except UserError as exc:
        raise UserError(f"{exc}{family_of(teacher_config).layers_note}") from None
    mapping = with_init_layers(cfg, shape, n_teacher, mapping)  # a mistaken --init-layers: one line now
    parse_sample(cfg.corpus_sample)
    weights = loss_weights(cfg)
    relation_heads(weights, cfg.relation_heads, teacher_config, shape.hidden)
    layer_terms = (weights.hidden, weights.attention, weights.attention_kl, weights.value_kl, weights.relation)
    if not (weights.embedding or weights.sentence or (any(layer_terms) and mapping.pairs())):
        raise UserError("nothing to distill: every loss weight is zero or the mapping supervises no layer")
    sentence_pooling(cfg.teacher, weights)  # a bad pipeline: one line now
    if weights.sentence and shape.hidden != teacher_config.hidden_size and not has_pipeline(
            resolve_model_path(cfg.teacher)):  # (refused now, not after a run whose projection no export carries)
        raise UserError(f"the sentence term of a student {shape.hidden} wide under a {teacher_config.hidden_size}-wide "
                        "teacher trains a projection only the teacher's sentence-transformers pipeline carries into "
                        f"the export, and the teacher {cfg.teacher} has none here (no local modules.json): distill "
                        "from a local sentence-transformers teacher, keep the teacher's width, or set --w-sentence 0")
    return teacher_config, shape, mapping


def resolve_auto(cfg: DistillConfig) -> DistillConfig:
    """`--objective auto` and `--corpus-mode auto` made concrete (config.json records what they became).

    A teacher with a sentence-transformers pipeline exists for its sentence embedding: its student learns
    that embedding (the sentence objective) from one sentence per sequence, which measured best on STS-B
    (benchmarks/sentence_objective.py, README). Any other teacher, and a student narrower than the teacher
    (whose embedding the term cannot compare), keep tinybert on packed text."""
    if "auto" not in (cfg.objective, cfg.corpus_mode):
        return cfg
    if cfg.resume and cfg.output and Path(cfg.output).is_dir():
        # --resume continues what the run became: a run saved before `auto` (tinybert on packed text,
        # the defaults then) resumes as it began, whatever `auto` would pick today.
        saved = (read_run_config(Path(cfg.output)) or {}).get("config")
        if saved is not None:
            return replace(cfg, **{k: saved.get(k) or ("tinybert" if k == "objective" else "packed")
                                   for k in ("objective", "corpus_mode") if getattr(cfg, k) == "auto"})
    objective = cfg.objective
    if objective == "auto":
        objective = "sentence" if _sentence_teacher(cfg) else "tinybert"
    mode = cfg.corpus_mode
    if mode == "auto":
        mode = "sentences" if objective == "sentence" else "packed"
    return replace(cfg, objective=objective, corpus_mode=mode)


def _sentence_teacher(cfg: DistillConfig) -> bool:
    """A local teacher whose sentence-transformers pipeline the sentence term can read, and a student as wide."""
    teacher_config = load_config(cfg.teacher, "teacher")  # first: a teacher that is not one is its own line
    teacher_path = Path(resolve_model_path(cfg.teacher))
    if not (teacher_path / "modules.json").is_file():
        return False  # (a hub name is not looked up: it would need the network; pass --objective sentence)
    hidden = (load_config(cfg.student, "student").hidden_size if cfg.student is not None
              else cfg.student_hidden or teacher_config.hidden_size)
    if hidden != teacher_config.hidden_size:  # (the learned projection a narrower one needs is not measured yet)
        return False
    try:
        read_pooling(teacher_path)
    except UserError as exc:  # a Dense after the pooling, a pooling mode fastkd does not know
        log.info("--objective auto: tinybert, since the sentence term cannot use this teacher's pipeline (%s)", exc)
        return False
    return True


def check_memory(cfg: DistillConfig, teacher_config, shape, mapping: LayerMapping, device: torch.device,
                 sharing: int = 1, partitions: int = 1) -> StepMemory:
    """Refuse a micro-batch whose step cannot fit the machine (fastkd.memory), from the shapes alone:
    before the output is touched and anything is loaded, not after minutes of swapping. `sharing`:
    ranks holding their step in the same memory; `partitions`: ranks ZeRO splits the optimizer over."""
    memory = step_memory(teacher_config, shape, len(mapping.pairs()), cfg.max_seq_len, loss_weights(cfg),
                         bf16=cfg.bf16, relation_heads=cfg.relation_heads, partitions=partitions)
    check_step_fits(memory, cfg.batch_size, cfg.max_seq_len, device, sharing=sharing)
    return memory


# --- building a run --------------------------------------------------------------------------------

@dataclass
class Run:
    """A distillation ready to train: the step engine plus what the config, export and logs need."""

    cfg: DistillConfig
    engine: StepEngine
    tokenizer: object
    mapping: LayerMapping
    shape: object
    corpus_sequences: int
    output: Path
    resolved: dict = field(default_factory=dict)  # engine-specific resolved settings (the ds_config)

    @property
    def parameters(self) -> int:
        # ZeRO-3 partitions a parameter: ds_numel is its whole size
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.student.parameters())


def with_init_layers(cfg: DistillConfig, shape, n_teacher: int, mapping: LayerMapping) -> LayerMapping:
    """The mapping with --init-layers as its initial layers (the teacher layers a new student copies)."""
    if cfg.init_layers is None:
        return mapping
    if "@" in cfg.init_layers:
        raise UserError(f"--init-layers {cfg.init_layers}: give the layers to copy alone ('@' is for --mapping "
                        "SUPERVISION@INIT)")
    try:
        init = parse_mapping(cfg.init_layers, shape.layers, n_teacher)
    except UserError as exc:
        raise UserError(f"--init-layers: {exc}") from None
    if None in init.layers or init.init is not None:
        raise UserError(f"--init-layers {cfg.init_layers}: give one teacher layer to copy per student layer ('-' and "
                        "'@' are for --mapping only)")
    return LayerMapping(mapping.layers, n_teacher, init.layers)


def build_models(cfg: DistillConfig, shape, mapping):
    """Tokenizer, teacher, student (built or loaded) and the loss with its projections, on the CPU.
    Call after seeding: the student's and the projections' initialisation draw from the global RNG."""
    tokenizer = load_tokenizer(cfg.teacher)
    teacher_model = load_teacher(cfg.teacher)
    if cfg.student is not None:
        student = load_student_dir(cfg.student, teacher_model, tokenizer)
    else:
        student = build_student(teacher_model, shape, cfg.init, mapping, seed=cfg.seed)
    weights = loss_weights(cfg)
    criterion = DistillLoss.for_teacher(mapping, student.config.hidden_size, teacher_model, weights,
                                        cfg.loss_backend, cfg.relation_heads)
    return tokenizer, teacher_model, student, criterion
