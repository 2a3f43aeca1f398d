"""Another connection in the middle of a new SQLite file's first write, for the tests of
opening such a file (the state store's and the embedded bus's)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def first_write_in_progress(path: Path, commit_after: float | None = None) -> Iterator[None]:
    """A connection holds ``path``, a new file, in its first (rollback-journal) transaction:
    committed after ``commit_after`` seconds, or rolled back when the block ends (None)."""
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    release = None
    if commit_after is not None:
        release = threading.Timer(commit_after, lambda: writer.execute("COMMIT"))
        release.start()
    try:
        yield
    finally:
        if release is not None:
            release.join()
        else:
            writer.execute("ROLLBACK")
        writer.close()
