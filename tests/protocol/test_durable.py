"""protocol.durable: a file holds its old or its whole new content, and no temporary file lingers."""

from __future__ import annotations

from pathlib import Path

import pytest

from loracommons.protocol import durable


def test_atomic_write_replaces_whole_content(tmp_path: Path):
    path = tmp_path / "record.json"
    durable.atomic_write(path, b"old")
    durable.atomic_write(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_its_temporary(tmp_path: Path, monkeypatch):
    path = tmp_path / "record.json"
    durable.atomic_write(path, b"old")

    def crash(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(durable.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        durable.atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert not any(p.name.startswith(durable.TEMP_PREFIX) for p in tmp_path.iterdir())


def test_synced_write_and_fsync_dir(tmp_path: Path):
    durable.synced_write(tmp_path / "a.bin", b"\x00\x01")
    durable.fsync_dir(tmp_path)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
