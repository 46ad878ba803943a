"""The C++ (CPU) loss backend against the torch reference: values and gradients on fresh random inputs.

The extension is compiled on first use (about half a minute); a build failure fails these tests
rather than falling back, because CI has the toolchain.
"""

import logging
import os

import pytest
import torch
from torch import nn

from fastkd import ops
from fastkd.errors import UserError
from fastkd.ops import attention_mse as am
from fastkd.ops import backends, builder, select
from fastkd.ops import hidden_mse as hm


@pytest.fixture(scope="module", autouse=True)
def cpp_module():
    module = builder.load("cpu")
    assert module is not None, f"the C++ loss extension did not build: {builder.unavailable_reason('cpu')}"
    return module


def _mask(B, S, gen, padded_rows=(), full_padding=False):
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    for r in padded_rows:
        mask[r] = 0  # an all-padded row is legal: it contributes nothing
    if full_padding:
        mask[:] = 0
    return mask


def _qk(B, H, S, d, gen, dtype=torch.float32, grad=True):
    q = torch.randn(B, H, S, d, generator=gen).to(dtype)
    k = torch.randn(B, H, S, d, generator=gen).to(dtype)
    return q.requires_grad_(grad), k.requires_grad_(grad)


def _reference_qk(qs, ks, qt, kt, mask, ss, st):
    return am.reference(qs, ks, qt, kt, mask, ss, st)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


# Shapes chosen to take each algorithm of the C++ kernel (see prefer_gram in csrc/fused_loss_cpu.cpp):
# a narrow head against a long sequence takes the Gram form, a wide one against a short sequence the
# tiled form; 1 and 37 are odd lengths, 70 is not a multiple of the 64-row tile.
QK_SHAPES = [
    (2, 3, 37, 8, 12),    # tiled
    (2, 2, 70, 4, 4),     # gram (d=8 << S)
    (3, 12, 33, 32, 32),  # tiled, MiniLM-like heads
    (1, 4, 1, 16, 8),     # a single token
    (2, 2, 130, 40, 24),  # gram, ds != dt, two 64-row tiles and a remainder for the tiled estimate
]


@pytest.mark.parametrize("B,H,S,ds,dt", QK_SHAPES)
@pytest.mark.parametrize("padding", ["random", "padded_row", "none"])
def test_attention_qk_matches_reference(B, H, S, ds, dt, padding):
    gen = torch.Generator().manual_seed(B * 1000 + S + ds)
    qs, ks = _qk(B, H, S, ds, gen)
    qt, kt = _qk(B, H, S, dt, gen, grad=False)
    mask = torch.ones(B, S, dtype=torch.long) if padding == "none" else _mask(
        B, S, gen, padded_rows=(B - 1,) if padding == "padded_row" and B > 1 else ())
    ss, st = ds ** -0.5, dt ** -0.5
    ref = _reference_qk(qs, ks, qt, kt, mask, ss, st)
    got = am.attention_mse_qk(qs, ks, qt, kt, mask, ss, st, "cpp")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    for g, r in zip(_grads(got, [qs, ks]), _grads(ref, [qs, ks])):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_no_gradient_work_under_no_grad(monkeypatch):
    # Inside an autograd.Function, needs_input_grad stays True under no_grad: the wrapper must say so.
    seen = []
    real = am.ExtensionAttentionMse.run
    monkeypatch.setattr(am.ExtensionAttentionMse, "run", staticmethod(lambda *a: seen.append(a[-1]) or real(*a)))
    gen = torch.Generator().manual_seed(12)
    qs, ks = _qk(1, 2, 8, 8, gen)
    qt, kt = _qk(1, 2, 8, 8, gen, grad=False)
    with torch.no_grad():
        value = am.attention_mse_qk(qs, ks, qt, kt, torch.ones(1, 8), 0.3, 0.3, "cpp")
    assert seen == [False]
    assert value.item() == pytest.approx(am.attention_mse_qk(qs, ks, qt, kt, torch.ones(1, 8), 0.3, 0.3, "cpp").item())


