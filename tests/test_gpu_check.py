"""benchmarks/gpu_check.py (`make gpu-check`) without a GPU: one line and exit 0; its correctness
sweep, run here on the CPU backends, passes sound kernels and reports a faulty one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

from fastkd.ops import attention_mse as am  # noqa: E402


def test_without_a_gpu_it_says_so_in_one_line_and_succeeds():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU for torch, even on a GPU machine
    commands = [[sys.executable, "benchmarks/gpu_check.py"]]
    if shutil.which("nvidia-smi") is None:  # make probes the driver: only without one is there no GPU to it
        commands.append(["make", "-s", "gpu-check"])
    for cmd in commands:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpu-check: no NVIDIA GPU here"), proc.stdout
    if shutil.which("nvidia-smi") is None:
        probe = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--probe"], cwd=REPO, capture_output=True,
                               text=True, timeout=300, env=env)
        assert probe.returncode == 1  # what `make gpu-check` uses to skip the install and the check
    required = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--require-gpu"], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env=env)
    assert required.returncode == 2 and "cannot use it" in required.stdout  # a GPU the venv's torch cannot use


def test_the_correctness_sweep_passes_sound_kernels_and_reports_a_faulty_one(monkeypatch):
    cpu = torch.device("cpu")
    # One length past the 16-row tile: the Triton interpreter is what this test pays for (about 10 s per
    # dtype and length); shorter and odd lengths are the kernels' own tests (test_kernels_triton.py,
    # test_attention_kl.py).
    kwargs = dict(seq_lens=(17,), head_dims=(16,), tf32=False)
    rows = gpu_check.correctness(cpu, ("cpp", "triton"), (torch.float32, torch.float16), **kwargs)
    # every op, case, dtype and backend, all within tolerance
    attention = gpu_check.attention_cases([17], [16])
    equal_heads = [c for c in attention if c[2] == c[3]]  # the KL runs fused on equal head counts only
    per_backend_and_dtype = (len(attention) + len(equal_heads) + len(gpu_check.relation_cases([17]))
                             + len(gpu_check.hidden_cases([17])))
    assert len(rows) == 2 * 2 * per_backend_and_dtype
    assert {r["op"] for r in rows} == {"attention_mse", "attention_kl", "relation_kl", "hidden_mse"}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert {r["dtype"] for r in rows} == {"float32", "float16"}

    real = am.triton_attention_mse
    monkeypatch.setattr(am, "triton_attention_mse", lambda *a, **k: real(*a, **k) * 1.01)  # 1% high
    rows = gpu_check.correctness(cpu, ("cpp", "triton"), (torch.float32,), **kwargs)
    bad = {(r["op"], r["backend"]) for r in rows if not r["ok"]}
    assert bad == {("attention_mse", "triton")}
    assert all(r["loss_error"] > 5e-3 for r in rows if (r["op"], r["backend"]) in bad)


def test_tiny_float16_gradients_are_judged_by_what_float16_can_hold():
    """Gradients of a mean over B*H*S rows sit below float16's smallest normal: an exact gradient cast
    to float16 passes, one 1% off still fails, and float32 tolerances stay as they were."""
    from fastkd.ops import select

    want = torch.linspace(-2e-5, 3e-5, 1001)
    _, tol16 = select.tolerances(torch.device("cuda"), torch.float16)
    exact = want.to(torch.float16).float()
    assert select._relative_error(exact, want) > tol16  # the plain relative bound cannot be met
    assert select._relative_error(exact, want) <= gpu_check.gradient_tolerance(tol16, torch.float16, want)
    assert select._relative_error(want * 1.01, want) > gpu_check.gradient_tolerance(tol16, torch.float16, want)
    assert gpu_check.gradient_tolerance(1e-4, torch.float32, want) == pytest.approx(1e-4, rel=1e-6)
