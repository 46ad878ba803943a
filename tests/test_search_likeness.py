"""The teacher-likeness measures (candidate cheap rungs): linear CKA against its textbook form, and
the per-layer bookkeeping of TeacherReference on a real tiny encoder."""

import pytest
import torch

from fastkd.mapping import LayerMapping
from fastkd.models import load_teacher
from fastkd.search.likeness import TeacherReference, linear_cka
from fastkd.sentence import SentencePooling


def _cka_by_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA as Kornblith et al. write it: HSIC of the linear Gram matrices, normalised."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


def test_linear_cka_matches_the_hsic_form_and_its_invariances():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 7, generator=gen)
    y = x @ torch.randn(7, 5, generator=gen) + 0.5 * torch.randn(60, 5, generator=gen)
    assert linear_cka(x, y) == pytest.approx(_cka_by_hsic(x, y), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=gen, dtype=torch.float64))
    # equal up to rotation, isotropic scale and shift: 1; linear_cka is symmetric
    assert linear_cka(x, 3.0 * (x.double() @ q) + 2.0) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    unrelated = torch.randn(2000, 4, generator=gen), torch.randn(2000, 4, generator=gen)
    assert linear_cka(*unrelated) < 0.02
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, y[:-1])


SENTENCES = [f"sentence number {i} says something about {w}." for i, w in
             enumerate(["cats", "the weather", "a long road", "music", "numbers", "rivers", "a film", "bread"] * 3)]


def _reference(teacher, tokenizer):
    return teacher, TeacherReference(teacher, tokenizer, SENTENCES, SentencePooling("mean", normalize=True),
                                     batch_size=5)  # batches of 5: the concatenation is checked too


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir, default_tokenizer):
    return _reference(load_teacher(str(tiny_teacher_dir)).eval(), default_tokenizer)


@pytest.fixture(scope="module")
def distinct_reference(tiny_teacher_dir, default_tokenizer):
    """A teacher whose layers change the states a lot (the tiny initialisation barely does), so that
    comparing the wrong layers shows."""
    teacher = load_teacher(str(tiny_teacher_dir)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in (p for p in teacher.encoder.parameters() if p.dim() == 2):
            weight.normal_(0.0, 0.3, generator=gen)
    return _reference(teacher, default_tokenizer)


def test_the_teacher_is_exactly_like_itself_under_the_identity_mapping(distinct_reference):
    teacher, ref = distinct_reference
    n = teacher.config.num_hidden_layers
    same = ref.likeness(teacher, LayerMapping(tuple(range(1, n + 1)), n))
    assert same == pytest.approx({"embedding_cosine": 1.0, "cka_embedding": 1.0, "cka_mapped": 1.0}, abs=1e-6)
    # each student layer is compared with the teacher layer the mapping names, not its own index
    reversed_ = ref.likeness(teacher, LayerMapping(tuple(range(n, 0, -1)), n))
    assert reversed_["cka_mapped"] < 0.95
    expected = sum(linear_cka(ref.layers[i], ref.layers[n + 1 - i]) for i in range(1, n + 1)) / n
    assert reversed_["cka_mapped"] == pytest.approx(expected, rel=1e-9)
    assert reversed_["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)  # the embedding ignores the mapping
    with pytest.raises(ValueError, match="maps"):
        ref.likeness(teacher, LayerMapping((1, 2), n))
    # a layer the mapping leaves unsupervised (None) is left out of cka_mapped: only the last counts here
    only_last = ref.likeness(teacher, LayerMapping((None,) * (n - 1) + (1,), n))["cka_mapped"]
    assert only_last == pytest.approx(linear_cka(ref.layers[n], ref.layers[1]), rel=1e-9)
    assert only_last < 0.95
    assert ref.likeness(teacher, LayerMapping((None,) * n, n))["cka_mapped"] is None


def test_a_random_student_is_less_like_the_teacher(reference, tiny_teacher_dir):
    from fastkd.models import build_student, student_shape

    teacher, ref = reference
    n = teacher.config.num_hidden_layers
    mapping = LayerMapping((2, n), n)
    shape = student_shape(teacher.config, 2)
    copied = ref.likeness(build_student(teacher, shape, "teacher", mapping, seed=0).eval(), mapping)
    random = ref.likeness(build_student(teacher, shape, "random", mapping, seed=0).eval(), mapping)
    assert random["cka_embedding"] < copied["cka_embedding"]
    assert random["embedding_cosine"] < copied["embedding_cosine"]
