"""A step that cannot fit the machine is refused in one line before anything is allocated (issue 22,
item 5: `--batch-size 10**30` from a config file sat in one step for 10 minutes and was OOM-killed at
23.7 GB; `bench --batch-size 100000000` was OOM-killed in 20 s with no message). The refusal rests
on fastkd.memory's estimate of a step from the shapes, checked here against measured steps."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd.bench import measure_backend
from fastkd.config import BenchConfig
from fastkd.errors import UserError
from fastkd.losses import objective_weights
from fastkd.memory import StepMemory, check_step_fits, size_text, step_memory, teacher_shape
from fastkd.models import load_teacher, load_tokenizer, student_shape

from conftest import write_small_corpus

MIB = 2 ** 20
ABSURD = 100_000_000  # sequences per batch: petabytes
UNREPRESENTABLE = 10 ** 30  # a literal integer in a config file: no float, no tensor dimension holds it


# --- the estimate against real steps ----------------------------------------------------------------

@pytest.fixture(scope="module")
def default_teacher():
    return load_teacher("default"), load_tokenizer("default")


def _measured_step_mib(teacher, tokenizer, batch: int, seq_len: int) -> float:
    """What one step adds at its peak over the weights and optimizer state (bench's own measure: the
    resident-set high-water mark over the level before the timed step, on the torch reference). The
    smaller of two: a one-off allocation can only raise a peak."""
    cfg = BenchConfig(batch_size=batch, seq_len=seq_len, steps=1, warmup=1, backends=["torch"])
    return min(measure_backend("torch", teacher, tokenizer, cfg, torch.device("cpu"))["peak_extra_mib"]
               for _ in range(2))


def test_the_estimate_bounds_a_measured_step_within_a_sane_factor(default_teacher):
    teacher, tokenizer = default_teacher
    shape = student_shape(teacher.config, 3)
    estimate = step_memory(teacher.config, shape, pairs=3, seq_len=128, weights=objective_weights("tinybert"))
    measured = {b: _measured_step_mib(teacher, tokenizer, b, 128) for b in (8, 16)}
    for batch, real in measured.items():
        predicted = estimate.per_sequence * batch / MIB
        # An upper bound, but not a wild one: a looser one would refuse batches that fit.
        assert 0.9 * real <= predicted <= 2.5 * real, (batch, predicted, real)
    # Doubling the batch adds about what the estimate says a batch's activations take.
    grown = measured[16] - measured[8]
    assert 0.5 <= estimate.per_sequence * 8 / MIB / grown <= 2.0, (estimate, measured)


def test_the_counted_parameters_are_the_models_own(default_teacher):
    teacher, _ = default_teacher
    real = sum(p.numel() for p in teacher.parameters())
    assert abs(teacher_shape(teacher.config).parameters() - real) <= 0.02 * real


def test_the_fitting_batch_and_the_refusal_agree(monkeypatch):
    monkeypatch.delenv("FASTKD_MEMORY_CHECK", raising=False)
    memory = StepMemory(fixed=100 * MIB, per_sequence=10 * MIB)
    available = 1000 * MIB
    monkeypatch.setattr("fastkd.memory.available_memory", lambda device: (available, "of RAM available"))
    fits = memory.max_batch(available)
    assert memory.total(fits) <= available < memory.total(fits + 1)
    check_step_fits(memory, fits, 128, torch.device("cpu"))  # the largest batch said to fit is taken
    with pytest.raises(UserError, match=rf"at most about {fits} fits"):
        check_step_fits(memory, fits + 1, 128, torch.device("cpu"))
    # Two ranks on one machine share its RAM: each has half.
    with pytest.raises(UserError, match=rf"per rank .* 2 ranks\): lower --batch-size \(at most about "
                                        rf"{memory.max_batch(available // 2)} fits"):
        check_step_fits(memory, fits, 128, torch.device("cpu"), sharing=2)
    with pytest.raises(UserError, match="even --batch-size 1 does not fit: lower --max-seq-len"):
        check_step_fits(StepMemory(fixed=2 * available, per_sequence=1), 1, 128, torch.device("cpu"))
    monkeypatch.setenv("FASTKD_MEMORY_CHECK", "0")  # the way past an estimate that errs high
    check_step_fits(memory, fits + 1, 128, torch.device("cpu"))
    assert size_text(1536 * MIB) == "1.5 GiB"
    assert re.fullmatch(r"\d\.\d\de\+390 GiB", size_text(10 ** 400))  # a size no float holds is still said


# --- the commands refuse before allocating ----------------------------------------------------------

# The commands in one child process (an interpreter's start-up, torch and transformers included, is
# most of what a refusal costs), which says how far its resident set grew: a command that allocates
# for such a batch is stopped by the address-space limit (or the timeout) instead of filling the machine.
# Growth is measured from before the first command, so each command's is at most the number reported.
CHILD = """
import json, resource, sys, time
import torch, transformers  # the interpreter's own size, before the commands
from fastkd.cli import main
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for argv in json.loads(sys.argv[1]):
    print(MARK, file=sys.stderr, flush=True)
    t0 = time.monotonic()
    code = main(argv)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    print(f"code={code} grew_kib={grew} seconds={time.monotonic() - t0:.1f}", flush=True)
