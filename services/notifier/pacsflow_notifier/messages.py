"""What the notifier says: templates, their variables, and text that is safe in mail headers.

Every kind of message (``study-complete``, ``patient-complete``, ``file-failed``,
``dead-letters``) has built-in templates with ``${name}`` placeholders
(:class:`string.Template`); ``notifier.templates.<kind>`` replaces any part of them
(subject, text, html). Values are cleaned before they are substituted: control characters and
line breaks from a DICOM header or an event become spaces, so nothing in a study description
can start a new mail header; the finished subject is cleaned once more as a whole, and the HTML
part gets HTML-escaped values.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from string import Template
from typing import Any
from zoneinfo import ZoneInfo

from pacsflow.config import NotifierSettings
from pacsflow.errors import ConfigError
from pacsflow.events import PatientCompletePayload, StudyCompletePayload

__all__ = [
    "AlertSummary",
    "Rendered",
    "Renderer",
    "check_templates",
    "clean_header",
    "clean_inline",
    "format_duration",
]

#: the longest subject we write; mail clients show far less anyway
MAX_SUBJECT = 250
#: examples listed in an alert; the rest are counted
MAX_EXAMPLES = 10


# --- cleaning ------------------------------------------------------------------------------


def clean_inline(value: object) -> str:
    """``value`` as one line: control characters and line/paragraph separators become spaces,
    invisible format characters (bidi overrides) are dropped."""
    out = []
    for ch in str(value):
        category = unicodedata.category(ch)
        if category in ("Cc", "Zl", "Zp"):
            out.append(" ")
        elif category != "Cf":
            out.append(ch)
    return "".join(out).strip()


def clean_header(value: object, limit: int = MAX_SUBJECT) -> str:
    """A header value: one line (see :func:`clean_inline`), runs of spaces collapsed, at most
    ``limit`` characters."""
    text = " ".join(clean_inline(value).split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def _tidy_text(text: str) -> str:
    # Empty optional lines (a note that does not apply) must not leave holes in the layout.
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


# --- formatting helpers ------------------------------------------------------------------


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def format_duration(seconds: float) -> str:
    """A duration for people: ``45 s``, ``4 min 12 s``, ``2 h 03 min``, ``3 d 4 h``."""
    total = max(int(round(seconds)), 0)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _table(rows: Sequence[tuple[str, int]], more: int = 0) -> str:
    """Counts and names, one per line, counts right-aligned."""
    if not rows:
        return "  (none)"
    width = max(len(str(count)) for _, count in rows)
    lines = [f"  {count:>{width}}  {clean_inline(name)}" for name, count in rows]
    if more:
        lines.append(f"  … and {more} more")
    return "\n".join(lines)


# --- data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertSummary:
    """What an aggregated alert reports: incidents of one kind, counted and exemplified."""

    kind: str
    count: int
    first_seen: float
    last_seen: float
    #: per destination (failed files) or per service and event type (dead letters), most first
    groups: list[tuple[str, int]]
    #: the most common errors or reasons, most first
    errors: list[tuple[str, int]]
    #: (group, item, error) of the first incidents
    examples: list[tuple[str, str, str]]
    #: how many distinct errors there are beyond ``errors``
    more_errors: int = 0


@dataclass(frozen=True)
class Rendered:
    """One message, ready for any channel."""

    kind: str
    subject: str
    text: str
    html: str | None
    #: plain values for JSON webhooks
    facts: dict[str, Any] = field(default_factory=dict)


# --- built-in templates ------------------------------------------------------------------

_STUDY_SUBJECT = (
    "${route} TRANSFER SUCCESS for ${count_phrase} "
    "(total number of files received: ${files_received}) ${study_description}"
)
_STUDY_TEXT = """\
${route} TRANSFER SUCCESS for ${count_phrase} (total number of files received: ${files_received})

${reopened_note}

Study:              ${study_description}
Patient ID:         ${patient_id}
Study Instance UID: ${study_instance_uid}
Stored in:          ${storage_path}
First received:     ${first_received}
Last received:      ${last_received}
Duration:           ${duration}

Sent by pacsflow on ${instance}.
"""

_PATIENT_SUBJECT = (
    "HARVEST COMPLETE for patient ${patient_id}: ${series_phrase}, ${instances_phrase}"
)
_PATIENT_TEXT = """\
HARVEST COMPLETE for patient ${patient_id}: ${series_phrase}, ${instances_phrase}.

Archive: ${archive_path}

Sent by pacsflow on ${instance}.
"""

_FAILED_SUBJECT = "FAILED: ${files_phrase} could not be sent to ${destinations}"
_FAILED_TEXT = """\
${files_phrase} could not be sent (between ${first_failure} and ${last_failure}).

By destination:
${by_destination}

Most common errors:
${top_errors}

Examples:
${examples}

