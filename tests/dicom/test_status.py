"""DIMSE status categories (PS3.7 Annex C, PS3.4 B.2.3 and C.4)."""

from __future__ import annotations

import pytest

from pacsflow.dicom.status import Status, category, describe, is_ok


class TestCategory:
    @pytest.mark.parametrize(
        ("code", "expected"),
        [
            (0x0000, "success"),
            (0x0001, "warning"),
            (0x0107, "warning"),
            (0x0116, "warning"),
            (0xB000, "warning"),
            (0xB007, "warning"),
            (0xBFFF, "warning"),
            (0xFF00, "pending"),
            (0xFF01, "pending"),
            (0xFE00, "cancel"),
            (0xA700, "failure"),
            (0xA801, "failure"),
            (0xA900, "failure"),
            (0xC000, "failure"),
            (0xC211, "failure"),
            (0xCFFF, "failure"),
            (0x0122, "failure"),
            (0x0110, "failure"),
        ],
    )
    def test_codes_fall_in_their_ps3_categories(self, code: int, expected: str) -> None:
        assert category(code) == expected

    def test_range_edges_are_not_warnings(self) -> None:
        assert category(0xAFFF) == "failure"
        assert category(0xC000) == "failure"

    def test_only_success_and_warning_are_ok(self) -> None:
        assert is_ok(Status.SUCCESS)
        assert is_ok(Status.COERCION_OF_DATA_ELEMENTS)
        assert not is_ok(Status.PENDING)
        assert not is_ok(Status.CANCEL)
        assert not is_ok(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)


class TestDescribe:
    def test_named_code_has_its_name(self) -> None:
        assert describe(0xA900) == "0xA900 (failure: data set does not match sop class)"

    def test_unknown_code_has_its_category(self) -> None:
        assert describe(0xC123) == "0xC123 (failure)"

    def test_b000_is_not_named_because_it_means_two_things(self) -> None:
        # Storage: coercion of data elements; C-MOVE/C-GET: sub-operations with failures.
        assert describe(0xB000) == "0xB000 (warning)"
