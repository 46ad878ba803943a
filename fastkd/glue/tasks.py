"""The nine GLUE tasks: their files, columns, labels and metrics, and loaders for both sources.

Local data uses the `glue_data` layout (TASK/train.tsv, TASK/dev.tsv; MNLI has dev_matched.tsv
and dev_mismatched.tsv). Real-world quirks handled: CoLA has no header, MRPC files start with a
UTF-8 BOM, and fields contain bare quotes, so rows are split on tabs with no CSV quoting.
The hub source (`datasets`, nyu-mll/glue) is mapped to the same schema: text_a, text_b, label
(class index in the task's label order, or a float for STS-B).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)


ZERO_SHOT_TASK = "stsb"  # what the search's zero-shot rung scores


@dataclass(frozen=True)
class TaskSpec:
    name: str  # display name, e.g. "SST-2"
    key: str  # canonical key, e.g. "sst2" (also the nyu-mll/glue config)
    text_a: str | int  # header name, or column index for header-less files
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # label values as written in the TSV, in class-index order; None = regression
    metrics: tuple[str, ...]
    header: bool = True
    dev_splits: tuple[str, ...] = ("dev",)
    hub_columns: tuple[str, str | None] = ("sentence", None)
    hub_dev_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {t.key: t for t in [
    TaskSpec("CoLA", "cola", 3, None, 1, _BINARY, ("mcc",), header=False),
    TaskSpec("SST-2", "sst2", "sentence", None, "label", _BINARY, ("accuracy",)),
    TaskSpec("MRPC", "mrpc", "#1 String", "#2 String", "Quality", _BINARY, ("f1", "accuracy"),
             hub_columns=("sentence1", "sentence2")),
    TaskSpec("STS-B", "stsb", "sentence1", "sentence2", "score", None, ("pearson", "spearman"),
             hub_columns=("sentence1", "sentence2")),
    TaskSpec("QQP", "qqp", "question1", "question2", "is_duplicate", _BINARY, ("f1", "accuracy"),
             hub_columns=("question1", "question2")),
    TaskSpec("MNLI", "mnli", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
             ("accuracy",), dev_splits=("dev_matched", "dev_mismatched"), hub_columns=("premise", "hypothesis"),
             hub_dev_splits=("validation_matched", "validation_mismatched")),
    TaskSpec("QNLI", "qnli", "question", "sentence", "label", _NLI2, ("accuracy",), hub_columns=("question", "sentence")),
    TaskSpec("RTE", "rte", "sentence1", "sentence2", "label", _NLI2, ("accuracy",), hub_columns=("sentence1", "sentence2")),
    TaskSpec("WNLI", "wnli", "sentence1", "sentence2", "label", _BINARY, ("accuracy",), hub_columns=("sentence1", "sentence2")),
]}


def task_spec(name: str) -> TaskSpec:
    """Case-insensitive, with or without the dash: sst2, SST-2, sts-b, MNLI."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise UserError(f"unknown GLUE task {name!r}: choose from {', '.join(t.name for t in TASKS.values())} (or 'all')")
    return TASKS[key]


