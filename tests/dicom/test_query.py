"""C-FIND, C-MOVE and C-GET against a real Orthanc."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from pacsflow.config import Node
from pacsflow.dicom import (
    NetworkOptions,
    ReceivedInstance,
    StoreSCP,
    echo,
    find,
    get,
    move,
    read_part10,
)
from pacsflow.errors import DimseFailure
from tests.dicom.synthetic import write_ct_series
from tests.peers import OrthancProcess

pytestmark = pytest.mark.orthanc


@dataclass(frozen=True)
class Archive:
    """What the module's Orthanc holds: one study of two series, and one more study."""

    study_uid: str
    first_series: list[Path]
    second_series: list[Path]
    other_study: list[Path]

    def series_uid(self, paths: list[Path]) -> str:
        return str(read_part10(paths[0]).series_instance_uid)


@pytest.fixture(scope="module")
def archive(orthanc: OrthancProcess, tmp_path_factory: pytest.TempPathFactory) -> Archive:
    folder = tmp_path_factory.mktemp("archive")
    study_uid = generate_uid()
    first = write_ct_series(folder / "first", 12, study_uid=study_uid)
    second = write_ct_series(folder / "second", 8, study_uid=study_uid)
    other = write_ct_series(folder / "other", 5)
    assert orthanc.upload(first + second + other) == 25
    assert orthanc.instance_count() == 25
    return Archive(study_uid, first, second, other)


class Collector:
    def __init__(self) -> None:
        self.instances: list[ReceivedInstance] = []
        self.lock = threading.Lock()

    def __call__(self, instance: ReceivedInstance) -> int:
        with self.lock:
            self.instances.append(instance)
        return 0


def test_echo_orthanc(orthanc: OrthancProcess, options: NetworkOptions) -> None:
    assert echo(orthanc.node, options) > 0


class TestFind:
    def test_studies_come_back_with_the_keys_asked_for(
        self, orthanc: OrthancProcess, archive: Archive, options: NetworkOptions
    ) -> None:
        studies = find(
            orthanc.node,
            "STUDY",
            {"PatientID": "PFTEST", "StudyInstanceUID": None, "NumberOfStudyRelatedInstances": ""},
            options,
        )
        counts = {str(s.StudyInstanceUID): int(s.NumberOfStudyRelatedInstances) for s in studies}
        other_uid = str(read_part10(archive.other_study[0]).study_instance_uid)
        assert counts == {archive.study_uid: 20, other_uid: 5}

    def test_series_of_one_study(
        self, orthanc: OrthancProcess, archive: Archive, options: NetworkOptions
    ) -> None:
        series = find(
            orthanc.node,
            "SERIES",
            {
                "StudyInstanceUID": archive.study_uid,
                "SeriesInstanceUID": None,
                "NumberOfSeriesRelatedInstances": None,
            },
            options,
        )
        counts = {str(s.SeriesInstanceUID): int(s.NumberOfSeriesRelatedInstances) for s in series}
        assert counts == {
            archive.series_uid(archive.first_series): 12,
            archive.series_uid(archive.second_series): 8,
        }

    def test_patient_root_model(
        self, orthanc: OrthancProcess, archive: Archive, options: NetworkOptions
    ) -> None:
        patients = find(
            orthanc.node,
            "PATIENT",
            {"PatientID": "PFTEST", "PatientName": None},
            options,
            model="patient",
        )
        assert [str(p.PatientName) for p in patients] == ["Test^Synthetic"]

    def test_no_match_is_an_empty_list(
        self, orthanc: OrthancProcess, archive: Archive, options: NetworkOptions
    ) -> None:
        assert find(orthanc.node, "STUDY", {"StudyInstanceUID": "1.2.3.999"}, options) == []

    def test_unknown_keyword_and_level_are_refused_before_any_traffic(
        self, orthanc: OrthancProcess, options: NetworkOptions
    ) -> None:
        with pytest.raises(ValueError, match="not a DICOM keyword"):
            find(orthanc.node, "STUDY", {"StudyUID": None}, options)
        with pytest.raises(ValueError, match="query level"):
            find(orthanc.node, "VOLUME", {}, options)

    def test_failure_status_raises_dimse_failure(self, options: NetworkOptions) -> None:
        # Orthanc answers every well-formed query; a scripted peer answers "out of resources".
        def out_of_resources(event: evt.Event) -> Iterator[tuple[int, None]]:
            yield 0xA700, None

        ae = AE("FINDFAIL")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, out_of_resources)]
        )
        try:
            node = Node(ae_title="FINDFAIL", host="127.0.0.1", port=server.server_address[1])
            with pytest.raises(DimseFailure) as raised:
                find(node, "STUDY", {"StudyInstanceUID": None}, options)
        finally:
            ae.shutdown()
        assert raised.value.status == 0xA700


