"""Corpus text -> token sequences (Arrow, cached) -> a deterministic batch stream.

    text    where text comes from (a file, a folder of *.txt, a hub dataset) and what is kept of it:
            paragraphs, sentences or lines (`--corpus-mode`)
    cache   the cache directory, what keys an entry, its housekeeping
    build   tokenize in `num_proc` processes, pack into max_seq_len sequences (or keep one unit
            per sequence), save as Arrow: the same cache whatever `num_proc`
    stream  the sample a search distills on, and BatchStream: endless deterministic batches whose
            state is one integer, so a resume continues at the exact sequence
"""

from .build import PACK_BATCH, corpus_layout, describe_corpus, load_corpus, unit_lengths
from .cache import CACHE_FORMAT, check_cache_dir, corpus_identity, default_cache_dir
from .stream import BatchStream, StreamState, parse_sample, sample_corpus, sample_indices
from .text import clean_paragraph, corpus_files, read_paragraphs, split_long, split_sentences, text_units

__all__ = ["CACHE_FORMAT", "PACK_BATCH", "BatchStream", "StreamState", "check_cache_dir", "clean_paragraph",
           "corpus_files", "corpus_identity", "corpus_layout", "default_cache_dir", "describe_corpus", "load_corpus",
           "parse_sample", "read_paragraphs", "sample_corpus", "sample_indices", "split_long", "split_sentences",
           "text_units", "unit_lengths"]
