import numpy as np
import pytest
import torch

from fastkd import corpus as corpus_mod
from fastkd.corpus import build as corpus_build
from fastkd.corpus import stream as corpus_stream
from fastkd.corpus import BatchStream, clean_paragraph, load_corpus, parse_sample, read_paragraphs, sample_corpus
from fastkd.errors import UserError


def test_clean_paragraph_drops_headings_and_blanks_and_unescapes():
    assert clean_paragraph(" = Valkyria Chronicles III = \n") is None
    assert clean_paragraph(" = = Gameplay = = \n") is None
    assert clean_paragraph("   \n") is None
    assert clean_paragraph(" The 2 @,@ 000 @-@ strong army , 1 @.@ 5 m tall \n") == "The 2,000-strong army , 1.5 m tall"
    assert clean_paragraph("a = b = c") == "a = b = c"  # not a heading


def test_read_paragraphs_bom_and_non_utf8(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfFirst paragraph.\n\n = Heading = \nSecond.\n")
    assert list(read_paragraphs([bom])) == ["First paragraph.", "Second."]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ok line\n".encode() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt:2: not UTF-8 \(byte 0xe9 at column 4\)"):
        list(read_paragraphs([bad]))


def test_packing_preserves_the_text_and_shapes(small_corpus, default_tokenizer):
    S = 32
    ds = load_corpus(str(small_corpus), default_tokenizer, S)
    rows = ds[:]
    tok = default_tokenizer
    body = []
    for ids, mask in zip(rows["input_ids"], rows["attention_mask"]):
        assert len(ids) == len(mask) == S
        n = sum(mask)
        assert mask == [1] * n + [0] * (S - n)
        assert ids[0] == tok.cls_token_id and ids[n - 1] == tok.sep_token_id
        assert all(t == tok.pad_token_id for t in ids[n:])
        body.extend(ids[1:n - 1])
    expected = [t for p in read_paragraphs([small_corpus]) for t in tok(p, add_special_tokens=False)["input_ids"]]
    assert body == expected  # nothing lost, nothing reordered
    assert sum(1 for m in rows["attention_mask"] if sum(m) < S) >= 1  # the tail is kept, padded


def test_second_load_uses_the_arrow_cache(small_corpus, default_tokenizer, monkeypatch):
    first = load_corpus(str(small_corpus), default_tokenizer, 48)

    def boom(*a, **k):
        raise AssertionError("re-tokenized although cached")

    monkeypatch.setattr(corpus_build, "_tokenize_batch", boom)
    second = load_corpus(str(small_corpus), default_tokenizer, 48)
    assert second[:]["input_ids"] == first[:]["input_ids"]
    # A different length is a different cache entry, so it must pack (and here, fail loudly).
    with pytest.raises(Exception):
        load_corpus(str(small_corpus), default_tokenizer, 40)


def test_a_copied_corpus_uses_the_cache_and_an_edited_one_does_not(tmp_path, small_corpus, default_tokenizer,
                                                                  monkeypatch):
    """The cache is keyed by the files' bytes: a copy (new modification time, new folder) is the same
    corpus; the same size with one word changed is not."""
    import os
    import shutil

    first = load_corpus(str(small_corpus), default_tokenizer, 48)
    copy = tmp_path / "elsewhere" / small_corpus.name
    copy.parent.mkdir()
    shutil.copy(small_corpus, copy)  # (no -p: a new modification time)
    os.utime(copy, ns=(1, 1))
    real = corpus_build._tokenize_batch

    def boom(*a, **k):
        raise AssertionError("re-tokenized although cached")

    monkeypatch.setattr(corpus_build, "_tokenize_batch", boom)
    assert load_corpus(str(copy), default_tokenizer, 48)[:]["input_ids"] == first[:]["input_ids"]
    text = copy.read_text(encoding="utf-8")
    i = text.index(" the ")
    copy.write_text(text[:i] + " zzz " + text[i + 5:], encoding="utf-8")  # same size, other bytes
    assert copy.stat().st_size == small_corpus.stat().st_size
    with pytest.raises(AssertionError, match="re-tokenized"):
        load_corpus(str(copy), default_tokenizer, 48)
    monkeypatch.setattr(corpus_build, "_tokenize_batch", real)
    assert load_corpus(str(copy), default_tokenizer, 48)[:]["input_ids"] != first[:]["input_ids"]


