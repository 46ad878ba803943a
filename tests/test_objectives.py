"""The objectives (--objective tinybert|minilm|minilmv2): the relation terms against an independent
computation, the fused backend against the reference inside DistillLoss, real distillations whose
loss falls, the search and ZeRO taking the objective, bad input one line."""

import json
import math
import os

import pytest
import torch

from fastkd.capture import AttentionRecord
from fastkd.cli import main
from fastkd.config import DistillConfig
from fastkd.distill import run_distill
from fastkd.losses import OBJECTIVES, DistillLoss, objective_weights
from fastkd.mapping import LayerMapping
from fastkd.teacher import TeacherOutputs


def _relation_by_hand(xs, xt, mask, R):
    """MiniLMv2's relation KL written out: per relation head r, KL(softmax(Xt_r Xt_r^T / sqrt(dt_r)) ||
    softmax(Xs_r Xs_r^T / sqrt(ds_r))) over real keys, mean over relation heads and real queries."""
    total, count = 0.0, 0
    for b in range(xs.shape[0]):
        real = mask[b].bool()
        s = xs[b].transpose(0, 1).reshape(xs.shape[2], -1)[real]  # (n, Hs*ds): concatenated heads
        t = xt[b].transpose(0, 1).reshape(xt.shape[2], -1)[real]
        for r in range(R):
            sr, tr = s.chunk(R, -1)[r], t.chunk(R, -1)[r]
            log_ps = torch.log_softmax(sr @ sr.T / math.sqrt(sr.shape[-1]), -1)
            pt = torch.softmax(tr @ tr.T / math.sqrt(tr.shape[-1]), -1)
            total = total + torch.nn.functional.kl_div(log_ps, pt, reduction="sum")
            count += s.shape[0]
    return total / count


def _records(gen, B, H, S, d, grad):
    x = lambda: torch.randn(B, H, S, d, generator=gen).requires_grad_(grad)  # noqa: E731
    return AttentionRecord(x(), x(), d ** -0.5, value=x())


