"""The fused attention/relation KL (cpp backend) against the torch reference on fresh random inputs:
values and gradients, odd lengths past the 64-row tile, padded and all-padded rows, different
widths, relations (k = q), bfloat16 inputs, float64 gradcheck; the self-check catches a faulty kernel."""

import logging

import pytest
import torch

from fastkd import ops
from fastkd.ops import attention_kl as ak
from fastkd.ops import builder


@pytest.fixture(scope="module", autouse=True)
def cpp_module():
    module = builder.load("cpu")
    assert module is not None, f"the C++ loss extension did not build: {builder.unavailable_reason('cpu')}"
    return module


def _mask(B, S, gen, all_padded_row=True):
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    if all_padded_row:
        mask[-1] = 0
    return mask


def _inputs(B, H, S, ds, dt, gen, scale=1.0):
    qs, ks = (scale * torch.randn(B, H, S, ds, generator=gen) for _ in range(2))
    qt, kt = (scale * torch.randn(B, H, S, dt, generator=gen) for _ in range(2))
    return qs.requires_grad_(), ks.requires_grad_(), qt, kt


@pytest.mark.parametrize("B,H,S,ds,dt", [(3, 2, 83, 64, 32), (2, 3, 1, 8, 8), (2, 12, 37, 32, 32), (2, 2, 130, 16, 40)])
def test_attention_kl_matches_the_reference(B, H, S, ds, dt):
    gen = torch.Generator().manual_seed(S)
    mask = _mask(B, S, gen, all_padded_row=B > 2)
    qs, ks, qt, kt = _inputs(B, H, S, ds, dt, gen, scale=2.0)  # peaked distributions: a real KL
    args = (qs, ks, qt, kt, mask, ds ** -0.5, dt ** -0.5)
    want = ak.attention_kl_qk(*args, "torch")
    got = ak.attention_kl_qk(*args, "cpp")
    assert want.item() > 0.1 or S == 1  # one key: both distributions are 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(torch.autograd.grad(got, (qs, ks)), torch.autograd.grad(want, (qs, ks))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
        real = mask.bool()[:, None, :, None].expand_as(g)
        assert (g[~real] == 0).all()  # padded positions get no gradient


@pytest.mark.parametrize("student,teacher", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_16_bit_inputs_match_the_reference_on_the_same_values(student, teacher):
    """bf16 Q/K (a bf16 run; a float32 ZeRO student against its bf16 teacher): the op computes in
    float32 from the same values, so the loss agrees to float32 rounding and the gradients to the
    student dtype's precision."""
    gen = torch.Generator().manual_seed(16)
    B, H, S, ds, dt = 3, 4, 71, 32, 64
    mask = _mask(B, S, gen)
    qs, ks = (2 * torch.randn(B, H, S, ds, generator=gen)).to(student), (2 * torch.randn(B, H, S, ds, generator=gen)).to(student)
    qt, kt = (2 * torch.randn(B, H, S, dt, generator=gen)).to(teacher), (2 * torch.randn(B, H, S, dt, generator=gen)).to(teacher)
    qs.requires_grad_(), ks.requires_grad_()
    got = ak.attention_kl_qk(qs, ks, qt, kt, mask, ds ** -0.5, dt ** -0.5, "cpp")
    leaves = [x.detach().float().requires_grad_() for x in (qs, ks)]
    want = ak.attention_kl_qk(*leaves, qt.float(), kt.float(), mask, ds ** -0.5, dt ** -0.5, "torch")
    assert want.item() > 0.1
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-7)
    eps = max(torch.finfo(student).eps, 1e-4)  # float32: summation order, as the self-check allows
    for g, w in zip(torch.autograd.grad(got, (qs, ks)), torch.autograd.grad(want, leaves)):
        assert (g.float() - w).abs().max() <= eps * w.abs().max()


