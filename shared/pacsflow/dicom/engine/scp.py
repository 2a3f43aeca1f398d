"""The asyncio storage SCP: C-STORE and C-ECHO on one event loop, no thread hand-offs.

Each association is an :class:`asyncio.BufferedProtocol`: the transport reads with
``recv_into`` straight into the association's reusable buffer, whole PDUs are taken out of
it in place, and a C-STORE is handed to :meth:`Handler.store` in the loop's own thread (a
handler may also return an awaitable; reading pauses until it is done). The response goes
out with one ``transport.write``. Association set-up is :mod:`.acse` (pynetdicom's PDU
classes and negotiation); P-DATA, release and abort are :mod:`.pdu` and :mod:`.dimse`.

Limits, as in the router's blocking server:

* a PDU longer than the maximum we negotiated is refused with an A-ABORT as soon as its
  header arrives, before any of it is buffered;
* at most ``max_associations`` at once (across processes when the slots are shared); more
  are answered A-ASSOCIATE-RJ "local limit exceeded";
* the A-ASSOCIATE-RQ must arrive within ``request_timeout`` (ARTIM), the next PDU within
  ``idle_timeout``, and a PDU once begun within ``pdu_timeout`` (slow-loris);
* a data set larger than ``max_instance_bytes`` is read to its end and refused, not held.

TCP_NODELAY on every connection; TLS through asyncio's ``ssl`` support.
"""

from __future__ import annotations

import asyncio
from asyncio import sslproto  # the TLS layer create_server(ssl=...) uses
import inspect
import logging
import math
import multiprocessing.sharedctypes
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from pacsflow.dicom.engine import acse, pdu
from pacsflow.dicom.engine.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    Command,
    parse_request,
    store_response,
)
from pacsflow.dicom.scp import AssociationInfo
from pacsflow.dicom.status import Status
from pacsflow.dicom.transport import tcp_nodelay_on

__all__ = [
    "AssociationSlots",
    "AsyncStoreServer",
    "Handler",
    "Limits",
    "Rejection",
    "StoreRequest",
    "listen_socket",
]

LOGGER = logging.getLogger(__name__)

# Longest A-ASSOCIATE-RQ we read: 128 contexts with a dozen transfer syntaxes fit easily.
MAX_REQUEST_PDU = 1 << 20
# The read buffer starts at this size (or two PDUs, if smaller) and grows to fit one PDU.
_INITIAL_BUFFER = 1 << 20
_PDV_HEADER = struct.Struct(">IBB")
# A PDV with at least this much still to come is received straight into its message.
_DIRECT_FROM = 32 * 1024
# Larger data sets grow their buffer by doubling instead of getting it in one allocation.
_MAX_SIZE_GUESS = 16 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    """What one association may use: PDU size, time, memory."""

    #: the largest P-DATA-TF PDU we accept, announced in the A-ASSOCIATE-AC
    max_pdu: int = 262144
    max_associations: int = 32
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    pdu_timeout: float = 30.0
    max_instance_bytes: int = 2 << 30
    #: requests a requestor may have outstanding when it proposes asynchronous operations
    #: (PS3.7 D.3.3.3); 1 declines the proposal
    operations_window: int = 16


@dataclass(frozen=True, slots=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4) and a label for logs and metrics."""

    result: int
    source: int
    reason: int
    label: str

    @classmethod
    def called_ae_unknown(cls) -> Rejection:
        return cls(1, 1, 7, "called-ae-unknown")

    @classmethod
    def calling_ae_not_allowed(cls) -> Rejection:
        return cls(1, 1, 3, "calling-ae-not-allowed")

    @classmethod
    def address_not_allowed(cls) -> Rejection:
        # No reason code names addresses; "no reason given" tells a scanner nothing extra.
        return cls(1, 1, 1, "address-not-allowed")


TOO_MANY = Rejection(2, 3, 2, "too-many-associations")
BAD_VERSION = Rejection(1, 2, 2, "protocol-version-not-supported")
BAD_CONTEXT = Rejection(1, 1, 2, "application-context-not-supported")
POLICY_ERROR = Rejection(1, 1, 1, "policy-error")


@dataclass(slots=True)
class StoreRequest:
    """One received C-STORE: its association, command, syntax and data set bytes."""

    info: AssociationInfo
    #: what :meth:`Handler.accept` returned for the association (the route)
    target: Any
    command: Command
    transfer_syntax_uid: str
    #: the encoded data set as received, or None when it was too large to keep
    dataset: bytes | bytearray | None
    size: int
    #: time.monotonic() when the request's first PDU arrived
    started: float


class Handler(Protocol):
    """What the server asks of the application."""

    def accept(self, info: AssociationInfo) -> Rejection | Any:
        """A Rejection, or what identifies the association's target (its route)."""

    def store(self, request: StoreRequest) -> int:
        """Store one instance; the DIMSE status to answer (or an awaitable of it)."""

    def association(self, info: AssociationInfo | None, outcome: str, reason: str) -> None:
        """Called as associations are accepted, rejected, released or aborted (for metrics)."""


