"""Issue 22 items 3, 6 and 8: no wrong result with exit 0. A diverged student is not exported, a
search on a slice too small for its metric is refused, a teacher with NaN weights, a damaged
config.json and a UTF-16 corpus are each told what they are."""

from __future__ import annotations

import pytest

from conftest import run_cli


def _distill(out, teacher, corpus, *extra):
    return ["distill", "--output", str(out), "--teacher", str(teacher), "--corpus", str(corpus), "--max-steps", "5",
            "--batch-size", "2", "--max-seq-len", "32", "--no-progress", *extra]


@pytest.mark.parametrize("lr, clip", [("1e30", "0"), ("1e6", "1.0")])
def test_a_diverged_student_is_not_exported(capfd, tmp_path, tiny_teacher_dir, small_corpus, lr, clip):
    """Weights of 1e30 are finite (the weights check passed them), and so are 1e6 outputs: neither ships."""
    out = tmp_path / "diverged"
    code, err = run_cli(capfd, *_distill(out, tiny_teacher_dir, small_corpus, "--lr", lr, "--clip-grad", clip))
    assert code == 2 and len(err) == 1, err
    assert f"not exporting {out}/student: the student's hidden states on a corpus batch are not finite or beyond " \
           "float16's range" in err[0] and "steps were skipped as non-finite: the run diverged; lower --lr" in err[0]
    assert not (out / "student").exists()


def test_a_healthy_run_passes_the_output_check(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    out = tmp_path / "fine"
    code, err = run_cli(capfd, *_distill(out, tiny_teacher_dir, small_corpus))
    assert code == 0 and err == [], err
    assert (out / "student" / "model.safetensors").is_file()


def test_a_teacher_with_nan_weights_is_refused_before_any_step(capfd, tmp_path, default_tokenizer, small_corpus):
    from safetensors.torch import load_file, save_file

    from conftest import make_tiny_bert

    teacher = make_tiny_bert(tmp_path / "nan-teacher", default_tokenizer)
    weights = load_file(teacher / "model.safetensors")
    key = next(k for k in sorted(weights) if "encoder.layer.2" in k and weights[k].dim() == 2)
    weights[key][1, 1] = float("nan")
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(capfd, *_distill(tmp_path / "o", teacher, small_corpus))
    assert code == 2 and len(err) == 1, err
    assert "holds non-finite values (NaN or inf): give a teacher with finite weights" in err[0], err
    assert key.split(".", 1)[-1] in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text", ['{"model_type": "bert", "hidden_size": ', '{"hidden_size": 32}'])
def test_a_local_model_with_a_damaged_config_is_named_as_local(capfd, tmp_path, tiny_teacher_dir, small_corpus, text):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "config.json").write_text(text)
    code, err = run_cli(capfd, *_distill(tmp_path / "o", teacher, small_corpus))
    assert code == 2 and len(err) == 1, err
    assert f"teacher directory {teacher}: its config.json cannot be read" in err[0], err
    assert "hub" not in err[0]


@pytest.mark.parametrize("encoding, source", [("utf-16", "utf-16"), ("utf-16-le", "utf-16le"), ("utf-16-be", "utf-16be"),
                                              ("utf-32", "utf-32"), ("cp1252", "cp1252")])
def test_a_corpus_in_another_encoding_gets_the_iconv_line_that_converts_it(capfd, tmp_path, tiny_teacher_dir,
                                                                           encoding, source):
    """("utf-16" writes a byte-order mark; "-le"/"-be" do not, and decode as UTF-8 with NULs.)"""
    corpus = tmp_path / "wiki.txt"
    corpus.write_bytes("Café au lait is a drink.\nAnother paragraph, with words.\n".encode(encoding))
    code, err = run_cli(capfd, *_distill(tmp_path / "o", tiny_teacher_dir, corpus))
    assert code == 2 and len(err) == 1, err
    assert f"e.g. iconv -f {source} -t utf-8 wiki.txt > wiki.utf8 && mv wiki.utf8 wiki.txt" in err[0], err


def test_search_refuses_a_heldout_slice_too_small_for_its_metric(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    code, err = run_cli(capfd, "search", "--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus),
                        "--data-dir", str(tmp_path), "--proxy-heldout", "1", "--output", str(tmp_path / "s"),
                        "--no-progress")
    assert code == 2 and len(err) == 1, err
    assert "--proxy-heldout 1 is too few rows to score a task on" in err[0] and "at least 100 rows" in err[0], err
    assert not (tmp_path / "s").exists()