def test_relation_kl_with_other_head_counts_and_widths():
    """MiniLMv2: 12 student heads of 32 against 8 teacher heads of 96, both split into 16 relation heads."""
    gen = torch.Generator().manual_seed(3)
    mask = _mask(2, 45, gen, all_padded_row=False)
    xs = torch.randn(2, 12, 45, 32, generator=gen, requires_grad=True)
    xt = torch.randn(2, 8, 45, 96, generator=gen)
    want = ak.relation_kl(xs, xt, mask, 16, "torch")
    got = ak.relation_kl(xs, xt, mask, 16, "cpp")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(got, xs)[0], torch.autograd.grad(want, xs)[0], rtol=1e-4, atol=1e-8)
    # The relation of a model with itself is zero; a relation head count that does not divide is refused.
    assert ak.relation_kl(xs, xs.detach(), mask, 16, "cpp").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="relation heads"):
        ak.relation_kl(xs, xt, mask, 7, "cpp")


def test_relation_heads_split_the_concatenated_heads():
    x = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).reshape(2, 3, 4, 2)  # (B, H, S, d)
    r = ak.relation_heads(x, 2)  # 6 wide concatenation -> 2 relation heads of 3
    concat = x.transpose(1, 2).reshape(2, 4, 6)
    torch.testing.assert_close(r[:, 0], concat[..., :3])
    torch.testing.assert_close(r[:, 1], concat[..., 3:])


def test_every_padded_row_is_zero_and_the_teacher_gets_no_gradient():
    gen = torch.Generator().manual_seed(5)
    qs, ks, qt, kt = _inputs(2, 2, 9, 8, 8, gen)
    loss = ak.attention_kl_qk(qs, ks, qt, kt, torch.zeros(2, 9, dtype=torch.long), 0.3, 0.3, "cpp")
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in torch.autograd.grad(loss, (qs, ks)))
    qt.requires_grad_()
    with pytest.raises(RuntimeError):  # the teacher side is constant: no gradient is produced for it
        torch.autograd.grad(ak.attention_kl_qk(qs, ks, qt, kt, torch.ones(2, 9), 0.3, 0.3, "cpp"), qt)


def test_different_head_counts_take_the_reference_on_head_averaged_distributions(caplog, monkeypatch):
    monkeypatch.setattr(ak, "_said_heads", False)
    gen = torch.Generator().manual_seed(6)
    qs, ks = (torch.randn(2, 2, 11, 8, generator=gen) for _ in range(2))
    qt, kt = (torch.randn(2, 4, 11, 8, generator=gen) for _ in range(2))
    mask = torch.ones(2, 11)
    with caplog.at_level(logging.INFO, logger="fastkd.ops.attention_kl"):
        got = ak.attention_kl_qk(qs, ks, qt, kt, mask, 0.3, 0.3, "cpp")
    assert "2 student heads against 4 teacher heads compare head-averaged distributions" in caplog.text
    assert got.item() == pytest.approx(ak.reference(qs, ks, qt, kt, mask, 0.3, 0.3).item(), rel=1e-6)


