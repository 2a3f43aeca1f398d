"""Property-based fuzzing (hypothesis) of the header readers and of path building.

Inputs are valid encodings mutated the way damage and malice do it (bit flips, bytes
overwritten, cuts, splices, lengths replaced with huge ones) and plain random bytes. The
properties: a reader either returns values or raises :class:`InvalidDicom` (nothing else,
no crash, no recursion blow-up); values it returns build a path that stays under the route
folder and can be created on a real file system.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
import textwrap
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pacsflow.dicom import read_part10
from pacsflow.errors import InvalidDicom
from pacsflow_router.header import scan_header
from pacsflow_router.paths import instance_path
from pacsflow_watcher.validate import validate_file
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from tests.dicom.synthetic import ct_dataset

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian]  # fmt: skip


def _encoded(syntax: str) -> bytes:
    ds = ct_dataset(generate_uid(), generate_uid(), generate_uid(), 1, rows=4, columns=4)
    ds.PatientID = "../../PF^ID"
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


FILES = {syntax: _encoded(syntax) for syntax in SYNTAXES}


@st.composite
def damaged(draw: st.DrawFn, data: bytes, start: int = 0) -> bytes:
    """``data`` with a few mutations at or after ``start``."""
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if len(buffer) <= start:
            break
        position = draw(st.integers(start, len(buffer) - 1))
        kind = draw(st.sampled_from(["flip", "byte", "cut", "splice", "length", "insert"]))
        if kind == "flip":
            buffer[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            buffer[position] = draw(st.integers(0, 255))
        elif kind == "cut":
            del buffer[position:]
        elif kind == "splice":
            chunk = draw(st.binary(min_size=1, max_size=64))
            buffer[position:position + len(chunk)] = chunk
        elif kind == "insert":
            buffer[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            value = draw(st.sampled_from([0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, 0x10000, 0]))
            buffer[position:position + 4] = struct.pack("<I", value)
    return bytes(buffer)


def _meta_end(data: bytes) -> int:
    """Where the data set starts (after the file meta group)."""
    return 132 + 12 + struct.unpack("<I", data[140:144])[0]


syntax_and_dataset = st.sampled_from(SYNTAXES).flatmap(
    lambda syntax: st.tuples(st.just(syntax), damaged(FILES[syntax][_meta_end(FILES[syntax]):]))
)


def _path_is_safe(root: Path, *values: str) -> None:
    path = instance_path(root, *values).file
    resolved = path.resolve()
    assert resolved.is_relative_to(root.resolve()), path
    assert len(path.relative_to(root).parts) == 4
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # the file system takes the name


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(syntax_and_dataset)
def test_router_header_reader_returns_values_or_invalid_dicom(case: tuple[str, bytes]) -> None:
    syntax, data = case
    try:
        header = scan_header(data, syntax)
    except InvalidDicom:
        return
    with tempfile.TemporaryDirectory() as folder:
        _path_is_safe(Path(folder), header.patient_id, header.study_date, header.study_time,
                      header.series_instance_uid, header.sop_instance_uid)  # fmt: skip


@FUZZ
@given(st.sampled_from(SYNTAXES), st.binary(max_size=2000))
def test_router_header_reader_on_random_bytes(syntax: str, data: bytes) -> None:
    try:
        scan_header(data, syntax)
    except InvalidDicom:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2000), st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
def test_router_header_reader_refuses_deep_nesting(depth: int, syntax: str) -> None:
    if syntax == ImplicitVRLittleEndian:
        opening = struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF)
    else:
        opening = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00" + b"\xff" * 4
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    # SOP Instance UID first, then the nesting: the walker must get through or refuse.
    uid = b"1.2.3\x00"
    head = (struct.pack("<HHI", 0x0008, 0x0018, len(uid)) if syntax == ImplicitVRLittleEndian
            else struct.pack("<HH", 0x0008, 0x0018) + b"UI" + struct.pack("<H", len(uid)))
    data = head + uid + (opening + item) * depth
    try:
        scan_header(data, syntax)
    except InvalidDicom:
        pass


@pytest.fixture(scope="module")
def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="pacsflow-fuzz-"))


@FUZZ
@given(st.sampled_from(SYNTAXES).flatmap(
    lambda syntax: damaged(FILES[syntax], start=128)))  # fmt: skip
def test_watcher_validation_never_raises_on_damaged_files(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(data)
        handle.flush()
        verdict = validate_file(Path(handle.name))
    assert verdict.outcome in ("valid", "invalid", "dicomdir")
    if verdict.outcome == "invalid":
        assert verdict.reason
    elif verdict.file is not None:
        with tempfile.TemporaryDirectory() as folder:
            _path_is_safe(Path(folder), verdict.file.patient_id, "", "",
                          verdict.file.series_instance_uid, verdict.file.sop_instance_uid)


@FUZZ
@given(st.binary(max_size=3000))
def test_watcher_validation_never_raises_on_random_bytes(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(data)
        handle.flush()
        verdict = validate_file(Path(handle.name))
    assert verdict.outcome in ("valid", "invalid", "dicomdir")


@FUZZ
@given(st.sampled_from(SYNTAXES).flatmap(
    lambda syntax: st.tuples(st.just(FILES[syntax][:_meta_end(FILES[syntax])]),
                             damaged(FILES[syntax][_meta_end(FILES[syntax]):]))))  # fmt: skip
def test_part10_reader_on_damaged_data_sets_returns_or_raises_invalid_dicom(
    parts: tuple[bytes, bytes],
) -> None:
    # The file meta stays intact here: see the test below for damaged file meta.
    meta, dataset = parts
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(meta + dataset)
        handle.flush()
        try:
            part = read_part10(handle.name)
        except InvalidDicom:
            return
    assert part.sop_instance_uid
    assert 0 < part.dataset_offset <= part.size


_HUGE_META_LENGTH = textwrap.dedent("""
    import resource, struct, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from pacsflow.dicom import read_part10
    from pacsflow.errors import InvalidDicom
    data = bytearray(open(sys.argv[1], "rb").read())
    # (0002,0001) File Meta Information Version, OB: its 4-byte length claims 4 GiB.
    position = data.index(b"\\x02\\x00\\x01\\x00OB")
    data[position + 8:position + 12] = struct.pack("<I", 0xFFFFFFF0)
    open(sys.argv[1], "wb").write(data)
    try:
        read_part10(sys.argv[1])
    except InvalidDicom as err:
        print("invalid:", err)
        sys.exit(0)
    except MemoryError:
        print("MemoryError: the declared length was allocated")
        sys.exit(3)
    sys.exit(4)
""")


def test_part10_reader_refuses_file_meta_lengths_beyond_the_file(tmp_path: Path) -> None:
    # In a child with 1 GiB of address space, so the allocation fails there, not here.
    path = tmp_path / "huge-meta.dcm"
    path.write_bytes(FILES[ExplicitVRLittleEndian])
    result = subprocess.run([sys.executable, "-c", _HUGE_META_LENGTH, str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_part10_reader_refuses_sequences_nested_thousands_deep(tmp_path: Path) -> None:
    data = FILES[ExplicitVRLittleEndian]
    pixel_start = data.rfind(b"\xe0\x7f\x10\x00")
    opening = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    path = tmp_path / "deep.dcm"
    path.write_bytes(data[:pixel_start] + opening * 5000 + closing * 5000 + data[pixel_start:])
    with pytest.raises(InvalidDicom):
        read_part10(path)
