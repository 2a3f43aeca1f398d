"""The path sanitiser: no header value can leave the route folder (safety invariant 4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pacsflow_router.paths import EMPTY, MAX_PART, instance_parts, instance_path, safe_part

FORBIDDEN = set('/\\\x00:*?"<>|') | {chr(c) for c in range(0x20)} | {"\x7f"}
DEVICES = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(10)),
    *(f"LPT{i}" for i in range(10)),
}

texts = st.one_of(
    st.text(
        alphabet=st.one_of(
            st.characters(codec="utf-8"),
            st.sampled_from(["/", "\\", ".", "\x00", " ", "~", ":", "\n"]),
        ),
        max_size=300,
    ),
    st.lists(
        st.sampled_from(["..", ".", "/", "CON", "nul", "com1", " ", "\x00", "a"]), max_size=6
    ).map("".join),
)


def _is_safe(part: str) -> None:
    assert part, "empty part"
    assert len(part) <= MAX_PART
    assert part not in (".", "..")
    assert not part.startswith(".")
    assert not part.endswith((".", " "))
    assert not FORBIDDEN & set(part), part
    assert all(ch.isprintable() for ch in part)
    assert part.split(".")[0].upper() not in DEVICES
    assert len(part.encode("utf-8")) <= 255


class TestSafePart:
    @pytest.mark.parametrize(
        "value",
        ["../../etc", "..", ".", "/", "\\", "a/b", "a\\b", "x\x00y", "\x00", "CON", "con.txt",
         "Nul", "COM1", "LPT9.dcm", "AUX ", " ", "", "a" * 200, "\x01\x1f", "ab.", "ab ",
         ".hidden", "C:\\Windows", "é" * 100, "~empty"],
    )  # fmt: skip
    def test_hostile_values_become_one_harmless_part(self, value: str) -> None:
        _is_safe(safe_part(value))

    def test_ordinary_values_stay_as_they_are(self) -> None:
        for value in ("PFTEST", "12345", "1.2.840.113619.2.55.3", "20240102_101010.123", "Müller"):
            assert safe_part(value) == value

    def test_dicom_padding_is_not_part_of_the_value(self) -> None:
        assert safe_part("AB ") == safe_part("AB") == "AB"
        assert safe_part("1.2.3\x00") == "1.2.3"

    def test_empty_values_get_a_placeholder(self) -> None:
        assert safe_part("") == safe_part("   ") == safe_part("\x00") == EMPTY

    def test_changed_values_keep_apart(self) -> None:
        assert safe_part("a/b") != safe_part("a\\b") != safe_part("a_b")
        assert safe_part("a" * 200) != safe_part("a" * 201)

    @settings(max_examples=500, deadline=None)
    @given(texts)
    def test_any_text_becomes_a_safe_part(self, value: str) -> None:
        _is_safe(safe_part(value))

    @settings(max_examples=500, deadline=None)
    @given(texts, texts)
    def test_different_values_get_different_parts(self, first: str, second: str) -> None:
        if first.strip(" \x00") != second.strip(" \x00"):
            assert safe_part(first) != safe_part(second)

    @settings(max_examples=300, deadline=None)
    @given(texts, texts, texts, texts, texts)
    def test_instance_paths_stay_under_the_route(
        self, patient: str, date: str, time: str, series: str, sop: str
    ) -> None:
        root = Path("/data/route")
        where = instance_path(root, patient, date, time, series, sop)
        resolved = Path(os.path.normpath(where.file))
        assert resolved.parent.parent.parent.parent == root
        assert where.file.relative_to(root).parts == resolved.relative_to(root).parts
        assert where.file.parent == where.series_folder
        assert where.series_folder.parent == where.study_folder


def test_the_layout_is_patient_study_series_instance() -> None:
    where = instance_path(Path("/r"), "PID", "20240102", "101010", "1.2.3", "1.2.3.4")
    assert where.file == Path("/r/PID/20240102_101010/1.2.3/1.2.3.4.dcm")
    assert where.study_folder == Path("/r/PID/20240102_101010")


@settings(max_examples=300, deadline=None)
@given(texts, texts, texts, texts, texts)
def test_the_string_layout_is_the_path_layout(
    patient: str, date: str, time: str, series: str, instance: str
) -> None:
    # The router builds strings, the harvester Paths: both must file an instance alike.
    where = instance_path(Path("/data/route"), patient, date, time, series, instance)
    assert instance_parts("/data/route", patient, date, time, series, instance) == (
        str(where.study_folder), str(where.series_folder), str(where.file)
    )
