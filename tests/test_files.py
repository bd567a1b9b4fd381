"""Atomic writes: results replace the target in one step, leave no temporary behind, and get
the permissions a plain open / mkdir gives under the umask (not mkstemp's 0600)."""

from __future__ import annotations

import json
import os

import pytest

from rome_jax.files import (atomic_directory, atomic_file, write_bytes_atomic,
                            write_json_atomic)


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
