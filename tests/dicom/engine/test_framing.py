"""Framing under any read boundary: a proxy cuts the byte stream at random places.

Senders write what real peers write (the command and data fragments in one write, several
PDVs in one P-DATA-TF, fragments of any length up to the negotiated maximum, an empty last
fragment), a proxy between them and the SCP forwards the bytes in pieces of random size
with short pauses (seeded), so PDU and PDV headers, the switch to receiving straight into
the message and the end of a data set land on every kind of read boundary. Several
associations at once, small and large data sets; every stored data set must be the source.

``PACSFLOW_FRAMING_SEEDS`` sets how many seeded runs each case gets (CI: 2; a soak: 50).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pacsflow.dicom import read_part10
from pacsflow.dicom.engine import AsyncStoreServer, StoreRequest, acse, pdu
from pacsflow.dicom.engine.dimse import c_store_rq, parse_response
from tests.conftest import require_tool
from tests.dicom.engine.conftest import RecordingHandler, digest_of_data_set, make_server
from tests.dicom.synthetic import write_ct_series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_PDV_HEADER = struct.Struct(">IBB")
SEEDS = range(1, 1 + int(os.environ.get("PACSFLOW_FRAMING_SEEDS", "2")))


class CuttingProxy:
    """Forwards each connection to ``upstream``; what the sender writes goes on in cut pieces."""

    def __init__(self, upstream: int, seed: int) -> None:
        self.upstream = upstream
        self.seed = seed
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.threads: list[threading.Thread] = []
        self.connections = 0
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        """Connect each accepted sender to the upstream and start both pumps."""
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rng = random.Random(self.seed * 1000 + self.connections)
            for source, target, cut in ((client, server, rng), (server, client, None)):
                thread = threading.Thread(
                    target=self._pump, args=(source, target, cut), daemon=True
                )
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, cut: random.Random | None) -> None:
        """Copy ``source`` to ``target``; with ``cut``, in random pieces with short pauses."""
        try:
            while data := source.recv(1 << 20):
                if cut is None:
                    target.sendall(data)
                    continue
                view = memoryview(data)
                while view:
                    # Header-sized slivers, mid-sized pieces, or all that is there.
                    kind = cut.random()
                    size = (
                        cut.randint(1, 13) if kind < 0.35
                        else cut.randint(14, 70_000) if kind < 0.75
                        else len(view)
                    )  # fmt: skip
                    target.sendall(view[:size])
                    view = view[size:]
                    if cut.random() < 0.25:
                        time.sleep(cut.random() / 1000)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting; wait for the pumps of finished connections."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        self._accepting.join(10)
        for thread in self.threads:
            thread.join(10)


def _pdv(context_id: int, payload: bytes | memoryview, control: int) -> bytes:
    """One PDV item: length, context ID, message control header, fragment."""
    return _PDV_HEADER.pack(len(payload) + 2, context_id, control) + bytes(payload)


def message_bytes(
    rng: random.Random, context_id: int, message_id: int, uid: str, data: bytes, max_pdu: int
) -> bytes:
    """One C-STORE as P-DATA-TF PDUs: fragments of random length, several PDVs per PDU."""
    items = [_pdv(context_id, c_store_rq(message_id, CT_IMAGE_STORAGE, uid), 0x03)]
    pos = 0
    while pos < len(data):
        # Full PDUs, or any length: a data PDV may share its PDU with the next one.
        room = max_pdu - 6 if rng.random() < 0.4 else rng.randint(8, max_pdu - 6)
        piece = data[pos : pos + room - 6]
        pos += len(piece)
        last = pos >= len(data) and rng.random() < 0.8
        items.append(_pdv(context_id, piece, 0x02 if last else 0x00))
    if len(items) == 1 or not items[-1][5] & 0x02:
        items.append(_pdv(context_id, b"", 0x02))  # an empty last fragment
    pdus, body = [], b""
    for item in items:
        if body and (len(body) + len(item) > max_pdu or rng.random() < 0.5):
            pdus.append(pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 0, len(body)) + body)
            body = b""
        body += item
    pdus.append(pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 0, len(body)) + body)
    return b"".join(pdus)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes; ConnectionError if the peer closes first."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU's type and body."""
    header = _recv_exact(sock, 6)
    return header[0], _recv_exact(sock, int.from_bytes(header[2:6], "big"))


