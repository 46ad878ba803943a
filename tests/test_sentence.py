"""A sentence-embedding teacher's pipeline travels with its student (fastkd.sentence), checked with
the real sentence-transformers package; zero-shot STS-B in `fastkd glue`."""

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from fastkd.cli import main
from fastkd.corpus import corpus_layout
from fastkd.export import export_student
from fastkd.glue.config import FinetuneConfig
from fastkd.glue.data import TaskCache
from fastkd.glue.probe import zero_shot_similarity
from fastkd.losses import objective_weights
from fastkd.mapping import LayerMapping
from fastkd.models import build_student, default_teacher_path, load_teacher, load_tokenizer, student_shape

from conftest import make_pipeline_teacher

GLUE_FIXTURES = Path(__file__).parent / "fixtures" / "glue"
SENTENCES = ["A chef is playing a guitar.", "The cat sat on the mat while it rained outside all day long."]


@pytest.fixture(scope="module")
def pipeline_student(tmp_path_factory):
    """A 2-layer, 192-wide student of the real all-MiniLM-L6-v2 (Transformer -> mean Pooling -> Normalize),
    exported with the teacher's pipeline."""
    teacher = load_teacher("default")
    shape = student_shape(teacher.config, 2, hidden=192)
    student = build_student(teacher, shape, "teacher", LayerMapping((3, 6), 6))
    target = tmp_path_factory.mktemp("st") / "student"
    export_student(student, load_tokenizer("default"), target, {"mapping": "3,6"}, pipeline_from=default_teacher_path())
    return target


