import copy
import json
import math
import os

import pytest
import torch

from fastkd.config import DistillConfig
from fastkd.distill import build_run, run_distill
from fastkd.errors import UserError
from fastkd.training import NonFiniteAbort, latest_checkpoint
from fastkd.losses import LossOutput
from safetensors.torch import load_file


def _cfg(tmp_path, name, teacher, corpus, **kw):
    base = dict(output=str(tmp_path / name), corpus=str(corpus), teacher=str(teacher), student_layers=2,
                max_seq_len=32, batch_size=4, max_steps=20, lr=1e-3, checkpoint_every=10, log_every=1,
                progress=False)
    base.update(kw)
    return DistillConfig(**base)


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_real_teacher_short_distillation_loss_falls(tmp_path, wikitext):
    cfg = _cfg(tmp_path, "real", "default", wikitext, student_layers=3, max_seq_len=64, batch_size=8,
               max_steps=24, lr=5e-4, checkpoint_every=100, objective="tinybert")
    student_dir = run_distill(cfg)
    rows = _metrics(tmp_path / "real")
    assert [r["step"] for r in rows] == list(range(1, 25))
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    for term in ("embedding", "hidden", "attention"):
        assert all(math.isfinite(r[term]) for r in rows)
    info = json.loads((student_dir / "fastkd.json").read_text())
    assert info["mapping"] == "2,4,6" and info["steps"] == 24 and info["teacher_layers"] == 6


