"""Import folders: inotify units, quiet periods, and files still open for writing."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pacsflow_watcher.folders import (
    FolderWatcher,
    QuietTracker,
    files_open_for_writing,
    newest_change,
    unit_of,
    walk_files,
)


def drain(watcher: FolderWatcher, seconds: float = 0.3) -> set[Path]:
    units: set[Path] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        changed, overflow = watcher.read_changes()
        assert not overflow
        units |= changed
        time.sleep(0.02)
    return units


class TestUnits:
    def test_unit_is_the_top_level_child(self, tmp_path: Path) -> None:
        assert unit_of(tmp_path, tmp_path / "#1-A" / "s1" / "x.dcm") == tmp_path / "#1-A"
        assert unit_of(tmp_path, tmp_path / "loose.dcm") == tmp_path / "loose.dcm"
        assert unit_of(tmp_path, tmp_path) is None
        assert unit_of(tmp_path, Path("/elsewhere/x")) is None

    def test_walk_skips_own_temporary_files(self, tmp_path: Path) -> None:
        (tmp_path / "a" / "b").mkdir(parents=True)
        for name in ("a/1.dcm", "a/b/2.dcm", "a/.pacsflow-x.tmp"):
            (tmp_path / name).write_bytes(b"x")
        assert [p.relative_to(tmp_path).as_posix() for p in walk_files(tmp_path / "a")] == [
            "a/1.dcm", "a/b/2.dcm"]


class TestFolderWatcher:
    def test_changes_anywhere_below_a_unit_are_reported_as_the_unit(self, tmp_path: Path) -> None:
        inbox = tmp_path / "inbox"
        watcher = FolderWatcher([inbox])
        watcher.start()
        try:
            (inbox / "#1-A" / "series").mkdir(parents=True)
            (inbox / "#1-A" / "series" / "x.dcm").write_bytes(b"x")
            (inbox / "loose.dcm").write_bytes(b"y")
            assert drain(watcher) == {inbox / "#1-A", inbox / "loose.dcm"}
            # A folder created after start is watched too.
            (inbox / "#1-A" / "series" / "later.dcm").write_bytes(b"z")
            assert drain(watcher) == {inbox / "#1-A"}
        finally:
            watcher.close()

    def test_folder_moved_in_with_contents_is_watched(self, tmp_path: Path) -> None:
        inbox, outside = tmp_path / "inbox", tmp_path / "outside"
        (outside / "#2-B" / "deep").mkdir(parents=True)
        watcher = FolderWatcher([inbox])
        watcher.start()
        try:
            os.rename(outside / "#2-B", inbox / "#2-B")
            assert drain(watcher) == {inbox / "#2-B"}
            (inbox / "#2-B" / "deep" / "x.dcm").write_bytes(b"x")
            assert drain(watcher) == {inbox / "#2-B"}
        finally:
            watcher.close()

    def test_existing_units_for_the_rescan(self, tmp_path: Path) -> None:
        inbox = tmp_path / "inbox"
        (inbox / "#1-A").mkdir(parents=True)
        (inbox / "z.dcm").write_bytes(b"")
        watcher = FolderWatcher([inbox])
        watcher.start()
        watcher.close()
        assert watcher.existing_units() == [inbox / "#1-A", inbox / "z.dcm"]


class TestQuietTracker:
    def test_due_only_after_the_quiet_period(self) -> None:
        tracker = QuietTracker(quiet_seconds=10)
        unit = Path("/in/#1-A")
        tracker.touch(unit, at=100)
        assert tracker.due(now=109.9) == []
        assert tracker.next_due_in(now=105) == 5
        tracker.touch(unit, at=105)  # new activity restarts the wait
        assert tracker.due(now=110) == []
        assert tracker.due(now=115) == [unit]
        tracker.forget(unit)
        assert tracker.due(now=1000) == [] and tracker.next_due_in(1000) is None

    def test_an_older_change_does_not_shorten_the_wait(self) -> None:
        tracker = QuietTracker(quiet_seconds=10)
        tracker.touch(Path("/u"), at=100)
        tracker.touch(Path("/u"), at=50)
        assert tracker.due(now=105) == []

    def test_newest_change_looks_inside_the_unit(self, tmp_path: Path) -> None:
        (tmp_path / "u" / "s").mkdir(parents=True)
        (tmp_path / "u" / "s" / "x").write_bytes(b"x")
        newest = newest_change(tmp_path / "u")
        assert newest is not None and newest >= (tmp_path / "u" / "s" / "x").stat().st_ctime
        assert newest_change(tmp_path / "gone") is None


class TestOpenForWriting:
    def test_a_file_being_written_is_reported(self, tmp_path: Path) -> None:
        writing, done = tmp_path / "writing.dcm", tmp_path / "done.dcm"
        done.write_bytes(b"x")
        with open(writing, "wb") as handle:
            handle.write(b"partial")
            with open(done, "rb"):  # open for reading only: not busy
                assert files_open_for_writing([writing, done]) == {writing.resolve()}
        assert files_open_for_writing([writing, done]) == set()
