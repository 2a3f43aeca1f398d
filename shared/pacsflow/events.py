"""The event catalogue: every message that crosses the bus, as frozen pydantic models.

Each event is an envelope (``type``, ``version``, ``id``, ``time``, ``source``,
``correlation_id``) around a typed ``payload``. On the wire it is JSON; :func:`decode_event`
turns bytes back into the right model and rejects unknown types and versions with a clear error.
Events carry batches (many files in one message) where that saves broker round trips.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Union
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pacsflow.errors import EventError, UnknownEventType, UnsupportedEventVersion

__all__ = [
    "Event",
    "EVENT_TYPES",
    "FileFailed",
    "FileOutcome",
    "FileReady",
    "FileSent",
    "Moved",
    "PatientComplete",
    "ReadyFile",
    "SeriesMissing",
    "Source",
    "StudyComplete",
    "decode_event",
    "encode_event",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Model):
    """Who emitted an event: the service and its instance (host, pod or process name)."""

    service: str
    instance: str


def _now() -> datetime:
    return datetime.now(UTC)


class _Envelope(_Model):
    version: int = 1
    id: UUID = Field(default_factory=uuid4)
    time: datetime = Field(default_factory=_now)
    source: Source
    # Ties together the events of one piece of work (a folder, a study, a harvest).
    correlation_id: str | None = None


# --- payload parts -------------------------------------------------------------------------


class ReadyFile(_Model):
    """One DICOM file that is validated and ready to send."""

    path: str
    size: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str


class FileOutcome(_Model):
    """What happened to one file at one destination."""

    path: str
    sop_instance_uid: str
    destination: str
    status: int | None = None  # the DIMSE status; None when no answer came (network error)
    attempts: int = 1
    error: str | None = None


# --- payloads ----------------------------------------------------------------------------


class FileReadyPayload(_Model):
    files: list[ReadyFile]
    # Node names from the configuration; empty means the uploader's default destinations.
    destinations: list[str] = []
    batch_key: str


class FileOutcomePayload(_Model):
    files: list[FileOutcome]


class SeriesMissingPayload(_Model):
    requested_by: Literal["sync", "harvester"]
    source_ae: str
    destination_ae: str
    study_instance_uid: str
    series_instance_uid: str
    expected_images: int | None = None
    reason: str


class MovedPayload(_Model):
    requested_by: Literal["sync", "harvester"]
    source_ae: str
    destination_ae: str
    study_instance_uid: str
    series_instance_uid: str
    completed: int
    failed: int
    warning: int
    duration_seconds: float
    status: Literal["success", "partial", "failed"]
    error: str | None = None


class StudyCompletePayload(_Model):
    route: str
    study_instance_uid: str
    patient_id: str
    study_description: str = ""
    files_received: int
    # Files added since the previous notification of the same study (it was re-opened).
    files_new: int
    # 1 for the first completion, 2 and up when late instances re-opened the study.
    completion: int = 1
    storage_path: str
    first_received: datetime
    last_received: datetime


class PatientCompletePayload(_Model):
    patient_id: str
    series_count: int
    instances: int
    archive_path: str


# --- events ------------------------------------------------------------------------------


class FileReady(_Envelope):
    type: Literal["file-ready"] = "file-ready"
    payload: FileReadyPayload


class FileSent(_Envelope):
    type: Literal["file-sent"] = "file-sent"
    payload: FileOutcomePayload


class FileFailed(_Envelope):
    type: Literal["file-failed"] = "file-failed"
    payload: FileOutcomePayload


class SeriesMissing(_Envelope):
    type: Literal["series-missing"] = "series-missing"
    payload: SeriesMissingPayload


class Moved(_Envelope):
    type: Literal["moved"] = "moved"
    payload: MovedPayload


class StudyComplete(_Envelope):
    type: Literal["study-complete"] = "study-complete"
    payload: StudyCompletePayload


class PatientComplete(_Envelope):
    type: Literal["patient-complete"] = "patient-complete"
    payload: PatientCompletePayload


Event = Annotated[
    Union[FileReady, FileSent, FileFailed, SeriesMissing, Moved, StudyComplete, PatientComplete],
    Field(discriminator="type"),
]

#: event type -> the versions this code understands
EVENT_TYPES: dict[str, frozenset[int]] = {
    "file-ready": frozenset({1}),
    "file-sent": frozenset({1}),
    "file-failed": frozenset({1}),
    "series-missing": frozenset({1}),
    "moved": frozenset({1}),
    "study-complete": frozenset({1}),
    "patient-complete": frozenset({1}),
}

_event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def encode_event(event: Event) -> bytes:
    """The event as JSON bytes for the wire."""
    return event.model_dump_json().encode()


def decode_event(data: bytes | str | dict[str, Any]) -> Event:
    """Parse and validate an event; raise an :class:`EventError` subclass on bad input."""
    if not isinstance(data, dict):
        # The common case in one pass of pydantic's own JSON parser (half the time of
        # json.loads and then validating the objects); bad input takes the path below, which
        # says what is wrong with it.
        try:
            event = _event_adapter.validate_json(data)
        except ValueError:  # ValidationError included
            pass
        else:
            _check_version(event.type, event.version)
            return event
    if isinstance(data, dict):
        raw = data
    else:
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise EventError(f"event is not JSON: {err}") from err
    if not isinstance(raw, dict):
        raise EventError("event is not a JSON object")
    event_type = raw.get("type")
    if event_type not in EVENT_TYPES:
        raise UnknownEventType(f"unknown event type {event_type!r}")
    _check_version(event_type, raw.get("version", 1))
    try:
        return _event_adapter.validate_python(raw)
    except ValidationError as err:
        raise EventError(f"invalid {event_type} event: {err}") from err


def _check_version(event_type: str, version: object) -> None:
    if version not in EVENT_TYPES[event_type]:
        raise UnsupportedEventVersion(
            f"event type {event_type!r} version {version!r} is not supported "
            f"(supported: {sorted(EVENT_TYPES[event_type])})"
        )