def test_attention_qk_every_row_padded_is_zero_with_zero_gradients():
    gen = torch.Generator().manual_seed(3)
    qs, ks = _qk(2, 2, 9, 8, gen)
    qt, kt = _qk(2, 2, 9, 8, gen, grad=False)
    mask = torch.zeros(2, 9, dtype=torch.long)
    got = am.attention_mse_qk(qs, ks, qt, kt, mask, 0.3, 0.3, "cpp")
    assert got.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in _grads(got, [qs, ks]))


def test_attention_qk_teacher_gets_no_gradient_and_student_dtype_is_kept():
    gen = torch.Generator().manual_seed(4)
    qs, ks = _qk(2, 2, 11, 8, gen, dtype=torch.bfloat16)
    qt, kt = _qk(2, 2, 11, 8, gen, grad=False)
    got = am.attention_mse_qk(qs, ks, qt, kt, torch.ones(2, 11), 0.35, 0.35, "cpp")
    got.backward()
    assert qs.grad.dtype == torch.bfloat16 and ks.grad.dtype == torch.bfloat16
    assert qt.grad is None and kt.grad is None


def test_attention_qk_bf16_inputs_match_reference_on_the_same_values(monkeypatch):
    monkeypatch.setattr(am, "native_bf16", False)  # the upcast path (CPUs without bf16 GEMMs): float32 exact
    gen = torch.Generator().manual_seed(5)
    qs, ks = _qk(2, 4, 29, 16, gen, dtype=torch.bfloat16)
    qt, kt = _qk(2, 4, 29, 16, gen, dtype=torch.bfloat16, grad=False)
    mask = _mask(2, 29, gen)
    got = am.attention_mse_qk(qs, ks, qt, kt, mask, 0.25, 0.25, "cpp")
    # The reference on the same bf16-rounded values, computed in float32.
    q32, k32 = qs.detach().float().requires_grad_(), ks.detach().float().requires_grad_()
    ref = _reference_qk(q32, k32, qt.float(), kt.float(), mask, 0.25, 0.25)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    for g, r in zip(_grads(got, [qs, ks]), _grads(ref, [q32, k32])):
        torch.testing.assert_close(g.float(), r, rtol=1e-2, atol=1e-3)  # bf16 gradient storage


def _bf16_case(B, H, S, ds, dt, seed, padding=True):
    gen = torch.Generator().manual_seed(seed)
    qs, ks = _qk(B, H, S, ds, gen, dtype=torch.bfloat16)
    qt, kt = _qk(B, H, S, dt, gen, dtype=torch.bfloat16, grad=False)
    mask = _mask(B, S, gen, padded_rows=(B - 1,)) if padding else torch.ones(B, S, dtype=torch.long)
    return qs, ks, qt, kt, mask


def _against_float32_reference(qs, ks, qt, kt, mask, ss, st):
    """(loss error, [gradient errors]) of the cpp backend, relative to the largest reference entry, against
    the float32 reference on the same bf16 values: the self-check's measure (fastkd.ops.select)."""
    got = am.attention_mse_qk(qs, ks, qt, kt, mask, ss, st, "cpp")
    q32, k32 = qs.detach().float().requires_grad_(), ks.detach().float().requires_grad_()
    ref = _reference_qk(q32, k32, qt.float(), kt.float(), mask, ss, st)
    rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return rel(got, ref), [rel(g, r) for g, r in zip(_grads(got, [qs, ks]), _grads(ref, [q32, k32]))]


