"""Logging: JSON lines (or plain text) carrying the service, event id and correlation id.

The ids travel in context variables, so every line logged while an event is handled names it
without passing it around. Patient names never go into messages above DEBUG: code logs no
header values, and import folder names that carry a name (``#12345-HongGildong``, matched by
``logging.redact_folder_pattern``) are masked in every line above DEBUG, wherever the path
turns up (messages, fields, tracebacks): ``#12345-***``.
"""

from __future__ import annotations

import json
import logging
import re
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


# Path segments and words: what a folder name can be in a log line (a batch key is
# "<folder>@<time>").
_SEGMENT = re.compile(r"[^@/\\\s'\"`:,;()\[\]{}<>=|]+")


class FolderNameRedactor:
    """Masks the name group (the second) of folder names matching ``pattern`` in text."""

    def __init__(self, pattern: str) -> None:
        self._pattern = re.compile(pattern)

    def __call__(self, text: str) -> str:
        return _SEGMENT.sub(self._segment, text)

    def _segment(self, found: re.Match[str]) -> str:
        segment = found.group()
        match = self._pattern.fullmatch(segment)
        if match is None or match.start(2) < 0:
            return segment
        return segment[: match.start(2)] + "***" + segment[match.end(2) :]


def _redacted(value: Any, redact: FolderNameRedactor) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_redacted(item, redact) for item in value]
    if isinstance(value, dict):
        return {key: _redacted(item, redact) for key, item in value.items()}
    return redact(str(value)) if hasattr(value, "__fspath__") else value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context and extra fields."""

    def __init__(self, redact: FolderNameRedactor | None = None) -> None:
        super().__init__()
        self.redact = redact

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
        if self.redact is not None and record.levelno > logging.DEBUG:
            entry = _redacted(entry, self.redact)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def __init__(self, fmt: str, redact: FolderNameRedactor | None = None) -> None:
        super().__init__(fmt)
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in _context.get().items())
        line = f"{line} [{fields}]" if fields else line
        if self.redact is not None and record.levelno > logging.DEBUG:
            line = self.redact(line)
        return line


def configure_logging(settings: LoggingSettings) -> None:
    """Send pacsflow's logs to stderr in the configured format and level."""
    handler = logging.StreamHandler(sys.stderr)
    redact = (
        FolderNameRedactor(settings.redact_folder_pattern)
        if settings.redact_folder_pattern
        else None
    )
    if settings.format == "json":
        handler.setFormatter(JsonFormatter(redact))
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", redact)
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # pynetdicom logs every PDU at INFO/DEBUG; only its warnings matter to an operator.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, root.level))
