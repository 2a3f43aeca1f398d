"""The public surface of pacsflow.store: exported names and the backend chosen by settings."""

from __future__ import annotations

from pathlib import Path

import pacsflow.store
from pacsflow.config import StateSettings
from pacsflow.store import SqliteDatabase, open_database


def test_every_exported_name_exists_and_is_documented() -> None:
    for name in pacsflow.store.__all__:
        value = getattr(pacsflow.store, name)
        if callable(value) and not name.isupper() and name != "Row":
            assert value.__doc__, f"{name} has no docstring"


async def test_default_settings_open_the_embedded_sqlite_file(tmp_path: Path) -> None:
    db = await open_database(StateSettings(path=tmp_path / "pacsflow.db"))
    try:
        assert isinstance(db, SqliteDatabase)
        assert db.dialect == "sqlite"
    finally:
        await db.close()
