"""Hostile peers against the router SCP process, over TCP only (black box).

Malformed PDUs (random bytes, damaged association requests, garbage after an accepted
association), abrupt disconnects (RST at every stage), slow-loris peers trickling bytes, and
links that stall or reset in the middle of a transfer (through a TCP proxy). Meanwhile a real
``storescu`` keeps sending. The router answers each hostile peer with a reject or an abort (or
closes), counts it in a metric and logs it; it keeps no file descriptors or memory of them,
and every valid instance arrives.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port
from tests.reliability.proxy import StallingProxy
from tests.reliability.support import ServiceProcess, log_records, wait_until
from tests.router.support import associate_rq, files_under, storescu

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(600)]

ROUTE = "FUZZ"


def write_config(folder: Path, port: int) -> Path:
    path = folder / "pacsflow.yaml"
    path.write_text(f"""
instance: hostile
logging: {{level: INFO, format: json}}
state: {{backend: sqlite, path: {folder}/state.db}}
bus: {{backend: embedded, declare_services: [notifier]}}
router:
  ae_title: PFROUTER
  host: 127.0.0.1
  port: {port}
  routes:
    {ROUTE}: {{path: {folder}/storage}}
  study_quiet_seconds: 2
  max_associations: 100
  request_timeout_seconds: 2
  idle_timeout_seconds: 3
  pdu_timeout_seconds: 2
""")
    return path


def _rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_until_closed(sock: socket.socket, limit: float) -> list[int]:
    """PDU types the router sent until it closed the connection (fails if it never does)."""
    sock.settimeout(limit)
    types: list[int] = []
    buffer = b""
    try:
        while chunk := sock.recv(65536):
            buffer += chunk
            while len(buffer) >= 6:
                length = int.from_bytes(buffer[2:6], "big")
                if len(buffer) < 6 + length:
                    break
                types.append(buffer[0])
                buffer = buffer[6 + length:]
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the router left a hostile connection open (sent {types})") from None
    return types


def _pdata(context_id: int, flags: int, payload: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, flags) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _c_store_command(sop_uid: bytes) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian), for garbage data after it."""
    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value

    body = (element(0x00000002, b"1.2.840.10008.5.1.4.1.1.2\x00")
            + element(0x00000100, struct.pack("<H", 0x0001))
            + element(0x00000110, struct.pack("<H", 7))
            + element(0x00000700, struct.pack("<H", 0))
            + element(0x00000800, struct.pack("<H", 0x0000))
            + element(0x00001000, sop_uid))  # fmt: skip
    return element(0x00000000, struct.pack("<I", len(body))) + body


def hostile_cases(seed: int) -> list[tuple[str, list[bytes], bool]]:
    """(kind, messages, associate first) for each hostile connection."""
    rng = random.Random(seed)
    rq = associate_rq(ROUTE)
    cases: list[tuple[str, list[bytes], bool]] = []
    for _ in range(50):
        first = rng.choice([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x00, 0x09, 0xFF])
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600)))
        length = rng.choice([len(body), len(body) + 1, max(0, len(body) - 1), 0xFFFFFFFF, 0])
        cases.append(("random", [bytes((first, 0)) + struct.pack(">I", length) + body], False))
    for _ in range(80):
        data = bytearray(rq)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        cases.append(("flipped-rq", [bytes(data)], False))
    for cut in rng.sample(range(1, len(rq)), 20):
        cases.append(("truncated-rq", [rq[:cut]], False))
    for length in (0, 10, 68, len(rq) + 100, 1 << 20, 0x7FFFFFFF):
        cases.append(("rq-length", [rq[:2] + struct.pack(">I", length) + rq[6:]], False))
    # Hundreds of presentation contexts (the router accepts at most 128 ids: odd 1..255).
    position = 74
    while rq[position] != 0x20:  # past the application context item
        position += 4 + int.from_bytes(rq[position + 2:position + 4], "big")
    context = rq[position:position + 4 + int.from_bytes(rq[position + 2:position + 4], "big")]
    body = rq[6:position] + context * 400 + rq[position + len(context):]
    cases.append(("many-contexts", [rq[:2] + struct.pack(">I", len(body)) + body], False))
    uid = b"1.2.3.4\x00"
    for _ in range(60):
        kind = rng.choice(["garbage-pdata", "bad-context", "long-pdv", "garbage-command",
                           "garbage-dataset", "rq-again", "unknown-pdu", "release-rp"])  # fmt: skip
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        message = {
            "garbage-pdata": struct.pack(">BBI", 0x04, 0, len(junk)) + junk,
            "bad-context": _pdata(2 * rng.randrange(2, 100) + 1, 0x03, _c_store_command(uid)),
            "long-pdv": struct.pack(">BBI", 0x04, 0, 10) + struct.pack(">IBB", 5000, 1, 3)
            + b"\x00" * 4,
            "garbage-command": _pdata(1, 0x03, junk),
            "garbage-dataset": _pdata(1, 0x03, _c_store_command(uid)) + _pdata(1, 0x02, junk)
            + _pdata(1, 0x00, junk),
            "rq-again": rq,
            "unknown-pdu": struct.pack(">BBI", 0x0B, 0, len(junk)) + junk,
            "release-rp": struct.pack(">BBI", 0x06, 0, 4) + b"\x00" * 4,
        }[kind]
        cases.append((kind, [message], True))
    return cases


