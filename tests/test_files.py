"""Atomic writes: results replace the target in one step, leave no temporary behind, and get
the permissions a plain open / mkdir gives under the umask (not mkstemp's 0600); the .npz
reader that never unpickles."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rome_jax.files import (atomic_directory, atomic_file, read_npz, write_bytes_atomic,
                            write_json_atomic, write_npz_atomic)


@pytest.fixture
def umask():
    """Run with umask 022 (the usual one), restoring the caller's afterwards."""
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_json_and_bytes_get_the_usual_permissions(tmp_path, umask):
    out = write_json_atomic(tmp_path / "sub" / "a.json", {"x": [1, 2]})
    assert json.loads(out.read_text()) == {"x": [1, 2]} and mode(out) == 0o644
    raw = write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert raw.read_bytes() == b"\x00\x01" and mode(raw) == 0o644
    os.umask(0o077)
    assert mode(write_json_atomic(tmp_path / "private.json", 1)) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "private.json", "sub"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, umask):
    target = write_json_atomic(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_directory_permissions_and_refusal(tmp_path, umask):
    def write(tmp):
        (tmp / "f.txt").write_text("new")
        (tmp / "d").mkdir(mode=0o700)

    out = atomic_directory(tmp_path / "out", False, write)
    assert mode(out) == 0o755 and mode(out / "d") == 0o755 and mode(out / "f.txt") == 0o644
    with pytest.raises(FileExistsError, match="out: already exists"):
        atomic_directory(out, False, write)
    atomic_directory(out, True, lambda tmp: (tmp / "g.txt").write_text("newer"))
    assert [p.name for p in out.iterdir()] == ["g.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_npz_atomic_and_read_npz_round_trip_and_refuse(tmp_path):
    """read_npz returns what write_npz_atomic wrote; a single .npy, pickled objects, garbage
    and an empty file are ValueErrors with a one-line reason and never numpy's advice to
    unpickle."""
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(7)}
    path = write_npz_atomic(tmp_path / "deep" / "x.npz", **arrays)
    back = read_npz(path)
    assert sorted(back) == ["a", "b"]
    for name, array in arrays.items():
        np.testing.assert_array_equal(back[name], array)
        assert back[name].dtype == np.asarray(array).dtype
    np.save(tmp_path / "single.npy", np.zeros(3))
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    (tmp_path / "garbage.npz").write_bytes(b"not an archive\x00\x01")
    (tmp_path / "empty.npz").write_bytes(b"")
    for name, reason in [("single.npy", "a single array, not an .npz archive"),
                         ("objects.npz", "pickled data"), ("garbage.npz", None),
                         ("empty.npz", None)]:
        with pytest.raises(ValueError) as err:
            read_npz(tmp_path / name)
        message = str(err.value)
        assert message and "\n" not in message and "allow_pickle" not in message
        assert reason is None or message == reason
