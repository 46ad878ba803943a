"""`auto` picks the fastest backend that passes its self-check, timed on the run's shapes (fastkd.ops.select)."""

import json
import logging

import pytest
import torch

from fastkd.cli import main
from fastkd.losses import DistillLoss, LossWeights, RunShapes
from fastkd.mapping import LayerMapping
from fastkd.ops import backends, select

SHAPES = RunShapes(batch=2, seq=24, student_hidden=32, student_heads=4, teacher_hidden=48, teacher_heads=4)


@pytest.fixture
def fresh_selection(monkeypatch, tmp_path):
    """Nothing decided in this process, and an empty store of this machine's timed choices."""
    monkeypatch.setattr(backends, "_chains", {})
    monkeypatch.setattr(select, "_selected", {})
    monkeypatch.setattr(select, "_pinned", {})
    monkeypatch.setattr(select, "_store_dir", lambda: tmp_path / "auto-backends" / "machine")


def tinybert_loss(backend="auto"):
    torch.manual_seed(0)
    return DistillLoss(LayerMapping((2, 4), 4), 32, 48, LossWeights(hidden=1.0, attention=1.0), backend=backend)


def fake_times(monkeypatch, ms: dict[str, float], calls: list | None = None):
    def timed(op, backend, cases, device):
        if calls is not None:
            calls.append((op, backend))
        return ms[backend]
    monkeypatch.setattr(select, "time_backend", timed)


@pytest.mark.parametrize("fastest", ["cpp", "torch"])
def test_auto_runs_the_backend_that_timed_fastest_and_records_the_timings(monkeypatch, fresh_selection, fastest):
    fake_times(monkeypatch, {"cpp": 1.0, "torch": 2.0} if fastest == "cpp" else {"cpp": 3.0, "torch": 2.0})
    loss = tinybert_loss()
    chosen = loss.prepare(torch.device("cpu"), [torch.float32], SHAPES)
    assert chosen == {"hidden_mse": {"float32": fastest}, "attention_mse": {"float32": fastest}}
    records = loss.selections()
    assert {r["op"] for r in records} == {"hidden_mse", "attention_mse"}
    for r in records:
        assert r["backend"] == fastest and r["shape"].startswith(SHAPES.label()) and set(r["timings_ms"]) == {"cpp", "torch"}
        assert r["check"] == ("passed" if fastest == "cpp" else "reference")
    # the steps run what was chosen: the loss's calls find the decision for its shapes
    hs, ht = torch.randn(2, 24, 32, requires_grad=True), torch.randn(2, 24, 48)
    mask = torch.ones(2, 24, dtype=torch.long)
    assert torch.isfinite(loss._hidden_term(hs, ht, mask, 2))  # (through layer 2's 32 -> 48 projection)
    assert [(r["op"], r["backend"]) for r in loss.ran_on()] == [("hidden_mse", fastest)]


def test_auto_is_untimed_without_shapes_and_a_backend_asked_for_by_name_is_never_timed(monkeypatch, fresh_selection):
    calls = []
    fake_times(monkeypatch, {"cpp": 5.0, "torch": 1.0}, calls)
    assert tinybert_loss().prepare(torch.device("cpu"), [torch.float32]) == {
        "hidden_mse": {"float32": "cpp"}, "attention_mse": {"float32": "cpp"}}  # auto_order's first
    assert tinybert_loss("cpp").prepare(torch.device("cpu"), [torch.float32], SHAPES)["attention_mse"] == {
        "float32": "cpp"}
    assert calls == []
    # each set of shapes is decided on its own
    tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES)
    wider = RunShapes(batch=2, seq=48, student_hidden=32, student_heads=4, teacher_hidden=48, teacher_heads=4)
    tinybert_loss().prepare(torch.device("cpu"), [torch.float32], wider)
    assert sorted(calls) == sorted([(op, b) for op in ("hidden_mse", "attention_mse") for b in ("cpp", "torch")] * 2)


def test_a_backend_failing_its_check_is_never_timed_nor_chosen(monkeypatch, fresh_selection, caplog):
    calls = []
    fake_times(monkeypatch, {"cpp": 0.1, "torch": 1.0}, calls)
    monkeypatch.setattr(select, "check", lambda op, backend, *a: "loss off by 1e0" if backend == "cpp" else None)
    with caplog.at_level(logging.WARNING):
        chosen = tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES)
    assert chosen["attention_mse"] == {"float32": "torch"} and calls == []
    assert all(r["check"].startswith("reference after cpp: loss off") for r in select.selections())