# Tiled with equal scales (r = 1), tiled with unequal ones (the teacher operand scaled once), a length
# past one 64-row tile, and the Gram form (narrow heads, long sequence).
@pytest.mark.parametrize("B,H,S,ds,dt", [(2, 4, 29, 16, 16), (2, 3, 83, 32, 24), (3, 12, 70, 32, 32), (2, 2, 130, 4, 4)])
def test_attention_qk_native_bf16_gemms_match_the_reference(monkeypatch, B, H, S, ds, dt):
    monkeypatch.setattr(am, "native_bf16", True)  # forced: bf16 GEMMs run (emulated) on any CPU
    seen = []
    module = builder.load("cpu")

    class Spy:  # which dtype reaches the C++ op
        def attention_mse_qk(self, *args):
            seen.append(args[0].dtype)
            return module.attention_mse_qk(*args)

    monkeypatch.setattr(am.ext, "module_for", lambda device: Spy())
    loss_err, grad_errs = _against_float32_reference(*_bf16_case(B, H, S, ds, dt, seed=S + ds), ds ** -0.5, dt ** -0.5)
    assert set(seen) == {torch.bfloat16}
    # The self-check's 16-bit tolerances (select.tolerances): loss 1e-3, gradients one bf16 epsilon.
    assert loss_err < 1e-3
    assert max(grad_errs) < torch.finfo(torch.bfloat16).eps


# Equal scales (r = 1), a power-of-two ratio, and a ratio that is not one (a 32-wide student head against a
# 64-wide teacher head: r = 1/sqrt(2), the teacher's operand split into two bf16 parts).
@pytest.mark.parametrize("scale_t", [32 ** -0.5, 2 * 32 ** -0.5, 64 ** -0.5])
def test_attention_qk_native_bf16_rounds_the_difference_not_the_scores(monkeypatch, scale_t):
    # A student close to its teacher (late in a distillation): its scores are the teacher's within 0.3%
    # noise on Q and K. Rounding each model's scores to bf16 before subtracting them puts this loss about
    # 20% off; the kernel's single GEMM over [qs | -r qt] [ks | kt] rounds the difference, relative to itself.
    monkeypatch.setattr(am, "native_bf16", True)
    scale_s = 32 ** -0.5
    gen = torch.Generator().manual_seed(8)
    qt, kt = _qk(2, 4, 96, 32, gen, grad=False)
    qt, kt = qt.to(torch.bfloat16), kt.to(torch.bfloat16)
    # student scores scale_s qs ks^T close to the teacher's scale_t qt kt^T
    qs = (qt.float() * (scale_t / scale_s) + 3e-3 * torch.randn(qt.shape, generator=gen)).to(torch.bfloat16)
    ks = (kt.float() + 3e-3 * torch.randn(kt.shape, generator=gen)).to(torch.bfloat16)
    qs, ks = qs.requires_grad_(), ks.requires_grad_()
    mask = torch.ones(2, 96)
    d = lambda x: x.detach().double()  # noqa: E731
    exact = (scale_s * d(qs) @ d(ks).transpose(-1, -2) - scale_t * d(qt) @ d(kt).transpose(-1, -2)).pow(2).mean()
    got = am.attention_mse_qk(qs, ks, qt, kt, mask, scale_s, scale_t, "cpp")
    rounded = lambda q, k: (q @ k.transpose(-1, -2)).double()  # noqa: E731  (bf16 scores, then subtracted)
    naive = (scale_s * rounded(qs.detach(), ks.detach()) - scale_t * rounded(qt, kt)).pow(2).mean()
    assert abs(naive.item() / exact.item() - 1) > 0.1  # the failure this guards against is real here
    assert got.item() == pytest.approx(exact.item(), rel=1e-3)
    # and the gradients, against float64 on the same bf16 values
    q64, k64 = d(qs).requires_grad_(), d(ks).requires_grad_()
    ref = (scale_s * q64 @ k64.transpose(-1, -2) - scale_t * d(qt) @ d(kt).transpose(-1, -2)).pow(2).mean()
    for g, r in zip(_grads(got, [qs, ks]), _grads(ref, [q64, k64])):
        assert ((g.double() - r).abs().max() / r.abs().max()).item() < torch.finfo(torch.bfloat16).eps


