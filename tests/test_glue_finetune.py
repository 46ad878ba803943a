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

from conftest import SHARED_DATA, make_pipeline_teacher, run_cli

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
    assert "holds GLUE results already: pass --resume" in _one_line_error(capfd, args)

    def no_training(*a, **k):
        raise AssertionError("a finished task was trained again")

    monkeypatch.setattr(glue_run, "finetune_task", no_training)
    assert main(args + ["--resume"]) == 0
    assert "settings differ from the saved run: lr (saved 5e-05, now 0.0001)" in _one_line_error(capfd, args + ["--resume", "--lr", "1e-4"])


def test_config_validation():
    with pytest.raises(UserError, match="--max-steps"):
        FinetuneConfig(max_steps=0).validate()
    with pytest.raises(UserError, match="--epochs"):
        FinetuneConfig(epochs=0).validate()


def test_half_precision_checkpoints_and_task_heads_train_in_fp32(tmp_path, tiny_teacher_dir, default_tokenizer):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from fastkd.glue.heads import make_classifier
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


def test_only_the_rows_a_fine_tune_reads_are_tokenized_and_as_a_whole_split_would_be(tiny_teacher_dir,
                                                                                     default_tokenizer):
    """Real SST-2 (67,349 training rows): a 64-row fine-tune scored on a 100-row held-out slice tokenizes
    those 164 training rows, nothing else (not dev, which it does not score); each row's ids are what
    tokenizing the whole split gives. The biencoder head's sentences apart: the same rows only (MRPC)."""
    from fastkd.glue.finetune import finetune_task
    from fastkd.glue.heldout import scoring_rows
    from fastkd.glue.tasks import task_spec

    teacher = load_teacher(str(tiny_teacher_dir))
    for task, head in (("sst2", "pooler"), ("mrpc", "biencoder")):
        cache = TaskCache(str(GLUE))
        spec = task_spec(task)
        cfg = FinetuneConfig(max_steps=1, batch_size=8, max_train_examples=64, heldout=100, max_seq_len=48,
                             progress=False, head=head)
        finetune_task(teacher, default_tokenizer, spec, cache, cfg)
        data = cache.data(spec)
        scoring = scoring_rows(data, default_tokenizer, cache, cfg)
        lazy = cache.encoded(data.train, default_tokenizer, 48, rows=[])  # what is there, nothing added
        done = {i for i, ids in enumerate(lazy.input_ids) if ids is not None}
        assert done == set(scoring.train_rows.tolist()) | set(scoring.held.tolist()), (task, len(done))
        assert len(done) == 164 < len(data.train)
        if head == "biencoder":
            assert {i for i, ids in enumerate(lazy.a_ids) if ids is not None} == done
        assert scoring.eval_split.startswith("train-heldout-selection")  # so dev is never read, nor tokenized
        for dev in data.dev:
            assert all(ids is None for ids in cache.encoded(dev, default_tokenizer, 48, rows=[]).input_ids)
        # The same ids as before rows were tokenized on demand: the whole split at once (MRPC, 3,668 rows),
        # or (SST-2) each row alone, a call unlike the one batch that filled them.
        b = data.train.text_b
        if task == "mrpc":
            full = TaskCache(str(GLUE)).encoded(data.train, default_tokenizer, 48)
            want = [(full.input_ids[i], full.token_type_ids[i]) for i in sorted(done)]
        else:
            want = [tuple(default_tokenizer(data.train.text_a[i], None if b is None else b[i], truncation=True,
                                            max_length=48, return_token_type_ids=True)[k]
                          for k in ("input_ids", "token_type_ids")) for i in sorted(done)]
        assert [(lazy.input_ids[i], lazy.token_type_ids[i]) for i in sorted(done)] == want


def test_token_cache_is_shared_by_equal_tokenizers(tiny_teacher_dir):
    from fastkd.models import load_tokenizer

    cache = TaskCache(str(FIXTURES))
    split = cache.data(parse_tasks("wnli")[0]).train
    a = cache.encoded(split, load_tokenizer(str(tiny_teacher_dir)), 32)
    b = cache.encoded(split, load_tokenizer(str(tiny_teacher_dir)), 32)  # another object, same tokenizer
    assert a is b


# --- task heads (--head) -------------------------------------------------------------------------

