"""The fused CPU dropout (fastkd.ops.dropout, csrc dropout_mask_scale): torch's dropout in distribution,
its backward the same mask, reproducible from the run's generator, and in every student that trains."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastkd.capture import PROBABILITY_DROPOUT, _capture_attention
from fastkd.models import load_teacher
from fastkd.ops import builder
from fastkd.ops import dropout as fast



def _kernel(x, p, seed):
    return builder.load("cpu").dropout_mask_scale(x.contiguous(), p, torch.tensor(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_each_element_is_dropped_or_scaled_at_the_rate_asked(dtype, p):
    x = (torch.rand(200_003, generator=torch.Generator().manual_seed(0)) + 0.5).to(dtype)  # never 0: kept != 0
    y = _kernel(x, p, 1234)
    kept = y != 0
    want = (x.to(torch.float64 if dtype == torch.float64 else torch.float32) * (1 / (1 - p))).to(dtype)
    assert torch.equal(y[kept], want[kept])
    n = x.numel()
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))  # 5 sigma of a binomial
    # the tail (n is not a multiple of the 64-element block) is drawn too
    assert 0 < kept[-3:].sum().item() or p == 0.5


def test_masks_are_independent_across_seeds_and_neighbours():
    n, p = 1 << 20, 0.1
    ones = torch.ones(n)
    a, b = _kernel(ones, p, 1) == 0, _kernel(ones, p, 2) == 0
    sigma = math.sqrt(n * p * p)
    assert abs((a & b).sum().item() - n * p * p) < 6 * sigma  # two calls' drops overlap as chance would
    assert abs((a[1:] & a[:-1]).sum().item() - (n - 1) * p * p) < 6 * sigma  # neighbours too (one draw, 2 elements)
    assert abs((a[2:] & a[:-2]).sum().item() - (n - 2) * p * p) < 6 * sigma
    assert not torch.equal(a, b)


def test_the_mask_depends_on_the_seed_only_not_on_the_threads():
    x = torch.randn(3, 1000, 77)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(x, 0.3, 99)
        torch.set_num_threads(max(2, threads))
        many = _kernel(x, 0.3, 99)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_a_nan_stays_nan_where_dropped_as_with_torch():
    x = torch.full((4096,), float("nan"))
    assert torch.isnan(_kernel(x, 0.5, 7)).all()


def test_backward_applies_the_forwards_mask():
    x = torch.randn(64, 129, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    y = fast.dropout(x, 0.2, True)
    grad = torch.randn_like(y)
    y.backward(grad)
    mask = (y != 0).double()
    assert torch.equal(x.grad, grad * mask * (1 / (1 - 0.2)))
    # and it is the gradient of a linear map: gradcheck with the seed held
    small = torch.randn(5, 70, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fast._MaskScale.apply(t, 0.25, torch.tensor(11)), (small,))


def test_seeded_runs_repeat_and_eval_mode_is_the_identity():
    x = torch.randn(8, 300)
    torch.manual_seed(5)
    first = fast.dropout(x, 0.1, True)
    torch.manual_seed(5)
    assert torch.equal(fast.dropout(x, 0.1, True), first)
    assert fast.dropout(x, 0.1, False) is x and fast.dropout(x, 0.0, True) is x
    layer = fast.FastDropout(0.1).eval()
    assert torch.equal(layer(x), x)


def test_students_train_with_it_everywhere_and_save_the_same_weights(tiny_teacher_dropout_dir, default_tokenizer,
                                                                     monkeypatch):
    from fastkd.capture import recording
    from fastkd.families import family_of

    model = load_teacher(str(tiny_teacher_dropout_dir)).requires_grad_(True)  # 4 layers, dropout 0.1, trained here
    family_of(model).enable_capture(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast.use_fast_dropout(model)
    assert not [m for m in model.modules() if type(m) is nn.Dropout]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.state_dict().keys() == before.keys()
    calls = []
    real = fast.draw_seed
    monkeypatch.setattr(fast, "draw_seed", lambda: calls.append(1) or real())
    batch = default_tokenizer(["a short sentence", "and a somewhat longer second one"], padding=True, return_tensors="pt")
    model.train()
    with torch.profiler.profile() as prof, recording():
        model(**batch).last_hidden_state.sum().backward()
    # embeddings 1 + per layer: the attention probabilities, the attention output, the FFN output
    assert len(calls) == 1 + 3 * 4
    assert not [e.key for e in prof.key_averages() if "bernoulli" in e.key or e.key == "aten::native_dropout"]
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert calls == []


def test_the_capture_functions_own_attention_is_sdpas_when_nothing_is_dropped():
    """The path that forms the probabilities to drop them: with p so small that no draw falls under it,
    SDPA's output (the masked padding included)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen) for _ in range(3))
    mask = torch.zeros(2, 1, 9, 9)
    mask[1, :, :, 6:] = torch.finfo(torch.float32).min
    module = nn.Module()
    module.training = True
    setattr(module, PROBABILITY_DROPOUT, fast._probabilities_dropout)
    got, _ = _capture_attention(module, q, k, v, mask, scaling=0.3, dropout=1e-9)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want.transpose(1, 2))
    # at p = 0.5 about half of the probabilities go: the output moves
    dropped, _ = _capture_attention(module, q, k, v, mask, scaling=0.3, dropout=0.5)
    assert not torch.allclose(dropped, got)
