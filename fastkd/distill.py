"""Distillation as a run: check the settings, load teacher, student and corpus, build the step
engine (one process, or DeepSpeed ZeRO with --deepspeed: fastkd.zero), resume, train, export.

corpus -> teacher (once per batch) -> losses -> student; the step engines and the loop are
fastkd.training's, shared with the search's proxy and bench.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .config import DistillConfig, differing_settings, read_run_config
from .corpus import (BatchStream, check_cache_dir, corpus_identity, describe_corpus, load_corpus, parse_sample,
                     sample_corpus)
from .device import pick_device
from .errors import UserError
from .export import export_student
from .io import (atomic_write_json, check_writable_dir, lock_output, no_space_is_one_line, refuse_busy_output,
                 refuse_foreign_output)
from .losses import OBJECTIVES, DistillLoss, LossWeights, objective_weights
from .mapping import LayerMapping, parse_mapping
from .sentence import has_pipeline, read_pooling
from .memory import StepMemory, available_memory, check_step_fits, step_memory
from .families import family_of, usable_positions
from .models import (build_student, check_weight_files, load_config, load_student_dir, load_teacher, load_tokenizer,
                     require_teacher_family, resolve_model_path, student_shape)
from .rng import seed_everything
from .teacher import SentenceLabels, Teacher, labels_pay_off
from .training import LocalEngine, StepEngine, train
from .training.loop import truncate_metrics

log = logging.getLogger(__name__)

DEFAULT_STUDENT_LAYERS = 3


def loss_weights(cfg) -> LossWeights:
    """The objective's weights with the --w-* given in their place."""
    return objective_weights(cfg.objective, embedding=cfg.w_embedding, hidden=cfg.w_hidden, attention=cfg.w_attention,
                             attention_kl=cfg.w_attention_kl, value_kl=cfg.w_value_kl, relation=cfg.w_relation,
                             sentence=getattr(cfg, "w_sentence", None))


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


def relation_heads(weights: LossWeights, requested: int | None, teacher_config, student_hidden: int) -> int | None:
    """R for the relation terms (None when none is active): the teacher's heads unless given; both
    models' concatenated heads (their hidden sizes) must split into R equal slices."""
    if not (weights.value_kl or weights.relation):
        if requested is not None:  # silently ignoring it would leave the user believing relations were learned
            raise UserError(f"--relation-heads {requested} has no effect: these loss weights have no relation term; "
                            "use --objective minilm or minilmv2, or set --w-relation / --w-value-kl above 0")
        return None
    family = family_of(teacher_config)
    _, t_hidden, t_heads, _ = family.sizes(teacher_config)
    heads = requested or t_heads
    for who, width in (("teacher", t_hidden), ("student", student_hidden)):
        if width % heads:
            raise UserError(f"--relation-heads {heads} does not divide the {who}'s hidden size {width}: pick R so "
                            f"that both {t_hidden} and {student_hidden} split into R equal slices")
    return heads


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
    if not cfg.resume:
        diffs = differing_settings(comparable(saved.get("config", {})), comparable(cfg.to_dict()))
        what = "a different run (" + "; ".join(diffs[:3]) + ")" if diffs else "this run already"
        raise UserError(f"--output {output} holds {what}: pass --resume to continue it, or choose another --output")
    diffs = differing_settings(comparable(saved.get("config", {})), comparable(cfg.to_dict()))
    if diffs:
        raise UserError(f"cannot --resume {output}: settings differ from the saved run: " + "; ".join(diffs))
    identity = saved.get("resolved", {}).get("corpus_identity")
    if identity is not None and identity != json.loads(json.dumps(corpus_identity(cfg.corpus))):  # as saved
        raise UserError(f"cannot --resume {output}: the corpus {cfg.corpus} changed since the run began (its files' "
                        "size or modification time): restore it, or start a new run in another --output")
    return output, saved


def resolve(cfg: DistillConfig):
    """Everything that can be checked before loading weights or data."""
    cfg.validate()
    teacher_config = load_config(cfg.teacher, "teacher")
    check_weight_files(cfg.teacher, "teacher")
    if cfg.student is not None:
        check_weight_files(cfg.student, "student")
    n_teacher = teacher_config.num_hidden_layers
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


def sentence_pooling(teacher: str, weights: LossWeights):
    """How the sentence term pools (the teacher's pipeline), or None without the term; a pipeline fastkd
    cannot read is refused in one line. (A narrower student learns a projection: losses.DistillLoss.)"""
    if not weights.sentence:
        return None
    return read_pooling(resolve_model_path(teacher))



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
    criterion = DistillLoss(mapping, student.config.hidden_size, teacher_model.config.hidden_size, weights,
                            backend=cfg.loss_backend,
                            relation_heads=relation_heads(weights, cfg.relation_heads, teacher_model.config,
                                                          student.config.hidden_size),
                            pooling=sentence_pooling(cfg.teacher, weights))
    return tokenizer, teacher_model, student, criterion


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