class TestRetrieve:
    def test_move_a_series_to_a_pacsflow_scp(
        self, orthanc: OrthancProcess, archive: Archive, options: NetworkOptions
    ) -> None:
        collector = Collector()
        with StoreSCP(collector, ae_title="PFMOVE", host="127.0.0.1") as scp:
            orthanc.add_modality("pfmove", "PFMOVE", "127.0.0.1", scp.port)
            result = move(
                orthanc.node,
                "PFMOVE",
                "SERIES",
                {
                    "StudyInstanceUID": archive.study_uid,
                    "SeriesInstanceUID": archive.series_uid(archive.first_series),
                },
                options,
            )
        assert result.ok
        assert (result.completed, result.failed, result.warning) == (12, 0, 0)
        received = sorted(instance.sop_instance_uid for instance in collector.instances)
        assert received == sorted(read_part10(p).sop_instance_uid for p in archive.first_series)
        assert {instance.called_ae for instance in collector.instances} == {"PFMOVE"}

    def test_move_to_an_unknown_destination_reports_the_failure(
        self, orthanc: OrthancProcess, archive: Archive, options: NetworkOptions
    ) -> None:
        result = move(
            orthanc.node, "NOWHERE", "STUDY", {"StudyInstanceUID": archive.study_uid}, options
        )
        assert result.category == "failure"
        assert not result.ok
        assert result.completed == 0

    def test_get_a_series_delivers_each_instance_as_the_scp_does(
        self, orthanc: OrthancProcess, archive: Archive, options: NetworkOptions
    ) -> None:
        collector = Collector()
        result = get(
            orthanc.node,
            "SERIES",
            {
                "StudyInstanceUID": archive.study_uid,
                "SeriesInstanceUID": archive.series_uid(archive.second_series),
            },
            options,
            collector,
        )
        assert result.ok
        assert result.completed == 8
        sources = {read_part10(p).sop_instance_uid: p for p in archive.second_series}
        assert sorted(i.sop_instance_uid for i in collector.instances) == sorted(sources)
        for instance in collector.instances:
            source = sources[instance.sop_instance_uid]
            # Orthanc keeps the file it was given and sends its data set unchanged.
            assert instance.dataset == source.read_bytes()[read_part10(source).dataset_offset :]
            assert instance.source_ae == "ORTHANC"
            assert instance.calling_ae == options.ae_title

    def test_get_whose_instances_fail_to_store_reports_failed_sub_operations(
        self, orthanc: OrthancProcess, archive: Archive, options: NetworkOptions
    ) -> None:
        def disk_full(instance: ReceivedInstance) -> int:
            return 0xA700

        result = get(
            orthanc.node,
            "SERIES",
            {
                "StudyInstanceUID": archive.study_uid,
                "SeriesInstanceUID": archive.series_uid(archive.second_series),
            },
            options,
            disk_full,
        )
        assert not result.ok
        assert result.failed == 8
        assert result.completed == 0
