"""The blocking storage SCP server: the alternative to the asyncio one of :mod:`pacsflow.dicom.engine`.

Its types (Limits, Rejection, StoreRequest, Handler, AssociationSlots) are the engine's.
One thread per association, blocking sockets with deadlines, no queues between threads: a
C-STORE is read, handed to :meth:`Handler.store` in the association's own thread, and
answered with one ``sendall``. Limits that pynetdicom lacks are enforced here:

* a PDU longer than the maximum we negotiated is refused with an A-ABORT before any of it is
  buffered (pynetdicom reads whatever length the peer announces, up to 4 GiB);
* at most ``max_associations`` associations at once (across processes when the slots are
  shared); more are answered A-ASSOCIATE-RJ "local limit exceeded" (PS3.8 Table 9-21);
* the A-ASSOCIATE-RQ must arrive within ``request_timeout``, the next PDU within
  ``idle_timeout``, and a PDU once begun within ``pdu_timeout``, so a peer that trickles
  bytes (slow-loris) cannot hold an association open;
* a data set larger than ``max_instance_bytes`` is read to its end and refused (0xA700)
  instead of being held in memory.

Every socket gets TCP_NODELAY; TLS (PS3.15 B.1) wraps the accepted socket.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from pacsflow.dicom.engine.scp import (
    BAD_CONTEXT as _BAD_CONTEXT,
    BAD_VERSION as _BAD_VERSION,
    TOO_MANY as _TOO_MANY,
    AssociationSlots,
    Handler,
    Limits,
    Rejection,
    StoreRequest,
    listen_socket,
)
from pacsflow.dicom.scp import AssociationInfo
from pacsflow.dicom.status import Status
from pacsflow.dicom.transport import tcp_nodelay_on

from pacsflow_router.scp import pdu
from pacsflow_router.scp.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    Command,
    encode_response,
    parse_command,
)

__all__ = [
    "AssociationSlots",
    "Handler",
    "Limits",
    "Rejection",
    "StoreRequest",
    "StoreServer",
    "listen_socket",
]

LOGGER = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
_EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# Longest A-ASSOCIATE-RQ we read: 128 contexts with a dozen transfer syntaxes fit easily.
_MAX_REQUEST_PDU = 1 << 20
_RECV_BUFFER = 1 << 16


class _Closed(Exception):
    """The peer closed the connection."""


class _Timeout(Exception):
    """A deadline passed; ``kind`` is idle-timeout or slow-peer."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(kind)


class _Connection:
    """A socket with a small read buffer and deadlines on every read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray(_RECV_BUFFER)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0

    def read(self, count: int, deadline: float, kind: str) -> bytearray:
        out = bytearray(count)
        view = memoryview(out)
        got = min(self.end - self.start, count)
        if got:
            view[:got] = self.view[self.start : self.start + got]
            self.start += got
        sock = self.sock
        while got < count:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise _Timeout(kind)
            sock.settimeout(timeout)
            missing = count - got
            try:
                if missing >= _RECV_BUFFER:
                    received = sock.recv_into(view[got:], missing)
                    if not received:
                        raise _Closed()
                    got += received
                    continue
                received = sock.recv_into(self.view, _RECV_BUFFER)
            except TimeoutError:
                raise _Timeout(kind) from None
            if not received:
                raise _Closed()
            take = min(received, missing)
            view[got : got + take] = self.view[:take]
            got += take
            self.start, self.end = take, received
        return out

    def read_pdu(self, wait: float, pdu_timeout: float, max_pdu: int) -> tuple[int, bytearray]:
        """The next PDU's type and body; refuses a P-DATA-TF longer than ``max_pdu``."""
        header = self.read(6, time.monotonic() + wait, "idle-timeout")
        pdu_type = header[0]
        length = int.from_bytes(header[2:6], "big")
        if pdu_type == pdu.P_DATA_TF:
            if length > max_pdu:
                raise pdu.PduError(
                    f"P-DATA-TF of {length} bytes, larger than the {max_pdu} negotiated", reason=6
                )
        elif pdu_type == pdu.A_ASSOCIATE_RQ:
            if length > _MAX_REQUEST_PDU:
                raise pdu.PduError(f"A-ASSOCIATE-RQ of {length} bytes", reason=6)
        elif pdu_type in (pdu.A_RELEASE_RQ, pdu.A_RELEASE_RP, pdu.A_ABORT):
            if length != 4:
                raise pdu.PduError(f"PDU type 0x{pdu_type:02X} of length {length}", reason=6)
        elif pdu_type in (pdu.A_ASSOCIATE_AC, pdu.A_ASSOCIATE_RJ):
            raise pdu.PduError(f"unexpected PDU type 0x{pdu_type:02X}", reason=2)
        else:
            raise pdu.PduError(f"unknown PDU type 0x{pdu_type:02X}", reason=1)
        return pdu_type, self.read(length, time.monotonic() + pdu_timeout, "slow-peer")

    def send(self, data: bytes, timeout: float) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)