def test_timing_reads_real_backends_on_the_run_shapes_without_touching_any_grad(fresh_selection):
    loss = tinybert_loss()
    timing = loss._timing("hidden_mse", SHAPES)
    cases = timing.cases(torch.device("cpu"), torch.float32, torch.float32, torch.Generator().manual_seed(0))
    (hs, ht, mask, projection), grad_idx = cases[0]
    assert hs.shape == (2, 24, 32) and ht.shape == (2, 24, 48) and projection.weight.shape == (48, 32)
    for backend in ("cpp", "torch"):
        ms = select.time_backend("hidden_mse", backend, cases, torch.device("cpu"))
        assert 0 < ms < 10_000
    assert projection.weight.grad is None  # autograd.grad: nothing accumulated in the module's parameters
    # attention cases at the run's head shapes; a relation loss adds its Q, K, V relations to the KL op's
    (qs, ks, qt, kt, *_), _ = loss._timing("attention_mse", SHAPES).cases(
        torch.device("cpu"), torch.float32, torch.float32, torch.Generator().manual_seed(0))[0]
    assert qs.shape == (2, 4, 24, 8) and qt.shape == (2, 4, 24, 12)
    minilm = DistillLoss(LayerMapping((4,), 4), 32, 48, LossWeights(attention_kl=1.0, relation=1.0), relation_heads=8)
    kl = minilm._timing("attention_kl", SHAPES).cases(torch.device("cpu"), torch.float32, torch.float32,
                                                       torch.Generator().manual_seed(0))
    assert len(kl) == 4 and kl[1][0][0].shape == (2, 8, 24, 4) and kl[1][0][2].shape == (2, 8, 24, 6)
    # what is timed is in the label: another relation set at the same sizes is decided on its own
    labels = {DistillLoss(LayerMapping((4,), 4), 32, 48, LossWeights(**w), relation_heads=r)._timing(
        "attention_kl", SHAPES).shape for w, r in (({"attention_kl": 1.0, "relation": 1.0}, 8),
                                                    ({"attention_kl": 1.0, "relation": 1.0}, 4),
                                                    ({"relation": 1.0}, 8), ({"attention_kl": 1.0, "value_kl": 1.0}, 8))}
    assert len(labels) == 4


def test_a_pinned_choice_is_kept_without_timing(monkeypatch, fresh_selection):
    calls = []
    fake_times(monkeypatch, {"cpp": 1.0, "torch": 2.0}, calls)
    select.pin([{"op": "attention_mse", "requested": "auto", "device": "cpu", "dtype": "float32", "backend": "torch",
                 "timings_ms": {"cpp": 3.0, "torch": 2.0}, "decided": "timed"}])
    chosen = tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES)
    assert chosen == {"hidden_mse": {"float32": "cpp"}, "attention_mse": {"float32": "torch"}}
    assert calls == [("hidden_mse", "cpp"), ("hidden_mse", "torch")]
    assert [r["decided"] for r in select.selections()] == ["timed", "resumed"]
    # a later pin replaces the earlier ones (one process, several runs: no run inherits another's pins)
    select.pin([])
    assert tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES)["attention_mse"] == {
        "float32": "cpp"}
    assert [r["decided"] for r in select.selections()] == ["stored", "timed"]  # hidden_mse timed above


