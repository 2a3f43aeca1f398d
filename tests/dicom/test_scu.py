"""Storage SCU: pacsflow sends files to DCMTK storescp, to its own SCP and to faulty peers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from pacsflow.config import Node
from pacsflow.dicom import (
    AssociationInfo,
    NetworkOptions,
    ReceivedInstance,
    StoreSCP,
    StoreSession,
    echo,
    read_part10,
    send_files,
)
from pacsflow.errors import AssociationRejected
from tests.dicom.synthetic import write_ct_series, write_presentation_variety
from tests.peers import StoreSCPProcess

pytestmark = pytest.mark.dcmtk

# pydicom corpus files with distinct SOP Instance UIDs, in several transfer syntaxes.
CORPUS = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "ExplVR_BigEnd.dcm",
    "image_dfl.dcm",  # deflated
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "SC_rgb_rle.dcm",
    "JPEGLSNearLossless_08.dcm",
    "rtdose.dcm",
]


class CountingSCP:
    """A pacsflow StoreSCP that records associations and instances."""

    def __init__(self, **scp_options: object) -> None:
        self.associations: list[AssociationInfo] = []
        self.instances: list[ReceivedInstance] = []
        self.lock = threading.Lock()
        self.scp = StoreSCP(
            self._store, ae_title="PFSCP", host="127.0.0.1", accept=self._accept, **scp_options
        )  # type: ignore[arg-type]

    def _accept(self, info: AssociationInfo) -> None:
        with self.lock:
            self.associations.append(info)

    def _store(self, instance: ReceivedInstance) -> int:
        with self.lock:
            self.instances.append(instance)
        return 0

    @property
    def node(self) -> Node:
        return Node(ae_title="PFSCP", host="127.0.0.1", port=self.scp.port)


@pytest.fixture
def counting_scp() -> Iterator[CountingSCP]:
    counting = CountingSCP()
    with counting.scp:
        yield counting


class FaultySCP:
    """A pynetdicom SCP whose C-STORE handler misbehaves on chosen requests (count from 1)."""

    def __init__(self, misbehave: Callable[[evt.Event, int], None]) -> None:
        self.misbehave = misbehave
        self.requests = 0
        self.established = 0
        self.ae = AE("FAULTY")
        self.ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
        self.server = self.ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._established)],
        )

    def _established(self, event: evt.Event) -> None:
        self.established += 1

    def _store(self, event: evt.Event) -> int:
        self.requests += 1
        self.misbehave(event, self.requests)
        return 0x0000

    @property
    def node(self) -> Node:
        return Node(ae_title="FAULTY", host="127.0.0.1", port=self.server.server_address[1])

    def stop(self) -> None:
        self.ae.shutdown()


class TestToStorescp:
    def test_files_in_many_syntaxes_arrive_in_their_own_syntax(
        self,
        storescp: StoreSCPProcess,
        pydicom_test_files: Path,
        tmp_path: Path,
        options: NetworkOptions,
    ) -> None:
        paths = write_ct_series(tmp_path / "series", 30) + [
            pydicom_test_files / name for name in CORPUS
        ]
        sent = {read_part10(path).sop_instance_uid: read_part10(path) for path in paths}
        assert len(sent) == len(paths), "test files must have distinct SOP Instance UIDs"

        results = list(send_files(storescp.node, paths, options))

        assert [result for result in results if not result.ok] == []
        received = {
            read_part10(path).sop_instance_uid: read_part10(path) for path in storescp.files()
        }
        assert received.keys() == sent.keys()
        for uid, part_ten in sent.items():
            assert received[uid].transfer_syntax_uid == part_ten.transfer_syntax_uid

    def test_echo_round_trip(self, storescp: StoreSCPProcess, options: NetworkOptions) -> None:
        assert 0 < echo(storescp.node, options) < 5

    def test_file_in_a_syntax_the_peer_refuses_is_refused_and_the_rest_sent(
        self, tmp_path: Path, pydicom_test_files: Path, options: NetworkOptions
    ) -> None:
        jpeg = pydicom_test_files / "SC_rgb_jpeg_dcmtk.dcm"
        series = write_ct_series(tmp_path / "series", 3)
        with StoreSCPProcess(tmp_path / "received", accept_all_syntaxes=False) as uncompressed_only:
            results = {
                result.path: result
                for result in send_files(uncompressed_only.node, [jpeg, *series], options)
            }
            arrived = len(uncompressed_only.files())
        assert results[jpeg].category == "refused"
        assert results[jpeg].status is None
        assert "1.2.840.10008.1.2.4.50" in (results[jpeg].error or "")
        assert all(results[path].ok for path in series)
        assert arrived == 3

    def test_invalid_file_is_reported_and_does_not_block_the_batch(
        self, storescp: StoreSCPProcess, tmp_path: Path, options: NetworkOptions
    ) -> None:
        series = write_ct_series(tmp_path / "series", 3)
        text = tmp_path / "notes.txt"
        text.write_text("not an image")
        results = {
            result.path: result for result in send_files(storescp.node, [text, *series], options)
        }
        assert results[text].category == "invalid"
        assert "not DICOM" in (results[text].error or "")
        assert all(results[path].ok for path in series)
        assert len(storescp.files()) == 3

    def test_stopping_the_iteration_stops_sending(
        self, storescp: StoreSCPProcess, small_series: list[Path], options: NetworkOptions
    ) -> None:
        results = send_files(storescp.node, small_series, options, associations=2)
        taken = [next(results) for _ in range(5)]
        results.close()  # what a consumer breaking out of a for loop does
        assert all(result.ok for result in taken)
        time.sleep(0.3)
        # Each worker finishes at most the file it was sending.
        assert len(storescp.files()) <= 5 + 2 + 2

    def test_nothing_listening_gives_an_error_per_file(
        self, tmp_path: Path, options: NetworkOptions
    ) -> None:
        series = write_ct_series(tmp_path / "series", 3)
        scp = StoreSCP(lambda instance: 0, host="127.0.0.1").start()
        port = scp.port
        scp.stop()
        results = list(
            send_files(Node(ae_title="GONE", host="127.0.0.1", port=port), series, options)
        )
        assert [result.category for result in results] == ["error"] * 3
        assert all("no association" in (result.error or "") for result in results)

    def test_echo_to_a_closed_port_is_rejected(self, options: NetworkOptions) -> None:
        scp = StoreSCP(lambda instance: 0, host="127.0.0.1").start()
        port = scp.port
        scp.stop()
        with pytest.raises(AssociationRejected):
            echo(Node(ae_title="GONE", host="127.0.0.1", port=port), options)


class TestSeveralAssociations:
    def test_files_are_spread_over_the_associations_asked_for(
        self, counting_scp: CountingSCP, tmp_path: Path, options: NetworkOptions
    ) -> None:
        series = write_ct_series(tmp_path / "series", 200)
        results = list(send_files(counting_scp.node, series, options, associations=4))
        assert sum(result.ok for result in results) == 200
        assert len(counting_scp.associations) == 4
        uids = sorted(instance.sop_instance_uid for instance in counting_scp.instances)
        assert uids == sorted(read_part10(path).sop_instance_uid for path in series)

    def test_more_than_128_presentations_take_more_than_one_association(
        self, counting_scp: CountingSCP, tmp_path: Path, options: NetworkOptions
    ) -> None:
        sop_classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts[:65]]
        paths = write_presentation_variety(
            tmp_path / "variety", sop_classes, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        assert len(paths) == 130
        results = list(send_files(counting_scp.node, paths, options, associations=1))
        assert [result for result in results if not result.ok] == []
        assert len(counting_scp.associations) == 2
        received = {(i.sop_class_uid, i.transfer_syntax_uid) for i in counting_scp.instances}
        assert len(received) == 130

    def test_associations_the_peer_refuses_leave_their_files_to_the_others(
        self, tmp_path: Path, options: NetworkOptions
    ) -> None:
        series = write_ct_series(tmp_path / "series", 60)
        limited = CountingSCP(max_associations=2)
        with limited.scp:
            results = list(send_files(limited.node, series, options, associations=4))
        assert sum(result.ok for result in results) == 60
        assert len(limited.instances) == 60


class TestFaultyPeers:
    def test_peer_abort_costs_one_file_and_sending_goes_on_on_a_new_association(
        self, tmp_path: Path, options: NetworkOptions
    ) -> None:
        def abort_third(event: evt.Event, number: int) -> None:
            if number == 3:
                event.assoc.abort()

        peer = FaultySCP(abort_third)
        try:
            series = write_ct_series(tmp_path / "series", 10)
            results = list(send_files(peer.node, series, options))
        finally:
            peer.stop()
        categories = [result.category for result in results]
        assert categories.count("error") == 1
        assert categories.count("success") == 9
        assert peer.established == 2

    def test_missing_response_times_out_aborts_and_reassociates(self, tmp_path: Path) -> None:
        def stall_second(event: evt.Event, number: int) -> None:
            if number == 2:
                time.sleep(2.5)

        peer = FaultySCP(stall_second)
        quick = NetworkOptions(ae_title="PFTEST", dimse_timeout=1, acse_timeout=5)
        try:
            series = write_ct_series(tmp_path / "series", 5)
            started = time.perf_counter()
            results = list(send_files(peer.node, series, quick))
            elapsed = time.perf_counter() - started
        finally:
            peer.stop()
        timed_out = [result for result in results if result.category == "error"]
        assert len(timed_out) == 1
        assert "within 1 s" in (timed_out[0].error or "")
        assert sum(result.ok for result in results) == 4
        assert peer.established == 2
        assert elapsed < 10


class TestStoreSession:
    def test_send_after_close_is_an_error_not_an_exception(
        self, storescp: StoreSCPProcess, tmp_path: Path, options: NetworkOptions
    ) -> None:
        (path,) = write_ct_series(tmp_path / "one", 1)
        with StoreSession.for_files(storescp.node, options, [read_part10(path)]) as session:
            assert session.send(path).ok
        result = session.send(path)
        assert result.category == "error"
        assert not session.is_open

    def test_one_association_takes_at_most_128_presentations(
        self, storescp: StoreSCPProcess, options: NetworkOptions
    ) -> None:
        pairs = [
            (str(cx.abstract_syntax), ExplicitVRLittleEndian)
            for cx in AllStoragePresentationContexts[:129]
        ]
        with pytest.raises(ValueError, match="at most 128"):
            StoreSession(storescp.node, options, pairs)

    def test_accepted_presentations_are_reported(
        self, storescp: StoreSCPProcess, tmp_path: Path, options: NetworkOptions
    ) -> None:
        pair = (CTImageStorage, ExplicitVRLittleEndian)
        unknown = ("1.2.3.4.5.6.7.8.9", ExplicitVRLittleEndian)  # no SOP class storescp knows
        with StoreSession(storescp.node, options, [pair, unknown]) as session:
            assert session.accepts(pair)
            assert not session.accepts(unknown)
