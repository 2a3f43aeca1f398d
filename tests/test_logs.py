"""Log lines above DEBUG never show the patient name an import folder's name carries."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from pacsflow.config import LoggingSettings, Settings
from pacsflow.logs import FolderNameRedactor, configure_logging

DEFAULT = r"^#([0-9]+)-([#^A-Za-z0-9]+)$"
KOREAN = r"^#([0-9]+)-(\w+)$"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("invalid file /in/#12345-HongGildong/s1/1.dcm: truncated",
         "invalid file /in/#12345-***/s1/1.dcm: truncated"),
        ("unit #12345-HongGildong ready", "unit #12345-*** ready"),
        ("'#7-Kim^Younghee' and \"#8-Lee\"", "'#7-***' and \"#8-***\""),
        ("batch=#1-A,#2-B", "batch=#1-***,#2-***"),
        ("announced 4 file(s) of #1004-Hong@20261123_075409",
         "announced 4 file(s) of #1004-***@20261123_075409"),
        # Not an identity folder: untouched.
        ("/in/#12345/series/#x-Name/1.dcm", "/in/#12345/series/#x-Name/1.dcm"),
        ("study 1.2.840.113619 complete", "study 1.2.840.113619 complete"),
    ],
)  # fmt: skip
def test_redactor_masks_only_the_name_group(text: str, expected: str) -> None:
    assert FolderNameRedactor(DEFAULT)(text) == expected


def test_redactor_with_a_pattern_for_korean_names() -> None:
    redact = FolderNameRedactor(KOREAN)
    assert redact("/import/#1001-홍길동/a/1.dcm") == "/import/#1001-***/a/1.dcm"


def _logged(fmt: str, level: int, pattern: str | None) -> str:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(LoggingSettings(level="DEBUG", format=fmt,  # type: ignore[arg-type]
                                          redact_folder_pattern=pattern))
        root.handlers[0].stream = stream  # type: ignore[attr-defined]
        log = logging.getLogger("pacsflow.test")
        try:
            raise OSError(f"cannot open {Path('/in/#5-HongGildong/1.dcm')}")
        except OSError:
            log.log(level, "failed on %s", Path("/in/#5-HongGildong/1.dcm"),
                    exc_info=True, extra={"unit": Path("/in/#5-HongGildong")})
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_lines_above_debug_are_masked_message_fields_and_traceback(fmt: str) -> None:
    line = _logged(fmt, logging.WARNING, DEFAULT)
    assert "HongGildong" not in line and "#5-***" in line
    if fmt == "json":
        entry = json.loads(line)
        assert entry["unit"] == "/in/#5-***" and "#5-***" in entry["exception"]


def test_debug_lines_keep_the_name_and_no_pattern_means_no_masking() -> None:
    assert "HongGildong" in _logged("json", logging.DEBUG, DEFAULT)
    assert "HongGildong" in _logged("json", logging.WARNING, None)


def test_the_watchers_rename_pattern_is_masked_unless_told_otherwise() -> None:
    settings = Settings(watcher={"rename_pattern": DEFAULT})  # type: ignore[arg-type]
    assert settings.logging.redact_folder_pattern == DEFAULT
    own = Settings(watcher={"rename_pattern": DEFAULT},  # type: ignore[arg-type]
                   logging={"redact_folder_pattern": KOREAN})  # type: ignore[arg-type]
    assert own.logging.redact_folder_pattern == KOREAN
    with pytest.raises(ValueError, match="two groups"):
        LoggingSettings(redact_folder_pattern=r"^#([0-9]+)$")
