"""The Triton kernels (kernels/, installed as fastkd.kernels) against each op's torch reference: values and gradients.

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

from fastkd.kernels import attention_mse as triton_mse  # noqa: E402
from fastkd.kernels import runtime  # noqa: E402
from fastkd.ops import attention_mse as am  # noqa: E402
from fastkd.ops import hidden_mse as hm  # noqa: E402

_attention_mse_qk = triton_mse.triton_attention_mse
_qk_mse_launch = triton_mse.launch
_hidden_mse = hm.triton_hidden_mse

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# fp32: only the summation order differs. 16-bit: the inputs are the same rounded values on both
# sides, but the kernel's gradients are rounded once more into the input dtype (2^-8 for bf16), and
# the tensor-core path (float16 under the interpreter, both 16-bit types on a GPU) rounds the score
# difference D into the dtype before the gradient dot: one epsilon, as fastkd.ops.select allows.
RTOL = {F32: 1e-4, BF16: torch.finfo(BF16).eps, F16: torch.finfo(F16).eps}


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
    loss = am.reference(qs32, ks32, qt.detach().float(), kt.detach().float(), mask, scale_s, scale_t)
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
        loss = am.triton_attention_mse(qs, ks, qt, kt, mask, scale_s, scale_t)
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


# ---------------------------------------------------------------- Op 2: hidden MSE through a projection

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
        loss = hm.triton_hidden_mse(hs, ht, mask, w, b, chunk_rows=chunk)
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
    ref = hm.reference(hs32, ht.detach().float(), mask, projection)
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
    ref = hm.reference(hs, ht, mask, lambda x: F.linear(x, w, b))
    with torch.no_grad():
        assert_close(_hidden_mse(hs, ht, mask, w, b, 6, block_r=4, block_c=16), ref, 1e-4, "no_grad loss")
    # Frozen hs (e.g. the embedding output of a frozen layer): only the projection learns.
    w_leaf = w.clone().requires_grad_()
    loss = _hidden_mse(hs, ht, mask, w_leaf, b, 6, block_r=4, block_c=16)
    (dw,) = torch.autograd.grad(loss, [w_leaf])
    w_ref = w.clone().requires_grad_()
    (rdw,) = torch.autograd.grad(hm.reference(hs, ht, mask, lambda x: F.linear(x, w_ref, b)), [w_ref])
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
    hs, ht = torch.randn(2, 9, 8, generator=gen).to(DEV), torch.randn(2, 9, 8, generator=gen).to(DEV)
    m = torch.ones(2, 9, dtype=torch.long, device=DEV)
    dropped = m.clone()
    dropped[1, 8] = 0
    with pytest.raises(AssertionError):
        assert_close(_hidden_mse(hs, ht, dropped, block_r=4, block_c=16), hm.reference(hs, ht, m), 1e-4, "row")


def test_import_without_triton():
    """fastkd.ops and fastkd.kernels import without triton: the triton backend is missing with the reason in one line,
    and a Triton op called anyway raises it; DistillLoss still works on the other backends."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from fastkd import losses, ops\n"
        "from fastkd.kernels import runtime\n"
        "from fastkd.ops import attention_mse as am\n"
        "assert runtime.AVAILABLE is False\n"
        "why = ops.unavailable('triton', torch.device('cpu'))\n"
        "assert why == runtime.UNAVAILABLE_REASON and 'triton' in why and '\\n' not in why, why\n"
        "x = torch.zeros(1, 1, 3, 4)\n"
        "try:\n"
        "    am.triton_attention_mse(x, x, x, x, torch.ones(1, 3), 1.0, 1.0)\n"
        "except RuntimeError as e:\n"
        "    assert why in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "assert ops.backend_for('attention_mse', 'torch', 'cpu', torch.float32) == 'torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_interpreter_runs_the_16_bit_tensor_core_path():
    """float16 operands go into tl.dot as they are under the interpreter (the F16 cases above run the
    16-bit path, gradients included); bfloat16 is upcast there only, because the interpreter
    multiplies bfloat16 dot operands as raw integers. On a GPU both are native."""
    interpreted = triton_mse.INTERPRETED
    assert interpreted == (DEV == "cpu")
    assert runtime.native_dot(F16, F16, interpreted)
    assert runtime.native_dot(BF16, BF16, interpreted) == (not interpreted)
    assert not runtime.native_dot(F32, F32, interpreted) and not runtime.native_dot(F16, F32, interpreted)
    # The 16-bit path rounds D before the gradient dot, so its gradients are not those of the upcast
    # path. The upcast path is exactly the float32 kernel on the same (exactly representable) values,
    # rounded once into float16: a kernel that silently upcast would equal it bit for bit.
    qs, ks, qt, kt, mask = qk_inputs(2, 2, 20, 16, 16, F16, "lengths", seed=4)
    (dq,) = torch.autograd.grad(_attention_mse_qk(qs, ks, qt, kt, mask, 0.25, 0.25, block_m=16, block_n=16), [qs])
    q32 = qs.detach().float().requires_grad_()
    (dq32,) = torch.autograd.grad(_attention_mse_qk(q32, ks.float(), qt.float(), kt.float(), mask, 0.25, 0.25,
                                                    block_m=16, block_n=16), [q32])
    assert not torch.equal(dq, dq32.to(F16))
    _, rdq, _ = qk_reference(qs, ks, qt, kt, mask, 0.25, 0.25)
    assert_close(dq, rdq, RTOL[F16], "dL/dqs")


def test_triton_functions_refuse_double_backward():
    """Their gradients are not differentiable: a second backward is refused, never silently wrong.
    (A differentiable upstream gradient is what would otherwise let a second backward through.)"""
    def second_order(loss, x):
        upstream = torch.ones((), device=DEV, requires_grad=True)
        (g,) = torch.autograd.grad(loss, [x], grad_outputs=upstream, create_graph=True)
        g.sum().backward()

    qs, ks, qt, kt, mask = qk_inputs(1, 1, 9, 16, 16, F32, "full", seed=2)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        second_order(_attention_mse_qk(qs, ks, qt, kt, mask, 0.25, 0.25), qs)
    hs = leaf(torch.randn(2, 5, 8), F32)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        second_order(_hidden_mse(hs, torch.randn(2, 5, 8).to(DEV), torch.ones(2, 5, device=DEV)), hs)
