"""A sentence-embedding teacher's pipeline travels with its student (fastkd.sentence), checked with
the real sentence-transformers package; zero-shot STS-B in `fastkd glue`."""

import json
import logging
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from fastkd.cli import main
from fastkd.export import export_student
from fastkd.glue.finetune import FinetuneConfig, TaskCache
from fastkd.glue.probe import zero_shot_similarity
from fastkd.mapping import LayerMapping
from fastkd.models import build_student, default_teacher_path, load_teacher, load_tokenizer, student_shape

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
