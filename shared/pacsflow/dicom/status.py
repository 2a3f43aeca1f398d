"""DIMSE status codes as data: the codes pacsflow sends or reads, and their category.

This module owns the status layer of :mod:`pacsflow.dicom`: every other module asks it what a
status means instead of comparing numbers. Categories follow PS3.7 Annex C and the service
tables of PS3.4 (B.2.3 Storage, C.4 Query/Retrieve): a code never seen before still gets the
category its range says.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

__all__ = ["Status", "StatusCategory", "category", "describe", "is_ok"]

StatusCategory = Literal["success", "warning", "failure", "pending", "cancel"]


class Status(IntEnum):
    """The DIMSE status codes pacsflow uses by name (PS3.7 Annex C, PS3.4 B.2.3 and C.4)."""

    SUCCESS = 0x0000
    # PS3.7 C.3: a warning with no further meaning
    WARNING = 0x0001
    ATTRIBUTE_LIST_ERROR = 0x0107
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
    # Storage warnings (PS3.4 B.2.3)
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # Query/Retrieve (PS3.4 C.4.2.1.5): the same code means "sub-operations complete,
    # one or more failures or warnings" in a C-MOVE or C-GET response.
    SUB_OPERATIONS_COMPLETE_WITH_FAILURES = 0xB000

    PENDING = 0xFF00
    PENDING_WITH_OPTIONAL_KEYS_MISSING = 0xFF01
    CANCEL = 0xFE00

    # General failures (PS3.7 C.4)
    PROCESSING_FAILURE = 0x0110
    NO_SUCH_SOP_CLASS = 0x0118
    INVALID_SOP_INSTANCE = 0x0117
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    # Storage and Query/Retrieve failures (PS3.4 B.2.3, C.4)
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_NUMBER_OF_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    # The code pynetdicom (and pacsflow) answers when a handler raised (C000-CFFF range).
    HANDLER_FAILED = 0xC211


def category(status: int) -> StatusCategory:
    """The category of a DIMSE status code (PS3.7 C.1-C.5; ranges from PS3.4)."""
    if status == 0x0000:
        return "success"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def is_ok(status: int) -> bool:
    """True when the peer did what was asked: success or warning."""
    return category(status) in ("success", "warning")


def describe(status: int) -> str:
    """A short text for logs and error messages, e.g. ``0xA900 (failure)``."""
    if status == 0xB000 or status not in _NAMED:
        # 0xB000 means different things to C-STORE and to C-MOVE/C-GET: no name.
        return f"0x{status:04X} ({category(status)})"
    name = Status(status).name.lower().replace("_", " ")
    return f"0x{status:04X} ({category(status)}: {name})"


_NAMED = frozenset(int(member) for member in Status)
