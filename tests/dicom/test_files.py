"""Part 10 files as bytes: header reads that stop before pixel data, and atomic writes."""

from __future__ import annotations

import io
import struct
import subprocess
import tempfile
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import split_dataset

from pacsflow.dicom.files import (
    IMPLEMENTATION_CLASS_UID,
    encode_file_meta,
    read_dataset_header,
    read_part10,
    scan_identifiers,
    write_part10,
)
from pacsflow.errors import InvalidDicom
from pacsflow_watcher.validate import _IMAGE_TAGS, validate_file
from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series

# Files in pydicom's corpus that are complete images with file meta, one per transfer syntax
# family, and the bare data sets (no preamble, no meta) in it.
WITH_META = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "rtdose.dcm",
]
WITHOUT_META = {
    "rtstruct.dcm": "1.2.840.10008.1.2",
    "ExplVR_LitEndNoMeta.dcm": "1.2.840.10008.1.2.1",
    "ExplVR_BigEndNoMeta.dcm": "1.2.840.10008.1.2.2",
}

# Files whose data sets hold sequences (nested, undefined length) and every encoding, for the
# walk over damaged bytes.
WALKED = [*WITH_META, *WITHOUT_META, "rtplan.dcm", "nested_priv_SQ.dcm"]
PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _outcome(path: Path, stream: io.BytesIO | None) -> object:
    """What read_part10 and the watcher's checks make of a file: the result or the error."""
    try:
        part = read_part10(path, extra_tags=_IMAGE_TAGS, stream=stream)
    except InvalidDicom as err:
        return "invalid", err.reason
    verdict = validate_file(path, stream)
    return part, verdict.outcome, verdict.reason, verdict.file


def _pydicom_read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True, stop_before_pixels=True)