class StoreServer:
    """A C-STORE and C-ECHO SCP on a listening socket, one thread per association."""

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
        self._stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        # Connections waiting to be told "too many": bounded too, or a flood makes threads.
        self._overflow = threading.BoundedSemaphore(max(4, limits.max_associations))
        self._acceptor: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._threads)

    def start(self) -> StoreServer:
        # A timeout lets the accept loop notice stop(); closing the socket does not wake it.
        self.listener.settimeout(0.25)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="router-scp-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; let associations finish for ``grace`` seconds, then cut them."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join()
        deadline = time.monotonic() + grace
        while self.active and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=2)

    # --- accepting ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, address = self.listener.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if self._stopping.is_set():
                    return
                # EMFILE and friends: wait a little rather than spin.
                LOGGER.error("accepting a connection failed: %s", err)
                time.sleep(0.1)
                continue
            if self.slots.acquire():
                self._spawn(self._serve, sock, address, True)
            elif self._overflow.acquire(blocking=False):
                self._spawn(self._refuse, sock, address, False)
            else:
                self.handler.association(None, "rejected", _TOO_MANY.label)
                sock.close()

    def _spawn(
        self, target: Callable[..., None], sock: socket.socket, address: Any, slot: bool
    ) -> None:
        def run() -> None:
            try:
                target(sock, address)
            finally:
                if slot:
                    self.slots.release()
                else:
                    self._overflow.release()
                with self._lock:
                    self._sockets.discard(sock)
                    self._threads.discard(threading.current_thread())
                try:
                    sock.close()
                except OSError:
                    pass

        thread = threading.Thread(
            target=run, name=f"router-scp-{address[0]}:{address[1]}", daemon=True
        )
        with self._lock:
            self._sockets.add(sock)
            self._threads.add(thread)
        thread.start()

    def _prepare(self, sock: socket.socket) -> socket.socket:
        tcp_nodelay_on(sock)
        if self.ssl_context is None:
            return sock
        tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(self.limits.request_timeout)
        tls.do_handshake()
        return tls

    def _refuse(self, sock: socket.socket, address: Any) -> None:
        """Read the request and answer "local limit exceeded" (transient)."""
        try:
            conn = _Connection(self._prepare(sock))
            pdu_type, _body = conn.read_pdu(
                self.limits.request_timeout, self.limits.request_timeout, self.limits.max_pdu
            )
            if pdu_type == pdu.A_ASSOCIATE_RQ:
                conn.send(pdu.associate_rj(_TOO_MANY.result, _TOO_MANY.source, _TOO_MANY.reason), 5)
        except (OSError, _Closed, _Timeout, pdu.PduError, ssl.SSLError):
            pass
        LOGGER.warning(
            "rejected association from %s:%d: %d associations are open already",
            address[0],
            address[1],
            self.slots.limit,
            extra={"reason": _TOO_MANY.label, "peer": address[0]},
        )
        self.handler.association(None, "rejected", _TOO_MANY.label)

    # --- one association ------------------------------------------------------------------

    def _serve(self, raw: socket.socket, address: Any) -> None:
        info: AssociationInfo | None = None
        conn: _Connection | None = None
        outcome, reason = "aborted", "connection-lost"
        try:
            sock = self._prepare(raw)
            conn = _Connection(sock)
            limits = self.limits
            pdu_type, body = conn.read_pdu(
                limits.request_timeout, limits.request_timeout, limits.max_pdu
            )
            if pdu_type != pdu.A_ASSOCIATE_RQ:
                raise pdu.PduError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", reason=2)
            request = pdu.parse_associate_rq(bytes(body))
            info = AssociationInfo(
                calling_ae=request.calling_ae,
                called_ae=request.called_ae,
                peer_host=str(address[0]),
                peer_port=int(address[1]),
                tls=self.ssl_context is not None,
            )
            target = self._negotiate_target(request, info)
            if isinstance(target, Rejection):
                conn.send(pdu.associate_rj(target.result, target.source, target.reason), 5)
                LOGGER.warning(
                    "rejected association from %s@%s:%d calling %s: %s",
                    info.calling_ae, info.peer_host, info.peer_port, info.called_ae, target.label,
                    extra={"reason": target.label, "calling_ae": info.calling_ae,
                           "called_ae": info.called_ae, "peer": info.peer_host},
                )  # fmt: skip
                self.handler.association(info, "rejected", target.label)
                outcome = ""
                return
            contexts, syntaxes = self._contexts(request)
            conn.send(
                pdu.associate_ac(
                    request,
                    contexts,
                    max_pdu=limits.max_pdu,
                    implementation_class_uid=self.implementation_class_uid,
                    implementation_version=self.implementation_version,
                ),
                limits.pdu_timeout,
            )
            LOGGER.info(
                "accepted association from %s@%s:%d calling %s (%d of %d contexts)",
                info.calling_ae, info.peer_host, info.peer_port, info.called_ae,
                len(syntaxes), len(contexts),
                extra={"calling_ae": info.calling_ae, "called_ae": info.called_ae,
                       "peer": info.peer_host},
            )  # fmt: skip
            self.handler.association(info, "accepted", "")
            outcome, reason = self._dimse_loop(conn, info, target, syntaxes)
        except pdu.PduError as err:
            reason = "protocol-error" if err.reason != 6 else "pdu-too-large"
            LOGGER.warning(
                "aborting association from %s:%d: %s",
                address[0],
                address[1],
                err,
                extra={"reason": reason, "peer": address[0]},
            )
            self._abort(conn, err.reason)
        except _Timeout as err:
            reason = err.kind
            LOGGER.warning(
                "aborting association from %s:%d: %s",
                address[0],
                address[1],
                reason.replace("-", " "),
                extra={"reason": reason, "peer": address[0]},
            )
            self._abort(conn, 0)
        except _Closed:
            reason = "connection-closed"
        except (OSError, ssl.SSLError) as err:
            LOGGER.info("association from %s:%d lost: %s", address[0], address[1], err)
        finally:
            if outcome:
                self.handler.association(info, outcome, reason)

    def _abort(self, conn: _Connection | None, reason: int) -> None:
        if conn is None:
            return
        try:
            conn.send(pdu.abort(2, reason), 2)
        except (OSError, ssl.SSLError):
            pass

    def _negotiate_target(self, request: pdu.AssociateRequest, info: AssociationInfo) -> Any:
        if not request.protocol_version & 1:
            return _BAD_VERSION
        if request.application_context != pdu.APPLICATION_CONTEXT:
            return _BAD_CONTEXT
        try:
            return self.handler.accept(info)
        except Exception:
            # An association policy must fail closed.
            LOGGER.exception("the association policy failed; rejecting %s", info)
            return Rejection(1, 1, 1, "policy-error")

    def _contexts(
        self, request: pdu.AssociateRequest
    ) -> tuple[list[pdu.AcceptedContext], dict[int, str]]:
        answers: list[pdu.AcceptedContext] = []
        accepted: dict[int, str] = {}
        for proposed in request.contexts:
            first = proposed.transfer_syntaxes[0] if proposed.transfer_syntaxes else ""
            abstract = proposed.abstract_syntax
            if abstract != VERIFICATION and not self.accepts_sop_class(abstract):
                answers.append(
                    pdu.AcceptedContext(
                        proposed.context_id, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, first
                    )
                )
                continue
            # The requestor lists its syntaxes in the order it prefers (PS3.8 9.3.2.2), except
            # that explicit big endian (retired) goes last: storescu proposes it before
            # implicit little endian, then converts implicit files instead of sending them.
            usable = [ts for ts in proposed.transfer_syntaxes if ts in self.transfer_syntaxes]
            usable.sort(key=lambda ts: ts == _EXPLICIT_BIG_ENDIAN)
            chosen = usable[0] if usable else None
            if chosen is None:
                answers.append(
                    pdu.AcceptedContext(
                        proposed.context_id, pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED, first
                    )
                )
                continue
            answers.append(pdu.AcceptedContext(proposed.context_id, pdu.ACCEPTANCE, chosen))
            accepted[proposed.context_id] = chosen
        return answers, accepted

    def _dimse_loop(
        self, conn: _Connection, info: AssociationInfo, target: Any, syntaxes: dict[int, str]
    ) -> tuple[str, str]:
        limits = self.limits
        command_parts: list[bytes] = []
        command: Command | None = None
        context_id = 0
        fragments: list[memoryview] = []
        size = 0
        started = 0.0
        while True:
            pdu_type, body = conn.read_pdu(limits.idle_timeout, limits.pdu_timeout, limits.max_pdu)
            if pdu_type == pdu.A_RELEASE_RQ:
                conn.send(pdu.release_rp(), limits.pdu_timeout)
                return "released", ""
            if pdu_type == pdu.A_ABORT:
                return "aborted", "aborted-by-peer"
            if pdu_type != pdu.P_DATA_TF:
                raise pdu.PduError(f"unexpected PDU type 0x{pdu_type:02X}", reason=2)
            for pdv_context, control, fragment in pdu.pdvs(memoryview(body)):
                if pdv_context not in syntaxes:
                    raise pdu.PduError(
                        f"PDV on presentation context {pdv_context}, not accepted", reason=6
                    )
                if control & 0x01:
                    if command is not None:
                        raise pdu.PduError(
                            "a command arrived while a data set was expected", reason=0
                        )
                    if not command_parts:
                        started = time.monotonic()
                    command_parts.append(bytes(fragment))
                    if not control & 0x02:
                        continue
                    command = parse_command(b"".join(command_parts))
                    command_parts = []
                    context_id = pdv_context
                    if not command.has_data_set:
                        self._answer(
                            conn, info, target, command, context_id, syntaxes, None, 0, started
                        )
                        command = None
                    continue
                if command is None or pdv_context != context_id:
                    raise pdu.PduError("a data set fragment without its command", reason=0)
                size += len(fragment)
                if size <= limits.max_instance_bytes:
                    fragments.append(fragment)
                elif fragments:
                    fragments = []  # over the limit: stop holding it, read on to the end
                if control & 0x02:
                    data = b"".join(fragments) if size <= limits.max_instance_bytes else None
                    self._answer(
                        conn, info, target, command, context_id, syntaxes, data, size, started
                    )
                    command, fragments, size = None, [], 0

    def _answer(
        self,
        conn: _Connection,
        info: AssociationInfo,
        target: Any,
        command: Command,
        context_id: int,
        syntaxes: dict[int, str],
        data: bytes | None,
        size: int,
        started: float,
    ) -> None:
        if command.command_field == C_CANCEL_RQ:
            return  # nothing to cancel: C-STOREs are answered one by one
        status: int
        if command.command_field == C_ECHO_RQ:
            status = Status.SUCCESS
        elif command.command_field == C_STORE_RQ and command.has_data_set:
            request = StoreRequest(info, target, command, syntaxes[context_id], data, size, started)
            try:
                status = int(self.handler.store(request))
            except Exception:
                # A failure of one instance is answered; the association goes on.
                LOGGER.exception(
                    "storing SOP instance %s from %s failed",
                    command.affected_sop_instance_uid,
                    info.calling_ae,
                )
                status = Status.HANDLER_FAILED
        else:
            status = Status.UNRECOGNIZED_OPERATION
        conn.send(
            pdu.p_data(context_id, encode_response(command, status), command=True),
            self.limits.pdu_timeout,
        )
