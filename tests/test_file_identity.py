"""A file's identity is its name, size and content digest, the digest read once per version of the file."""

import hashlib
import os

import pytest

from fastkd import file_identity as fi


@pytest.fixture
def memo(tmp_path, monkeypatch):
    """A fresh cache and process memo; every file memoised on disk (not only those of MEMO_MIN_BYTES)."""
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fi, "_in_process", {})
    monkeypatch.setattr(fi, "MEMO_MIN_BYTES", 0)
    return tmp_path / "cache" / fi.DIGESTS


def _never_read(monkeypatch):
    monkeypatch.setattr(fi, "file_sha256", lambda p: pytest.fail("read again although memoised"))


def test_the_digest_is_the_files_sha256_read_once_per_version(tmp_path, memo, monkeypatch):
    f = tmp_path / "a.txt"
    f.write_bytes(b"some corpus text\n")
    assert fi.file_identity(f) == ["a.txt", 17, hashlib.sha256(b"some corpus text\n").hexdigest()]
    real = fi.file_sha256
    _never_read(monkeypatch)
    fi._in_process.clear()  # another process: the memo on disk answers
    assert fi.content_digest(f) == hashlib.sha256(b"some corpus text\n").hexdigest()
    st = f.stat()
    f.write_bytes(b"Some corpus text\n")  # the same size ...
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and modification time: the change time still tells
    with pytest.raises(pytest.fail.Exception, match="read again"):
        fi.content_digest(f)
    monkeypatch.setattr(fi, "file_sha256", real)
    assert fi.content_digest(f) == hashlib.sha256(b"Some corpus text\n").hexdigest()


def test_a_copy_with_another_time_and_place_has_the_same_identity_under_the_same_name(tmp_path, memo):
    a = tmp_path / "one" / "corpus.txt"
    b = tmp_path / "two" / "corpus.txt"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text("the same bytes\n")
    os.utime(b, ns=(10**9, 10**9))
    assert fi.file_identity(a) == fi.file_identity(b)
    assert fi.file_identity(a, "x/corpus.txt") != fi.file_identity(b)  # the name within the whole counts


def test_small_files_are_not_memoised_on_disk(tmp_path, memo, monkeypatch):
    monkeypatch.setattr(fi, "MEMO_MIN_BYTES", 1 << 20)
    f = tmp_path / "small.txt"
    f.write_bytes(b"x" * 1000)
    fi.content_digest(f)
    assert not memo.exists()


def test_a_damaged_memo_is_computed_again_and_an_unwritable_cache_only_costs_the_reading(tmp_path, memo, monkeypatch):
    f = tmp_path / "a.txt"
    f.write_bytes(b"abc")
    want = hashlib.sha256(b"abc").hexdigest()
    assert fi.content_digest(f) == want
    (entry,) = memo.iterdir()
    entry.write_text("0123 not a digest")
    fi._in_process.clear()
    assert fi.content_digest(f) == want and entry.read_text().strip() == want
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("FASTKD_CACHE", str(blocker / "cache"))
    fi._in_process.clear()
    assert fi.content_digest(f) == want
    assert not list(tmp_path.glob("**/.*.tmp"))