def test_float64_gradcheck():
    gen = torch.Generator().manual_seed(8)
    d64 = dict(dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    count = ak.query_count(mask, 2).double()
    qs, ks = (torch.randn(2, 2, 5, 3, generator=gen, **d64).requires_grad_() for _ in range(2))
    qt, kt = (torch.randn(2, 2, 5, 4, generator=gen, **d64) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: ak.ExtensionAttentionKl.apply(a, b, qt, kt, mask, 0.7, 0.4, count, True),
                                    (qs, ks))


def test_a_kl_kernel_with_a_wrong_gradient_is_caught(monkeypatch, caplog):
    from fastkd.ops import select

    real = builder.load("cpu")

    class Faulty:
        def __getattr__(self, name):
            f = getattr(real, name)
            if name != "attention_kl_qk":
                return f

            def wrong(*args):
                out = list(f(*args))
                if out[1] is not None:
                    out[1] = out[1].clone()
                    flat = out[1].view(-1)
                    flat[flat.abs().argmax()] *= 1.01
                return out
            return wrong

    monkeypatch.setattr(select, "_selected", {})
    monkeypatch.setattr("fastkd.ops._extension.module_for", lambda device: Faulty())
    with caplog.at_level(logging.WARNING):
        assert ops.backend_for("attention_kl", "auto", "cpu", torch.float32) == "torch"
    assert "loss op attention_kl: the cpp backend on cpu (float32) failed its self-check: gradient" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(select, "_selected", {})
    assert ops.backend_for("attention_kl", "auto", "cpu", torch.float32) == "cpp"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,S,ds,dt,block", [(3, 2, 37, 16, 8, 16), (2, 1, 20, 32, 32, 16), (2, 2, 9, 4, 4, None)])
def test_triton_matches_the_reference(dtype, B, H, S, ds, dt, block):
    """Under the interpreter (a CPU); small blocks so the loops run over several tiles; float16 takes
    the 16-bit tl.dot path (bfloat16 is upcast by the interpreter)."""
    gen = torch.Generator().manual_seed(S + ds)
    mask = _mask(B, S, gen, all_padded_row=B > 2)
    qs, ks, qt, kt = (x.detach().to(dtype) for x in _inputs(B, H, S, ds, dt, gen, scale=1.5))
    qs.requires_grad_(), ks.requires_grad_()
    want = ak.reference(qs, ks, qt, kt, mask, ds ** -0.5, dt ** -0.5)
    got = ak.triton_attention_kl(qs, ks, qt, kt, mask, ds ** -0.5, dt ** -0.5, block_m=block, block_n=block)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(got, want.float(), **tol)
    grads = torch.autograd.grad(got, (qs, ks))
    for g, w in zip(grads, torch.autograd.grad(want, (qs, ks))):
        assert g.dtype == dtype
        scale = w.float().abs().max()
        assert (g.float() - w.float()).abs().max() <= (1e-4 if dtype == torch.float32 else 2e-2) * scale


def test_triton_relation_and_the_self_check():
    from fastkd.ops import select

    gen = torch.Generator().manual_seed(2)
    mask = _mask(2, 21, gen, all_padded_row=False)
    xs = torch.randn(2, 2, 21, 8, generator=gen, requires_grad=True)
    xt = torch.randn(2, 4, 21, 8, generator=gen)
    got = ak.relation_kl(xs, xt, mask, 2, "triton")
    want = ak.relation_kl(xs, xt, mask, 2, "torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, xs)[0], torch.autograd.grad(want, xs)[0], rtol=1e-4, atol=1e-7)
    assert select.check("attention_kl", "triton", torch.device("cpu"), torch.float32) is None


def test_the_cuda_form_gets_each_models_operands_in_a_dtype_cublas_takes():
    """16-bit operands stay 16-bit when q and k share the dtype (tensor cores); anything else is float32;
    a relation (k is q) is copied once."""
    x16 = torch.randn(2, 3, 5, 4).to(torch.bfloat16)
    q, k = ak._gemm_operands(x16, x16.clone())
    assert q.dtype == k.dtype == torch.bfloat16 and q.is_contiguous() and k.is_contiguous()
    q, k = ak._gemm_operands(x16.half(), x16.float())
    assert q.dtype == k.dtype == torch.float32
    q, k = ak._gemm_operands(x16.double(), x16.double())
    assert q.dtype == k.dtype == torch.float32
    relation = ak.relation_heads(torch.randn(2, 4, 5, 6), 2)  # a transposed, non-contiguous view
    q, k = ak._gemm_operands(relation, relation)
    assert k is q and q.is_contiguous() and torch.equal(q, relation)


def test_which_inputs_each_backend_hands_to_the_reference():
    """Different head counts: the reference on every backend. Heads wider than the GPU tiles: only
    Triton's (cpp and cuda take any width), so a run's report says what really ran."""
    from fastkd.ops import attention_mse as am

    narrow, wide = torch.zeros(1, 4, 3, 32), torch.zeros(1, 4, 3, am.GPU_MAX_HEAD_DIM + 64)
    assert all(ak.reference_reason(narrow, narrow, b) is None for b in ("torch", "cpp", "triton", "cuda"))
    assert "head counts differ" in ak.reference_reason(narrow, torch.zeros(1, 2, 3, 32), "cuda")
    assert "too wide" in ak.reference_reason(wide, wide, "triton")
    assert ak.reference_reason(wide, wide, "cuda") is None and ak.reference_reason(wide, wide, "cpp") is None