def build_run(cfg: DistillConfig) -> Run:
    """Validate, lock the output, load teacher, student and corpus, build the step engine (DeepSpeed
    ZeRO with --deepspeed: every rank builds its own; else one process), then resume or start over
    and write the run's resolved config."""
    cfg.validate()
    cfg = resolve_auto(cfg)
    if cfg.deepspeed is not None:
        from .zero import build_zero_run

        run = build_zero_run(cfg)
    else:
        run = build_local_run(cfg)
    start(run)
    return run


def check_memory(cfg: DistillConfig, teacher_config, shape, mapping: LayerMapping, device: torch.device,
                 sharing: int = 1, partitions: int = 1) -> StepMemory:
    """Refuse a micro-batch whose step cannot fit the machine (fastkd.memory), from the shapes alone:
    before the output is touched and anything is loaded, not after minutes of swapping. `sharing`:
    ranks holding their step in the same memory; `partitions`: ranks ZeRO splits the optimizer over."""
    memory = step_memory(teacher_config, shape, len(mapping.pairs()), cfg.max_seq_len, loss_weights(cfg),
                         bf16=cfg.bf16, relation_heads=cfg.relation_heads, partitions=partitions)
    check_step_fits(memory, cfg.batch_size, cfg.max_seq_len, device, sharing=sharing)
    return memory


def build_local_run(cfg: DistillConfig) -> Run:
    teacher_config, shape, mapping = resolve(cfg)
    device = pick_device(cfg.device)
    memory = check_memory(cfg, teacher_config, shape, mapping, device)
    output, saved = prepare_output(cfg)
    lock_output(output, "distill")  # one run per output directory; leftovers of a killed one are removed
    seed_everything(cfg.seed)

    tokenizer, teacher_model, student, criterion = build_models(cfg, shape, mapping)
    teacher_model.to(device)
    student.to(device)
    criterion.to(device)
    teacher = Teacher(teacher_model, criterion.teacher_hidden_layers(), criterion.teacher_attention_layers(),
                      autocast_dtype=torch.bfloat16 if cfg.bf16 else None, values=criterion.needs_values())

    corpus = load_corpus(cfg.corpus, tokenizer, cfg.max_seq_len, cfg.cache_dir, cfg.num_proc, cfg.progress,
                         cfg.corpus_mode)
    corpus = sample_corpus(corpus, cfg.corpus_sample, cfg.seed)
    stream = BatchStream(corpus, cfg.batch_size, cfg.seed)
    labels = None
    if _label_once(cfg, saved, criterion, len(corpus), teacher_model.config.hidden_size,
                   _room_beside_step(memory, cfg.batch_size, device, teacher_model, student, criterion)):
        labels = SentenceLabels(teacher, stream, criterion.pooling, criterion.mapping.teacher_layers, device,
                                cfg.progress, batch_size=cfg.batch_size)
        if device.type != "cpu":
            teacher_model.to("cpu")  # never runs again: its device memory goes to the student
        log.info("teacher: the sentence embeddings of all %d corpus rows computed once in %.0f s, reused for the "
                 "run's %.1f passes (no teacher forward per step)", len(corpus), labels.seconds,
                 cfg.max_steps * cfg.batch_size * cfg.grad_accum / len(corpus))
    engine = LocalEngine(cfg, teacher, student, criterion, stream, labels)
    return Run(cfg, engine, tokenizer, mapping, shape, len(corpus), output,
               resolved={"teacher_labels": labels is not None})


def _room_beside_step(memory: StepMemory, batch: int, device: torch.device, *models: nn.Module) -> int:
    """Bytes the device has left once the step is whole: the estimate's, less the weights already
    resident (the models are on the device by now; gradients, optimizer state and activations are not)."""
    resident = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return available_memory(device)[0] - (memory.total(batch) - resident)


def _label_once(cfg: DistillConfig, saved: dict | None, criterion: DistillLoss, corpus_rows: int, width: int,
                room: int) -> bool:
    """Whether the teacher labels the corpus once (teacher.labels_pay_off); a resumed run keeps the choice
    its start made (`saved`: its config.json), so it continues exactly whatever the memory free now or
    --max-steps."""
    if saved is not None and "teacher_labels" in saved.get("resolved", {}):
        return bool(saved["resolved"]["teacher_labels"])
    return labels_pay_off(criterion.weights, cfg.max_steps * cfg.batch_size * cfg.grad_accum, corpus_rows, width,
                          room)


