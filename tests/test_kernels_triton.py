"""fastkd.kernels (Triton) against the plain-torch reference in fastkd.losses: values and gradients.

Without a GPU the kernels run under the Triton interpreter (a numpy program per block: slow, so the
shapes are small and the tests pass small blocks to exercise the tiling). On a GPU machine the real
compiled kernels run on the same cases.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: triton.jit picks the interpreter at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton  # noqa: E402,F401  (a dev dependency: a missing triton fails here, it is not skipped)

import fastkd.kernels as fk  # noqa: E402
from fastkd import losses  # noqa: E402
from fastkd.kernels.attention_mse import _attention_mse_qk, _qk_mse_launch  # noqa: E402
from fastkd.kernels.hidden_mse import _hidden_mse  # noqa: E402
from fastkd.kernels.scores_mse import _attention_mse_scores  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# fp32: only the summation order differs. 16-bit: the inputs are the same rounded values on both
# sides, but the kernel's gradients are rounded once more into the input dtype (2^-8 for bf16).
RTOL = {F32: 1e-4, BF16: 1e-2, F16: 2e-3}


def assert_close(actual, expected, rtol, what=""):
    """Elementwise rtol, plus an atol of rtol * max|expected| for entries that cancel to ~0."""
    actual, expected = actual.detach().float(), expected.detach().float()
    atol = rtol * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def make_mask(B, S, kind, gen):
    """(B, S) long mask. lengths: right padding, row 0 full, the last row all padded (when B > 1);
    boundary: lengths around a 16-block edge (S, 17, 16, 1, 0, ...); holes: random tokens padded
    anywhere; all_padded: no real token at all; full: no padding."""
    if kind == "full":
        return torch.ones(B, S, dtype=torch.long)
    if kind == "all_padded":
        return torch.zeros(B, S, dtype=torch.long)
    if kind == "lengths":
        lengths = torch.randint(1, S + 1, (B,), generator=gen)
        lengths[0] = S
        if B > 1:
            lengths[-1] = 0
        return (torch.arange(S)[None, :] < lengths[:, None]).long()
    if kind == "boundary":
        lengths = torch.tensor([S, 17, 16, 1, 0] * B)[:B]
        return (torch.arange(S)[None, :] < lengths[:, None]).long()
    if kind == "holes":
        m = (torch.rand(B, S, generator=gen) < 0.7).long()
        m[0, 0] = 1
        return m
    raise ValueError(kind)


def leaf(x, dtype):
    return x.to(DEV, dtype).requires_grad_()


def upcast_leaf(x):
    """The reference's input: the same (possibly 16-bit-rounded) values, as a float32 leaf."""
    return x.detach().float().requires_grad_()


# ---------------------------------------------------------------- Op 1: attention MSE from Q, K

