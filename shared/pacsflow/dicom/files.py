"""Part 10 files as bytes: read what identifies a file, write received data sets.

This module owns the file layer of :mod:`pacsflow.dicom` (PS3.10 Section 7). Reading stops
before the pixel data: only the file meta, the identifying UIDs and the place where the data
set starts are taken, so a sender can stream the encoded data set as it is on disk. Writing
puts a preamble, ``DICM`` and a file meta group in front of data set bytes received from the
network, without decoding or re-encoding them, and renames the result into place.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import uuid
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacsflow.dicom.transport import skip_written
from pacsflow.errors import InvalidDicom

__all__ = [
    "MAX_INFLATED_BYTES",
    "MAX_SEQUENCE_DEPTH",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "PartTenFile",
    "encode_file_meta",
    "read_dataset_header",
    "read_part10",
    "scan_identifiers",
    "write_part10",
]

#: pacsflow's Implementation Class UID (PS3.7 D.3.3.2): a UUID-derived UID (PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.UUID("6f1d5e0c-3a52-4b8e-9a3c-7c1b2e6d4f10").int)
#: at most 16 characters (PS3.7 D.3.3.2)
IMPLEMENTATION_VERSION_NAME = "PACSFLOW_010"
#: a deflated data set inflating beyond this is refused (a decompression bomb)
MAX_INFLATED_BYTES = 1 << 30
#: sequences nested deeper are refused; real objects nest a handful of levels
MAX_SEQUENCE_DEPTH = 64

_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
# Float Pixel Data, Double Float Pixel Data, Pixel Data: the bulk the readers never touch.
_FIRST_PIXEL_TAG = 0x7FE00008
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# VRs whose explicit-VR header is 12 bytes (PS3.5 7.1.2); the pixel data VRs are among them.
_LONG_HEADER_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_KNOWN_VRS = frozenset(
    {
        "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD",
        "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI",
        "UL", "UN", "UR", "US", "UT", "UV",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PartTenFile:
    """What identifies a DICOM file on disk, read without its pixel data."""

    path: Path
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    transfer_syntax_uid: str
    #: byte offset where the encoded data set starts (after preamble and file meta, if any)
    dataset_offset: int
    #: raw values of the top-level elements asked for with ``extra_tags`` (tag -> bytes)
    extra: dict[int, bytes] | None = None
    #: where pixel data starts, as (element offset, header length, value length); None when
    #: the data set has none. Offsets are in the file, except in a deflated data set.
    pixel_data: tuple[int, int, int] | None = None

    @property
    def presentation(self) -> tuple[str, str]:
        """The (SOP Class UID, Transfer Syntax UID) pair a sender must negotiate."""
        return (self.sop_class_uid, self.transfer_syntax_uid)


def _encoding_of(transfer_syntax_uid: str) -> tuple[bool, bool]:
    """(is_implicit_VR, is_little_endian) of a transfer syntax's data set encoding."""
    if transfer_syntax_uid == ImplicitVRLittleEndian:
        return True, True
    if transfer_syntax_uid == ExplicitVRBigEndian:
        return False, False
    # Every other standard syntax, encapsulated ones included, is explicit VR little
    # endian (PS3.5 A.4); deflate is undone before parsing.
    return False, True


def _guess_raw_encoding(first_bytes: bytes) -> str:
    """The transfer syntax of a data set with no file meta, from its first element."""
    group_le = struct.unpack("<H", first_bytes[:2])[0]
    vr = first_bytes[4:6]
    if vr.isalpha() and vr.decode("ascii") in _KNOWN_VRS:
        # Explicit VR; big endian when the group only makes sense read big endian.
        return ExplicitVRBigEndian if group_le >= 0x0400 else ExplicitVRLittleEndian
    return ImplicitVRLittleEndian


