"""Store sessions: one association to one destination, sending identified files with C-STORE.

Three engines behind one interface (:class:`StoreConnection`):

* :class:`LeanStoreSession` (default) speaks the Upper Layer itself on a plain socket: the
  command set and every data set fragment of a C-STORE go out in one vectored write straight
  from the file's bytes (or a memory map of them), the response is read with ``recv_into``
  on the same thread. No reactor threads, no queues, no per-PDU objects: this is what takes
  a sender from pynetdicom's 0.1-0.25x of DCMTK's rate to DCMTK's own range (perf-notes,
  finding 6). It always sets TCP_NODELAY and sends PDUs as large as the peer accepts.
* :class:`AsyncioStoreSession` runs the asyncio SCU of :mod:`pacsflow.dicom.engine` on an
  event loop of its own, in the calling thread (no hand-off): the same one-write C-STORE,
  with the engine's association set-up on pynetdicom's PDU classes.
* :class:`PynetdicomStoreSession` wraps :class:`pacsflow.dicom.StoreSession` (pynetdicom with
  the shared module's fixes) for peers that need something the lean engine lacks.

A session never raises for a per-file problem: :meth:`send` answers a :class:`SendResult`.
:meth:`open` raises :class:`~pacsflow.errors.AssociationRejected` when no association can be
made. ``transmitted`` in a result tells whether the peer may hold the file even though no
success came back (the whole message left this host, then the answer was lost): only such
files are in doubt when sent again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import ssl
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pacsflow.config import Node
from pacsflow.dicom.transport import node_ssl_context, skip_written, unacknowledged_bytes
from pacsflow.dicom.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsflow.dicom.options import NetworkOptions
from pacsflow.dicom.status import category, describe
from pacsflow.errors import AssociationRejected, InvalidDicom

from pacsflow_uploader import pdu
from pacsflow_uploader.files import IdentifiedFile, load_data_set

if TYPE_CHECKING:
    from pacsflow.dicom.scu import StoreSession

__all__ = [
    "MAX_CONTEXTS",
    "AsyncioStoreSession",
    "Engine",
    "LeanStoreSession",
    "PynetdicomStoreSession",
    "SendCategory",
    "SendResult",
    "StoreConnection",
    "open_session",
]

LOGGER = logging.getLogger(__name__)

#: PS3.8 9.3.2.2: presentation context IDs are the odd numbers 1-255
MAX_CONTEXTS = 128

Engine = Literal["lean", "pynetdicom", "asyncio"]
SendCategory = Literal["success", "warning", "failure", "refused", "error", "invalid"]

# When the peer sets no PDU limit (0), data set fragments of this size go out.
_UNLIMITED_PDU = 1024 * 1024
# sendmsg takes at most IOV_MAX buffers (1024 on Linux).
_MAX_BUFFERS = 512
_PDU_HEADER = struct.Struct(">BBI")
# A sender only ever reads small PDUs (association answers, C-STORE-RSP); a huge length
# means the peer is not speaking DICOM.
_MAX_PDU_READ = 16 * 1024 * 1024
# Requests beyond the first in flight hold at most this many bytes: the window pays for small
# files (one wake-up per several answers); a large image is bound by the wire, and one sent
# ahead of its answer would only be copied through the peer's read buffer.
_IN_FLIGHT_BYTES = 512 * 1024
# What one recv asks for: several C-STORE-RSPs (about 200 bytes each) at once.
_RECEIVE_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class SendResult:
    """What happened to one file at one destination."""

    key: int
    category: SendCategory
    status: int | None = None
    error: str | None = None
    #: from the first byte sent to the response (0 when nothing was sent)
    seconds: float = 0.0
    size: int = 0
    #: the whole request left this host: the peer may have stored it without answering
    transmitted: bool = False
    #: False when the file was not tried at all (no association could be made for it)
    attempted: bool = True

    @property
    def ok(self) -> bool:
        """True when the peer stored the file (success or warning)."""
        return self.category in ("success", "warning")

    def __reduce__(self) -> tuple[type[SendResult], tuple[object, ...]]:
        # One result per file crosses the pipe back from a sender process: pickled as its
        # arguments (as FileJob is), not through the slots dataclass's state hooks.
        return (SendResult, (self.key, self.category, self.status, self.error, self.seconds,
                             self.size, self.transmitted, self.attempted))


class StoreConnection(Protocol):
    """One association for C-STORE (either engine)."""

    node: Node
    presentations: list[tuple[str, str]]

    def open(self) -> None:
        """Associate; raise AssociationRejected when no association can be made."""

    @property
    def is_open(self) -> bool:
        """True while the association can carry requests."""

    def accepts(self, presentation: tuple[str, str]) -> bool:
        """True when the peer accepted this (SOP class, transfer syntax) pair."""

    def still_usable(self) -> bool:
        """True when an idle association was not ended by the peer meanwhile."""

    def send(self, file: IdentifiedFile) -> SendResult:
        """C-STORE one file; never raises for a per-file problem."""

    def send_many(self, files: Sequence[IdentifiedFile]) -> list[SendResult]:
        """C-STORE files in order; one result per file tried. Fewer results than files only
        when the association was lost: the files after the tried ones were not sent."""

    def close(self) -> None:
        """Release the association (abort it when the release is not answered)."""


def _send_each(session: StoreConnection, files: Sequence[IdentifiedFile]) -> list[SendResult]:
    """:meth:`StoreConnection.send_many` one request at a time."""
    results: list[SendResult] = []
    for file in files:
        result = session.send(file)
        results.append(result)
        if result.category == "error" and not session.is_open:
            break
    return results


class _PeerEnded(Exception):
    """The peer aborted, released or closed the connection, or broke the protocol."""


class LeanStoreSession:
    """A C-STORE association on a plain (or TLS) socket, with no threads of its own."""

    def __init__(
        self, node: Node, options: NetworkOptions, presentations: Iterable[tuple[str, str]]
    ) -> None:
        self.node = node
        self.options = options
        self.presentations = list(dict.fromkeys(presentations))
        if not 0 < len(self.presentations) <= MAX_CONTEXTS:
            raise ValueError(
                f"{len(self.presentations)} presentations: an association takes 1 to "
                f"{MAX_CONTEXTS}"
            )
        self._sock: socket.socket | None = None
        self._context_ids: dict[tuple[str, str], int] = {}
        self._send_pdu = 0
        self._message_id = 0
        self._vectored = True
        # Requests that may be outstanding at once (the negotiated asynchronous window).
        self._window = 1
        # Bytes received and not yet read as PDUs: one recv may bring several answers.
        self._received = bytearray()

    # --- association ------------------------------------------------------------------

    def open(self) -> None:
        """Associate; raise AssociationRejected when no association can be made."""
        if self._sock is not None:
            raise RuntimeError("the session is already open")
        try:
            sock = socket.create_connection(
                (self.node.host, self.node.port), timeout=self.options.connect_timeout
            )
        except OSError as err:
            raise AssociationRejected(f"cannot connect to {self.node}: {_reason(err)}") from err
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.node.tls.enabled:
                sock = node_ssl_context(self.node, self.options).wrap_socket(
                    sock, server_hostname=self.node.host
                )
                # SSLSocket has no sendmsg: buffers are written one by one.
                self._vectored = False
            sock.settimeout(self.options.acse_timeout)
            self._sock = sock
            self._associate()
        except (OSError, ValueError, _PeerEnded) as err:
            self._drop()
            raise AssociationRejected(f"no association with {self.node}: {_reason(err)}") from err
        except AssociationRejected:
            self._drop()
            raise
        assert self._sock is not None
        self._sock.settimeout(self.options.dimse_timeout)

    def _associate(self) -> None:
        contexts = [
            pdu.ProposedContext(2 * index + 1, sop_class, syntax)
            for index, (sop_class, syntax) in enumerate(self.presentations)
        ]
        self._write(
            [
                pdu.associate_rq(
                    self.node.ae_title,
                    self.options.ae_title,
                    contexts,
                    self.options.max_pdu,
                    IMPLEMENTATION_CLASS_UID,
                    IMPLEMENTATION_VERSION_NAME,
                    self.node.operations_window,
                )
            ]
        )
        pdu_type, body = self._read_pdu()
        if pdu_type == pdu.A_ASSOCIATE_RJ:
            raise AssociationRejected(f"{self.node} {pdu.reject_text(pdu.parse_associate_rj(body))}")
        if pdu_type == pdu.A_ABORT:
            raise AssociationRejected(f"{self.node} aborted the association request")
        if pdu_type != pdu.A_ASSOCIATE_AC:
            raise _PeerEnded(f"answered the association request with PDU type {pdu_type}")
        accept = pdu.parse_associate_ac(body)
        by_id = {context.context_id: context for context in contexts}
        self._context_ids = {}
        for context_id, syntax in accept.accepted.items():
            proposed = by_id.get(context_id)
            # One syntax per proposed context: the peer can only accept that one.
            if proposed is not None and syntax == proposed.transfer_syntax:
                self._context_ids[(proposed.abstract_syntax, syntax)] = context_id
        self._send_pdu = accept.max_pdu if accept.max_pdu else _UNLIMITED_PDU
        # The smallest sensible PDU (PS3.8 D.1.1 leaves it open; DCMTK accepts 4096 up).
        self._send_pdu = max(self._send_pdu, 1024)
        # 0 from the peer: no limit of its own, ours holds.
        wanted = self.node.operations_window
        self._window = min(accept.operations_window or wanted, wanted)
        LOGGER.debug(
            "associated with %s: %d of %d contexts accepted, PDU %d, %d outstanding",
            self.node, len(self._context_ids), len(contexts), self._send_pdu, self._window,
        )  # fmt: skip

    @property
    def is_open(self) -> bool:
        """True while the association can carry requests."""
        return self._sock is not None

    @property
    def operations_window(self) -> int:
        """Requests this association may have outstanding (1 unless the peer granted more)."""
        return self._window

    def accepts(self, presentation: tuple[str, str]) -> bool:
        """True when the peer accepted this (SOP class, transfer syntax) pair."""
        return presentation in self._context_ids

    def still_usable(self) -> bool:
        """True when the peer has not ended the idle association (nothing waits to be read)."""
        if self._sock is None:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            readable = [self._sock]
        if readable or self._received:
            # Between requests a peer only sends A-RELEASE-RQ, A-ABORT or a close.
            self._abort()
            return False
        return True

    def close(self) -> None:
        """Release the association (abort it when the release is not answered)."""
        if self._sock is None:
            return
        try:
            self._sock.settimeout(self.options.acse_timeout)
            self._write([pdu.release_pdu()])
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type == pdu.A_RELEASE_RP:
                    break
                if pdu_type == pdu.A_RELEASE_RQ:
                    # Release collision (PS3.8 9.2.8): the requestor answers first.
                    self._write([pdu.release_pdu(response=True)])
                elif pdu_type == pdu.A_ABORT:
                    break
        except (OSError, _PeerEnded):
            pass
        self._drop()

    def _abort(self) -> None:
        if self._sock is None:
            return
        try:
            self._sock.settimeout(1.0)
            self._write([pdu.abort_pdu()])
        except OSError:
            pass
        self._drop()

    def _drop(self) -> None:
        self._received.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # --- C-STORE --------------------------------------------------------------------

    def send(self, file: IdentifiedFile) -> SendResult:
        """C-STORE one file's encoded data set; never raises for a per-file problem."""
        sent = self._request(file)
        if isinstance(sent, SendResult):
            return sent
        message_id, started = sent
        try:
            self._await_answer()
            response = self._read_response()
        except (OSError, _PeerEnded, ValueError) as err:
            self._abort()
            return self._lost(file, started, err)
        if response.message_id_responded != message_id:
            return self._unexpected(file, started)
        return self._answered(file, response, started)

    def send_many(self, files: Sequence[IdentifiedFile]) -> list[SendResult]:
        """C-STORE files in order with up to the negotiated window of requests outstanding
        (and :data:`_IN_FLIGHT_BYTES` beyond the first); one result per file tried, in the
        order the answers came. Fewer results than files only when the association was lost:
        the files after the tried ones were not sent."""
        if self._window <= 1:
            return _send_each(self, files)
        results: list[SendResult] = []
        # message ID -> (file, when its request began), in the order sent
        outstanding: dict[int, tuple[IdentifiedFile, float]] = {}
        in_flight = 0
        for file in files:
            while outstanding and self._sock is not None and (
                len(outstanding) >= self._window or in_flight + file.size > _IN_FLIGHT_BYTES
            ):
                self._collect(outstanding, results)
                in_flight = sum(f.size for f, _ in outstanding.values())
            if self._sock is None:
                break
            sent = self._request(file)
            if isinstance(sent, SendResult):
                results.append(sent)
                if self._sock is None:  # the request could not be written: lost
                    results += [self._lost(f, t, None) for f, t in outstanding.values()]
                    outstanding.clear()
                    break
                continue
            outstanding[sent[0]] = (file, sent[1])
            in_flight += file.size
        while outstanding and self._sock is not None:
            self._collect(outstanding, results)
        return results

    def _collect(self, outstanding: dict[int, tuple[IdentifiedFile, float]],
                 results: list[SendResult]) -> None:  # fmt: skip
        """Read one answer; when the association is lost, every outstanding file's result."""
        try:
            self._await_answer()
            response = self._read_response()
        except (OSError, _PeerEnded, ValueError) as err:
            self._abort()
            results += [self._lost(f, t, err) for f, t in outstanding.values()]
            outstanding.clear()
            return
        entry = outstanding.pop(response.message_id_responded, None)
        if entry is None:
            results += [self._unexpected(f, t) for f, t in outstanding.values()]
            outstanding.clear()
            return
        results.append(self._answered(entry[0], response, entry[1]))
        if self._sock is None:  # that answer was no C-STORE-RSP: aborted
            results += [self._lost(f, t, None) for f, t in outstanding.values()]
            outstanding.clear()

    def _request(self, file: IdentifiedFile) -> SendResult | tuple[int, float]:
        """Write one C-STORE-RQ: its message ID and start time, or the result when it could
        not be sent (nothing accepted for it, an unreadable file, a lost association)."""
        key = file.job.key
        if self._sock is None:
            return SendResult(
                key, "error", error=f"no association with {self.node}", attempted=False
            )
        context_id = self._context_ids.get(file.presentation)
        if context_id is None:
            return SendResult(
                key, "refused", size=file.size,
                error=f"{self.node} accepted no presentation context for SOP class "
                f"{file.sop_class_uid} in transfer syntax {file.transfer_syntax_uid}",
            )  # fmt: skip
        self._message_id = self._message_id % 0xFFFF + 1
        message_id = self._message_id
        command = pdu.c_store_rq(message_id, file.sop_class_uid, file.sop_instance_uid)
        started = time.perf_counter()
        try:
            with load_data_set(file) as data:
                buffers = pdu.data_pdus(context_id, command, data, self._send_pdu)
                try:
                    self._write(buffers)
                finally:
                    buffers.clear()
        except InvalidDicom as err:
            return SendResult(key, "invalid", error=err.reason, size=file.size)
        except OSError as err:
            # The request did not leave completely: the peer cannot have stored it.
            self._abort()
            return SendResult(
                key, "error", size=file.size, seconds=time.perf_counter() - started,
                error=f"association with {self.node} lost while sending: {_reason(err)}",
            )  # fmt: skip
        return message_id, started

    def _lost(self, file: IdentifiedFile, started: float, err: BaseException | None) -> SendResult:
        # The whole request left: the peer may have stored it (in doubt).
        reason = _reason(err) if err is not None else "the association was lost"
        return SendResult(
            file.job.key, "error", size=file.size, seconds=time.perf_counter() - started,
            transmitted=True, error=f"no C-STORE response from {self.node}: {reason}",
        )  # fmt: skip

    def _unexpected(self, file: IdentifiedFile, started: float) -> SendResult:
        self._abort()
        return SendResult(
            file.job.key, "error", size=file.size, seconds=time.perf_counter() - started,
            transmitted=True,
            error=f"{self.node} answered with an unexpected message; association aborted",
        )  # fmt: skip

    def _answered(self, file: IdentifiedFile, response: pdu.StoreResponse,
                  started: float) -> SendResult:  # fmt: skip
        key = file.job.key
        seconds = time.perf_counter() - started
        if response.command_field != pdu.C_STORE_RSP or response.status is None:
            return self._unexpected(file, started)
        status = response.status
        peer_category = category(status)
        if peer_category == "success":
            return SendResult(key, "success", status, None, seconds, file.size, True)
        text = f"{self.node} answered {describe(status)}"
        if response.error_comment:
            text += f": {response.error_comment}"
        if peer_category == "warning":
            return SendResult(key, "warning", status, text, seconds, file.size, True)
        # Pending and cancel are no valid final C-STORE status either (PS3.4 B.2.3).
        return SendResult(key, "failure", status, text, seconds, file.size, True)

    def _await_answer(self) -> None:
        """Wait for the answer to begin; ``dimse_timeout`` bounds silence, not the transfer.

        Over a slow line the kernel holds megabytes of the request after the write returned:
        while the peer keeps acknowledging its bytes, waiting goes on. The peer's last bytes
        may arrive at the very end of a wait, and it needs time to store them before it can
        answer: after a wait that ended with everything acknowledged comes one more.
        """
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        if self._received:
            return  # an answer (or its beginning) came with the previous one
        timeout = self.options.dimse_timeout
        waiting = unacknowledged_bytes(sock)
        while not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            readable, _, _ = select.select([sock], [], [], timeout)
            if readable:
                return
            left = unacknowledged_bytes(sock)
            # Silent for a whole wait: all was acknowledged before it began, or no progress.
            if not waiting or left is None or left >= waiting:
                raise TimeoutError("timed out")
            waiting = left

    def _read_response(self) -> pdu.StoreResponse:
        command = bytearray()
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == pdu.P_DATA_TF:
                for _context_id, control, fragment in pdu.pdv_items(body):
                    if not pdu.is_command(control):
                        raise _PeerEnded("a data set came where a C-STORE-RSP was expected")
                    command += fragment
                    if pdu.is_last(control):
                        return pdu.parse_command(bytes(command))
            elif pdu_type == pdu.A_RELEASE_RQ:
                self._write([pdu.release_pdu(response=True)])
                self._drop()
                raise _PeerEnded("the peer released the association")
            elif pdu_type == pdu.A_ABORT:
                self._drop()
                raise _PeerEnded("the peer aborted the association")
            else:
                raise _PeerEnded(f"unexpected PDU type {pdu_type}")

    # --- socket -----------------------------------------------------------------------

    def _write(self, buffers: list[bytes | memoryview]) -> None:
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        if not self._vectored:
            for buffer in buffers:
                sock.sendall(buffer)
            return
        views = [memoryview(buffer) for buffer in buffers]
        index = 0
        while index < len(views):
            sent = sock.sendmsg(views[index : index + _MAX_BUFFERS])
            # A partial write (the socket has a timeout, so it is non-blocking inside):
            # go on from what is left.
            index = skip_written(views, index, sent)

    def _receive(self, size: int) -> None:
        """Have at least ``size`` bytes received; what else has arrived is kept too."""
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        while len(self._received) < size:
            chunk = sock.recv(max(size - len(self._received), _RECEIVE_SIZE))
            if not chunk:
                raise _PeerEnded("the peer closed the connection")
            self._received += chunk

    def _read_pdu(self) -> tuple[int, bytes]:
        self._receive(6)
        pdu_type, _reserved, length = _PDU_HEADER.unpack_from(self._received)
        if pdu_type not in range(1, 8):
            raise _PeerEnded(f"not a DICOM PDU (type {pdu_type})")
        if length > _MAX_PDU_READ:
            raise _PeerEnded(f"a PDU of {length} bytes: not a DICOM peer")
        self._receive(6 + length)
        body = bytes(self._received[6 : 6 + length])
        del self._received[: 6 + length]
        return pdu_type, body