class TestReadPart10:
    @pytest.mark.parametrize("name", WITH_META)
    def test_identifiers_and_offset_match_pydicom_and_pynetdicom(
        self, pydicom_test_files: Path, name: str
    ) -> None:
        path = pydicom_test_files / name
        part_ten = read_part10(path)
        reference = _pydicom_read(path)
        meta, offset = split_dataset(path)
        assert part_ten.sop_class_uid == reference.SOPClassUID
        assert part_ten.sop_instance_uid == reference.SOPInstanceUID
        assert part_ten.study_instance_uid == reference.StudyInstanceUID
        assert part_ten.series_instance_uid == reference.SeriesInstanceUID
        assert part_ten.transfer_syntax_uid == meta.TransferSyntaxUID
        assert part_ten.dataset_offset == offset
        assert part_ten.size == path.stat().st_size
        assert part_ten.presentation == (part_ten.sop_class_uid, part_ten.transfer_syntax_uid)

    @pytest.mark.parametrize(("name", "syntax"), sorted(WITHOUT_META.items()))
    def test_bare_data_set_is_read_with_the_syntax_its_bytes_show(
        self, pydicom_test_files: Path, name: str, syntax: str
    ) -> None:
        path = pydicom_test_files / name
        part_ten = read_part10(path)
        assert part_ten.dataset_offset == 0
        assert part_ten.transfer_syntax_uid == syntax
        assert part_ten.sop_instance_uid == _pydicom_read(path).SOPInstanceUID

    def test_synthetic_file_is_read_without_touching_pixel_data(self, tmp_path: Path) -> None:
        (path,) = write_ct_series(tmp_path, 1)
        part_ten = read_part10(path)
        # Corrupting the pixel bytes cannot change what the header read returns.
        data = bytearray(path.read_bytes())
        data[-100:] = b"\xff" * 100
        path.write_bytes(bytes(data))
        assert read_part10(path) == part_ten

    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            ("README.txt", "not DICOM"),
            ("crayons.icc", "not DICOM"),
            ("no_meta.dcm", "not DICOM"),
            ("MR_truncated.dcm", "truncated: pixel data"),
            ("rtplan_truncated.dcm", "truncated"),
            ("meta_missing_tsyntax.dcm", "no SOP Class UID"),
            # File meta says JPEG Baseline, the data set is implicit VR: a receiver would
            # misread the bytes, so the file is not sendable as it is.
            ("SC_rgb_jpeg.dcm", "not encoded as its transfer syntax"),
        ],
    )
    def test_corpus_files_that_cannot_be_sent_are_invalid_with_a_reason(
        self, pydicom_test_files: Path, name: str, reason: str
    ) -> None:
        with pytest.raises(InvalidDicom) as raised:
            read_part10(pydicom_test_files / name)
        assert reason in raised.value.reason

    def test_empty_file_is_invalid(self, tmp_path: Path) -> None:
        path = tmp_path / "empty.dcm"
        path.write_bytes(b"")
        with pytest.raises(InvalidDicom, match="not DICOM"):
            read_part10(path)

    def test_missing_file_is_invalid(self, tmp_path: Path) -> None:
        with pytest.raises(InvalidDicom, match="cannot read"):
            read_part10(tmp_path / "absent.dcm")

    def test_file_cut_inside_the_header_is_invalid(self, tmp_path: Path) -> None:
        (path,) = write_ct_series(tmp_path, 1)
        path.write_bytes(path.read_bytes()[:400])
        with pytest.raises(InvalidDicom, match="truncated"):
            read_part10(path)

    def test_data_set_without_sop_instance_uid_is_invalid(self, tmp_path: Path) -> None:
        (path,) = write_ct_series(tmp_path, 1)
        ds = pydicom.dcmread(path)
        del ds.SOPInstanceUID
        ds.save_as(path)
        with pytest.raises(InvalidDicom, match="no SOP Instance UID"):
            read_part10(path)

    def test_explicit_meta_over_implicit_data_set_is_sent_as_implicit(
        self, pydicom_test_files: Path, tmp_path: Path
    ) -> None:
        source = pydicom_test_files / "MR_small_implicit.dcm"
        implicit = read_part10(source)
        # A writer bug seen in the field: the meta claims explicit VR, the data set is implicit.
        mislabelled = write_part10(
            tmp_path / "mislabelled.dcm",
            source.read_bytes()[implicit.dataset_offset :],
            sop_class_uid=implicit.sop_class_uid,
            sop_instance_uid=implicit.sop_instance_uid,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        assert read_part10(mislabelled).transfer_syntax_uid == ImplicitVRLittleEndian


class TestFileMeta:
    @staticmethod
    def _implicit_element(element: int, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        return struct.pack("<HHI", 0x0002, element, len(value)) + value

    def test_meta_written_in_implicit_vr_is_read(
        self, pydicom_test_files: Path, tmp_path: Path
    ) -> None:
        # Some writers encode group 0002 implicit VR, against PS3.10; the file is still usable.
        source = pydicom_test_files / "MR_small_implicit.dcm"
        part = read_part10(source)
        meta = b"".join([
            self._implicit_element(0x0001, b"\x00\x01"),
            self._implicit_element(0x0002, part.sop_class_uid.encode()),
            self._implicit_element(0x0003, part.sop_instance_uid.encode()),
            self._implicit_element(0x0010, ImplicitVRLittleEndian.encode()),
        ])
        path = tmp_path / "implicit-meta.dcm"
        path.write_bytes(b"\x00" * 128 + b"DICM" + meta + source.read_bytes()[part.dataset_offset :])
        read = read_part10(path)
        assert read.transfer_syntax_uid == ImplicitVRLittleEndian
        assert read.dataset_offset == 132 + len(meta)
        assert read.sop_instance_uid == part.sop_instance_uid

    @pytest.mark.parametrize(
        ("element", "reason"),
        [
            (struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 0xFFF0), "declares 65520 bytes"),
            (struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 0xFFFFFFFF), "undefined length"),
            (struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 1 << 30), "declares 1073741824"),
            (struct.pack("<HH2sH", 0x0002, 0x0100, b"UL", 0) * 1001, "more than 1000 elements"),
        ],
        ids=["short-length-past-the-end", "undefined", "long-length-past-the-end", "endless"],
    )
    def test_meta_that_cannot_be_is_refused_before_it_is_read(
        self, tmp_path: Path, element: bytes, reason: str
    ) -> None:
        (good,) = write_ct_series(tmp_path, 1)
        path = tmp_path / "bad-meta.dcm"
        path.write_bytes(b"\x00" * 128 + b"DICM" + element + good.read_bytes()[132:])
        with pytest.raises(InvalidDicom, match="damaged file meta") as raised:
            read_part10(path)
        assert reason in raised.value.reason

    def test_an_open_stream_reads_like_the_file(self, pydicom_test_files: Path) -> None:
        for name in WITH_META:
            path = pydicom_test_files / name
            assert read_part10(path, stream=io.BytesIO(path.read_bytes())) == read_part10(path)

    @settings(max_examples=400, deadline=None)
    @given(
        name=st.sampled_from(WALKED),
        changes=st.lists(st.tuples(st.integers(0, 2999), st.integers(0, 255)), max_size=6),
        keep=st.one_of(st.none(), st.integers(0, 4000)),
    )
    def test_bytes_in_memory_are_walked_like_the_file(
        self, name: str, changes: list[tuple[int, int]], keep: int | None
    ) -> None:
        # Bytes in memory take their own walk (headers unpacked in place): damaged or not,
        # it must end as the walk of the same bytes read from a file does.
        data = bytearray((PYDICOM_TEST_FILES / name).read_bytes())
        for position, value in changes:
            if position < len(data):
                data[position] = value
        data = data if keep is None else data[:keep]
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "damaged.dcm"
            path.write_bytes(data)
            assert _outcome(path, io.BytesIO(bytes(data))) == _outcome(path, None)


