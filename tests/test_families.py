"""Every encoder family (fastkd.families) on a tiny random model saved with the real tokenizer:
capture equals the family's own attention, students distil, export, reload and fine-tune, teacher
initialisation copies the mapped layers, the capture guard fires, bad input is one line."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from conftest import FAMILY_TYPES, make_tiny_encoder
from fastkd.capture import recording
from fastkd.cli import main
from fastkd.config import DistillConfig
from fastkd.distill import run_distill
from fastkd.errors import UserError
from fastkd.export import export_student
from fastkd.families import disable_capture, family_of, model_inputs
from fastkd.glue.config import FinetuneConfig
from fastkd.glue.data import TaskCache
from fastkd.glue.finetune import finetune_task
from fastkd.glue.tasks import task_spec
from fastkd.losses import DistillLoss, LossWeights
from fastkd.mapping import LayerMapping
from fastkd.models import build_student, load_teacher, student_shape
from fastkd.ops.attention_mse import pair_mask
from fastkd.teacher import Teacher
from fastkd.training import student_loss

GLUE_FIXTURES = Path(__file__).parent / "fixtures" / "glue"
SENTENCES = ["a short one", "a much longer sentence, with quite a few more tokens in it than the first"]

# Each family's per-layer weights, named from the bare encoder: (layer list prefix, a query weight in it).
LAYER_NAMES = {
    "bert": ("encoder.layer.", "attention.self.query.weight"),
    "distilbert": ("transformer.layer.", "attention.q_lin.weight"),
    "albert": (None, "encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight"),
    "modernbert": ("layers.", "attn.Wqkv.weight"),
    "deberta-v2": ("encoder.layer.", "attention.self.query_proj.weight"),
    "mpnet": ("encoder.layer.", "attention.attn.q.weight"),
}


def _batch(tokenizer):
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_captured_scores_are_the_familys_own_attention(model_type, family_teacher_dirs, default_tokenizer):
    """softmax of what fastkd records equals the family's eager attention probabilities on a padded
    batch, query row by query row; on a ModernBERT local layer only within the window."""
    path = family_teacher_dirs[model_type]
    teacher = load_teacher(str(path))
    eager = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    batch = _batch(default_tokenizer)
    mask = batch["attention_mask"]
    with torch.no_grad(), recording() as rec:
        out = teacher(**model_inputs(teacher, batch), output_hidden_states=True)
        expected = eager(**model_inputs(eager, batch), output_attentions=True).attentions
    assert sorted(rec.records) == [1, 2, 3, 4] and len(out.hidden_states) == 5
    family = family_of(teacher)
    for layer, record in rec.records.items():
        assert (record.scores is not None) == (family.capture == "scores")
        probs = torch.softmax(record.full_scores().masked_fill(~pair_mask(mask, record.window), float("-inf")), -1)
        real_queries = mask.bool()[:, None, :, None].expand_as(probs)
        torch.testing.assert_close(probs[real_queries], expected[layer - 1][real_queries], rtol=0, atol=1e-6)
    windows = [rec.records[l].window for l in (1, 2, 3, 4)]
    if model_type == "modernbert":
        # global, local, global, local; the local layers' probabilities vanish beyond |i - j| = 2
        assert windows == [None, 2, None, 2]
        far = ~pair_mask(mask, 2) & pair_mask(mask)
        assert far.any() and expected[1][far.expand_as(expected[1])].abs().max() < 1e-12
        assert expected[0][far.expand_as(expected[0])].abs().max() > 1e-3  # a global layer attends there
    else:
        assert windows == [None] * 4


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_a_teacher_runs_only_the_layers_its_losses_read_and_reads_the_full_forwards_values(
        model_type, family_teacher_dirs, default_tokenizer):
    path = family_teacher_dirs[model_type]
    batch = _batch(default_tokenizer)
    reference = load_teacher(str(path))  # another copy, never truncated
    with torch.inference_mode(), recording([2], values=True) as rec:
        full = reference(**model_inputs(reference, batch), output_hidden_states=True)
    full_records = dict(rec.records)

    model = load_teacher(str(path))  # fresh: its first forward ever is the truncated one
    family = family_of(model)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: calls.append(1)) for layer in family.layers(model)]
    teacher = Teacher(model, [0, 1, 2], [2], values=True)
    types = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in model_inputs(model, batch) else {}
    first = teacher(batch["input_ids"], batch["attention_mask"], **types)
    # (the first call adds one whole forward of two tokens: 4 layers, once per model, for the library's hooks)
    assert len(calls) == 4 + teacher.layers_run
    calls.clear()
    out = teacher(batch["input_ids"], batch["attention_mask"], **types)
    assert all(torch.equal(first.hidden[layer], out.hidden[layer]) for layer in (0, 1, 2))
    for hook in hooks:
        hook.remove()
    # 2 of the 4 layers (ModernBERT 3: its last hidden state is its final norm's output, so one layer more)
    assert teacher.layers_run == (3 if model_type == "modernbert" else 2) and len(calls) == teacher.layers_run
    for layer in (0, 1, 2):
        assert torch.equal(out.hidden[layer], full.hidden_states[layer]), layer
    got, want = out.attention[2], full_records[2]
    for field in ("query", "key", "value", "scores"):
        a, b = getattr(got, field, None), getattr(want, field, None)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), field
    # and the model is whole again: every layer, its count, its pooler, and every hidden state of a later
    # full forward (transformers collects them through hooks installed once, on a model's first forward)
    assert model.config.num_hidden_layers == 4 and len(family.layers(model)) == (1 if model_type == "albert" else 4)
    assert (getattr(model.base_model, "pooler", None) is not None) == (getattr(full, "pooler_output", None) is not None)
    with torch.inference_mode():
        again = model(**model_inputs(model, batch), output_hidden_states=True)
    assert len(again.hidden_states) == 5
    assert all(torch.equal(a, b) for a, b in zip(again.hidden_states, full.hidden_states))
    if getattr(full, "pooler_output", None) is not None:
        assert torch.equal(again.pooler_output, full.pooler_output)
    # a deeper teacher of the same model after the shallow one (the search's next chunk) reads layer 4 right
    deep = Teacher(model, [4], [])(batch["input_ids"], batch["attention_mask"], **types)
    assert torch.equal(deep.hidden[4], full.hidden_states[4])


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_a_bf16_teacher_runs_its_linears_from_one_bf16_copy_and_matches_autocast_bit_for_bit(
        model_type, family_teacher_dirs, default_tokenizer):
    """Under bf16 the teacher reads its Linear weights from a copy cast once (autocast casts them again at
    every forward): the same hidden states and attention records as plain autocast over the float32
    weights, which stay float32 and unchanged for the students built from them."""
    path = family_teacher_dirs[model_type]
    batch = _batch(default_tokenizer)
    model = load_teacher(str(path))
    types = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in model_inputs(model, batch) else {}
    before = {n: p.clone() for n, p in model.named_parameters()}
    plain = Teacher(model, [1, 2], [2], values=True)
    plain.autocast_dtype = torch.bfloat16  # autocast alone: a teacher that never built its copy
    plain.half_linears = lambda device: {}
    want = plain(batch["input_ids"], batch["attention_mask"], **types)
    teacher = Teacher(model, [1, 2], [2], autocast_dtype=torch.bfloat16, values=True)
    got = teacher(batch["input_ids"], batch["attention_mask"], **types)
    half = teacher.half_linears(torch.device("cpu"))
    assert half and all(t.dtype == torch.bfloat16 for t in half.values())
    for layer in (1, 2):
        assert got.hidden[layer].dtype == want.hidden[layer].dtype
        assert torch.equal(got.hidden[layer], want.hidden[layer]), layer
    for field in ("query", "key", "value", "scores"):
        a, b = getattr(got.attention[2], field), getattr(want.attention[2], field)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), field
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the forward reads the copy: a change to it changes the outputs
    first_layer_weight = next(n for n in half if n.endswith("weight") and ".0." in n)
    with torch.inference_mode():  # (the copy is made inside the teacher's inference mode)
        half[first_layer_weight].add_(1)
    changed = teacher(batch["input_ids"], batch["attention_mask"], **types)
    assert not torch.equal(changed.hidden[2], want.hidden[2])


def test_a_truncated_teacher_is_whole_again_after_a_failed_forward_and_never_truncated_twice(
        family_teacher_dirs, default_tokenizer):
    model = load_teacher(str(family_teacher_dirs["bert"]))
    family = family_of(model)
    layers, pooler = family.layers(model), model.base_model.pooler

    def fail(module, args):
        raise KeyboardInterrupt

    hook = layers[0].register_forward_pre_hook(fail)
    batch = _batch(default_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        Teacher(model, [2], [])(batch["input_ids"], batch["attention_mask"])
    hook.remove()
    assert family.layers(model) is layers and model.config.num_hidden_layers == 4
    assert model.base_model.pooler is pooler
    with family.first_layers(model, 2), pytest.raises(RuntimeError, match="already truncated"):
        with family.first_layers(model, 1):
            pass
    assert family.layers(model) is layers and model.config.num_hidden_layers == 4


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_a_full_teacher_initialised_student_is_the_teacher(model_type, family_teacher_dirs, default_tokenizer):
    """Every layer mapped to itself at the teacher's widths: the copied student computes exactly
    the teacher's hidden states (every weight reached its place)."""
    teacher = load_teacher(str(family_teacher_dirs[model_type]))
    student = build_student(teacher, student_shape(teacher.config, 4), "teacher", LayerMapping((1, 2, 3, 4), 4)).eval()
    batch = _batch(default_tokenizer)
    with torch.no_grad(), recording():
        got = student(**model_inputs(student, batch), output_hidden_states=True).hidden_states
        want = teacher(**model_inputs(teacher, batch), output_hidden_states=True).hidden_states
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_teacher_init_copies_the_mapped_layers_weight_by_weight(model_type, family_teacher_dirs):
    """A narrower 2-layer student mapped (4, 1): student layer 1 holds teacher layer 4's weights,
    layer 2 teacher layer 1's, each truncated to the student's widths (whole heads kept)."""
    teacher = load_teacher(str(family_teacher_dirs[model_type]))
    shape = student_shape(teacher.config, 2, hidden=16, heads=2, ffn=32)
    student = build_student(teacher, shape, "teacher", LayerMapping((4, 1), 4))
    t_state, s_state = teacher.state_dict(), student.state_dict()
    prefix, query = LAYER_NAMES[model_type]
    checked = 0
    for name, s_param in s_state.items():
        source = name
        if prefix is not None and name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            source = f"{prefix}{(4, 1)[int(index)] - 1}.{rest}"
        if source not in t_state:
            assert name.startswith("pooler") or "attn_norm" in name, name  # ModernBERT's layer 0 has no attn_norm
            continue
        t_param = t_state[source]
        parts = 3 if name.endswith("Wqkv.weight") else 2 if name.endswith("Wi.weight") else 1
        for s_part, t_part in zip(s_param.chunk(parts), t_param.chunk(parts)):
            torch.testing.assert_close(s_part, t_part[tuple(slice(0, n) for n in s_part.shape)], rtol=0, atol=0)
        checked += 1
    assert checked >= len(s_state) - 3
    if prefix is not None:  # the student's first layer is the teacher's last, not its first
        first = s_state[f"{prefix}0.{query}"][:16]  # the first 16 rows: the query heads kept
        assert torch.equal(first, t_state[f"{prefix}3.{query}"][:16, :16])
        assert not torch.equal(first, t_state[f"{prefix}0.{query}"][:16, :16])
    else:
        assert student.config.num_hidden_layers == 2 and student.config.num_hidden_groups == 1
    assert student.config.model_type == teacher.config.model_type
    if model_type == "modernbert":  # each student layer of its teacher layer's kind: layer 4 local, layer 1 global
        assert student.config.layer_types == ["sliding_attention", "full_attention"]
        assert teacher.config.layer_types == ["full_attention", "sliding_attention"] * 2


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_a_student_distils_exports_reloads_and_fine_tunes(model_type, family_teacher_dirs, default_tokenizer,
                                                          tmp_path, small_corpus):
    path = family_teacher_dirs[model_type]
    cfg = DistillConfig(output=str(tmp_path / "run"), corpus=str(small_corpus), teacher=str(path), student_layers=2,
                        max_seq_len=32, batch_size=4, max_steps=6, lr=2e-3, init="random", checkpoint_every=100,
                        log_every=1, progress=False, mapping="1,2",  # ModernBERT: a global and a local layer
                        student_hidden=16, student_heads=2,  # narrower: projections, head-averaged scores
                        loss_backend="cpp")  # (the fused path, named: auto may time the reference faster here)
    student_dir = run_distill(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    info = json.loads((student_dir / "fastkd.json").read_text())
    attention = next(r["backend"] for r in info["loss_ops"] if r["op"] == "attention_mse")
    assert attention == {"modernbert": "cpp; torch (local attention window) for the other layers",
                         "deberta-v2": "torch (full scores)", "mpnet": "torch (full scores)"}.get(model_type, "cpp")
    assert info["family"] == family_of(load_teacher(str(path))).name

    # Export: identical outputs after reloading with AutoModel, the teacher's family.
    teacher = load_teacher(str(path))
    student = build_student(teacher, student_shape(teacher.config, 2), "teacher", LayerMapping((2, 4), 4))
    with torch.no_grad():  # away from the teacher copy, so a wrong reload would show
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    target = export_student(student, default_tokenizer, tmp_path / "exported", {"mapping": "2,4"})
    assert "fastkd" not in (target / "config.json").read_text()
    batch = _batch(default_tokenizer)
    student.eval()
    reloaded = AutoModel.from_pretrained(target).eval()
    assert type(reloaded) is type(student)
    with torch.no_grad(), recording():
        want = student(**model_inputs(student, batch)).last_hidden_state
        got = reloaded(**model_inputs(reloaded, batch)).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert AutoModelForSequenceClassification.from_pretrained(target, num_labels=2)(
        **model_inputs(reloaded, batch)).logits.shape == (2, 2)

    # One GLUE fine-tuning step on the distilled (narrower) student (WNLI fixture: train and dev).
    result = finetune_task(str(student_dir), default_tokenizer, task_spec("wnli"), TaskCache(str(GLUE_FIXTURES)),
                           FinetuneConfig(max_steps=1, batch_size=4, max_seq_len=48, progress=False))
    correct = result.metrics["accuracy"] * result.dev_examples  # a count of right answers over the dev rows scored
    assert result.steps == 1 and result.dev_examples > 0 and 0 <= correct <= result.dev_examples
    assert correct == pytest.approx(round(correct), abs=1e-9)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_the_capture_guard_fires_for_every_family(model_type, family_teacher_dirs):
    teacher_model = load_teacher(str(family_teacher_dirs[model_type]))
    mapping = LayerMapping((2, 4), 4)
    student = build_student(teacher_model, student_shape(teacher_model.config, 2), "teacher", mapping)
    criterion = DistillLoss(mapping, 32, 32, LossWeights(1, 1, 1, 0))
    teacher = Teacher(teacher_model, criterion.teacher_hidden_layers(), criterion.teacher_attention_layers())
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    out = teacher(batch["input_ids"], batch["attention_mask"])
    assert torch.isfinite(student_loss(student, criterion, batch, out).total)
    disable_capture(student)
    with pytest.raises(UserError, match=rf"the student \(a {model_type} model.*recorded no attention for layers 1, 2"):
        student_loss(student, criterion, batch, out)


def test_an_interrupt_inside_a_hooked_attention_leaves_no_capture_behind(family_teacher_dirs, default_tokenizer):
    """KeyboardInterrupt skips torch's always_call hooks: `recording` itself leaves the score mode."""
    from torch.overrides import _get_current_function_mode_stack

    teacher = load_teacher(str(family_teacher_dirs["deberta-v2"]))
    batch = _batch(default_tokenizer)

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = teacher.encoder.layer[1].attention.self.value_proj.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), recording():
        teacher(**model_inputs(teacher, batch))
    handle.remove()
    assert not [m for m in _get_current_function_mode_stack() if type(m).__name__ == "_FirstSoftmaxInput"]
    assert not any("_fastkd_scores" in m.__dict__ for m in teacher.modules())
    with torch.no_grad(), recording() as rec:
        teacher(**model_inputs(teacher, batch))
    assert sorted(rec.records) == [1, 2, 3, 4]