def test_the_relation_terms_match_a_computation_by_hand_on_every_backend():
    gen = torch.Generator().manual_seed(11)
    B, S = 2, 19
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 12:] = 0
    student = {1: _records(gen, B, 2, S, 8, True), 2: _records(gen, B, 2, S, 8, True)}
    # equal head counts (so the fused attention KL runs), other widths (relations: 16 vs 32 wide, R = 4)
    teacher = {3: _records(gen, B, 2, S, 16, False), 4: _records(gen, B, 2, S, 16, False)}
    hidden_t = {i: torch.randn(B, S, 32, generator=gen) for i in range(5)}
    hidden_s = [torch.randn(B, S, 16, generator=gen) for _ in range(3)]
    out = {}
    # triton under the interpreter on a CPU (conftest sets it where there is no GPU); with a GPU the CPU
    # tensors here cannot run it, and asserting what ran would rightly fail
    backends = ("torch", "cpp") + (("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ())
    for backend in backends:
        for objective in ("minilm", "minilmv2"):
            loss = DistillLoss(LayerMapping((3, 4), 4), 16, 32, objective_weights(objective), backend=backend,
                               relation_heads=4)
            result = loss(hidden_s, student, TeacherOutputs(hidden_t, teacher, mask))
            inputs = [student[1].query, student[1].key, student[1].value, student[2].value]
            out[backend, objective] = (result.scalars(), torch.autograd.grad(result.total, inputs, allow_unused=True))
            ran = {r["op"]: r["backend"] for r in loss.ran_on()}
            assert ran and set(ran.values()) == {backend}, (objective, ran)  # no silent fallback to torch
    pairs = [(student[1], teacher[3]), (student[2], teacher[4])]
    v2 = sum(_relation_by_hand(s.query, t.query, mask, 4) + _relation_by_hand(s.key, t.key, mask, 4)
             + _relation_by_hand(s.value, t.value, mask, 4) for s, t in pairs) / 2
    value = sum(_relation_by_hand(s.value, t.value, mask, 4) for s, t in pairs) / 2
    assert set(out["torch", "minilmv2"][0]) == {"relation"}
    assert set(out["torch", "minilm"][0]) == {"attention_kl", "value_kl"}
    for backend in backends:
        assert out[backend, "minilmv2"][0]["relation"] == pytest.approx(v2.item(), rel=1e-5)
        assert out[backend, "minilm"][0]["value_kl"] == pytest.approx(value.item(), rel=1e-5)
        assert out[backend, "minilm"][0]["attention_kl"] == pytest.approx(out["torch", "minilm"][0]["attention_kl"], rel=1e-5)
    for backend, objective in [(b, o) for b in backends[1:] for o in ("minilm", "minilmv2")]:
        for g, r in zip(out[backend, objective][1], out["torch", objective][1]):
            assert (g is None) == (r is None)
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_objectives_are_presets_the_weights_override():
    assert objective_weights("tinybert") == OBJECTIVES["tinybert"]
    w = objective_weights("minilmv2", hidden=0.5, relation=None)
    assert (w.relation, w.hidden, w.attention, w.embedding) == (1.0, 0.5, 0.0, 0.0)
    # the search's torch-free list of objectives without a layer-wise term (its --search-init refusal) agrees
    from fastkd.search.config import NO_LAYER_TERMS

    layer_wise = lambda w: any((w.hidden, w.attention, w.attention_kl, w.value_kl, w.relation))  # noqa: E731
    assert set(NO_LAYER_TERMS) == {name for name, w in OBJECTIVES.items() if not layer_wise(w)}


def _cfg(tmp_path, name, **kw):
    from conftest import WIKITEXT

    corpus = tmp_path / "wiki.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(WIKITEXT.read_text(encoding="utf-8").splitlines()[:300]) + "\n")
    base = dict(output=str(tmp_path / name), corpus=str(corpus), teacher="default", student_layers=3, max_seq_len=64,
                batch_size=8, max_steps=16, lr=5e-4, init="random", checkpoint_every=100, log_every=1, progress=False,
                student_hidden=192)
    return DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("objective,terms", [("minilm", {"attention_kl", "value_kl"}), ("minilmv2", {"relation"})])
def test_a_real_distillation_with_each_minilm_objective_falls(tmp_path, objective, terms):
    """all-MiniLM-L6-v2 -> a 3-layer, 192-wide student (6 heads against 12: R = 12 relation heads of 16 and 32)."""
    student = run_distill(_cfg(tmp_path, objective, objective=objective, loss_backend="cpp"))  # the fused path
    rows = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    assert terms <= set(rows[0]) and "attention" not in rows[0] and "hidden" not in rows[0]
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.97 * first, (first, last)
    info = json.loads((student / "fastkd.json").read_text())
    assert info["objective"] == objective and info["relation_heads"] == 12
    ran = {o["op"]: o["backend"] for o in info["loss_ops"] if o["op"] in ("attention_kl", "relation_kl")}
    expected = {"relation_kl": "cpp"}  # relation heads are alike on both sides: always the fused op
    if objective == "minilm":  # 6 student heads against 12: head-averaged distributions, on the reference
        expected["attention_kl"] = "torch (head counts differ: head-averaged distributions)"
    assert ran == expected
    assert f"objective: {objective} (12 relation heads)" in (student / "README.md").read_text()


def test_bad_objective_settings_are_one_line(tmp_path, family_teacher_dirs, small_corpus, capfd):
    common = ["--corpus", str(small_corpus), "--max-steps", "1", "--max-seq-len", "32", "--no-progress"]

    def one_line(*argv):
        assert main(["distill", *argv, *common]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    line = one_line("--teacher", str(family_teacher_dirs["bert"]), "--objective", "minilmv2", "--relation-heads", "5",
                    "--output", str(tmp_path / "a"))
    assert "--relation-heads 5 does not divide the teacher's hidden size 32" in line
    assert "--relation-heads must be at least 1" in one_line("--teacher", str(family_teacher_dirs["bert"]),
                                                            "--relation-heads", "0", "--output", str(tmp_path / "c"))
    # R without a relation term would be silently ignored: refused, naming the way to get relations
    line = one_line("--teacher", str(family_teacher_dirs["bert"]), "--relation-heads", "4", "--output", str(tmp_path / "d"))
    assert "--relation-heads 4 has no effect" in line and "--objective minilm or minilmv2" in line


def test_the_search_takes_the_objective(tmp_path, family_teacher_dirs, small_corpus):
    import sqlite3
    from pathlib import Path

    from fastkd.cli import parse_config
    from fastkd.search.run import Search

    glue = Path(__file__).parent / "fixtures" / "glue"
    out = tmp_path / "search"
    argv = ["search", "--teacher", str(family_teacher_dirs["bert"]), "--student-layers", "2", "--corpus", str(small_corpus),
            "--data-dir", str(glue), "--proxy-tasks", "wnli", "--proxy-sequences", "16", "--proxy-seq-len", "32",
            "--proxy-steps", "2", "--proxy-batch-size", "4", "--proxy-finetune-steps", "1", "--proxy-finetune-examples",
            "8", "--proxy-finetune-batch-size", "4", "--proxy-finetune-seq-len", "32", "--population", "2",
            "--generations", "1", "--ladder", "full", "--verdict-seeds", "0", "--proxy-heldout", "4",
            "--objective", "minilmv2", "--relation-heads", "8", "--output", str(out), "--no-progress"]
    search = Search(parse_config(argv)[1])
    assert search.cfg.fitness_settings()["proxy"]["objective"] == "minilmv2"  # part of what a fitness means
    result = search.run()
    with sqlite3.connect(out / "search.sqlite") as db:
        rows = dict(db.execute("SELECT mapping, fitness FROM evaluations WHERE mapping != 'teacher'"))
    assert result["winner"] in rows and all(-1.0 < f <= 1.0 for f in rows.values())
    trained = list(search.evaluator.proxy._students.values())  # (student, final losses, seconds) of the proxy students
    assert trained and all(set(losses) == {"loss", "relation"} for _, losses, _ in trained), trained


@pytest.mark.parametrize("model_type", ["deberta-v2", "mpnet"])
def test_score_hook_families_record_q_k_v_for_the_relations(model_type, family_teacher_dirs, default_tokenizer,
                                                            tmp_path, small_corpus):
    """DeBERTa and MPNet: the hooks on their Q/K/V projections record exactly what those compute on
    the layer's input (the first call: DeBERTa projects again for its relative terms), and a
    minilmv2 run trains on them."""
    from fastkd.capture import recording
    from fastkd.families import family_of, model_inputs
    from fastkd.models import load_teacher

    teacher = load_teacher(str(family_teacher_dirs[model_type]))
    batch = default_tokenizer(["a short one", "a longer sentence with a few more words"], padding=True,
                              return_tensors="pt")
    with torch.no_grad(), recording(values=True) as rec:
        hidden = teacher(**model_inputs(teacher, batch), output_hidden_states=True).hidden_states
    family = family_of(teacher)
    for layer, record in rec.records.items():
        attention = family.attention_modules(teacher)[layer - 1]
        for name, got in zip(family.projections, (record.query, record.key, record.value)):
            want = getattr(attention, name)(hidden[layer - 1])
            torch.testing.assert_close(got, want.view(*want.shape[:2], 4, -1).transpose(1, 2))
        assert record.scores is not None
    with torch.no_grad(), recording() as rec:  # without values: scores only
        teacher(**model_inputs(teacher, batch))
    assert all(r.value is None and r.query is None for r in rec.records.values())

    run_distill(DistillConfig(output=str(tmp_path / "v2"), corpus=str(small_corpus), teacher=str(family_teacher_dirs[model_type]),
                              student_layers=2, max_seq_len=32, batch_size=4, max_steps=3, lr=1e-3, progress=False,
                              log_every=1, objective="minilmv2", checkpoint_every=100))
    rows = [json.loads(line) for line in (tmp_path / "v2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["relation"]) for r in rows)


def test_a_run_saved_before_objectives_resumes(tmp_path, tiny_teacher_dir, small_corpus):
    """A config.json with explicit weights and no objective (written before objectives existed) is the
    same run as --objective tinybert; an objective that changes the weights is not."""
    from fastkd.errors import UserError

    common = dict(output=str(tmp_path / "run"), corpus=str(small_corpus), teacher=str(tiny_teacher_dir),
                  student_layers=2, max_seq_len=32, batch_size=4, lr=1e-3, checkpoint_every=2, log_every=1,
                  progress=False)
    assert run_distill(DistillConfig(max_steps=4, stop_at_step=2, **common)) is None
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    for key in ("objective", "relation_heads", "w_value_kl", "w_relation"):
        saved["config"].pop(key)
    saved["config"].update(w_embedding=1.0, w_hidden=1.0, w_attention=1.0, w_attention_kl=0.0)
    path.write_text(json.dumps(saved))
    with pytest.raises(UserError, match="loss_weights"):
        run_distill(DistillConfig(max_steps=4, resume=True, objective="minilm", **common))
    assert run_distill(DistillConfig(max_steps=4, resume=True, **common)) is not None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