def test_the_native_bf16_path_passes_the_self_check(monkeypatch, fresh_selection):
    monkeypatch.setattr(am, "native_bf16", True)
    assert select.check("attention_mse", "cpp", torch.device("cpu"), torch.bfloat16) is None


@pytest.mark.parametrize("native", [True, False])
def test_bf16_stays_bf16_only_where_onednn_has_bf16_gemms(monkeypatch, native):
    # device.bf16_is_native asks oneDNN, which also honours an ONEDNN_MAX_CPU_ISA cap (tests/test_demo.py)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 4, 8, generator=gen).to(torch.bfloat16)
    assert am.cpu_bf16(q, q, q, q) is native
    assert am.cpu_bf16(q, q, q.float(), q.float()) is False  # a float32 teacher: upcast, whatever the CPU
    assert am.cpu_bf16(q, q.float(), q, q) is False  # any float32 input: upcast (never rounded to bf16)


def test_attention_qk_different_head_counts_compare_head_averaged_scores():
    gen = torch.Generator().manual_seed(6)
    qs, ks = _qk(2, 4, 21, 8, gen)
    qt, kt = _qk(2, 6, 21, 16, gen, grad=False)
    mask = _mask(2, 21, gen)
    ref = _reference_qk(qs, ks, qt, kt, mask, 8 ** -0.5, 16 ** -0.5)  # the reference averages the scores
    got = am.attention_mse_qk(qs, ks, qt, kt, mask, 8 ** -0.5, 16 ** -0.5, "cpp")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    for g, r in zip(_grads(got, [qs, ks]), _grads(ref, [qs, ks])):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_attention_qk_close_student_and_teacher_keep_precision():
    # The Gram form is a difference of large sums; float64 Gram matrices keep a near-zero loss exact.
    gen = torch.Generator().manual_seed(7)
    qt, kt = _qk(2, 3, 96, 8, gen, grad=False)
    qs = (qt + 1e-3 * torch.randn(qt.shape, generator=gen)).requires_grad_()
    ks = (kt + 1e-3 * torch.randn(kt.shape, generator=gen)).requires_grad_()
    mask = torch.ones(2, 96)
    d = lambda x: x.detach().double()  # noqa: E731
    ref = (0.35 * (d(qs) @ d(ks).transpose(-1, -2) - d(qt) @ d(kt).transpose(-1, -2))).pow(2).mean()
    got = am.attention_mse_qk(qs, ks, qt, kt, mask, 0.35, 0.35, "cpp")
    assert ref.item() < 1e-4  # about 1e-6 of the scores' own mean square: the cancellation is real
    assert got.item() == pytest.approx(ref.item(), rel=1e-3)


