"""DeepSpeed ZeRO distillation on 2 CPU ranks (DS_ACCELERATOR=cpu, gloo), started by the deepspeed launcher.

Each run is a real multi-process job: `deepspeed --num_gpus 2 launch/fastkd_entry.py distill ...`. The
runs that finish by themselves share one launch (tests/zero_batch_entry.py runs fastkd's `main` for
each in turn on every rank): a launch's start-up is most of what a tiny run costs. Runs that are
killed, refused or resumed get launches of their own.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
ENTRY = REPO / "launch" / "fastkd_entry.py"
BATCH_ENTRY = REPO / "tests" / "zero_batch_entry.py"
DS = REPO / "launch" / "ds"


def _extensions_dir() -> str:
    """Where DeepSpeed JIT-builds an op (with -march=native) for a run: TORCH_EXTENSIONS_DIR, a cache that
    does not tell CPUs apart, so one built on an AVX512 machine would fault on an AVX2-only one sharing
    the home directory. Keyed by the CPU's flags here (kept across test runs). fastkd keeps DeepSpeed
    from building its CPU all-reduce op (fastkd.distill.zero._skip_inference_shm_op): none is built now."""
    from fastkd.ops.builder import _cpu_signature

    key = hashlib.sha256(_cpu_signature().encode()).hexdigest()[:12]
    return str(Path.home() / ".cache" / "torch_extensions" / f"fastkd-tests-{key}")


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTKD_") or k == "FASTKD_CACHE"}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PATH": f"{DEEPSPEED.parent}{os.pathsep}{env.get('PATH', '')}",
                "TORCH_EXTENSIONS_DIR": _extensions_dir(),
                # the launcher's rendezvous port: distinct per test so runs never meet
                "MASTER_PORT": str(29500 + (abs(hash(str(tmp_path))) % 2000))})
    return env


def _flags(teacher, corpus, output, **kw) -> list[str]:
    flags = {"teacher": teacher, "corpus": corpus, "student-layers": 2, "max-seq-len": 32, "batch-size": 2,
             "max-steps": 6, "lr": 1e-3, "log-every": 1, "checkpoint-every": 100, "seed": 0, "output": output}
    flags.update({k.replace("_", "-"): v for k, v in kw.items()})
    out = []
    for k, v in flags.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not None and v is not False:
            out += [f"--{k}", str(v)]
    return out + ["--no-progress"]


def _launch(tmp_path, config, flags, ranks=2, wait=True, port_offset=0):
    env = _env(tmp_path)
    env["MASTER_PORT"] = str(int(env["MASTER_PORT"]) + port_offset)
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", env["MASTER_PORT"], str(ENTRY), "distill",
           "--deepspeed", str(config)] + flags
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (66 MiB of RAM per rank) must not outlive the job.
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{env['MASTER_PORT']}_*"))
    assert not left, left
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


FAMILIES = ("distilbert", "albert", "modernbert", "deberta-v2", "mpnet")  # BERT: the other runs
EXPORT_CASES = [(2, False, False), (3, False, True), (2, True, True)]
STRAIGHT = dict(max_steps=16, checkpoint_every=2, keep_checkpoints=2)  # the kill test's uninterrupted run


class Batch:
    """The outcome of one launch running many distillations: each run's output and exit codes."""

    def __init__(self, root: Path, runs: dict, log: str, codes: list[dict], returncode: int | None, port: str):
        self.root, self.runs, self.log, self.codes, self.returncode, self.port = root, runs, log, codes, returncode, port

    def output(self, name: str) -> Path:
        rcs = [c.get(name) for c in self.codes]
        assert len(rcs) == 2 and rcs == [0, 0], (f"{name}: exit codes {rcs} per rank (None: not reached; the "
                                                 f"launch exited {self.returncode})\n" + self.log[-4000:])
        return self.runs[name][0]


