"""What a benchmark takes from an earlier result instead of measuring it again: only numbers measured
under the same settings (benchmarks/vs_sentence_transformers.py's teacher SST-2 references)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import vs_sentence_transformers as vs  # noqa: E402

SETTINGS = {"teacher": "mpnet-base", "max_seq_len": 128, "data_dir": "/data/glue", "sst2_steps": 150,
            "sst2_examples": 3000, "sst2_lr": 1e-4, "sst2_seq_len": 64}


def _result(folder: Path, name: str, settings: dict, sst2: list) -> None:
    (folder / f"{name}.json").write_text(json.dumps(
        {"settings": {**settings, "layers": 3}, "references": {"teacher": {"stsb": 88.1, "sst2": sst2}}}))


def test_teacher_sst2_is_reused_only_from_a_result_with_the_same_fine_tune(tmp_path, monkeypatch):
    monkeypatch.setattr(vs, "RESULTS", tmp_path)
    args = argparse.Namespace(**SETTINGS, seeds=2)
    assert vs.earlier_teacher_sst2(args) is None  # nothing measured yet

    _result(tmp_path, "vs_sentence_transformers_a", {**SETTINGS, "sst2_lr": 5e-4}, [90.0, 91.0])  # another lr
    _result(tmp_path, "vs_sentence_transformers_b", SETTINGS, [89.0])  # too few seeds
    _result(tmp_path, "vs_sentence_transformers_c", {**SETTINGS, "teacher": "default"}, [82.0, 83.0])
    _result(tmp_path, "other_benchmark", SETTINGS, [70.0, 71.0])  # not this benchmark's result
    assert vs.earlier_teacher_sst2(args) is None

    _result(tmp_path, "vs_sentence_transformers_d", SETTINGS, [90.9, 90.6, 90.1])
    assert vs.earlier_teacher_sst2(args) == ([90.9, 90.6], "vs_sentence_transformers_d.json")
    # the kept layers are not a fine-tune setting of the teacher: another student size reuses it too
    assert vs.earlier_teacher_sst2(argparse.Namespace(**SETTINGS, seeds=3, layers=6))[0] == [90.9, 90.6, 90.1]
