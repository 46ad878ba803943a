import pytest
import torch
from transformers import BertConfig, BertModel

from fastkd.capture import recording
from fastkd.families import enable_capture
from fastkd.ops.attention_mse import scores_mse as attention_mse
from fastkd.ops.hidden_mse import reference as hidden_mse
from fastkd.teacher import Teacher


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, attn_implementation="eager", **kw)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _padded_batch():
    ids = torch.randint(5, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, mask


def test_padded_batch_matches_eager():
    eager = _tiny()
    captured = _tiny()
    enable_capture(captured)
    ids, mask = _padded_batch()
    ref = eager(ids, attention_mask=mask, output_attentions=True)
    with recording() as rec:
        out = captured(ids, attention_mask=mask)
    real = mask.bool()
    # Real-token outputs agree; with the mask ignored they would not (padding leaks into attention).
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    assert sorted(rec.records) == [1, 2, 3]
    for layer in (1, 2, 3):
        r = rec.records[layer]
        assert r.query.shape == (3, 4, 9, 8)
        s = r.query @ r.key.transpose(-1, -2) * r.scaling
        additive = (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        probs = torch.softmax(s + additive, dim=-1)
        # Pre-softmax scores reproduce eager's attention probabilities at real query rows.
        torch.testing.assert_close(probs.transpose(1, 2)[real], ref.attentions[layer - 1].transpose(1, 2)[real],
                                   atol=1e-5, rtol=1e-5)


def test_only_requested_layers_are_kept_and_no_recording_outside_block():
    model = _tiny()
    enable_capture(model)
    ids, mask = _padded_batch()
    with recording(layers=[2]) as rec:
        model(ids, attention_mask=mask)
    assert list(rec.records) == [2] and rec.calls == 3
    model(ids, attention_mask=mask)  # outside: nothing recorded, nothing fails
    assert list(rec.records) == [2]


def test_teacher_runs_once_in_inference_mode_and_outputs_serve_backward():
    teacher_model = _tiny(seed=1)
    enable_capture(teacher_model)
    teacher = Teacher(teacher_model, hidden_layers=[0, 3], attention_layers=[3])
    ids, mask = _padded_batch()
    out = teacher(ids, mask)
    assert teacher.forwards == 1
    assert sorted(out.hidden) == [0, 3] and sorted(out.attention) == [3]
    assert not out.hidden[3].is_inference() and not out.attention[3].query.is_inference()
    assert not out.hidden[3].requires_grad
    student = _tiny(seed=2)
    enable_capture(student)
    student.train()
    with recording(layers=[1]) as rec:
        s_out = student(ids, attention_mask=mask, output_hidden_states=True)
    s_rec, t_rec = rec.records[1], out.attention[3]
    loss = hidden_mse(s_out.hidden_states[1], out.hidden[3], mask) + attention_mse(
        s_rec.query @ s_rec.key.transpose(-1, -2) * s_rec.scaling, t_rec.query @ t_rec.key.transpose(-1, -2) * t_rec.scaling, mask)
    loss.backward()  # would raise if teacher tensors were inference tensors
    assert student.encoder.layer[0].attention.self.query.weight.grad is not None
    assert all(p.grad is None for p in teacher_model.parameters())


def test_the_capture_guard_names_the_model_and_layer_instead_of_a_key_error(tiny_teacher_dir):
    """A model whose attention does not reach fastkd's capture (here: loaded back to stock sdpa, as a
    family that bypasses the attention registry would be) stops with one line, for either side."""
    from fastkd.families import disable_capture
    from fastkd.errors import UserError
    from fastkd.losses import DistillLoss, LossWeights
    from fastkd.mapping import LayerMapping
    from fastkd.models import build_student, load_teacher, student_shape
    from fastkd.teacher import Teacher
    from fastkd.training import student_loss

    teacher_model = load_teacher(str(tiny_teacher_dir))
    mapping = LayerMapping((2, 4), 4)
    student = build_student(teacher_model, student_shape(teacher_model.config, 2), "teacher", mapping)
    criterion = DistillLoss(mapping, student.config.hidden_size, teacher_model.config.hidden_size, LossWeights(1, 1, 1, 0))
    teacher = Teacher(teacher_model, criterion.teacher_hidden_layers(), criterion.teacher_attention_layers())
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    out = teacher(batch["input_ids"], batch["attention_mask"])
    assert set(out.attention) == {2, 4}
    student_loss(student, criterion, batch, out)  # captured: no error
    disable_capture(student)
    with pytest.raises(UserError, match=r"the student \(a bert model, attention implementation 'sdpa'\) recorded no "
                                        r"attention for layers 1, 2"):
        student_loss(student, criterion, batch, out)
    disable_capture(teacher_model)
    with pytest.raises(UserError, match=r"the teacher \(a bert model, .*\) recorded no attention for layers 2, 4"):
        teacher(batch["input_ids"], batch["attention_mask"])