def _tiny_batch(tokenizer):
    enc = tokenizer(["a cat sat on the mat today", "dogs"], ["it did", "bark loudly at night"], padding=True,
                    return_tensors="pt", return_token_type_ids=True)
    assert (enc["attention_mask"] == 0).any()  # the second row is padded: the mean must skip the pads
    return dict(enc)


@pytest.mark.parametrize("head", ["pooler", "pooler-reinit", "mean", "pipeline"])
def test_each_head_trains_and_predicts(head, tiny_teacher_dir, default_tokenizer, tmp_path):
    from fastkd.glue.heads import make_classifier
    from fastkd.glue.tasks import task_spec

    cache = TaskCache(str(FIXTURES))
    cfg = FinetuneConfig(max_steps=2, batch_size=8, max_seq_len=48, progress=False, head=head, lr=1e-3)
    result = evaluate(str(tiny_teacher_dir), default_tokenizer, parse_tasks("stsb"), cache, cfg)["stsb"]
    assert set(result.metrics) == {"pearson", "spearman"} and result.steps == 2
    assert result.predictions["dev"]["prediction_variance"] > 0  # a real regression output per row
    # Training moves the head's loss on a fixed batch down (the gradient reaches the head and the encoder).
    torch.manual_seed(0)
    clf = make_classifier(str(tiny_teacher_dir), task_spec("stsb"), seed=0, head=head)
    clf.train()
    batch, labels = _tiny_batch(default_tokenizer), torch.tensor([4.0, 1.0])
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        out = clf(**batch, labels=labels)
        losses.append(out.loss.item())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]


def test_mean_head_is_a_masked_mean_and_one_linear_layer(tiny_teacher_dir, default_tokenizer):
    from fastkd.glue.heads import make_classifier
    from fastkd.glue.tasks import task_spec
    from fastkd.models import load_encoder

    clf = make_classifier(str(tiny_teacher_dir), task_spec("mnli"), seed=5, head="mean").eval()
    batch = _tiny_batch(default_tokenizer)
    with torch.no_grad():
        hidden = load_encoder(str(tiny_teacher_dir)).eval()(**batch).last_hidden_state
        mask = batch["attention_mask"]
        pooled = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(mask))])
        expected = pooled @ clf.classifier.weight.T + clf.classifier.bias
        got = clf(**batch).logits
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The head is drawn from the seed: the same seed the same head, another seed another.
    again = make_classifier(str(tiny_teacher_dir), task_spec("mnli"), seed=5, head="mean")
    other = make_classifier(str(tiny_teacher_dir), task_spec("mnli"), seed=6, head="mean")
    assert torch.equal(again.classifier.weight, clf.classifier.weight)
    assert not torch.equal(other.classifier.weight, clf.classifier.weight)


def test_biencoder_head_encodes_each_sentence_alone_as_sentence_transformers_fine_tunes(tiny_teacher_dir,
                                                                                        default_tokenizer):
    from fastkd.glue.data import padded_batch, subset_rows
    from fastkd.glue.heads import BiEncoderClassifier, PooledClassifier, make_classifier
    from fastkd.glue.tasks import task_spec
    from fastkd.models import load_encoder

    cache = TaskCache(str(FIXTURES))
    spec = task_spec("stsb")
    train = cache.data(spec).train
    assert cache.encoded(train, default_tokenizer, 48).a_ids is None  # only where the head asks for them
    enc = cache.encoded(train, default_tokenizer, 48, apart=True)
    assert subset_rows(enc, [3, 1]).b_ids == [enc.b_ids[3], enc.b_ids[1]]  # (held-out scoring keeps them)
    assert enc.a_ids[3] == default_tokenizer(train.text_a[3], truncation=True, max_length=48)["input_ids"]
    assert enc.b_ids[3] == default_tokenizer(train.text_b[3], truncation=True, max_length=48)["input_ids"]
    rows = [0, 1, 2, 3]
    batch = padded_batch(enc, rows, default_tokenizer.pad_token_id, apart=True)
    assert set(batch) == {"input_ids", "attention_mask", "input_ids_b", "attention_mask_b"}
    clf = make_classifier(str(tiny_teacher_dir), spec, seed=0, head="biencoder", label_max=5.0).eval()
    assert isinstance(clf, BiEncoderClassifier)
    encoder = load_encoder(str(tiny_teacher_dir)).eval()

    def mean_pooled(ids, mask):
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    labels = enc.labels[rows]
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(mean_pooled(batch["input_ids"], batch["attention_mask"]),
                                                       mean_pooled(batch["input_ids_b"], batch["attention_mask_b"]))
        out = clf(**batch, labels=labels)
    torch.testing.assert_close(out.logits[:, 0], 5.0 * cosine, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(cosine, labels / 5.0), rtol=1e-5, atol=1e-6)
    # a pair class: one linear layer on (u, v, |u - v|); a single sentence: the pipeline head
    assert make_classifier(str(tiny_teacher_dir), task_spec("mnli"), 0, "biencoder").classifier.in_features == 96
    assert isinstance(make_classifier(str(tiny_teacher_dir), task_spec("sst2"), 0, "biencoder"), PooledClassifier)
    # fine-tuned end to end, regression and pair classes, each sentence encoded alone at train and dev time
    cfg = FinetuneConfig(max_steps=3, batch_size=8, max_seq_len=48, progress=False, head="biencoder", lr=1e-3)
    results = evaluate(str(tiny_teacher_dir), default_tokenizer, parse_tasks("stsb,wnli"), cache, cfg)
    assert results["stsb"].predictions["dev"]["prediction_variance"] > 0 and results["stsb"].steps == 3
    assert set(results["wnli"].metrics) == {"accuracy"}