def _one_line(capfd, argv) -> str:
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_family_inputs_are_one_line(tmp_path, family_teacher_dirs, default_tokenizer, small_corpus, capfd):
    import transformers

    common = ["--corpus", str(small_corpus), "--max-steps", "1", "--max-seq-len", "32", "--no-progress"]
    for name, config in [("gpt2", transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)),
                         ("t5", transformers.T5Config(num_layers=2, d_model=32, num_heads=2, d_kv=16, d_ff=64,
                                                      vocab_size=100))]:
        d = tmp_path / name
        config.save_pretrained(d)
        line = _one_line(capfd, ["distill", "--teacher", str(d), "--output", str(tmp_path / f"o-{name}"), *common])
        assert f"is a {name} model" in line and "DeBERTa-v2/v3 (deberta-v2)" in line and "ModernBERT" in line, line

    # A student directory of another family than the teacher's.
    line = _one_line(capfd, ["distill", "--teacher", str(family_teacher_dirs["deberta-v2"]), "--student",
                             str(family_teacher_dirs["bert"]), "--output", str(tmp_path / "o-mixed"), *common])
    assert "is a bert model but the teacher is a deberta-v2 model" in line, line

    # A mapping beyond an ALBERT teacher's 4 applications of its shared layer.
    line = _one_line(capfd, ["distill", "--teacher", str(family_teacher_dirs["albert"]), "--student-layers", "2",
                             "--mapping", "2,5", "--output", str(tmp_path / "o-albert"), *common])
    assert "teacher has layers 1..4" in line and "applications" in line, line

    # An ALBERT of several layer groups (fastkd's layer numbering would not hold).
    grouped = make_tiny_encoder("albert", tmp_path / "grouped", default_tokenizer)
    config = json.loads((grouped / "config.json").read_text())
    (grouped / "config.json").write_text(json.dumps({**config, "num_hidden_groups": 2}))
    line = _one_line(capfd, ["distill", "--teacher", str(grouped), "--output", str(tmp_path / "o-grouped"), *common])
    assert "2 layer groups" in line, line