def parse_tasks(text: str, flag: str = "--tasks") -> list[TaskSpec]:
    if text.strip().lower() == "all":
        return list(TASKS.values())
    specs = [task_spec(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise UserError(f"{flag} is empty: give task names like sst2,mrpc,rte or 'all'")
    return list(dict.fromkeys(specs))  # keep order, drop repeats


@dataclass
class Split:
    """One split of one task in the common schema."""

    task: TaskSpec
    name: str  # "train", "dev", "dev_matched", ...
    text_a: list[str]
    text_b: list[str] | None
    labels: list  # int class indices, or floats for STS-B
    skipped_rows: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def label_counts(self) -> dict[str, int]:
        if self.task.is_regression:
            return {}
        counts = {label: 0 for label in self.task.labels}
        for y in self.labels:
            counts[self.task.labels[y]] += 1
        return counts


@dataclass
class TaskData:
    task: TaskSpec
    train: Split
    dev: list[Split] = field(default_factory=list)


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")  # MRPC starts with a BOM
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8: convert the file to UTF-8") from None
    return text.split("\n")


def read_tsv(path: Path, spec: TaskSpec, split: str, skip_bad_rows: bool = False) -> Split:
    """Tab-split rows (no quoting); bad rows are errors with file:line, or skipped and counted."""
    lines = _read_lines(path)
    start = 0
    if spec.header:
        header = lines[0].rstrip("\r").split("\t")
        columns = {name: i for i, name in enumerate(header)}
        wanted = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise UserError(f"{path}:1: missing column {missing[0]!r} (header has: {', '.join(header)})")
        ia, ib, il = columns[spec.text_a], columns.get(spec.text_b), columns[spec.label]
        start = 1
    else:
        ia, ib, il = spec.text_a, spec.text_b, spec.label
    need = max(i for i in (ia, ib, il) if i is not None) + 1
    label_index = {label: i for i, label in enumerate(spec.labels)} if spec.labels else None
    text_a, text_b, labels, skipped = [], [] if ib is not None else None, [], 0
    for lineno, line in enumerate(lines[start:], start=start + 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        problem = None
        if len(fields) < need:
            problem = f"has {len(fields)} fields, {spec.name} needs at least {need}"
        else:
            raw_label = fields[il].strip()
            if label_index is not None:
                y = label_index.get(raw_label)
                if y is None:
                    problem = f"label {raw_label!r} is not one of {', '.join(spec.labels)}"
            else:
                try:
                    y = float(raw_label)
                except ValueError:
                    y = math.nan
                if not math.isfinite(y):
                    problem = f"score {raw_label!r} is not a finite number"
        if problem:
            if skip_bad_rows:
                skipped += 1
                continue
            raise UserError(f"{path}:{lineno}: row {problem}; fix the file or pass --skip-bad-rows")
        text_a.append(fields[ia])
        if text_b is not None:
            text_b.append(fields[ib])
        labels.append(y)
    if skipped:
        log.warning("%s: skipped %d bad rows", path, skipped)
    if not labels:
        raise UserError(f"{path} holds no rows: give a non-empty {spec.name} file")
    return Split(spec, split, text_a, text_b, labels, skipped, str(path))


def load_local(data_dir: str | Path, spec: TaskSpec, skip_bad_rows: bool = False) -> TaskData:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"GLUE data directory {root} not found: pass --data-dir pointing at a glue_data-style directory")
    folder = next((p for p in (root / spec.name, root / spec.key, root / spec.name.upper()) if p.is_dir()), None)
    if folder is None:
        raise UserError(f"{root} has no {spec.name} folder: expected {root / spec.name}/train.tsv and dev.tsv")
    files = {"train": folder / "train.tsv", **{d: folder / f"{d}.tsv" for d in spec.dev_splits}}
    for split, path in files.items():
        if not path.is_file():
            raise UserError(f"{spec.name}: {path} not found: a task folder needs train.tsv and {', '.join(d + '.tsv' for d in spec.dev_splits)}")
    return TaskData(spec, read_tsv(files["train"], spec, "train", skip_bad_rows),
                    [read_tsv(files[d], spec, d, skip_bad_rows) for d in spec.dev_splits])


def load_hub(spec: TaskSpec, dataset: str = "nyu-mll/glue") -> TaskData:
    import datasets

    try:
        ds = datasets.load_dataset(dataset, spec.key)
    except Exception as exc:  # datasets raises many kinds for offline / missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load {spec.name} from the hub ({dataset}): {first}; pass --data-dir with local files") from None
    a, b = spec.hub_columns

    def convert(split_name: str, name: str) -> Split:
        part = ds[split_name]
        labels = [float(y) for y in part["label"]] if spec.is_regression else [int(y) for y in part["label"]]
        return Split(spec, name, list(part[a]), list(part[b]) if b else None, labels, 0, f"{dataset}/{spec.key}")

    return TaskData(spec, convert("train", "train"),
                    [convert(h, d) for h, d in zip(spec.hub_dev_splits, spec.dev_splits)])


def load_task(data_dir: str | Path, spec: TaskSpec, skip_bad_rows: bool = False) -> TaskData:
    """`data_dir` = a glue_data-style directory, or "hub" for the datasets hub."""
    if str(data_dir) == "hub":
        return load_hub(spec)
    return load_local(data_dir, spec, skip_bad_rows)