def test_pooler_reinit_replaces_the_copied_pooler(tiny_teacher_dir):
    from fastkd.glue.heads import make_classifier
    from fastkd.glue.tasks import task_spec
    from fastkd.models import load_encoder

    copied = load_encoder(str(tiny_teacher_dir)).pooler.dense.weight
    kept = make_classifier(str(tiny_teacher_dir), task_spec("rte"), seed=0, head="pooler")
    fresh = make_classifier(str(tiny_teacher_dir), task_spec("rte"), seed=0, head="pooler-reinit")
    assert torch.equal(kept.bert.pooler.dense.weight, copied)
    assert not torch.allclose(fresh.bert.pooler.dense.weight, copied)
    assert torch.equal(fresh.bert.pooler.dense.weight,  # seeded
                       make_classifier(str(tiny_teacher_dir), task_spec("rte"), seed=0, head="pooler-reinit")
                       .bert.pooler.dense.weight)
    assert torch.equal(fresh.bert.encoder.layer[0].attention.self.query.weight,
                       kept.bert.encoder.layer[0].attention.self.query.weight)  # the encoder is copied unchanged


def test_pipeline_head_pools_as_the_pipeline(tmp_path, tiny_teacher_dir, default_tokenizer, caplog):
    import logging

    from fastkd.glue.heads import make_classifier
    from fastkd.glue.tasks import task_spec
    from fastkd.models import load_encoder

    model = make_pipeline_teacher(tmp_path / "cls-pipeline", tiny_teacher_dir, pooling="cls")
    clf = make_classifier(str(model), task_spec("stsb"), seed=0, head="pipeline").eval()
    assert clf.pooling.mode == "cls" and not clf.pooling.normalize  # the pooling, not the Normalize (see HEADS)
    batch = _tiny_batch(default_tokenizer)
    with torch.no_grad():
        hidden = load_encoder(str(model)).eval()(**batch).last_hidden_state
        torch.testing.assert_close(clf(**batch).logits, hidden[:, 0] @ clf.classifier.weight.T + clf.classifier.bias)
    # A model without a pipeline pools by mean, said in one line.
    from fastkd.glue import heads

    heads._HEAD_TOLD.discard((str(tiny_teacher_dir), "pipeline"))  # said once per process: an earlier test may have
    with caplog.at_level(logging.INFO, logger="fastkd.glue.heads"):
        plain = make_classifier(str(tiny_teacher_dir), task_spec("stsb"), seed=0, head="pipeline")
    assert plain.pooling.mode == "mean"
    assert [r.message for r in caplog.records if "no sentence-transformers pipeline" in r.message]
    # A Pooling mode the head cannot reproduce is one line naming the way out.
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    with pytest.raises(UserError, match="choose --head mean"):
        make_classifier(str(model), task_spec("stsb"), seed=0, head="pipeline")


