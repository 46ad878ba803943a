import json

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from fastkd.capture import recording
from fastkd.export import export_student
from fastkd.mapping import LayerMapping
from fastkd.models import build_student, load_teacher, student_shape


def _student(teacher_dir):
    teacher = load_teacher(str(teacher_dir))
    student = build_student(teacher, student_shape(teacher.config, 2), "teacher", LayerMapping((2, 4), 4))
    with torch.no_grad():  # move away from the teacher copy so a wrong reload would show
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student


def test_export_reloads_with_identical_outputs(tmp_path, tiny_teacher_dir, default_tokenizer):
    student = _student(tiny_teacher_dir)
    target = export_student(student, default_tokenizer, tmp_path / "student",
                            {"mapping": "2,4", "teacher": str(tiny_teacher_dir), "student": {"layers": 2}})
    batch = default_tokenizer(["a short sentence", "a longer sentence with several more words in it"],
                              padding=True, return_tensors="pt")
    student.eval()
    with torch.no_grad(), recording():
        expected = student(**batch).last_hidden_state
    reloaded = AutoModel.from_pretrained(target).eval()
    with torch.no_grad():
        got = reloaded(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-6)
    assert "fastkd" not in (target / "config.json").read_text()  # loads without fastkd's attention registry

    clf = AutoModelForSequenceClassification.from_pretrained(target, num_labels=2)
    torch.testing.assert_close(clf.bert.pooler.dense.weight, student.pooler.dense.weight)  # pooler kept for fine-tuning
    assert clf(**batch).logits.shape == (2, 2)
    assert AutoTokenizer.from_pretrained(target).get_vocab() == default_tokenizer.get_vocab()
    assert json.loads((target / "fastkd.json").read_text())["mapping"] == "2,4"
    assert "2,4" in (target / "README.md").read_text()


def test_export_replaces_atomically(tmp_path, tiny_teacher_dir, default_tokenizer):
    student = _student(tiny_teacher_dir)
    target = tmp_path / "student"
    export_student(student, default_tokenizer, target, {"mapping": "2,4"})
    export_student(student, default_tokenizer, target, {"mapping": "2,4", "steps": 7})
    assert json.loads((target / "fastkd.json").read_text())["steps"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no staging or old copies left behind


# --- issue 22 item 7: a full-width student keeps the teacher's Dense module --------------------------------

def _dense_pipeline_teacher(path, tiny_teacher_dir):
    """The tiny teacher as a real sentence-transformers model: Transformer -> mean Pooling -> Dense 32 -> 8
    -> Normalize, saved by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    torch.manual_seed(0)
    modules = [Transformer(str(tiny_teacher_dir)), Pooling(32), Dense(32, 8), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return path


def test_a_full_width_student_keeps_the_teachers_dense_module(tmp_path, tiny_teacher_dir, default_tokenizer, caplog):
    import logging

    from sentence_transformers import SentenceTransformer

    teacher_dir = _dense_pipeline_teacher(tmp_path / "teacher", tiny_teacher_dir)
    modules = json.loads((teacher_dir / "modules.json").read_text())
    dense = next(m["path"] for m in modules if m["type"].endswith("Dense"))
    student = _student(teacher_dir)
    assert student.config.hidden_size == 32  # the teacher's width
    target = export_student(student, default_tokenizer, tmp_path / "student", {}, pipeline_from=teacher_dir)
    assert json.loads((target / "modules.json").read_text()) == modules
    assert sorted(p.name for p in (target / dense).iterdir()) == sorted(p.name for p in (teacher_dir / dense).iterdir())
    for f in (teacher_dir / dense).iterdir():  # the teacher's projection, copied byte for byte
        assert (target / dense / f.name).read_bytes() == f.read_bytes()
    assert "Dense" in json.loads((target / "fastkd.json").read_text())["sentence_pipeline"]
    embeddings = SentenceTransformer(str(target), device="cpu").encode(["a short sentence", "another one"])
    assert embeddings.shape == (2, 8)  # the teacher's output dimension, through its Dense

    # A narrower student cannot take it: the pipeline is left out, said in one line.
    teacher = load_teacher(str(teacher_dir))
    narrow = build_student(teacher, student_shape(teacher.config, 2, hidden=16), "teacher", LayerMapping((2, 4), 4))
    with caplog.at_level(logging.WARNING, logger="fastkd.export"):
        target = export_student(narrow, default_tokenizer, tmp_path / "narrow", {}, pipeline_from=teacher_dir)
    assert "Dense module(s) hold weights of the teacher's width (32), not the student's (16)" in caplog.text
    assert not (target / "modules.json").exists()


def test_a_narrower_students_learned_projection_loads_under_the_pipeline_sentence_transformers_saved(
        tmp_path, tiny_teacher_dir, default_tokenizer):
    """A teacher saved by the installed sentence-transformers (its own module type names) and a narrower
    student with a learned projection: the exported pipeline loads and applies it, between Pooling and
    Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    teacher_dir = tmp_path / "teacher"
    SentenceTransformer(modules=[Transformer(str(tiny_teacher_dir)), Pooling(32), Normalize()],
                        device="cpu").save(str(teacher_dir))
    teacher = load_teacher(str(teacher_dir))
    narrow = build_student(teacher, student_shape(teacher.config, 2, hidden=16), "teacher", LayerMapping((2, 4), 4))
    torch.manual_seed(1)
    dense = {"weight": torch.randn(32, 16), "bias": torch.randn(32)}
    target = export_student(narrow, default_tokenizer, tmp_path / "narrow", {}, pipeline_from=teacher_dir,
                            sentence_dense=dense)
    model = SentenceTransformer(str(target), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    got = torch.from_numpy(model.encode(["a short sentence", "another one"], convert_to_numpy=True))
    features = model.tokenize(["a short sentence", "another one"])
    with torch.no_grad():
        pooled = model[1](model[0](dict(features)))["sentence_embedding"]
    want = torch.nn.functional.normalize(pooled @ dense["weight"].T + dense["bias"], dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert json.loads((target / "fastkd.json").read_text())["sentence_dense"] == "16 -> 32, learned with the sentence term"
