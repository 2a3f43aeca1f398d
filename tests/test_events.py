"""The event catalogue: round trips, and clear rejection of what it does not know."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from pacsflow import events as ev
from pacsflow.errors import EventError, UnknownEventType, UnsupportedEventVersion

SOURCE = ev.Source(service="test", instance="host-1")
NOW = datetime(2026, 11, 23, 8, 30, tzinfo=UTC)


def samples() -> list[ev.Event]:
    ready = ev.ReadyFile(
        path="/in/a.dcm", size=1024, sop_instance_uid="1.2.3.4", series_instance_uid="1.2.3",
        study_instance_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    outcome = ev.FileOutcome(path="/in/a.dcm", sop_instance_uid="1.2.3.4", destination="pacs",
                             status=0xA700, attempts=3, error="Out of resources")
    missing = dict(source_ae="REMOTE", destination_ae="LOCAL", study_instance_uid="1.2",
                   series_instance_uid="1.2.3")
    return [
        ev.FileReady(source=SOURCE, correlation_id="folder-1", payload=ev.FileReadyPayload(
            files=[ready], destinations=["pacs"], batch_key="folder-1")),
        ev.FileSent(source=SOURCE, payload=ev.FileOutcomePayload(files=[outcome])),
        ev.FileFailed(source=SOURCE, payload=ev.FileOutcomePayload(files=[outcome])),
        ev.SeriesMissing(source=SOURCE, payload=ev.SeriesMissingPayload(
            requested_by="sync", expected_images=12, reason="missing locally", **missing)),
        ev.Moved(source=SOURCE, payload=ev.MovedPayload(
            requested_by="harvester", completed=11, failed=1, warning=0, duration_seconds=2.5,
            status="partial", **missing)),
        ev.StudyComplete(source=SOURCE, payload=ev.StudyCompletePayload(
            route="MRI", study_instance_uid="1.2", patient_id="12345",
            study_description="MR Brain", files_received=4707, files_new=4707,
            storage_path="/data/MRI/12345", first_received=NOW, last_received=NOW)),
        ev.PatientComplete(source=SOURCE, payload=ev.PatientCompletePayload(
            patient_id="12345", series_count=6, instances=900, archive_path="/z/12345.zip")),
    ]


class TestCatalogue:
    def test_every_type_is_in_the_catalogue(self) -> None:
        assert {event.type for event in samples()} == set(ev.EVENT_TYPES)

    @pytest.mark.parametrize("event", samples(), ids=lambda e: e.type)
    def test_round_trip(self, event: ev.Event) -> None:
        decoded = ev.decode_event(ev.encode_event(event))
        assert decoded == event
        assert type(decoded) is type(event)

    def test_envelope_fields(self) -> None:
        wire = json.loads(ev.encode_event(samples()[0]))
        assert set(wire) == {"type", "version", "id", "time", "source", "correlation_id",
                             "payload"}
        assert wire["source"] == {"service": "test", "instance": "host-1"}

    def test_events_are_frozen(self) -> None:
        with pytest.raises(ValidationError):
            samples()[0].version = 2  # type: ignore[misc]

    def test_every_event_gets_its_own_id(self) -> None:
        assert samples()[0].id != samples()[0].id


class TestRejection:
    def wire(self, **changes: object) -> bytes:
        raw = json.loads(ev.encode_event(samples()[0]))
        raw.update(changes)
        return json.dumps(raw).encode()

    def test_unknown_type(self) -> None:
        with pytest.raises(UnknownEventType, match="'file-exploded'"):
            ev.decode_event(self.wire(type="file-exploded"))

    def test_unknown_version(self) -> None:
        with pytest.raises(UnsupportedEventVersion, match="version 7"):
            ev.decode_event(self.wire(version=7))

    def test_unknown_field(self) -> None:
        with pytest.raises(EventError, match="invalid file-ready"):
            ev.decode_event(self.wire(colour="red"))

    def test_missing_payload_field(self) -> None:
        raw = json.loads(self.wire())
        del raw["payload"]["batch_key"]
        with pytest.raises(EventError, match="batch_key"):
            ev.decode_event(raw)

    @pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b"\xff\xfe"])
    def test_not_an_event(self, data: bytes) -> None:
        with pytest.raises(EventError):
            ev.decode_event(data)