def send_association(
    port: int, seed: int, count: int, max_pdu: int, sent: dict[str, str], errors: list[str]
) -> None:
    """One association of ``count`` C-STOREs of small and large random data sets."""
    rng = random.Random(seed)
    proposal = acse.propose(
        called_ae="ENGINE", calling_ae=f"CUT{seed}"[:16],
        presentations=[(CT_IMAGE_STORAGE, [EXPLICIT_LE])],
        # What the sender accepts itself: unlimited, small or large (the answers are short).
        max_pdu=rng.choice((0, 4096, 1 << 20)),
        implementation_class_uid="1.2.3.4", implementation_version="CUT",
    )  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(proposal.pdu)
            kind, body = _read_pdu(sock)
            assert kind == pdu.A_ASSOCIATE_AC, kind
            for index in range(count):
                size = rng.choice(
                    (rng.randint(0, 12_000), rng.randint(30_000, 70_000), rng.randint(1, 600_000))
                ) & ~1  # fmt: skip
                data = rng.randbytes(size)
                uid = f"1.2.826.0.1.3680043.9.{seed}.{index + 1}"
                sent[uid] = hashlib.sha256(data).hexdigest()
                # The whole message in one write, as the uploader's sender does.
                sock.sendall(message_bytes(rng, 1, index + 1, uid, data, max_pdu))
                kind, body = _read_pdu(sock)
                assert kind == pdu.P_DATA_TF, (kind, body)
                response = parse_response(body[6:])
                assert response.message_id_responded == index + 1, response
                assert response.status == 0, f"{uid}: status 0x{response.status:04X}"
            sock.sendall(pdu.release_pdu())
            assert _read_pdu(sock)[0] == pdu.A_RELEASE_RP
    except (AssertionError, OSError) as err:
        errors.append(f"association {seed}: {err!r}")


class _AwaitingHandler(RecordingHandler):
    """Stores after a pause on the loop: reading stops meanwhile, bytes keep arriving."""

    async def store(self, request: StoreRequest) -> int:  # type: ignore[override]
        await asyncio.sleep(0.002)
        return RecordingHandler.store(self, request)


@pytest.mark.parametrize(
    ("engine", "handler_kind"),
    [("asyncio", "plain"), ("asyncio", "awaiting"), ("lean", "plain")],
)
# 4 KiB: every PDV is copied from the read buffer; 256 KiB (the router's default) and 1 MiB:
# large PDVs are received straight into the message.
@pytest.mark.parametrize("max_pdu", [4096, 262144, 1 << 20])
@pytest.mark.parametrize("seed", SEEDS)
def test_cut_streams_of_concurrent_associations_arrive_intact(
    servers: list[AsyncStoreServer], engine: str, handler_kind: str, max_pdu: int, seed: int
) -> None:
    """Four associations of eight small and large data sets each, on every engine."""
    handler = _AwaitingHandler() if handler_kind == "awaiting" else RecordingHandler()
    server = make_server(handler, engine, max_pdu=max_pdu).start()
    servers.append(server)
    proxy = CuttingProxy(server.port, seed)
    sent: dict[str, str] = {}
    errors: list[str] = []
    senders = [
        threading.Thread(
            target=send_association,
            args=(proxy.port, seed * 10 + number, 8, max_pdu, sent, errors),
        )
        for number in range(4)
    ]
    try:
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(120)
    finally:
        proxy.close()
    assert errors == []
    assert len(sent) == 32
    assert handler.stored == sent
    assert _released(handler, 4)


def _released(handler: RecordingHandler, count: int) -> bool:
    """True once ``count`` associations were released (the last report may lag the reply)."""
    with handler.ended:
        return handler.ended.wait_for(lambda: handler.outcomes[("released", "")] >= count, 10)


@pytest.mark.parametrize("max_pdu", [4096, 262144, 1 << 20])
def test_storescu_through_a_cutting_proxy_arrives_intact(
    servers: list[AsyncStoreServer], dcmtk_env: dict[str, str], tmp_path: Path, max_pdu: int
) -> None:
    """DCMTK's storescu, cut the same way: large images over many PDUs, then small ones."""
    handler = RecordingHandler()
    server = make_server(handler, max_pdu=max_pdu).start()
    servers.append(server)
    proxy = CuttingProxy(server.port, seed=max_pdu)
    # Large images span many PDUs of either size; the small ones fit in one.
    paths = write_ct_series(tmp_path / "large", 6, rows=512, columns=512)
    paths += write_ct_series(tmp_path / "small", 20, rows=32, columns=32)
    log = tmp_path / "storescu.log"
    try:
        with open(log, "ab") as output:
            code = subprocess.run(
                [require_tool("storescu"), "-aec", "ENGINE", "+sd", "127.0.0.1", str(proxy.port),
                 str(tmp_path / "large"), str(tmp_path / "small")],
                env=dcmtk_env, stdout=output, stderr=subprocess.STDOUT, timeout=120, check=False,
            ).returncode  # fmt: skip
    finally:
        proxy.close()
    assert code == 0, log.read_text()
    expected = {read_part10(path).sop_instance_uid: digest_of_data_set(path) for path in paths}
    assert handler.stored == expected
    assert handler.wait_outcome("released", "")
