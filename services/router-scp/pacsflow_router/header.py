"""The few header values the router needs, read straight from received data set bytes.

Routing needs nine top-level elements, all in groups 0008 to 0020: the walk reads element
headers with ``struct.unpack_from`` and stops at the first tag after Series Instance UID, so
it never looks at the rest of the header nor at the pixel data. pydicom's reader would cost
several hundred microseconds per instance (it builds an element for every tag), more than
the rest of a small C-STORE. Encodings follow PS3.5 7.1 (explicit and implicit VR, either
byte order) and 7.5 (sequences of defined or undefined length are skipped).
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

from pacsflow.errors import InvalidDicom
from pydicom.charset import convert_encodings, decode_bytes

__all__ = ["Header", "scan_header"]

_CHARSET = 0x00080005
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY_DATE = 0x00080020
_STUDY_TIME = 0x00080030
_STUDY_DESCRIPTION = 0x00081030
_PATIENT_ID = 0x00100020
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_WANTED = frozenset(
    {_CHARSET, _SOP_CLASS, _SOP_INSTANCE, _STUDY_DATE, _STUDY_TIME, _STUDY_DESCRIPTION,
     _PATIENT_ID, _STUDY_UID, _SERIES_UID}
)  # fmt: skip
_LAST_WANTED = max(_WANTED)

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
# Nesting deeper than this is hostile input, not a data set.
_MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Header:
    """What routing and study tracking read from one instance (values without padding)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    study_date: str
    study_time: str
    study_description: str


# (tag+length, tag+VR+short length, long length) for little and big endian.
_STRUCTS = {
    little: (struct.Struct(prefix + "HHI"), struct.Struct(prefix + "HH2sH"), struct.Struct(prefix + "I"))
    for little, prefix in ((True, "<"), (False, ">"))
}  # fmt: skip


class _Walker:
    def __init__(self, data: bytes, implicit: bool, little: bool) -> None:
        self.data = data
        self.size = len(data)
        self.implicit = implicit
        self.tag_length, self.tag_vr_length, self.length32 = _STRUCTS[little]

    def element(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR, value length, value offset) of the element at ``pos``."""
        if pos + 8 > self.size:
            raise InvalidDicom("truncated: the data set ends inside an element header")
        group, elem, length = self.tag_length.unpack_from(self.data, pos)
        if implicit or group == 0xFFFE:
            return (group << 16) | elem, None, length, pos + 8
        _g, _e, vr, short = self.tag_vr_length.unpack_from(self.data, pos)
        if vr in _LONG_VRS:
            if pos + 12 > self.size:
                raise InvalidDicom("truncated: the data set ends inside an element header")
            return (
                (group << 16) | elem,
                vr,
                self.length32.unpack_from(self.data, pos + 8)[0],
                pos + 12,
            )
        return (group << 16) | elem, vr, short, pos + 8

    def top_level(self) -> dict[int, bytes]:
        # element() inlined, with everything in locals: this loop runs for every element
        # before Series Instance UID of every instance received.
        data, size, implicit = self.data, self.size, self.implicit
        tag_length, tag_vr_length = self.tag_length.unpack_from, self.tag_vr_length.unpack_from
        length32 = self.length32.unpack_from
        found: dict[int, bytes] = {}
        pos = 0
        while pos < size:
            if pos + 8 > size:
                raise InvalidDicom("truncated: the data set ends inside an element header")
            vr: bytes | None = None
            if implicit:
                group, elem, length = tag_length(data, pos)
                start = pos + 8
            else:
                group, elem, vr, length = tag_vr_length(data, pos)
                start = pos + 8
                if group == 0xFFFE:
                    vr, length = None, tag_length(data, pos)[2]
                elif vr in _LONG_VRS:
                    if pos + 12 > size:
                        raise InvalidDicom(
                            "truncated: the data set ends inside an element header")
                    length, start = length32(data, pos + 8)[0], pos + 12
            tag = (group << 16) | elem
            if tag > _LAST_WANTED:
                break
            if length == _UNDEFINED:
                pos = self.skip_sequence(start, implicit or vr == b"UN", 1)
                continue
            end = start + length
            if end > size:
                raise InvalidDicom("truncated: the data set ends inside an element value")
            if tag in _WANTED:
                found[tag] = data[start:end]
            pos = end
        return found

    def skip_sequence(self, pos: int, implicit: bool, depth: int) -> int:
        # Undefined-length UN holds an implicit VR little endian sequence (PS3.5 6.2.2).
        if depth > _MAX_DEPTH:
            raise InvalidDicom("sequences nested too deeply")
        while True:
            tag, _vr, length, start = self.element(pos, True)
            if tag == _SEQUENCE_END:
                return start
            if tag != _ITEM:
                raise InvalidDicom(f"damaged sequence: ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            pos = self.skip_item(start, implicit, depth) if length == _UNDEFINED else start + length

    def skip_item(self, pos: int, implicit: bool, depth: int) -> int:
        while True:
            tag, vr, length, start = self.element(pos, implicit)
            if tag == _ITEM_END:
                return start
            if length == _UNDEFINED:
                pos = self.skip_sequence(start, implicit or vr == b"UN", depth + 1)
            else:
                pos = start + length


def _text(raw: bytes | None) -> str:
    if not raw:
        return ""
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace").strip()


@functools.lru_cache(maxsize=1024)
def _decoded(raw: bytes, charset: bytes) -> str:
    encodings = [part.strip() for part in charset.decode("ascii", "replace").split("\\")]
    try:
        return decode_bytes(raw, convert_encodings(encodings), set()).strip(" \x00")
    except (LookupError, ValueError):
        return raw.decode("latin-1").strip(" \x00")


def _string(raw: bytes | None, charset: bytes) -> str:
    if not raw:
        return ""
    if raw.isascii():
        return raw.decode("ascii").strip(" \x00")
    return _decoded(bytes(raw), charset)


def scan_header(data: bytes, transfer_syntax_uid: str) -> Header:
    """The routing values of encoded data set bytes; InvalidDicom when they cannot be read.

    SOP Instance UID is required; the other values are empty strings when missing.
    """
    if transfer_syntax_uid == _DEFLATED:
        # Only the start is needed: the first MiB of inflated bytes holds groups 0008-0020.
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, 1 << 20)
        except zlib.error as err:
            raise InvalidDicom(f"damaged deflated data set: {err}") from err
    walker = _Walker(
        data,
        implicit=transfer_syntax_uid == _IMPLICIT_LE,
        little=transfer_syntax_uid != _EXPLICIT_BE,
    )
    try:
        found = walker.top_level()
    except struct.error as err:
        raise InvalidDicom(f"damaged data set: {err}") from err
    sop_instance_uid = _text(found.get(_SOP_INSTANCE))
    if not sop_instance_uid:
        raise InvalidDicom("the data set has no SOP Instance UID")
    charset = bytes(found.get(_CHARSET) or b"")
    return Header(
        sop_class_uid=_text(found.get(_SOP_CLASS)),
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=_text(found.get(_STUDY_UID)),
        series_instance_uid=_text(found.get(_SERIES_UID)),
        patient_id=_string(found.get(_PATIENT_ID), charset),
        study_date=_text(found.get(_STUDY_DATE)),
        study_time=_text(found.get(_STUDY_TIME)),
        study_description=_string(found.get(_STUDY_DESCRIPTION), charset),
    )