The uploader gave up on these files after its retries; they stay where they are, and
`pacsflow status` counts them. Failures are reported at most once every ${window}.

Sent by pacsflow on ${instance}.
"""

_DEAD_SUBJECT = "DEAD LETTERS: ${letters_phrase} could not be handled (${queues})"
_DEAD_TEXT = """\
${letters_phrase} could not be handled and wait in the dead letters \
(found between ${first_seen} and ${last_seen}).

By service and event type:
${by_queue}

Most common reasons:
${top_reasons}

Examples:
${examples}

`pacsflow dead-letters list` shows them; once the cause is fixed,
`pacsflow dead-letters replay` hands them to their service again.
Dead letters are reported at most once every ${window}.

Sent by pacsflow on ${instance}.
"""

_DEFAULTS: dict[str, tuple[str, str]] = {
    "study-complete": (_STUDY_SUBJECT, _STUDY_TEXT),
    "patient-complete": (_PATIENT_SUBJECT, _PATIENT_TEXT),
    "file-failed": (_FAILED_SUBJECT, _FAILED_TEXT),
    "dead-letters": (_DEAD_SUBJECT, _DEAD_TEXT),
}

#: the placeholders each kind's templates may use
VARIABLES: dict[str, frozenset[str]] = {
    "study-complete": frozenset({
        "route", "study_instance_uid", "patient_id", "study_description", "files_received",
        "files_new", "completion", "count_phrase", "reopened_note", "storage_path",
        "first_received", "last_received", "duration", "instance",
    }),
    "patient-complete": frozenset({
        "patient_id", "series_count", "instances", "series_phrase", "instances_phrase",
        "archive_path", "instance",
    }),
    "file-failed": frozenset({
        "failed_files", "files_phrase", "destinations", "first_failure", "last_failure",
        "by_destination", "top_errors", "examples", "window", "instance",
    }),
    "dead-letters": frozenset({
        "dead_letters", "letters_phrase", "queues", "first_seen", "last_seen", "by_queue",
        "top_reasons", "examples", "window", "instance",
    }),
}


@dataclass(frozen=True)
class _Templates:
    subject: Template
    text: Template
    html: Template | None


def _templates(settings: NotifierSettings) -> dict[str, _Templates]:
    found = {}
    for kind, (subject, text) in _DEFAULTS.items():
        custom = settings.templates.get(kind)  # type: ignore[call-overload]
        found[kind] = _Templates(
            subject=Template(custom.subject if custom and custom.subject else subject),
            text=Template(custom.text if custom and custom.text else text),
            html=Template(custom.html) if custom and custom.html else None,
        )
    return found


def check_templates(settings: NotifierSettings) -> None:
    """Raise ConfigError naming the template and placeholder that cannot be filled."""
    problems = []
    for kind, templates in _templates(settings).items():
        for part in ("subject", "text", "html"):
            template: Template | None = getattr(templates, part)
            if template is None:
                continue
            key = f"notifier.templates.{kind}.{part}"
            if not template.is_valid():
                problems.append(f"  {key}: a '$' that starts no placeholder (write $$ for '$')")
                continue
            unknown = sorted(set(template.get_identifiers()) - VARIABLES[kind])
            if unknown:
                problems.append(
                    f"  {key}: unknown placeholder {', '.join('${' + u + '}' for u in unknown)}"
                    f" (known: {', '.join(sorted(VARIABLES[kind]))})"
                )
    if problems:
        raise ConfigError("invalid configuration\n" + "\n".join(problems))


# --- rendering ---------------------------------------------------------------------------


class Renderer:
    """Turns events and alert summaries into :class:`Rendered` messages."""

    def __init__(self, settings: NotifierSettings, instance: str) -> None:
        self._templates = _templates(settings)
        self._zone: tzinfo | None = ZoneInfo(settings.timezone) if settings.timezone else None
        self._instance = instance
        self._window = format_duration(settings.alert_window_seconds)

    def _time(self, value: datetime | float) -> str:
        if isinstance(value, (int, float)):
            value = datetime.fromtimestamp(value, UTC)
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        # astimezone(None) is the machine's local zone.
        return value.astimezone(self._zone).strftime("%Y-%m-%d %H:%M:%S %Z").strip()

    def _render(
        self, kind: str, values: Mapping[str, object], facts: dict[str, Any]
    ) -> Rendered:
        templates = self._templates[kind]
        text_values = {name: str(value) for name, value in values.items()}
        subject = clean_header(
            templates.subject.substitute({k: clean_inline(v) for k, v in text_values.items()})
        )
        text = _tidy_text(templates.text.substitute(text_values))
        body_html = None
        if templates.html is not None:
            body_html = templates.html.substitute(
                {k: html.escape(v, quote=True) for k, v in text_values.items()}
            )
        return Rendered(kind=kind, subject=subject, text=text, html=body_html, facts=facts)

    def study_complete(self, payload: StudyCompletePayload) -> Rendered:
        """The message for a completed (or re-opened) study."""
        reopened = payload.completion >= 2
        count_phrase = _plural(payload.files_new, "more file" if reopened else "file")
        note = ""
        if reopened:
            note = (
                f"RE-OPENED: {_plural(payload.files_new, 'more file')} arrived after the study "
                f"was reported complete; this is notification {payload.completion} for it."
            )
        duration = (payload.last_received - payload.first_received).total_seconds()
        values = {
            "route": clean_inline(payload.route),
            "study_instance_uid": clean_inline(payload.study_instance_uid),
            "patient_id": clean_inline(payload.patient_id),
            "study_description": clean_inline(payload.study_description),
            "files_received": payload.files_received,
            "files_new": payload.files_new,
            "completion": payload.completion,
            "count_phrase": count_phrase,
            "reopened_note": note,
            "storage_path": clean_inline(payload.storage_path),
            "first_received": self._time(payload.first_received),
            "last_received": self._time(payload.last_received),
            "duration": format_duration(duration),
            "instance": clean_inline(self._instance),
        }
        facts = {
            "route": values["route"],
            "study_instance_uid": values["study_instance_uid"],
            "patient_id": values["patient_id"],
            "study_description": values["study_description"],
            "files_received": payload.files_received,
            "files_new": payload.files_new,
            "completion": payload.completion,
            "storage_path": values["storage_path"],
            "first_received": payload.first_received.isoformat(),
            "last_received": payload.last_received.isoformat(),
            "duration_seconds": duration,
        }
        return self._render("study-complete", values, facts)

    def patient_complete(self, payload: PatientCompletePayload) -> Rendered:
        """The message for a harvested patient."""
        values = {
            "patient_id": clean_inline(payload.patient_id),
            "series_count": payload.series_count,
            "instances": payload.instances,
            "series_phrase": _plural(payload.series_count, "series", "series"),
            "instances_phrase": _plural(payload.instances, "image"),
            "archive_path": clean_inline(payload.archive_path),
            "instance": clean_inline(self._instance),
        }
        facts = {
            "patient_id": values["patient_id"],
            "series_count": payload.series_count,
            "instances": payload.instances,
            "archive_path": values["archive_path"],
        }
        return self._render("patient-complete", values, facts)

    def _alert_values(self, summary: AlertSummary) -> dict[str, object]:
        more = summary.count - len(summary.examples)
        examples = [
            f"  {clean_inline(item)} -> {clean_inline(group)}: {clean_inline(error)}"
            for group, item, error in summary.examples
        ]
        if more > 0:
            examples.append(f"  … and {more} more")
        return {
            "examples": "\n".join(examples) or "  (none)",
            "window": self._window,
            "instance": clean_inline(self._instance),
        }

    def _alert_facts(self, summary: AlertSummary) -> dict[str, Any]:
        return {
            "count": summary.count,
            "first_seen": datetime.fromtimestamp(summary.first_seen, UTC).isoformat(),
            "last_seen": datetime.fromtimestamp(summary.last_seen, UTC).isoformat(),
            "groups": {clean_inline(name): count for name, count in summary.groups},
            "errors": [
                {"error": clean_inline(error), "count": count} for error, count in summary.errors
            ],
        }

    def file_failures(self, summary: AlertSummary) -> Rendered:
        """The aggregated alert for files the uploader gave up on."""
        values = {
            **self._alert_values(summary),
            "failed_files": summary.count,
            "files_phrase": _plural(summary.count, "file"),
            "destinations": ", ".join(clean_inline(name) for name, _ in summary.groups),
            "first_failure": self._time(summary.first_seen),
            "last_failure": self._time(summary.last_seen),
            "by_destination": _table(summary.groups),
            "top_errors": _table(summary.errors, summary.more_errors),
        }
        return self._render("file-failed", values, self._alert_facts(summary))

    def dead_letters(self, summary: AlertSummary) -> Rendered:
        """The aggregated alert for new dead letters."""
        values = {
            **self._alert_values(summary),
            "dead_letters": summary.count,
            "letters_phrase": _plural(summary.count, "message"),
            "queues": ", ".join(clean_inline(name) for name, _ in summary.groups),
            "first_seen": self._time(summary.first_seen),
            "last_seen": self._time(summary.last_seen),
            "by_queue": _table(summary.groups),
            "top_reasons": _table(summary.errors, summary.more_errors),
        }
        return self._render("dead-letters", values, self._alert_facts(summary))

    def alert(self, summary: AlertSummary) -> Rendered:
        """The alert for a summary of either kind."""
        if summary.kind == "file-failed":
            return self.file_failures(summary)
        return self.dead_letters(summary)