def test_empty_and_missing_corpus(tmp_path, default_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n = Title = \n\n")
    with pytest.raises(UserError, match="holds no text"):
        load_corpus(str(empty), default_tokenizer, 32)
    with pytest.raises(UserError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"), default_tokenizer, 32)
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        load_corpus(str(tmp_path / "dir"), default_tokenizer, 32)


def test_sample_is_deterministic(small_corpus, default_tokenizer):
    ds = load_corpus(str(small_corpus), default_tokenizer, 32)
    n = len(ds)
    a = sample_corpus(ds, "0.5", seed=1)
    b = sample_corpus(ds, 0.5, seed=1)
    c = sample_corpus(ds, "0.5", seed=2)
    assert len(a) == round(n * 0.5) and a[:]["input_ids"] == b[:]["input_ids"] != c[:]["input_ids"]
    assert len(sample_corpus(ds, "10", seed=0)) == 10
    assert len(sample_corpus(ds, str(n + 100), seed=0)) == n  # clamped, with a warning
    assert parse_sample("1") == 1 and parse_sample("1.0") == 1.0 and parse_sample(None) is None
    for bad in ("0", "-3", "abc", "2.5"):
        with pytest.raises(UserError):
            parse_sample(bad)


def test_batch_stream_epochs_ranks_and_resume(small_corpus, default_tokenizer):
    ds = load_corpus(str(small_corpus), default_tokenizer, 32)
    n = len(ds)
    stream = BatchStream(ds, batch_size=7, seed=3)
    seen = [i for k in range(-(-n // 7)) for i in stream.indices(k)][:n]
    assert sorted(seen) == list(range(n))  # one epoch visits every sequence once
    for _ in range(5):
        stream.next()
    state = stream.state_dict()
    after = stream.next()
    other = BatchStream(ds, batch_size=7, seed=3)
    other.load_state_dict(state)
    assert np.array_equal(other.next()["input_ids"].numpy(), after["input_ids"].numpy())
    r0, r1 = (BatchStream(ds, 4, seed=3, rank=r, world_size=2) for r in (0, 1))
    assert r0.indices(0) + r1.indices(0) == BatchStream(ds, 8, seed=3).indices(0)  # disjoint slices of one global batch
    with pytest.raises(UserError, match="batch_size"):
        BatchStream(ds, 8, seed=3).load_state_dict(state)


def _pack(rows, tokenizer, max_seq_len):
    ids = corpus_build._tokenize_batch(rows, tokenizer)
    return corpus_build._pack_batch(ids, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                                  max_seq_len)


def test_hub_style_rows_are_cleaned_when_packed(default_tokenizer):
    rows = {"text": ["", " = Title = ", None, " 2 @,@ 000 people \n", "   "]}
    tokenized = corpus_build._tokenize_batch(rows, default_tokenizer)
    assert [len(x) for x in tokenized["ids"]][:3] == [0, 0, 0] and len(tokenized["ids"]) == 5  # one row per row
    packed = _pack(rows, default_tokenizer, 16)
    ids = packed["input_ids"][0][: sum(packed["attention_mask"][0])]
    assert default_tokenizer.decode(ids[1:-1]) == "2, 000 people"
    assert len(packed["input_ids"]) == 1


def test_packing_is_the_token_stream_cut_into_sequences(default_tokenizer):
    tok = default_tokenizer
    rows = {"text": ["one two three four five six seven", "", "eight nine ten eleven twelve"]}
    packed = _pack(rows, tok, 8)
    stream = [t for text in rows["text"] if text for t in tok(text, add_special_tokens=False)["input_ids"]]
    body = 6
    expected = []
    for start in range(0, len(stream), body):
        chunk = [tok.cls_token_id, *stream[start:start + body], tok.sep_token_id]
        expected.append(chunk + [tok.pad_token_id] * (8 - len(chunk)))
    assert [list(map(int, r)) for r in packed["input_ids"]] == expected
    assert [int(sum(m)) for m in packed["attention_mask"]] == [len([t for t in r if t != tok.pad_token_id])
                                                               for r in expected]


def test_a_long_line_is_tokenized_in_pieces_cut_before_spaces(default_tokenizer):
    words = ("distillation of layered encoders " * 2000).strip()  # 67 k characters, one line
    pieces = corpus_mod.split_long(words, 1000)
    assert "".join(pieces) == words and max(map(len, pieces)) <= 1000 and all(p.startswith(" ") for p in pieces[1:])
    assert corpus_mod.split_long("x" * 2500, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]  # no space: hard cuts
    whole = default_tokenizer(words, add_special_tokens=False)["input_ids"]
    assert list(corpus_build._tokenize_batch({"text": [words]}, default_tokenizer)["ids"][0]) == whole


def test_the_cache_is_the_same_whatever_the_number_of_processes(tmp_path, wikitext, default_tokenizer):
    lines = wikitext.read_text(encoding="utf-8").splitlines()[:6000]
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    blocks = -(-len(list(read_paragraphs([text]))) // corpus_mod.PACK_BATCH)
    assert blocks >= 3  # several packing blocks, cut across the shards of 2 and 3 processes
    one = load_corpus(str(text), default_tokenizer, 32, tmp_path / "one", num_proc=1)
    two = load_corpus(str(text), default_tokenizer, 32, tmp_path / "two", num_proc=2)
    three = load_corpus(str(text), default_tokenizer, 32, tmp_path / "three", num_proc=3)
    padded = sum(1 for m in one[:]["attention_mask"] if sum(m) < 32)
    assert padded >= blocks - 1  # a padded tail per block (one may end exactly), wherever the shards ended
    assert one[:] == two[:] == three[:]
    names = lambda d: sorted(p.name for p in (d / "corpus").iterdir())  # noqa: E731
    assert names(tmp_path / "one") == names(tmp_path / "two")  # one cache key: num_proc is not part of it
    with pytest.raises(UserError, match="--num-proc must be at least 1"):
        load_corpus(str(text), default_tokenizer, 32, tmp_path / "bad", num_proc=0)


def test_parse_sample_edge_cases():
    assert parse_sample("1e-1") == pytest.approx(0.1)
    assert parse_sample("5000") == 5000
    for bad in ("nan", "inf", "1.5", "0.0"):
        with pytest.raises(UserError):
            parse_sample(bad)


# --- one sentence (or line) per sequence -------------------------------------------------------------

def test_sentences_are_split_where_they_end_not_at_initials_or_abbreviations():
    text = ("The play was written by J. K. Rowling in 2001 . Mr. Smith said it was good ! Was it ? "
            "It ran at the St. Martin theatre . ( It closed in 2003 . ) 3 actors left")
    assert corpus_mod.split_sentences(text) == [
        "The play was written by J. K. Rowling in 2001 .", "Mr. Smith said it was good !", "Was it ?",
        "It ran at the St. Martin theatre .", "( It closed in 2003 . )", "3 actors left"]
    assert corpus_mod.split_sentences("no end mark at all") == ["no end mark at all"]
    # a period written apart (WikiText) ends a sentence even after a capital or an abbreviation's letters
    assert corpus_mod.split_sentences("He fought in World War I . The war ended . It said no . Then") == [
        "He fought in World War I .", "The war ended .", "It said no .", "Then"]
    # fewer than MIN_SENTENCE_WORDS words is debris, not a sentence; a line is kept whole
    assert corpus_mod.text_units("Yes . It was a long night .", "sentences") == ["It was a long night ."]
    assert corpus_mod.text_units("Yes . It was a long night .", "lines") == ["Yes . It was a long night ."]


def test_sentences_mode_keeps_each_sentence_that_fits_whole_and_counts_the_rest(small_corpus, default_tokenizer,
                                                                                 tmp_path):
    ds = load_corpus(str(small_corpus), default_tokenizer, 40, tmp_path / "c", mode="sentences")
    units = [u for par in read_paragraphs([small_corpus]) for u in corpus_mod.text_units(par, "sentences")]
    ids = [default_tokenizer(u, add_special_tokens=False)["input_ids"] for u in units]
    fits = [[default_tokenizer.cls_token_id, *i, default_tokenizer.sep_token_id] for i in ids if len(i) <= 38]
    assert ds["input_ids"] == fits  # corpus order, unpadded, nothing cut
    assert ds["length"] == [len(f) for f in fits]
    layout = corpus_mod.corpus_layout(ds)
    assert layout == {"mode": "sentences", "pad_id": default_tokenizer.pad_token_id, "units": len(fits),
                      "too_long": len(ids) - len(fits), "max_seq_len": 40}
    assert 0 < layout["too_long"] < len(ids) // 2
    # the layout travels with the cache entry and a sample; two processes build the same rows; packed keeps its key
    again = load_corpus(str(small_corpus), default_tokenizer, 40, tmp_path / "c", mode="sentences", num_proc=2)
    assert corpus_mod.corpus_layout(sample_corpus(again, "0.5", 0)) == layout and again[:] == ds[:]
    two = load_corpus(str(small_corpus), default_tokenizer, 40, tmp_path / "two", mode="sentences", num_proc=2)
    assert two[:] == ds[:]
    assert corpus_mod.corpus_layout(load_corpus(str(small_corpus), default_tokenizer, 40, tmp_path / "c")) == {
        "mode": "packed"}
    assert len(list((tmp_path / "c" / "corpus").iterdir())) == 2
    lines = load_corpus(str(small_corpus), default_tokenizer, 512, tmp_path / "c", mode="lines")
    assert len(lines) == sum(1 for _ in read_paragraphs([small_corpus])) - corpus_mod.corpus_layout(lines)["too_long"]


def test_a_corpus_without_a_sentence_that_fits_is_one_line(tmp_path, default_tokenizer):
    text = tmp_path / "long.txt"
    text.write_text("A sentence that is plainly far too long for eight tokens . Another one that is too long too .\n")
    with pytest.raises(UserError, match=r"no sentence that fits --max-seq-len 8: all 2 of its sentences are longer "
                                        r"than 6 tokens; raise --max-seq-len, or use --corpus-mode packed"):
        load_corpus(str(text), default_tokenizer, 8, tmp_path / "c", mode="sentences")
    text.write_text("Yes . No .\n")
    with pytest.raises(UserError, match="holds no sentence of 3 words or more"):
        load_corpus(str(text), default_tokenizer, 8, tmp_path / "c", mode="sentences")
    with pytest.raises(UserError, match="--corpus-mode 'words' is not one of packed, sentences, lines"):
        load_corpus(str(text), default_tokenizer, 8, tmp_path / "c", mode="words")


def test_bucketed_stream_visits_each_sentence_once_per_epoch_in_batches_of_similar_length(
        small_corpus, default_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_stream, "BUCKET_BATCHES", 4)  # several chunks in this small corpus
    ds = load_corpus(str(small_corpus), default_tokenizer, 64, tmp_path / "c", mode="sentences")
    n, lengths = len(ds), np.asarray(ds["length"])
    stream = BatchStream(ds, batch_size=4, seed=5, world_size=2)
    assert n % 8 and n > 8 * 4 * 3  # epochs end inside a global batch; several chunks per epoch
    for epoch in range(3):  # each epoch a permutation, wherever its global batches begin
        assert sorted(stream._permutation(epoch)) == list(range(n))
    padding = lambda batches: np.mean([1 - lengths[b].sum() / (len(b) * lengths[b].max()) for b in batches])  # noqa: E731
    bucketed = [stream.indices(k) + BatchStream(ds, 4, 5, rank=1, world_size=2).indices(k) for k in range(60)]
    random = [list(np.random.default_rng(k).choice(n, 8, replace=False)) for k in range(60)]
    assert padding(bucketed) < 0.5 * padding(random)
    first = BatchStream(ds, 6, seed=5).next()
    assert first["input_ids"].shape[1] == first["attention_mask"].sum(1).max()  # padded to its own longest
    assert (first["input_ids"][first["attention_mask"] == 0] == default_tokenizer.pad_token_id).all()
    # a resume continues at the exact sentence
    for _ in range(7):
        stream.next()
    other = BatchStream(ds, batch_size=4, seed=5, world_size=2)
    other.load_state_dict(stream.state_dict())
    assert torch.equal(other.next()["input_ids"], stream.next()["input_ids"])
    packed = load_corpus(str(small_corpus), default_tokenizer, 64, tmp_path / "c")
    with pytest.raises(UserError, match="read its corpus as sentences, this run as packed: give --corpus-mode sentences"):
        BatchStream(packed, 4, seed=5, world_size=2).load_state_dict(stream.state_dict())
