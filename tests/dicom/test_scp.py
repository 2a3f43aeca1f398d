"""The storage SCP against DCMTK's storescu and echoscu, and against pynetdicom directly."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import build_context

from pacsflow.config import Node
from pacsflow.dicom import (
    AssociationInfo,
    NetworkOptions,
    ReceivedInstance,
    RejectedByPeer,
    RejectReason,
    StoreSCP,
    StoreSession,
    echo,
    read_part10,
    send_files,
)
from pacsflow.dicom.files import encode_file_meta
from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series

pytestmark = pytest.mark.dcmtk

# Corpus files that storescu passes through unchanged, with the option that makes it
# propose their transfer syntax (it proposes only uncompressed syntaxes by default).
STORESCU_PASSES_UNCHANGED = [
    ("", ["MR_small_implicit.dcm", "rtdose.dcm", "rtplan.dcm", "test-SR.dcm"]),
    ("-xy", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cr.dcm"]),  # JPEG baseline
    ("-xr", ["SC_rgb_rle.dcm"]),  # RLE lossless
    ("-xs", ["SC_rgb_jpeg_gdcm.dcm"]),  # JPEG lossless, first-order prediction
]


class Receiver:
    """An on_store callback that writes each instance under a folder and remembers it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.instances: list[ReceivedInstance] = []
        self.lock = threading.Lock()

    def __call__(self, instance: ReceivedInstance) -> int:
        instance.write(self.folder / f"{instance.sop_instance_uid}.dcm")
        with self.lock:
            self.instances.append(instance)
        return 0x0000

    def path_of(self, sop_instance_uid: str) -> Path:
        return self.folder / f"{sop_instance_uid}.dcm"


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver(tmp_path / "stored")


@pytest.fixture
def scp(receiver: Receiver) -> Iterator[StoreSCP]:
    with StoreSCP(
        receiver, ae_title="PFSCP", host="127.0.0.1", called_ae_titles=["PFSCP"]
    ) as server:
        yield server


