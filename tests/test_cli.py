"""Bad input: one line on stderr, exit code 2, nothing half-written."""

import subprocess
import sys

import pytest
import torch

from fastkd.cli import build_parser, main


def _run(capfd, *argv):
    code = main(list(argv))
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip() and " INFO " not in line
           and "it/s]" not in line and "examples/s]" not in line]
    return code, err


@pytest.fixture
def corpus(small_corpus):
    return str(small_corpus)


def _bad(capfd, tmp_path, *argv, teacher=None, fresh=True):
    out = tmp_path / "out"
    base = ["distill", "--output", str(out), "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "32", "--no-progress"]
    if teacher:
        base += ["--teacher", str(teacher)]
    code, err = _run(capfd, *base, *argv)
    assert code == 2, err
    assert len(err) == 1, err
    if fresh:
        # Nothing written: at most the (empty) run lock, which marks no run.
        left = [p.name for p in out.iterdir() if p.name != ".lock"] if out.exists() else []
        assert not left or (out / "notes.txt").exists(), left
    return err[0]


@pytest.mark.parametrize("mapping, message", [
    ("1,2", "has 2 entries but the student has 3"),
    ("1,2,5", "maps to teacher layer 5, but the teacher has layers 1..4"),
    ("1,two,3", "cannot parse mapping"),
])
def test_bad_mappings(capfd, tmp_path, tiny_teacher_dir, corpus, mapping, message):
    line = _bad(capfd, tmp_path, "--corpus", corpus, "--mapping", mapping, "--student-layers", "3", teacher=tiny_teacher_dir)
    assert message in line and line.startswith("fastkd distill: error:")


def test_missing_teacher_directory(capfd, tmp_path, corpus):
    assert "does not exist" in _bad(capfd, tmp_path, "--corpus", corpus, teacher=tmp_path / "no-such-teacher")


def test_student_with_another_vocabulary(capfd, tmp_path, tiny_teacher_dir, corpus):
    from transformers import BertConfig, BertModel

    other = tmp_path / "other-vocab"
    BertModel(BertConfig(vocab_size=999, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(other)
    line = _bad(capfd, tmp_path, "--corpus", corpus, "--student", str(other), "--mapping", "4", teacher=tiny_teacher_dir)
    assert "vocabulary of 999 tokens" in line


def test_empty_corpus(capfd, tmp_path, tiny_teacher_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n = Only A Heading = \n")
    assert "holds no text" in _bad(capfd, tmp_path, "--corpus", str(empty), teacher=tiny_teacher_dir)


def test_corpus_not_utf8_and_bom_is_fine(capfd, tmp_path, tiny_teacher_dir):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\nna\xefve\n".encode("latin-1"))
    assert "latin1.txt:2: not UTF-8" in _bad(capfd, tmp_path, "--corpus", str(bad), teacher=tiny_teacher_dir)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + b"A real sentence with a byte order mark in front of it.\n" * 20)
    code, err = _run(capfd, "distill", "--teacher", str(tiny_teacher_dir), "--corpus", str(bom), "--output",
                     str(tmp_path / "bom-run"), "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "32",
                     "--student-layers", "2", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "bom-run" / "student" / "config.json").exists()


def test_max_seq_len_above_position_embeddings(capfd, tmp_path, tiny_teacher_dir, corpus):
    line = _bad(capfd, tmp_path, "--corpus", corpus, "--max-seq-len", "129", teacher=tiny_teacher_dir)
    assert "exceeds the 128 tokens the teacher's position embeddings take" in line


def test_output_holding_another_run(capfd, tmp_path, tiny_teacher_dir, corpus):
    args = ["distill", "--teacher", str(tiny_teacher_dir), "--corpus", corpus, "--output", str(tmp_path / "out"),
            "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "32", "--student-layers", "2", "--no-progress"]
    assert _run(capfd, *args)[0] == 0
    line = _bad(capfd, tmp_path, "--corpus", corpus, "--student-layers", "2", "--lr", "1e-3", teacher=tiny_teacher_dir,
                fresh=False)
    assert "holds a distill run with other settings" in line and "lr" in line and "--resume" in line
    # The same settings with --resume differing only in --lr are refused, naming the setting.
    code, err = _run(capfd, *args, "--resume", "--lr", "1e-3")
    assert code == 2 and len(err) == 1 and "settings differ" in err[0] and "lr" in err[0]
    # Unchanged settings resume (here: nothing left to do but re-export).
    assert _run(capfd, *args, "--resume")[0] == 0


def test_non_empty_foreign_output(capfd, tmp_path, tiny_teacher_dir, corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "holds files that are not a fastkd distill run (notes.txt)" in _bad(capfd, tmp_path, "--corpus", corpus,
                                                                             teacher=tiny_teacher_dir)


def test_every_flag_is_explained():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0]
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.dest)


_HEAVY = ("torch", "transformers", "datasets", "deepspeed", "numpy")


@pytest.mark.parametrize("argv, expect", [
    (["--help"], None),
    (["distill", "--help"], None),
    (["search", "--help"], None),
    (["distill", "--corpus", "c", "--output", "o", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["search", "--corpus", "c", "--data-dir", "d", "--output", "o", "--promote", "2"], "--promote"),
    (["glue", "--model", "m", "--tasks", "sst2", "--data-dir", "d", "--output", "o", "--lr", "-1"], "--lr must be"),
    (["bench", "--steps", "0"], "--steps must be at least 1"),
    (["distill", "--corpus", "c", "--output", "o", "--no-such-flag"], "unrecognized arguments"),
    (["distill", "--corpus", "/no/such/corpus", "--output", "o"], "corpus /no/such/corpus not found"),
    (["search", "--corpus", "./missing.txt", "--data-dir", "d", "--output", "o"], "corpus ./missing.txt not found"),
])
def test_help_and_mistaken_values_never_import_the_heavy_libraries(tmp_path, argv, expect):
    """--help, and a flag, value or corpus path mistake, answer before torch/transformers load (the parser is built from
    light config modules; each command validates its config first): under a second, not eight."""
    probe = ("import sys\nfrom fastkd.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nheavy = [m for m in %r if m in sys.modules]\nprint('HEAVY', heavy, 'CODE', code)\n" % (_HEAVY,))
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "HEAVY [] CODE" in done.stdout, (done.stdout[-500:], done.stderr[-2000:])
    if expect is None:
        assert "CODE 0" in done.stdout and "usage" in done.stdout
    else:
        assert "CODE 2" in done.stdout and expect in done.stderr, done.stderr[-2000:]
        assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1


def runpy_main(argv: list[str]) -> int:
    """`python -m fastkd ARGV` in this process: fastkd/__main__.py run as __main__, its exit status."""
    import runpy

    old = sys.argv
    sys.argv = ["fastkd", *argv]
    try:
        runpy.run_module("fastkd", run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    return 0


def test_console_script_end_to_end(tmp_path, tiny_teacher_dir, small_corpus, capfd):
    """The installed entry point: a real run that AutoModel loads, and a bad flag as one line."""
    exe = [sys.executable, "-m", "fastkd"]
    out = tmp_path / "run"
    ok = subprocess.run(exe + ["distill", "--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus),
                               "--output", str(out), "--student-layers", "2", "--mapping", "last", "--max-steps", "3",
                               "--batch-size", "2", "--max-seq-len", "32", "--no-progress"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    from transformers import AutoModel

    assert AutoModel.from_pretrained(out / "student").config.num_hidden_layers == 2
    # A refusal and the help through the same entry point, in this process (each start costs ~6 s of imports).
    capfd.readouterr()
    assert runpy_main(["distill", "--corpus", str(small_corpus), "--output", str(tmp_path / "x"),
                       "--mapping", "9,9,9"]) == 2
    err = capfd.readouterr().err
    assert err.strip().count("\n") == 0 and "teacher has layers 1..6" in err
    assert runpy_main(["distill", "--help"]) == 0
    help_text = capfd.readouterr().out
    assert "--mapping" in help_text and "random:SEED" in help_text


@pytest.mark.parametrize("flags, message", [
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--stop-at-step", "0"], "--stop-at-step must be at least 1"),
    (["--corpus-sample", "nan"], "give a fraction in (0, 1]"),
])
def test_bad_bookkeeping_values(capfd, tmp_path, tiny_teacher_dir, corpus, flags, message):
    assert message in _bad(capfd, tmp_path, "--corpus", corpus, *flags, teacher=tiny_teacher_dir)


def test_student_dir_fixes_the_shape(capfd, tmp_path, tiny_teacher_dir, corpus):
    line = _bad(capfd, tmp_path, "--corpus", corpus, "--student", str(tiny_teacher_dir), "--student-hidden", "16",
                teacher=tiny_teacher_dir)
    assert "fixes the student's shape" in line


def test_resume_into_a_foreign_directory(capfd, tmp_path, tiny_teacher_dir, corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "holds files that are not a fastkd distill run" in _bad(capfd, tmp_path, "--corpus", corpus, "--resume",
                                                                  teacher=tiny_teacher_dir)


def test_init_layers_choose_what_the_student_copies_apart_from_what_supervises_it(capfd, tmp_path, tiny_teacher_dir,
                                                                                corpus):
    """--init-layers (sentence-transformers' layers_to_keep), or --mapping SUPERVISION@INIT, initialises the
    student from other teacher layers than the ones that supervise it; fastkd.json says both. Mistakes are one line."""
    import json

    from fastkd.config import DistillConfig
    from fastkd.distill.setup import build_models, resolve
    from fastkd.models import load_teacher

    cfg = DistillConfig(output=str(tmp_path / "o"), corpus=corpus, teacher=str(tiny_teacher_dir), student_layers=2,
                        mapping="3,4", init_layers="1,3", max_seq_len=32, progress=False, objective="tinybert")
    _, shape, mapping = resolve(cfg)
    _, _, student, _ = build_models(cfg, shape, mapping)
    teacher = load_teacher(str(tiny_teacher_dir))
    for m, g in enumerate((1, 3)):  # student layer m is a copy of teacher layer g (counted from 1), not mapping's
        got = student.encoder.layer[m].attention.self.query.weight
        assert torch.equal(got, teacher.encoder.layer[g - 1].attention.self.query.weight)
        assert not torch.equal(got, teacher.encoder.layer[mapping.layers[m] - 1].attention.self.query.weight)
    # the same run written as one mapping: the same mapping, the same student
    from dataclasses import replace

    one = replace(cfg, mapping="3,4@1,3", init_layers=None)
    assert resolve(one)[2] == mapping and mapping.text == "3,4@1,3" and mapping.pairs() == [(1, 3), (2, 4)]
    _, _, same, _ = build_models(one, shape, resolve(one)[2])
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), student.state_dict().values()))
    args = ["distill", "--teacher", str(tiny_teacher_dir), "--corpus", corpus, "--output", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "32", "--student-layers", "2", "--no-progress",
            "--mapping", "last", "--init-layers", "uniform"]
    assert _run(capfd, *args)[0] == 0
    info = json.loads((tmp_path / "run" / "student" / "fastkd.json").read_text())
    assert info["mapping"] == "3,4@2,4" and info["supervision"] == "3,4" and info["init_layers"] == "2,4"
    card = (tmp_path / "run" / "student" / "README.md").read_text()  # the model card says both roles apart
    assert "learns teacher layer g[m]: `3,4`" in card and "copy of teacher layer `2,4`[m]" in card
    for extra, message in ((["--init-layers", "1,2,3"], "--init-layers: "), (["--init-layers", "1,-"], "one teacher layer to copy"),
                           (["--init-layers", "1,2", "--init", "random"], "needs --init teacher"),
                           (["--mapping", "3,4@1,2", "--init-layers", "1,2"], "already names the initial layers"),
                           (["--mapping", "3,4@1,2", "--init", "random"], "needs --init teacher"),
                           (["--mapping", "3,4@1,-"], "every student layer needs a teacher layer to copy"),
                           (["--init-layers", "uniform@last"], "'@' is for --mapping")):
        line = _bad(capfd, tmp_path, "--corpus", corpus, "--student-layers", "2", *extra, teacher=tiny_teacher_dir)
        assert message in line, line