@pytest.fixture(scope="module")
def zero_batch(tmp_path_factory, tiny_teacher_dir, default_tokenizer, wikitext) -> Batch:
    from conftest import make_pipeline_teacher, make_tiny_encoder, write_small_corpus

    root = tmp_path_factory.mktemp("zero-batch")
    corpus = write_small_corpus(root)  # the small_corpus fixture's text
    runs: dict[str, tuple[Path, list[str]]] = {}

    def add(name, ds, teacher=tiny_teacher_dir, **kw):
        out = root / name
        runs[name] = (out, ["distill", "--deepspeed", str(DS / ds)] + _flags(teacher, corpus, out, **kw))

    # ZeRO-3 first: the first run is the one that starts in a fresh process.
    for stage, bf16, narrow in sorted(EXPORT_CASES, key=lambda case: -case[0]):
        shape = dict(student_hidden=24, student_heads=2) if narrow else {}
        add(f"export-{stage}-{bf16}-{narrow}", f"zero{stage}.json", max_steps=4, bf16=bf16, **shape)
    add("straight", "zero2.json", **STRAIGHT)
    for model_type in FAMILIES:
        add(f"family-{model_type}", "zero3.json", make_tiny_encoder(model_type, root / f"teacher-{model_type}",
                                                                     default_tokenizer), max_steps=2)
    add("minilmv2", "zero3.json", max_steps=2, objective="minilmv2", relation_heads=8)
    add("sentence", "zero2.json", max_steps=2, objective="tinybert", w_sentence=1.0, corpus_mode="sentences")
    # a narrower student's learned projection: partitioned by ZeRO-3, its float32 master gathered for the export
    add("sentence-narrow", "zero3.json", make_pipeline_teacher(root / "pipeline-teacher", tiny_teacher_dir),
        max_steps=2, objective="sentence", corpus_mode="sentences", bf16=True, student_hidden=24, student_heads=2)
    spec = root / "runs.json"
    spec.write_text(json.dumps([{"name": k, "argv": argv} for k, (_, argv) in runs.items()]))
    env = _env(root)
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", env["MASTER_PORT"], str(BATCH_ENTRY), str(spec)]
    launch = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:  # under pytest's 600 s, so a hang is this fixture's failure with its log, not a timeout of the suite
        log, returncode = launch.communicate(timeout=480)[0], launch.returncode
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # the launcher and both ranks
        log, returncode = "the launch hung and was killed after 480 s\n" + launch.communicate()[0], None
    (root / "launch.log").write_text(log)  # each run's seconds per rank, for a look at where the time goes
    codes = [json.loads(p.read_text()) for p in sorted(root.glob("runs.json.rank*.json"))]
    return Batch(root, runs, log, codes, returncode, env["MASTER_PORT"])


def test_the_batched_launch_exits_cleanly_and_frees_its_shared_memory(zero_batch):
    assert zero_batch.returncode == 0, zero_batch.log[-4000:]
    assert [sorted(c) for c in zero_batch.codes] == [sorted(zero_batch.runs)] * 2  # every run, on both ranks
    # DeepSpeed's inference-only shared-memory all-reduce is neither compiled nor loaded (its 30-45 s build,
    # its 66 MiB /dev/shm buffer per rank); were it built, its buffers would still not outlive the job.
    said = [line for line in zero_batch.log.splitlines() if "shm_comm" in line or "built successfully" in line]
    assert not said, said
    assert not sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{zero_batch.port}_*"))


