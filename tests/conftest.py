"""Shared fixtures: real servers (PostgreSQL, RabbitMQ), DCMTK, and pydicom's test files.

Servers are expected at their usual local addresses; ``.ci/run`` installs and starts them.
A test that needs a server fails (it is never skipped) when the server is not there.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

PG_ADMIN_DSN = os.environ.get("PACSFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
RABBIT_URL = os.environ.get("PACSFLOW_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    """pydicom's own corpus (offline; never call get_testdata_files without download=False)."""
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import asyncpg

    name = f"pacsflow_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def rabbit_url() -> str:
    return RABBIT_URL


@pytest.fixture
def unique_prefix() -> str:
    """A namespace for exchanges and queues so tests on one broker do not meet."""
    return f"pft{uuid.uuid4().hex[:10]}"


def require_tool(name: str) -> str:
    """The path of a command-line tool; fail (not skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run .ci/run, which installs it")
    return path


@pytest.fixture
def dcmtk_env() -> Iterator[dict[str, str]]:
    """Environment for DCMTK tools: TCP_NODELAY=1, or every exchange stalls 40 ms."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    yield env