def _looks_like_raw_dataset(first_bytes: bytes) -> bool:
    """True when a file with no ``DICM`` prefix starts like file meta or a data set."""
    if len(first_bytes) < 8:
        return False
    group_le, group_be = (
        struct.unpack("<H", first_bytes[:2])[0],
        struct.unpack(">H", first_bytes[:2])[0],
    )
    # A data set starts with group 0008 (Specific Character Set, SOP Class UID, ...) and a
    # file written without preamble starts with its file meta, group 0002.
    return group_le in (0x0002, 0x0008) or group_be == 0x0008


def _check_uid(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    if len(value) > 64 or not _UID_PATTERN.match(value):
        raise InvalidDicom(f"{name} {value[:70]!r} is not a UID")
    return value


def _uid_value(raw_value: bytes | None) -> str | None:
    if raw_value is None:
        return None
    text = raw_value.rstrip(b"\x00 ").decode("ascii", errors="replace")
    return text or None


def _explicit_vr_is_plausible(first_bytes: bytes) -> bool:
    vr = first_bytes[4:6]
    return len(vr) == 2 and vr.isalpha() and vr.decode("ascii") in _KNOWN_VRS


@dataclass(frozen=True, slots=True)
class _Identifiers:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    found: dict[int, bytes]
    pixel_data: tuple[int, int, int] | None


_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF


class _ElementWalker:
    """Walks encoded elements by their headers, seeking over values (PS3.5 7.1, 7.5).

    pydicom's element generator costs about 4 us per element; a CT header has hundreds of
    elements and the sender reads every file, so this walker only unpacks headers.
    """

    def __init__(self, fp: BinaryIO, is_implicit_vr: bool, is_little_endian: bool) -> None:
        self.fp = fp
        self.is_implicit_vr = is_implicit_vr
        prefix = "<" if is_little_endian else ">"
        self.tag_and_length = struct.Struct(prefix + "HHI")
        self.tag_vr_short_length = struct.Struct(prefix + "HH2sH")
        self.long_length = struct.Struct(prefix + "I")
        self.little_endian_reader: _ElementWalker | None = None

    def _header(self, implicit: bool) -> tuple[int, bytes | None, int, int] | None:
        """(tag, VR, value length, header length) of the next element; None at the end."""
        raw = self.fp.read(8)
        if len(raw) < 8:
            if raw:
                raise InvalidDicom("truncated: the file ends inside an element header")
            return None
        group, element, length = self.tag_and_length.unpack(raw)
        tag = group << 16 | element
        # Items and delimiters have no VR in any transfer syntax (PS3.5 7.5).
        if implicit or group == 0xFFFE:
            return tag, None, length, 8
        _group, _element, vr, short_length = self.tag_vr_short_length.unpack(raw)
        if vr in _LONG_HEADER_VR_BYTES:
            extra = self.fp.read(4)
            if len(extra) < 4:
                raise InvalidDicom("truncated: the file ends inside an element header")
            return tag, vr, self.long_length.unpack(extra)[0], 12
        return tag, vr, short_length, 8

    def walk(self, wanted: frozenset[int]) -> tuple[dict[int, bytes], tuple[int, int, int] | None]:
        """Values of the ``wanted`` top-level tags, and (offset, header length, value length)
        of the first pixel data element, or None when the data set ends first."""
        if isinstance(self.fp, BytesIO):
            return self._walk_in_memory(self.fp, wanted)
        found: dict[int, bytes] = {}
        while True:
            start = self.fp.tell()
            header = self._header(self.is_implicit_vr)
            if header is None:
                return found, None
            tag, vr, length, header_length = header
            if tag >= _FIRST_PIXEL_TAG:
                return found, (start, header_length, length)
            if length == _UNDEFINED_LENGTH:
                self._skip_sequence(implicit=self.is_implicit_vr or vr == b"UN", depth=1)
            elif tag in wanted:
                value = self.fp.read(length)
                if len(value) < length:
                    raise InvalidDicom("truncated: the file ends inside an element value")
                found[tag] = value
            else:
                self.fp.seek(length, 1)

    def _walk_in_memory(
        self, fp: BytesIO, wanted: frozenset[int]
    ) -> tuple[dict[int, bytes], tuple[int, int, int] | None]:
        """:meth:`walk` on bytes in memory: the same checks and results, with the element
        headers unpacked in place instead of read, seeked and told one call at a time (the
        watcher reads whole files into memory). Leaves ``fp`` where :meth:`walk` would."""
        found: dict[int, bytes] = {}
        tag_and_length = self.tag_and_length.unpack_from
        tag_vr_short_length = self.tag_vr_short_length.unpack_from
        long_length = self.long_length.unpack_from
        implicit = self.is_implicit_vr
        pos = fp.tell()
        with fp.getbuffer() as data:
            size = len(data)
            while True:
                if pos >= size:
                    fp.seek(pos)
                    return found, None
                if pos + 8 > size:
                    raise InvalidDicom("truncated: the file ends inside an element header")
                start = pos
                vr: bytes | None = None
                if implicit:
                    group, element, length = tag_and_length(data, pos)
                    pos += 8
                else:
                    group, element, vr, length = tag_vr_short_length(data, pos)
                    pos += 8
                    if group == 0xFFFE:
                        vr, length = None, tag_and_length(data, start)[2]
                    elif vr in _LONG_HEADER_VR_BYTES:
                        if pos + 4 > size:
                            raise InvalidDicom(
                                "truncated: the file ends inside an element header")
                        length = long_length(data, pos)[0]
                        pos += 4
                tag = group << 16 | element
                if tag >= _FIRST_PIXEL_TAG:
                    fp.seek(pos)
                    return found, (start, pos - start, length)
                if length == _UNDEFINED_LENGTH:
                    fp.seek(pos)
                    self._skip_sequence(implicit=implicit or vr == b"UN", depth=1)
                    pos = fp.tell()
                elif tag in wanted:
                    if pos + length > size:
                        raise InvalidDicom("truncated: the file ends inside an element value")
                    found[tag] = bytes(data[pos:pos + length])
                    pos += length
                else:
                    pos += length

    def _skip_sequence(self, implicit: bool, depth: int) -> None:
        # An undefined-length UN element holds an implicit VR little endian sequence (PS3.5 6.2.2).
        if depth > MAX_SEQUENCE_DEPTH:
            raise InvalidDicom(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
        while True:
            header = self._header(implicit=True)
            if header is None:
                raise InvalidDicom("truncated: the file ends inside a sequence")
            tag, _vr, length, _header_length = header
            if tag == _SEQUENCE_DELIMITER:
                return
            if tag != _ITEM:
                where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
                raise InvalidDicom(f"damaged sequence: element {where} where an item belongs")
            if length == _UNDEFINED_LENGTH:
                self._skip_item(implicit, depth)
            else:
                self.fp.seek(length, 1)

    def _skip_item(self, implicit: bool, depth: int) -> None:
        while True:
            header = self._header(implicit)
            if header is None:
                raise InvalidDicom("truncated: the file ends inside a sequence item")
            tag, vr, length, _header_length = header
            if tag == _ITEM_DELIMITER:
                return
            if length == _UNDEFINED_LENGTH:
                self._skip_sequence(implicit=implicit or vr == b"UN", depth=depth + 1)
            else:
                self.fp.seek(length, 1)


_LONG_HEADER_VR_BYTES = frozenset(vr.encode("ascii") for vr in _LONG_HEADER_VRS)
_WANTED = frozenset({_SOP_CLASS_UID, _SOP_INSTANCE_UID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID})


def _walk_to_pixel_data(
    fp: BinaryIO,
    is_implicit_vr: bool,
    is_little_endian: bool,
    size: int | None,
    extra_tags: frozenset[int] = frozenset(),
) -> _Identifiers:
    """Read the identifying UIDs (and ``extra_tags``); stop at the pixel data and check it
    fits in ``size``."""
    walker = _ElementWalker(fp, is_implicit_vr, is_little_endian)
    found, pixel_data = walker.walk(_WANTED | extra_tags)
    if size is not None:
        if fp.tell() > size:
            raise InvalidDicom(
                f"truncated: the data set needs more than the {size} bytes of the file"
            )
        if pixel_data is not None:
            offset, header_length, length = pixel_data
            # Encapsulated pixel data has undefined length; its fragments are not read.
            if length != _UNDEFINED_LENGTH and offset + header_length + length > size:
                raise InvalidDicom(
                    f"truncated: pixel data needs {length} bytes, the file has "
                    f"{max(size - offset - header_length, 0)}"
                )
    return _Identifiers(
        sop_class_uid=_check_uid(_uid_value(found.get(_SOP_CLASS_UID)), "SOP Class UID"),
        sop_instance_uid=_check_uid(_uid_value(found.get(_SOP_INSTANCE_UID)), "SOP Instance UID"),
        study_instance_uid=_check_uid(
            _uid_value(found.get(_STUDY_INSTANCE_UID)), "Study Instance UID"
        ),
        series_instance_uid=_check_uid(
            _uid_value(found.get(_SERIES_INSTANCE_UID)), "Series Instance UID"
        ),
        found=found,
        pixel_data=pixel_data,
    )


#: A file meta group has about a dozen elements; a "group" of thousands is not one.
_MAX_FILE_META_ELEMENTS = 1000
_META_TAG = struct.Struct("<HH")
_META_SHORT_LENGTH = struct.Struct("<H")
_META_LONG_LENGTH = struct.Struct("<I")


def _read_file_meta(fp: BinaryIO, start: int, size: int) -> tuple[str | None, int]:
    """The Transfer Syntax UID of the file meta group (PS3.10 7.1) and where the group ends.

    Elements are explicit VR little endian as the standard says, or implicit VR as some
    writers put them. A length that is undefined or runs past the end of the file is refused
    before anything is read, so a declared length never decides what is allocated.
    """
    position = start
    transfer_syntax: str | None = None
    fp.seek(start)
    for _ in range(_MAX_FILE_META_ELEMENTS):
        header = fp.read(8)
        if len(header) < 8:
            break  # the caller finds no data set after it
        group, element = _META_TAG.unpack_from(header)
        if group != 0x0002:
            break
        vr = header[4:6]
        if 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B:  # two capitals: explicit VR
            if vr in _LONG_HEADER_VR_BYTES:
                extra = fp.read(4)
                if len(extra) < 4:
                    raise InvalidDicom("damaged file meta: the file ends inside an element header")
                header_length, length = 12, _META_LONG_LENGTH.unpack(extra)[0]
            else:
                header_length, length = 8, _META_SHORT_LENGTH.unpack_from(header, 6)[0]
        else:
            header_length, length = 8, _META_LONG_LENGTH.unpack_from(header, 4)[0]
        if length == _UNDEFINED_LENGTH:
            raise InvalidDicom(
                f"damaged file meta: element (0002,{element:04X}) has an undefined length"
            )
        left = size - position - header_length
        if length > left:
            raise InvalidDicom(
                f"damaged file meta: element (0002,{element:04X}) declares {length} bytes,"
                f" the file has {max(left, 0)} left"
            )
        if element == 0x0010:
            transfer_syntax = fp.read(length).strip(b"\x00 ").decode("ascii", "replace") or None
        else:
            fp.seek(length, 1)
        position += header_length + length
    else:
        raise InvalidDicom(
            f"damaged file meta: more than {_MAX_FILE_META_ELEMENTS} elements in group 0002"
        )
    fp.seek(position)
    return transfer_syntax, position


def _inflate(fp: BinaryIO) -> bytes:
    """A deflated data set (PS3.5 A.5), refused when it would inflate beyond
    :data:`MAX_INFLATED_BYTES` (a decompression bomb). The size is counted first without
    keeping anything, so a bomb costs time, never memory."""
    start = fp.tell()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while chunk := fp.read(1 << 20):
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 22))
                if total > MAX_INFLATED_BYTES:
                    raise InvalidDicom(
                        f"the deflated data set inflates beyond {MAX_INFLATED_BYTES} bytes"
                        " (a decompression bomb?)"
                    )
                chunk = inflater.unconsumed_tail
        fp.seek(start)
        return zlib.decompress(fp.read(), -zlib.MAX_WBITS)
    except zlib.error as err:
        raise InvalidDicom(f"damaged deflated data set: {err}") from err


