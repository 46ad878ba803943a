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
    module = builder.load("cpu")
    assert module is not None, builder.unavailable_reason("cpu")
    return module.dropout_mask_scale(x.contiguous(), p, torch.tensor(seed))


def _threshold(p):
    return math.floor(p * 65536 + 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_each_element_is_dropped_or_scaled_at_the_rate_asked(dtype, p):
    x = (torch.rand(200_003, generator=torch.Generator().manual_seed(0)) + 0.5).to(dtype)  # never 0: kept != 0
    y = _kernel(x, p, 1234)
    kept = y != 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(65536 / (65536 - _threshold(p)), dtype=torch.float64).to(acc)  # 1 / the rounded keep rate
    want = (x.to(acc) * scale).to(dtype)
    assert torch.equal(y[kept], want[kept])
    n = x.numel()
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))  # 5 sigma of a binomial


def _fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
    return z ^ (z >> 31)


def test_the_mask_is_the_documented_hash_of_seed_and_index_tail_included():
    """Element 2c + k is kept when bits 16k.. of draw c = fmix32(fmix32(c ^ key_lo) ^ key_hi) are at least
    round(p * 65536), the keys the halves of splitmix64's finaliser of the seed: written out here for 200
    elements (three 64-element blocks and a tail of 8)."""
    p, seed, n = 0.3, 987654321, 200
    key = _mix64(seed)
    lo, hi = key & 0xFFFFFFFF, key >> 32
    keep = []
    for i in range(n):
        draw = _fmix32(_fmix32((i // 2) ^ lo) ^ hi)
        keep.append(((draw >> (16 * (i % 2))) & 0xFFFF) >= _threshold(p))
    y = _kernel(torch.ones(n, dtype=torch.float64), p, seed)
    assert (y != 0).tolist() == keep


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


def test_backward_applies_the_forwards_mask_and_a_double_backward_stays_connected():
    x = torch.randn(64, 129, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    y = fast.dropout(x, 0.2, True)
    grad = torch.randn_like(y)
    y.backward(grad)
    mask = (y != 0).double()
    scale = 65536 / (65536 - _threshold(0.2))
    assert torch.equal(x.grad, grad * mask * scale)
    # and it is the gradient of a linear map: gradcheck with the seed held
    small = torch.randn(5, 70, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fast._MaskScale.apply(t, 0.25, torch.tensor(11)), (small,))
    # d/dv of (the gradient for grad_outputs v) is the mask again: backward went through the Function
    torch.manual_seed(3)
    again = fast.dropout(x, 0.2, True)
    assert torch.equal(again, y.detach())
    v = torch.randn_like(y, requires_grad=True)
    (g,) = torch.autograd.grad(again, x, grad_outputs=v, create_graph=True)
    g.sum().backward()
    assert torch.equal(v.grad, mask * scale)


def test_a_rate_that_rounds_to_zero_or_one_takes_torchs_dropout(monkeypatch):
    calls = []
    real = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = torch.randn(4, 100)
    for p in (1e-6, 1 - 1e-6):
        fast.dropout(x, p, True)
    assert calls == [1e-6, 1 - 1e-6]
    fast.dropout(x, 0.1, True)
    assert len(calls) == 2


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


def _attention_module(dropout_for):
    module = nn.Module()
    module.training = True
    setattr(module, PROBABILITY_DROPOUT, dropout_for)
    return module


def _qkv_mask(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen).to(dtype) for _ in range(3))
    mask = torch.zeros(2, 1, 9, 9)  # as transformers builds it: float32, additive
    mask[1, :, :, 6:] = torch.finfo(torch.float32).min
    return q, k, v, mask


def test_the_capture_functions_own_attention_is_sdpas_when_nothing_is_dropped():
    """The path that forms the probabilities to drop them: with p so small that no draw falls under it,
    SDPA's output (the masked padding included)."""
    q, k, v, mask = _qkv_mask()
    module = _attention_module(fast._probabilities_dropout_for)
    torch.manual_seed(0)
    got, _ = _capture_attention(module, q, k, v, mask, scaling=0.3, dropout=1 / 65536)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-4, rtol=1e-4)  # (the scale rounds elsewhere)
    # at p = 0.5 about half of the probabilities go: the output moves
    dropped, _ = _capture_attention(module, q, k, v, mask, scaling=0.3, dropout=0.5)
    assert not torch.allclose(dropped, got)


def test_under_bf16_the_own_attention_forms_its_scores_in_float32_like_sdpas_math_path():
    q, k, v, mask = _qkv_mask(torch.bfloat16)
    module = _attention_module(fast._probabilities_dropout_for)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = _capture_attention(module, q, k, v, mask, scaling=0.3, dropout=1 / 65536)
    assert got.dtype == torch.bfloat16
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got.float(), want.transpose(1, 2), atol=2e-2, rtol=2e-2)


def test_where_the_fused_dropout_does_not_apply_attention_stays_sdpas(monkeypatch):
    """A GPU tensor (here: the meta device) gets no fused dropout, so SDPA keeps its own fused kernel; the
    capture function then runs SDPA with the dropout, drawing from torch's generator as before."""
    assert fast._probabilities_dropout_for(torch.empty(2, 4, 9, 8, device="meta")) is None
    q, k, v, mask = _qkv_mask()
    module = _attention_module(lambda query: None)
    torch.manual_seed(7)
    got, _ = _capture_attention(module, q, k, v, mask, scaling=0.3, dropout=0.5)
    torch.manual_seed(7)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.5, scale=0.3)
    assert torch.equal(got, want.transpose(1, 2).contiguous())


def test_swapped_modules_keep_their_mode():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2)).eval()
    fast.use_fast_dropout(model)
    assert isinstance(model[1], fast.FastDropout) and not model[1].training and model[1].p == 0.2
