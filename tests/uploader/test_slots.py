"""One association's worth of sending (a slot and its store session) against real peers:
DCMTK storescp, and pacsflow's own storage SCP where received bytes must be compared."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pacsflow.config import Node
from pacsflow.dicom import NetworkOptions, ReceivedInstance, StoreSCP, read_part10
from pacsflow.errors import InvalidDicom
from pacsflow_uploader.files import FileJob
from pacsflow_uploader.scu import Engine
from pacsflow_uploader.slots import Slot
from pynetdicom import AllStoragePresentationContexts

from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port
from tests.uploader.support import MR_ONLY_PROFILE, OPTIONS, Storescp, write_instances

pytestmark = pytest.mark.dcmtk

# Corpus files in as many transfer syntaxes as the corpus has, each sent as it is.
SYNTAX_SAMPLES = [
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small.dcm",  # explicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian (retired)
    "image_dfl.dcm",  # deflated explicit VR little endian
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "SC_rgb_rle.dcm",  # RLE lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
]

# Corpus files DCMTK itself cannot read (its storescu refuses to send them): storescp answers
# 0xC000 for them, which is the right answer to report.
DCMTK_CANNOT_READ = {"rtdose_rle.dcm", "rtdose_rle_1frame.dcm"}


class Collector:
    """A storage SCP callback keeping every data set as received, answering ``status``."""

    def __init__(self, status: int = 0x0000) -> None:
        self.status = status
        self.instances: list[ReceivedInstance] = []
        self.lock = threading.Lock()

    def __call__(self, instance: ReceivedInstance) -> int:
        with self.lock:
            self.instances.append(instance)
        return self.status


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def scp(collector: Collector) -> Iterator[StoreSCP]:
    with StoreSCP(collector, ae_title="PFSCP", host="127.0.0.1") as server:
        yield server


def node_of(scp: StoreSCP) -> Node:
    return Node(ae_title="PFSCP", host="127.0.0.1", port=scp.port)


def jobs(paths: list[Path], *, recorded: bool = False) -> list[FileJob]:
    if not recorded:
        return [FileJob(i, str(p)) for i, p in enumerate(paths)]
    found = []
    for i, path in enumerate(paths):
        part10 = read_part10(path)
        found.append(FileJob(i, str(path), part10.sop_class_uid, part10.sop_instance_uid,
                             part10.transfer_syntax_uid))
    return found


@pytest.mark.parametrize("engine", ["lean", "pynetdicom", "asyncio"])
class TestBytesOnTheWire:
    def test_data_sets_arrive_byte_identical_in_their_own_syntax(
        self, engine: Engine, scp: StoreSCP, collector: Collector, tmp_path: Path,
        pydicom_test_files: Path,
    ) -> None:  # fmt: skip
        paths = write_ct_series(tmp_path / "ct", 5, 512, 512) + [
            pydicom_test_files / name for name in SYNTAX_SAMPLES
        ]
        slot = Slot(node_of(scp), OPTIONS, engine=engine)
        try:
            chunk = slot.run(jobs(paths, recorded=True))
        finally:
            slot.close()
        assert [r.category for r in chunk.results] == ["success"] * len(paths)
        # Some corpus files are one instance in several syntaxes.
        received = {(i.sop_instance_uid, i.transfer_syntax_uid): i for i in collector.instances}
        assert len(received) == len(paths)
        for path in paths:
            sent = read_part10(path)
            instance = received[(sent.sop_instance_uid, sent.transfer_syntax_uid)]
            data = path.read_bytes()[sent.dataset_offset :]
            # A deflated data set of odd length travels with one trailing NUL (PS3.5 A.5).
            assert instance.dataset == data + b"\x00" * (len(data) % 2), path.name
        assert chunk.associations_opened == 1


class TestPresentationContexts:
    def test_every_corpus_file_is_stored_or_refused_never_failed(
        self, tmp_path: Path, pydicom_test_files: Path
    ) -> None:
        paths = []
        for path in sorted(pydicom_test_files.rglob("*")):
            try:
                if path.is_file() and path.name != "DICOMDIR" and read_part10(path):
                    paths.append(path)
            except InvalidDicom:
                continue
        with Storescp(tmp_path / "in", fork=False) as peer:
            slot = Slot(peer.node, OPTIONS)
            chunk = slot.run(jobs(paths))
            slot.close()
        unexpected = [
            (paths[r.key].name, r.category, r.error) for r in chunk.results
            if r.category not in ("success", "refused") and paths[r.key].name not in DCMTK_CANNOT_READ
        ]  # fmt: skip
        assert unexpected == []
        stored = sum(r.category == "success" for r in chunk.results)
        assert stored >= 100
        # storescp keeps what it could not read too, so at least one file per success.
        assert len(peer.files()) >= stored

    def test_more_than_128_presentations_are_split_over_associations(
        self, scp: StoreSCP, collector: Collector, tmp_path: Path
    ) -> None:
        # pacsflow's SCP takes every storage SOP class pynetdicom knows (DCMTK 3.6.7 lacks
        # some of the newer ones).
        classes = [str(c.abstract_syntax) for c in AllStoragePresentationContexts][:140]
        paths = write_instances(tmp_path / "classes", classes)
        slot = Slot(node_of(scp), OPTIONS)
        try:
            chunk = slot.run(jobs(paths))
        finally:
            slot.close()
        assert [r.category for r in chunk.results] == ["success"] * 140
        assert chunk.associations_opened == 2
        assert sorted(i.sop_class_uid for i in collector.instances) == sorted(classes)

    def test_refused_sop_class_is_reported_and_the_rest_is_sent(
        self, tmp_path: Path, pydicom_test_files: Path
    ) -> None:
        paths = write_ct_series(tmp_path / "ct", 3) + [pydicom_test_files / "MR_small.dcm"]
        with Storescp(tmp_path / "in", fork=False, profile=MR_ONLY_PROFILE) as peer:
            slot = Slot(peer.node, OPTIONS)
            chunk = slot.run(jobs(paths))
            slot.close()
        categories = [r.category for r in sorted(chunk.results, key=lambda r: r.key)]
        assert categories == ["refused", "refused", "refused", "success"]
        refused = chunk.results[0] if chunk.results[0].category == "refused" else chunk.results[1]
        assert "accepted no presentation context" in (refused.error or "")
        assert refused.status is None
        assert list(peer.uids()) == [read_part10(paths[3]).sop_instance_uid]


class TestStatuses:
    def test_failure_status_is_reported_with_its_code(self, tmp_path: Path) -> None:
        paths = write_ct_series(tmp_path / "ct", 2)
        with Storescp(tmp_path / "in", fork=False) as peer:
            # storescp answers "out of resources" (0xA700) when it cannot write the file.
            shutil.rmtree(peer.folder)
            slot = Slot(peer.node, OPTIONS)
            chunk = slot.run(jobs(paths))
            slot.close()
        assert [(r.category, r.status) for r in chunk.results] == [("failure", 0xA700)] * 2
        assert all(r.transmitted and r.attempted for r in chunk.results)
        assert "0xA700" in (chunk.results[0].error or "")

    def test_warning_counts_as_stored_and_keeps_the_warning(self, tmp_path: Path) -> None:
        collector = Collector(status=0xB007)
        paths = write_ct_series(tmp_path / "ct", 2)
        with StoreSCP(collector, ae_title="PFSCP", host="127.0.0.1") as scp:
            slot = Slot(node_of(scp), OPTIONS)
            chunk = slot.run(jobs(paths))
            slot.close()
        assert [(r.category, r.status, r.ok) for r in chunk.results] == [
            ("warning", 0xB007, True)
        ] * 2
        assert "0xB007" in (chunk.results[0].error or "")
        assert len(collector.instances) == 2

    def test_no_answer_after_the_request_is_in_doubt(self, tmp_path: Path) -> None:
        paths = write_ct_series(tmp_path / "ct", 3)
        # --abort-after: storescp stores nothing and aborts instead of answering.
        with Storescp(tmp_path / "in", fork=False, extra_args=["--abort-after"]) as peer:
            slot = Slot(peer.node, OPTIONS)
            chunk = slot.run(jobs(paths))
            slot.close()
        assert [r.category for r in chunk.results] == ["error"] * 3
        assert all(r.transmitted and r.attempted for r in chunk.results)
        # After each abort the slot associates again for the next file.
        assert chunk.associations_opened == 3

    def test_unreachable_destination_tries_no_file(self, tmp_path: Path) -> None:
        paths = write_ct_series(tmp_path / "ct", 2)
        slot = Slot(Node(ae_title="NOBODY", host="127.0.0.1", port=free_port()), OPTIONS)
        chunk = slot.run(jobs(paths))
        assert chunk.association_error is not None
        assert "connection refused" in chunk.association_error
        assert [(r.category, r.attempted, r.transmitted) for r in chunk.results] == [
            ("error", False, False)
        ] * 2


class TestReuse:
    def test_association_is_kept_from_chunk_to_chunk(
        self, scp: StoreSCP, collector: Collector, tmp_path: Path
    ) -> None:
        paths = write_ct_series(tmp_path / "ct", 20)
        slot = Slot(node_of(scp), OPTIONS)
        try:
            first = slot.run(jobs(paths[:10]))
            second = slot.run(jobs(paths[10:]))
        finally:
            slot.close()
        assert (first.associations_opened, second.associations_opened) == (1, 0)
        assert first.association_open and second.association_open
        assert len(collector.instances) == 20

    def test_association_the_peer_ended_while_idle_is_replaced(
        self, collector: Collector, tmp_path: Path
    ) -> None:
        paths = write_ct_series(tmp_path / "ct", 4)
        # The SCP drops associations idle for a second.
        quick = NetworkOptions(ae_title="PFSCP", network_timeout=1)
        with StoreSCP(collector, ae_title="PFSCP", host="127.0.0.1", options=quick) as scp:
            slot = Slot(node_of(scp), OPTIONS)
            try:
                first = slot.run(jobs(paths[:2]))
                time.sleep(2.5)
                second = slot.run(jobs(paths[2:]))
            finally:
                slot.close()
        assert [r.category for r in first.results + second.results] == ["success"] * 4
        assert second.associations_opened == 1
        assert len(collector.instances) == 4

    def test_idle_association_is_released(
        self, scp: StoreSCP, collector: Collector, tmp_path: Path
    ) -> None:
        paths = write_ct_series(tmp_path / "ct", 1)
        slot = Slot(node_of(scp), OPTIONS, idle_release=0.2)
        slot.run(jobs(paths))
        assert slot.association_open and scp.active_associations == 1
        assert not slot.release_if_idle()
        time.sleep(0.3)
        assert slot.release_if_idle()
        deadline = time.monotonic() + 5
        while scp.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not slot.association_open and scp.active_associations == 0


class SlowCollector(Collector):
    """Answers only after ``delay`` seconds, as a PACS storing a large image does."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def __call__(self, instance: ReceivedInstance) -> int:
        time.sleep(self.delay)
        return super().__call__(instance)


