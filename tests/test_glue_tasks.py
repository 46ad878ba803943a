from pathlib import Path

import pytest

from fastkd.errors import UserError
from fastkd.glue.tasks import load_task, parse_tasks, read_tsv, task_spec

from conftest import SHARED_DATA

GLUE = SHARED_DATA / "glue"
FIXTURES = Path(__file__).parent / "fixtures" / "glue"

# Row counts from the shared data README; label counts cross-checked with awk on the files.
REAL = {
    "cola": (8551, {"0": 2528, "1": 6023}, 527, {"0": 160, "1": 367}),
    "sst2": (67349, {"0": 29780, "1": 37569}, 872, {"0": 428, "1": 444}),
    "mrpc": (3668, {"0": 1194, "1": 2474}, 408, {"0": 129, "1": 279}),
    "rte": (2490, {"entailment": 1249, "not_entailment": 1241}, 277, {"entailment": 146, "not_entailment": 131}),
}


@pytest.mark.parametrize("key", sorted(REAL))
def test_real_tasks_load_with_counts_and_label_distributions(key):
    n_train, train_counts, n_dev, dev_counts = REAL[key]
    data = load_task(GLUE, task_spec(key))
    assert len(data.train) == n_train and data.train.label_counts() == train_counts
    assert len(data.dev) == 1 and len(data.dev[0]) == n_dev and data.dev[0].label_counts() == dev_counts
    assert all(isinstance(t, str) and t for t in data.train.text_a[:100])


def test_mrpc_bom_and_quotes():
    data = load_task(GLUE, task_spec("MRPC"))
    assert not data.train.text_a[0].startswith("\ufeff")
    assert any('"' in t for t in data.train.text_a)  # bare quotes survive: no CSV quoting
    assert data.train.text_b is not None


def test_stsb_regression():
    data = load_task(GLUE, task_spec("sts-b"))
    assert len(data.train) == 5749 and len(data.dev[0]) == 1500
    assert min(data.dev[0].labels) >= 0 and max(data.dev[0].labels) == 5.0
    assert sum(data.train.labels) / len(data.train) == pytest.approx(2.701, abs=1e-3)


def test_task_names():
    assert [t.key for t in parse_tasks("SST-2, mrpc ,RTE,sst2")] == ["sst2", "mrpc", "rte"]
    assert task_spec("STS-B") is task_spec("stsb") is task_spec("Sts_b")
    assert len(parse_tasks("all")) == 9
    with pytest.raises(UserError, match="unknown GLUE task 'sst3'"):
        parse_tasks("sst2,sst3")


@pytest.mark.parametrize("key, n_train, dev_sizes, pair", [
    ("qqp", 12, [6], True), ("mnli", 12, [6, 9], True), ("qnli", 10, [4], True), ("wnli", 8, [4], True)])
def test_fixture_tasks_in_real_layouts(key, n_train, dev_sizes, pair):
    data = load_task(FIXTURES, task_spec(key))
    assert len(data.train) == n_train and [len(d) for d in data.dev] == dev_sizes
    assert (data.train.text_b is not None) == pair
    spec = task_spec(key)
    assert all(0 <= y < spec.num_labels for y in data.train.labels)
    if key == "mnli":
        assert [d.name for d in data.dev] == ["dev_matched", "dev_mismatched"]
        assert data.train.label_counts() == {"entailment": 4, "neutral": 4, "contradiction": 4}
    if key == "qqp":
        assert any('"' in q for q in data.train.text_a)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_short_row_names_file_and_line_or_is_skipped(tmp_path):
    spec = task_spec("rte")
    bad = _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two\n2\tc\td\tnot_entailment\n")
    with pytest.raises(UserError, match=r"train.tsv:3: row has 2 fields, RTE needs at least 4"):
        read_tsv(bad, spec, "train")
    split = read_tsv(bad, spec, "train", skip_bad_rows=True)
    assert len(split) == 2 and split.skipped_rows == 1


def test_missing_column_and_unknown_label(tmp_path):
    spec = task_spec("sst2")
    no_label = _write(tmp_path / "a.tsv", "sentence\tpolarity\ngood film\t1\n")
    with pytest.raises(UserError, match=r"a.tsv:1: missing column 'label'"):
        read_tsv(no_label, spec, "train")
    odd_label = _write(tmp_path / "b.tsv", "sentence\tlabel\ngood film\t1\nbad film\t2\n")
    with pytest.raises(UserError, match=r"b.tsv:3: row label '2' is not one of 0, 1"):
        read_tsv(odd_label, spec, "train")


def test_missing_directory_and_task_folder(tmp_path):
    with pytest.raises(UserError, match="GLUE data directory .* not found"):
        load_task(tmp_path / "nope", task_spec("rte"))
    with pytest.raises(UserError, match="has no CoLA folder"):
        load_task(tmp_path, task_spec("cola"))
    (tmp_path / "RTE").mkdir()
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(UserError, match="dev.tsv not found"):
        load_task(tmp_path, task_spec("rte"))
