"""Limits against a scripted peer: oversized PDUs, slow and idle peers, too many associations.

Real peers never do these things; a raw socket does them on purpose.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests.dicom.synthetic import write_ct_series
from tests.router.support import associate_rq, router_settings, running_router


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _recv_exact(sock, 6)
    return header[0], _recv_exact(sock, int.from_bytes(header[2:6], "big"))


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _associate(port: int, called: str = "MRI") -> socket.socket:
    sock = _connect(port)
    sock.sendall(associate_rq(called))
    pdu_type, _body = _read_pdu(sock)
    assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {pdu_type:#x}"
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> tuple[float, list[int]]:
    """Read until the router closes; how long it took and the PDU types it sent."""
    started = time.monotonic()
    sock.settimeout(seconds)
    types = []
    try:
        while True:
            pdu_type, _ = _read_pdu(sock)
            types.append(pdu_type)
    except ConnectionError:
        pass
    return time.monotonic() - started, types


async def test_a_pdu_larger_than_negotiated_is_refused_before_it_is_read(tmp_path: Path) -> None:
    settings = router_settings(tmp_path, {"MRI": {"path": str(tmp_path / "mri")}}, max_pdu=65536)
    async with running_router(settings) as router:
        sock = await asyncio.to_thread(_associate, router.port)
        # A P-DATA-TF header announcing 1 GiB; a buffering receiver would wait for it.
        sock.sendall(bytes((0x04, 0)) + (1 << 30).to_bytes(4, "big") + b"\x00" * 64)
        elapsed, types = await asyncio.to_thread(_closed_within, sock, 5)
        sock.close()
        assert types == [0x07]  # A-ABORT
        assert elapsed < 2
        await asyncio.sleep(0.3)
        assert (
            router.metric(
                "pacsflow_router_associations_total", outcome="aborted", reason="pdu-too-large"
            )
            == 1
        )
        # The router still serves others.
        await asyncio.to_thread(lambda: _associate(router.port).close())


async def test_a_peer_trickling_its_association_request_is_cut_off(tmp_path: Path) -> None:
    settings = router_settings(
        tmp_path, {"MRI": {"path": str(tmp_path / "mri")}}, request_timeout_seconds=1.0
    )
    async with running_router(settings) as router:

        def trickle() -> float:
            sock = _connect(router.port)
            request = associate_rq("MRI")
            started = time.monotonic()
            try:
                for byte in request:
                    sock.sendall(bytes((byte,)))
                    time.sleep(0.2)
            except OSError:
                pass
            finally:
                sock.close()
            return time.monotonic() - started

        assert await asyncio.to_thread(trickle) < 3


async def test_an_idle_association_is_aborted(tmp_path: Path) -> None:
    settings = router_settings(
        tmp_path, {"MRI": {"path": str(tmp_path / "mri")}}, idle_timeout_seconds=1.0
    )
    async with running_router(settings) as router:
        sock = await asyncio.to_thread(_associate, router.port)
        elapsed, types = await asyncio.to_thread(_closed_within, sock, 5)
        sock.close()
        assert 0.9 < elapsed < 3
        assert types == [0x07]
        await asyncio.sleep(0.3)
        assert (
            router.metric(
                "pacsflow_router_associations_total", outcome="aborted", reason="idle-timeout"
            )
            == 1
        )


async def test_a_pdu_sent_byte_by_byte_is_cut_off(tmp_path: Path) -> None:
    settings = router_settings(
        tmp_path, {"MRI": {"path": str(tmp_path / "mri")}}, pdu_timeout_seconds=1.0
    )
    async with running_router(settings) as router:

        def slow_loris() -> float:
            sock = _associate(router.port)
            sock.sendall(bytes((0x04, 0)) + (1000).to_bytes(4, "big"))
            started = time.monotonic()
            try:
                for _ in range(1000):
                    sock.sendall(b"\x00")  # always something, never the whole PDU
                    time.sleep(0.1)
            except OSError:
                pass
            finally:
                sock.close()
            return time.monotonic() - started

        assert await asyncio.to_thread(slow_loris) < 3
        await asyncio.sleep(0.3)
        assert (
            router.metric(
                "pacsflow_router_associations_total", outcome="aborted", reason="slow-peer"
            )
            == 1
        )


async def test_associations_over_the_limit_are_rejected_as_transient(tmp_path: Path) -> None:
    settings = router_settings(
        tmp_path, {"MRI": {"path": str(tmp_path / "mri")}}, max_associations=2
    )
    async with running_router(settings) as router:
        held = [await asyncio.to_thread(_associate, router.port) for _ in range(2)]

        def third() -> tuple[int, bytes]:
            sock = _connect(router.port)
            sock.sendall(associate_rq("MRI"))
            try:
                return _read_pdu(sock)
            finally:
                sock.close()

        pdu_type, body = await asyncio.to_thread(third)
        assert pdu_type == 0x03  # A-ASSOCIATE-RJ
        assert tuple(body[1:4]) == (2, 3, 2)  # transient, provider, local limit exceeded
        for sock in held:
            sock.close()
        await asyncio.sleep(0.5)
        # Slots are given back when associations end.
        await asyncio.to_thread(lambda: _associate(router.port).close())
        assert (
            router.metric(
                "pacsflow_router_associations_total",
                outcome="rejected",
                reason="too-many-associations",
            )
            == 1
        )


async def test_an_instance_over_the_size_limit_is_refused_and_the_association_goes_on(
    tmp_path: Path,
) -> None:
    big = write_ct_series(tmp_path / "big", 1, rows=800, columns=800)[0]  # 1.28 MB
    small = write_ct_series(tmp_path / "small", 1)[0]
    settings = router_settings(
        tmp_path, {"MRI": {"path": str(tmp_path / "mri")}}, max_instance_bytes=1 << 20
    )
    async with running_router(settings) as router:

        def send() -> list[int]:
            ae = AE(ae_title="PYSCU")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", router.port, ae_title="MRI")
            assert assoc.is_established
            try:
                return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in (big, small)]
            finally:
                assoc.release()

        assert await asyncio.to_thread(send) == [0xA700, 0x0000]
        await asyncio.sleep(0.3)
        assert (
            router.metric("pacsflow_router_store_failures_total", route="MRI", reason="too-large")
            == 1
        )


@pytest.mark.parametrize(
    "garbage", [b"\x09\x00\x00\x00\x00\x04abcd", b"\x01\x00\x00\x00\x00\x02ab"]
)
async def test_garbage_is_aborted_and_the_router_goes_on(tmp_path: Path, garbage: bytes) -> None:
    settings = router_settings(tmp_path, {"MRI": {"path": str(tmp_path / "mri")}})
    async with running_router(settings) as router:

        def send_garbage() -> list[int]:
            sock = _connect(router.port)
            sock.sendall(garbage)
            try:
                return _closed_within(sock, 5)[1]
            finally:
                sock.close()

        assert await asyncio.to_thread(send_garbage) == [0x07]
        await asyncio.to_thread(lambda: _associate(router.port).close())