def run_case(port: int, messages: list[bytes], associate: bool) -> list[int]:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        received: list[int] = []
        if associate:
            sock.sendall(associate_rq(ROUTE))
            header = sock.recv(6, socket.MSG_WAITALL)
            sock.recv(int.from_bytes(header[2:6], "big"), socket.MSG_WAITALL)
            received.append(header[0])
            assert header[0] == 0x02, "a valid association request was not accepted"
        try:
            for message in messages:
                sock.sendall(message)
        except (BrokenPipeError, ConnectionResetError):
            return received + [-1]  # closed while we still sent: also an answer
        return received + _read_until_closed(sock, 15)


def abrupt_disconnects(port: int, rng: random.Random) -> None:
    """RST at each stage: after connecting, mid-request, after the accept, mid-PDU."""
    rq = associate_rq(ROUTE)
    for stage in range(40):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        where = stage % 4
        if where >= 1:
            sock.sendall(rq[: rng.randrange(1, len(rq))] if where == 1 else rq)
        if where >= 2:
            sock.recv(6, socket.MSG_WAITALL)
        if where == 3:
            command = _pdata(1, 0x03, _c_store_command(b"1.2.3.4\x00"))
            sock.sendall(command + struct.pack(">BBI", 0x04, 0, 100000) + b"\x00" * 500)
        _rst_close(sock)


async def slow_loris(port: int, count: int) -> list[float]:
    """``count`` peers trickling an association request a byte at a time; how long each
    stayed connected (the router must cut them all)."""
    rq = associate_rq(ROUTE)

    async def one() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            for byte in rq:
                writer.write(bytes((byte,)))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1024), 0.5) == b"":
                        break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("a slow-loris peer delivered its whole request")
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
        return loop.time() - started

    return list(await asyncio.gather(*(one() for _ in range(count))))


def open_fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