def test_a_distillation_times_its_ops_records_them_and_its_resume_keeps_the_choice(
        monkeypatch, fresh_selection, tmp_path, tiny_teacher_dir, small_corpus):
    calls = []
    fake_times(monkeypatch, {"cpp": 2.0, "torch": 1.0}, calls)
    common = ["--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus), "--student-layers", "2",
              "--objective", "tinybert", "--max-seq-len", "32", "--batch-size", "4", "--max-steps", "4",
              "--cache-dir", str(tmp_path / "c"), "--no-progress", "--checkpoint-every", "2",
              "--output", str(tmp_path / "run")]
    assert main(["distill", *common, "--stop-at-step", "2"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert saved["loss_ops"] == {"hidden_mse": {"float32": "torch"}, "attention_mse": {"float32": "torch"}}
    assert {r["op"]: r["backend"] for r in saved["loss_selections"]} == {"hidden_mse": "torch", "attention_mse": "torch"}
    assert all(r["timings_ms"] == {"cpp": 2.0, "torch": 1.0} and r["shape"].startswith("B4 x S32")
               for r in saved["loss_selections"])
    # A fresh process resumes (nothing decided yet, the machine's store gone), and cpp now times faster:
    # the start's choice stays.
    monkeypatch.setattr(select, "_selected", {})
    for entry in select._store_dir().glob("*.json"):
        entry.unlink()
    calls.clear()
    fake_times(monkeypatch, {"cpp": 1.0, "torch": 2.0}, calls)
    assert main(["distill", *common, "--resume"]) == 0
    assert calls == []
    info = json.loads((tmp_path / "run" / "student" / "fastkd.json").read_text())
    assert {r["op"]: r["backend"] for r in info["loss_ops"]} == {"hidden_mse": "torch", "attention_mse": "torch"}
    resumed = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["loss_selections"]
    assert all(r["decided"] == "resumed" and r["backend"] == "torch" for r in resumed)


def test_bench_times_auto_as_a_row_of_its_own_naming_what_it_picked(fresh_selection, tmp_path, tiny_teacher_dir):
    from fastkd.bench import markdown

    out = tmp_path / "bench.json"
    assert main(["bench", "--teacher", str(tiny_teacher_dir), "--student-layers", "2", "--batch-size", "2",
                 "--seq-len", "16", "--steps", "1", "--warmup", "0", "--backends", "auto,cpp",
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["backend"] for r in result["rows"]] == ["torch", "cpp", "auto"]
    auto = result["rows"][-1]
    assert set(auto["ran_on"]) == {"hidden_mse", "attention_mse"} and not auto["fell_back"]
    for op, picked in auto["ran_on"].items():  # the fastest of its own timings
        timings = auto["timings_ms"][f"{op} float32"]
        assert set(timings) == {"cpp", "torch"} and picked == min(timings, key=timings.get)
    assert "| auto (ran: hidden_mse on" in markdown(result)


def test_bench_profile_lists_each_rows_costliest_ops(tmp_path, tiny_teacher_dir):
    from fastkd.bench import markdown

    out = tmp_path / "bench.json"
    assert main(["bench", "--teacher", str(tiny_teacher_dir), "--student-layers", "2", "--batch-size", "2",
                 "--seq-len", "16", "--steps", "1", "--warmup", "0", "--backends", "cpp", "--profile", "2",
                 "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]  # (the torch reference always runs too)
    assert all("profile" in r for r in rows)
    row = next(r for r in rows if r["backend"] == "cpp")
    ops = row["profile"]
    assert 0 < len(ops) <= 15 and all(p["ms_per_step"] > 0 and 0 < p["share"] <= 1 for p in ops)
    assert [p["ms_per_step"] for p in ops] == sorted((p["ms_per_step"] for p in ops), reverse=True)
    assert any("mm" in p["op"] for p in ops)  # the models' GEMMs are among a step's costliest ops
    assert "profile of cpp (self time per step):" in markdown({"rows": [row]})
    # no --profile: no profile
    assert main(["bench", "--teacher", str(tiny_teacher_dir), "--student-layers", "2", "--batch-size", "2",
                 "--seq-len", "16", "--steps", "1", "--warmup", "0", "--backends", "cpp", "--output", str(out)]) == 0
    assert not [r for r in json.loads(out.read_text())["rows"] if "profile" in r]


def test_the_machine_store_makes_a_second_run_compute_like_the_first(monkeypatch, fresh_selection):
    calls = []
    fake_times(monkeypatch, {"cpp": 1.0, "torch": 1.01}, calls)
    first = tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES)
    assert len(calls) == 4 and len(list(select._store_dir().glob("*.json"))) == 2
    # a new process, where the noise now favours torch: it reads this machine's earlier choice
    monkeypatch.setattr(select, "_selected", {})
    calls.clear()
    fake_times(monkeypatch, {"cpp": 1.01, "torch": 1.0}, calls)
    assert tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES) == first
    assert calls == [] and {r["decided"] for r in select.selections()} == {"stored"}
    assert all(r["timings_ms"] == {"cpp": 1.0, "torch": 1.01} for r in select.selections())
    # other shapes are timed; a damaged entry is timed again and rewritten whole
    longer = RunShapes(batch=2, seq=40, student_hidden=32, student_heads=4, teacher_hidden=48, teacher_heads=4)
    tinybert_loss().prepare(torch.device("cpu"), [torch.float32], longer)
    assert len(calls) == 4 and len(list(select._store_dir().glob("*.json"))) == 4
    monkeypatch.setattr(select, "_selected", {})
    calls.clear()
    for entry in select._store_dir().glob("*.json"):
        entry.write_text("{ not json")
    assert tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES) == {
        "hidden_mse": {"float32": "torch"}, "attention_mse": {"float32": "torch"}}
    assert len(calls) == 4 and {r["decided"] for r in select.selections()} == {"timed"}
    assert sum(1 for e in select._store_dir().glob("*.json") if e.read_text().startswith("{\n")) == 2


def test_a_backend_that_raises_when_timed_at_the_run_size_is_not_chosen(monkeypatch, fresh_selection, caplog):
    def timed(op, backend, cases, device):
        if backend == "cpp":
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return 5.0
    monkeypatch.setattr(select, "time_backend", timed)
    with caplog.at_level(logging.WARNING):
        chosen = tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES)
    assert chosen == {"hidden_mse": {"float32": "torch"}, "attention_mse": {"float32": "torch"}}
    assert "the cpp backend failed when timed" in caplog.text
    assert {(r["decided"], tuple(r["timings_ms"])) for r in select.selections()} == {("timed", ("torch",))}


def test_runs_in_one_process_each_decide_for_themselves(monkeypatch, fresh_selection):
    # As `fastkd demo` or a benchmark does: several runs of the same shapes in one process, one resumed.
    def start(pins):  # what StepEngine.prepare_losses does at a run's start
        select.pin(pins)
        return tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES)

    calls = []
    fake_times(monkeypatch, {"cpp": 1.0, "torch": 2.0}, calls)
    checks = []
    real_check = select.check
    monkeypatch.setattr(select, "check", lambda *a: checks.append(a[:2]) or real_check(*a))
    assert start([])["attention_mse"] == {"float32": "cpp"}
    pins = [{**r, "backend": "torch"} for r in select.selections()]  # a run that started on torch, resumed
    assert start(pins) == {"hidden_mse": {"float32": "torch"}, "attention_mse": {"float32": "torch"}}
    assert {r["decided"] for r in select.selections()} == {"resumed"}
    assert start([]) == {"hidden_mse": {"float32": "cpp"}, "attention_mse": {"float32": "cpp"}}
    assert {r["decided"] for r in select.selections()} == {"stored"}  # the first run's timing, not the pin
    assert len(calls) == 4 and sorted(checks) == [("attention_mse", "cpp"), ("hidden_mse", "cpp")]  # checked once