def test_unknown_head_is_one_line_and_a_resume_keeps_its_head(tmp_path, tiny_teacher_dir, capfd):
    with pytest.raises(UserError, match="--head must be one of"):
        FinetuneConfig(head="cls").validate()
    config = tmp_path / "glue.json"
    config.write_text(json.dumps({"model": [str(tiny_teacher_dir)], "tasks": "wnli", "data_dir": str(FIXTURES),
                                  "output": str(tmp_path / "o"), "head": "cls"}))
    assert "head must be one of pooler, pooler-reinit, mean, pipeline, biencoder (got 'cls')" in _one_line_error(
        capfd, ["glue", "--config", str(config)])
    code, err = run_cli(capfd, "glue", "--model", str(tiny_teacher_dir), "--tasks", "wnli", "--data-dir",
                        str(FIXTURES), "--output", str(tmp_path / "o"), "--head", "cls")
    assert code == 2 and len(err) == 1 and "--head: invalid choice: 'cls'" in err[0], err
    args = ["glue", "--model", str(tiny_teacher_dir), "--tasks", "wnli", "--data-dir", str(FIXTURES),
            "--output", str(tmp_path / "o"), *QUICK, "--head", "mean"]
    assert main(args) == 0
    report = json.loads((tmp_path / "o" / "glue.json").read_text())
    assert report["settings"]["head"] == "mean" and "head mean" in (tmp_path / "o" / "glue.md").read_text()
    assert "head (saved 'mean', now 'pooler')" in _one_line_error(capfd, args[:-1] + ["pooler", "--resume"])
    # A glue.json from before --head and --regression-bias: the copied pooler and a bias from 0; it
    # resumes as that, and only that.
    report["settings"].pop("head")
    report["settings"].pop("regression_bias")
    (tmp_path / "o" / "glue.json").write_text(json.dumps(report))
    assert "head (saved 'pooler', now 'mean')" in _one_line_error(capfd, args + ["--resume"])
    # WNLI is no regression task: the bias never mattered, so any --regression-bias resumes it
    assert main(args[:-1] + ["pooler", "--resume", "--regression-bias", "label-mean"]) == 0
    # STS-B is: a resume with another bias start is refused
    stsb = ["glue", "--model", str(tiny_teacher_dir), "--tasks", "stsb", "--data-dir", str(FIXTURES),
            "--output", str(tmp_path / "s"), *QUICK, "--regression-bias", "zero"]
    assert main(stsb) == 0
    assert "regression_bias (saved 'zero', now 'label-mean')" in _one_line_error(
        capfd, stsb[:-1] + ["label-mean", "--resume"])


@pytest.mark.parametrize("head", ["pooler", "mean"])
def test_regression_bias_starts_at_the_mean_label(head, tiny_teacher_dir, default_tokenizer, monkeypatch):
    from fastkd.glue import finetune
    from fastkd.glue.tasks import task_spec

    clf = finetune.make_classifier(str(tiny_teacher_dir), task_spec("stsb"), seed=0, head=head, label_mean=2.5)
    assert clf.classifier.bias.tolist() == [2.5]
    assert finetune.make_classifier(str(tiny_teacher_dir), task_spec("stsb"), 0, head).classifier.bias.tolist() == [0]
    assert not finetune.make_classifier(str(tiny_teacher_dir), task_spec("rte"), 0, head,
                                        label_mean=2.5).classifier.bias.any()  # classification: untouched
    seen = []
    real = finetune.make_classifier
    monkeypatch.setattr(finetune, "make_classifier", lambda *a: seen.append(a[4:]) or real(*a))  # (label_mean, label_max)
    cache = TaskCache(str(FIXTURES))
    for bias in ("label-mean", "zero"):
        cfg = FinetuneConfig(max_steps=1, max_train_examples=8, batch_size=4, max_seq_len=32, progress=False,
                             head=head, regression_bias=bias)
        finetune.finetune_task(str(tiny_teacher_dir), default_tokenizer, task_spec("stsb"), cache, cfg)
    labels = cache.data(task_spec("stsb")).train.labels
    from fastkd.glue.data import subsample

    rows = subsample(len(labels), 8, 0)
    assert seen[0][0] == pytest.approx(sum(labels[i] for i in rows) / 8) and seen[1][0] is None
    assert seen[0][1] == pytest.approx(max(abs(labels[i]) for i in rows))  # the biencoder's similarity scale
