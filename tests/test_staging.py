"""Folders written beside their target and swapped in: what a crash leaves, the next write removes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from langops.io import staging_dir, swap_in

pytestmark = pytest.mark.unit


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_swap_replaces_the_folder_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "compressed"
    target.mkdir()
    (target / "old.txt").write_text("old")

    staging = staging_dir(target)
    (staging / "new.txt").write_text("new")
    swap_in(staging, target)

    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed"]


def test_the_next_write_removes_what_a_killed_writer_left_but_not_a_live_writers_folder(tmp_path):
    target = tmp_path / "prepared"
    dead = _dead_pid()
    killed_while_writing = tmp_path / f".prepared.staging-{dead}-0a1b2c3d"
    killed_between_renames = tmp_path / f".prepared.old-{dead}-4e5f6a7b"
    still_writing = tmp_path / f".prepared.staging-{os.getppid()}-8c9d0e1f"
    unrelated = tmp_path / ".prepared-notes"
    for folder in (killed_while_writing, killed_between_renames, still_writing, unrelated):
        folder.mkdir()
        (folder / "train.parquet").write_bytes(b"half")

    staging = staging_dir(target)

    assert not killed_while_writing.exists() and not killed_between_renames.exists()
    assert still_writing.is_dir() and unrelated.is_dir()
    assert staging.is_dir() and not any(staging.iterdir())
