"""Files to send: what a sender is told about a file, and what it finds when it reads it.

A :class:`FileJob` travels from the uploader (or ``pacsflow send``) to a sender: a key to
report back with, the path, and what the ledger recorded (SOP class, SOP instance, transfer
syntax; unknown for ``pacsflow send``). :func:`identify` reads the file meta (PS3.10 7.1) with
a few ``struct`` calls when the file was validated and recorded before, and uses the strict
:func:`pacsflow.dicom.read_part10` otherwise; :func:`load_data_set` gives the encoded data
set bytes to send, unchanged.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pacsflow.errors import InvalidDicom

__all__ = ["FileJob", "IdentifiedFile", "identify", "load_data_set"]

# Files up to this size are read whole while identifying them: one read, no second open.
_READ_WHOLE = 256 * 1024
# File meta groups are a few hundred bytes; this covers every sane one.
_HEAD = 16 * 1024
_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Explicit VRs with a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ELEMENT_HEADER = struct.Struct("<HH2sH")


@dataclass(frozen=True, slots=True)
class FileJob:
    """A file to send and what is known about it beforehand (None: read it from the file).

    Without a recorded SOP instance (``pacsflow send``) the file is read with the strict
    reader, which checks the data set itself (the file meta may name another instance, and
    a truncated file must not be sent); files the watcher validated take the fast path.
    """

    key: int
    path: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    transfer_syntax_uid: str | None = None

    def __reduce__(self) -> tuple[type[FileJob], tuple[int, str, str | None, str | None,
                                                      str | None]]:
        # Jobs cross the pipe to the sender processes by the thousand: pickled as their
        # arguments, not by the slots dataclass's state hooks (dataclasses.fields per object,
        # the uploader's largest cost per file).
        return (FileJob, (self.key, self.path, self.sop_class_uid, self.sop_instance_uid,
                          self.transfer_syntax_uid))


@dataclass(frozen=True, slots=True)
class IdentifiedFile:
    """A file as read: its UIDs, where its data set starts, and its bytes if small."""

    job: FileJob
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_offset: int
    #: the whole file, for files read whole while identifying them
    content: bytes | None

    @property
    def presentation(self) -> tuple[str, str]:
        """The (SOP Class UID, Transfer Syntax UID) pair to negotiate."""
        return (self.sop_class_uid, self.transfer_syntax_uid)


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace")


def _read_meta(head: bytes) -> tuple[dict[int, bytes], int] | None:
    """File meta elements (element number -> value) and the data set offset, or None when
    the file has no standard meta in ``head`` (the slow reader decides then)."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    values: dict[int, bytes] = {}
    offset = 132
    while offset + 8 <= len(head):
        group, element, vr, short_length = _ELEMENT_HEADER.unpack_from(head, offset)
        if group != 0x0002:
            return values, offset
        if vr in _LONG_VRS:
            if offset + 12 > len(head):
                return None
            length = struct.unpack_from("<I", head, offset + 8)[0]
            start = offset + 12
        else:
            length = short_length
            start = offset + 8
        if length == 0xFFFFFFFF or start + length > len(head):
            return None
        values[element] = head[start : start + length]
        offset = start + length
    return None


def _explicit_vr_plausible(head: bytes, offset: int) -> bool:
    vr = head[offset + 4 : offset + 6]
    return len(vr) == 2 and vr.isalpha() and vr.isupper()


def identify(job: FileJob) -> IdentifiedFile:
    """Read what is needed to send ``job``'s file; raise InvalidDicom when it cannot be sent.

    When the job names a SOP instance (the ledger's), a file holding another one is refused:
    it changed since it was recorded.
    """
    try:
        with open(job.path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            head = fp.read(size if size <= _READ_WHOLE else _HEAD)
    except OSError as err:
        raise InvalidDicom(f"cannot read: {err.strerror}") from err
    content = head if len(head) == size and size <= _READ_WHOLE else None

    found: tuple[str, str, str, int] | None = None
    meta = _read_meta(head) if job.sop_instance_uid is not None else None
    if meta is not None:
        values, offset = meta
        sop_class = _text(values.get(0x0002, b""))
        sop_instance = _text(values.get(0x0003, b""))
        syntax = _text(values.get(0x0010, b""))
        plausible = (
            syntax in (_IMPLICIT_VR_LITTLE_ENDIAN, _DEFLATED)
            or _explicit_vr_plausible(head, offset)
        )
        # The meta's SOP instance is a copy of the data set's; when it is not the recorded
        # one, the data set decides (below).
        if (
            sop_class and sop_instance == job.sop_instance_uid and syntax and plausible
            and offset + 8 <= len(head)
        ):  # fmt: skip
            found = (sop_class, sop_instance, syntax, offset)
    if found is None:
        # Nothing recorded, no standard file meta, or one that disagrees: the strict reader
        # knows every case.
        from pacsflow.dicom import read_part10

        part10 = read_part10(job.path)
        found = (
            part10.sop_class_uid,
            part10.sop_instance_uid,
            part10.transfer_syntax_uid,
            part10.dataset_offset,
        )
    sop_class, sop_instance, syntax, offset = found
    if job.sop_instance_uid is not None and sop_instance != job.sop_instance_uid:
        raise InvalidDicom(
            f"the file now holds SOP instance {sop_instance}, not the recorded "
            f"{job.sop_instance_uid}: it changed since it was recorded"
        )
    return IdentifiedFile(
        job=job,
        size=size,
        # The ledger's SOP class comes from the data set itself, the meta's is a copy.
        sop_class_uid=job.sop_class_uid or sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax_uid=syntax,
        dataset_offset=offset,
        content=content,
    )


@contextmanager
def load_data_set(file: IdentifiedFile) -> Iterator[memoryview]:
    """The encoded data set bytes of an identified file, without copying large files."""
    if file.content is not None:
        yield memoryview(file.content)[file.dataset_offset :]
        return
    try:
        with open(file.job.path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if size != file.size:
                raise InvalidDicom("the file changed size while it was being sent")
            if size <= file.dataset_offset:
                raise InvalidDicom("no data set after the file meta")
            # The mapping stays valid after the file is closed.
            mapped = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise InvalidDicom(f"cannot read: {err.strerror}") from err
    view = memoryview(mapped)
    data = view[file.dataset_offset :]
    try:
        yield data
    finally:
        data.release()
        view.release()
        try:
            mapped.close()
        except BufferError:
            # A fragment is still referenced (by a failed send's traceback): the mapping
            # goes with the last reference.
            pass