def read_part10(
    path: str | os.PathLike[str],
    *,
    extra_tags: frozenset[int] = frozenset(),
    stream: BinaryIO | None = None,
) -> PartTenFile:
    """Read the file meta and identifying UIDs of a DICOM file, stopping before pixel data.

    ``extra_tags`` names further top-level elements whose raw values to return in ``extra``.

    Files without preamble or file meta (a bare data set, PS3.10 7.1 says they are not Part
    10 but they are common) are read too; their transfer syntax is taken from the encoding
    of the first element. Raise :class:`~pacsflow.errors.InvalidDicom` when the file is not
    DICOM, is truncated, or lacks a SOP Class or SOP Instance UID.

    ``stream`` is the file's content already open (the file, or its bytes in memory, for a
    caller that reads them anyway): it is read from its start and left open.
    """
    file_path = path if isinstance(path, Path) else Path(path)
    if stream is not None:
        return _read_part10(file_path, stream, extra_tags)
    try:
        fp = open(file_path, "rb")
    except OSError as err:
        raise InvalidDicom(f"cannot read: {err.strerror}") from err
    with fp:
        return _read_part10(file_path, fp, extra_tags)


def _read_part10(file_path: Path, fp: BinaryIO, extra_tags: frozenset[int]) -> PartTenFile:
    """:func:`read_part10` on an open stream of the file's bytes."""
    size = fp.seek(0, os.SEEK_END)
    fp.seek(0)
    head = fp.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        meta_start = 128 + 4
    elif _looks_like_raw_dataset(head):
        meta_start = 0
    else:
        raise InvalidDicom("not DICOM: no DICM prefix and no DICOM element at the start")

    transfer_syntax, dataset_offset = _read_file_meta(fp, meta_start, size)
    first_bytes = fp.read(8)
    if len(first_bytes) < 8:
        raise InvalidDicom("no data set after the file meta")
    fp.seek(dataset_offset)
    if transfer_syntax is None:
        transfer_syntax = _guess_raw_encoding(first_bytes)
    _check_uid(transfer_syntax, "Transfer Syntax UID")
    data_set: BinaryIO = fp
    stream_size = size
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        inflated = _inflate(fp)
        data_set, stream_size = BytesIO(inflated), len(inflated)
        first_bytes = inflated[:8]

    is_implicit_vr, is_little_endian = _encoding_of(transfer_syntax)
    if not is_implicit_vr and not _explicit_vr_is_plausible(first_bytes):
        if transfer_syntax != ExplicitVRLittleEndian:
            raise InvalidDicom(
                f"the data set is not encoded as its transfer syntax {transfer_syntax} says"
            )
        # A common writer bug: meta says explicit, the data set is implicit. The bytes
        # are what a receiver decodes, so they decide the syntax to send them with.
        transfer_syntax = ImplicitVRLittleEndian
        is_implicit_vr = True
    identifiers = _walk_to_pixel_data(
        data_set, is_implicit_vr, is_little_endian, stream_size, extra_tags
    )

    if identifiers.sop_class_uid is None:
        raise InvalidDicom("no SOP Class UID in the data set")
    if identifiers.sop_instance_uid is None:
        raise InvalidDicom("no SOP Instance UID in the data set")
    return PartTenFile(
        path=file_path,
        size=size,
        sop_class_uid=identifiers.sop_class_uid,
        sop_instance_uid=identifiers.sop_instance_uid,
        study_instance_uid=identifiers.study_instance_uid,
        series_instance_uid=identifiers.series_instance_uid,
        transfer_syntax_uid=transfer_syntax,
        dataset_offset=dataset_offset,
        extra={tag: identifiers.found[tag] for tag in extra_tags if tag in identifiers.found}
        if extra_tags
        else None,
        pixel_data=identifiers.pixel_data,
    )


