"""Inputs a fault sweep found answered by tracebacks: each is one line on stderr and exit 2, before
any work (seeds numpy cannot take, paths no command can write, a mapping that begins with '-', a
hostile YAML file, a decoder given to glue), or a damage that is found and repaired (a corpus
cache corrupted inside its Arrow data, a full disk as a real small file system fills it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastkd.cli import main, parse

BEYOND = str(2 ** 32)  # numpy's legacy seeds end at 2**32 - 1

from conftest import run_cli


def _distill(out, teacher, corpus, *extra):
    return ["distill", "--output", str(out), "--teacher", str(teacher), "--corpus", str(corpus), "--max-steps", "2",
            "--batch-size", "2", "--max-seq-len", "32", "--no-progress", *extra]


# --- seeds -------------------------------------------------------------------------------------------

def test_seeds_numpy_cannot_take_are_one_line_wherever_they_come_from(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    search = ["search", "--output", str(tmp_path / "s"), "--corpus", str(small_corpus), "--data-dir", str(tmp_path),
              "--teacher", str(tiny_teacher_dir), "--no-progress"]
    config = tmp_path / "seed.yaml"
    config.write_text(f"seed: {BEYOND}\n")
    cases = [
        (_distill(tmp_path / "d", tiny_teacher_dir, small_corpus, "--seed", BEYOND), "invalid seed"),
        (["glue", "--model", str(tiny_teacher_dir), "--output", str(tmp_path / "g"), "--seed", BEYOND], "invalid seed"),
        (search + ["--seed", BEYOND], "invalid seed"),
        (["bench", "--seed", BEYOND], "invalid seed"),
        (["demo", "--data-dir", str(tmp_path), "--seed", BEYOND], "invalid seed"),
        (_distill(tmp_path / "d", tiny_teacher_dir, small_corpus, "--config", str(config)), "invalid seed"),
        (search + ["--verdict-seeds", f"5,{BEYOND}"], f"seed {BEYOND} is out of range"),
        # derived seeds: SEED + k * 1000 for k = 1, 2
        (search + ["--seed", str(2 ** 32 - 1296), "--verdict-seeds", "2"], "held-out seed 4294968000 is past"),
        (search + ["--verdict-seeds", str(10 ** 10)], "is past 4294967295"),  # refused before the list is made
    ]
    for argv, message in cases:
        code, err = run_cli(capfd, *argv)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()
    # the largest seed is taken
    assert parse(_distill(tmp_path / "d", tiny_teacher_dir, small_corpus, "--seed", str(2 ** 32 - 1))).seed == 2 ** 32 - 1


def test_the_demo_refuses_a_seed_whose_derived_seeds_overflow(capfd, tmp_path):
    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    (data / "glue").mkdir()
    code, err = run_cli(capfd, "demo", "--data-dir", str(data), "--output", str(tmp_path / "demo"),
                     "--seed", str(2 ** 32 - 10), "--no-progress")
    assert code == 2 and len(err) == 1 and "the demo derives seeds up to" in err[0], err
    assert not (tmp_path / "demo").exists()


# --- paths -------------------------------------------------------------------------------------------

def test_every_path_a_command_writes_is_checked_first(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    cases = [
        (["bench", "--teacher", str(tiny_teacher_dir), "--output", "/proc/fastkd-bench.json"], "cannot be written"),
        (["bench", "--teacher", str(tiny_teacher_dir), "--output", str(a_dir)], "is a directory"),
        (["bench", "--teacher", str(tiny_teacher_dir), "--output", str(blocker / "bench.json")], "is a file"),
        (_distill(tmp_path / "d1", tiny_teacher_dir, small_corpus, "--cache-dir", str(blocker)), "--cache-dir"),
        (_distill(tmp_path / "d2", tiny_teacher_dir, small_corpus, "--cache-dir", "/proc/fastkd-cache"), "--cache-dir"),
        (["search", "--output", str(tmp_path / "s"), "--corpus", str(small_corpus), "--data-dir", str(tmp_path),
          "--teacher", str(tiny_teacher_dir), "--cache-dir", str(blocker), "--no-progress"], "--cache-dir"),
    ]
    for argv, message in cases:
        code, err = run_cli(capfd, *argv)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert blocker.read_text() == "x" and list(a_dir.iterdir()) == []
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("d1", "d2", "s")]  # no output made for nothing


def test_paths_longer_than_the_file_system_takes_are_one_line(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    long = "x" * 300  # past NAME_MAX (255)
    for argv, message in (
        (_distill(tmp_path / long, tiny_teacher_dir, small_corpus), "a path is longer than the file system takes"),
        (_distill(tmp_path / "d", tiny_teacher_dir, tmp_path / long), "a path is longer than the file system takes"),
        (_distill(tmp_path / "d", long, small_corpus), "not a usable path or hub name"),
    ):
        code, err = run_cli(capfd, *argv)
        assert code == 2 and len(err) == 1 and message in err[0], (argv[:4], err)


# --- a mapping that begins with '-' --------------------------------------------------------------------

def test_a_mapping_beginning_with_a_dash_is_taken_as_its_value(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    for argv in (["--mapping", "-,-,4"], ["--mapping=-,-,4"]):
        assert parse(_distill(tmp_path / "d", tiny_teacher_dir, small_corpus, "--student-layers", "3", *argv)).mapping \
            == "-,-,4"
    assert parse(["bench", "--mapping", "-,2"]).mapping == "-,2"
    # ... and runs, supervising only the last student layer
    assert main(_distill(tmp_path / "run", tiny_teacher_dir, small_corpus, "--student-layers", "3",
                         "--mapping", "-,-,4")) == 0
    assert json.loads((tmp_path / "run" / "student" / "fastkd.json").read_text())["mapping"] == "-,-,4"
    # a flag where the value should be is still argparse's one line
    code, err = run_cli(capfd, *_distill(tmp_path / "x", tiny_teacher_dir, small_corpus, "--mapping", "--seed", "1"))
    assert code == 2 and len(err) == 1 and "--mapping: expected one argument" in err[0], err


# --- a hostile config file ------------------------------------------------------------------------------

def test_yaml_aliases_are_refused_before_they_expand(capfd, tmp_path):
    laughs = tmp_path / "laughs.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    laughs.write_text("\n".join(lines) + "\n")  # 9**9 strings once expanded
    code, err = run_cli(capfd, "distill", "--config", str(laughs))
    assert code == 2 and len(err) == 1 and "YAML aliases (*a, line 2) are not accepted" in err[0], err
    for name, text in (("deep.yaml", "[" * 20_000), ("deep.json", "[" * 100_000 + "]" * 100_000),
                       ("sections.json", '{"a": ' * 5_000 + "1" + "}" * 5_000)):
        (tmp_path / name).write_text(text)
        code, err = run_cli(capfd, "distill", "--config", str(tmp_path / name))
        assert code == 2 and len(err) == 1 and "nested too deeply" in err[0], (name, err)
    plain = tmp_path / "plain.yaml"  # anchors without aliases are plain YAML
    plain.write_text("batch_size: &b 4\nmax_steps: 3\n")
    args = parse(["distill", "--config", str(plain)])
    assert (args.batch_size, args.max_steps) == (4, 3)


# --- a decoder given to glue ----------------------------------------------------------------------------

def test_glue_refuses_a_model_outside_the_encoder_families_in_one_line(capfd, tmp_path, tiny_teacher_dir):
    from transformers import GPT2Config, GPT2Model

    gpt2 = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(gpt2)
    shutil.copy(tiny_teacher_dir / "tokenizer.json", gpt2)
    code, err = run_cli(capfd, "glue", "--model", str(gpt2), "--tasks", "rte", "--data-dir", str(tmp_path),
                     "--output", str(tmp_path / "g"), "--no-progress")
    assert code == 2 and len(err) == 1, err
    assert "is a gpt2 model: fastkd glue fine-tunes encoders of these families" in err[0]


# --- a corpus cache damaged inside its data -------------------------------------------------------------

def test_a_corpus_cache_damaged_inside_its_arrow_data_is_rebuilt(tmp_path, tiny_teacher_dir, small_corpus, caplog):
    from fastkd.corpus import load_corpus
    from fastkd.models import load_tokenizer

    tok = load_tokenizer(str(tiny_teacher_dir))
    first = load_corpus(str(small_corpus), tok, 32, tmp_path)
    rows = [first[i]["input_ids"] for i in range(len(first))]
    del first
    (arrow,) = (tmp_path / "corpus").glob("*/*.arrow")
    size = arrow.stat().st_size
    with open(arrow, "r+b") as f:  # header and length intact: 0xFF over the middle of the token ids
        f.seek(size // 3)
        f.write(b"\xff" * min(20_000, size // 3))
    with caplog.at_level("WARNING"):
        again = load_corpus(str(small_corpus), tok, 32, tmp_path)
    assert any("is damaged" in r.getMessage() and "changed since it was written" in r.getMessage()
               for r in caplog.records), caplog.text
    assert [again[i]["input_ids"] for i in range(len(again))] == rows
    assert max(max(r) for r in rows) < tok.vocab_size


# --- a real full disk -------------------------------------------------------------------------------------

def _on_a_small_disk(tmp_path: Path, size_kib: int, fill_kib: int, argv: list[str]) -> tuple[int, str, list[str]]:
    """Run `fastkd ARGV` with a tmpfs of `size_kib` mounted at tmp_path/disk, `fill_kib` of it taken by
    a filler file; the mount lives in a mount namespace of its own (unshare), so the test needs no
    privileges beyond what unshare grants and leaves no mount behind. Returns (exit code, stderr,
    what the disk held afterwards)."""
    root = os.geteuid() == 0  # CI runs as root: there a small file system can always be made, so never skipped
    if shutil.which("unshare") is None:
        assert not root, "unshare (util-linux) is missing: the real full-disk tests need it"
        pytest.skip("unshare (util-linux) is not installed: no small real file system can be made here")
    disk = tmp_path / "disk"
    disk.mkdir()
    listing = tmp_path / "listing.txt"
    script = (f'mount -t tmpfs -o size={size_kib}k tmpfs "$1" || exit 90; '
              f'head -c {fill_kib * 1024} /dev/zero > "$1/filler"; shift; '
              f'"$@"; rc=$?; (cd "{disk}" && find . -mindepth 1 | sort) > "{listing}"; exit $rc')
    namespace = ["unshare", "--mount"] + ([] if root else ["--map-root-user"])
    proc = subprocess.run([*namespace, "sh", "-c", script, "sh", str(disk), sys.executable, "-m", "fastkd", *argv],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 90 or "unshare failed" in proc.stderr:
        assert not root, f"root could not mount a tmpfs in a mount namespace: {proc.stderr.strip()[-200:]}"
        # An unprivileged user without user namespaces: the injected-ENOSPC tests still run (test_robustness).
        pytest.skip(f"no tmpfs can be mounted here: {proc.stderr.strip()[-200:]}")
    return proc.returncode, proc.stderr, listing.read_text().split()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and " INFO " not in line and " WARNING " not in line]


def test_a_real_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_staging(tmp_path, tiny_teacher_dir,
                                                                                small_corpus):
    # The checkpoint (student, Adam moments: ~12 MB) meets a 4 MB disk; config.json still fits.
    out = tmp_path / "disk" / "run"
    code, stderr, left = _on_a_small_disk(tmp_path, 4096, 3000, _distill(
        out, tiny_teacher_dir, small_corpus, "--checkpoint-every", "1", "--cache-dir", str(tmp_path / "cache")))
    err = _error_lines(stderr)
    assert code == 2 and len(err) == 1 and "no space left on device writing" in err[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not [p for p in left if "tmp" in p or p.endswith("state.pt")], left  # no half-written checkpoint


def test_a_real_full_disk_under_the_corpus_cache_is_one_line(tmp_path, tiny_teacher_dir, small_corpus):
    code, stderr, left = _on_a_small_disk(tmp_path, 1024, 1020, _distill(
        tmp_path / "out", tiny_teacher_dir, small_corpus, "--cache-dir", str(tmp_path / "disk" / "cache")))
    err = _error_lines(stderr)
    assert code == 2 and len(err) == 1 and "no space left on device writing" in err[0] and "--cache-dir" in err[0], \
        stderr[-3000:]
    assert not [p for p in left if ".build-" in p], left  # the build folder went with the failure


def test_a_real_full_disk_under_a_new_search_store_is_said_as_such(tmp_path, tiny_teacher_dir, small_corpus):
    """Issue 22 item 8: not "not a usable fastkd search store ... remove it" (nothing is wrong with it)."""
    fixtures = Path(__file__).parent / "fixtures" / "glue"
    code, stderr, _ = _on_a_small_disk(tmp_path, 64, 60, [  # (room for the lock file, not for the store)
        "search", "--teacher", str(tiny_teacher_dir), "--student-layers", "2", "--corpus", str(small_corpus),
        "--data-dir", str(fixtures), "--proxy-tasks", "wnli", "--ladder", "full", "--output", str(tmp_path / "disk" / "s"),
        "--no-progress"])
    err = _error_lines(stderr)
    assert code == 2 and len(err) == 1, stderr[-3000:]
    assert f"no space left on device for the search store {tmp_path}/disk/s/search.sqlite: free some space" in err[0]


def test_what_counts_as_a_full_disk(tmp_path, monkeypatch):
    """torch.save's words ("unexpected pos") count as a full disk only when the disk there takes no
    more bytes; other errors on a full disk, and short writes on a disk with room, stay themselves."""
    import errno as errnos

    from fastkd import io

    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert io.is_full_disk(OSError(errnos.ENOSPC, "No space left on device"))
    assert io.is_full_disk(OSError(errnos.EDQUOT, "Disk quota exceeded"))
    assert io.is_full_disk(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not io.is_full_disk(short)  # no place to ask
    assert not io.is_full_disk(short, tmp_path / "state.pt")  # this disk has room
    monkeypatch.setattr(io, "_cannot_write_more", lambda folder: True)
    assert io.is_full_disk(short, tmp_path / "state.pt")
    assert not io.is_full_disk(RuntimeError("a bug in the exporter"), tmp_path / "state.pt")
    assert not io.is_full_disk(ValueError("unexpected pos"), tmp_path / "state.pt")


# --- issue 22: outputs never overwritten, diverged models never scored ---------------------------------

def test_search_and_glue_refuse_an_output_that_holds_something_else(capfd, tmp_path, tiny_teacher_dir, small_corpus):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("my notes")
    (notes / "glue.md").write_text("my table")
    distilled = tmp_path / "distilled"
    assert main(_distill(distilled, tiny_teacher_dir, small_corpus)) == 0
    searched = tmp_path / "searched"
    searched.mkdir()
    (searched / "search.sqlite").write_bytes(b"")  # what marks a search run's folder
    search = ["search", "--corpus", str(small_corpus), "--data-dir", str(tmp_path), "--teacher", str(tiny_teacher_dir),
              "--no-progress", "--output"]
    glue = ["glue", "--model", str(tiny_teacher_dir), "--tasks", "rte", "--data-dir", str(tmp_path), "--no-progress",
            "--output"]
    for argv, said in ((search + [str(notes)], "holds files that are not a fastkd search run (glue.md, report.md)"),
                       (glue + [str(notes)], "holds files that are not a fastkd glue run (glue.md, report.md)"),
                       (search + [str(distilled)], "holds a fastkd distill run, not a search run"),
                       (glue + [str(searched)], "holds a fastkd search run, not a glue run")):
        code, err = run_cli(capfd, *argv)
        assert code == 2 and len(err) == 1 and said in err[0], (argv[0], err)
    assert (notes / "report.md").read_text() == "my notes" and (notes / "glue.md").read_text() == "my table"
    assert sorted(p.name for p in notes.iterdir()) == ["glue.md", "report.md"]  # not even a lock was left


def test_glue_refuses_a_model_with_non_finite_weights(capfd, tmp_path, default_tokenizer):
    from safetensors.torch import load_file, save_file

    from conftest import make_tiny_bert

    model = make_tiny_bert(tmp_path / "nan-model", default_tokenizer)
    weights = load_file(model / "model.safetensors")
    key = next(k for k in sorted(weights) if "encoder.layer.1" in k and weights[k].dim() == 2)
    weights[key][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(capfd, "glue", "--model", str(model), "--tasks", "rte", "--data-dir", str(tmp_path),
                        "--output", str(tmp_path / "g"), "--no-progress")
    assert code == 2 and len(err) == 1 and f"weight {key} in model.safetensors holds non-finite values" in err[0], err


# --- issue 22 item 7: nothing silently accepted -----------------------------------------------------------

@pytest.mark.parametrize("command, name, text, key", [
    ("distill", "twice.json", '{"batch_size": 4, "max_steps": 3, "batch_size": 8}', "batch_size"),
    ("distill", "twice.yaml", "batch_size: 4\nmax_steps: 3\nbatch_size: 8\n", "batch_size"),
    ("search", "section.json", '{"proxy": {"steps": 5, "steps": 6}}', "steps"),
    ("search", "section.yaml", "proxy:\n  steps: 5\n  steps: 6\n", "steps"),
    ("search", "sections.yaml", "proxy:\n  steps: 5\nproxy:\n  batch_size: 2\n", "proxy"),
])
def test_a_key_given_twice_in_a_config_file_is_refused(capfd, tmp_path, command, name, text, key):
    config = tmp_path / name
    config.write_text(text)
    code, err = run_cli(capfd, command, "--config", str(config))
    assert code == 2 and len(err) == 1, err
    assert f"--config {config}" in err[0] and f"{key} is given twice" in err[0], err


def test_two_config_flags_are_refused(capfd, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("batch_size: 4\n")
    second.write_text("max_steps: 3\n")
    for argv in (["--config", str(first), "--config", str(second)], [f"--config={first}", f"--config={second}"]):
        code, err = run_cli(capfd, "distill", *argv)
        assert code == 2 and len(err) == 1 and err[0].startswith("fastkd distill: error: --config given twice"), err
        assert str(first) in err[0] and str(second) in err[0], err


@pytest.mark.parametrize("value", ["-1", "inf"])
def test_bench_refuses_the_loss_weights_distill_refuses(capfd, tmp_path, tiny_teacher_dir, small_corpus, value):
    bench = ["bench", "--teacher", str(tiny_teacher_dir), "--output", str(tmp_path / "bench.json")]
    config = tmp_path / "bench.yaml"
    config.write_text(f"w_attention_kl: {'.inf' if value == 'inf' else value}\n")
    runs = [_distill(tmp_path / "d", tiny_teacher_dir, small_corpus, "--w-attention-kl", value),
            bench + ["--w-attention-kl", value], bench + ["--config", str(config)]]
    for argv in runs:
        code, err = run_cli(capfd, *argv)
        assert code == 2 and len(err) == 1 and f"--w-attention-kl must be a finite number >= 0 (got {float(value)})" \
            in err[0], (argv[0], err)
    assert not (tmp_path / "bench.json").exists()


def test_bench_refuses_an_empty_backend_list_or_item(capfd, tmp_path, tiny_teacher_dir):
    bench = ["bench", "--teacher", str(tiny_teacher_dir), "--output", str(tmp_path / "bench.json")]
    empty_list = tmp_path / "empty.yaml"
    empty_list.write_text("backends: []\n")
    for extra in (["--backends", ""], ["--backends", " "], ["--backends", "torch,,cpp"], ["--backends", ",torch"],
                  ["--config", str(empty_list)]):
        code, err = run_cli(capfd, *bench, *extra)
        assert code == 2 and len(err) == 1 and "--backends" in err[0], (extra, err)
        assert "all, auto, torch, cpp, triton, cuda" in err[0], (extra, err)
    # a one-item list read from a file (written "cpp,") and a trailing comma stay one backend
    one = tmp_path / "one.yaml"
    one.write_text("backends: [cpp]\n")
    assert parse(["bench", "--config", str(one)]).backends == ["cpp"]
    assert parse(["bench", "--backends", "torch,"]).backends == ["torch"]


def test_a_dangling_or_unreadable_txt_file_in_a_corpus_directory_is_refused(capfd, tmp_path, tiny_teacher_dir,
                                                                           small_corpus, monkeypatch):
    from fastkd import corpus
    from fastkd.errors import UserError

    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(small_corpus, folder / "a.txt")
    (folder / "b.txt").symlink_to(tmp_path / "moved-away.txt")
    code, err = run_cli(capfd, *_distill(tmp_path / "d", tiny_teacher_dir, folder))
    assert code == 2 and len(err) == 1 and f"{folder / 'b.txt'} is a broken symlink" in err[0], err
    (folder / "b.txt").unlink()
    (folder / "b.txt").symlink_to("b.txt")  # a loop is as broken
    with pytest.raises(UserError, match="b.txt is a broken symlink"):
        corpus.corpus_files(str(folder))
    (folder / "b.txt").unlink()
    (folder / "b.txt").write_text("locked\n")
    real_open = open

    def no_permission(path, *args, **kwargs):  # chmod 000 means nothing to root, who runs CI here
        if Path(path).name == "b.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    from fastkd.corpus import text

    monkeypatch.setattr(text, "open", no_permission, raising=False)
    with pytest.raises(UserError, match=r"b.txt cannot be read \(Permission denied\)"):
        corpus.corpus_files(str(folder))


def test_compile_under_deepspeed_or_for_a_hooked_family_is_one_line(capfd, tmp_path, tiny_teacher_dir, small_corpus,
                                                                     family_teacher_dirs):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}')
    code, err = run_cli(capfd, *_distill(tmp_path / "d", tiny_teacher_dir, small_corpus, "--compile",
                                         "--deepspeed", str(ds)))
    assert code == 2 and len(err) == 1 and "--compile with --deepspeed" in err[0], err
    code, err = run_cli(capfd, *_distill(tmp_path / "d", family_teacher_dirs["mpnet"], small_corpus, "--compile"))
    assert code == 2 and len(err) == 1 and "--compile does not support the mpnet family" in err[0], err
    code, err = run_cli(capfd, "bench", "--teacher", str(tiny_teacher_dir), "--compile", "--warmup", "0",
                        "--output", str(tmp_path / "b.json"))
    assert code == 2 and len(err) == 1 and "--compile needs --warmup of at least 1" in err[0], err
    assert not (tmp_path / "d").exists() and not (tmp_path / "b.json").exists()