def start(run: Run) -> None:
    """Resume from the newest complete checkpoint under --resume (or start over), and write the run's
    resolved config (main process)."""
    cfg, engine, output = run.cfg, run.engine, run.output
    resumed_from = engine.load_checkpoint(output) if cfg.resume else None
    # The main process's bookkeeping; a refusal there (a full disk) is said on every rank.
    engine.on_main(lambda: _start_outputs(run, resumed_from))


def _start_outputs(run: Run, resumed_from: Path | None) -> None:
    cfg, engine, output = run.cfg, run.engine, run.output
    metrics_path = output / "metrics.jsonl"
    if resumed_from is not None:
        truncate_metrics(metrics_path, engine.step)
        log.info("resumed from %s (step %d)", resumed_from, engine.step)
    else:
        if cfg.resume:
            log.info("--resume: no complete checkpoint in %s yet, starting from step 0", output)
        metrics_path.unlink(missing_ok=True)
    with no_space_is_one_line(output / "config.json"):
        _write_run_config(run)
    log.info("student: %s (%.1fM parameters), mapping %s, %s, global batch %d, %s loss "
             "backend%s", run.shape.describe(), run.parameters / 1e6, run.mapping.text,
             describe_corpus(engine.stream.dataset, cfg.max_seq_len), engine.seqs_per_step, engine.criterion.backend(engine.device),
             "".join(f"; {k}: {v}" for k, v in engine.describe().items()))


def _write_run_config(run: Run) -> None:
    cfg, engine = run.cfg, run.engine
    atomic_write_json(run.output / "config.json", {
        "fastkd_version": __version__, "command": "distill", "config": cfg.to_dict(),  # the form --config reads
        "resolved": {"mapping": run.mapping.text, "teacher_layers": run.mapping.teacher_layers,
                     "student": {**run.shape.__dict__, "parameters": run.parameters},
                     "corpus_sequences": run.corpus_sequences, "global_batch": engine.seqs_per_step,
                     "corpus_identity": corpus_identity(cfg.corpus),  # checked on --resume
                     "loss_backend": engine.criterion.backend(engine.device),
                     # Each op self-checked now, for the dtypes this run feeds it.
                     "loss_ops": engine.criterion.prepare(engine.device, engine.loss_input_dtypes()),
                     **run.resolved},
    })


def run_distill(cfg: DistillConfig) -> Path | None:
    """Distill, checkpoint, export (one process or every ZeRO rank). Returns OUTPUT/student on the
    main process (None on the others, and when stopped early by --stop-at-step)."""
    run = build_run(cfg)
    engine = run.engine
    train(engine, run.output, run.output / "metrics.jsonl")
    if engine.step < cfg.max_steps:
        if engine.is_main:
            log.info("stopped at step %d of %d; continue with --resume", engine.step, cfg.max_steps)
        return None
    student = engine.trained_student()  # a collective under ZeRO (gathers the partitions)
    dense = engine.trained_sentence_dense()  # (also a collective)
    return engine.on_main(lambda: export_run(run, student, dense))


def export_run(run: Run, student, sentence_dense: dict | None = None) -> Path:
    """Export `student` (the engine's trained student, float32) with its fastkd.json and model card;
    `sentence_dense`: a narrower student's learned projection (engine.trained_sentence_dense)."""
    cfg, engine, mapping = run.cfg, run.engine, run.mapping
    info = {
        "teacher": cfg.teacher, "teacher_layers": mapping.teacher_layers, "mapping": mapping.text,
        "mapping_spec": cfg.mapping, "init": cfg.init if cfg.student is None else f"from {cfg.student}",
        "student": {**run.shape.__dict__, "parameters": run.parameters},
        "objective": cfg.objective, "relation_heads": engine.criterion.relation_heads,
        "loss_weights": loss_weights(cfg).as_dict(),
        **({"sentence_pooling": engine.criterion.pooling.describe()} if loss_weights(cfg).sentence else {}),
        "corpus": {"source": cfg.corpus, "mode": cfg.corpus_mode, "sequences": run.corpus_sequences,
                   "max_seq_len": cfg.max_seq_len, "sample": cfg.corpus_sample},
        "steps": engine.step, "global_batch": engine.seqs_per_step, "lr": cfg.lr, "seed": cfg.seed,
        "bf16": cfg.bf16, "loss_backend": engine.criterion.backend(engine.device),
        "loss_ops": engine.criterion.ran_on(),  # what each op ran on, after its self-check
        "skipped_steps": engine.bad_steps, "seconds": round(engine.elapsed, 1),
        "final_losses": engine.final_losses(), "final_losses_steps": engine.final_steps(), **engine.describe(),
    }
    return export_student(student, run.tokenizer, run.output / "student", info,
                          pipeline_from=resolve_model_path(cfg.teacher), probe=engine.stream.sample(),
                          sentence_dense=sentence_dense)