def _dataset_stream(data: bytes, transfer_syntax_uid: str) -> tuple[BytesIO, int]:
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as err:
            raise InvalidDicom(f"damaged deflated data set: {err}") from err
    return BytesIO(data), len(data)


def scan_identifiers(
    data: bytes, transfer_syntax_uid: str
) -> tuple[str | None, str | None, str | None]:
    """(SOP Instance, Study Instance, Series Instance UID) of encoded data set bytes.

    Reads only up to the pixel data; raises :class:`~pacsflow.errors.InvalidDicom` when the
    bytes cannot be parsed in the given transfer syntax or are cut short.
    """
    is_implicit_vr, is_little_endian = _encoding_of(transfer_syntax_uid)
    stream, size = _dataset_stream(data, transfer_syntax_uid)
    identifiers = _walk_to_pixel_data(stream, is_implicit_vr, is_little_endian, size)
    return (
        identifiers.sop_instance_uid,
        identifiers.study_instance_uid,
        identifiers.series_instance_uid,
    )


def read_dataset_header(data: bytes, transfer_syntax_uid: str) -> Dataset:
    """Decode encoded data set bytes into a pydicom Dataset, stopping before the pixel data."""

    def at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
        return int(tag) >= _FIRST_PIXEL_TAG

    is_implicit_vr, is_little_endian = _encoding_of(transfer_syntax_uid)
    stream, _size = _dataset_stream(data, transfer_syntax_uid)
    try:
        return read_dataset(
            stream,
            is_implicit_VR=is_implicit_vr,
            is_little_endian=is_little_endian,
            stop_when=at_pixel_data,
        )
    except (EOFError, struct.error, ValueError, NotImplementedError) as err:
        raise InvalidDicom(f"damaged data set: {err}") from err


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _pad(text: str, padding: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + padding if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str | None = None,
) -> bytes:
    """The encoded file meta group (PS3.10 7.1), group length included, explicit VR LE."""
    body = b"".join(
        [
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", _pad(sop_class_uid, b"\x00")),
            _element(0x00020003, b"UI", _pad(sop_instance_uid, b"\x00")),
            _element(0x00020010, b"UI", _pad(transfer_syntax_uid, b"\x00")),
            _element(0x00020012, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _element(0x00020013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME, b" ")),
        ]
        + (
            [_element(0x00020016, b"AE", _pad(source_ae_title.strip(), b" "))]
            if source_ae_title
            else []
        )
    )
    return _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def write_part10(
    path: str | os.PathLike[str],
    dataset: bytes | bytearray | memoryview,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str | None = None,
    fsync: bool = False,
) -> Path:
    """Write encoded data set bytes as a Part 10 file at ``path``, atomically.

    The bytes are written as they are (no decode, no re-encode) after a 128-byte preamble,
    ``DICM`` and the file meta group. The file appears under its name only when complete:
    it is written to a temporary file in the same folder and renamed. With ``fsync`` the
    file and its folder are flushed to disk before this returns.
    """
    target = os.fspath(path)
    folder, name = os.path.split(target)
    header = _PREAMBLE + encode_file_meta(
        sop_class_uid, sop_instance_uid, transfer_syntax_uid, source_ae_title
    )
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.part")
    # Mode 0o666 so the process umask decides, as for any other file the service writes.
    # One writev of header and data set: no file object, no copy into its buffer.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            _write_all(descriptor, [header, dataset])
            if fsync:
                os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if fsync:
        _fsync_folder(folder or ".")
    return Path(target)


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _write_all(descriptor: int, buffers: list[bytes | bytearray | memoryview]) -> None:
    """Write every byte of ``buffers``; a regular file may take less than asked at a time."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    index = skip_written(views, 0, 0)
    while index < len(views):
        written = os.writev(descriptor, views[index:])
        if written == 0:
            raise OSError("write returned 0 bytes")
        index = skip_written(views, index, written)


def _fsync_folder(folder: str | os.PathLike[str]) -> None:
    # The rename is durable only once the folder entry is on disk too.
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
