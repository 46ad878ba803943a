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


USER_SWITCHES = ("FASTKD_LOSS_BACKEND", "FASTKD_SELF_CHECK", "FASTKD_VERBOSE_BUILD", "FASTKD_MEMORY_CHECK")


@pytest.fixture(scope="session", autouse=True)
def _no_user_overrides():
    """A user's own switches never reach a test (nor the session's and modules' fixtures, nor the
    processes the tests start): the loss backend and the self-check are what the code picks unless a
    test sets them."""
    saved = {name: os.environ.pop(name) for name in USER_SWITCHES if name in os.environ}
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def wikitext() -> Path:
    assert WIKITEXT.is_file(), f"the shared corpus is missing: {WIKITEXT}"
    return WIKITEXT


@pytest.fixture(scope="session")
def default_tokenizer():
    from fastkd.models import load_tokenizer

    return load_tokenizer("default")


def make_tiny_bert(path: Path, tokenizer, layers=4, hidden=32, heads=4, ffn=64, seed=0, dropout=0.0,
                   max_positions=128) -> Path:
    """A random BERT with the real uncased WordPiece vocabulary, saved like a hub model."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=max_positions,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


FAMILY_TYPES = ("bert", "distilbert", "albert", "modernbert", "deberta-v2", "mpnet")


def make_tiny_encoder(model_type: str, path: Path, tokenizer, layers=4, hidden=32, heads=4, ffn=64, seed=0,
                      max_positions=128) -> Path:
    """A random encoder of `model_type` (a fastkd family), no dropout, with the real uncased WordPiece
    vocabulary and its special-token ids, saved like a hub model."""
    import transformers

    if model_type == "bert":
        return make_tiny_bert(path, tokenizer, layers, hidden, heads, ffn, seed, max_positions=max_positions)
    common = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)
    positions = dict(max_position_embeddings=max_positions)
    sizes = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = {
        "distilbert": lambda: transformers.DistilBertConfig(n_layers=layers, dim=hidden, n_heads=heads, hidden_dim=ffn,
                                                            dropout=0.0, attention_dropout=0.0, **positions, **common),
        # factorised embeddings (16 < hidden), one shared layer applied `layers` times
        "albert": lambda: transformers.AlbertConfig(embedding_size=16, **positions, **sizes, **no_dropout, **common),
        # local attention over |i - j| <= 2 on every layer but each second: windows shorter than the tests' batches
        "modernbert": lambda: transformers.ModernBertConfig(local_attention=4, global_attn_every_n_layers=2,
                                                            **positions, cls_token_id=tokenizer.cls_token_id,
                                                            sep_token_id=tokenizer.sep_token_id,
                                                            bos_token_id=tokenizer.cls_token_id,
                                                            eos_token_id=tokenizer.sep_token_id, **sizes, **common),
        # DeBERTa-v3's attention: relative positions in buckets, c2p and p2c terms, shared keys, no token types
        "deberta-v2": lambda: transformers.DebertaV2Config(relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                           position_buckets=8, max_relative_positions=-1,
                                                           share_att_key=True, norm_rel_ebd="layer_norm",
                                                           position_biased_input=False, type_vocab_size=0,
                                                           **positions, **sizes, **no_dropout, **common),
        # positions numbered from pad_token_id + 1, as RoBERTa's; 32 relative buckets: MPNet hard-codes them
        "mpnet": lambda: transformers.MPNetConfig(max_position_embeddings=max_positions + 2,
                                                  **sizes, **no_dropout, **common),
    }[model_type]()
    torch.manual_seed(seed)
    transformers.AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_pipeline_teacher(path: Path, encoder_dir: Path, pooling: str = "mean") -> Path:
    """A copy of `encoder_dir` with a sentence-transformers pipeline written by hand:
    Transformer -> Pooling (`pooling`, the older config keys) -> Normalize."""
    import json
    import shutil

    shutil.copytree(encoder_dir, path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    width = json.loads((encoder_dir / "config.json").read_text())["hidden_size"]
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": width, f"pooling_mode_{pooling}_token{'s' if pooling == 'mean' else ''}": True}))
    return path


@pytest.fixture(scope="session")
def family_teacher_dirs(tmp_path_factory, default_tokenizer) -> dict[str, Path]:
    """One tiny random teacher per family (4 layers, hidden 32, 4 heads)."""
    return {t: make_tiny_encoder(t, tmp_path_factory.mktemp(f"tiny-{t}"), default_tokenizer) for t in FAMILY_TYPES}


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, default_tokenizer) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-teacher"), default_tokenizer)


@pytest.fixture(scope="session")
def tiny_teacher_dropout_dir(tmp_path_factory, default_tokenizer) -> Path:
    """Same shape with dropout on: exercises RNG state in resume."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-teacher-dropout"), default_tokenizer, dropout=0.1)


def write_small_corpus(folder: Path) -> Path:
    """The first 150 lines of real WikiText-2 in folder/wiki-small.txt: enough sequences for short runs,
    fast to pack (for fixtures wider than one test, which cannot take small_corpus)."""
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines()[:150]
    path = folder / "wiki-small.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def small_corpus(tmp_path, wikitext) -> Path:
    """The first 150 lines of real WikiText-2: enough sequences for short runs, fast to pack."""
    return write_small_corpus(tmp_path)


def run_cli(capfd, *argv) -> tuple[int, list[str]]:
    """`fastkd ARGV` in this process: its exit code and its stderr lines, logging and progress bars
    left out (what a user reads as the command's own words)."""
    from fastkd.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # refused by the parser itself
        code = exc.code
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip() and " INFO " not in line
           and " WARNING " not in line and "it/s]" not in line and "examples/s]" not in line]
    return code, err