def qk_inputs(B, H, S, ds, dt, dtype, mask_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    qs, ks = (leaf(torch.randn(B, H, S, ds, generator=gen), dtype) for _ in range(2))
    # The teacher has requires_grad on purpose: it must still get no gradient.
    qt, kt = (leaf(torch.randn(B, H, S, dt, generator=gen), dtype) for _ in range(2))
    mask = make_mask(B, S, mask_kind, gen).to(DEV)
    return qs, ks, qt, kt, mask


def qk_reference(qs, ks, qt, kt, mask, scale_s, scale_t):
    qs32, ks32 = upcast_leaf(qs), upcast_leaf(ks)
    loss = losses.attention_mse(losses.attention_scores(qs32, ks32, scale_s),
                                losses.attention_scores(qt.detach().float(), kt.detach().float(), scale_t), mask)
    dq, dk = torch.autograd.grad(loss, [qs32, ks32])
    return loss, dq, dk


QK_CASES = [
    # B, H, S, ds, dt, dtype, mask, (block_m, block_n)
    (2, 2, 37, 32, 40, F32, "lengths", (16, 16)),
    (3, 12, 7, 8, 12, F32, "holes", (16, 16)),
    (1, 1, 1, 40, 12, F32, "full", (16, 16)),
    (2, 8, 20, 16, 24, F32, "holes", (16, 32)),
    (2, 3, 37, 40, 32, BF16, "lengths", (16, 16)),
    (2, 2, 20, 12, 32, F16, "holes", (32, 16)),
    (2, 2, 37, 32, 32, F32, "all_padded", (16, 16)),
    (5, 1, 37, 16, 16, F32, "boundary", (16, 16)),
    (2, 12, 37, 12, 32, F32, "lengths", None),     # default blocks, through the public function
]


@pytest.mark.parametrize("B,H,S,ds,dt,dtype,mask_kind,blocks", QK_CASES)
def test_attention_mse_qk_matches_reference(B, H, S, ds, dt, dtype, mask_kind, blocks):
    qs, ks, qt, kt, mask = qk_inputs(B, H, S, ds, dt, dtype, mask_kind, seed=S * 100 + H)
    scale_s, scale_t = ds ** -0.5, dt ** -0.5 / 2   # the teacher's divided by a head ratio, say
    if blocks is None:
        loss = fk.attention_mse_qk(qs, ks, qt, kt, mask, scale_s, scale_t)
    else:
        loss = _attention_mse_qk(qs, ks, qt, kt, mask, scale_s, scale_t, block_m=blocks[0], block_n=blocks[1])
    dq, dk, dqt, dkt = torch.autograd.grad(loss, [qs, ks, qt, kt], allow_unused=True)
    ref, rdq, rdk = qk_reference(qs, ks, qt, kt, mask, scale_s, scale_t)

    assert loss.dtype == F32 and loss.dim() == 0
    assert dq.dtype == dtype and dk.dtype == dtype
    assert dqt is None and dkt is None
    rtol = RTOL[dtype]
    assert_close(loss, ref, 1e-4, "loss")
    assert_close(dq, rdq, rtol, "dL/dqs")
    assert_close(dk, rdk, rtol, "dL/dks")
    if mask_kind == "all_padded":
        assert loss.item() == 0.0 and not dq.any() and not dk.any()
    else:
        assert ref.item() > 0 and rdq.abs().max() > 0


def test_attention_mse_qk_strided_inputs_and_teacher_grad():
    """Q/K as HF BERT holds them: (B, S, H, d) transposed to (B, H, S, d), not contiguous."""
    B, S, H, ds, dt = 2, 19, 2, 16, 32
    gen = torch.Generator().manual_seed(3)
    qs, ks = (torch.randn(B, S, H, ds, generator=gen).to(DEV).requires_grad_() for _ in range(2))
    qt, kt = (torch.randn(B, S, H, dt, generator=gen).to(DEV).requires_grad_() for _ in range(2))
    views = [x.transpose(1, 2) for x in (qs, ks, qt, kt)]
    assert not views[0].is_contiguous()
    mask = make_mask(B, S, "holes", gen).to(DEV)
    loss = _attention_mse_qk(*views, mask, 0.25, 0.125, block_m=16, block_n=16)
    loss.backward()
    ref, rdq, rdk = qk_reference(*[v.detach() for v in views], mask, 0.25, 0.125)
    assert_close(loss, ref, 1e-4, "loss")
    assert_close(qs.grad.transpose(1, 2), rdq, 1e-4, "dL/dqs")
    assert_close(ks.grad.transpose(1, 2), rdk, 1e-4, "dL/dks")
    assert qt.grad is None and kt.grad is None


def test_attention_mse_qk_partial_and_no_grad():
    qs, ks, qt, kt, mask = qk_inputs(2, 2, 21, 16, 16, F32, "lengths", seed=5)
    ref, rdq, rdk = qk_reference(qs, ks, qt, kt, mask, 0.25, 0.25)
    with torch.no_grad():
        assert_close(_attention_mse_qk(qs, ks, qt, kt, mask, 0.25, 0.25, block_m=16, block_n=16), ref, 1e-4,
                     "no_grad loss")
    # Only ks differentiable: kernel B alone must give dK.
    loss = _attention_mse_qk(qs.detach(), ks, qt, kt, mask, 0.25, 0.25, block_m=16, block_n=16)
    (dk,) = torch.autograd.grad(loss, [ks])
    assert_close(dk, rdk, 1e-4, "dL/dks alone")
    _, _, dq, dk = _qk_mse_launch(qs, ks, qt, kt, mask, 0.25, 0.25, grad_q=False, grad_k=False)
    assert dq is None and dk is None
    # backward with a non-unit upstream gradient, twice (retain_graph): the scaling is not in place.
    loss = _attention_mse_qk(qs, ks, qt, kt, mask, 0.25, 0.25, block_m=16, block_n=16)
    (3.0 * loss).backward(retain_graph=True)
    (3.0 * loss).backward()
    assert_close(qs.grad, 6.0 * rdq, 1e-4, "accumulated dL/dqs")


# ---------------------------------------------------------------- Op 2: attention MSE from scores

SCORES_CASES = [
    # B, H, S, dtype, mask, (block_r, block_c)
    (2, 3, 37, F32, "lengths", (4, 16)),
    (3, 12, 7, F32, "holes", (4, 16)),
    (1, 2, 1, F32, "full", (2, 16)),
    (2, 2, 37, BF16, "lengths", (8, 16)),
    (2, 2, 20, F16, "holes", (4, 32)),
    (2, 2, 20, F32, "all_padded", (4, 16)),
    (5, 1, 37, F32, "boundary", (4, 16)),
    (2, 8, 37, F32, "holes", None),               # default blocks, through the public function
]


@pytest.mark.parametrize("B,H,S,dtype,mask_kind,blocks", SCORES_CASES)
def test_attention_mse_scores_matches_reference(B, H, S, dtype, mask_kind, blocks):
    gen = torch.Generator().manual_seed(S * 10 + H)
    mask = make_mask(B, S, mask_kind, gen).to(DEV)
    s0, t0 = torch.randn(B, H, S, S, generator=gen), torch.randn(B, H, S, S, generator=gen)
    if dtype == F32 and mask_kind == "lengths":
        # Garbage (as from a masked softmax input) in invalid pairs must never be read.
        invalid = ~losses.pair_mask(mask.cpu()).expand(B, H, S, S)
        s0, t0 = s0.masked_fill(invalid, float("-inf")), t0.masked_fill(invalid, float("nan"))
    s, t = leaf(s0, dtype), leaf(t0, dtype)
    if blocks is None:
        loss = fk.attention_mse_scores(s, t, mask)
    else:
        loss = _attention_mse_scores(s, t, mask, block_r=blocks[0], block_c=blocks[1])
    ds, dt = torch.autograd.grad(loss, [s, t], allow_unused=True)
    s32 = upcast_leaf(s)
    ref = losses.attention_mse(s32, t.detach().float(), mask)
    (rds,) = torch.autograd.grad(ref, [s32])

    assert loss.dtype == F32 and loss.dim() == 0 and ds.dtype == dtype and dt is None
    assert_close(loss, ref, 1e-4, "loss")
    assert_close(ds, rds, RTOL[dtype], "dL/ds")
    assert torch.isfinite(ds).all()
    if mask_kind == "all_padded":
        assert loss.item() == 0.0 and not ds.any()


def test_attention_mse_scores_no_grad_and_mask_dtypes():
    gen = torch.Generator().manual_seed(11)
    B, H, S = 2, 2, 13
    s, t = torch.randn(B, H, S, S, generator=gen).to(DEV), torch.randn(B, H, S, S, generator=gen).to(DEV)
    mask = make_mask(B, S, "holes", gen).to(DEV)
    ref = losses.attention_mse(s, t, mask)
    for m in (mask, mask.bool(), mask.to(torch.uint8), mask.int()):
        assert_close(_attention_mse_scores(s, t, m, block_r=4, block_c=16), ref, 1e-4, f"mask {m.dtype}")


# ---------------------------------------------------------------- Op 3: hidden MSE through a projection

HIDDEN_CASES = [
    # B, S, Ds, Dt, weight, bias, dtype, mask, chunk_rows, (block_r, block_c)
    (2, 37, 32, 40, True, True, F32, "lengths", 16, (4, 16)),
    (3, 7, 12, 8, True, False, F32, "holes", 5, (4, 16)),
    (2, 6, 12, 17, True, True, F32, "lengths", 5, (4, 16)),   # Dt one past a column block
    (2, 7, 16, 16, False, False, F32, "lengths", 4096, (4, 16)),
    (2, 5, 12, 12, False, True, F32, "holes", 4096, (4, 16)),
    (1, 1, 8, 12, True, True, F32, "full", 4096, (2, 16)),
    (2, 9, 8, 12, True, True, F32, "all_padded", 4, (4, 16)),
    (2, 37, 32, 24, True, True, BF16, "lengths", 20, (8, 16)),
    (2, 13, 40, 32, True, True, F32, "holes", 4096, None),   # public function, default blocks
]


@pytest.mark.parametrize("B,S,Ds,Dt,has_w,has_b,dtype,mask_kind,chunk,blocks", HIDDEN_CASES)
def test_hidden_mse_matches_reference(B, S, Ds, Dt, has_w, has_b, dtype, mask_kind, chunk, blocks):
    gen = torch.Generator().manual_seed(B * 1000 + S)
    hs = leaf(torch.randn(B, S, Ds, generator=gen), dtype)
    ht = leaf(torch.randn(B, S, Dt, generator=gen), dtype)        # teacher: must get no gradient
    mask = make_mask(B, S, mask_kind, gen).to(DEV)
    w = leaf(torch.randn(Dt, Ds, generator=gen) * Ds ** -0.5, dtype) if has_w else None
    b = leaf(torch.randn(Dt, generator=gen), dtype) if has_b else None
    if blocks is None:
        loss = fk.hidden_mse(hs, ht, mask, w, b, chunk_rows=chunk)
    else:
        loss = _hidden_mse(hs, ht, mask, w, b, chunk, block_r=blocks[0], block_c=blocks[1])
    params = [x for x in (hs, w, b) if x is not None]
    grads = torch.autograd.grad(loss, params + [ht], allow_unused=True)

    ref_params = [upcast_leaf(x) for x in params]
    hs32, w32, b32 = ref_params[0], (ref_params[1] if has_w else None), (ref_params[-1] if has_b else None)
    if has_w:
        projection = torch.nn.Linear(Ds, Dt, bias=has_b)   # the reference's own module, our values
        projection.weight = torch.nn.Parameter(w32)
        if has_b:
            projection.bias = torch.nn.Parameter(b32)
        ref_params = [hs32, projection.weight] + ([projection.bias] if has_b else [])
    else:
        projection = (lambda x: x + b32) if has_b else None
    ref = losses.hidden_mse(hs32, ht.detach().float(), mask, projection)
    ref_grads = torch.autograd.grad(ref, ref_params)

    assert loss.dtype == F32 and loss.dim() == 0 and grads[-1] is None
    assert_close(loss, ref, 1e-4, "loss")
    for name, g, rg, x in zip(("hs", "weight", "bias") if has_w else ("hs", "bias"), grads, ref_grads, params):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close(g, rg, RTOL[dtype], f"dL/d{name}")
    if mask_kind == "all_padded":
        assert loss.item() == 0.0 and not any(g.any() for g in grads[:-1])


def test_hidden_mse_partial_grads_and_no_grad():
    gen = torch.Generator().manual_seed(21)
    B, S, Ds, Dt = 2, 11, 12, 16
    hs, ht = torch.randn(B, S, Ds, generator=gen).to(DEV), torch.randn(B, S, Dt, generator=gen).to(DEV)
    w, b = torch.randn(Dt, Ds, generator=gen).to(DEV), torch.randn(Dt, generator=gen).to(DEV)
    mask = make_mask(B, S, "lengths", gen).to(DEV)
    ref = losses.hidden_mse(hs, ht, mask, lambda x: F.linear(x, w, b))
    with torch.no_grad():
        assert_close(_hidden_mse(hs, ht, mask, w, b, 6, block_r=4, block_c=16), ref, 1e-4, "no_grad loss")
    # Frozen hs (e.g. the embedding output of a frozen layer): only the projection learns.
    w_leaf = w.clone().requires_grad_()
    loss = _hidden_mse(hs, ht, mask, w_leaf, b, 6, block_r=4, block_c=16)
    (dw,) = torch.autograd.grad(loss, [w_leaf])
    w_ref = w.clone().requires_grad_()
    (rdw,) = torch.autograd.grad(losses.hidden_mse(hs, ht, mask, lambda x: F.linear(x, w_ref, b)), [w_ref])
    assert_close(dw, rdw, 1e-4, "dL/dweight alone")


# ---------------------------------------------------------------- the tests can fail

def test_comparison_catches_small_errors():
    """The tolerances above are tight enough to see a one-token mask error or a 0.1% scale error in
    each op (a deliberately wrong kernel, simulated by wrong inputs to the right one)."""
    qs, ks, qt, kt, mask = qk_inputs(2, 2, 21, 16, 16, F32, "lengths", seed=7)
    ref, _, rdk = qk_reference(qs, ks, qt, kt, mask, 0.25, 0.25)
    with pytest.raises(AssertionError):
        assert_close(_attention_mse_qk(qs, ks, qt, kt, mask, 0.25, 0.25 * 1.001, block_m=16, block_n=16), ref,
                     1e-4, "scale")
    dropped = mask.clone()
    dropped[0, -1] = 0
    loss = _attention_mse_qk(qs, ks, qt, kt, dropped, 0.25, 0.25, block_m=16, block_n=16)
    with pytest.raises(AssertionError):
        assert_close(torch.autograd.grad(loss, [ks])[0], rdk, 1e-4, "mask")

    gen = torch.Generator().manual_seed(8)
    s, t = torch.randn(1, 2, 9, 9, generator=gen).to(DEV), torch.randn(1, 2, 9, 9, generator=gen).to(DEV)
    m = torch.ones(1, 9, dtype=torch.long, device=DEV)
    t_bad = t.clone()
    t_bad[0, 1, 4, 4] += 0.01                          # one wrong element: invisible in the mean,
    s_leaf, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()   # caught by the gradient
    (ds,) = torch.autograd.grad(_attention_mse_scores(s_leaf, t_bad, m, block_r=4, block_c=16), [s_leaf])
    (rds,) = torch.autograd.grad(losses.attention_mse(s_ref, t, m), [s_ref])
    with pytest.raises(AssertionError):
        assert_close(ds, rds, 1e-4, "one score")

    hs, ht = torch.randn(2, 9, 8, generator=gen).to(DEV), torch.randn(2, 9, 8, generator=gen).to(DEV)
    m = torch.ones(2, 9, dtype=torch.long, device=DEV)
    dropped = m.clone()
    dropped[1, 8] = 0
    with pytest.raises(AssertionError):
        assert_close(_hidden_mse(hs, ht, dropped, block_r=4, block_c=16), losses.hidden_mse(hs, ht, m), 1e-4, "row")


def test_import_without_triton():
    """fastkd.kernels imports without triton; AVAILABLE is False and the ops raise with the reason."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import fastkd.kernels as k\n"
        "assert k.AVAILABLE is False, k.AVAILABLE\n"
        "assert isinstance(k.UNAVAILABLE_REASON, str) and '\\n' not in k.UNAVAILABLE_REASON\n"
        "calls = ((k.attention_mse_qk, (0,) * 7), (k.attention_mse_scores, (0,) * 3), (k.hidden_mse, (0,) * 3))\n"
        "for f, args in calls:\n"
        "    try:\n"
        "        f(*args)\n"
        "    except RuntimeError as e:\n"
        "        assert k.UNAVAILABLE_REASON in str(e)\n"
        "    else:\n"
        "        raise AssertionError(f.__name__ + ' did not raise')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert fk.AVAILABLE is True and fk.UNAVAILABLE_REASON is None
