import json
from pathlib import Path

import pytest
import torch

from fastkd.cli import main
from fastkd.errors import UserError
from fastkd.glue import FinetuneConfig, TaskCache, evaluate, parse_tasks
from fastkd.glue import run as glue_run
from fastkd.mapping import LayerMapping
from fastkd.models import build_student, load_teacher, student_shape

from conftest import SHARED_DATA

GLUE = SHARED_DATA / "glue"
FIXTURES = Path(__file__).parent / "fixtures" / "glue"
QUICK = ["--max-steps", "4", "--max-train-examples", "64", "--batch-size", "16", "--max-seq-len", "64", "--no-progress"]


def test_cli_fine_tunes_on_real_rte_and_writes_both_reports(tmp_path, tiny_teacher_dir, capfd):
    out = tmp_path / "glue"
    code = main(["glue", "--model", str(tiny_teacher_dir), "--tasks", "RTE", "--data-dir", str(GLUE),
                 "--output", str(out), *QUICK])
    assert code == 0, capfd.readouterr().err
    report = json.loads((out / "glue.json").read_text())
    rte = report["models"][0]["tasks"]["rte"]
    assert set(rte["metrics"]) == {"accuracy"} and 0 <= rte["score"] <= 1
    assert rte["baseline_score"] == pytest.approx(146 / 277)  # train majority 'entailment' on dev
    assert rte["train_examples"] == 64 and rte["dev_examples"] == 277 and rte["steps"] == 4 and rte["seconds"] > 0
    assert sum(rte["predictions"]["dev"]["predicted_labels"].values()) == 277
    table = (out / "glue.md").read_text().splitlines()
    assert table[0] == "| Model | RTE (acc) | GLUE avg |"
    assert table[2].startswith(f"| {tiny_teacher_dir} |") and table[3].startswith("| majority class | 52.7")
    # The resolved settings, in the form --config reads: the same run again.
    from fastkd.cli import parse_config

    resolved = out / "glue-config.json"
    again = parse_config(["glue", "--config", str(resolved)])
    assert again == parse_config(["glue", "--model", str(tiny_teacher_dir), "--tasks", "RTE", "--data-dir", str(GLUE),
                                  "--output", str(out), *QUICK])
    assert again[1].finetune.max_steps == 4 and again[1].model == [str(tiny_teacher_dir)]


def test_api_in_memory_student_all_metric_shapes_and_cached_tokenization(tiny_teacher_dir, default_tokenizer):
    teacher = load_teacher(str(tiny_teacher_dir))
    student = build_student(teacher, student_shape(teacher.config, 2), "teacher", LayerMapping((2, 4), 4))
    calls = []

    class CountingTokenizer:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    before = {k: v.clone() for k, v in student.state_dict().items()}
    tok = CountingTokenizer(default_tokenizer)
    cache = TaskCache(str(FIXTURES))
    cfg = FinetuneConfig(max_steps=3, batch_size=4, max_seq_len=48, progress=False)
    first = evaluate(student, tok, parse_tasks("mnli,qqp"), cache, cfg)
    assert set(first["mnli"].metrics) == {"accuracy_m", "accuracy_mm"}
    assert set(first["qqp"].metrics) == {"f1", "accuracy"}
    assert first["mnli"].dev_examples == 15
    n_calls = len(calls)
    assert n_calls == 5  # mnli train + 2 dev, qqp train + dev
    second = evaluate(student, tok, parse_tasks("mnli,qqp"), cache, cfg)
    assert len(calls) == n_calls  # every candidate after the first reuses the tokenized splits
    assert {k: r.metrics for k, r in second.items()} == {k: r.metrics for k, r in first.items()}  # seeded
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # fine-tuning works on a copy
    assert all(p.grad is None for p in student.parameters())


def test_regression_task(tiny_teacher_dir, default_tokenizer):
    cache = TaskCache(str(GLUE))
    cfg = FinetuneConfig(max_steps=2, max_train_examples=32, batch_size=16, max_seq_len=48, progress=False)
    result = evaluate(str(tiny_teacher_dir), default_tokenizer, parse_tasks("stsb"), cache, cfg)["stsb"]
    assert set(result.metrics) == {"pearson", "spearman"} and result.dev_examples == 1500
    assert "prediction_variance" in result.predictions["dev"]


def _one_line_error(capfd, argv):
    code = main(argv)
    err = [l for l in capfd.readouterr().err.splitlines() if l.strip() and " INFO " not in l]
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_bad_inputs(tmp_path, tiny_teacher_dir, capfd):
    base = ["glue", "--output", str(tmp_path / "o"), *QUICK]
    assert "unknown GLUE task 'rtee'" in _one_line_error(capfd, base + ["--model", str(tiny_teacher_dir), "--tasks", "rtee", "--data-dir", str(GLUE)])
    assert "not found" in _one_line_error(capfd, base + ["--model", str(tiny_teacher_dir), "--tasks", "rte", "--data-dir", str(tmp_path / "none")])
    assert "has no QQP folder" in _one_line_error(capfd, base + ["--model", str(tiny_teacher_dir), "--tasks", "qqp", "--data-dir", str(GLUE)])
    (tmp_path / "noconfig").mkdir()
    assert "no config.json" in _one_line_error(capfd, base + ["--model", str(tmp_path / "noconfig"), "--tasks", "rte", "--data-dir", str(GLUE)])