@pytest.mark.parametrize("corpus_mode", ["packed", "sentences"])
def test_resume_continues_exactly(tmp_path, tiny_teacher_dropout_dir, small_corpus, corpus_mode):
    common = dict(teacher=tiny_teacher_dropout_dir, corpus=small_corpus, max_steps=20, checkpoint_every=5,
                  corpus_mode=corpus_mode)
    straight = run_distill(_cfg(tmp_path, "straight", **common))
    assert run_distill(_cfg(tmp_path, "split", stop_at_step=10, **common)) is None
    assert latest_checkpoint(tmp_path / "split").name == "step-00000010"
    if corpus_mode == "packed":  # a run saved before the corpus modes (no corpus_mode key) resumes as packed
        saved = json.loads((tmp_path / "split" / "config.json").read_text())
        del saved["config"]["corpus_mode"]
        (tmp_path / "split" / "config.json").write_text(json.dumps(saved))
        common["corpus_mode"] = "auto"
    resumed = run_distill(_cfg(tmp_path, "split", resume=True, **common))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda p: [(r["step"], r["loss"]) for r in _metrics(p)]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    # A resume changes nothing but the data position: it must not be mistaken for a different run.
    assert len(list((tmp_path / "split" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    info = json.loads((resumed / "fastkd.json").read_text())["corpus"]
    assert info["mode"] == corpus_mode
    if corpus_mode == "sentences":  # batches as long as their longest sentence, the rate counts real tokens
        rows = _metrics(tmp_path / "straight")
        per_seq = [r["tokens_per_s"] / r["seq_per_s"] for r in rows]
        assert all(0 < t <= 32.01 for t in per_seq) and min(per_seq) < 30, per_seq
        assert "sentences of at most 32 tokens" in (resumed / "README.md").read_text()
        with pytest.raises(UserError, match=r"corpus_mode \(saved 'sentences', now 'packed'\)"):
            run_distill(_cfg(tmp_path, "split", resume=True, **{**common, "corpus_mode": "packed", "max_steps": 25}))


def test_grad_accumulation_matches_one_large_batch(tmp_path, tiny_teacher_dir, small_corpus):
    grads = []
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        run = build_run(_cfg(tmp_path, name, tiny_teacher_dir, small_corpus, batch_size=batch, grad_accum=accum,
                             clip_grad=0.0, max_steps=1))
        run.engine.train_step()
        grads.append([p.grad.clone() for p in run.engine.params])
    for g_big, g_acc in zip(*grads):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-7)


def test_non_finite_steps_are_skipped_then_abort(tmp_path, tiny_teacher_dir, small_corpus):
    run = build_run(_cfg(tmp_path, "nan", tiny_teacher_dir, small_corpus, max_bad_steps=2))
    d = run.engine
    real = d.compute_loss
    poisoned = {2, 3}

    def compute_loss(batch, teacher_out):
        out = real(batch, teacher_out)
        if d.step + 1 in poisoned:
            return LossOutput(out.total * float("nan"), out.terms)
        return out

    d.compute_loss = compute_loss
    assert not d.train_step().skipped
    before = [p.detach().clone() for p in d.params]
    result = d.train_step()
    assert result.skipped and d.step == 2
    assert all(torch.equal(a, b) for a, b in zip(before, d.params))  # no update from a bad step
    assert d.stream.state.batches_done == 2
    assert d.bad_steps == 0  # counted when read (a logging step), not by a host sync every step
    assert [r.skipped for r in [d.read()]] == [True] and d.bad_steps == 1
    d.train_step()
    with pytest.raises(NonFiniteAbort, match="aborted at step 3: 2 steps had a non-finite loss"):
        d.read()


def test_a_stop_for_bad_steps_at_a_checkpoint_step_leaves_nothing_half_written(tmp_path, tiny_teacher_dir,
                                                                              small_corpus):
    from fastkd.training import train

    run = build_run(_cfg(tmp_path, "stop", tiny_teacher_dir, small_corpus, max_bad_steps=1, log_every=5,
                         checkpoint_every=2))
    d = run.engine
    real = d.compute_loss
    d.compute_loss = lambda b, t: (lambda out: LossOutput(out.total * float("nan"), out.terms) if d.step == 1
                                   else out)(real(b, t))
    with pytest.raises(NonFiniteAbort, match="aborted at step 2"):
        train(d, run.output, run.output / "metrics.jsonl")
    left = sorted(p.name for p in (run.output / "checkpoints").glob("*")) if (run.output / "checkpoints").exists() else []
    assert left == [], left  # no checkpoint of step 2, and no staging folder either
    assert d.step == 2 and d.bad_steps == 1


def test_a_checkpoint_of_the_unfused_optimizer_resumes(tmp_path, tiny_teacher_dir, small_corpus):
    """Checkpoints written before the optimizer was fused say fused=None: resuming one must still
    take the fused path (the on-device skip needs it), with the same moments."""
    run = build_run(_cfg(tmp_path, "old", tiny_teacher_dir, small_corpus))
    d = run.engine
    d.train_step()
    state = copy.deepcopy(d.state_dict())  # as torch.load would give it: nothing shared with d
    for group in state["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, None  # as torch saved the old, unfused AdamW
    fresh = build_run(_cfg(tmp_path, "new", tiny_teacher_dir, small_corpus)).engine
    fresh.load_state_dict(state)  # sets the global RNG to the checkpoint's, as d has it
    assert all(g["fused"] for g in fresh.optimizer.param_groups)
    fresh.train_step()
    torch.set_rng_state(state["rng"]["torch"])  # d's next step draws the same dropout
    d.train_step()
    assert all(torch.equal(a, b) for a, b in zip(d.params, fresh.params))


def test_a_step_never_waits_for_the_device(tmp_path, tiny_teacher_dir, small_corpus, monkeypatch):
    """No host sync in fastkd's step (losses, skip decision, grad norm, optimizer): every way of reading
    a tensor's value on the host is made to fail while the loss and update run (the models' own
    forwards are outside fastkd's control and left alone)."""
    run = build_run(_cfg(tmp_path, "nosync", tiny_teacher_dir, small_corpus, grad_accum=2))
    d = run.engine
    d.train_step()  # warm-up: the loss ops' self-checks are allowed to read values
    real_student = d.student.forward
    watching = []

    def forbidden(name):
        original = getattr(torch.Tensor, name)

        def guard(self, *args, **kwargs):
            if watching:
                raise AssertionError(f"host sync: Tensor.{name} during a step")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, guard)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        forbidden(name)

    def unwatched(fn):
        def call(*args, **kwargs):
            token = watching.pop()
            try:
                return fn(*args, **kwargs)
            finally:
                watching.append(token)
        return call

    # transformers' forwards read the mask on the host (masking_utils skips an all-ones mask).
    d.student.forward = unwatched(real_student)
    d.teacher.model.forward = unwatched(d.teacher.model.forward)
    watching.append(1)
    d.train_step()
    d.train_step()
    watching.clear()
    assert len(d.pending) == 3
    assert [r.step for r in read_all(d)] == [1, 2, 3]


def read_all(d):
    from fastkd.training import read_steps

    records = read_steps(d.pending)
    d.pending = []
    return records


def test_bf16_autocast_runs(tmp_path, tiny_teacher_dir, small_corpus):
    student = run_distill(_cfg(tmp_path, "bf16", tiny_teacher_dir, small_corpus, bf16=True, max_steps=3))
    rows = _metrics(tmp_path / "bf16")
    assert rows and all(math.isfinite(r["loss"]) for r in rows), rows
    info = json.loads((student / "fastkd.json").read_text())
    # the loss ops saw bf16 operands: autocast really ran (not a float32 run with a bf16 label)
    assert info["bf16"] is True and any("bfloat16" in str(op["dtype"]) for op in info["loss_ops"]), info["loss_ops"]


def test_narrow_student_with_projections_and_kl(tmp_path, tiny_teacher_dir, small_corpus):
    cfg = _cfg(tmp_path, "narrow", tiny_teacher_dir, small_corpus, student_hidden=16, student_heads=2, student_ffn=32,
               mapping="-,4", w_attention_kl=1.0, max_steps=4)
    run = build_run(cfg)
    assert sorted(run.engine.criterion.projections) == ["0", "2"]
    for _ in range(4):
        result = run.engine.train_step()
    assert set(result.terms) == {"embedding", "hidden", "attention", "attention_kl"}


def test_skipped_step_rows_are_strict_json_and_torn_lines_survive_resume(tmp_path, tiny_teacher_dir, small_corpus):
    from fastkd.training import train

    cfg = _cfg(tmp_path, "strict", tiny_teacher_dir, small_corpus, max_steps=4, checkpoint_every=2)
    run = build_run(cfg)
    d = run.engine
    real = d.compute_loss
    d.compute_loss = lambda b, t: (LossOutput(real(b, t).total * float("nan"), {}) if d.step == 1 else real(b, t))
    train(d, run.output, run.output / "metrics.jsonl")
    text = (run.output / "metrics.jsonl").read_text()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}")) for line in text.splitlines()]
    assert rows[1]["skipped"] is True and rows[1]["grad_norm"] is None and rows[0]["skipped"] is False
    # A crash mid-write leaves a torn last line; --resume must not trip over it.
    with open(run.output / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    import shutil

    shutil.rmtree(run.output / "checkpoints" / "step-00000004")
    resumed = build_run(_cfg(tmp_path, "strict", tiny_teacher_dir, small_corpus, max_steps=4, resume=True,
                             checkpoint_every=3))  # bookkeeping settings may change on resume
    assert resumed.engine.step == 2
    assert [json.loads(line)["step"] for line in (run.output / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_fused_loss_run_reproduces_the_reference_run(tmp_path, tiny_teacher_dir, small_corpus):
    # A narrower student with other head counts: projections, head-averaged scores and padding-free
    # packed batches, through the C++ kernels vs the torch reference, step for step.
    common = dict(teacher=tiny_teacher_dir, corpus=small_corpus, max_steps=12, student_hidden=24, student_heads=2,
                  checkpoint_every=100)
    rows = {}
    for backend in ("torch", "cpp"):
        run_distill(_cfg(tmp_path, backend, loss_backend=backend, **common))
        rows[backend] = _metrics(tmp_path / backend)
        config = json.loads((tmp_path / backend / "config.json").read_text())
        assert config["resolved"]["loss_backend"] == backend
        assert config["resolved"]["loss_ops"] == {"hidden_mse": {"float32": backend},
                                                  "attention_mse": {"float32": backend}}
        ran = json.loads((tmp_path / backend / "student" / "fastkd.json").read_text())["loss_ops"]
        assert {(r["op"], r["dtype"], r["backend"]) for r in ran} == {
            ("hidden_mse", "float32", backend), ("attention_mse", "float32", backend)}
        assert all(r["check"] == ("reference" if backend == "torch" else "passed") for r in ran), ran
    assert len(rows["cpp"]) == len(rows["torch"]) == 12
    for fused_row, ref_row in zip(rows["cpp"], rows["torch"]):
        for term in ("loss", "embedding", "hidden", "attention"):
            assert fused_row[term] == pytest.approx(ref_row[term], rel=1e-3), (fused_row["step"], term)


def test_a_compiled_run_follows_the_eager_one_and_exports_the_same_model(tmp_path, tiny_teacher_dropout_dir,
                                                                         small_corpus, monkeypatch):
    """--compile: each layer of both models through torch.compile (in place); the losses and gradient norms step
    for step as the eager run's within the compiler's rounding (the dropout seeds drawn from the run's generator,
    not inductor's), and a student whose files name nothing of the compiler."""
    from fastkd import families

    compiled = []
    real = families.compile_layers
    monkeypatch.setattr("fastkd.training.engine.compile_layers", lambda m: compiled.append(m) or real(m))
    common = dict(teacher=tiny_teacher_dropout_dir, corpus=small_corpus, max_steps=3, student_layers=1,
                  checkpoint_every=100)
    rows = {}
    for name, flag in (("eager", False), ("compiled", True)):
        student = run_distill(_cfg(tmp_path, name, compile=flag, **common))
        rows[name] = _metrics(tmp_path / name)
        assert not list(student.glob("*compile*")) and "_orig_mod" not in (student / "config.json").read_text()
    assert len(compiled) == 2  # the student and the teacher, in the compiled run only
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for m in compiled
               for layer in families.family_of(m).layers(m))
    for a, b in zip(rows["compiled"], rows["eager"]):  # the same dropout masks: only the compiler's rounding
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
    weights = [load_file(str(tmp_path / n / "student" / "model.safetensors")) for n in ("eager", "compiled")]
    assert weights[0].keys() == weights[1].keys()
    # AdamW's first steps move each weight by about +-lr whatever the gradient's size: a rounding difference in a
    # near-zero gradient may flip one, so the weights agree to 2 x lr x steps
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=2 * 1e-3 * 3) for k in weights[0])


def test_compiled_kernels_are_kept_apart_per_cpu_kind_and_isa_cap(tmp_path, monkeypatch):
    """torch 2.13's inductor reused kernels compiled without ATEN_CPU_CAPABILITY in a run capped to avx2 (its
    loss came out 1e26): fastkd gives each CPU kind and cap its own cache folder, unless the user chose one."""
    from fastkd.device import isolate_compile_cache

    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path))
    folders = []
    for cap in (None, "avx2"):
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        if cap is None:
            monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        else:
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", cap)
        folders.append(isolate_compile_cache())
        assert folders[-1].startswith(str(tmp_path / "inductor")) and folders[-1] == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert folders[0] != folders[1]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert isolate_compile_cache() is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