@pytest.mark.parametrize("stage,bf16,narrow", EXPORT_CASES)
def test_zero_run_exports_a_loadable_student(zero_batch, stage, bf16, narrow):
    # narrow: a student narrower than the teacher, so the losses go through learned projections
    # (which ZeRO-3 must gather for the fused hidden loss, and which bf16 keeps in 16 bits).
    from transformers import AutoModel

    out = zero_batch.output(f"export-{stage}-{bf16}-{narrow}")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    info = json.loads((out / "student" / "fastkd.json").read_text())
    assert info["deepspeed"] == {"world_size": 2, "zero_stage": stage} and info["steps"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["global_batch"] == 4
    assert config["resolved"]["deepspeed"]["config"]["bf16"]["enabled"] is bf16  # "auto" took --bf16
    model = AutoModel.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 2 and all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.hidden_size == (24 if narrow else 32)
    if bf16:  # the optimizer's float32 masters were exported, not the module's bf16 copies
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert (weights != weights.to(torch.bfloat16).float()).any()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()


def test_two_rank_zero2_matches_one_process_with_the_same_global_batch(tmp_path, zero_batch, tiny_teacher_dir):
    from fastkd.config import DistillConfig
    from fastkd.distill import run_distill

    zero2 = zero_batch.output("straight")
    run_distill(DistillConfig(output=str(tmp_path / "single"), corpus=str(zero_batch.root / "wiki-small.txt"),
                              teacher=str(tiny_teacher_dir), student_layers=2, max_seq_len=32, batch_size=4, lr=1e-3,
                              log_every=1, seed=0, progress=False, **STRAIGHT))
    zero, single = _metrics(zero2), _metrics(tmp_path / "single")
    assert len(zero) == len(single) == STRAIGHT["max_steps"]
    for z, s in zip(zero, single):
        for term in ("loss", "embedding", "hidden", "attention"):
            assert z[term] == pytest.approx(s[term], rel=2e-4), (z["step"], term, z[term], s[term])
    a = load_file(zero2 / "student" / "model.safetensors")
    b = load_file(tmp_path / "single" / "student" / "model.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)
            if any("fastkd_entry.py" in part for part in p.cmdline()) and "--local_rank=1" in " ".join(p.cmdline())]


def _complete_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/fastkd-complete"))


def test_kill_9_then_sigterm_of_a_rank_then_resume_reaches_the_uninterrupted_parameters(tmp_path, zero_batch,
                                                                                        tiny_teacher_dir):
    """One run, interrupted twice as a cluster does it: kill -9 of rank 1, then --resume, whose rank 1
    gets SIGTERM (what a scheduler sends: every rank checkpoints at the same step and stops with one
    line), then --resume to the end: the weights are bit-identical to the uninterrupted run's."""
    straight = zero_batch.output("straight")
    corpus = zero_batch.root / "wiki-small.txt"
    out = tmp_path / "interrupted"
    flags = _flags(tiny_teacher_dir, corpus, out, **STRAIGHT)
    last = STRAIGHT["max_steps"]

    def interrupt(job, sig, after: int) -> str:
        """Send `sig` to rank 1 once a checkpoint past step `after` is complete; the launcher's log."""
        try:
            deadline = time.time() + 300
            while time.time() < deadline and job.poll() is None:
                if any(step > after for step in _complete_steps(out)):
                    break
                time.sleep(0.1)
            if job.poll() is not None:
                raise AssertionError("the run ended before the signal: " + job.communicate()[0][-2000:])
            assert any(step > after for step in _complete_steps(out)), f"no checkpoint past step {after} in 300 s"
            victims = _rank_pids(job)
            assert victims, "rank 1 not found among the launcher's children"
            os.kill(victims[0], sig)
            return job.communicate(timeout=300)[0]
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)

    job = _launch(tmp_path, DS / "zero2.json", flags, wait=False, port_offset=1)
    interrupt(job, signal.SIGKILL, after=2)  # a whole checkpoint past the first
    assert job.returncode != 0 and not (out / "student").exists() and _metrics(out)[-1]["step"] < last
    resumed_from = _complete_steps(out)[-1]

    job = _launch(tmp_path, DS / "zero2.json", flags + ["--resume"], wait=False, port_offset=2)
    log = interrupt(job, signal.SIGTERM, after=resumed_from)
    assert f"(step {resumed_from})" in log, log[-3000:]  # continued from the kill's checkpoint, not from 0
    # Both ranks write the line at once: they may share one line of the launcher's merged output.
    stops = re.findall(r"fastkd distill: stopped by SIGTERM after step (\d+):", log)
    assert len(stops) == 2 and len(set(stops)) == 1, log[-3000:]  # both ranks, one step
    stopped_at = int(stops[0])
    assert resumed_from < stopped_at < last and stopped_at in _complete_steps(out)
    assert not (out / "student").exists()

    final = _launch(tmp_path, DS / "zero2.json", flags + ["--resume"], port_offset=3)
    assert f"(step {stopped_at})" in final.stdout + final.stderr  # from the SIGTERM's checkpoint, not from 0
    assert [r["step"] for r in _metrics(out)] == list(range(1, last + 1))
    a = load_file(straight / "student" / "model.safetensors")
    b = load_file(out / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_bad_corpus_stops_every_rank_with_one_line(tmp_path, tiny_teacher_dir):
    # Rank 0 finds the problem; the other rank must not be left waiting for it.
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    env = _env(tmp_path)
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", env["MASTER_PORT"], str(ENTRY), "distill",
           "--deepspeed", str(DS / "zero2.json")] + _flags(tiny_teacher_dir, corpus, tmp_path / "out")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert text.count("fastkd distill: error:") == 2 and "UTF-8" in text, text[-3000:]
    assert "Traceback" not in text


