"""Benchmark helpers whose mistakes would change a published number: what a benchmark takes from an
earlier result instead of measuring it again (only numbers measured under the same recipe:
vs_sentence_transformers.py's teacher SST-2 references), which STS-B pairs init_screen.py chooses
starts on (not the dev split the students are judged on), and the teacher speed mpnet_distill.py's table
shows when its rows come from several machines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import init_screen  # noqa: E402
import mpnet_distill  # noqa: E402  (init_screen imports it too; named here for its helpers)
import vs_sentence_transformers as vs  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402

from fastkd.glue.data import TaskCache  # noqa: E402
from fastkd.glue.tasks import task_spec  # noqa: E402

ARGS = {"teacher": "mpnet-base", "data_dir": "/data/glue", "sst2_steps": 150, "sst2_examples": 3000, "sst2_lr": 1e-4,
        "sst2_seq_len": 64, "seeds": 2, "name": "vs_sentence_transformers_mpnet_6", "layers": 6}


def _args(**changed) -> argparse.Namespace:
    return argparse.Namespace(**{**ARGS, **changed})


def _result(folder: Path, name: str, recipe: dict, sst2: list, **extra) -> None:
    (folder / f"{name}.json").write_text(json.dumps(
        {"date": "2026-12-07 16:00:00", "machine": {"cpu": "AMD EPYC"}, "calibration": {},
         "settings": {"layers": 3, "sst2_recipe": recipe}, "references": {"teacher": {"stsb": 88.1, "sst2": sst2,
                                                                                      **extra}}}))


def test_the_recipe_holds_the_whole_fine_tune_config():
    recipe = vs.sst2_recipe(_args())
    assert recipe["finetune"]["lr"] == 1e-4 and recipe["finetune"]["max_steps"] == 150
    assert {"head", "batch_size", "bf16", "weight_decay"} <= recipe["finetune"].keys()  # defaults count too
    assert "seed" not in recipe["finetune"] and recipe["device"] in ("cpu", "cuda")
    assert vs.sst2_recipe(_args(layers=3)) == recipe  # the kept layers do not change the teacher


def test_teacher_sst2_is_reused_from_a_result_with_the_same_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(vs, "RESULTS", tmp_path)
    recipe = vs.sst2_recipe(_args())
    assert vs.earlier_teacher_sst2(_args(), recipe) is None  # nothing measured yet
    _result(tmp_path, "vs_sentence_transformers_mpnet_3", recipe, [90.9, 90.6, 90.1])
    scores, source = vs.earlier_teacher_sst2(_args(), recipe)
    assert scores == [90.9, 90.6]
    assert source == "results/vs_sentence_transformers_mpnet_3.json (2026-12-07 16:00:00, AMD EPYC)"
    # a result that reused them names the run that measured them
    _result(tmp_path, "a_reuse", recipe, [90.9, 90.6], sst2_from="results/first.json (2026-12-01, Xeon)")
    (tmp_path / "vs_sentence_transformers_mpnet_3.json").unlink()
    assert vs.earlier_teacher_sst2(_args(), recipe)[1] == "results/first.json (2026-12-01, Xeon)"


@pytest.mark.parametrize("changed", [{"teacher": "default"}, {"data_dir": "/other/glue"}, {"sst2_steps": 72},
                                     {"sst2_examples": 1920}, {"sst2_lr": 5e-4}, {"sst2_seq_len": 128}])
def test_teacher_sst2_is_not_reused_under_another_recipe(tmp_path, monkeypatch, changed):
    monkeypatch.setattr(vs, "RESULTS", tmp_path)
    _result(tmp_path, "earlier", vs.sst2_recipe(_args(**changed)), [90.0, 91.0])
    assert vs.earlier_teacher_sst2(_args(), vs.sst2_recipe(_args())) is None


def test_teacher_sst2_is_not_reused_from_what_cannot_vouch_for_it(tmp_path, monkeypatch):
    monkeypatch.setattr(vs, "RESULTS", tmp_path)
    recipe = vs.sst2_recipe(_args())
    _result(tmp_path, "fewer_seeds", recipe, [89.0])
    _result(tmp_path, "half_measured", recipe, [89.0, None])
    _result(tmp_path, ARGS["name"], recipe, [90.0, 91.0])  # this run's own file, about to be rewritten
    (tmp_path / "truncated.json").write_text('{"settings": {"sst2_rec')
    (tmp_path / "other_benchmark.json").write_text(json.dumps({"settings": {"sst2_recipe": recipe},
                                                               "references": {"teacher": {"sst2": [1.0, 2.0]}}}))
    assert vs.earlier_teacher_sst2(_args(), recipe) is None
    # a teacher in a local folder may hold other weights by now
    folder = tmp_path / "my-teacher"
    folder.mkdir()
    _result(tmp_path, "by_path", vs.sst2_recipe(_args(teacher=str(folder))), [90.0, 91.0])
    assert vs.earlier_teacher_sst2(_args(teacher=str(folder)), vs.sst2_recipe(_args(teacher=str(folder)))) is None


def test_init_screen_draws_labelled_train_pairs_not_dev():
    glue = str(SHARED_DATA / "glue")
    data = TaskCache(glue).data(task_spec("stsb"))
    drawn = init_screen.pairs(glue, "train", 1500)
    assert len(drawn.labels) == len(drawn.text_a) == len(drawn.text_b) == 1500
    assert drawn.labels == init_screen.pairs(glue, "train", 1500).labels  # the same draw every run
    # the draw the published screens (results/init_screen_*_train.json) were scored on: train rows 4, 14, 19, ...
    first = (4, 14, 19, 26, 28, 30, 38, 42)
    assert drawn.text_a[:8] == [data.train.text_a[i] for i in first]
    with pytest.raises(SystemExit, match="--rows -5"):
        init_screen.pairs(glue, "train", -5)
    # each pair keeps its own label, as in the train split
    train = set(zip(data.train.text_a, data.train.text_b, data.train.labels))
    assert set(zip(drawn.text_a, drawn.text_b, drawn.labels)) <= train
    dev = set(zip(data.dev[0].text_a, data.dev[0].text_b))
    assert len(dev & set(zip(drawn.text_a, drawn.text_b))) < 15  # (STS-B repeats a few pairs across splits)
    assert len(init_screen.pairs(glue, "train", 0).labels) == len(data.train.labels)
    assert init_screen.pairs(glue, "dev", 10).labels == data.dev[0].labels  # dev is used whole


def test_the_teacher_speed_is_kept_apart_per_machine():
    """Rows timed on two CPU kinds (the teacher 34 and 76 sentences/s beside them): one median over both
    would name a speed the teacher has on neither machine."""
    epyc = {"cpu": "AMD EPYC", "isa": ["avx2", "fma"]}
    zen4 = {"cpu": "AMD EPYC", "isa": ["avx2", "avx512f", "avx512_bf16"]}
    xeon = {"cpu": "Intel Xeon", "isa": ["avx2", "avx512f", "amx_tile", "amx_bf16"]}
    rows = {"teacher": {"model": "teacher"},
            "a": {"model": "a", "measured_on": epyc, "sentences_per_s": 130.0, "teacher_sentences_per_s": 34.0},
            "b": {"model": "b", "measured_on": xeon, "sentences_per_s": 221.0, "teacher_sentences_per_s": 76.0},
            "c": {"model": "c", "measured_on": xeon, "sentences_per_s": 150.0, "teacher_sentences_per_s": 80.0},
            "d": {"model": "d", "measured_on": zen4, "sentences_per_s": 75.0, "teacher_sentences_per_s": 37.0},
            "gone": {"model": "gone", "measured_on": epyc}}
    speeds = mpnet_distill.teacher_speeds(rows)
    assert speeds == {"AMD EPYC (AVX2)": 34.0, "Intel Xeon (AMX)": 78.0, "AMD EPYC (AVX-512)": 37.0}
    rows["teacher"]["sentences_per_s_by_machine"] = speeds
    assert mpnet_distill.speed_cell(rows["teacher"]) == (
        "34 on AMD EPYC (AVX2); 78 on Intel Xeon (AMX); 37 on AMD EPYC (AVX-512)")
    assert mpnet_distill.speed_cell(rows["b"]) == "221 (2.9x)"  # the ratio to the teacher in its own rounds
    assert mpnet_distill.speed_cell(rows["gone"]) == "-"
    # a student distilled on the EPYC but timed (with --resume) on the Xeon counts for the Xeon
    rows["a"]["timed_on"] = xeon
    assert mpnet_distill.teacher_speeds(rows) == {"Intel Xeon (AMX)": 76.0, "AMD EPYC (AVX-512)": 37.0}


def test_a_second_distillation_seed_is_a_row_and_a_student_of_its_own():
    published = json.loads((REPO / "benchmarks" / "results" / "mpnet_distill_v2.json").read_text())
    names = {row["model"] for row in published["rows"]}
    # seed 0 keeps the names the published rows carry, so --resume finds them and does not distil again
    assert mpnet_distill.student_name(3, "1,10,12", 0) == ("3 layers (1,10,12)", "3-layers-1-10-12")
    assert mpnet_distill.student_name(3, "uniform", 0)[0] in names
    assert mpnet_distill.student_name(3, "1,10,12", 0)[0] in names
    # another seed neither reuses seed 0's student folder nor overwrites its row
    second = mpnet_distill.student_name(3, "1,10,12", 1)
    assert second == ("3 layers (1,10,12) seed 1", "3-layers-1-10-12-seed1")
    first = mpnet_distill.student_name(3, "1,10,12", 0)
    assert second[0] != first[0] and second[1] != first[1]
    # the published second seed carries the seed it was distilled with; a row without the key is seed 0
    seeds = {row["model"]: row.get("distill_seed", 0) for row in published["rows"]}
    assert seeds[second[0]] == 1 and seeds[first[0]] == 0
    assert mpnet_distill.student_name(4, "uniform", 2) == ("4 layers seed 2", "4-layers-seed2")
