"""fastkd.machine: what a CI log, a benchmark and `fastkd bench` say about the machine they ran on."""

from __future__ import annotations

import json
import subprocess
import sys

from fastkd import machine
from fastkd.cli import main

XEON = {"model name": "Intel(R) Xeon(R) Platinum 8481C", "flags": "fpu avx2 fma avx512f avx512bw avx512_vnni "
        "avx512_bf16 amx_bf16 amx_tile amx_int8"}
EPYC_AVX2 = {"model name": "AMD EPYC 7B12", "flags": "fpu sse4_2 avx2 fma"}


def test_the_flags_that_decide_kernels_are_read_from_cpuinfo(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: dict(XEON))
    assert all(machine.cpu_flags().values()) and machine.cpu_name() == XEON["model name"]
    monkeypatch.setattr(machine, "_cpuinfo", lambda: dict(EPYC_AVX2))
    flags = machine.cpu_flags()
    assert flags["avx2"] and not flags["avx512f"] and not flags["avx512_bf16"] and not flags["amx_bf16"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    text = machine.summary()
    assert "AMD EPYC 7B12" in text and "avx512_bf16 no" in text and "amx_bf16 no" in text
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in text and "torch:" in text and "transformers" in text


def test_the_module_prints_the_machine_as_ci_does():
    out = subprocess.run([sys.executable, "-m", "fastkd.machine"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == ["cpu", "isa", "caps", "torch"]
    assert any(line.startswith("libraries: torch ") for line in lines)


def test_bench_writes_its_rows_with_the_machine(tmp_path, tiny_teacher_dir, capfd):
    out = tmp_path / "bench.json"
    assert main(["bench", "--teacher", str(tiny_teacher_dir), "--student-layers", "2", "--batch-size", "2",
                 "--seq-len", "16", "--steps", "1", "--warmup", "0", "--backends", "torch", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["cpu"] == machine.cpu_name() and env["isa"] == [f for f, on in machine.cpu_flags().items() if on]
    assert env["versions"]["torch"] and env["threads"] >= 1
    assert [r["backend"] for r in result["rows"]] == ["torch"] and result["rows"][0]["seq_per_s"] > 0
    assert env["cpu"] in capfd.readouterr().out