def test_a_config_whose_batch_disagrees_with_the_flags_is_one_line(tmp_path, tiny_teacher_dir, small_corpus, capfd,
                                                                     monkeypatch):
    # Refused before any process group exists (in this process: nothing distributed is started).
    from fastkd.cli import main

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    capfd.readouterr()
    assert main(["distill", "--deepspeed", str(bad)] + _flags(tiny_teacher_dir, small_corpus, tmp_path / "out",
                                                               batch_size=4)) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("fastkd distill: error: --deepspeed") and "train_micro_batch_size_per_gpu" in lines[-1]
    assert "Traceback" not in err and not torch.distributed.is_initialized()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_zero3_distils_every_family(zero_batch, model_type):
    """ZeRO-3 partitions every parameter: the score hooks (DeBERTa, MPNet), ALBERT's one layer used
    at every application and ModernBERT's windows must all work on gathered weights, and the
    export rebuilds the family's student."""
    from transformers import AutoModel

    out = zero_batch.output(f"family-{model_type}")
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    assert all(math.isfinite(r["attention"]) for r in _metrics(out))
    model = AutoModel.from_pretrained(out / "student")
    assert model.config.model_type == model_type and model.config.num_hidden_layers == 2


def test_zero_distils_with_the_sentence_term_on_one_sentence_per_sequence(zero_batch):
    """The sentence embedding (the last layers, pooled) beside the layer-wise terms, over 2 ranks, each rank
    reading its own slice of length-bucketed sentences (padded to its own longest)."""
    out = zero_batch.output("sentence")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["sentence"]) and r["sentence"] > 0
                                                        for r in rows)
    assert all(r["tokens_per_s"] < 32 * r["seq_per_s"] for r in rows)  # sentences, not 32-token packed sequences
    info = json.loads((out / "student" / "fastkd.json").read_text())
    assert info["loss_weights"]["sentence"] == 1.0 and info["deepspeed"]["world_size"] == 2
    assert info["corpus"]["mode"] == "sentences"


def test_zero_exports_a_narrower_students_sentence_projection_as_its_pipelines_dense(zero_batch):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    out = zero_batch.output("sentence-narrow")
    info = json.loads((out / "student" / "fastkd.json").read_text())
    assert info["sentence_dense"] == "24 -> 32, learned with the sentence term"
    assert info["sentence_pipeline"] == "Transformer -> Pooling (mean) -> Dense -> Normalize"
    weight = load_file(out / "student" / "sentence_dense" / "model.safetensors")["linear.weight"]
    # whole (not a rank's partition) and the optimizer's float32 master, not the module's bf16 copy
    assert weight.shape == (32, 24) and (weight != weight.to(torch.bfloat16).float()).any()
    model = SentenceTransformer(str(out / "student"), device="cpu")
    assert model.encode(["A chef is playing a guitar."], convert_to_numpy=True).shape == (1, 32)


def test_zero_distils_with_the_minilmv2_objective(zero_batch):
    """The relation terms (Q, K and V captured, the fused KL) under ZeRO-3's partitioned parameters."""
    out = zero_batch.output("minilmv2")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["relation"]) for r in rows)
    info = json.loads((out / "student" / "fastkd.json").read_text())
    assert info["objective"] == "minilmv2" and info["relation_heads"] == 8
