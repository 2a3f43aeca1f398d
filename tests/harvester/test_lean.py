"""The lean Query/Retrieve SCU answers as the shared DICOM module does, for less CPU.

Parity against Orthanc (whatever Orthanc answers, both engines must read the same), and a
scripted pynetdicom SCP for what Orthanc never does: failure statuses, small PDUs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Self

import pytest
from pacsflow.config import Node
from pacsflow.dicom import (
    NetworkOptions,
    NoAcceptedContexts,
    ReceivedInstance,
    RejectedByPeer,
    StoreSCP,
)
from pacsflow.dicom import find as shared_find
from pacsflow.dicom import move as shared_move
from pacsflow.errors import AssociationRejected, DicomError, DimseFailure
from pacsflow_harvester import lean
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.harvester.support import Cohort, DimseProxy, write_cohort
from tests.peers import OrthancProcess, free_port

OPTIONS = NetworkOptions(
    ae_title="LEANTEST", connect_timeout=3, acse_timeout=5, dimse_timeout=10, network_timeout=20
)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return write_cohort(tmp_path_factory.mktemp("lean-cohort"), patients=2, studies=1,
                        series=2, instances=3)  # fmt: skip


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, small_cohort: Cohort
) -> Iterator[OrthancProcess]:
    with OrthancProcess(tmp_path_factory.mktemp("lean-orthanc")) as orthanc:
        orthanc.upload(small_cohort.files)
        yield orthanc


def _uids(matches: list[Dataset], keyword: str) -> list[str]:
    return sorted(str(match.get(keyword, "")) for match in matches)


@pytest.mark.orthanc
class TestParityWithOrthanc:
    @pytest.mark.parametrize(
        ("level", "query", "model", "key"),
        [
            ("PATIENT", {"PatientID": "*", "PatientName": None}, "patient", "PatientID"),
            ("STUDY", {"PatientID": "PAT001", "StudyInstanceUID": None, "StudyDate": None},
             "study", "StudyInstanceUID"),
            ("SERIES", {"StudyInstanceUID": None, "SeriesInstanceUID": None, "Modality": "MR"},
             "study", "SeriesInstanceUID"),
            ("IMAGE", {"SOPInstanceUID": None}, "study", "SOPInstanceUID"),
        ],
    )  # fmt: skip
    def test_find_answers_what_the_shared_module_answers(
        self, pacs: OrthancProcess, level: str, query: dict[str, object], model: str, key: str
    ) -> None:
        ours = lean.find(pacs.node, level, query, OPTIONS, model)  # type: ignore[arg-type]
        theirs = shared_find(pacs.node, level, query, OPTIONS, model)  # type: ignore[arg-type]
        assert _uids(ours, key) == _uids(theirs, key)
        assert ours

    def test_move_counts_and_delivers_like_the_shared_module(
        self, pacs: OrthancProcess, small_cohort: Cohort
    ) -> None:
        series = small_cohort.series[0]
        received: list[str] = []
        refuse: set[str] = set()

        def on_store(instance: ReceivedInstance) -> int:
            received.append(instance.sop_instance_uid)
            return 0xA700 if instance.sop_instance_uid in refuse else 0

        query = {"StudyInstanceUID": series.study_uid, "SeriesInstanceUID": series.series_uid}
        with StoreSCP(on_store, ae_title="LEANDEST", host="127.0.0.1") as scp:
            pacs.add_modality("leandest", "LEANDEST", "127.0.0.1", scp.port)
            ours = lean.move(pacs.node, "LEANDEST", "SERIES", query, OPTIONS)
            theirs = shared_move(pacs.node, "LEANDEST", "SERIES", query, OPTIONS)
            one = {**query, "SOPInstanceUID": [series.sop_uids[0]]}
            image = lean.move(pacs.node, "LEANDEST", "IMAGE", one, OPTIONS)
            # A destination that refuses an instance: Orthanc gives up the move with a
            # failure status; both engines must read that answer alike.
            refuse.add(series.sop_uids[1])
            refused = lean.move(pacs.node, "LEANDEST", "SERIES", query, OPTIONS)
            refused_shared = shared_move(pacs.node, "LEANDEST", "SERIES", query, OPTIONS)
        assert ours == theirs
        assert (ours.status, ours.completed, ours.failed, ours.warning) == (0, 3, 0, 0)
        assert (image.status, image.completed, image.failed) == (0, 1, 0)
        expected = [*series.sop_uids, *series.sop_uids, series.sop_uids[0]]
        assert sorted(received[: len(expected)]) == sorted(expected)
        assert refused == refused_shared
        assert not refused.ok

    def test_an_unknown_destination_is_a_failure_status(self, pacs: OrthancProcess) -> None:
        result = lean.move(pacs.node, "NOSUCHAE", "STUDY", {"StudyInstanceUID": "1.2.3"}, OPTIONS)
        assert result.category == "failure"
        assert result == shared_move(pacs.node, "NOSUCHAE", "STUDY",
                                     {"StudyInstanceUID": "1.2.3"}, OPTIONS)  # fmt: skip

    def test_a_connection_cut_during_the_move_is_an_error_at_once(
        self, pacs: OrthancProcess, small_cohort: Cohort
    ) -> None:
        series = small_cohort.series[0]
        with StoreSCP(lambda instance: 0, ae_title="LEANDEST", host="127.0.0.1") as scp:
            pacs.add_modality("leandest", "LEANDEST", "127.0.0.1", scp.port)
            with DimseProxy(pacs.dicom_port) as proxy:
                proxy.cut, proxy.forward_cut, proxy.cut_delay = {"C-MOVE"}, True, 0.01
                node = Node(ae_title="ORTHANC", host="127.0.0.1", port=proxy.port)
                started = time.monotonic()
                with pytest.raises(DicomError, match="no C-MOVE response"):
                    lean.move(node, "LEANDEST", "SERIES", {
                        "StudyInstanceUID": series.study_uid,
                        "SeriesInstanceUID": series.series_uid}, OPTIONS)  # fmt: skip
        # No wait for a release answer that cannot come.
        assert time.monotonic() - started < 3


class _ScriptedFindSCP:
    """A pynetdicom C-FIND SCP with a small PDU that answers one match per requested UID,
    then the status it is given."""

    def __init__(self, final_status: int) -> None:
        self.final_status = final_status
        self.requested: list[str] = []
        ae = AE(ae_title="SCRIPTED")
        ae.maximum_pdu_size = 4096
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae = ae
        self.port = free_port()
        self.server = None

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        uids = event.identifier.SOPInstanceUID
        self.requested = [uids] if isinstance(uids, str) else list(uids)
        for uid in self.requested[:3]:
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.SOPInstanceUID = uid
            yield 0xFF00, match
        yield self.final_status, None

    def __enter__(self) -> Self:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_FIND, self._on_find)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()

    @property
    def node(self) -> Node:
        return Node(ae_title="SCRIPTED", host="127.0.0.1", port=self.port)


class TestScriptedPeers:
    def test_a_long_identifier_is_split_to_the_peers_pdu_size(self) -> None:
        uids = [f"1.2.826.0.1.3680043.9.{n}.{n * 7919}" for n in range(1, 501)]
        with _ScriptedFindSCP(0x0000) as peer:
            matches = lean.find(peer.node, "IMAGE", {"StudyInstanceUID": "1.2", "SeriesInstanceUID":
                                "1.2.3", "SOPInstanceUID": uids}, OPTIONS)  # fmt: skip
            requested = peer.requested
        assert requested == uids
        assert [str(match.SOPInstanceUID) for match in matches] == uids[:3]

    def test_a_failure_status_raises_with_its_code(self) -> None:
        with _ScriptedFindSCP(0xA700) as peer, pytest.raises(DimseFailure) as caught:
            lean.find(peer.node, "IMAGE", {"SOPInstanceUID": ["1.2.3"]}, OPTIONS)
        assert caught.value.status == 0xA700

    def test_a_rejected_association_says_why(self) -> None:
        with StoreSCP(lambda instance: 0, ae_title="OTHER", host="127.0.0.1",
                      called_ae_titles=["OTHER"]) as scp:  # fmt: skip
            node = Node(ae_title="WRONG", host="127.0.0.1", port=scp.port)
            with pytest.raises(RejectedByPeer) as caught:
                lean.find(node, "STUDY", {"StudyInstanceUID": None}, OPTIONS)
            assert (caught.value.result, caught.value.reason) == (1, 7)
            # A storage SCP accepts the association but not the query model.
            with pytest.raises(NoAcceptedContexts):
                lean.find(Node(ae_title="OTHER", host="127.0.0.1", port=scp.port),
                          "STUDY", {"StudyInstanceUID": None}, OPTIONS)  # fmt: skip

    def test_nothing_listening_is_no_association(self) -> None:
        node = Node(ae_title="NOBODY", host="127.0.0.1", port=free_port())
        with pytest.raises(AssociationRejected):
            lean.move(node, "X", "STUDY", {"StudyInstanceUID": "1.2"}, OPTIONS)

    def test_a_peer_that_stops_answering_times_out(self) -> None:
        import socket

        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            accepted: list[socket.socket] = []
            thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
            thread.start()
            node = Node(ae_title="MUTE", host="127.0.0.1", port=listener.getsockname()[1])
            quick = NetworkOptions(ae_title="LEANTEST", connect_timeout=1, acse_timeout=0.5)
            started = time.monotonic()
            with pytest.raises(AssociationRejected):
                lean.find(node, "STUDY", {"StudyInstanceUID": None}, quick)
            thread.join(5)
            for sock in accepted:
                sock.close()
        assert time.monotonic() - started < 3
