"""Emptying a worker's scratch space can never reach anything but that space."""

from __future__ import annotations

import os

import pytest

from sandbox.runtime.confine import Scratch, ScratchDir
from sandbox.runtime.files import OUT_DIR
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
    assert sorted(os.listdir(tmp_path)) == ["kept-mount-point", OUT_DIR]  # ./out/ is made again, empty
    assert os.listdir(tmp_path / OUT_DIR) == []


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
    assert os.listdir(space) == [OUT_DIR] and (outside / "precious.txt").read_text() == "keep me"


def _private(space) -> Scratch:
    """As confinement records the worker's own tmpfs, here on the shared test
    file system: the tests set the recorded count to what they need."""
    (space / OUT_DIR).mkdir()
    return Scratch.of(str(space), (str(space),), private=True)


def test_a_space_where_nothing_was_created_needs_no_scan(tmp_path):
    scratch = _private(tmp_path)
    scratch.inodes_at_start = 10**12  # as if the count had not grown, whatever else shares this file system
    assert scratch.untouched() is True


def test_a_grown_inode_count_means_a_scan(tmp_path):
    scratch = _private(tmp_path)
    scratch.inodes_at_start = 0
    assert scratch.untouched() is False


def test_a_file_made_where_out_was_is_found_though_the_inode_count_did_not_grow(tmp_path):
    """./out/ is the one entry a run can remove: a file in its place leaves the count as it was."""
    scratch = _private(tmp_path)
    (tmp_path / OUT_DIR).rmdir()
    (tmp_path / "left-behind.txt").write_text("secret of the last run")
    scratch.inodes_at_start = 10**12
    assert scratch.untouched() is False
    assert _empty_scratch(scratch) is False
    assert os.listdir(tmp_path) == [OUT_DIR]


def _shared(space) -> Scratch:
    """A worker's directory on a file system shared with the host, whose count proves nothing."""
    (space / OUT_DIR).mkdir()
    scratch = Scratch.of(str(space), (str(space),), private=False)
    scratch.inodes_at_start = 10**12
    return scratch


def test_an_empty_directory_on_a_shared_file_system_needs_no_scan(tmp_path):
    assert _shared(tmp_path).untouched() is True


@pytest.mark.parametrize("made", ["file.txt", "out/file.txt", "nested/", "out/nested/"])
def test_anything_made_in_a_directory_on_a_shared_file_system_is_seen(tmp_path, made):
    scratch = _shared(tmp_path)
    path = tmp_path / made
    path.mkdir() if made.endswith("/") else path.write_text("x")
    assert scratch.untouched() is False


def test_out_removed_from_a_directory_on_a_shared_file_system_is_seen(tmp_path):
    scratch = _shared(tmp_path)
    (tmp_path / OUT_DIR).rmdir()
    assert scratch.untouched() is False
