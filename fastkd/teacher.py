"""One frozen teacher forward per batch, shared by every student of the step.

The teacher runs under torch.inference_mode(). Inference tensors cannot be saved for a student's
backward, so only what the losses read (the mapped layers' hidden states and attention records) is cloned out as
ordinary tensors; everything else is freed with the inference context.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .capture import AttentionRecord, check_recorded, recording
from .families import family_of
from .io import file_follows_umask

log = logging.getLogger(__name__)


@dataclass
class TeacherOutputs:
    """hidden[l]: (B, S, D) for l in the requested layers (0 = embeddings); attention[l]: its record."""

    hidden: dict[int, torch.Tensor]
    attention: dict[int, AttentionRecord]
    attention_mask: torch.Tensor  # (B, S), 1 = real token
    sentence: torch.Tensor | None = None  # (B, D): the pipeline's sentence embeddings, where labelled once (below)


class Teacher:
    """Wraps a loaded teacher; counts forwards so callers can prove the teacher ran once per batch.

    A forward runs the teacher's layers up to the deepest one read (its family says how many that takes)
    and not its pooler: the outputs read are bit for bit the full forward's (tests/test_families.py).

    Under bf16 autocast the teacher's Linear weights and biases run from a bf16 copy made once per device
    (`half_linears`): autocast would cast every one of them again at every forward, since it caches casts
    only of weights that need gradients. The copy rounds as autocast does, so the outputs are bit for bit
    autocast's over the float32 weights; those stay as they were, for the students built from them."""

    def __init__(self, model, hidden_layers, attention_layers,
                 autocast_dtype: torch.dtype | None = None, values: bool = False):
        self.model = model
        self.values = values  # keep V of the attention layers (the relation terms)
        self.hidden_layers = sorted(set(hidden_layers))
        self.attention_layers = sorted(set(attention_layers))
        self.autocast_dtype = autocast_dtype
        self.forwards = 0
        self.family = family_of(model, "the teacher")
        deepest = max(self.hidden_layers + self.attention_layers, default=self.num_layers)
        self.layers_run = self.family.layers_to_run(model.config, deepest)
        self._half: dict[str, torch.Tensor] = {}  # name -> the bf16 copy (autocast only), on _half_device
        self._half_device: torch.device | None = None

    @classmethod
    def serving(cls, model, criteria, bf16: bool = False) -> "Teacher":
        """The teacher one forward of which serves every loss in `criteria` (DistillLoss-like: the layers
        each reads, and whether it needs V): one student's run, or a whole search generation's."""
        return cls(model, sorted({l for c in criteria for l in c.teacher_hidden_layers()}),
                   sorted({l for c in criteria for l in c.teacher_attention_layers()}),
                   autocast_dtype=torch.bfloat16 if bf16 else None, values=any(c.needs_values() for c in criteria))

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> TeacherOutputs:
        device = input_ids.device
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        with (torch.inference_mode(), autocast, self.family.first_layers(self.model, self.layers_run),
              recording(self.attention_layers, self.values) as rec):
            # token_type_ids only when given: DistilBERT, ModernBERT and MPNet take none.
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True,
                      "return_dict": True, **({} if token_type_ids is None else {"token_type_ids": token_type_ids})}
            if self.autocast_dtype is None:
                out = self.model(**kwargs)
            else:
                out = torch.func.functional_call(self.model, self.half_linears(device), (), kwargs)
            hidden = {l: out.hidden_states[l] for l in self.hidden_layers}
            records = dict(rec.records)
            del out
        check_recorded(self.model, records, self.attention_layers, "teacher")
        self.forwards += 1
        # A clone taken outside inference_mode is an ordinary tensor a student's backward may save.
        hidden = {l: h.clone() for l, h in hidden.items()}
        attention = {l: r.clone() for l, r in records.items()}
        return TeacherOutputs(hidden, attention, attention_mask)

    def half_linears(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The autocast dtype's copy of every Linear weight and bias of the layers this teacher runs, made on
        first use on `device` (again if the teacher has moved). Made inside the forward's first_layers block,
        so it names only the layers present there, the ones every forward of this teacher runs."""
        if self._half_device != device:
            self._half = {f"{name}.{p_name}" if name else p_name: p.detach().to(device, self.autocast_dtype)
                          for name, module in self.model.named_modules() if isinstance(module, torch.nn.Linear)
                          for p_name, p in module.named_parameters(recurse=False)}
            self._half_device = device
        return self._half

    def release(self) -> None:
        """The teacher runs no more (its labels are made): its weights leave the accelerator for the
        students' memory, and the 16-bit copy goes."""
        self.model.to("cpu")
        self._half, self._half_device = {}, None


LABEL_BATCH = 64  # rows per teacher forward while labelling (length-sorted, so little padding)
LABELS_MAX_BYTES = 2 * 2 ** 30  # above this, the labels would crowd out the run: the teacher runs per batch
LABELS_MIN_EPOCHS = 1.5  # labelling costs one pass over the corpus: worth it where a run reads it more often
LABELS_FORMAT = 1  # bump when what a stored label means changes: older files are then never read
# An interrupted labelling keeps what it has done at this interval (an hour's work for mpnet-base on 2 cores):
# the next run of the same key goes on from there, with the same labels, since every batch is fixed.
LABELS_SAVE_SECONDS = 300.0


class SentenceLabels:
    """The teacher's sentence embedding of every corpus row, computed once and reused every epoch.

    For an objective that reads nothing of the teacher but its sentence embedding (`sentence`), a
    teacher forward per batch is wasted after the first epoch; sentence-transformers' recipe labels its
    sentences once for the same reason. The rows are labelled in a fixed order (length-sorted batches of
    LABEL_BATCH, or the run's batch if smaller), whatever the seed or the stream's position, so a resumed run
    reads the very same labels.

    With `store` (a folder of the fastkd cache), the labels are kept on disk under a key of everything they
    depend on (the corpus rows, the teacher's weights, the pooling and layer, the labelling batch, the device
    type and autocast), so the next student of the same teacher and corpus, and a resumed run, read them
    instead of running the teacher over the corpus again (mpnet-base: about 25 rows/s on 2 CPU cores). A
    labelling stopped half-way keeps its finished batches there too (KEY.partial.safetensors, every
    LABELS_SAVE_SECONDS), and the next run of the same key labels only the rest.
    """

    def __init__(self, teacher: Teacher, stream, pooling, layer: int, device: torch.device, progress: bool = False,
                 batch_size: int = LABEL_BATCH, store: Path | None = None):
        started = time.perf_counter()
        size = min(LABEL_BATCH, batch_size)  # (the run's memory check allowed its own batch, not more)
        self.path = None
        self.labels = None
        if store is not None:
            key = labels_key(teacher, stream.dataset, pooling, layer, size, device)
            self.path = store / f"{key}.safetensors"
            self.labels = _read_labels(self.path, stream.n, device)
        self.stored = self.labels is not None  # read from the store, not computed by this run
        self.resumed_rows = 0  # rows an interrupted run labelled, read back: its seconds are not in self.seconds
        partial = None if self.path is None else self.path.with_name(f"{self.path.stem}.partial.safetensors")
        if not self.stored:  # (an hour for a large teacher on CPUs: say where it will be kept before it starts)
            log.info("teacher labels: labelling %d rows once%s", stream.n,
                     f" (kept in {self.path} for the next run)" if self.path is not None else "")
            self.labels, self.resumed_rows = self._compute(teacher, stream, pooling, layer, device, progress, size,
                                                           partial)
        if partial is not None and (self.stored or _write_labels(self.path, self.labels)):
            partial.unlink(missing_ok=True)  # (kept while the whole labels are not: a full disk loses no progress)
        self.seconds = time.perf_counter() - started

    @staticmethod
    def _compute(teacher, stream, pooling, layer, device, progress, size,
                 partial: Path | None = None) -> tuple[torch.Tensor, int]:
        """(labels, rows read back from an interrupted run's partial file)."""
        from tqdm.auto import tqdm

        from .sentence import sentence_embedding

        order = np.argsort(stream.lengths, kind="stable") if stream.lengths is not None else np.arange(stream.n)
        batches = range(0, stream.n, size)
        labels, done = _read_partial(partial, stream.n, len(batches), device) if partial is not None else (None, 0)
        if done:
            log.info("teacher labels: going on after the %d rows an interrupted run labelled (%s)", done * size, partial)
        saved = time.perf_counter()
        for b in tqdm(range(done, len(batches)), desc="teacher labels", unit="batch", leave=False, initial=done,
                      total=len(batches), disable=not progress):
            rows = order[batches[b]:batches[b] + size].tolist()
            batch = {k: v.to(device) for k, v in stream.rows(rows).items()}
            out = teacher(batch["input_ids"], batch["attention_mask"])
            embedding = sentence_embedding(out.hidden[layer], batch["attention_mask"], pooling)
            if labels is None:
                labels = torch.empty((stream.n, embedding.shape[-1]), dtype=torch.float32, device=device)
            labels[torch.as_tensor(rows, device=device)] = embedding.float()
            if partial is not None and b + 1 < len(batches) and time.perf_counter() - saved >= LABELS_SAVE_SECONDS:
                _write_labels(partial, labels, {"batches": str(b + 1)},
                              lost="labelling goes on; an interruption would go back to the last batches kept")
                saved = time.perf_counter()
        return labels, done * size

    def outputs(self, rows: list[int], attention_mask: torch.Tensor) -> TeacherOutputs:
        return TeacherOutputs({}, {}, attention_mask, self.labels[torch.as_tensor(rows, device=self.labels.device)])


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, bytes): its identity whatever
    folder or hub name it came from (about a second for a 110M-parameter model)."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def labels_key(teacher: Teacher, dataset, pooling, layer: int, batch: int, device: torch.device) -> str:
    """The store key of a corpus's labels. `dataset._fingerprint` names its rows: the corpus cache's key
    (files, tokenizer, length, mode) and any --corpus-sample selection of them; the teacher is its weights,
    its config and the torch and transformers versions that run it."""
    import transformers

    ident = {"format": LABELS_FORMAT, "rows": dataset._fingerprint, "n": len(dataset),
             "teacher": weights_digest(teacher.model), "config": teacher.model.config.to_json_string(),
             "versions": [torch.__version__, transformers.__version__], "pooling": [pooling.mode, pooling.normalize],
             "layer": layer, "batch": batch, "device": device.type, "autocast": str(teacher.autocast_dtype)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def _read_labels(path: Path, rows: int, device: torch.device) -> torch.Tensor | None:
    """Stored labels, or None where there are none or they cannot be used: a damaged or foreign file is a
    cache entry to compute again (with a warning), never a reason to stop the run."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        labels = load_file(str(path))["labels"]
    except (SafetensorError, KeyError, OSError, ValueError, RuntimeError) as exc:
        log.warning("stored teacher labels %s cannot be read (%s): computing them again", path, exc)
        return None
    if labels.dim() != 2 or labels.shape[0] != rows or labels.dtype != torch.float32:
        log.warning("stored teacher labels %s hold %s %s, not %d rows of float32: computing them again",
                    path, tuple(labels.shape), labels.dtype, rows)
        return None
    return labels.to(device)


def _read_partial(path: Path, rows: int, batches: int, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """(labels, batches done) an interrupted labelling kept, or (None, 0): an unusable file is ignored (a warning)."""
    if not path.is_file():
        return None, 0
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            done = int((f.metadata() or {}).get("batches", "x"))
            labels = f.get_tensor("labels")
    except (SafetensorError, KeyError, OSError, ValueError, RuntimeError) as exc:
        log.warning("the labels an interrupted run kept in %s cannot be read (%s): labelling from the start", path, exc)
        return None, 0
    if labels.dim() != 2 or labels.shape[0] != rows or labels.dtype != torch.float32 or not 0 <= done < batches:
        log.warning("the labels an interrupted run kept in %s do not fit these %d rows: labelling from the start",
                    path, rows)
        return None, 0
    return labels.to(device), done


def _writer() -> str:
    """This process, as a temporary's name carries it: a short digest of the host (a cache shared by a
    cluster's machines) and the pid."""
    return f"{hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]}-{os.getpid()}"


def _remove_dead_temporaries(folder: Path) -> None:
    """Half-written labels of processes of this machine that are gone (killed while writing: up to
    LABELS_MAX_BYTES each); another machine's process is never judged by this machine's pids."""
    host = _writer().partition("-")[0]
    for tmp in folder.glob(".*.tmp"):
        writer = tmp.name[:-len(".tmp")].rsplit(".", 1)[-1]  # HOST-PID (or a bare PID, written before hosts)
        tmp_host, _, pid = writer.rpartition("-")
        if (tmp_host in ("", host) and pid.isdigit() and int(pid) != os.getpid()
                and not Path(f"/proc/{pid}").exists()):
            tmp.unlink(missing_ok=True)


def _write_labels(path: Path, labels: torch.Tensor, metadata: dict[str, str] | None = None,
                  lost: str = "the next run computes them again") -> bool:
    """Through a temporary file and a rename, so a killed run never leaves labels half written; a store
    that cannot be written costs the next run the labelling, not this one its result. Whether it was written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{_writer()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(path.parent)
        save_file({"labels": labels.detach().cpu().contiguous()}, str(tmp), metadata=metadata)
        with contextlib.suppress(OSError):  # (a mount that refuses chmod still keeps the labels)
            file_follows_umask(tmp)  # a cache shared by a cluster's users: readable as any file they make
        os.replace(tmp, path)
        return True
    except (OSError, SafetensorError) as exc:  # (safetensors reports a full disk as its own error)
        tmp.unlink(missing_ok=True)
        log.warning("teacher labels not stored in %s (%s): %s", path.parent, exc, lost)
        return False


def labels_pay_off(weights, rows_read: int, corpus_rows: int, width: int, room: int | None = None) -> bool:
    """Whether a run should label its corpus once instead of running the teacher per batch: its objective
    reads only the sentence embedding, it reads the corpus LABELS_MIN_EPOCHS times or more, and the labels
    (float32, kept on the run's device) stay under LABELS_MAX_BYTES and under `room`, the bytes the device
    has left beside the step (None: not known)."""
    only_sentence = weights.sentence and not any(v for k, v in weights.as_dict().items() if k != "sentence")
    size = corpus_rows * width * 4
    return bool(only_sentence and rows_read >= LABELS_MIN_EPOCHS * corpus_rows
                and size <= LABELS_MAX_BYTES and (room is None or size <= room))