def test_a_pinned_backend_that_no_longer_passes_is_said(monkeypatch, fresh_selection, caplog):
    fake_times(monkeypatch, {"cpp": 1.0, "torch": 2.0})
    with caplog.at_level(logging.WARNING):
        select.pin([{"op": "attention_mse", "requested": "auto", "device": "cpu", "dtype": "float32",
                     "backend": "cuda", "decided": "timed",
                     "shape": tinybert_loss()._timing("attention_mse", SHAPES).shape},
                    {"op": "hidden_mse", "device": "cpu", "decided": "timed"}])  # (malformed: no dtype, backend)
        chosen = tinybert_loss().prepare(torch.device("cpu"), [torch.float32], SHAPES)
    assert chosen == {"hidden_mse": {"float32": "cpp"}, "attention_mse": {"float32": "cpp"}}
    assert "started on cuda, which does not pass its check now" in caplog.text
    assert "malformed" in caplog.text


def test_a_changed_kernel_is_timed_again_not_judged_by_its_predecessors_timings(monkeypatch, tmp_path):
    # The store's folder names the backends' code: an edited csrc/ (a new fastkd commit, a local patch)
    # starts from an empty store.
    import shutil

    from fastkd.ops import builder

    source = tmp_path / "csrc"
    shutil.copytree(builder.source_dir(), source)
    monkeypatch.setattr(builder, "source_dir", lambda: source)
    before = select._store_dir()
    assert select._store_dir() == before  # the same code, the same store
    cpp = source / "fused_loss_cpu.cpp"
    cpp.write_text(cpp.read_text() + "\n// a changed kernel\n")
    assert select._store_dir() != before
