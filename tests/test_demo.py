import json

from fastkd.demo import Budget, run_demo
from fastkd.search.proxy import ProxyConfig

from conftest import SHARED_DATA

TINY = Budget(ProxyConfig(sequences=32, steps=2, batch_size=4, max_seq_len=32, tasks=("rte",), finetune_steps=2,
                          finetune_examples=16, finetune_batch=8, finetune_seq_len=32),
              population=2, generations=1, repeats=2, finalists=1, drop_weak_tasks=False, distill_steps=2,
              distill_batch=4, distill_seq_len=32, glue_tasks="sst2,mrpc,rte", glue_steps=2, glue_examples=16,
              glue_seq_len=32, glue_lr=1e-4, bf16=False)


def test_demo_pipeline_end_to_end_and_resumes(tmp_path, tiny_teacher_dir):
    out = tmp_path / "demo"
    summary = run_demo(str(SHARED_DATA), str(out), teacher=str(tiny_teacher_dir), student_layers=2, progress=False,
                       budget=TINY)
    assert summary["students"]["uniform"] == "2,4" and summary["students"]["last"] == "3,4"
    report = json.loads((out / "custom" / "glue" / "glue.json").read_text())
    paths = [m["path"] for m in report["models"]]
    assert paths[-1] == str(tiny_teacher_dir) and len(paths) == len(set(summary["students"].values())) + 1
    assert all(set(m["tasks"]) == {"sst2", "mrpc", "rte"} for m in report["models"])
    assert "majority class" in summary["glue_table"] and summary["verdict"][0].startswith("**Winner")
    assert (out / "custom" / "search" / "report.md").exists()
    # Run again: every stage resumes from what is on disk instead of failing or redoing it.
    again = run_demo(str(SHARED_DATA), str(out), teacher=str(tiny_teacher_dir), student_layers=2, progress=False,
                     budget=TINY)
    assert again["glue_table"] == summary["glue_table"]
