"""Corpus text -> token sequences (Arrow, cached) -> a deterministic batch stream.

    text    where text comes from (a file, a folder of *.txt, a hub dataset) and what is kept of it:
            paragraphs, sentences or lines (`--corpus-mode`)
    cache   the cache directory, what keys an entry, its housekeeping
    build   tokenize in `num_proc` processes, pack into max_seq_len sequences (or keep one unit
            per sequence), save as Arrow: the same cache whatever `num_proc`
    stream  the sample a search distills on, and BatchStream: endless deterministic batches whose
            state is one integer, so a resume continues at the exact sequence

The names are resolved on first use (PEP 562): the settings' checks read `text` and `cache`, which
import no torch, so a mistaken --corpus path is one line before the heavy libraries load.
"""

from importlib import import_module

_WHERE = {"PACK_BATCH": "build", "corpus_layout": "build", "describe_corpus": "build", "load_corpus": "build",
          "unit_lengths": "build", "CACHE_FORMAT": "cache", "check_cache_dir": "cache", "corpus_identity": "cache",
          "same_corpus": "cache", "legacy_corpus_identity": "cache", "default_cache_dir": "cache", "BatchStream": "stream", "StreamState": "stream", "parse_sample": "stream",
          "sample_corpus": "stream", "sample_indices": "stream", "clean_paragraph": "text", "corpus_files": "text",
          "read_paragraphs": "text", "split_long": "text", "split_sentences": "text", "text_units": "text"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
