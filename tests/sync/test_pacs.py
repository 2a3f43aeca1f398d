"""What the sync asks a PACS: studies by date, series with image counts, errors by side."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from pacsflow.config import Node
from pacsflow.dicom import NetworkOptions
from pacsflow.errors import AssociationRejected

from pacsflow_sync.pacs import Pacs

from tests.peers import OrthancProcess, free_port

from .support import SYNC_AE, Scenario, node_of

pytestmark = pytest.mark.orthanc

OPTIONS = NetworkOptions(ae_title=SYNC_AE, connect_timeout=5, acse_timeout=10, dimse_timeout=10)


class WithoutSeriesCounts(Pacs):
    """A PACS that leaves NumberOfSeriesRelatedInstances out of its SERIES answers."""

    def _find(self, what: str, level: str, query: Mapping[str, Any]) -> list[Dataset]:
        matches = super()._find(what, level, query)
        if level == "SERIES":
            for ds in matches:
                if "NumberOfSeriesRelatedInstances" in ds:
                    del ds.NumberOfSeriesRelatedInstances
        return matches


def test_studies_of_a_date_range_with_their_instance_counts(
    pacs_pair: tuple[OrthancProcess, OrthancProcess], scenario: Scenario
) -> None:
    remote, _ = pacs_pair
    pacs = Pacs(node_of(remote), OPTIONS, "remote")
    recent = scenario.studies["recent"]
    study_date = dcmread(recent.paths()[0], stop_before_pixels=True).StudyDate
    found = {s.study_instance_uid: s for s in pacs.studies(f"{study_date}-{study_date}")}
    assert recent.uid in found
    assert found[recent.uid].instances == 16
    assert found[recent.uid].study_date == study_date and found[recent.uid].study_time
    assert scenario.studies["last-week"].uid not in found


def test_series_counts_fall_back_to_counting_images(
    pacs_pair: tuple[OrthancProcess, OrthancProcess], scenario: Scenario
) -> None:
    remote, _ = pacs_pair
    study = scenario.studies["recent"]
    counted = WithoutSeriesCounts(node_of(remote), OPTIONS, "remote").series(study.uid)
    reported = Pacs(node_of(remote), OPTIONS, "remote").series(study.uid)
    expected = {uid: len(paths) for uid, paths in study.series}
    assert {s.series_instance_uid: s.images for s in counted} == expected
    assert {s.series_instance_uid: s.images for s in reported} == expected
    assert sorted(s.series_number for s in counted) == [1, 2, 3]  # type: ignore[type-var]


def test_errors_name_the_side_and_the_address() -> None:
    node = Node(ae_title="PFCLOSED", host="127.0.0.1", port=free_port())
    with pytest.raises(AssociationRejected) as caught:
        Pacs(node, OPTIONS, "local").studies("20240101-20240102")
    message = str(caught.value)
    assert message.startswith(f"the local PACS {node}: C-FIND of the studies of 20240101-")
    assert "connection refused" in message

