"""A corpus of malformed inputs for an import folder, generated from valid files.

Every file is made deterministically (seeded) from a few valid instances: truncated at many
offsets, bit-flipped, with the wrong magic, with huge declared lengths, with sequences nested
deeply, with bad character sets, and files that are no DICOM at all. Some mutations leave a
file that is still a valid instance (a flipped bit in the pixel data, an odd character set):
the corpus does not say which; the pipeline must decide and account for each.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from tests.dicom.synthetic import ct_dataset

__all__ = ["write_corpus", "KINDS"]

KINDS = ("truncated", "bitflip", "magic", "length", "deep", "charset", "notdicom", "bomb")


def _encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _instance(number: int, syntax: str = ExplicitVRLittleEndian, size: int = 16) -> bytes:
    uid = generate_uid()
    ds = ct_dataset(generate_uid(), generate_uid(), uid, number, rows=size, columns=size)
    return _encode(ds, syntax)


def _element_offsets(data: bytes) -> list[int]:
    """Offsets of explicit VR little endian element headers after the preamble (a scan)."""
    offsets = []
    for position in range(132, len(data) - 8):
        vr = data[position + 4 : position + 6]
        if vr.isalpha() and vr.isupper() and data[position + 1] in (0x00, 0x08, 0x10, 0x20,
                                                                    0x28, 0x7F):  # fmt: skip
            offsets.append(position)
    return offsets


def _truncated(rng: random.Random, bases: list[bytes]) -> Iterator[bytes]:
    for base in bases:
        cuts = {0, 1, 127, 128, 131, 132, 133, 140, len(base) - 1, len(base) - 2}
        cuts |= {rng.randrange(1, len(base)) for _ in range(70)}
        for cut in sorted(cuts):
            yield base[:cut]


def _bitflips(rng: random.Random, bases: list[bytes]) -> Iterator[bytes]:
    for base in bases:
        header_end = len(base) - 16 * 16 * 2  # flips before the pixel data change structure
        for index in range(100):
            data = bytearray(base)
            for _ in range(1 + index % 4):
                # Most flips in the header, where they matter; some anywhere.
                position = rng.randrange(128, header_end if index % 5 else len(data))
                data[position] ^= 1 << rng.randrange(8)
            yield bytes(data)


def _magic(rng: random.Random, bases: list[bytes]) -> Iterator[bytes]:
    for base in bases:
        for magic in (b"DICN", b"dicm", b"\x00\x00\x00\x00", b"MICD", b"DIC", b"DICOM"):
            yield base[:128] + magic + base[132:]
        yield base[132:]  # no preamble, starts at the file meta
        yield base[128:]  # DICM at the very start
        yield b"\xff" * 128 + base[128:]
        yield bytes(rng.randrange(256) for _ in range(128)) + b"DICM" + bytes(
            rng.randrange(256) for _ in range(400))
        yield b"MZ" + base[2:]  # a Windows executable header in the preamble
        yield b"\x7fELF" + base[4:]


def _lengths(rng: random.Random, bases: list[bytes]) -> Iterator[bytes]:
    for base in bases:
        offsets = _element_offsets(base)
        for offset in rng.sample(offsets, min(len(offsets), 20)):
            vr = base[offset + 4 : offset + 6]
            long_header = vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC", b"UR")
            for length in (0xFFFFFFF0, 0x7FFFFFFF, len(base) + 1, 0xFFFFFFFF):
                data = bytearray(base)
                if long_header:
                    data[offset + 8 : offset + 12] = struct.pack("<I", length)
                else:
                    data[offset + 6 : offset + 8] = struct.pack("<H", length & 0xFFFF)
                yield bytes(data)
        # The file meta group length claiming far more than the file holds.
        yield base[:140] + struct.pack("<I", 0xFFFFFF00) + base[144:]


def _nested(depth: int, undefined: bool) -> Dataset:
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds = ct_dataset(generate_uid(), generate_uid(), generate_uid(), 1, rows=4, columns=4)
    ds.ContentSequence = inner.ContentSequence
    if undefined:
        ds.ContentSequence.is_undefined_length = True
    return ds


def _deep(rng: random.Random) -> Iterator[bytes]:
    for depth in (8, 32, 64):
        for undefined in (False, True):
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                try:
                    yield _encode(_nested(depth, undefined), syntax)
                except RecursionError:
                    continue
    # Deeper than any encoder would write: item and sequence headers repeated by hand.
    base = _instance(1)
    pixel_start = base.rfind(b"\xe0\x7f\x10\x00")
    for depth in (1000, 5000, 20000, 100000):
        for closed in (True, False):
            opening = (b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"
                       b"\xfe\xff\x00\xe0\xff\xff\xff\xff")
            closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
            body = opening * depth + (closing * depth if closed else b"")
            yield base[:pixel_start] + body + base[pixel_start:]


def _charsets(rng: random.Random) -> Iterator[bytes]:
    names = [b"\xff\xfe\xfd", b"\xc3\x28", "홍길동".encode("euc-kr"), b"\x1b$B\x1b(B",
             b"\x1b$)C\xfa\xfa", b"A\x00B", b"\xe2\x82", b"Test^\x80\x81"]  # fmt: skip
    charsets = ["ISO_IR 192", "ISO_IR 100", "ISO 2022 IR 149", "ISO_IR 999", "GB18030",
                "\\ISO 2022 IR 87", "ISO 2022 IR 6\\ISO 2022 IR 13", "", "ISO_IR 192\\ISO_IR 100",
                "ISO-IR 100"]  # fmt: skip
    for charset in charsets:
        for raw_name in names:
            ds = ct_dataset(generate_uid(), generate_uid(), generate_uid(), 1, rows=4, columns=4)
            ds.SpecificCharacterSet = charset
            data = _encode(ds)
            # Replace the patient name's value with raw bytes of the same, even length.
            old = b"Test^Synthetic"
            new = (raw_name + b" " * len(old))[: len(old)]
            yield data.replace(old, new, 1)


def _deflate_bombs(rng: random.Random) -> Iterator[bytes]:
    """Deflated data sets that inflate to gigabytes from a few megabytes."""
    ds = ct_dataset(generate_uid(), generate_uid(), generate_uid(), 1, rows=4, columns=4)
    plain = _encode(ds)
    deflated = _encode(ds, "1.2.840.10008.1.2.1.99")
    data_start = deflated.find(b"1.2.840.10008.1.2.1.99") + 22
    meta = deflated[:data_start]
    for size in (1100 << 20, 2 << 30):
        compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        block, body = bytes(1 << 20), []
        body.append(compressor.compress(plain[132:]))
        for _ in range(size >> 20):
            body.append(compressor.compress(block))
        body.append(compressor.flush())
        yield meta + b"".join(body)


def _not_dicom(rng: random.Random) -> Iterator[bytes]:
    yield b""
    yield b"\x00"
    yield b"\x00" * 132
    yield b"\x00" * 128 + b"DICM"
    yield b"\x00" * (1 << 20)
    yield b"hello, this is a text file\n" * 20
    yield b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(300))
    yield b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(300))
    yield b"%PDF-1.4\n" + b"x" * 500
    yield b"\x7fELF\x02\x01\x01" + bytes(500)
    yield zlib.compress(b"DICM" * 100)
    for size in (1, 2, 3, 4, 7, 8, 131, 132, 133, 500, 4096, 70000):
        for _ in range(6):
            yield bytes(rng.randrange(256) for _ in range(size))
    # Plausible raw data sets (no preamble) with garbage after the first element.
    for _ in range(20):
        yield b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + bytes(
            rng.randrange(256) for _ in range(rng.randrange(1, 400)))


def write_corpus(folder: Path, seed: int = 20240101) -> dict[str, list[Path]]:
    """Write the corpus into ``folder/<kind>/``; the paths per kind."""
    rng = random.Random(seed)
    bases = [
        _instance(1), _instance(2, ImplicitVRLittleEndian), _instance(3, ExplicitVRBigEndian),
    ]  # fmt: skip
    generators = {
        "truncated": _truncated(rng, bases),
        "bitflip": _bitflips(rng, bases),
        "magic": _magic(rng, bases),
        "length": _lengths(rng, bases),
        "deep": _deep(rng),
        "charset": _charsets(rng),
        "notdicom": _not_dicom(rng),
        "bomb": _deflate_bombs(rng),
    }
    written: dict[str, list[Path]] = {}
    for kind, generator in generators.items():
        target = folder / kind
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for number, data in enumerate(generator):
            path = target / f"{kind}{number:04d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        written[kind] = paths
    return written
