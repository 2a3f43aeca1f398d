"""What the sync service asks a PACS: studies of a date range, series with image counts, and
the C-MOVE of one series.

Blocking calls on :mod:`pacsflow.dicom`; the service runs them through ``asyncio.to_thread``.
Every error names the PACS's role (remote or local) and address, so a cycle's log says which
side failed. Image counts come from NumberOfSeriesRelatedInstances (PS3.4 C.6.1.1.4); a PACS
that leaves it out is asked at IMAGE level and the instances are counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.dataset import Dataset

from pacsflow.config import Node
from pacsflow.dicom import MoveResult, NetworkOptions, find, move
from pacsflow.errors import DicomError

from pacsflow_sync.selection import SeriesInfo

__all__ = ["Pacs", "StudyInfo"]

@dataclass(frozen=True)
class StudyInfo:
    """One study as a PACS describes it at STUDY level."""

    study_instance_uid: str
    study_date: str
    study_time: str
    #: NumberOfStudyRelatedInstances; None when the PACS does not say
    instances: int | None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _number(ds: Dataset, keyword: str) -> int | None:
    text = _text(ds, keyword)
    try:
        return int(text) if text else None
    except ValueError:
        return None


class Pacs:
    """One PACS in one role, queried with one local AE's network options."""

    def __init__(
        self, node: Node, options: NetworkOptions, role: Literal["remote", "local"]
    ) -> None:
        self.node = node
        self.options = options
        self.role = role

    def __str__(self) -> str:
        return f"the {self.role} PACS {self.node}"

    def _find(self, what: str, level: str, query: Mapping[str, Any]) -> list[Dataset]:
        try:
            return find(self.node, level, query, self.options)
        except DicomError as err:
            # The message names the side and the query; the type (rejected, failure
            # status) stays for callers that tell them apart.
            err.args = (f"{self}: {what} failed: {err}",)
            raise

    def studies(self, study_date_range: str) -> list[StudyInfo]:
        """Every study whose StudyDate is in the range (``YYYYMMDD-YYYYMMDD``)."""
        matches = self._find(
            f"C-FIND of the studies of {study_date_range}",
            "STUDY",
            {
                "StudyDate": study_date_range,
                "StudyTime": None,
                "StudyInstanceUID": None,
                "NumberOfStudyRelatedInstances": None,
            },
        )
        studies: dict[str, StudyInfo] = {}
        for ds in matches:
            uid = _text(ds, "StudyInstanceUID")
            if uid:
                studies[uid] = StudyInfo(
                    uid,
                    _text(ds, "StudyDate"),
                    _text(ds, "StudyTime"),
                    _number(ds, "NumberOfStudyRelatedInstances"),
                )
        return list(studies.values())

    def series(self, study_uid: str) -> list[SeriesInfo]:
        """The series of one study, each with its number of images."""
        matches = self._find(
            f"C-FIND of the series of study {study_uid}",
            "SERIES",
            {
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": None,
                "SeriesNumber": None,
                "Modality": None,
                "NumberOfSeriesRelatedInstances": None,
            },
        )
        found: dict[str, SeriesInfo] = {}
        for ds in matches:
            uid = _text(ds, "SeriesInstanceUID")
            if not uid:
                continue
            images = _number(ds, "NumberOfSeriesRelatedInstances")
            if images is None:
                images = self.count_images(study_uid, uid)
            found[uid] = SeriesInfo(
                study_uid, uid, images, _number(ds, "SeriesNumber"), _text(ds, "Modality")
            )
        return list(found.values())

    def count_images(self, study_uid: str, series_uid: str) -> int:
        """How many instances of a series the PACS lists at IMAGE level."""
        matches = self._find(
            f"C-FIND of the images of series {series_uid}",
            "IMAGE",
            {
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": series_uid,
                "SOPInstanceUID": None,
            },
        )
        return len({_text(ds, "SOPInstanceUID") for ds in matches} - {""})

    def series_images(self, study_uid: str, series_uid: str) -> int:
        """The instances of one series this PACS holds (0 when it has none)."""
        for info in self.series(study_uid):
            if info.series_instance_uid == series_uid:
                return info.images
        return 0

    def move_series(self, destination_ae: str, study_uid: str, series_uid: str) -> MoveResult:
        """C-MOVE one series to ``destination_ae``; the final counts whatever the status."""
        try:
            return move(
                self.node,
                destination_ae,
                "SERIES",
                {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid},
                self.options,
            )
        except DicomError as err:
            err.args = (f"{self}: C-MOVE of series {series_uid} to {destination_ae} failed: {err}",)
            raise