"""
MARK = "--- fastkd test: next command ---"


def _limit_address_space():
    # 6 GiB of address space: far above a refused command's (about 1.4 GiB), far below the machine.
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, tiny_teacher_dir, wikitext) -> dict:
    """Each refused command's (stderr lines, seconds, resident-set growth in MiB), by name."""
    root = tmp_path_factory.mktemp("refusals")
    corpus = write_small_corpus(root)
    (root / "huge.yaml").write_text(f"batch_size: {UNREPRESENTABLE}\n")
    # A literal integer: both parsers take it as an int (1e30 would be a float or a string, refused as such).
    (root / "huge.json").write_text(f'{{"batch_size": {UNREPRESENTABLE}}}')
    commands = {
        "distill": ["distill", "--output", str(root / "distill"), "--teacher", str(tiny_teacher_dir), "--corpus",
                    str(corpus), "--max-steps", "1", "--max-seq-len", "64", "--no-progress", "--batch-size",
                    str(ABSURD)],
        **{f"config{suffix}": ["distill", "--config", str(root / f"huge{suffix}"), "--output",
                               str(root / f"config{suffix}"), "--teacher", str(tiny_teacher_dir), "--corpus",
                               str(corpus), "--no-progress"] for suffix in (".yaml", ".json")},
        "bench": ["bench", "--teacher", str(tiny_teacher_dir), "--batch-size", str(ABSURD), "--seq-len", "64",
                  "--output", str(root / "bench.json")],
    }
    limit = None if torch.cuda.is_available() else _limit_address_space  # CUDA reserves address space
    env = {**os.environ, "FASTKD_MEMORY_CHECK": "1"}  # a user's own switch never reaches the test
    proc = subprocess.run([sys.executable, "-c", f"MARK = {MARK!r}\n" + CHILD, json.dumps(list(commands.values()))],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    before, *said = proc.stderr.split(MARK + "\n")
    said[0] = before + said[0]  # what the imports said counts against the first command's one line
    numbers = re.findall(r"code=(\S+) grew_kib=(\d+) seconds=([\d.]+)", proc.stdout)
    assert len(said) == len(numbers) == len(commands), proc.stdout + proc.stderr[-3000:]
    out = {}
    for (name, argv), text, (code, grew_kib, seconds) in zip(commands.items(), said, numbers):
        lines = [line for line in text.splitlines() if line.strip() and " INFO " not in line
                 and " WARNING " not in line and "it/s]" not in line]
        out[name] = {"code": code, "lines": lines, "seconds": float(seconds), "grew_mib": int(grew_kib) / 1024,
                     "output": Path(argv[argv.index("--output") + 1])}
    return out


def _refused(refusals: dict, name: str) -> tuple[str, float, float]:
    """The one line a refused command said (exit 2 asserted), its seconds and the growth (MiB)."""
    run = refusals[name]
    assert run["code"] == "2" and len(run["lines"]) == 1, (name, run)
    assert not run["output"].exists()  # refused before the output is made or locked
    return run["lines"][0], run["seconds"], run["grew_mib"]


def _assert_refused_without_allocating(line: str, seconds: float, grew_mib: float, batch: int, flag: str) -> None:
    assert f"--batch-size {batch} and {flag}" in line and "GiB" in line, line
    fits = int(re.search(r"at most about (\d+) fits", line).group(1))
    assert 1 <= fits < ABSURD, line
    assert seconds < 60, line  # before loading weights or data, not after minutes of swapping
    assert grew_mib < 256, (grew_mib, line)  # a tokenizer and a config, never a batch


def test_distill_refuses_a_batch_that_cannot_fit_in_one_line(refusals):
    line, seconds, grew = _refused(refusals, "distill")
    _assert_refused_without_allocating(line, seconds, grew, ABSURD, "--max-seq-len 64")
    assert line.startswith("fastkd distill: error: a distillation step"), line


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_distill_refuses_an_unrepresentable_batch_from_a_config_file(refusals, suffix):
    line, seconds, grew = _refused(refusals, f"config{suffix}")
    _assert_refused_without_allocating(line, seconds, grew, UNREPRESENTABLE, "--max-seq-len 128")


def test_bench_refuses_a_batch_that_cannot_fit_in_one_line(refusals):
    line, seconds, grew = _refused(refusals, "bench")
    _assert_refused_without_allocating(line, seconds, grew, ABSURD, "--seq-len 64")
    assert line.startswith("fastkd bench: error: a bench step"), line
