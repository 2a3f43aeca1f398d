"""Import folders: inotify over whole trees, quiet-period tracking, files still being written.

The unit of work is an *import unit*: a direct child of an import folder (a folder such as
``#12345-HongGildong/``, or a single file dropped at the top). Any change below a unit makes it
busy again; it is handled once it has been quiet for the debounce time. On start a rescan
finds everything that arrived while the watcher was down, dated by the newest change time
(ctime, which copying tools cannot backdate) in the unit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from inotify_simple import INotify, flags

__all__ = ["FolderWatcher", "QuietTracker", "files_open_for_writing", "unit_of", "walk_files",
           "newest_change"]

log = logging.getLogger(__name__)

# Files pacsflow itself writes while rewriting headers; never treated as imports.
TEMP_PREFIX = ".pacsflow-"

# Only what adds or changes content: files leaving (archived, quarantined) are no new work.
_WATCH_MASK = flags.CREATE | flags.CLOSE_WRITE | flags.MODIFY | flags.MOVED_TO | flags.ATTRIB


def unit_of(root: Path, path: Path) -> Path | None:
    """The import unit ``path`` belongs to, or None when it is the root itself."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        return None
    if not relative.parts:
        return None
    return root / relative.parts[0]


def walk_files(unit: Path) -> Iterator[Path]:
    """Every regular file of a unit (the unit itself when it is a file), sorted, temp files skipped."""
    if unit.is_file():
        if not unit.name.startswith(TEMP_PREFIX):
            yield unit
        return
    yield from map(Path, _regular_files(os.fspath(unit)))


def _regular_files(folder: str) -> Iterator[str]:
    # scandir's entries know their type from the directory listing: no stat per file.
    # Symbolic links are neither followed nor listed; a folder that vanished is skipped.
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for entry in entries:
        if entry.is_file(follow_symlinks=False) and not entry.name.startswith(TEMP_PREFIX):
            yield entry.path
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _regular_files(entry.path)


def newest_change(unit: Path) -> float | None:
    """The newest ctime of the unit and everything in it; None when it is gone."""
    try:
        newest = unit.stat().st_ctime
    except FileNotFoundError:
        return None
    if unit.is_dir():
        for folder, _dirs, files in os.walk(unit):
            for name in files:
                try:
                    newest = max(newest, (Path(folder) / name).stat().st_ctime)
                except FileNotFoundError:
                    continue
    return newest


def files_open_for_writing(paths: Iterable[Path]) -> set[Path]:
    """Those of ``paths`` that some process holds open for writing (from /proc; best effort)."""
    # realpath walks every component: once per folder, not once per file (a symlinked file
    # is resolved on its own).
    folders: dict[str, str] = {}
    wanted: set[str] = set()
    for p in paths:
        folder, name = os.path.split(os.fspath(p))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        joined = os.path.join(folders[folder], name)
        wanted.add(os.path.realpath(joined) if os.path.islink(joined) else joined)
    if not wanted:
        return set()
    busy: set[Path] = set()
    proc = Path("/proc")
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        fd_dir = proc / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # the process ended, or is not ours to see
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target not in wanted:
                continue
            try:
                info = (proc / pid / "fdinfo" / fd).read_text()
            except OSError:
                continue
            for line in info.splitlines():
                if line.startswith("flags:"):
                    access_mode = int(line.split()[1], 8) & os.O_ACCMODE
                    if access_mode in (os.O_WRONLY, os.O_RDWR):
                        busy.add(Path(target))
    return busy


class QuietTracker:
    """Remembers when each unit last changed and says which have been quiet long enough."""

    def __init__(self, quiet_seconds: float) -> None:
        self.quiet_seconds = quiet_seconds
        self._last_change: dict[Path, float] = {}

    def touch(self, unit: Path, at: float) -> None:
        """Record a change of ``unit`` at time ``at`` (the later of known changes wins)."""
        self._last_change[unit] = max(at, self._last_change.get(unit, at))

    def due(self, now: float) -> list[Path]:
        """Units quiet for at least the debounce time, oldest first."""
        ready = [u for u, t in self._last_change.items() if now - t >= self.quiet_seconds]
        return sorted(ready, key=self._last_change.__getitem__)

    def waiting(self, now: float) -> dict[Path, float]:
        """Units still waiting, with the seconds left."""
        return {u: self.quiet_seconds - (now - t) for u, t in self._last_change.items()
                if now - t < self.quiet_seconds}

    def next_due_in(self, now: float) -> float | None:
        """Seconds until the next unit becomes due, or None when nothing is waiting."""
        if not self._last_change:
            return None
        return max(0.0, min(t + self.quiet_seconds for t in self._last_change.values()) - now)

    def forget(self, unit: Path) -> None:
        self._last_change.pop(unit, None)

    def __len__(self) -> int:
        return len(self._last_change)


class FolderWatcher:
    """Recursive inotify watches on import folders, including folders created later."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        self._inotify = INotify()
        self._paths: dict[int, Path] = {}

    def fileno(self) -> int:
        return self._inotify.fileno()

    def start(self) -> None:
        """Create missing roots and watch every folder below them."""
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)
            self._watch_tree(root)

    def _watch_tree(self, top: Path) -> None:
        for folder, dirs, _files in os.walk(top):
            self._watch(Path(folder))
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]

    def _watch(self, folder: Path) -> None:
        try:
            wd = self._inotify.add_watch(folder, _WATCH_MASK)
        except OSError as err:
            # Watches are limited (fs.inotify.max_user_watches); the rescan still finds files.
            log.warning("cannot watch %s: %s", folder, err)
            return
        self._paths[wd] = folder

    def root_of(self, path: Path) -> Path | None:
        for root in self.roots:
            if path == root or root in path.parents:
                return root
        return None

    def read_changes(self) -> tuple[set[Path], bool]:
        """Drain pending events: the units that changed, and whether the kernel queue overflowed
        (then the caller must rescan, as events were lost)."""
        units: set[Path] = set()
        overflow = False
        for event in self._inotify.read(timeout=0):
            if event.mask & flags.Q_OVERFLOW:
                overflow = True
                continue
            folder = self._paths.get(event.wd)
            if folder is None:
                continue
            if event.mask & flags.IGNORED:
                self._paths.pop(event.wd, None)
                continue
            path = folder / event.name if event.name else folder
            if event.name.startswith(TEMP_PREFIX):
                continue
            if event.mask & flags.ISDIR and event.mask & (flags.CREATE | flags.MOVED_TO):
                # A new folder may already hold files and folders before its watch exists.
                self._watch_tree(path)
            root = self.root_of(path)
            if root is not None and (unit := unit_of(root, path)) is not None:
                units.add(unit)
        return units, overflow

    def existing_units(self) -> list[Path]:
        """Every unit now present in the import folders (for the start-up rescan)."""
        units: list[Path] = []
        for root in self.roots:
            try:
                units.extend(sorted(p for p in root.iterdir()
                                    if not p.name.startswith(TEMP_PREFIX)))
            except FileNotFoundError:
                continue
        return units

    def close(self) -> None:
        self._inotify.close()
