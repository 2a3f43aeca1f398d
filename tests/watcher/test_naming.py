"""Patient identity from folder names, written into the files (read back with pydicom and dcmdump)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from pacsflow_watcher.naming import (
    DEFAULT_PATTERN,
    PatientIdentity,
    identity_from_folder,
    rewrite_identity,
)
from tests.conftest import require_tool

UNICODE_PATTERN = r"^#([0-9]+)-(\w[\w#^]*)$"


class TestIdentityFromFolder:
    @pytest.mark.parametrize(
        ("folder", "expected"),
        [
            ("#12345-HongGildong", PatientIdentity("12345", "HongGildong")),
            ("#00001-Kim#Young^Hee", PatientIdentity("00001", "Kim#Young^Hee")),
        ],
    )
    def test_default_pattern(self, folder: str, expected: PatientIdentity) -> None:
        assert identity_from_folder(folder, DEFAULT_PATTERN) == expected

    @pytest.mark.parametrize(
        "folder", ["12345-Hong", "#12345", "#abc-Hong", "#12345-Hong Gildong", "#1-홍길동", ""]
    )
    def test_not_matching(self, folder: str) -> None:
        assert identity_from_folder(folder, DEFAULT_PATTERN) is None

    def test_unicode_pattern_takes_korean(self) -> None:
        identity = identity_from_folder("#12345-홍길동", UNICODE_PATTERN)
        assert identity == PatientIdentity("12345", "홍길동")
        assert identity.needs_utf8

    def test_overlong_values_are_refused(self) -> None:
        assert identity_from_folder("#" + "1" * 65 + "-Hong", DEFAULT_PATTERN) is None


class TestRewriteIdentity:
    @pytest.fixture
    def ct(self, tmp_path: Path, pydicom_test_files: Path) -> Path:
        target = tmp_path / "ct.dcm"
        shutil.copy(pydicom_test_files / "CT_small.dcm", target)
        return target

    def dcmdump(self, path: Path, tag: str) -> str:
        out = subprocess.run(
            [require_tool("dcmdump"), "+U8", "+P", tag, str(path)],
            capture_output=True, text=True, check=True,
        ).stdout
        return out

    def test_ascii_name_round_trips(self, ct: Path) -> None:
        original = pydicom.dcmread(ct)
        rewrite_identity(ct, PatientIdentity("00001", "Kim#Young^Hee"))
        ds = pydicom.dcmread(ct)
        assert ds.PatientID == "00001"
        assert str(ds.PatientName) == "Kim#Young^Hee"
        assert ds.PixelData == original.PixelData
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert "[Kim#Young^Hee]" in self.dcmdump(ct, "PatientName")

    def test_korean_name_is_written_as_utf8(self, ct: Path) -> None:
        rewrite_identity(ct, PatientIdentity("12345", "홍^길동"))
        ds = pydicom.dcmread(ct)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "홍^길동"
        assert "[홍^길동]" in self.dcmdump(ct, "PatientName")
        assert "ISO_IR 192" in self.dcmdump(ct, "SpecificCharacterSet")

    def test_no_temporary_file_is_left(self, ct: Path) -> None:
        rewrite_identity(ct, PatientIdentity("1", "A"))
        assert [p.name for p in ct.parent.iterdir()] == ["ct.dcm"]

    def test_not_dicom_leaves_the_file_alone(self, tmp_path: Path) -> None:
        text = tmp_path / "notes.txt"
        text.write_text("hello")
        with pytest.raises(Exception, match="identity rewrite"):
            rewrite_identity(text, PatientIdentity("1", "A"))
        assert text.read_text() == "hello"
        assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