async def test_hostile_peers_get_an_answer_and_valid_traffic_flows(tmp_path: Path) -> None:
    valid = write_ct_series(tmp_path / "valid", 200, rows=16, columns=16)
    port = free_port()
    config = write_config(tmp_path, port)
    router = ServiceProcess(config, "router-scp").start()
    try:
        await wait_until(router.ready, 30, "the router ready", alive=(router,))
        assert router.process is not None
        pid = router.process.pid
        # One valid association first: what the router holds when it is warm.
        first = await storescu(port, ROUTE, *valid[:20])
        assert first.returncode == 0, first.stderr
        baseline_fds, rss = open_fds(pid), [router.rss()]

        answers: Counter[str] = Counter()
        cases = 0
        for round_number in (1, 2):
            sender = asyncio.create_task(storescu(port, ROUTE, *valid))
            loris = asyncio.create_task(slow_loris(port, 20))
            # Forty hostile peers at a time, besides the sender and the slow-loris peers.
            loop = asyncio.get_running_loop()

            async def hostile(kind: str, messages: list[bytes], associate: bool) -> None:
                nonlocal cases
                types = await loop.run_in_executor(pool, run_case, port, messages, associate)
                answers[f"{kind}:{types[-1] if types else 'closed'}"] += 1
                cases += 1

            with ThreadPoolExecutor(max_workers=40) as pool:
                await asyncio.gather(*(hostile(*case)
                                       for case in hostile_cases(seed=round_number)))
            await asyncio.to_thread(abrupt_disconnects, port, random.Random(round_number))
            held = await loris
            result = await sender
            assert result.returncode == 0, result.stderr[-2000:]
            assert all(seconds < 60 for seconds in held)
            await asyncio.sleep(4)  # past every limit: anything left open is a leak
            router.check()
            rss.append(router.rss())
            assert open_fds(pid) <= baseline_fds + 2, "file descriptors leaked"

        metrics = router.metrics_text()
        refused = router.metric_sum("pacsflow_router_associations_total", outcome="aborted") + (
            router.metric_sum("pacsflow_router_associations_total", outcome="rejected"))
        assert router.stop() == 0, router.tail()
    finally:
        router.stop()

    stored = files_under(tmp_path / "storage")
    assert len(stored) == len(valid)  # every valid instance, once (it came three times)
    answered = sum(n for key, n in answers.items() if key.split(":")[1] in ("3", "7", "-1"))
    print(f"hostile peers: {cases} malformed connections, answers {sorted(answers.items())};"
          f" refused in metrics {refused:.0f}; RSS {[r >> 20 for r in rss]} MiB")
    # Every hostile connection was answered with a reject or an abort (or cut while sending).
    assert answered == cases, answers
    assert refused >= cases + 2 * 20, metrics  # each case and each slow-loris peer counted
    warnings = [r for r in log_records(router.log) if r.get("level") in ("WARNING", "ERROR")]
    assert len(warnings) >= cases, "hostile peers should be logged"
    assert rss[2] - rss[1] < 32 << 20, f"router memory grew {(rss[2] - rss[1]) >> 20} MiB"


async def test_stalled_and_reset_links_mid_transfer_lose_nothing(tmp_path: Path) -> None:
    """A link that stops moving bytes, then one that resets, in the middle of a study:
    the router ends the hung association by its own timeouts, keeps every acknowledged
    instance, and the resend completes the study."""
    valid = write_ct_series(tmp_path / "study", 300, rows=16, columns=16)
    port = free_port()
    router = ServiceProcess(write_config(tmp_path, port), "router-scp").start()
    proxy = StallingProxy("127.0.0.1", port)
    await proxy.start()
    storage = tmp_path / "storage"
    try:
        await wait_until(router.ready, 30, "the router ready", alive=(router,))
        for fault in ("stall", "cut"):
            before = router.metric_sum("pacsflow_router_associations_total", outcome="aborted")
            sender = asyncio.create_task(
                storescu(proxy.port, ROUTE, *valid, options=["-to", "30", "-ta", "30"]))
            await wait_until(lambda: len(files_under(storage)) >= 50, 60,
                             "part of the study stored", poll=0.01, alive=(router,))  # fmt: skip
            if fault == "stall":
                proxy.stall()
                # The router's own limits end the hung association (idle or PDU timeout).
                await wait_until(
                    lambda b=before: router.metric_sum(
                        "pacsflow_router_associations_total", outcome="aborted") > b,
                    60, "the router aborting the stalled association", alive=(router,))
                proxy.resume()
            else:
                proxy.cut()
            result = await sender
            assert result.returncode != 0 or len(files_under(storage)) == len(valid)
            router.check()
        resend = await storescu(port, ROUTE, *valid)
        assert resend.returncode == 0, resend.stderr[-2000:]
        assert router.stop() == 0, router.tail()
    finally:
        router.stop()
        await proxy.close()
    assert len(files_under(storage)) == len(valid)
    assert not [p for p in storage.rglob("*") if p.is_file() and p.suffix != ".dcm"]