def test_resume_reuses_finished_tasks(tmp_path, tiny_teacher_dir, monkeypatch, capfd):
    args = ["glue", "--model", str(tiny_teacher_dir), "--tasks", "wnli", "--data-dir", str(FIXTURES),
            "--output", str(tmp_path / "o"), *QUICK]
    assert main(args) == 0
    assert "already holds GLUE results" in _one_line_error(capfd, args)

    def no_training(*a, **k):
        raise AssertionError("a finished task was trained again")

    monkeypatch.setattr(glue_run, "finetune_task", no_training)
    assert main(args + ["--resume"]) == 0
    assert "settings differ: lr (saved 5e-05, now 0.0001)" in _one_line_error(capfd, args + ["--resume", "--lr", "1e-4"])


def test_config_validation():
    with pytest.raises(UserError, match="--max-steps"):
        FinetuneConfig(max_steps=0).validate()
    with pytest.raises(UserError, match="--epochs"):
        FinetuneConfig(epochs=0).validate()


def test_half_precision_checkpoints_and_task_heads_train_in_fp32(tmp_path, tiny_teacher_dir, default_tokenizer):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from fastkd.glue.finetune import make_classifier
    from fastkd.glue.tasks import task_spec

    bf16 = tmp_path / "bf16"
    AutoModel.from_pretrained(tiny_teacher_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    default_tokenizer.save_pretrained(bf16)
    clf = make_classifier(str(bf16), task_spec("rte"), seed=0)
    assert {p.dtype for p in clf.parameters()} == {torch.float32}
    headed = tmp_path / "headed"  # a 2-label classifier checkpoint used for regression and 3 labels
    AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir, num_labels=2).save_pretrained(headed)
    assert make_classifier(str(headed), task_spec("stsb"), seed=0).config.num_labels == 1
    assert make_classifier(str(headed), task_spec("mnli"), seed=0).classifier.out_features == 3


def test_resume_keeps_results_of_other_models(tmp_path, tiny_teacher_dir, default_tokenizer):
    from conftest import make_tiny_bert

    other = make_tiny_bert(tmp_path / "other", default_tokenizer, layers=2)
    out = tmp_path / "o"
    common = ["--tasks", "wnli", "--data-dir", str(FIXTURES), "--output", str(out), *QUICK]
    assert main(["glue", "--model", str(tiny_teacher_dir), *common]) == 0
    assert main(["glue", "--model", str(other), *common, "--resume"]) == 0
    report = json.loads((out / "glue.json").read_text())
    assert sorted(m["path"] for m in report["models"]) == sorted([str(tiny_teacher_dir), str(other)])


def test_more_bad_inputs(tmp_path, tiny_teacher_dir, capfd):
    base = ["glue", "--model", str(tiny_teacher_dir), "--tasks", "wnli", "--data-dir", str(FIXTURES)]
    (tmp_path / "file").write_text("x")
    assert "is a file" in _one_line_error(capfd, base + ["--output", str(tmp_path / "file"), *QUICK])
    out = ["--output", str(tmp_path / "o")]
    assert "exceeds the 128 tokens the position" in _one_line_error(capfd, base + out + ["--max-seq-len", "300", "--no-progress"])
    assert "--epochs must be a positive number" in _one_line_error(capfd, base + out + ["--epochs", "nan"])
    stsb = tmp_path / "glue" / "STS-B"
    stsb.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (stsb / "train.tsv").write_text(header + "0\tg\tf\t2012\t1\tn\tn\ta b\tc d\tnan\n")
    (stsb / "dev.tsv").write_text(header + "0\tg\tf\t2012\t1\tn\tn\ta b\tc d\t1.0\n")
    line = _one_line_error(capfd, ["glue", "--model", str(tiny_teacher_dir), "--tasks", "stsb", "--data-dir",
                                   str(tmp_path / "glue"), *out, *QUICK])
    assert "train.tsv:2: row score 'nan' is not a finite number" in line


def test_token_cache_is_shared_by_equal_tokenizers(tiny_teacher_dir):
    from fastkd.models import load_tokenizer

    cache = TaskCache(str(FIXTURES))
    split = cache.data(parse_tasks("wnli")[0]).train
    a = cache.encoded(split, load_tokenizer(str(tiny_teacher_dir)), 32)
    b = cache.encoded(split, load_tokenizer(str(tiny_teacher_dir)), 32)  # another object, same tokenizer
    assert a is b
