import pytest
import torch

from fastkd.errors import UserError
from fastkd.mapping import LayerMapping
from fastkd.models import build_student, load_config, load_student_dir, load_teacher, student_shape

from conftest import make_tiny_bert


def test_default_teacher_is_the_real_minilm():
    config = load_config("default")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (6, 384, 12)
    teacher = load_teacher()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.config._attn_implementation == "fastkd_capture"


def test_student_shape_defaults_keep_head_width():
    cfg = load_config("default")
    assert student_shape(cfg, 3) == student_shape(cfg, 3, 384, 12, 1536)
    narrow = student_shape(cfg, 4, hidden=256)
    assert (narrow.heads, narrow.ffn) == (8, 1024)  # head width 32 kept, FFN 4x as the teacher's 1536 / 384
    with pytest.raises(UserError, match="not divisible"):
        student_shape(cfg, 3, hidden=100, heads=3)
    with pytest.raises(UserError, match="at least 1"):
        student_shape(cfg, 0)


def test_teacher_init_copies_mapped_layers(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))
    shape = student_shape(teacher.config, 2)
    student = build_student(teacher, shape, "teacher", LayerMapping((3, None), 4))
    t_layers, s_layers = teacher.encoder.layer, student.encoder.layer
    torch.testing.assert_close(s_layers[0].output.dense.weight, t_layers[2].output.dense.weight)
    torch.testing.assert_close(s_layers[1].attention.self.query.weight, t_layers[3].attention.self.query.weight)  # None -> uniform (2,4)
    torch.testing.assert_close(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert student.training and student.config._attn_implementation == "fastkd_capture"
    # SUPERVISION@INIT: the student starts from the layers after '@', whatever supervises it (distill and search alike)
    apart = build_student(teacher, shape, "teacher", LayerMapping((3, None), 4, init=(1, 2)))
    for m, g in enumerate((1, 2)):
        torch.testing.assert_close(apart.encoder.layer[m].output.dense.weight, t_layers[g - 1].output.dense.weight)
    assert not torch.equal(apart.encoder.layer[0].output.dense.weight, s_layers[0].output.dense.weight)


def test_teacher_init_truncates_to_a_narrower_student(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))
    shape = student_shape(teacher.config, 2, hidden=16, heads=2, ffn=24)
    student = build_student(teacher, shape, "teacher", LayerMapping((1, 4), 4))
    torch.testing.assert_close(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight[:, :16])
    torch.testing.assert_close(student.encoder.layer[1].intermediate.dense.weight,
                               teacher.encoder.layer[3].intermediate.dense.weight[:24, :16])
    torch.testing.assert_close(student.encoder.layer[0].attention.self.key.bias, teacher.encoder.layer[0].attention.self.key.bias[:16])


def test_random_init_differs_from_teacher_and_is_seeded(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))
    shape = student_shape(teacher.config, 2)
    a = build_student(teacher, shape, "random", seed=5)
    b = build_student(teacher, shape, "random", seed=5)
    torch.testing.assert_close(a.encoder.layer[0].output.dense.weight, b.encoder.layer[0].output.dense.weight)
    assert not torch.equal(a.encoder.layer[0].output.dense.weight, teacher.encoder.layer[0].output.dense.weight)


def test_student_dir_must_share_the_vocabulary(tmp_path, tiny_teacher_dir, default_tokenizer):
    from transformers import BertConfig, BertModel

    teacher = load_teacher(str(tiny_teacher_dir))
    same = make_tiny_bert(tmp_path / "same", default_tokenizer, layers=2)
    assert load_student_dir(str(same), teacher, default_tokenizer).config.num_hidden_layers == 2
    other = tmp_path / "other"
    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(other)
    with pytest.raises(UserError, match="vocabulary of 1000 tokens"):
        load_student_dir(str(other), teacher, default_tokenizer)


def test_missing_teacher_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_config(str(tmp_path / "empty"))


def test_teacher_without_tokenizer_files_is_refused(tmp_path, tiny_teacher_dir):
    """transformers would hand back a 5-token tokenizer and the corpus would become all [UNK]."""
    from transformers import AutoModel

    from fastkd.models import load_tokenizer

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(tiny_teacher_dir).save_pretrained(bare)
    with pytest.raises(UserError, match="no tokenizer files"):
        load_tokenizer(str(bare))


def test_student_dir_without_tokenizer_is_accepted(tmp_path, tiny_teacher_dir, default_tokenizer):
    from transformers import BertConfig, BertModel

    teacher = load_teacher(str(tiny_teacher_dir))
    bare = tmp_path / "student"
    BertModel(BertConfig(vocab_size=default_tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(bare)
    student = load_student_dir(str(bare), teacher, default_tokenizer)
    assert student.config.hidden_size == 16 and not student.pooler.dense.weight.requires_grad


def test_config_without_weights_is_a_user_error(tmp_path, tiny_teacher_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_teacher_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match="cannot load teacher weights"):
        load_teacher(str(broken))


def test_student_wider_than_teacher_copies_the_overlap(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))  # FFN 64
    student = build_student(teacher, student_shape(teacher.config, 2, ffn=96), "teacher", LayerMapping((1, 2), 4))
    s_w = student.encoder.layer[0].intermediate.dense.weight
    t_w = teacher.encoder.layer[0].intermediate.dense.weight
    torch.testing.assert_close(s_w[:64], t_w)
    assert s_w[64:].abs().sum() > 0  # the extra units keep their random init
