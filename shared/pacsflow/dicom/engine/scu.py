"""The asyncio storage SCU: C-ECHO and C-STORE of files, many associations on one event loop.

:class:`AsyncStoreSession` is :class:`pacsflow.dicom.StoreSession` in asyncio: ``open``,
``accepts``, ``send`` (a :class:`~pacsflow.dicom.PartTenFile`, answered with a
:class:`~pacsflow.dicom.scu.StoreResult`), ``echo`` and ``close``. A C-STORE leaves in one
``sendmsg``: the command PDU and every data set fragment, sliced from a memory map of the
file (the Part 10 header is skipped, the data set never copied), in PDUs no larger than the
peer accepts. Responses are read with ``recv_into`` into the session's reusable buffer.
With TLS the transport of asyncio's ``ssl`` support carries the same buffers.

Association set-up is :mod:`.acse` (pynetdicom's PDUs and negotiation); release handles a
collision (PS3.8 9.2.8): the peer's A-RELEASE-RQ is answered and ours still awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pacsflow.config import Node
from pacsflow.dicom.transport import node_ssl_context, skip_written, unacknowledged_bytes
from pacsflow.dicom.engine import acse, pdu
from pacsflow.dicom.engine.dimse import (
    C_ECHO_RSP,
    C_STORE_RSP,
    StoreResponse,
    c_echo_rq,
    c_store_rq,
    parse_response,
)
from pacsflow.dicom.files import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PartTenFile,
)
from pacsflow.dicom.options import NetworkOptions
from pacsflow.dicom.scu import StoreResult
from pacsflow.dicom.status import category, describe
from pacsflow.errors import AssociationRejected, DicomError, DimseFailure, InvalidDicom

__all__ = ["AsyncStoreSession", "PeerEnded", "StoreOutcome", "echo"]

LOGGER = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# When the peer sets no PDU limit (0), data set fragments of this size go out.
_UNLIMITED_PDU = 1024 * 1024
# sendmsg takes at most IOV_MAX buffers (1024 on Linux).
_MAX_BUFFERS = 512
# An SCU only reads small PDUs (association answers, responses); more is not DICOM.
_MAX_PDU_READ = 16 * 1024 * 1024
# Files up to this size are read; larger ones are memory-mapped.
_MAP_FROM = 256 * 1024


class PeerEnded(DicomError):
    """The peer aborted, released or closed the association, or broke the protocol."""


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """What became of one C-STORE request."""

    #: success, warning, failure (the peer's status), refused (no context) or error
    category: Literal["success", "warning", "failure", "refused", "error"]
    status: int | None
    error: str | None
    #: the whole request left this host
    transmitted: bool


@dataclass(slots=True)
class _Received:
    pdu_type: int
    body: bytes


class _Channel:
    """A connected stream: a plain non-blocking socket, or an asyncio transport for TLS."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buffer = bytearray(1 << 16)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0
        # The socket stays registered for reading while someone waits (no epoll_ctl per
        # response); with nobody waiting it is unregistered, so pending bytes do not spin.
        self.waiter: asyncio.Future[None] | None = None
        self.watching = False
        #: bytes handed to the socket or the TLS transport so far
        self.written = 0

    async def connect(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        if tls is not None:
            self.reader, self.writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=host
            )
            raw = self.writer.get_extra_info("socket")
            if raw is not None:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, kind, proto, _name, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await self.loop.sock_connect(sock, address)
            except OSError as err:
                sock.close()
                last = err
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            return
        raise last or OSError(f"cannot resolve {host}")

    async def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Write every buffer, with as few ``sendmsg`` calls as the socket allows."""
        if self.writer is not None:
            self.writer.writelines(buffers)
            self.written += sum(memoryview(buffer).nbytes for buffer in buffers)
            await self.writer.drain()
            return
        sock = self.sock
        if sock is None:
            raise ConnectionError("not connected")
        views = [memoryview(buffer).cast("B") for buffer in buffers]
        index = 0
        while index < len(views):
            try:
                sent = sock.sendmsg(views[index : index + _MAX_BUFFERS])
            except (BlockingIOError, InterruptedError):
                await self._writable(sock)
                continue
            self.written += sent
            index = skip_written(views, index, sent)

    def acknowledged(self) -> int | None:
        """Bytes written so far that the peer has acknowledged (None: not known here)."""
        raw = self.sock
        if raw is None and self.writer is not None:
            raw = self.writer.get_extra_info("socket")
        unacknowledged = None if raw is None else unacknowledged_bytes(raw)
        if unacknowledged is None:
            return None
        if self.writer is not None:
            unacknowledged += self.writer.transport.get_write_buffer_size()
        return self.written - unacknowledged

    async def _writable(self, sock: socket.socket) -> None:
        ready = self.loop.create_future()
        fd = sock.fileno()
        self.loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self.loop.remove_writer(fd)

    async def _fill(self) -> None:
        """Read more into the buffer (after its unread part)."""
        if self.end == len(self.buffer):
            pending = self.end - self.start
            if self.start:
                self.view[:pending] = self.view[self.start : self.end]
            else:
                grown = bytearray(2 * len(self.buffer))
                grown[:pending] = self.view[:pending]
                self.buffer, self.view = grown, memoryview(grown)
            self.start, self.end = 0, pending
        if self.reader is not None:
            data = await self.reader.read(len(self.buffer) - self.end)
            count = len(data)
            self.view[self.end : self.end + count] = data
        else:
            count = await self._recv_into(self.view[self.end :])
        if not count:
            raise PeerEnded("the peer closed the connection")
        self.end += count

    async def _recv_into(self, target: memoryview) -> int:
        sock = self.sock
        if sock is None:
            raise ConnectionError("not connected")
        while True:
            try:
                return sock.recv_into(target)
            except (BlockingIOError, InterruptedError):
                pass
            self.waiter = self.loop.create_future()
            if not self.watching:
                self.loop.add_reader(sock.fileno(), self._readable)
                self.watching = True
            try:
                await self.waiter
            finally:
                self.waiter = None

    def _readable(self) -> None:
        waiter = self.waiter
        if waiter is None:
            if self.sock is not None:
                self.loop.remove_reader(self.sock.fileno())
            self.watching = False
        elif not waiter.done():
            waiter.set_result(None)

    async def read_pdu(self) -> _Received:
        while self.end - self.start < 6:
            await self._fill()
        pdu_type, _reserved, length = pdu.PDU_HEADER.unpack_from(self.view, self.start)
        if not 1 <= pdu_type <= 7:
            raise PeerEnded(f"not a DICOM PDU (type {pdu_type})")
        if length > _MAX_PDU_READ:
            raise PeerEnded(f"a PDU of {length} bytes: not a DICOM peer")
        total = 6 + length
        while self.end - self.start < total:
            await self._fill()
        # An A-ASSOCIATE-AC goes to pynetdicom whole, header included; others without it.
        first = self.start if pdu_type == pdu.A_ASSOCIATE_AC else self.start + 6
        body = bytes(self.view[first : self.start + total])
        self.start += total
        if self.start == self.end:
            self.start = self.end = 0
        return _Received(pdu_type, body)

    def pending(self) -> bool:
        """True when the peer sent something (or closed) while nothing was asked."""
        if self.start != self.end:
            return True
        if self.sock is not None:
            try:
                self.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            return True  # bytes, or the end of the stream
        assert self.reader is not None
        return self.reader.at_eof()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.sock is not None:
            if self.watching:
                self.loop.remove_reader(self.sock.fileno())
                self.watching = False
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


@contextlib.contextmanager
def _data_set(file: PartTenFile) -> Iterator[memoryview]:
    """The encoded data set of a Part 10 file: read when small, memory-mapped when large."""
    try:
        with open(file.path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if size <= file.dataset_offset:
                raise InvalidDicom("no data set after the file meta")
            if size < _MAP_FROM:
                fp.seek(file.dataset_offset)
                yield memoryview(fp.read())
                return
            mapped = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise InvalidDicom(f"cannot read: {err.strerror}") from err
    view = memoryview(mapped)
    data = view[file.dataset_offset :]
    try:
        yield data
    finally:
        data.release()
        view.release()
        with contextlib.suppress(BufferError):
            mapped.close()


class AsyncStoreSession:
    """One association for C-STORE (and C-ECHO) of files, on the running event loop."""

    def __init__(
        self,
        node: Node,
        options: NetworkOptions,
        presentations: Iterable[tuple[str, str]],
        *,
        echo: bool = False,
    ) -> None:
        self.node = node
        self.options = options
        self.presentations = list(dict.fromkeys(presentations))
        self.echo_context = echo
        self._channel: _Channel | None = None
        self._context_ids: dict[tuple[str, str], int] = {}
        self._echo_id = 0
        self._send_pdu = 0
        self._message_id = 0

    @classmethod
    def for_files(
        cls, node: Node, options: NetworkOptions, files: Iterable[PartTenFile]
    ) -> AsyncStoreSession:
        return cls(node, options, (file.presentation for file in files))

    # --- association ------------------------------------------------------------------------

    async def open(self) -> None:
        """Associate; raise AssociationRejected when no association can be made."""
        if self._channel is not None:
            raise RuntimeError("the session is already open")
        channel = _Channel()
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                await channel.connect(
                    self.node.host,
                    self.node.port,
                    node_ssl_context(self.node, self.options) if self.node.tls.enabled else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as err:
            channel.close()
            raise AssociationRejected(f"cannot connect to {self.node}: {_reason(err)}") from err
        self._channel = channel
        try:
            async with asyncio.timeout(self.options.acse_timeout):
                await self._associate(channel)
        except AssociationRejected:
            self._drop()
            raise
        except (OSError, TimeoutError, DicomError, ssl.SSLError) as err:
            self._drop()
            raise AssociationRejected(f"no association with {self.node}: {_reason(err)}") from err

    async def _associate(self, channel: _Channel) -> None:
        offered: list[tuple[str, Sequence[str]]] = [
            (abstract, [syntax]) for abstract, syntax in self.presentations
        ]
        if self.echo_context:
            offered.append((VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]))
        proposal = acse.propose(
            called_ae=self.node.ae_title,
            calling_ae=self.options.ae_title,
            presentations=offered,
            max_pdu=self.options.max_pdu,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version=IMPLEMENTATION_VERSION_NAME,
        )
        await channel.write([proposal.pdu])
        answer = await channel.read_pdu()
        if answer.pdu_type == pdu.A_ASSOCIATE_RJ:
            reject = pdu.parse_associate_rj(answer.body)
            raise AssociationRejected(f"{self.node} {pdu.reject_text(reject)}")
        if answer.pdu_type == pdu.A_ABORT:
            raise AssociationRejected(f"{self.node} aborted the association request")
        if answer.pdu_type != pdu.A_ASSOCIATE_AC:
            raise PeerEnded(f"answered the association request with PDU type {answer.pdu_type}")
        accepted, peer_max = acse.read_accept(answer.body, proposal)
        self._echo_id = accepted.pop((VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN), 0)
        self._context_ids = accepted
        # The smallest sensible PDU (PS3.8 D.1.1 leaves it open; DCMTK accepts 4096 up).
        self._send_pdu = max(peer_max or _UNLIMITED_PDU, 1024)
        LOGGER.debug(
            "associated with %s: %d of %d contexts accepted, PDU %d",
            self.node, len(accepted), len(self.presentations), self._send_pdu,
        )  # fmt: skip

    @property
    def is_open(self) -> bool:
        """True while the association can carry requests."""
        return self._channel is not None

    @property
    def peer_max_pdu(self) -> int:
        """The PDU size data sets are cut to (the peer's maximum)."""
        return self._send_pdu

    def accepts(self, presentation: tuple[str, str]) -> bool:
        """True when the peer accepted this (SOP class, transfer syntax) pair."""
        return presentation in self._context_ids

    def still_usable(self) -> bool:
        """True when the peer has not ended the idle association meanwhile."""
        if self._channel is None:
            return False
        if self._channel.pending():
            # Between requests a peer only sends A-RELEASE-RQ, A-ABORT or a close.
            self.abort()
            return False
        return True

    async def close(self) -> None:
        """Release the association (abort it when the release is not answered)."""
        channel = self._channel
        if channel is None:
            return
        try:
            async with asyncio.timeout(self.options.acse_timeout):
                await channel.write([pdu.release_pdu()])
                while True:
                    answer = await channel.read_pdu()
                    if answer.pdu_type == pdu.A_RELEASE_RP:
                        break
                    if answer.pdu_type == pdu.A_RELEASE_RQ:
                        # Release collision (PS3.8 9.2.8): the requestor answers first,
                        # then still waits for the answer to its own request.
                        await channel.write([pdu.release_pdu(response=True)])
                    elif answer.pdu_type == pdu.A_ABORT:
                        break
        except (OSError, TimeoutError, DicomError, ssl.SSLError):
            self.abort()
            return
        self._drop()

    def abort(self) -> None:
        """Send an A-ABORT (best effort) and drop the connection."""
        channel = self._channel
        if channel is None:
            return
        if channel.sock is not None:
            with contextlib.suppress(OSError):
                channel.sock.send(pdu.abort_pdu())
        elif channel.writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                channel.writer.write(pdu.abort_pdu())
        self._drop()

    def _drop(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    async def __aenter__(self) -> AsyncStoreSession:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- DIMSE ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _unless_silent(self, channel: _Channel) -> AsyncIterator[None]:
        """``dimse_timeout`` as a bound on silence, not on the length of a transfer.

        Over a slow line a large request takes longer than the timeout to leave, and the
        kernel holds megabytes of it after the write returned: while the peer keeps
        acknowledging its bytes, the deadline moves on. Progress is looked at when the deadline
        comes, so bytes acknowledged just before it (the request's last, say, which the peer
        must still store before it answers) earn a whole timeout more.
        """
        loop = asyncio.get_running_loop()
        timeout = self.options.dimse_timeout
        async with asyncio.timeout(None) as deadline:
            seen = channel.acknowledged()

            def at_deadline() -> None:
                nonlocal seen, handle
                now = channel.acknowledged()
                if now is not None and seen is not None and now > seen:
                    seen = now
                    handle = loop.call_later(timeout, at_deadline)
                else:
                    deadline.reschedule(loop.time())  # silent for a whole timeout

            handle = loop.call_later(timeout, at_deadline)
            try:
                yield
            finally:
                handle.cancel()

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    async def echo(self) -> int:
        """C-ECHO on this association (opened with ``echo=True``); the status."""
        channel = self._channel
        if channel is None:
            raise DicomError(f"no association with {self.node}")
        if not self._echo_id:
            raise DicomError(f"{self.node} accepted no Verification context")
        message_id = self._next_message_id()
        try:
            async with asyncio.timeout(self.options.dimse_timeout):
                await channel.write([pdu.p_data(self._echo_id, c_echo_rq(message_id), command=True)])
                response = await self._read_response(channel)
        except (OSError, TimeoutError, DicomError, ssl.SSLError) as err:
            self.abort()
            raise DicomError(f"no C-ECHO response from {self.node}: {_reason(err)}") from err
        if response.command_field != C_ECHO_RSP or response.status is None:
            self.abort()
            raise DicomError(f"{self.node} answered C-ECHO with an unexpected message")
        return response.status

    async def send(self, file: PartTenFile) -> StoreResult:
        """C-STORE one file's data set; never raises for a per-file problem."""
        path = Path(file.path)
        if self._channel is not None and file.presentation not in self._context_ids:
            outcome = await self.store(file.presentation, file.sop_instance_uid, memoryview(b""))
        else:
            try:
                with _data_set(file) as data:
                    outcome = await self.store(file.presentation, file.sop_instance_uid, data)
            except InvalidDicom as err:
                return StoreResult(path, file.sop_instance_uid, None, "invalid", err.reason)
        return StoreResult(
            path, file.sop_instance_uid, outcome.status, outcome.category, outcome.error
        )

    async def store(
        self, presentation: tuple[str, str], sop_instance_uid: str, data: memoryview
    ) -> StoreOutcome:
        """C-STORE an encoded data set of ``presentation`` (SOP class, transfer syntax).

        The command and every fragment leave in one vectored write, sliced from ``data``.
        Never raises for a per-instance problem; ``transmitted`` tells whether the whole
        request left this host (after which the peer may hold it without having answered).
        """
        channel = self._channel
        if channel is None:
            return StoreOutcome("error", None, f"no association with {self.node}", False)
        context_id = self._context_ids.get(presentation)
        if context_id is None:
            return StoreOutcome(
                "refused", None,
                f"{self.node} accepted no presentation context for SOP class "
                f"{presentation[0]} in transfer syntax {presentation[1]}", False,
            )  # fmt: skip
        message_id = self._next_message_id()
        command = c_store_rq(message_id, presentation[0], sop_instance_uid)
        buffers = pdu.data_pdus(context_id, command, data, self._send_pdu)
        try:
            async with self._unless_silent(channel):
                await channel.write(buffers)
        except (OSError, TimeoutError, ssl.SSLError) as err:
            self.abort()
            return StoreOutcome("error", None, f"association with {self.node} lost while "
                                f"sending: {_reason(err)}", False)  # fmt: skip
        finally:
            buffers.clear()
        try:
            async with self._unless_silent(channel):
                response = await self._read_response(channel)
        except (OSError, TimeoutError, DicomError, ssl.SSLError) as err:
            self.abort()
            return StoreOutcome("error", None, f"no C-STORE response from {self.node}: "
                                f"{_reason(err)}", True)  # fmt: skip
        if (
            response.command_field != C_STORE_RSP
            or response.message_id_responded != message_id
            or response.status is None
        ):
            self.abort()
            return StoreOutcome("error", None, f"{self.node} answered with an unexpected "
                                "message; association aborted", True)  # fmt: skip
        status = response.status
        kind = category(status)
        if kind == "success":
            return StoreOutcome("success", status, None, True)
        text = f"{self.node} answered {describe(status)}"
        if response.error_comment:
            text += f": {response.error_comment}"
        # Pending and cancel are no valid final C-STORE status either (PS3.4 B.2.3).
        return StoreOutcome("warning" if kind == "warning" else "failure", status, text, True)

    async def _read_response(self, channel: _Channel) -> StoreResponse:
        parts: list[bytes] = []
        while True:
            received = await channel.read_pdu()
            if received.pdu_type == pdu.P_DATA_TF:
                for _context_id, control, fragment in pdu.pdvs(memoryview(received.body)):
                    if not pdu.is_command(control):
                        raise PeerEnded("a data set came where a response was expected")
                    parts.append(bytes(fragment))
                    if pdu.is_last(control):
                        return parse_response(b"".join(parts))
            elif received.pdu_type == pdu.A_RELEASE_RQ:
                with contextlib.suppress(OSError):
                    await channel.write([pdu.release_pdu(response=True)])
                self._drop()
                raise PeerEnded("the peer released the association")
            elif received.pdu_type == pdu.A_ABORT:
                self._drop()
                raise PeerEnded("the peer aborted the association")
            else:
                raise PeerEnded(f"unexpected PDU type {received.pdu_type}")


async def echo(node: Node, options: NetworkOptions) -> float:
    """C-ECHO ``node`` on an association of its own; the round trip in seconds.

    Raises AssociationRejected, DimseFailure for a non-success status, DicomError when no
    response came.
    """
    session = AsyncStoreSession(node, options, [], echo=True)
    await session.open()
    try:
        started = time.perf_counter()
        status = await session.echo()
        round_trip = time.perf_counter() - started
    finally:
        await session.close()
    if status != 0x0000:
        raise DimseFailure(status, f"{node} answered C-ECHO with {describe(status)}")
    return round_trip


def _reason(err: BaseException) -> str:
    if isinstance(err, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno).lower()
    return str(err) or type(err).__name__