@pytest.mark.parametrize("Ds,Dt,bias", [(8, 12, True), (12, 12, False), (16, 16, None), (24, 7, True)])
def test_hidden_matches_reference(Ds, Dt, bias):
    gen = torch.Generator().manual_seed(Ds * 31 + Dt)
    B, S = 3, 19
    hs = torch.randn(B, S, Ds, generator=gen, requires_grad=True)
    ht = torch.randn(B, S, Dt, generator=gen)
    mask = _mask(B, S, gen, padded_rows=(1,))
    torch.manual_seed(Ds)
    proj = None if bias is None else nn.Linear(Ds, Dt, bias=bias)
    params = [hs] + ([] if proj is None else list(proj.parameters()))
    ref = hm.reference(hs, ht, mask, proj)
    ref_grads = _grads(ref, params)
    old_chunk = hm.CHUNK_ROWS
    hm.CHUNK_ROWS = 16  # several chunks and a remainder (57 rows)
    try:
        got = hm.hidden_mse(hs, ht, mask, proj, "cpp")
    finally:
        hm.CHUNK_ROWS = old_chunk
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(_grads(got, params), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_float64_gradcheck_of_every_cpp_op():
    gen = torch.Generator().manual_seed(8)
    d64 = dict(dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    count = am.pair_count(mask, 2).double()
    qs, ks = (torch.randn(2, 2, 5, 3, generator=gen, **d64).requires_grad_() for _ in range(2))
    qt, kt = (torch.randn(2, 2, 5, 4, generator=gen, **d64) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: am.ExtensionAttentionMse.apply(a, b, qt, kt, mask, 0.5, 0.4, count, True), (qs, ks))
    hs = torch.randn(10, 3, generator=gen, **d64).requires_grad_()
    ht = torch.randn(10, 4, generator=gen, **d64)
    w = torch.randn(4, 3, generator=gen, **d64).requires_grad_()
    b = torch.randn(4, generator=gen, **d64).requires_grad_()
    rows = mask.reshape(-1).bool()
    n = rows.sum().double() * 4
    assert torch.autograd.gradcheck(lambda x, y, z: hm.ExtensionHiddenMse.apply(x, ht, rows, y, z, n, 3, True), (hs, w, b))


def test_distill_loss_uses_the_backend_and_matches_the_reference():
    from fastkd.capture import AttentionRecord
    from fastkd.losses import DistillLoss, LossWeights
    from fastkd.mapping import LayerMapping
    from fastkd.teacher import TeacherOutputs

    gen = torch.Generator().manual_seed(9)
    B, S, H = 2, 13, 2
    mask = _mask(B, S, gen)
    weights = LossWeights(embedding=1.0, hidden=1.0, attention=1.0, attention_kl=0.5)
    student_hidden = [torch.randn(B, S, 8, generator=gen, requires_grad=True) for _ in range(3)]
    teacher_hidden = {i: torch.randn(B, S, 12, generator=gen) for i in range(5)}
    rec = lambda d, g=True: AttentionRecord(*_qk(B, H, S, d, gen, grad=g), d ** -0.5)  # noqa: E731
    student_att = {1: rec(4), 2: rec(4)}
    teacher_att = {2: rec(6, False), 4: rec(6, False)}
    out, ran = {}, {}
    for backend in ("torch", "cpp"):
        torch.manual_seed(0)
        criterion = DistillLoss(LayerMapping((2, 4), 4), 8, 12, weights, backend=backend)
        result = criterion(student_hidden, student_att, TeacherOutputs(teacher_hidden, teacher_att, mask))
        grads = torch.autograd.grad(result.total, student_hidden + [student_att[1].query, student_att[2].key])
        out[backend] = (result.scalars(), grads)
        ran[backend] = {r["op"]: r["backend"] for r in criterion.ran_on()}
    # the comparison is fused against torch, not torch against torch after a silent fallback
    assert set(ran["cpp"]) == {"hidden_mse", "attention_mse", "attention_kl"} and set(ran["cpp"].values()) == {"cpp"}, ran
    assert set(out["cpp"][0]) == {"embedding", "hidden", "attention", "attention_kl"}
    for k, v in out["torch"][0].items():
        assert out["cpp"][0][k] == pytest.approx(v, rel=1e-5)
    for g, r in zip(out["cpp"][1], out["torch"][1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


@pytest.fixture
def fresh_selection(monkeypatch):
    """Backend decisions start from nothing and are forgotten afterwards (they are per process)."""
    monkeypatch.setattr(backends, "_chains", {})
    monkeypatch.setattr(select, "_selected", {})
    monkeypatch.setattr(select, "_pinned", {})


def test_backend_resolution(monkeypatch, caplog, fresh_selection):
    assert ops.resolve_backend("auto", "cpu") == "cpp"
    assert ops.resolve_backend("torch", "cpu") == "torch"
    with caplog.at_level(logging.WARNING):
        assert ops.resolve_backend("cuda", "cpu") == "cpp"  # missing: one line, then the next backend
        assert ops.resolve_backend("cuda", "cpu") == "cpp"  # decided once per process
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == ["loss backend cuda on cpu: cuda: the CUDA kernels need a GPU; using cpp"]
    monkeypatch.setenv(ops.ENV, "torch")
    assert ops.resolve_backend(None, "cpu") == "torch"
    with pytest.raises(UserError, match="not one of"):
        ops.resolve_backend("fast", "cpu")


def test_a_failed_build_falls_back_to_torch_with_one_line(monkeypatch, caplog, fresh_selection):
    monkeypatch.setattr(builder, "_loaded", {})
    monkeypatch.setattr(builder, "_failed", {})
    monkeypatch.setattr(builder, "_why_not", lambda kind: "no C++ compiler (c++) on PATH")
    with caplog.at_level(logging.WARNING):
        assert ops.resolve_backend("auto", "cpu") == "torch"
        assert ops.backend_for("attention_mse", "auto", "cpu", torch.float32) == "torch"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == ["loss backend auto on cpu: cpp: no C++ compiler (c++) on PATH; using torch"]


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_damaged_cached_extension_is_built_again_before_it_is_loaded(tmp_path):
    """A library cut short in the cache (a full disk, a killed copy): dlopen would kill the process
    (SIGBUS) and ninja, seeing it newer than its sources, would keep it. Its SHA-256, recorded after
    the build, is checked first: one warning, the folder cleared, built again. An intact copy loads
    as it is. Each in a fresh process, as a later run meets it."""
    import shutil
    import subprocess
    import sys

    built = builder.cache_root() / f"fastkd_fused_cpu-{builder._build_key('cpu')}"
    assert (built / builder.LIBRARY_RECORD).is_file(), "the module fixture built and recorded the extension"
    script = (
        "import logging\n"
        "from pathlib import Path\n"
        "from torch.utils import cpp_extension\n"
        "from fastkd.ops import builder\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "real, calls = cpp_extension.load, []\n"
        "def load(**kwargs):\n"
        "    calls.append(sorted(p.name for p in Path(kwargs['build_directory']).iterdir()))\n"
        "    if any(n.endswith('.so') for n in calls[-1]):\n"
        "        return real(**kwargs)\n"
        "    raise RuntimeError('rebuilt')  # a build from scratch (15 s) is not needed to see that one starts\n"
        "cpp_extension.load = load\n"
        "module = builder.load('cpu')\n"
        "why = builder.unavailable_reason('cpu') or ''\n"
        "print('loaded' if module is not None else 'rebuilt' if '(rebuilt)' in why else why, len(calls), calls[-1] == [])\n")

    def later_run(cache):
        out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "FASTKD_CACHE": str(cache)},
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
        return out.stdout.split(), out.stderr

    for case in ("intact", "locked", "cut"):
        copy = tmp_path / case / "extensions" / built.name
        shutil.copytree(built, copy)
        if case == "cut":
            (so,) = copy.glob("*.so")
            so.write_bytes(so.read_bytes()[:4096])
        if case == "locked":  # torch's lock file, left by a build killed a moment ago: torch would wait forever
            (copy / "lock").write_text("")
        (result, calls, empty), err = later_run(tmp_path / case)
        if case == "intact":
            assert (result, calls, empty) == ("loaded", "1", "False") and "damaged" not in err, err
        elif case == "locked":
            assert (result, calls) == ("loaded", "1") and "removing a build lock" in err, err
        else:
            assert (result, calls, empty) == ("rebuilt", "1", "True"), err  # started from an empty folder
            assert f"is damaged ({so.name} changed since it was built); building it again" in err, err


# --- the self-check before first use: faults injected into a backend, never into the check --------



def test_a_backend_that_raises_falls_back_with_one_line(monkeypatch, caplog, fresh_selection):
    class BrokenModule:  # the compiled extension, as if its kernel failed to launch on this machine
        def __getattr__(self, name):
            raise RuntimeError(f"CUDA error: too many resources requested for launch ({name})")

    monkeypatch.setattr("fastkd.ops._extension.module_for", lambda device: BrokenModule())
    with caplog.at_level(logging.WARNING):
        assert ops.backend_for("attention_mse", "cpp", "cpu", torch.float32) == "torch"
        assert ops.backend_for("attention_mse", "cpp", "cpu", torch.float32) == "torch"  # checked once
    (line,) = _warnings(caplog)
    assert line.startswith("loss op attention_mse: the cpp backend on cpu (float32) failed its self-check: "
                           "raised RuntimeError: CUDA error: too many resources requested")
    assert line.endswith("; using torch")
    (entry,) = ops.selections()
    assert entry["backend"] == "torch" and entry["requested"] == "cpp" and "cpp: raised RuntimeError" in entry["check"]


@pytest.mark.parametrize("op,fault", [("attention_mse", "loss"), ("attention_mse", "gradient"),
                                      ("hidden_mse", "loss"), ("hidden_mse", "gradient")])
def test_a_backend_with_wrong_numbers_is_caught(monkeypatch, caplog, fresh_selection, op, fault):
    # The real compiled module with one fault: the loss sum 0.1% high, or one gradient entry off by 1%.
    real = builder.load("cpu")
    function = {"attention_mse": "attention_mse_qk", "hidden_mse": "projected_mse"}[op]

    class Faulty:
        def __getattr__(self, name):
            f = getattr(real, name)
            if name != function:
                return f

            def wrong(*args):
                out = list(f(*args))
                if fault == "loss":
                    out[0] = out[0] * 1.001
                elif out[1] is not None:
                    out[1] = out[1].clone()
                    flat = out[1].view(-1)
                    flat[flat.abs().argmax()] *= 1.01
                return out
            return wrong

    monkeypatch.setattr("fastkd.ops._extension.module_for", lambda device: Faulty())
    with caplog.at_level(logging.WARNING):
        assert ops.backend_for(op, "auto", "cpu", torch.float32) == "torch"
    (line,) = _warnings(caplog)
    assert f"loss op {op}: the cpp backend on cpu (float32) failed its self-check: {fault} " in line, line


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_triton_gradient_off_by_one_percent_is_caught_in_16_bit_too(monkeypatch, fresh_selection, dtype):
    # float16 runs the Triton kernels' tensor-core path under the interpreter (see test_kernels_triton).
    from fastkd.kernels import attention_mse as triton_mse

    real = triton_mse.launch

    def faulty(*args, **kwargs):
        loss, count, dqs, dks = real(*args, **kwargs)
        return loss, count, None if dqs is None else dqs * 1.01, dks
    assert select.check("attention_mse", "triton", torch.device("cpu"), dtype) is None
    monkeypatch.setattr(triton_mse, "launch", faulty)
    why = select.check("attention_mse", "triton", torch.device("cpu"), dtype)
    assert why is not None and why.startswith("gradient 0 off by "), why
    assert 0.008 < float(why.split()[4]) < 0.015, why  # the 1% fault, give or take the dtype's rounding


def test_student_and_teacher_dtypes_are_checked_as_a_pair(fresh_selection):
    assert ops.backend_for("attention_mse", "auto", "cpu", torch.float32, torch.bfloat16) == "cpp"
    assert ops.backend_for("attention_mse", "auto", "cpu", torch.float32) == "cpp"
    assert [e["dtype"] for e in ops.selections()] == ["float32/bfloat16", "float32"]


def test_a_sound_backend_passes_and_the_check_can_be_skipped(monkeypatch, caplog, fresh_selection):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        assert ops.backend_for("attention_mse", "auto", "cpu", torch.float32) == "cpp"
        assert ops.backend_for("hidden_mse", "auto", "cpu", torch.bfloat16) == "cpp"
    assert not _warnings(caplog)
    assert torch.equal(torch.get_rng_state(), before)  # the check never draws from the global RNG
    assert [(e["op"], e["dtype"], e["check"]) for e in ops.selections()] == [
        ("attention_mse", "float32", "passed"), ("hidden_mse", "bfloat16", "passed")]
    # FASTKD_SELF_CHECK=0 trusts the first present backend, even a broken one.
    monkeypatch.setattr(select, "_selected", {})
    monkeypatch.setenv("FASTKD_SELF_CHECK", "0")
    monkeypatch.setattr(select, "check", lambda *a: pytest.fail("the check ran"))
    assert ops.backend_for("attention_mse", "auto", "cpu", torch.float32) == "cpp"
    assert ops.selections()[0]["check"] == "skipped ($FASTKD_SELF_CHECK=0)"


def test_the_check_runs_outside_autocast_and_no_grad(fresh_selection):
    # First reached inside a bf16-autocast, no-grad forward: the reference must still be float32
    # and the gradients still compared (else a sound backend would fail, or a wrong one pass).
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert ops.backend_for("attention_mse", "auto", "cpu", torch.bfloat16) == "cpp"
    assert ops.selections()[0]["check"] == "passed"


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_every_fused_backend_drives_distill_loss_like_the_reference(backend):
    # Different head counts (student 2, teacher 3), a width projection and padding, through DistillLoss.
    from fastkd.capture import AttentionRecord
    from fastkd.losses import DistillLoss, LossWeights
    from fastkd.mapping import LayerMapping
    from fastkd.teacher import TeacherOutputs

    gen = torch.Generator().manual_seed(10)
    B, S = 2, 11
    mask = _mask(B, S, gen, padded_rows=(1,))
    student_hidden = [torch.randn(B, S, 16, generator=gen, requires_grad=True) for _ in range(2)]
    teacher_hidden = {i: torch.randn(B, S, 24, generator=gen) for i in range(3)}
    student_att = {1: AttentionRecord(*_qk(B, 2, S, 8, gen), 8 ** -0.5)}
    teacher_att = {2: AttentionRecord(*_qk(B, 3, S, 8, gen, grad=False), 8 ** -0.5)}
    results = {}
    for name in ("torch", backend):
        torch.manual_seed(0)
        criterion = DistillLoss(LayerMapping((2,), 2), 16, 24, LossWeights(), backend=name)
        assert criterion.backend(torch.device("cpu")) == name
        assert criterion.prepare(torch.device("cpu"), [torch.float32]) == {
            "hidden_mse": {"float32": name}, "attention_mse": {"float32": name}}
        out = criterion(student_hidden, student_att, TeacherOutputs(teacher_hidden, teacher_att, mask))
        inputs = student_hidden + [student_att[1].query, student_att[1].key] + list(criterion.parameters())
        results[name] = (out.scalars(), torch.autograd.grad(out.total, inputs))
    for k, v in results["torch"][0].items():
        assert results[backend][0][k] == pytest.approx(v, rel=1e-5)
    for g, r in zip(results[backend][1], results["torch"][1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_gpu_backends_take_the_merged_reference_for_heads_wider_than_their_tiles(monkeypatch):
    # Different head counts merge into one wide head; past the GPU tile limit the merged (B, 1, S, S)
    # scores go through the reference, and the value and gradients still equal the reference's.
    called = []
    monkeypatch.setattr(am, "triton_attention_mse", lambda *a, **k: called.append(1))
    monkeypatch.setattr(am, "GPU_MAX_HEAD_DIM", 16)
    gen = torch.Generator().manual_seed(11)
    qs, ks = _qk(2, 2, 9, 12, gen)   # merged width 24 > 16
    qt, kt = _qk(2, 3, 9, 4, gen, grad=False)
    mask = _mask(2, 9, gen)
    got = am.attention_mse_qk(qs, ks, qt, kt, mask, 0.3, 0.5, "triton")
    ref = _reference_qk(qs, ks, qt, kt, mask, 0.3, 0.5)
    assert not called
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(_grads(got, [qs, ks]), _grads(ref, [qs, ks])):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_the_ops_never_import_the_losses():
    """The data flows one way: fastkd.losses imports fastkd.ops, never the reverse (no cycle)."""
    import subprocess
    import sys

    code = ("import sys, fastkd.ops\n"
            "bad = [m for m in sys.modules if m in ('fastkd.losses', 'fastkd.distill', 'fastkd.capture')]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
