"""Rendering: the seed's wording and more, re-opened studies, templates, and header safety."""

from __future__ import annotations

import email
import email.policy
import unicodedata
from pathlib import Path

import pytest

from pacsflow.config import NotifierSettings
from pacsflow.errors import ConfigError
from pacsflow.events import PatientCompletePayload

from pacsflow_notifier.channels import build_email
from pacsflow_notifier.messages import (
    AlertSummary,
    Renderer,
    check_templates,
    clean_header,
    format_duration,
)
from pacsflow_notifier.outbox import OutboxMessage

from .support import study_complete


def renderer(**settings: object) -> Renderer:
    notifier = NotifierSettings(timezone="Europe/Zurich", **settings)  # type: ignore[arg-type]
    return Renderer(notifier, "nas-1")


def as_outbox(subject: str, text: str = "body\n", html: str | None = None) -> OutboxMessage:
    return OutboxMessage(
        id="0123456789abcdef0123456789abcdef", channel="email", target="", kind="study-complete",
        source="event:x", recipients=("research@hospital.example",), subject=subject, text=text,
        html=html, json_body=None, attempts=0, created_at=1_790_000_000.0,
    )


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


class TestStudyComplete:
    def test_subject_has_the_seed_wording_and_the_description(self) -> None:
        rendered = renderer().study_complete(study_complete().payload)
        assert rendered.subject == (
            "CT_RESEARCH TRANSFER SUCCESS for 4707 files "
            "(total number of files received: 4707) CT THORAX MIT KM"
        )

    def test_body_has_description_destination_times_and_duration(self) -> None:
        text = renderer().study_complete(study_complete().payload).text
        assert text.startswith(
            "CT_RESEARCH TRANSFER SUCCESS for 4707 files (total number of files received: 4707)\n"
        )
        assert "Study:              CT THORAX MIT KM\n" in text
        assert "Stored in:          /data/storage/CT_RESEARCH/1.2.826.0.1.3680043.8.498.1\n" in text
        # 08:00 UTC is 09:00 in Zurich in November.
        assert "First received:     2026-11-23 09:00:00 CET\n" in text
        assert "Last received:      2026-11-23 09:12:05 CET\n" in text
        assert "Duration:           12 min 05 s\n" in text
        assert "RE-OPENED" not in text
        assert "\n\n\n" not in text

    def test_reopened_study_is_marked_with_more_files(self) -> None:
        payload = study_complete(files_received=4719, files_new=12, completion=2).payload
        rendered = renderer().study_complete(payload)
        assert rendered.subject.startswith(
            "CT_RESEARCH TRANSFER SUCCESS for 12 more files (total number of files received: 4719)"
        )
        assert "RE-OPENED: 12 more files arrived after the study was reported complete; " \
               "this is notification 2 for it." in rendered.text

    def test_empty_description_leaves_no_trailing_space(self) -> None:
        rendered = renderer().study_complete(study_complete(study_description="").payload)
        assert rendered.subject.endswith("(total number of files received: 4707)")

    def test_one_file_is_singular(self) -> None:
        rendered = renderer().study_complete(
            study_complete(files_received=1, files_new=1).payload
        )
        assert "for 1 file (total" in rendered.subject

    def test_facts_for_json_webhooks(self) -> None:
        facts = renderer().study_complete(study_complete().payload).facts
        assert facts["files_received"] == 4707
        assert facts["duration_seconds"] == 725.0
        assert facts["first_received"] == "2026-11-23T08:00:00+00:00"


def test_patient_complete() -> None:
    payload = PatientCompletePayload(
        patient_id="PAT-7", series_count=1, instances=212, archive_path="/harvest/PAT-7.zip"
    )
    rendered = renderer().patient_complete(payload)
    assert rendered.subject == "HARVEST COMPLETE for patient PAT-7: 1 series, 212 images"
    assert "Archive: /harvest/PAT-7.zip\n" in rendered.text
    assert rendered.facts["instances"] == 212


class TestHeaderSafety:
    @pytest.mark.parametrize(
        "description",
        [
            "CT\r\nBcc: victim@evil.example",
            "CT\nBcc: victim@evil.example\n\nfake body",
            "CT\rX-Injected: yes",
            "CT\u2028Bcc: victim@evil.example",  # Unicode line separator
            "CT\x85Bcc: victim@evil.example",  # NEL
        ],
    )
    def test_description_cannot_add_headers(self, description: str) -> None:
        rendered = renderer().study_complete(study_complete(study_description=description).payload)
        assert not [c for c in rendered.subject if unicodedata.category(c) in ("Cc", "Zl", "Zp")]
        outgoing = build_email(as_outbox(rendered.subject, rendered.text), "p@h.example")
        mail = parse(outgoing.as_bytes())
        assert mail["Bcc"] is None and mail["X-Injected"] is None
        assert "Bcc: victim@evil.example" in str(mail["Subject"]) or "X-Injected" in str(
            mail["Subject"]
        )
        assert len(mail.get_all("Subject") or []) == 1

    def test_bidi_overrides_are_dropped(self) -> None:
        assert clean_header("CT \u202eTAC") == "CT TAC"

    def test_long_subject_is_cut(self) -> None:
        subject = clean_header("x" * 1000)
        assert len(subject) == 250 and subject.endswith("…")

    def test_non_ascii_subject_is_encoded(self) -> None:
        rendered = renderer().study_complete(
            study_complete(study_description="Schädel nativ").payload
        )
        data = build_email(as_outbox(rendered.subject, rendered.text), "p@h.example").as_bytes()
        data.decode("ascii")  # RFC 2047 encoded words: the raw mail is ASCII
        assert "Schädel nativ" in str(parse(data)["Subject"])


