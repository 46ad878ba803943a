"""Shared fixtures: tiny random BERTs (fast) and the real default teacher and corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Before anything imports triton: @triton.jit picks the interpreter at decoration time, so the
    # Triton kernels run (slowly, for correctness) on a CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTKD_SHARED_DATA", REPO.parent / "shared" / "data"))
WIKITEXT = SHARED_DATA / "corpus" / "wikitext-2-raw-test.txt"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tokenized corpora go to a per-session cache, never the user's."""
    old = os.environ.get("FASTKD_CACHE")
    os.environ["FASTKD_CACHE"] = str(tmp_path_factory.mktemp("fastkd-cache"))
    yield
    if old is None:
        os.environ.pop("FASTKD_CACHE", None)
    else:
        os.environ["FASTKD_CACHE"] = old


@pytest.fixture(scope="session")
def wikitext() -> Path:
    assert WIKITEXT.is_file(), f"the shared corpus is missing: {WIKITEXT}"
    return WIKITEXT


@pytest.fixture(scope="session")
def default_tokenizer():
    from fastkd.models import load_tokenizer

    return load_tokenizer("default")


def make_tiny_bert(path: Path, tokenizer, layers=4, hidden=32, heads=4, ffn=64, seed=0, dropout=0.0) -> Path:
    """A random BERT with the real uncased WordPiece vocabulary, saved like a hub model."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=128,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, default_tokenizer) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-teacher"), default_tokenizer)


@pytest.fixture(scope="session")
def tiny_teacher_dropout_dir(tmp_path_factory, default_tokenizer) -> Path:
    """Same shape with dropout on: exercises RNG state in resume."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-teacher-dropout"), default_tokenizer, dropout=0.1)


@pytest.fixture
def small_corpus(tmp_path, wikitext) -> Path:
    """The first 150 lines of real WikiText-2: enough sequences for short runs, fast to pack."""
    lines = wikitext.read_text(encoding="utf-8").splitlines()[:150]
    path = tmp_path / "wiki-small.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