class AsyncioStoreSession:
    """The engine's :class:`~pacsflow.dicom.engine.scu.AsyncStoreSession` behind StoreConnection."""

    def __init__(
        self, node: Node, options: NetworkOptions, presentations: Iterable[tuple[str, str]]
    ) -> None:
        from pacsflow.dicom.engine.scu import AsyncStoreSession

        self.node = node
        self.presentations = list(dict.fromkeys(presentations))
        if not 0 < len(self.presentations) <= MAX_CONTEXTS:
            raise ValueError(
                f"{len(self.presentations)} presentations: an association takes 1 to "
                f"{MAX_CONTEXTS}"
            )
        self._session = AsyncStoreSession(node, options, self.presentations)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _run(self, work: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(work)

    def _close_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()

    def open(self) -> None:
        """Associate; raise AssociationRejected when no association can be made."""
        try:
            self._run(self._session.open())
        except BaseException:
            self._close_loop()
            raise

    @property
    def is_open(self) -> bool:
        """True while the association can carry requests."""
        return self._session.is_open

    def accepts(self, presentation: tuple[str, str]) -> bool:
        """True when the peer accepted this (SOP class, transfer syntax) pair."""
        return self._session.accepts(presentation)

    def still_usable(self) -> bool:
        """True when the peer has not ended the idle association meanwhile."""
        return self._session.still_usable()

    def send(self, file: IdentifiedFile) -> SendResult:
        """C-STORE one file's encoded data set; never raises for a per-file problem."""
        key = file.job.key
        if not self._session.is_open:
            return SendResult(
                key, "error", error=f"no association with {self.node}", attempted=False
            )
        if not self._session.accepts(file.presentation):
            return SendResult(
                key, "refused", size=file.size,
                error=f"{self.node} accepted no presentation context for SOP class "
                f"{file.sop_class_uid} in transfer syntax {file.transfer_syntax_uid}",
            )  # fmt: skip
        started = time.perf_counter()
        try:
            with load_data_set(file) as data:
                outcome = self._run(
                    self._session.store(file.presentation, file.sop_instance_uid, data)
                )
        except InvalidDicom as err:
            return SendResult(key, "invalid", error=err.reason, size=file.size)
        return SendResult(
            key, outcome.category, outcome.status, outcome.error,
            time.perf_counter() - started, file.size, outcome.transmitted,
        )  # fmt: skip

    def send_many(self, files: Sequence[IdentifiedFile]) -> list[SendResult]:
        """C-STORE files in order, one request at a time."""
        return _send_each(self, files)

    def close(self) -> None:
        """Release the association (abort it when the release is not answered)."""
        if self._loop is not None:
            self._run(self._session.close())
        self._close_loop()


class PynetdicomStoreSession:
    """:class:`pacsflow.dicom.StoreSession` behind the :class:`StoreConnection` interface."""

    def __init__(
        self, node: Node, options: NetworkOptions, presentations: Iterable[tuple[str, str]]
    ) -> None:
        from pacsflow.dicom.scu import StoreSession

        self.node = node
        self.presentations = list(dict.fromkeys(presentations))
        self._session: StoreSession = StoreSession(node, options, self.presentations)
        self._none_accepted = False

    def open(self) -> None:
        """Associate; raise AssociationRejected when no association can be made."""
        from pacsflow.dicom import NoAcceptedContexts

        try:
            self._session.open()
        except NoAcceptedContexts:
            # Every file of these presentations is refused; that is an answer, not a failure.
            self._none_accepted = True

    @property
    def is_open(self) -> bool:
        """True while the association can carry requests."""
        return self._none_accepted or self._session.is_open

    def accepts(self, presentation: tuple[str, str]) -> bool:
        """True when the peer accepted this (SOP class, transfer syntax) pair."""
        return not self._none_accepted and self._session.accepts(presentation)

    def still_usable(self) -> bool:
        """True while pynetdicom still holds the association established."""
        return self.is_open

    def send(self, file: IdentifiedFile) -> SendResult:
        """C-STORE one file through pynetdicom."""
        from pacsflow.dicom import PartTenFile

        key = file.job.key
        if not self.accepts(file.presentation):
            return SendResult(
                key, "refused", size=file.size,
                error=f"{self.node} accepted no presentation context for SOP class "
                f"{file.sop_class_uid} in transfer syntax {file.transfer_syntax_uid}",
            )  # fmt: skip
        part10 = PartTenFile(
            path=Path(file.job.path),
            size=file.size,
            sop_class_uid=file.sop_class_uid,
            sop_instance_uid=file.sop_instance_uid,
            study_instance_uid=None,
            series_instance_uid=None,
            transfer_syntax_uid=file.transfer_syntax_uid,
            dataset_offset=file.dataset_offset,
        )
        started = time.perf_counter()
        result = self._session.send(part10)
        seconds = time.perf_counter() - started
        return SendResult(
            key,
            result.category,
            result.status,
            result.error,
            seconds,
            file.size,
            # pynetdicom does not say how far the request got: after an error it is in doubt.
            transmitted=result.category != "invalid",
        )

    def send_many(self, files: Sequence[IdentifiedFile]) -> list[SendResult]:
        """C-STORE files in order, one request at a time."""
        return _send_each(self, files)

    def close(self) -> None:
        """Release the association."""
        self._session.close()


def open_session(
    engine: Engine,
    node: Node,
    options: NetworkOptions,
    presentations: Sequence[tuple[str, str]],
) -> StoreConnection:
    """An open store session of ``engine``; raise AssociationRejected when refused."""
    session: StoreConnection
    if engine == "lean":
        session = LeanStoreSession(node, options, presentations)
    elif engine == "asyncio":
        session = AsyncioStoreSession(node, options, presentations)
    else:
        session = PynetdicomStoreSession(node, options, presentations)
    session.open()
    return session


def _reason(err: BaseException) -> str:
    if isinstance(err, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(err, ssl.SSLError):
        # Its errno is an OpenSSL error code (8: SSL_ERROR_EOF), not an errno.
        return f"TLS: {err.reason or err.strerror or type(err).__name__}".lower()
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno).lower()
    return str(err) or type(err).__name__
