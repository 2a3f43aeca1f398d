"""The error tree of pacsflow.

* PacsflowError
  + ConfigError            bad configuration (names the file and the key)
  + EventError             an event that cannot be decoded
    - UnknownEventType
    - UnsupportedEventVersion
  + BusError               the event bus cannot publish or consume
  + StoreError             the state store cannot read or write
  + DicomError             DICOM networking and file errors
    - AssociationRejected  the peer rejected or aborted the association
    - DimseFailure(status) the peer answered a failure status
    - InvalidDicom(reason) a file is not DICOM or is damaged
"""

from __future__ import annotations


class PacsflowError(Exception):
    """Base of every error pacsflow raises on purpose."""


class ConfigError(PacsflowError):
    """Configuration is missing or invalid; the message names the file and the key."""


class EventError(PacsflowError):
    """An event could not be decoded or validated."""


class UnknownEventType(EventError):
    """The envelope names an event type that is not in the catalogue."""


class UnsupportedEventVersion(EventError):
    """The event type is known but not in this version."""


class BusError(PacsflowError):
    """The event bus failed to publish, consume or settle a message."""


class StoreError(PacsflowError):
    """The state store failed."""


class DicomError(PacsflowError):
    """DICOM networking or file handling failed."""


class AssociationRejected(DicomError):
    """The peer rejected, aborted or never answered the association request."""


class DimseFailure(DicomError):
    """The peer answered a DIMSE failure status."""

    def __init__(self, status: int, message: str = "") -> None:
        self.status = status
        super().__init__(message or f"DIMSE failure status 0x{status:04X}")


class InvalidDicom(DicomError):
    """A file is not DICOM, or is damaged; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