@pytest.mark.parametrize("engine", ["lean", "asyncio"])
class TestThinLine:
    """The DIMSE timeout bounds the peer's silence, not the request's time on the wire.

    A line's acknowledgements cannot be timed to the millisecond here, so the kernel's count
    of unacknowledged bytes is scripted: the request's last bytes are acknowledged just before
    the first timeout ends, and the peer answers half a timeout after that."""

    TIMEOUT = 0.5

    @pytest.fixture
    def last_bytes_acknowledged_late(self, monkeypatch: pytest.MonkeyPatch) -> None:
        first_look: list[float] = []

        def unacknowledged(_sock: object) -> int:
            first_look[:] = first_look or [time.monotonic()]
            return 50_000 if time.monotonic() - first_look[0] < 0.95 * self.TIMEOUT else 0

        monkeypatch.setattr("pacsflow_uploader.scu.unacknowledged_bytes", unacknowledged)
        monkeypatch.setattr("pacsflow.dicom.engine.scu.unacknowledged_bytes", unacknowledged)

    def send_one(self, engine: Engine, answer_after: float, tmp_path: Path) -> tuple[Any, float]:
        collector = SlowCollector(answer_after)
        options = NetworkOptions(ae_title="PFTEST", dimse_timeout=self.TIMEOUT)
        paths = write_ct_series(tmp_path / "ct", 1)
        with StoreSCP(collector, ae_title="PFSCP", host="127.0.0.1") as scp:
            slot = Slot(node_of(scp), options, engine=engine)
            started = time.monotonic()
            try:
                chunk = slot.run(jobs(paths))
                seconds = time.monotonic() - started
            finally:
                slot.close()
        return chunk.results[0], seconds

    def test_an_answer_after_the_last_bytes_arrived_is_waited_for(
        self, engine: Engine, last_bytes_acknowledged_late: None, tmp_path: Path
    ) -> None:
        result, _ = self.send_one(engine, 1.5 * self.TIMEOUT, tmp_path)
        assert (result.category, result.error) == ("success", None)

    def test_a_peer_silent_after_the_last_bytes_times_out(
        self, engine: Engine, last_bytes_acknowledged_late: None, tmp_path: Path
    ) -> None:
        result, seconds = self.send_one(engine, 6 * self.TIMEOUT, tmp_path)
        assert result.category == "error" and result.transmitted
        assert "no C-STORE response" in (result.error or "") or "timed out" in (result.error or "")
        # One wait for the bytes, one for the answer: not the peer's six.
        assert seconds < 4 * self.TIMEOUT
