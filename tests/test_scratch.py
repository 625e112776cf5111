"""Emptying a worker's scratch space can never reach anything but that space."""

from __future__ import annotations

import os

from sandbox.runtime.confine import Scratch, ScratchDir
from sandbox.runtime.worker import _empty_scratch


def _pinned(directory) -> Scratch:
    """Like Scratch.of, but never taking the unchanged-tmpfs shortcut: the
    shared test file system's inode count moves with everything else."""
    return Scratch(cwd=str(directory), dirs=[ScratchDir.of(str(directory))], inodes_at_start=0)


def _populate(directory) -> None:
    (directory / "kept-mount-point").mkdir()
    (directory / "file.txt").write_text("x")
    (directory / "nested").mkdir()
    (directory / "nested" / "deep.txt").write_text("y")


def test_only_entries_created_since_confinement_are_removed(tmp_path):
    (tmp_path / "kept-mount-point").mkdir()
    scratch = _pinned(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "deep.txt").write_text("y")
    assert _empty_scratch(scratch) is False
    assert sorted(os.listdir(tmp_path)) == ["kept-mount-point"]


def test_a_directory_on_another_device_than_recorded_is_left_alone(tmp_path):
    _populate(tmp_path)
    recorded = ScratchDir.of(str(tmp_path))
    moved = ScratchDir(recorded.path, recorded.device + 1, keep=frozenset())
    assert _empty_scratch(Scratch(cwd=str(tmp_path), dirs=[moved], inodes_at_start=0)) is True
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "kept-mount-point", "nested"]


def test_symlinks_are_removed_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    space = tmp_path / "space"
    space.mkdir()
    scratch = _pinned(space)
    (space / "link").symlink_to(outside)
    assert _empty_scratch(scratch) is False
    assert os.listdir(space) == [] and (outside / "precious.txt").read_text() == "keep me"
