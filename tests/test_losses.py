import math

import pytest
import torch

from fastkd.capture import AttentionRecord
from fastkd.losses import DistillLoss, LossWeights
from fastkd.ops.attention_kl import scores_kl as attention_kl
from fastkd.ops.attention_mse import attention_scores
from fastkd.ops.attention_mse import scores_mse as attention_mse
from fastkd.ops.hidden_mse import reference as hidden_mse
from fastkd.mapping import LayerMapping
from fastkd.teacher import TeacherOutputs


def test_hidden_mse_hand_values_and_mask():
    hs = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    ht = torch.zeros(1, 2, 2)
    assert hidden_mse(hs, ht, torch.tensor([[1, 1]])).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert hidden_mse(hs, ht, torch.tensor([[1, 0]])).item() == pytest.approx((1 + 4) / 2)  # padding ignored


def test_hidden_mse_with_projection():
    proj = torch.nn.Linear(2, 3)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        proj.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    hs = torch.tensor([[[1.0, 2.0]]])  # -> [1, 2, 2]
    ht = torch.tensor([[[0.0, 2.0, 0.0]]])
    assert hidden_mse(hs, ht, torch.ones(1, 1), proj).item() == pytest.approx((1 + 0 + 4) / 3)


def test_attention_mse_hand_values():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.zeros_like(s)
    assert attention_mse(s, t, torch.tensor([[1, 1]])).item() == pytest.approx(7.5)
    # Query 1 and key 1 are padding: only pair (0, 0) counts.
    assert attention_mse(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(1.0)


def test_attention_mse_head_average_rule():
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0, 0, 0] = 2.0
    s[0, 1, 1, 1] = 2.0  # head mean = identity
    t = torch.zeros(1, 1, 2, 2)
    assert attention_mse(s, t, torch.ones(1, 2)).item() == pytest.approx(0.5)


def _brute_attention_mse(s, t, mask):
    total, count = 0.0, 0
    B, H, S, _ = s.shape
    for b in range(B):
        for h in range(H):
            for i in range(S):
                for j in range(S):
                    if mask[b, i] and mask[b, j]:
                        total += float(s[b, h, i, j] - t[b, h, i, j]) ** 2
                        count += 1
    return total / max(count, 1)


def test_attention_mse_matches_brute_force_with_padding():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])  # incl. an all-padded row
    assert attention_mse(s, t, mask).item() == pytest.approx(_brute_attention_mse(s, t, mask), rel=1e-5)


def test_all_padded_batch_is_zero_not_nan():
    s = torch.randn(1, 2, 3, 3, requires_grad=True)
    mask = torch.zeros(1, 3)
    loss = attention_mse(s, torch.randn(1, 2, 3, 3), mask) + attention_kl(s, torch.randn(1, 2, 3, 3), mask)
    loss = loss + hidden_mse(torch.randn(1, 3, 4), torch.randn(1, 3, 4), mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all()


def test_attention_kl_hand_value():
    s = torch.zeros(1, 1, 2, 2)  # uniform
    t = torch.tensor([[[[math.log(3.0), 0.0], [math.log(3.0), 0.0]]]])  # p = [.75, .25]
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert attention_kl(s, t, torch.ones(1, 2)).item() == pytest.approx(expected, rel=1e-5)
    # With key 1 padded both distributions are one-hot on key 0: no divergence.
    assert attention_kl(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_matches_torch_kl_div():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none")
    assert attention_kl(s, t, torch.ones(2, 4)).item() == pytest.approx(ref.sum(-1).mean().item(), rel=1e-5)


def test_attention_scores_scaling():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(attention_scores(q, k, 0.5), q @ k.transpose(-1, -2) * 0.5)


def _fake_outputs(B, S, hidden, heads, layers, gen):
    hidden_states = [torch.randn(B, S, hidden, generator=gen) for _ in range(layers + 1)]
    d = hidden // heads
    attention = {l: AttentionRecord(torch.randn(B, heads, S, d, generator=gen), torch.randn(B, heads, S, d, generator=gen),
                                    d ** -0.5) for l in range(1, layers + 1)}
    return hidden_states, attention


def test_distill_loss_terms_weights_and_projections():
    gen = torch.Generator().manual_seed(0)
    mapping = LayerMapping((2, None, 4), 4)
    weights = LossWeights(embedding=0.5, hidden=2.0, attention=1.0, attention_kl=0.25)
    loss = DistillLoss(mapping, student_hidden=8, teacher_hidden=12, weights=weights)
    assert sorted(loss.projections) == ["0", "1", "3"]  # embeddings + mapped student layers only
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    s_hidden, s_att = _fake_outputs(2, 4, 8, 2, 3, gen)
    t_hidden, t_att = _fake_outputs(2, 4, 12, 3, 4, gen)
    teacher = TeacherOutputs({l: t_hidden[l] for l in loss.teacher_hidden_layers()},
                             {l: t_att[l] for l in loss.teacher_attention_layers()}, mask)
    assert loss.teacher_hidden_layers() == [0, 2, 4] and loss.student_attention_layers() == [1, 3]
    out = loss(s_hidden, {m: s_att[m] for m in loss.student_attention_layers()}, teacher)
    p = loss.projections
    expected_hidden = (hidden_mse(s_hidden[1], t_hidden[2], mask, p["1"]) + hidden_mse(s_hidden[3], t_hidden[4], mask, p["3"])) / 2
    torch.testing.assert_close(out.terms["hidden"], expected_hidden)
    torch.testing.assert_close(out.terms["embedding"], hidden_mse(s_hidden[0], t_hidden[0], mask, p["0"]))
    sc = lambda r: attention_scores(r.query, r.key, r.scaling)  # noqa: E731
    expected_att = (attention_mse(sc(s_att[1]), sc(t_att[2]), mask) + attention_mse(sc(s_att[3]), sc(t_att[4]), mask)) / 2
    torch.testing.assert_close(out.terms["attention"], expected_att)
    total = sum(getattr(weights, k) * v for k, v in out.terms.items())
    torch.testing.assert_close(out.total, total)
    out.total.backward()
    assert all(q.grad is not None for q in loss.parameters())


def test_same_width_needs_no_projection_and_zero_weight_drops_term():
    loss = DistillLoss(LayerMapping((1, 2), 2), 16, 16, LossWeights(embedding=0.0, attention=0.0))
    assert len(loss.projections) == 0
    assert loss.teacher_attention_layers() == [] and loss.teacher_hidden_layers() == [1, 2]
