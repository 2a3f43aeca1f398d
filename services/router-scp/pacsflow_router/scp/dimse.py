"""C-STORE and C-ECHO command sets for the router's server: the shared :mod:`pacsflow.dicom.engine.dimse`."""

from __future__ import annotations

from pacsflow.dicom.engine.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    NO_DATA_SET,
    Command,
    encode_response,
)
from pacsflow.dicom.engine.dimse import parse_request as parse_command

__all__ = [
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_STORE_RQ",
    "NO_DATA_SET",
    "Command",
    "encode_response",
    "parse_command",
]
