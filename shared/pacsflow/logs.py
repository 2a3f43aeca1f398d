"""Logging: JSON lines (or plain text) carrying the service, event id and correlation id.

The ids travel in context variables, so every line logged while an event is handled names it
without passing it around. Patient names never go into messages above DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from pacsflow.config import LoggingSettings

__all__ = ["configure_logging", "log_context", "JsonFormatter"]

_context: ContextVar[dict[str, str]] = ContextVar("pacsflow_log_context", default={})

# Attributes every LogRecord has; anything else passed with ``extra=`` is logged as a field.
_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Add fields (service, event_id, correlation_id, …) to every log line in this block."""
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context.get())
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in _context.get().items())
        return f"{line} [{fields}]" if fields else line


def configure_logging(settings: LoggingSettings) -> None:
    """Send pacsflow's logs to stderr in the configured format and level."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # pynetdicom logs every PDU at INFO/DEBUG; only its warnings matter to an operator.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, root.level))