def test_the_student_runs_the_teachers_pipeline(pipeline_student):
    info = json.loads((pipeline_student / "fastkd.json").read_text())
    assert info["sentence_pipeline"] == "Transformer -> Pooling (mean) -> Normalize"
    assert info["family"] == "BERT"
    assert json.loads((pipeline_student / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 192
    model = SentenceTransformer(str(pipeline_student), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    got = torch.from_numpy(model.encode(SENTENCES, convert_to_numpy=True))
    # The same pipeline by hand: mean over real tokens, then unit length.
    tokenizer = load_tokenizer(str(pipeline_student))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(pipeline_student)(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert got.shape == (2, 192)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert "SentenceTransformer(PATH)" in (pipeline_student / "README.md").read_text()


def test_a_pipeline_with_weights_of_the_teachers_width_is_left_out(tmp_path, tiny_teacher_dir, default_tokenizer, caplog):
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    (teacher_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    teacher = load_teacher(str(tiny_teacher_dir))
    student = build_student(teacher, student_shape(teacher.config, 2), "teacher", LayerMapping((2, 4), 4))
    with caplog.at_level(logging.WARNING, logger="fastkd.export"):
        target = export_student(student, default_tokenizer, tmp_path / "student", {}, pipeline_from=teacher_dir)
    assert "Dense module(s) hold weights of the teacher's width" in caplog.text
    assert not (target / "modules.json").exists() and "sentence_pipeline" not in json.loads((target / "fastkd.json").read_text())


def test_glue_scores_sentence_models_zero_shot_on_stsb(tmp_path, pipeline_student, tiny_teacher_dir, capfd):
    out = tmp_path / "glue"
    common = ["--tasks", "wnli", "--data-dir", str(GLUE_FIXTURES), "--max-steps", "1", "--batch-size", "4",
              "--max-seq-len", "48", "--no-progress"]
    assert main(["glue", "--model", str(pipeline_student), "--model", str(tiny_teacher_dir), "--output", str(out),
                 *common]) == 0
    report = json.loads((out / "glue.json").read_text())
    assert "zeroshot" not in report["models"][1]  # the tiny BERT has no pipeline
    assert (out / "glue.md").read_text().splitlines()[3].endswith("| - |")
    stsb = report["models"][0]["zeroshot"]["stsb"]
    assert stsb["split"] == "dev" and stsb["dev_examples"] == 8
    assert stsb["pipeline"] == "Transformer -> Pooling (mean) -> Normalize"
    # Mean pooling then unit length: the cosines of fastkd's own mean-pooled zero-shot score (the
    # embeddings themselves are compared in test_the_student_runs_the_teachers_pipeline). The two
    # paths' cosines differ by float rounding (other GEMM kernels, batches): Pearson moves by about
    # that; Spearman over 8 pairs with near-ties may swap one adjacent rank (6 * 2 / (8 * 63) = 0.024).
    own = zero_shot_similarity(str(pipeline_student), load_tokenizer(str(pipeline_student)), TaskCache(str(GLUE_FIXTURES)),
                               FinetuneConfig(heldout=0, max_seq_len=128, progress=False))
    assert stsb["pearson"] == pytest.approx(own.metrics["pearson"], abs=1e-4)
    assert stsb["spearman"] == pytest.approx(own.metrics["spearman"], abs=0.03)
    assert "STS-B zero-shot (S)" in (out / "glue.md").read_text()
    # A resume that runs only the other model keeps the first one's zero-shot result.
    assert main(["glue", "--model", str(tiny_teacher_dir), "--output", str(out), *common, "--resume"]) == 0
    kept = next(m for m in json.loads((out / "glue.json").read_text())["models"] if m["path"] == str(pipeline_student))
    assert kept["zeroshot"]["stsb"] == stsb
    # --no-zeroshot-stsb: none.
    assert main(["glue", "--model", str(pipeline_student), "--output", str(tmp_path / "off"), *common,
                 "--no-zeroshot-stsb"]) == 0
    assert "zeroshot" not in json.loads((tmp_path / "off" / "glue.json").read_text())["models"][0]
    # A damaged pipeline is one line before any fine-tuning.
    damaged = tmp_path / "damaged"
    import shutil
    shutil.copytree(pipeline_student, damaged)
    (damaged / "modules.json").write_text("[{not json")
    capfd.readouterr()
    assert main(["glue", "--model", str(damaged), "--output", str(tmp_path / "bad"), *common]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sentence-transformers pipeline" in err[0] and "damaged" in err[0], err


# --- the sentence embedding as a distillation target (issue 23) ----------------------------------

def test_the_sentence_term_pools_exactly_as_the_teachers_pipeline():
    """sentence_embedding of the teacher's last layer = sentence-transformers' own encode of it."""
    from fastkd.sentence import read_pooling, sentence_embedding

    path = default_teacher_path()
    pooling = read_pooling(path)
    assert (pooling.mode, pooling.normalize) == ("mean", True)
    tokenizer = load_tokenizer("default")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")  # the short one is padded
    with torch.no_grad():
        last = AutoModel.from_pretrained(str(path))(**batch).last_hidden_state
    ours = sentence_embedding(last, batch["attention_mask"], pooling)
    theirs = SentenceTransformer(str(path), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_each_pooling_mode_against_a_hand_computation():
    from fastkd.sentence import SentencePooling, sentence_embedding

    torch.manual_seed(0)
    hidden, mask = torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mean0 = hidden[0, :3].mean(0)
    assert torch.allclose(sentence_embedding(hidden, mask, SentencePooling("mean"))[0], mean0)
    assert torch.allclose(sentence_embedding(hidden, mask, SentencePooling("max"))[0], hidden[0, :3].amax(0))
    assert torch.allclose(sentence_embedding(hidden, mask, SentencePooling("cls"))[0], hidden[0, 0])
    normed = sentence_embedding(hidden, mask, SentencePooling("mean", normalize=True))[0]
    assert torch.allclose(normed, mean0 / mean0.norm())


@pytest.mark.parametrize("modules, pooling, said", [
    ("not json", None, "pipeline of"),
    ('[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}, '
     '{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]',
     {"pooling_mode_weightedmean_tokens": True}, "fastkd knows mean, cls, max pooling"),
])
def test_a_pipeline_the_sentence_term_cannot_read_is_one_line(tmp_path, tiny_teacher_dir, small_corpus, capfd,
                                                              modules, pooling, said):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "modules.json").write_text(modules)
    if pooling is not None:
        (teacher / "1_Pooling").mkdir()
        (teacher / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    code = main(["distill", "--teacher", str(teacher), "--corpus", str(small_corpus), "--objective", "sentence",
                 "--max-steps", "1", "--max-seq-len", "32", "--output", str(tmp_path / "o"), "--no-progress"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and said in err[0], err


def test_the_sentence_term_is_zero_for_the_teacher_itself_and_trains_a_student(default_tokenizer, tiny_teacher_dir):
    from fastkd.losses import DistillLoss
    from fastkd.sentence import SentencePooling
    from fastkd.teacher import Teacher

    teacher_model = load_teacher(str(tiny_teacher_dir))
    weights = objective_weights("sentence")
    batch = default_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    pooling = SentencePooling("mean", normalize=True)

    def term(student, mapping):
        loss = DistillLoss(mapping, student.config.hidden_size, 32, weights, backend="torch", pooling=pooling)
        teacher = Teacher(teacher_model, loss.teacher_hidden_layers(), [])
        out = student(**batch, output_hidden_states=True)
        return loss(out.hidden_states, {}, teacher(batch["input_ids"], batch["attention_mask"]))

    same = build_student(teacher_model, student_shape(teacher_model.config, 4), "teacher", LayerMapping((1, 2, 3, 4), 4))
    assert term(same, LayerMapping((1, 2, 3, 4), 4)).terms["sentence"].item() < 1e-10
    mapping = LayerMapping((2, 4), 4)
    small = build_student(teacher_model, student_shape(teacher_model.config, 2), "teacher", mapping)
    out = term(small, mapping)
    assert set(out.terms) == {"sentence"} and out.total.item() > 1e-6
    out.total.backward()
    assert small.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_distill_and_search_take_the_sentence_objective(tmp_path, tiny_teacher_dir, small_corpus, capfd):
    common = ["--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus), "--no-progress"]
    out = tmp_path / "d"
    assert main(["distill", *common, "--objective", "tinybert", "--w-sentence", "2", "--max-steps", "3",
                 "--batch-size", "4", "--max-seq-len", "32", "--output", str(out)]) == 0
    info = json.loads((out / "student" / "fastkd.json").read_text())
    assert info["loss_weights"]["sentence"] == 2.0 and "sentence" in info["final_losses"]
    assert info["sentence_pooling"] == "mean pooling (no sentence-transformers pipeline)"
    from fastkd.cli import parse_config
    from fastkd.search.run import Search

    argv = ["search", *common, "--student-layers", "2", "--data-dir", str(GLUE_FIXTURES), "--proxy-tasks", "wnli",
            "--proxy-sequences", "16", "--proxy-seq-len", "32", "--proxy-steps", "2", "--proxy-batch-size", "4",
            "--proxy-finetune-steps", "1", "--proxy-finetune-examples", "8", "--proxy-finetune-batch-size", "4",
            "--proxy-finetune-seq-len", "32", "--population", "2", "--generations", "1", "--ladder", "full",
            "--verdict-seeds", "0", "--proxy-heldout", "4", "--objective", "sentence", "--corpus-mode", "sentences",
            "--output", str(tmp_path / "s")]
    search = Search(parse_config(argv)[1])
    search.run()
    trained = list(search.evaluator.proxy._students.values())
    assert trained and all(set(losses) == {"loss", "sentence"} for _, losses, _ in trained), trained
    assert corpus_layout(search.corpus)["mode"] == "sentences" and len(search.corpus) == 16
    assert "- proxy: 16 sentences of at most 32 tokens" in (tmp_path / "s" / "report.md").read_text()


def test_a_narrower_student_learns_a_projection_its_pipeline_carries_as_a_dense(tmp_path, tiny_teacher_dir,
                                                                                small_corpus):
    """--student-hidden 16 under a 32-wide teacher with a pipeline: the sentence term compares through a
    learned 16 -> 32 projection, exported as a Dense between the Pooling and Normalize, so the student's
    pipeline puts out embeddings in the teacher's space, as sentence-transformers reads them."""
    teacher = make_pipeline_teacher(tmp_path / "teacher", tiny_teacher_dir)
    out = tmp_path / "narrow"
    assert main(["distill", "--teacher", str(teacher), "--corpus", str(small_corpus), "--objective", "sentence",
                 "--student-hidden", "16", "--max-steps", "4", "--batch-size", "4", "--max-seq-len", "32",
                 "--checkpoint-every", "2", "--output", str(out), "--no-progress"]) == 0
    info = json.loads((out / "student" / "fastkd.json").read_text())
    assert info["sentence_pipeline"] == "Transformer -> Pooling (mean) -> Dense -> Normalize"
    assert info["sentence_dense"] == "16 -> 32, learned with the sentence term" and info["student"]["hidden"] == 16
    # the exported Dense is the projection the run trained (its last checkpoint's), which training moves
    state, earlier = (torch.load(out / "checkpoints" / f"step-0000000{k}" / "state.pt", weights_only=False)["criterion"]
                      for k in (4, 2))
    assert not torch.equal(state["sentence_projection.weight"], earlier["sentence_projection.weight"])
    dense = load_file(out / "student" / "sentence_dense" / "model.safetensors")
    torch.testing.assert_close(dense["linear.weight"], state["sentence_projection.weight"].float(), rtol=0, atol=0)
    torch.testing.assert_close(dense["linear.bias"], state["sentence_projection.bias"].float(), rtol=0, atol=0)
    # sentence-transformers runs the pipeline: mean over real tokens, the projection, unit length
    model = SentenceTransformer(str(out / "student"), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    got = torch.from_numpy(model.encode(SENTENCES, convert_to_numpy=True))
    tokenizer = load_tokenizer(str(out / "student"))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(out / "student")(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    want = torch.nn.functional.normalize(pooled @ dense["linear.weight"].T + dense["linear.bias"], dim=-1)
    assert got.shape == (2, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # GLUE's pipeline head reads the Pooling of that pipeline, whatever follows it
    from fastkd.glue.heads import make_classifier
    from fastkd.glue.tasks import task_spec

    assert make_classifier(str(out / "student"), task_spec("sst2"), seed=0, head="pipeline").pooling.mode == "mean"
    # a narrower student under a teacher without a pipeline: its projection could not be exported, refused now
    code = main(["distill", "--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus), "--objective",
                 "sentence", "--student-hidden", "16", "--output", str(tmp_path / "lost"), "--no-progress"])
    assert code == 2 and not (tmp_path / "lost").exists()


def test_read_pooling_reads_what_the_installed_sentence_transformers_saves(tmp_path):
    """The current Pooling format (`pooling_mode`), the older `pooling_mode_*_tokens` keys, and a
    pipeline shape the term does not reproduce (a Dense after the pooling): refused in one line."""
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # (sentence-transformers before 5.x)
        from sentence_transformers.models import Pooling

    from fastkd.errors import UserError
    from fastkd.sentence import read_pooling

    def pipeline(folder, *modules):
        folder.mkdir()
        (folder / "modules.json").write_text(json.dumps(
            [{"idx": i, "name": str(i), "path": sub, "type": f"sentence_transformers.models.{kind}"}
             for i, (kind, sub) in enumerate((("Transformer", ""),) + modules)]))
        return folder

    new = pipeline(tmp_path / "new", ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize"))
    (new / "1_Pooling").mkdir()
    Pooling(32, pooling_mode="cls").save(str(new / "1_Pooling"))
    assert (read_pooling(new).mode, read_pooling(new).normalize) == ("cls", True)
    old = pipeline(tmp_path / "old", ("Pooling", "1_Pooling"))
    (old / "1_Pooling").mkdir()
    (old / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    assert (read_pooling(old).mode, read_pooling(old).normalize) == ("max", False)
    dense = pipeline(tmp_path / "dense", ("Pooling", "1_Pooling"), ("Dense", "2_Dense"), ("Normalize", "3_Normalize"))
    with pytest.raises(UserError, match="reproduces Transformer -> Pooling \\[-> Normalize\\] pipelines, and this "
                                        "one is Transformer -> Pooling -> Dense -> Normalize"):
        read_pooling(dense)


def test_a_sentence_corpus_with_no_sentence_that_fits_is_one_line_and_leaves_nothing(tmp_path, tiny_teacher_dir,
                                                                                      capfd):
    corpus = tmp_path / "long.txt"
    corpus.write_text("This one sentence is far longer than the eight tokens that the run allows for it .\n")
    out = tmp_path / "o"
    search = ["search", "--data-dir", str(GLUE_FIXTURES), "--proxy-tasks", "wnli", "--ladder", "full",
              "--proxy-heldout", "4"]
    for command, flag in ((["distill"], "--max-seq-len"), (search, "--proxy-seq-len")):
        code = main([*command, "--teacher", str(tiny_teacher_dir), "--corpus", str(corpus), "--corpus-mode",
                     "sentences", flag, "8", "--cache-dir", str(tmp_path / "cache"), "--output", str(out),
                     "--no-progress"])
        err = capfd.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert (f"has no sentence that fits {flag} 8: all 1 of its sentences are longer than 6 tokens; raise {flag}, "
                "or use --corpus-mode packed") in err[0]
        assert not out.exists()


def test_auto_distils_a_sentence_model_for_its_embedding_on_sentences_and_anything_else_as_before(tiny_teacher_dir,
                                                                                                  tmp_path):
    from dataclasses import replace

    from fastkd.config import DistillConfig
    from fastkd.distill import resolve_auto

    base = DistillConfig(output=str(tmp_path / "o"), corpus="unused.txt")
    assert (base.objective, base.corpus_mode) == ("auto", "auto")

    def chosen(**kw):
        cfg = resolve_auto(replace(base, **kw))
        return cfg.objective, cfg.corpus_mode

    assert chosen() == ("sentence", "sentences")  # all-MiniLM-L6-v2: a sentence-transformers pipeline
    assert chosen(student_hidden=192) == ("tinybert", "packed")  # narrower: the embedding cannot be compared
    assert chosen(teacher=str(tiny_teacher_dir)) == ("tinybert", "packed")  # a plain BERT: no pipeline
    assert chosen(objective="minilmv2") == ("minilmv2", "packed")
    assert chosen(objective="sentence", teacher=str(tiny_teacher_dir)) == ("sentence", "sentences")
    assert chosen(corpus_mode="lines") == ("sentence", "lines")
    assert chosen(objective="tinybert", corpus_mode="sentences") == ("tinybert", "sentences")
    # a pipeline the term cannot use (a pooling mode fastkd does not know) falls back, it is no refusal
    import shutil

    odd = tmp_path / "odd-pipeline"
    shutil.copytree(tiny_teacher_dir, odd)
    (odd / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}, '
        '{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    (odd / "1_Pooling").mkdir()
    (odd / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    assert chosen(teacher=str(odd)) == ("tinybert", "packed")
    (odd / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert chosen(teacher=str(odd)) == ("sentence", "sentences")
    # --resume continues what the run became, not what auto would pick today
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"command": "distill", "config": {"teacher": "default"}}))
    assert chosen(resume=True) == ("tinybert", "packed")  # saved before objectives and corpus modes
    (out / "config.json").write_text(json.dumps({"command": "distill", "config": {
        "objective": "minilm", "corpus_mode": "lines"}}))
    assert chosen(resume=True) == ("minilm", "lines")


def test_sentence_labels_computed_once_equal_the_teachers_per_batch_embeddings(tmp_path, tiny_teacher_dir,
                                                                               small_corpus, monkeypatch):
    from fastkd import teacher as teacher_mod
    from fastkd.corpus import BatchStream, load_corpus
    from fastkd.models import load_teacher, load_tokenizer
    from fastkd.sentence import SentencePooling, sentence_embedding
    from fastkd.teacher import SentenceLabels, Teacher

    corpus = load_corpus(str(small_corpus), load_tokenizer(str(tiny_teacher_dir)), 32, tmp_path / "c", mode="sentences")
    stream = BatchStream(corpus, 8, seed=1)
    teacher = Teacher(load_teacher(str(tiny_teacher_dir)), [4], [])
    labels = SentenceLabels(teacher, stream, SentencePooling(), 4, torch.device("cpu"))
    assert teacher.forwards == -(-len(corpus) // 64)  # one pass over the corpus, in batches of 64
    for _ in range(3):  # the stream's batches, padded otherwise than when labelled
        rows, batch = stream.take()
        assert rows == stream.indices(stream.state.batches_done - 1)
        direct = sentence_embedding(teacher(batch["input_ids"], batch["attention_mask"]).hidden[4],
                                    batch["attention_mask"], SentencePooling())
        torch.testing.assert_close(labels.outputs(rows, batch["attention_mask"]).sentence, direct, atol=1e-5, rtol=1e-4)
    # labelling needs the objective to read only the sentence, 1.5 passes or more, and room for the labels
    only, both = objective_weights("sentence"), objective_weights("tinybert", sentence=1.0)
    size = len(corpus) * 32 * 4
    assert teacher_mod.labels_pay_off(only, 2 * len(corpus), len(corpus), 32, room=size)
    assert not teacher_mod.labels_pay_off(only, 2 * len(corpus), len(corpus), 32, room=size - 1)
    assert not teacher_mod.labels_pay_off(only, len(corpus), len(corpus), 32)
    assert not teacher_mod.labels_pay_off(both, 2 * len(corpus), len(corpus), 32)
    # A distillation reading its corpus twice labels it once, then trains as the per-batch teacher would.
    def distill(name):
        argv = ["distill", "--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus), "--objective", "sentence",
                "--max-seq-len", "32", "--batch-size", "8", "--max-steps", "10", "--corpus-sample", "40",
                "--cache-dir", str(tmp_path / "c"), "--output", str(tmp_path / name), "--no-progress", "--log-every", "1"]
        assert main(argv) == 0
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return json.loads((tmp_path / name / "student" / "fastkd.json").read_text()), [r["sentence"] for r in rows]

    info, labelled = distill("labelled")
    assert info["teacher_labels"] == "sentence embeddings of all 40 corpus rows, computed once"
    assert info["corpus"]["mode"] == "sentences"  # auto, for the sentence objective
    card = (tmp_path / "labelled" / "student" / "README.md").read_text()
    assert "by learning to reproduce the teacher's sentence embeddings" in card
    assert "- teacher: sentence embeddings of all 40 corpus rows, computed once (no teacher forward per step)" in card
    monkeypatch.setattr(teacher_mod, "LABELS_MIN_EPOCHS", 10.0)  # 10 steps x 8 rows read 40 rows twice: no labels
    info, per_batch = distill("per-batch")
    assert "teacher_labels" not in info
    assert labelled == pytest.approx(per_batch, rel=1e-3)
    # stopped and resumed, a labelled run (labelled again, in the same order) ends where the straight one did
    monkeypatch.setattr(teacher_mod, "LABELS_MIN_EPOCHS", 1.5)
    common = ["--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus), "--objective", "sentence",
              "--max-seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "10", "--corpus-sample",
              "40", "--cache-dir", str(tmp_path / "c"), "--no-progress", "--checkpoint-every", "5"]
    assert main(["distill", *common, "--output", str(tmp_path / "straight")]) == 0
    assert main(["distill", *common, "--output", str(tmp_path / "split"), "--stop-at-step", "5"]) == 0
    # the resume keeps the choice its start made, even where a fresh start would now choose otherwise
    monkeypatch.setattr(teacher_mod, "LABELS_MIN_EPOCHS", 10.0)
    assert main(["distill", *common, "--output", str(tmp_path / "split"), "--resume"]) == 0
    assert json.loads((tmp_path / "split" / "config.json").read_text())["resolved"]["teacher_labels"] is True
    a, b = (load_file(tmp_path / name / "student" / "model.safetensors") for name in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "teacher_labels" in json.loads((tmp_path / "split" / "student" / "fastkd.json").read_text())


def test_sentence_labels_are_stored_and_read_by_the_next_run_of_the_same_teacher_and_rows(
        tmp_path, tiny_teacher_dir, small_corpus, monkeypatch, caplog):
    from fastkd.corpus import load_corpus, sample_corpus
    from fastkd.models import load_teacher, load_tokenizer
    from fastkd.sentence import SentencePooling
    from fastkd.teacher import SentenceLabels, Teacher, labels_key

    def distill(name, *extra):
        argv = ["distill", "--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus), "--objective", "sentence",
                "--max-seq-len", "32", "--batch-size", "8", "--max-steps", "10", "--corpus-sample", "40",
                "--cache-dir", str(tmp_path / "c"), "--output", str(tmp_path / name), "--no-progress", "--log-every", "1",
                *extra]
        assert main(argv) == 0
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return json.loads((tmp_path / name / "student" / "fastkd.json").read_text())["teacher_labels"], \
            [r["sentence"] for r in rows]

    umask = os.umask(0o002)  # (safetensors writes 0600, which 0o077 would not tell apart)
    try:
        first, computed = distill("first")
    finally:
        os.umask(umask)
    assert first.endswith("computed once")
    stored = list((tmp_path / "c" / "labels").glob("*.safetensors"))
    assert len(stored) == 1 and not list((tmp_path / "c" / "labels").glob("*.tmp"))
    assert stat.S_IMODE(stored[0].stat().st_mode) == 0o664  # readable by a shared cache's other users

    def never(*args, **kwargs):
        raise AssertionError("the teacher labelled the corpus again")

    with monkeypatch.context() as m:
        m.setattr(SentenceLabels, "_compute", staticmethod(never))
        second, read = distill("second")
    assert second.endswith(f"read from the labels store ({stored[0].name})")
    assert read == computed  # the same labels, so the same run to the last digit
    # a damaged entry is computed again (a warning), and replaced by a whole one
    stored[0].write_bytes(stored[0].read_bytes()[:100])
    with caplog.at_level("WARNING", logger="fastkd"):
        third, again = distill("third")
    assert third.endswith("computed once") and again == computed
    assert "cannot be read" in caplog.text
    assert stored[0].stat().st_size > 100
    # the key names what the labels depend on: other rows, other weights, another layer or batch
    tokenizer = load_tokenizer(str(tiny_teacher_dir))
    corpus = load_corpus(str(small_corpus), tokenizer, 32, tmp_path / "c", mode="sentences")
    teacher = Teacher(load_teacher(str(tiny_teacher_dir)), [4], [])
    cpu, pooling = torch.device("cpu"), SentencePooling()
    key = labels_key(teacher, sample_corpus(corpus, "40", 0), pooling, 4, 8, cpu)
    assert key == labels_key(teacher, sample_corpus(corpus, "40", 0), pooling, 4, 8, cpu)
    assert key == stored[0].stem
    assert key != labels_key(teacher, sample_corpus(corpus, "30", 0), pooling, 4, 8, cpu)
    assert key != labels_key(teacher, sample_corpus(corpus, "40", 1), pooling, 4, 8, cpu)
    assert key != labels_key(teacher, sample_corpus(corpus, "40", 0), pooling, 3, 8, cpu)
    assert key != labels_key(teacher, sample_corpus(corpus, "40", 0), pooling, 4, 4, cpu)
    assert key != labels_key(teacher, sample_corpus(corpus, "40", 0), SentencePooling("cls"), 4, 8, cpu)
    with torch.no_grad():
        next(teacher.model.parameters())[0, 0] += 1e-3
    assert key != labels_key(teacher, sample_corpus(corpus, "40", 0), pooling, 4, 8, cpu)
    # the key is the same in a fresh process (the rows' fingerprint and the digest are not object ids)
    probe = (f"import torch; from fastkd.corpus import load_corpus, sample_corpus; "
             f"from fastkd.models import load_teacher, load_tokenizer; from fastkd.sentence import SentencePooling; "
             f"from fastkd.teacher import Teacher, labels_key; d = {str(tiny_teacher_dir)!r}; "
             f"c = load_corpus({str(small_corpus)!r}, load_tokenizer(d), 32, {str(tmp_path / 'c')!r}, mode='sentences'); "
             f"print(labels_key(Teacher(load_teacher(d), [4], []), sample_corpus(c, '40', 0), SentencePooling(), 4, 8, "
             f"torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == key


def test_labels_that_cannot_be_stored_cost_the_next_run_a_labelling_not_this_run(tmp_path, monkeypatch, caplog):
    import safetensors.torch
    from safetensors import SafetensorError

    from fastkd import teacher as teacher_mod

    def full_disk(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half")  # a partial file, as a full disk leaves one
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    (tmp_path / "labels").mkdir()
    dead = tmp_path / "labels" / ".other.safetensors.999999999.tmp"  # a killed writer's leftover (no such pid)
    dead.write_bytes(b"half")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        teacher_mod._write_labels(tmp_path / "labels" / "key.safetensors", torch.zeros(3, 4))
    assert "not stored" in caplog.text and list((tmp_path / "labels").iterdir()) == []


def test_an_interrupted_labelling_goes_on_where_it_stopped_with_the_same_labels(tmp_path, tiny_teacher_dir, small_corpus,
                                                                               monkeypatch, caplog):
    """A labelling killed half-way (an hour of a large teacher on CPUs) keeps its finished batches; the next run of
    the same key labels only the rest, and ends with the labels an uninterrupted one computes, bit for bit."""
    from fastkd import teacher as teacher_mod
    from fastkd.corpus import BatchStream, load_corpus
    from fastkd.models import load_teacher, load_tokenizer
    from fastkd.sentence import SentencePooling
    from fastkd.teacher import SentenceLabels, Teacher

    corpus = load_corpus(str(small_corpus), load_tokenizer(str(tiny_teacher_dir)), 32, tmp_path / "c", mode="sentences")
    stream = BatchStream(corpus, 8, seed=1)
    cpu, pooling, store = torch.device("cpu"), SentencePooling(), tmp_path / "labels"
    fresh = lambda: Teacher(load_teacher(str(tiny_teacher_dir)), [4], [])  # noqa: E731
    straight = SentenceLabels(fresh(), stream, pooling, 4, cpu, batch_size=8).labels  # (no store)
    batches = -(-len(corpus) // 8)
    assert batches >= 4
    monkeypatch.setattr(teacher_mod, "LABELS_SAVE_SECONDS", 0.0)  # every finished batch is kept

    class Killed(Exception):
        pass

    call = Teacher.__call__

    def killed_at_the_fourth_batch(self, *args, **kwargs):
        if self.forwards == 3:
            raise Killed
        return call(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Teacher, "__call__", killed_at_the_fourth_batch)
        with pytest.raises(Killed):
            SentenceLabels(fresh(), stream, pooling, 4, cpu, batch_size=8, store=store)
    [partial] = store.glob("*.partial.safetensors")
    assert [p.name for p in store.iterdir()] == [partial.name]  # nothing else, no temporary
    teacher = fresh()
    with caplog.at_level(logging.INFO, logger="fastkd"):
        resumed = SentenceLabels(teacher, stream, pooling, 4, cpu, batch_size=8, store=store)
    assert teacher.forwards == batches - 3 and "going on after the 24 rows" in caplog.text
    assert torch.equal(resumed.labels, straight) and resumed.resumed_rows == 24
    assert [p.name for p in store.iterdir()] == [partial.name.replace(".partial", "")]  # whole, the partial gone
    # a partial left by a run that lost a race to the whole labels goes once they are read
    (store / partial.name).write_bytes(b"left over")
    assert SentenceLabels(fresh(), stream, pooling, 4, cpu, batch_size=8, store=store).stored
    assert not (store / partial.name).exists()
    # kept batches that cannot be read are labelled again, with a warning
    store_b = tmp_path / "labels-b"
    store_b.mkdir()
    (store_b / partial.name).write_bytes(b"half" * 10)
    teacher = fresh()
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        again = SentenceLabels(teacher, stream, pooling, 4, cpu, batch_size=8, store=store_b)
    assert teacher.forwards == batches and torch.equal(again.labels, straight) and "cannot be read" in caplog.text