class AssociationSlots:
    """A counter of open associations; shared by worker processes when made with a Value."""

    def __init__(
        self, limit: int, shared: multiprocessing.sharedctypes.Synchronized[int] | None = None
    ) -> None:
        self.limit = limit
        self._shared = shared
        self._lock = threading.Lock()
        self._local = 0

    def acquire(self) -> bool:
        if self._shared is not None:
            with self._shared.get_lock():
                if self._shared.value >= self.limit:
                    return False
                self._shared.value += 1
                return True
        with self._lock:
            if self._local >= self.limit:
                return False
            self._local += 1
            return True

    def release(self) -> None:
        if self._shared is not None:
            with self._shared.get_lock():
                self._shared.value -= 1
            return
        with self._lock:
            self._local -= 1

    @property
    def in_use(self) -> int:
        return self._shared.value if self._shared is not None else self._local


def listen_socket(
    host: str, port: int, *, reuse_port: bool = False, backlog: int = 128
) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR; SO_REUSEPORT when asked)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class AsyncStoreServer:
    """A C-STORE and C-ECHO SCP on a listening socket, every association on one event loop.

    :meth:`serve` / :meth:`close` run it on the current loop; :meth:`start` / :meth:`stop`
    run it on a loop of its own in one thread (the interface of the blocking server).
    """

    def __init__(
        self,
        handler: Handler,
        listener: socket.socket,
        *,
        limits: Limits,
        slots: AssociationSlots,
        accepts_sop_class: Callable[[str], bool],
        transfer_syntaxes: Collection[str],
        implementation_class_uid: str,
        implementation_version: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.listener = listener
        self.limits = limits
        self.slots = slots
        self.accepts_sop_class = accepts_sop_class
        self.transfer_syntaxes = frozenset(transfer_syntaxes)
        self.implementation_class_uid = implementation_class_uid
        self.implementation_version = implementation_version
        self.ssl_context = ssl_context
        # Connections being told "too many": bounded too, or a flood holds buffers.
        self.overflow_limit = max(4, limits.max_associations)
        self.overflow = 0
        self.associations: set[_Association] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    @property
    def active(self) -> int:
        return len(self.associations)

    # --- on the running loop ---------------------------------------------------------------

    async def serve(self) -> None:
        """Start accepting on the running loop."""
        self._loop = asyncio.get_running_loop()
        # A duplicate: asyncio closes the socket it serves on, the owner closes its own.
        self._server = await self._loop.create_server(
            (lambda: _TlsAssociation(self)) if self.ssl_context else (lambda: _Association(self)),
            sock=self.listener.dup(),
        )

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; let associations finish for ``grace`` seconds, then cut them."""
        if self._server is not None:
            self._server.close()
            self._server = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.associations and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for association in list(self.associations):
            association.cut()
        while self.associations and loop.time() < deadline + 2:
            await asyncio.sleep(0.01)

    # --- on a thread of its own --------------------------------------------------------------

    def start(self) -> AsyncStoreServer:
        """Serve on a new event loop in a thread of its own; returns once accepting."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.serve())
            except BaseException as err:  # reported to start()'s caller
                failure.append(err)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="dicom-scp-loop", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop a server begun with :meth:`start` (associations get ``grace`` seconds)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.close(grace), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None


class _TlsAssociation(sslproto.SSLProtocol):
    """asyncio's server-side TLS layer (what ``create_server(ssl=...)`` builds) with an
    association inside. asyncio drops a failed handshake with a DEBUG line; a refused client
    certificate must be logged and counted like any refused association."""

    def __init__(self, server: AsyncStoreServer) -> None:
        assert server.ssl_context is not None
        self.server = server
        self.peer = "a client"
        loop = asyncio.get_running_loop()
        handshake = loop.create_future()
        handshake.add_done_callback(self._handshake_done)
        super().__init__(
            loop, _Association(server), server.ssl_context, handshake, server_side=True,
            ssl_handshake_timeout=server.limits.request_timeout,
        )  # fmt: skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        super().connection_made(transport)

    def _handshake_done(self, handshake: asyncio.Future[None]) -> None:
        if handshake.cancelled() or handshake.exception() is None:
            return
        err = handshake.exception()
        reason = getattr(err, "reason", None) or str(err) or type(err).__name__
        LOGGER.warning("TLS handshake with %s refused: %s", self.peer, reason)
        self.server.handler.association(None, "rejected", "tls-handshake")


# Association states.
_AWAITING_REQUEST = 0
_REFUSING = 1
_ESTABLISHED = 2
_CLOSED = 3


class _Association(asyncio.BufferedProtocol):
    """One association: the PDU reader, the DIMSE assembler and the deadlines."""

    def __init__(self, server: AsyncStoreServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        size = min(_INITIAL_BUFFER, 2 * (self.limits.max_pdu + 6))
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0
        self.transport: asyncio.Transport | None = None
        self.state = _AWAITING_REQUEST
        self.has_slot = False
        self.info: AssociationInfo | None = None
        self.target: Any = None
        self.address: tuple[str, int] = ("?", 0)
        self.syntaxes: dict[int, str] = {}
        self.outcome = "aborted"
        self.reason = "connection-lost"
        self.refusing = False
        self.reported = False
        # Deadlines: one timer, moved lazily (it fires, finds the deadline later, re-arms).
        self.deadline = math.inf
        self.timeout_kind = "idle-timeout"
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        self.pdu_begun = False
        # Reading pauses while a handler's awaitable runs and while the peer does not read.
        self.waiting = False
        self.write_paused = False
        # While one read's PDUs are handled, answers are collected and written together at
        # the end: a sender with several requests outstanding gets them in one write.
        self.corked = False
        self.unwritten: list[bytes] = []
        # The message being assembled.
        self.command_parts: list[bytes] = []
        self.command: Command | None = None
        self.context_id = 0
        # The data set being received: ``used`` bytes of ``message`` hold it. Its capacity
        # is guessed from the previous message, so a series' images land without regrowth.
        self.message = bytearray()
        self.used = 0
        self.size_guess = 0
        self.size = 0
        self.started = 0.0
        # A large data set PDV is received straight into ``message`` (no copy from the read
        # buffer): bytes ``direct_at`` to ``direct_end`` are still to come.
        self.direct = False
        self.direct_at = 0
        self.direct_end = 0
        self.direct_control = 0
        self.direct_done = False

    # --- transport callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        server.associations.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.address = (str(peer[0]), int(peer[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                tcp_nodelay_on(sock)
            except OSError:
                pass
        if server.slots.acquire():
            self.has_slot = True
        elif server.overflow < server.overflow_limit:
            server.overflow += 1
            self.state = _REFUSING
            self.refusing = True
        else:
            self._report("rejected", TOO_MANY.label)
            self.state = _CLOSED
            transport.abort()
            return
        self._set_deadline(self.limits.request_timeout, "idle-timeout")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.direct_done:
            self._direct_finished()
        if self.direct:
            return memoryview(self.message)[self.direct_at : self.direct_end]
        if self.end == len(self.buffer):
            self._make_room(0)
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.direct:
            self.direct_at += nbytes
            if self.direct_at == self.direct_end:
                # The transport still holds its view of ``message`` (no resizing now):
                # finish the PDV on the next turn of the loop, before the next read.
                self.direct = False
                self.direct_done = True
                self.loop.call_soon(self._direct_finished)
            return
        self.end += nbytes
        self._process()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # never connected: a TLS handshake that failed (_TlsAssociation reports it)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        server = self.server
        server.associations.discard(self)
        if self.has_slot:
            self.has_slot = False
            server.slots.release()
        if self.refusing:
            server.overflow -= 1
        self.state = _CLOSED
        if self.refusing:
            self._report("rejected", TOO_MANY.label)
        elif exc is None and self.reason == "connection-lost":
            self._report("aborted", "connection-closed")
        else:
            self._report(self.outcome, self.reason)

    def _report(self, outcome: str, reason: str) -> None:
        """Tell the handler how the association ended, once."""
        if self.reported:
            return
        self.reported = True
        self.server.handler.association(self.info, outcome, reason)

    # --- reading PDUs ---------------------------------------------------------------------

    def _make_room(self, needed: int) -> None:
        """Move unread bytes to the front; grow so that ``needed`` bytes fit."""
        pending = self.end - self.start
        if self.start:
            self.view[:pending] = self.view[self.start : self.end]
            self.start, self.end = 0, pending
        if self.end == len(self.buffer) or needed > len(self.buffer):
            grown = bytearray(max(needed, 2 * len(self.buffer)))
            grown[:pending] = self.view[:pending]
            self.buffer = grown
            self.view = memoryview(grown)

    def _process(self) -> None:
        self.corked = True
        try:
            self._read_pdus()
        except pdu.PduError as err:
            self._protocol_abort(err)
        except Exception as err:
            # A fault of ours must end this association only, never the loop.
            LOGGER.exception("association from %s:%d failed", *self.address)
            self._protocol_abort(pdu.PduError(f"internal error: {err}", reason=0))
        finally:
            self.corked = False
            self._flush()

    def _read_pdus(self) -> None:
        view = self.view
        while not self.waiting and self.state != _CLOSED:
            available = self.end - self.start
            if available < 6:
                break
            start = self.start
            pdu_type = view[start]
            length = int.from_bytes(view[start + 2 : start + 6], "big")
            self._check_header(pdu_type, length)
            total = 6 + length
            if available < total:
                if self._receive_directly(pdu_type, length, available):
                    break
                if total > len(self.buffer) - start:
                    self._make_room(total)
                break
            self.start = start + total
            self.pdu_begun = False
            self._dispatch(pdu_type, view, start, total)
            view = self.view  # a handler never grows it, but _dispatch may have closed
        if self.state == _CLOSED:
            return
        if self.start == self.end:
            self.start = self.end = 0
        if self.waiting:
            self._set_deadline(math.inf, "idle-timeout")
        elif self.start != self.end:
            if not self.pdu_begun:
                self.pdu_begun = True
                timeout = (
                    self.limits.pdu_timeout
                    if self.state == _ESTABLISHED
                    else self.limits.request_timeout
                )
                self._set_deadline(timeout, "slow-peer")
        elif self.state == _ESTABLISHED:
            self._set_deadline(self.limits.idle_timeout, "idle-timeout")

    def _receive_directly(self, pdu_type: int, length: int, available: int) -> bool:
        """Switch to receiving a large data set PDV into the message; True if it did."""
        if (
            pdu_type != pdu.P_DATA_TF
            or self.command is None
            or self.state != _ESTABLISHED
            or available < 12
            or length + 6 - available < _DIRECT_FROM
        ):
            return False
        start = self.start
        pdv_length, context_id, control = _PDV_HEADER.unpack_from(self.view, start + 6)
        fragment = pdv_length - 2
        if (
            pdv_length + 4 != length  # one PDV fills the PDU
            or control & 0x01
            or context_id != self.context_id
            or self.size + fragment > self.limits.max_instance_bytes
        ):
            return False
        have = available - 12
        self._reserve(fragment)
        at = self.used
        self.message[at : at + have] = self.view[start + 12 : self.end]
        self.direct = True
        self.direct_at = at + have
        self.direct_end = at + fragment
        self.direct_control = control
        self.start = self.end = 0
        if not self.pdu_begun:
            self.pdu_begun = True
            self._set_deadline(self.limits.pdu_timeout, "slow-peer")
        return True

    def _direct_finished(self) -> None:
        if not self.direct_done:
            return  # run already (from get_buffer)
        self.direct_done = False
        if self.state == _CLOSED:
            return
        fragment = self.direct_end - self.used
        self.used = self.direct_end
        self.size += fragment
        self.pdu_begun = False
        try:
            if self.direct_control & 0x02:
                self._message_complete()
        except Exception as err:
            LOGGER.exception("association from %s:%d failed", *self.address)
            self._protocol_abort(pdu.PduError(f"internal error: {err}", reason=0))
            return
        self._process()

    def _reserve(self, count: int) -> None:
        """Room for ``count`` more bytes of the message."""
        needed = self.used + count
        if needed > len(self.message):
            grown = max(needed, 2 * len(self.message), self.size_guess)
            self.message.extend(bytes(grown - len(self.message)))

    def _message_complete(self) -> None:
        command = self.command
        assert command is not None
        self.command = None
        data: bytearray | None = None
        if self.size <= self.limits.max_instance_bytes:
            data = self.message
            if len(data) != self.used:
                del data[self.used :]
            # The next data set of a series is about as large; an eighth more spares a regrowth.
            # Capped: after one huge instance, small ones must not each get its size.
            self.size_guess = min(self.used + self.used // 8, _MAX_SIZE_GUESS)
        received = self.size
        self.message, self.used, self.size = bytearray(), 0, 0
        self._answer(command, data, received)

    def _check_header(self, pdu_type: int, length: int) -> None:
        if pdu_type == pdu.P_DATA_TF:
            if length > self.limits.max_pdu:
                raise pdu.PduError(
                    f"P-DATA-TF of {length} bytes, larger than the {self.limits.max_pdu} "
                    "negotiated",
                    reason=6,
                )
        elif pdu_type == pdu.A_ASSOCIATE_RQ:
            if length > MAX_REQUEST_PDU:
                raise pdu.PduError(f"A-ASSOCIATE-RQ of {length} bytes", reason=6)
        elif pdu_type in (pdu.A_RELEASE_RQ, pdu.A_RELEASE_RP, pdu.A_ABORT):
            if length != 4:
                raise pdu.PduError(f"PDU type 0x{pdu_type:02X} of length {length}", reason=6)
        elif pdu_type in (pdu.A_ASSOCIATE_AC, pdu.A_ASSOCIATE_RJ):
            raise pdu.PduError(f"unexpected PDU type 0x{pdu_type:02X}", reason=2)
        else:
            raise pdu.PduError(f"unknown PDU type 0x{pdu_type:02X}", reason=1)

    def _dispatch(self, pdu_type: int, view: memoryview, start: int, total: int) -> None:
        if self.state == _ESTABLISHED:
            if pdu_type == pdu.P_DATA_TF:
                self._p_data(view[start + 6 : start + total])
            elif pdu_type == pdu.A_RELEASE_RQ:
                self._write(pdu.release_rp())
                self._finish("released", "")
            elif pdu_type == pdu.A_ABORT:
                self._finish("aborted", "aborted-by-peer", abort=True)
            else:
                raise pdu.PduError(f"unexpected PDU type 0x{pdu_type:02X}", reason=2)
            return
        if pdu_type == pdu.A_ABORT:
            self._finish("aborted", "aborted-by-peer", abort=True)
            return
        if pdu_type != pdu.A_ASSOCIATE_RQ:
            raise pdu.PduError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", reason=2)
        self._associate(bytes(view[start : start + total]))

    # --- association set-up -----------------------------------------------------------------

    def _associate(self, raw: bytes) -> None:
        server = self.server
        if self.state == _REFUSING:
            self._write(pdu.associate_rj(TOO_MANY.result, TOO_MANY.source, TOO_MANY.reason))
            LOGGER.warning(
                "rejected association from %s:%d: %d associations are open already",
                self.address[0], self.address[1], server.slots.limit,
                extra={"reason": TOO_MANY.label, "peer": self.address[0]},
            )  # fmt: skip
            self._finish("rejected", TOO_MANY.label)
            return
        request = acse.read_request(raw)
        info = AssociationInfo(
            calling_ae=request.calling_ae,
            called_ae=request.called_ae,
            peer_host=self.address[0],
            peer_port=self.address[1],
            tls=server.ssl_context is not None,
        )
        self.info = info
        target = self._policy(request, info)
        if isinstance(target, Rejection):
            self._write(pdu.associate_rj(target.result, target.source, target.reason))
            LOGGER.warning(
                "rejected association from %s@%s:%d calling %s: %s",
                info.calling_ae, info.peer_host, info.peer_port, info.called_ae, target.label,
                extra={"reason": target.label, "calling_ae": info.calling_ae,
                       "called_ae": info.called_ae, "peer": info.peer_host},
            )  # fmt: skip
            self._finish("rejected", target.label)
            return
        acceptance = acse.accept(
            request,
            accepts_sop_class=server.accepts_sop_class,
            transfer_syntaxes=server.transfer_syntaxes,
            max_pdu=self.limits.max_pdu,
            implementation_class_uid=server.implementation_class_uid,
            implementation_version=server.implementation_version,
            operations_window=self.limits.operations_window,
        )
        self.target = target
        self.syntaxes = {cid: syntax for cid, (_abstract, syntax) in acceptance.contexts.items()}
        self._write(acceptance.pdu)
        self.state = _ESTABLISHED
        LOGGER.info(
            "accepted association from %s@%s:%d calling %s (%d of %d contexts)",
            info.calling_ae, info.peer_host, info.peer_port, info.called_ae,
            len(self.syntaxes), acceptance.proposed,
            extra={"calling_ae": info.calling_ae, "called_ae": info.called_ae,
                   "peer": info.peer_host},
        )  # fmt: skip
        server.handler.association(info, "accepted", "")

    def _policy(self, request: acse.Request, info: AssociationInfo) -> Any:
        if not request.protocol_version & 1:
            return BAD_VERSION
        if request.application_context != pdu.APPLICATION_CONTEXT:
            return BAD_CONTEXT
        try:
            return self.server.handler.accept(info)
        except Exception:
            # An association policy must fail closed.
            LOGGER.exception("the association policy failed; rejecting %s", info)
            return POLICY_ERROR

    # --- DIMSE ------------------------------------------------------------------------------

    def _p_data(self, body: memoryview) -> None:
        pos = 0
        size = len(body)
        syntaxes = self.syntaxes
        while pos < size:
            if pos + 6 > size:
                raise pdu.PduError("a PDV header runs past the end of its P-DATA-TF")
            length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
            end = pos + 4 + length
            if length < 2 or end > size:
                raise pdu.PduError(f"a PDV of length {length} does not fit its P-DATA-TF")
            fragment = body[pos + 6 : end]
            pos = end
            if context_id not in syntaxes:
                raise pdu.PduError(
                    f"PDV on presentation context {context_id}, not accepted", reason=6
                )
            if control & 0x01:
                if self.command is not None:
                    raise pdu.PduError("a command arrived while a data set was expected", reason=0)
                if not self.command_parts:
                    self.started = time.monotonic()
                self.command_parts.append(bytes(fragment))
                if not control & 0x02:
                    continue
                command = parse_request(b"".join(self.command_parts))
                self.command_parts = []
                self.context_id = context_id
                if command.has_data_set:
                    self.command = command
                    if self.size_guess:
                        self.message = bytearray(self.size_guess)
                else:
                    self._answer(command, None, 0)
                    if self.waiting or self.state == _CLOSED:
                        self._check_trailing(pos, size)
                        return
                continue
            if self.command is None or context_id != self.context_id:
                raise pdu.PduError("a data set fragment without its command", reason=0)
            count = len(fragment)
            self.size += count
            if self.size <= self.limits.max_instance_bytes:
                self._reserve(count)
                self.message[self.used : self.used + count] = fragment
                self.used += count
            elif self.message:
                # Over the limit: stop holding it, read on to the end.
                self.message, self.used = bytearray(), 0
            if control & 0x02:
                self._message_complete()
                if self.waiting or self.state == _CLOSED:
                    self._check_trailing(pos, size)
                    return

    def _check_trailing(self, pos: int, size: int) -> None:
        if pos < size and self.state != _CLOSED:
            # A message's last fragment and the next message in one PDU while the handler
            # still works: a peer may not send the next request before the answer anyway.
            raise pdu.PduError("a PDV after a message that is still being stored", reason=0)

    def _answer(self, command: Command, data: bytearray | None, size: int) -> None:
        if command.command_field == C_CANCEL_RQ:
            return  # nothing to cancel: C-STOREs are answered one by one
        if command.command_field == C_ECHO_RQ:
            self._respond(command, Status.SUCCESS)
            return
        if command.command_field != C_STORE_RQ or not command.has_data_set:
            self._respond(command, Status.UNRECOGNIZED_OPERATION)
            return
        assert self.info is not None
        request = StoreRequest(
            self.info,
            self.target,
            command,
            self.syntaxes[self.context_id],
            data,
            size,
            self.started,
        )
        try:
            status = self.server.handler.store(request)
        except Exception:
            self._store_failed(command)
            return
        if inspect.isawaitable(status):
            self.waiting = True
            self._update_reading()
            self.loop.create_task(self._await_store(command, status, self.context_id))
            return
        self._respond(command, int(status))

    async def _await_store(self, command: Command, pending: Any, context_id: int) -> None:
        try:
            status = int(await pending)
        except Exception:
            self.waiting = False
            self._store_failed(command, context_id)
        else:
            self.waiting = False
            self._respond(command, status, context_id)
        if self.state == _CLOSED:
            return
        self._update_reading()
        self._process()

    def _store_failed(self, command: Command, context_id: int | None = None) -> None:
        # A failure of one instance is answered; the association goes on.
        LOGGER.exception(
            "storing SOP instance %s from %s failed",
            command.affected_sop_instance_uid,
            self.info.calling_ae if self.info else "?",
        )
        self._respond(command, Status.HANDLER_FAILED, context_id)

    def _respond(self, command: Command, status: int, context_id: int | None = None) -> None:
        self._write(
            pdu.p_data(
                self.context_id if context_id is None else context_id,
                store_response(
                    command.affected_sop_class_uid,
                    command.command_field,
                    command.message_id,
                    status,
                    command.affected_sop_instance_uid,
                ),
                command=True,
            )
        )

    # --- writing, ending, deadlines -----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and self.state != _CLOSED:
            if self.corked:
                self.unwritten.append(data)
            else:
                self.transport.write(data)

    def _flush(self) -> None:
        """Write the answers collected while corked, in one write."""
        unwritten = self.unwritten
        if not unwritten:
            return
        self.unwritten = []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(unwritten[0] if len(unwritten) == 1 else b"".join(unwritten))

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.waiting or self.write_paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _finish(self, outcome: str, reason: str, *, abort: bool = False) -> None:
        """End the association: what we wrote goes out, then the connection closes."""
        self._flush()
        if not self.refusing:
            self._report(outcome, reason)
        self.state = _CLOSED
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def _protocol_abort(self, err: pdu.PduError) -> None:
        if self.state == _CLOSED:
            return
        reason = "protocol-error" if err.reason != 6 else "pdu-too-large"
        LOGGER.warning(
            "aborting association from %s:%d: %s",
            self.address[0], self.address[1], err,
            extra={"reason": reason, "peer": self.address[0]},
        )  # fmt: skip
        self._write(pdu.abort(2, err.reason))
        self._finish("aborted", reason)

    def cut(self) -> None:
        """Abort at once (the server stops and the grace time is over)."""
        if self.state == _CLOSED:
            return
        self._write(pdu.abort(2, 0))
        self._finish("aborted", "server-stopping")
        if self.transport is not None:
            self.transport.abort()

    def _set_deadline(self, seconds: float, kind: str) -> None:
        self.timeout_kind = kind
        if seconds == math.inf:
            self.deadline = math.inf
            return
        deadline = self.loop.time() + seconds
        self.deadline = deadline
        if deadline < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(deadline, self._on_timer)
            self.timer_at = deadline

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_at = math.inf
        if self.state == _CLOSED:
            return
        if self.deadline == math.inf:
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            self.timer_at = self.deadline
            return
        kind = self.timeout_kind
        LOGGER.warning(
            "aborting association from %s:%d: %s",
            self.address[0], self.address[1], kind.replace("-", " "),
            extra={"reason": kind, "peer": self.address[0]},
        )  # fmt: skip
        self._write(pdu.abort(2, 0))
        self._finish("aborted", kind)