@pytest.mark.parametrize("model_type", [t for t in FAMILY_TYPES if t != "bert"])  # BERT: test_search_run.py
def test_the_search_runs_for_every_family(model_type, family_teacher_dirs, small_corpus, tmp_path):
    """One generation of two mappings on the top rung: one shared teacher forward per batch,
    students of the family distilled and fine-tuned on the proxy task, a winner."""
    import sqlite3

    from fastkd.cli import parse_config
    from fastkd.search.run import Search

    out = tmp_path / "search"
    argv = ["search", "--teacher", str(family_teacher_dirs[model_type]), "--student-layers", "2",
            "--corpus", str(small_corpus), "--data-dir", str(GLUE_FIXTURES), "--proxy-tasks", "wnli",
            "--proxy-sequences", "16", "--proxy-seq-len", "32", "--proxy-steps", "2", "--proxy-batch-size", "4",
            "--proxy-finetune-steps", "1", "--proxy-finetune-examples", "8", "--proxy-finetune-batch-size", "4",
            "--proxy-finetune-seq-len", "32", "--population", "2", "--generations", "1", "--ladder", "full",
            "--verdict-seeds", "0", "--proxy-heldout", "4", "--output", str(out), "--no-progress"]
    result = Search(parse_config(argv)[1]).run()
    with sqlite3.connect(out / "search.sqlite") as db:
        rows = dict(db.execute("SELECT mapping, fitness FROM evaluations WHERE mapping != 'teacher'"))
    assert len(rows) >= 2 and result["winner"] in rows
    assert all(-1.0 < f <= 1.0 for f in rows.values()), rows  # evaluated, none hit the divergence floor