def _dcmtk(tool: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(tool), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class TestStorescuToScp:
    @pytest.mark.parametrize(("option", "names"), STORESCU_PASSES_UNCHANGED)
    def test_corpus_files_are_stored_byte_identical_in_their_own_syntax(
        self,
        scp: StoreSCP,
        receiver: Receiver,
        pydicom_test_files: Path,
        dcmtk_env: dict[str, str],
        option: str,
        names: list[str],
    ) -> None:
        sources = [pydicom_test_files / name for name in names]
        result = _dcmtk(
            "storescu", *([option] if option else []), "-aec", "PFSCP", "127.0.0.1", str(scp.port),
            *map(str, sources), env=dcmtk_env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        for source in sources:
            sent = read_part10(source)
            stored = read_part10(receiver.path_of(sent.sop_instance_uid))
            assert stored.transfer_syntax_uid == sent.transfer_syntax_uid
            assert (
                stored.path.read_bytes()[stored.dataset_offset :]
                == source.read_bytes()[sent.dataset_offset :]
            )

    def test_a_series_is_stored_byte_identical_and_dcmdump_reads_it(
        self, scp: StoreSCP, receiver: Receiver, tmp_path: Path, dcmtk_env: dict[str, str]
    ) -> None:
        sources = write_ct_series(tmp_path / "series", 50)
        result = _dcmtk(
            "storescu", "-aet", "MODALITY", "-aec", "PFSCP", "+sd", "127.0.0.1", str(scp.port),
            str(tmp_path / "series"), env=dcmtk_env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert len(receiver.instances) == 50
        for source in sources:
            sent = read_part10(source)
            stored_path = receiver.path_of(sent.sop_instance_uid)
            stored = read_part10(stored_path)
            assert (
                stored_path.read_bytes()[stored.dataset_offset :]
                == source.read_bytes()[sent.dataset_offset :]
            )
        dump = _dcmtk(
            "dcmdump",
            "-M",
            str(receiver.path_of(read_part10(sources[0]).sop_instance_uid)),
            env=dcmtk_env,
        )
        assert dump.returncode == 0, dump.stderr
        assert "(0002,0016) AE [MODALITY]" in dump.stdout
        instance = receiver.instances[0]
        assert (instance.calling_ae, instance.called_ae, instance.source_ae) == (
            "MODALITY",
            "PFSCP",
            "MODALITY",
        )
        assert instance.peer_host == "127.0.0.1"

    def test_header_is_read_lazily_and_stops_before_pixel_data(
        self, scp: StoreSCP, receiver: Receiver, tmp_path: Path, dcmtk_env: dict[str, str]
    ) -> None:
        (source,) = write_ct_series(tmp_path / "one", 1)
        _dcmtk("storescu", "-aec", "PFSCP", "127.0.0.1", str(scp.port), str(source), env=dcmtk_env)
        (instance,) = receiver.instances
        assert "header" not in vars(instance)
        assert instance.header.PatientID == "PFTEST"
        assert "PixelData" not in instance.header


class TestEcho:
    def test_echoscu_gets_an_answer(self, scp: StoreSCP, dcmtk_env: dict[str, str]) -> None:
        result = _dcmtk("echoscu", "-aec", "PFSCP", "127.0.0.1", str(scp.port), env=dcmtk_env)
        assert result.returncode == 0, result.stderr

    def test_pacsflow_echo_gets_an_answer(self, scp: StoreSCP, options: NetworkOptions) -> None:
        assert echo(Node(ae_title="PFSCP", host="127.0.0.1", port=scp.port), options) > 0


class TestRejection:
    def test_calling_ae_not_in_allow_list_is_rejected_with_reason_3(
        self, receiver: Receiver, dcmtk_env: dict[str, str], options: NetworkOptions
    ) -> None:
        with StoreSCP(
            receiver, ae_title="PFSCP", host="127.0.0.1", allowed_calling_aes=["MODALITY"]
        ) as server:
            allowed = _dcmtk(
                "echoscu",
                "-aet",
                "MODALITY",
                "-aec",
                "PFSCP",
                "127.0.0.1",
                str(server.port),
                env=dcmtk_env,
            )
            refused = _dcmtk(
                "echoscu",
                "-aet",
                "INTRUDER",
                "-aec",
                "PFSCP",
                "127.0.0.1",
                str(server.port),
                env=dcmtk_env,
            )
            with pytest.raises(RejectedByPeer) as raised:
                echo(Node(ae_title="PFSCP", host="127.0.0.1", port=server.port), options)
        assert allowed.returncode == 0, allowed.stderr
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr
        assert "Calling AE Title Not Recognized" in refused.stderr
        assert (raised.value.result, raised.value.source, raised.value.reason) == (1, 1, 3)

    def test_unknown_called_ae_is_rejected_with_reason_7(
        self, scp: StoreSCP, tmp_path: Path, dcmtk_env: dict[str, str]
    ) -> None:
        (source,) = write_ct_series(tmp_path / "one", 1)
        result = _dcmtk(
            "storescu", "-aec", "ELSEWHERE", "127.0.0.1", str(scp.port), str(source), env=dcmtk_env
        )
        assert result.returncode != 0
        assert "Called AE Title Not Recognized" in result.stderr

    def test_address_outside_the_allow_list_is_rejected(
        self, receiver: Receiver, options: NetworkOptions
    ) -> None:
        with StoreSCP(
            receiver, ae_title="PFSCP", host="127.0.0.1", allowed_addresses=["10.0.0.0/8"]
        ) as server:
            with pytest.raises(RejectedByPeer) as raised:
                echo(Node(ae_title="PFSCP", host="127.0.0.1", port=server.port), options)
        assert (raised.value.result, raised.value.source, raised.value.reason) == (1, 1, 1)

    def test_one_scp_routes_several_called_aes_through_the_accept_callback(
        self, receiver: Receiver, tmp_path: Path, options: NetworkOptions
    ) -> None:
        seen: list[AssociationInfo] = []

        def route(info: AssociationInfo) -> str | None:
            seen.append(info)
            return (
                None
                if info.called_ae in ("RESEARCH", "CLINIC")
                else RejectReason.CALLED_AE_NOT_RECOGNISED
            )

        files = write_ct_series(tmp_path / "series", 4)
        with StoreSCP(receiver, ae_title="ROUTER", host="127.0.0.1", accept=route) as server:
            to_research = list(
                send_files(
                    Node(ae_title="RESEARCH", host="127.0.0.1", port=server.port),
                    files[:2],
                    options,
                )
            )
            to_clinic = list(
                send_files(
                    Node(ae_title="CLINIC", host="127.0.0.1", port=server.port), files[2:], options
                )
            )
            with pytest.raises(RejectedByPeer) as raised:
                echo(Node(ae_title="UNROUTED", host="127.0.0.1", port=server.port), options)
        assert all(result.ok for result in to_research + to_clinic)
        called = sorted(
            (instance.called_ae, instance.sop_instance_uid) for instance in receiver.instances
        )
        assert [ae for ae, _ in called] == ["CLINIC", "CLINIC", "RESEARCH", "RESEARCH"]
        assert raised.value.reason == 7
        assert [info.calling_ae for info in seen] == ["PFTEST"] * 3

    def test_failing_accept_callback_rejects_instead_of_accepting(
        self, receiver: Receiver, options: NetworkOptions
    ) -> None:
        def broken(info: AssociationInfo) -> str | None:
            raise KeyError("route table not loaded")

        with StoreSCP(receiver, ae_title="PFSCP", host="127.0.0.1", accept=broken) as server:
            with pytest.raises(RejectedByPeer):
                echo(Node(ae_title="PFSCP", host="127.0.0.1", port=server.port), options)

    def test_association_over_the_limit_is_rejected_transiently(
        self, receiver: Receiver, tmp_path: Path, options: NetworkOptions
    ) -> None:
        (source,) = write_ct_series(tmp_path / "one", 1)
        with StoreSCP(receiver, ae_title="PFSCP", host="127.0.0.1", max_associations=1) as server:
            node = Node(ae_title="PFSCP", host="127.0.0.1", port=server.port)
            with StoreSession.for_files(node, options, [read_part10(source)]) as session:
                assert session.send(source).ok
                with pytest.raises(RejectedByPeer) as raised:
                    echo(node, options)
            # The limit counts open associations: once released, a new one is accepted.
            assert echo(node, options) > 0
        # Rejected transient, by the service provider (presentation), local limit exceeded.
        assert (raised.value.result, raised.value.source, raised.value.reason) == (2, 3, 2)


class TestFailures:
    def test_exception_in_on_store_answers_c211_and_the_association_goes_on(
        self, tmp_path: Path, options: NetworkOptions
    ) -> None:
        files = write_ct_series(tmp_path / "series", 5)
        poisoned = read_part10(files[2]).sop_instance_uid
        stored: list[str] = []
        associations: list[AssociationInfo] = []

        def on_store(instance: ReceivedInstance) -> int:
            if instance.sop_instance_uid == poisoned:
                raise OSError("disk full")
            stored.append(instance.sop_instance_uid)
            return 0

        with StoreSCP(
            on_store,
            ae_title="PFSCP",
            host="127.0.0.1",
            accept=lambda info: associations.append(info),
        ) as server:
            results = list(
                send_files(
                    Node(ae_title="PFSCP", host="127.0.0.1", port=server.port), files, options
                )
            )
        by_uid = {result.sop_instance_uid: result for result in results}
        assert by_uid[poisoned].status == 0xC211
        assert by_uid[poisoned].category == "failure"
        assert sum(result.ok for result in results) == 4
        assert len(stored) == 4
        assert len(associations) == 1

    def test_data_set_without_sop_instance_uid_is_refused_and_the_scp_keeps_serving(
        self, receiver: Receiver, scp: StoreSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        good, bad = write_ct_series(tmp_path / "series", 2)
        dataset = pydicom.dcmread(bad)
        meta_uid = dataset.SOPInstanceUID
        del dataset.SOPInstanceUID
        dataset.save_as(bad)
        # pynetdicom refuses to send a Dataset without the UID; its chunked file mode takes
        # the UIDs from the file meta and sends the data set as it is.
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        ae = AE("PFTEST")
        ae.dimse_timeout = 10
        assoc = ae.associate(
            "127.0.0.1",
            scp.port,
            contexts=[build_context(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID])],
            ae_title="PFSCP",
        )
        assert assoc.is_established
        refused = assoc.send_c_store(bad)
        accepted = assoc.send_c_store(good)
        assoc.release()
        assert refused.Status == 0xA900
        assert accepted.Status == 0x0000
        assert [instance.sop_instance_uid for instance in receiver.instances] == [
            pydicom.dcmread(good).SOPInstanceUID
        ]
        assert not receiver.path_of(meta_uid).exists()

    def test_truncated_data_set_is_answered_cannot_understand(
        self, receiver: Receiver, scp: StoreSCP, tmp_path: Path, options: NetworkOptions
    ) -> None:
        (good,) = write_ct_series(tmp_path / "series", 1)
        sent = read_part10(good)
        # The bytes a broken modality would send: pixel data cut short.
        meta = encode_file_meta(sent.sop_class_uid, sent.sop_instance_uid, sent.transfer_syntax_uid)
        damaged = tmp_path / "damaged.dcm"
        damaged.write_bytes(
            b"\x00" * 128 + b"DICM" + meta + good.read_bytes()[sent.dataset_offset : -100]
        )
        raw = replace(
            sent, path=damaged, size=damaged.stat().st_size, dataset_offset=132 + len(meta)
        )
        (result,) = send_files(
            Node(ae_title="PFSCP", host="127.0.0.1", port=scp.port), [raw], options
        )
        assert result.status == 0xC000
        assert result.category == "failure"
        assert receiver.instances == []

    def test_pdu_longer_than_negotiated_aborts_the_association(
        self, receiver: Receiver, tmp_path: Path, options: NetworkOptions
    ) -> None:
        (source,) = write_ct_series(tmp_path / "one", 1, rows=128, columns=128)  # 32 kB pixels
        sent = read_part10(source)
        small_pdus = NetworkOptions(ae_title="PFSCP", max_pdu=16384)
        with StoreSCP(receiver, ae_title="PFSCP", host="127.0.0.1", options=small_pdus) as server:
            ae = AE("PFTEST")
            context = build_context(sent.sop_class_uid, [sent.transfer_syntax_uid])
            assoc = ae.associate("127.0.0.1", server.port, contexts=[context], ae_title="PFSCP")
            assert assoc.acceptor.maximum_length == 16384
            # Misbehave: a valid C-STORE whose data set goes in one 32 kB P-DATA-TF where the
            # SCP announced 16 kB (PS3.8 D.1). pynetdicom alone would store it.
            request = C_STORE()
            request.MessageID = 1
            request.AffectedSOPClassUID = sent.sop_class_uid
            request.AffectedSOPInstanceUID = sent.sop_instance_uid
            request.Priority = 0
            request.DataSet = BytesIO(source.read_bytes()[sent.dataset_offset :])
            message = C_STORE_RQ()
            message.primitive_to_message(request)
            for p_data in message.encode_msg(assoc.accepted_contexts[0].context_id, 0):
                pdu = P_DATA_TF()
                pdu.from_primitive(p_data)
                assoc.dul.socket.send(pdu.encode())
            deadline = time.monotonic() + 5
            while assoc.is_established and time.monotonic() < deadline:
                time.sleep(0.05)
            # A peer that keeps to the limit is still served.
            still_served = echo(Node(ae_title="PFSCP", host="127.0.0.1", port=server.port), options)
        assert assoc.is_aborted
        assert receiver.instances == []
        assert still_served > 0


def test_scp_port_zero_binds_a_free_port(receiver: Receiver) -> None:
    first = StoreSCP(receiver, host="127.0.0.1").start()
    second = StoreSCP(receiver, host="127.0.0.1").start()
    try:
        assert first.port != second.port
        assert first.port > 0
    finally:
        first.stop()
        second.stop()
    with pytest.raises(RuntimeError):
        _ = first.port