class TestScanIdentifiers:
    def test_uids_of_received_bytes(self, pydicom_test_files: Path) -> None:
        path = pydicom_test_files / "MR_small_bigendian.dcm"
        part_ten = read_part10(path)
        data = path.read_bytes()[part_ten.dataset_offset :]
        assert scan_identifiers(data, part_ten.transfer_syntax_uid) == (
            part_ten.sop_instance_uid,
            part_ten.study_instance_uid,
            part_ten.series_instance_uid,
        )

    def test_deflated_bytes_are_inflated_first(self, pydicom_test_files: Path) -> None:
        path = pydicom_test_files / "image_dfl.dcm"
        part_ten = read_part10(path)
        data = path.read_bytes()[part_ten.dataset_offset :]
        assert scan_identifiers(data, part_ten.transfer_syntax_uid)[0] == part_ten.sop_instance_uid

    def test_header_stops_before_pixel_data(self, pydicom_test_files: Path) -> None:
        path = pydicom_test_files / "CT_small.dcm"
        part_ten = read_part10(path)
        header = read_dataset_header(
            path.read_bytes()[part_ten.dataset_offset :], part_ten.transfer_syntax_uid
        )
        assert header.PatientName == "CompressedSamples^CT1"
        assert "PixelData" not in header


class TestWritePart10:
    def _write_copy(self, source: Path, target: Path) -> Path:
        part_ten = read_part10(source)
        data = source.read_bytes()[part_ten.dataset_offset :]
        return write_part10(
            target,
            data,
            sop_class_uid=part_ten.sop_class_uid,
            sop_instance_uid=part_ten.sop_instance_uid,
            transfer_syntax_uid=part_ten.transfer_syntax_uid,
            source_ae_title="MODALITY",
        )

    @pytest.mark.parametrize("name", WITH_META)
    def test_data_set_bytes_are_written_unchanged_behind_valid_meta(
        self, pydicom_test_files: Path, tmp_path: Path, name: str
    ) -> None:
        source = pydicom_test_files / name
        written = self._write_copy(source, tmp_path / "copy.dcm")
        source_meta = read_part10(source)
        copy_meta = read_part10(written)
        assert (
            written.read_bytes()[copy_meta.dataset_offset :]
            == source.read_bytes()[source_meta.dataset_offset :]
        )
        copy = pydicom.dcmread(written)
        assert copy.preamble == b"\x00" * 128
        assert copy.file_meta.TransferSyntaxUID == source_meta.transfer_syntax_uid
        assert copy.file_meta.MediaStorageSOPInstanceUID == source_meta.sop_instance_uid
        assert copy.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert copy.file_meta.SourceApplicationEntityTitle == "MODALITY"
        assert copy.SOPInstanceUID == source_meta.sop_instance_uid

    def test_group_length_counts_the_meta_elements(self) -> None:
        meta = encode_file_meta("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1", "AE")
        # (0002,0000) UL: 8-byte header + 4-byte value, then the group it measures.
        assert int.from_bytes(meta[8:12], "little") == len(meta) - 12

    def test_dcmdump_reads_the_written_file(self, pydicom_test_files: Path, tmp_path: Path) -> None:
        dcmdump = require_tool("dcmdump")
        written = self._write_copy(pydicom_test_files / "MR_small_RLE.dcm", tmp_path / "rle.dcm")
        result = subprocess.run(
            [dcmdump, "-M", str(written)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        assert "RLELossless" in result.stdout or "RLE Lossless" in result.stdout
        assert "(0008,0018)" in result.stdout

    def test_no_temporary_file_is_left_behind(
        self, pydicom_test_files: Path, tmp_path: Path
    ) -> None:
        self._write_copy(pydicom_test_files / "CT_small.dcm", tmp_path / "ct.dcm")
        assert [p.name for p in tmp_path.iterdir()] == ["ct.dcm"]

    def test_existing_file_is_replaced_whole(
        self, pydicom_test_files: Path, tmp_path: Path
    ) -> None:
        target = tmp_path / "ct.dcm"
        target.write_bytes(b"old content that is longer than nothing" * 1000)
        self._write_copy(pydicom_test_files / "CT_small.dcm", target)
        assert (
            read_part10(target).sop_instance_uid
            == _pydicom_read(pydicom_test_files / "CT_small.dcm").SOPInstanceUID
        )

    def test_failed_write_leaves_neither_target_nor_temporary(self, tmp_path: Path) -> None:
        target = tmp_path / "out.dcm"
        with pytest.raises(TypeError):
            write_part10(
                target,
                None,  # type: ignore[arg-type]
                sop_class_uid="1.2.3",
                sop_instance_uid="1.2.3.4",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
            )
        assert list(tmp_path.iterdir()) == []

    def test_fsync_write_is_readable(self, pydicom_test_files: Path, tmp_path: Path) -> None:
        source = pydicom_test_files / "CT_small.dcm"
        part_ten = read_part10(source)
        written = write_part10(
            tmp_path / "synced.dcm",
            source.read_bytes()[part_ten.dataset_offset :],
            sop_class_uid=part_ten.sop_class_uid,
            sop_instance_uid=part_ten.sop_instance_uid,
            transfer_syntax_uid=part_ten.transfer_syntax_uid,
            fsync=True,
        )
        assert read_part10(written).sop_instance_uid == part_ten.sop_instance_uid