class TestTemplates:
    def test_custom_subject_and_html_with_escaped_values(self) -> None:
        render = renderer(
            templates={
                "study-complete": {
                    "subject": "[${route}] ${study_description}",
                    "html": "<p>${study_description}</p>",
                }
            }
        )
        rendered = render.study_complete(
            study_complete(study_description="<script>alert(1)</script>").payload
        )
        assert rendered.subject == "[CT_RESEARCH] <script>alert(1)</script>"
        assert rendered.html == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
        # the text part keeps the built-in template
        assert "TRANSFER SUCCESS" in rendered.text

    def test_html_becomes_an_alternative_part(self) -> None:
        outgoing = build_email(as_outbox("s", "plain\n", "<p>rich</p>"), "p@h.example")
        mail = parse(outgoing.as_bytes())
        assert mail.get_content_type() == "multipart/alternative"
        assert [part.get_content_type() for part in mail.iter_parts()] == [
            "text/plain", "text/html",
        ]

    def test_unknown_placeholder_names_the_key(self) -> None:
        settings = NotifierSettings(templates={"study-complete": {"subject": "${route} ${nope}"}})
        with pytest.raises(ConfigError, match=r"notifier.templates.study-complete.subject: "
                                              r"unknown placeholder \$\{nope\}"):
            check_templates(settings)

    def test_stray_dollar_names_the_key(self) -> None:
        settings = NotifierSettings(templates={"file-failed": {"text": "costs $5"}})
        with pytest.raises(ConfigError, match="notifier.templates.file-failed.text"):
            check_templates(settings)

    def test_built_in_templates_are_valid(self) -> None:
        check_templates(NotifierSettings())


class TestAlerts:
    def summary(self) -> AlertSummary:
        return AlertSummary(
            kind="file-failed", count=500, first_seen=1_790_000_000.0,
            last_seen=1_790_000_042.0, groups=[("PACS_MAIN", 480), ("PACS_BACKUP", 20)],
            errors=[("DIMSE status 0xA700", 450), ("connection refused", 50)],
            examples=[("PACS_MAIN", f"/in/{i}.dcm", "DIMSE status 0xA700") for i in range(10)],
        )

    def test_failed_files_alert_counts_per_destination_and_error(self) -> None:
        rendered = renderer(alert_window_seconds=60).file_failures(self.summary())
        assert rendered.subject == "FAILED: 500 files could not be sent to PACS_MAIN, PACS_BACKUP"
        assert "By destination:\n  480  PACS_MAIN\n   20  PACS_BACKUP\n" in rendered.text
        assert "Most common errors:\n  450  DIMSE status 0xA700\n   50  connection refused\n" \
            in rendered.text
        assert "  /in/0.dcm -> PACS_MAIN: DIMSE status 0xA700\n" in rendered.text
        assert "  … and 490 more\n" in rendered.text
        assert "at most once every 1 min 00 s" in rendered.text

    def test_dead_letter_alert(self) -> None:
        summary = AlertSummary(
            kind="dead-letters", count=1, first_seen=1_790_000_000.0, last_seen=1_790_000_000.0,
            groups=[("uploader file-ready", 1)], errors=[("rejected by the handler: bad", 1)],
            examples=[("uploader file-ready", "abc", "rejected by the handler: bad")],
        )
        rendered = renderer().alert(summary)
        assert rendered.subject == (
            "DEAD LETTERS: 1 message could not be handled (uploader file-ready)"
        )
        assert "pacsflow dead-letters replay" in rendered.text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (45.4, "45 s"), (252, "4 min 12 s"), (7380, "2 h 03 min"), (273600, "3 d 4 h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_example_configuration_has_the_notifier_keys(tmp_path: Path) -> None:
    from pacsflow.config import load_settings

    example = Path(__file__).parents[2] / "config" / "pacsflow.example.yaml"
    settings = load_settings(example)
    check_templates(settings.notifier)
    assert settings.notifier.alert_window_seconds == 300
