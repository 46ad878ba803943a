import json
import os

import torch

from fastkd.config import DemoConfig
from fastkd.demo import Budget, run_demo
from fastkd.search.config import ProxyConfig

from conftest import SHARED_DATA

TINY = Budget(ProxyConfig(sequences=32, steps=2, batch_size=4, max_seq_len=32, tasks=("rte",), finetune_steps=2,
                          finetune_examples=16, finetune_batch=8, finetune_seq_len=32),
              population=2, generations=1, ladder="probe,full", promote=0.5, verdict_seeds=2, drop_weak_tasks=False,
              distill_steps=2, distill_batch=4, distill_seq_len=32, glue_tasks="sst2,mrpc,rte", glue_steps=2,
              glue_examples=16, glue_seq_len=32, glue_lr=1e-4, bf16=False, glue_seeds=2)


def test_demo_pipeline_end_to_end_and_resumes(tmp_path, tiny_teacher_dir):
    out = tmp_path / "demo"
    summary = run_demo(DemoConfig(data_dir=str(SHARED_DATA), output=str(out), teacher=str(tiny_teacher_dir),
                                  student_layers=2, progress=False), budget=TINY)
    assert summary["students"]["uniform"] == "2,4" and summary["students"]["last"] == "3,4"
    for seed in (0, 1):  # the final table's fine-tuning seeds, each its own resumable GLUE run
        report = json.loads((out / "custom" / "glue" / "biencoder-2steps" / f"seed-{seed}" / "glue.json").read_text())
        assert report["settings"]["seed"] == seed and report["settings"]["head"] == "biencoder"  # (the budget's)
        paths = [m["path"] for m in report["models"]]
        assert paths[-1] == str(tiny_teacher_dir) and len(paths) == len(set(summary["students"].values())) + 1
        assert all(set(m["tasks"]) == {"sst2", "mrpc", "rte"} for m in report["models"])
    table = summary["glue_table"]
    assert "majority class" in table and "mean ± SD over 2 fine-tuning seeds (0, 1)" in table and " ± " in table
    # A random tiny teacher learns nothing in 2 steps: the table must say its columns cannot show the cost.
    assert not any(summary["teacher_apart"].values()) and "Caution: the teacher does not beat" in table
    assert summary["verdict"][0].startswith("**Winner") and set(summary["verdicts"]) == {"uniform", "last"}
    assert "STS-B zero-shot (P/S)" in table
    zero_shot = out / "custom" / "glue" / "zeroshot.json"
    assert len(json.loads(zero_shot.read_text())["models"]) == len(set(summary["students"].values())) + 1
    stamps = {zero_shot: zero_shot.stat().st_mtime_ns}
    assert (out / "custom" / "search" / "report.md").exists()
    # Run again: every stage resumes from what is on disk instead of failing or redoing it.
    again = run_demo(DemoConfig(data_dir=str(SHARED_DATA), output=str(out), teacher=str(tiny_teacher_dir),
                                student_layers=2, progress=False), budget=TINY)
    assert again["glue_table"] == summary["glue_table"]
    # The zero-shot column is reused, not recomputed.
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_the_budget_drops_bf16_where_it_would_run_emulated(monkeypatch, caplog):
    from fastkd import demo, device

    full = demo.BUDGETS["full"]
    assert full.bf16 and full.proxy.bf16
    monkeypatch.setattr(demo, "bf16_is_native", lambda dev: True)
    assert demo.for_this_machine(full) == full
    monkeypatch.setattr(demo, "bf16_is_native", lambda dev: False)
    with caplog.at_level("WARNING"):
        plain = demo.for_this_machine(full)
    assert not plain.bf16 and not plain.proxy.bf16 and plain.proxy.steps == full.proxy.steps
    assert "runs in float32" in caplog.text
    # --bf16 asked for by hand where it is emulated: kept, said once per process
    monkeypatch.setattr(device, "bf16_is_native", lambda dev: False)
    monkeypatch.setattr(device, "_said_bf16", False)
    caplog.clear()
    with caplog.at_level("WARNING"):
        device.warn_if_bf16_emulated(torch.device("cpu"))
        device.warn_if_bf16_emulated(torch.device("cpu"))
    assert caplog.text.count("has no oneDNN bf16 kernels") == 1


def test_bf16_detection_follows_onednn_both_ways(monkeypatch):
    """The CPU answer is oneDNN's, checked on both branches by injection (the real answer depends on
    the CPU), and on the real machine under a cap every x86 CPU can honour: oneDNN held to AVX2 (what
    an AVX2-only CPU runs) has no bf16 kernels, whatever this CPU has."""
    import subprocess
    import sys

    from fastkd import device

    real = device.bf16_is_native  # the function itself, never a replaced one
    for answer in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda answer=answer: answer)
        assert real(torch.device("cpu")) is answer
    monkeypatch.undo()
    code = "import torch; from fastkd.device import bf16_is_native; print(bf16_is_native(torch.device('cpu')))"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    capped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert capped.returncode == 0 and capped.stdout.split()[-1] == "False", capped.stdout + capped.stderr
