"""Associations: opening them, tuning each one, and the reactor hand-off that fixes the
pynetdicom 3.0.4 ``send_c_store`` race.

This module owns the association layer of :mod:`pacsflow.dicom`; it is the only place that
reaches into pynetdicom's ``Association`` internals.

The race (perf-notes finding 2). An association has a reactor thread that polls the DIMSE
queue and serves incoming requests. Before a caller sends a request it must park the reactor,
or the reactor takes the response off the queue ("Received unexpected C-STORE service
message"), the caller waits out the DIMSE timeout and the association is aborted. pynetdicom
3.0.4 parks it with a ``threading.Event`` and a flag::

    reactor                                 caller (send_c_store)
    _is_paused = True
    _reactor_checkpoint.wait()  <- set() by the previous send
    ... not yet scheduled ...               _reactor_checkpoint.clear()
                                            while not _is_paused: ...   (stale True: go)
                                            send C-STORE-RQ, wait for C-STORE-RSP
    _is_paused = False
    dimse.get_msg()             <- takes the C-STORE-RSP

The fix is per association, never process-wide: :func:`install_gate` replaces that
association's checkpoint with a :class:`DimseGate` (one lock; the reactor holds it while it
looks at the DIMSE queue and serves a request, a caller holds it from ``clear()`` to
``set()``, so the two can never both take messages) and replaces that association's reactor
loop with one that takes the lock. pynetdicom's own ``send_*`` methods keep working unchanged:
the gate speaks ``threading.Event``'s ``clear``/``set``/``wait``/``is_set``. It is installed by
the ``EVT_CONN_OPEN`` handler, which pynetdicom fires on both sides before the reactor loop
starts.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.ae import ApplicationEntity
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext

from pacsflow.config import Node
from pacsflow.dicom.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsflow.dicom.options import NetworkOptions
from pacsflow.dicom.transport import limit_incoming_pdus, node_ssl_context, set_tcp_nodelay
from pacsflow.errors import AssociationRejected

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = [
    "DimseGate",
    "NoAcceptedContexts",
    "RejectedByPeer",
    "application_entity",
    "connection_open_handler",
    "install_gate",
    "open_association",
    "prepare_association",
]

LOGGER = logging.getLogger(__name__)

# pynetdicom binds these to every association; each formats log text for every PDU and
# DIMSE message whatever the log level. Unbinding them per association is the per-instance
# form of ``_config.LOG_HANDLER_LEVEL = "none"`` (perf-notes, "Knobs").
_PER_MESSAGE_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


class RejectedByPeer(AssociationRejected):
    """The peer answered A-ASSOCIATE-RJ (PS3.8 9.3.4) with these result, source and reason."""

    def __init__(self, node: str, result: int, source: int, reason: int, text: str) -> None:
        self.result = result
        self.source = source
        self.reason = reason
        super().__init__(
            f"{node} rejected the association: {text} "
            f"(result {result}, source {source}, reason {reason})"
        )


class NoAcceptedContexts(AssociationRejected):
    """The peer accepted the association but none of the proposed presentation contexts."""


#: an association counts as busy this long after its last DIMSE message
BUSY_WINDOW = 0.1


class Pacer:
    """Chooses the idle sleep of an association's DUL thread and reactor.

    Fast (``busy``) while DIMSE messages flow, slow (``idle``) once the association has been
    quiet for :data:`BUSY_WINDOW`. pynetdicom's DUL reads ``_run_loop_delay`` before every
    idle sleep, so setting it takes effect at once.
    """

    def __init__(self, assoc: Association, busy: float, idle: float) -> None:
        self.assoc = assoc
        self.busy = busy
        self.idle = idle
        self.last_activity = time.monotonic()
        assoc.dul._run_loop_delay = busy

    def touch(self) -> None:
        """A message is about to be sent or was just received: poll fast."""
        self.last_activity = time.monotonic()
        if self.assoc.dul._run_loop_delay != self.busy:
            self.assoc.dul._run_loop_delay = self.busy

    def idle_sleep(self) -> float:
        """The sleep for an idle reactor loop; slows the DUL down too when quiet."""
        quiet = time.monotonic() - self.last_activity > BUSY_WINDOW
        delay = self.idle if quiet else self.busy
        if self.assoc.dul._run_loop_delay != delay:
            self.assoc.dul._run_loop_delay = delay
        return delay


class DimseGate:
    """Who may take messages off an association's DIMSE queue: its reactor or one caller.

    Stands in for ``Association._reactor_checkpoint`` (a ``threading.Event``): ``clear()``
    makes the calling thread the owner of the queue, blocking until the reactor has finished
    what it was doing; ``set()`` hands the queue back. The reactor takes the same lock for each
    look at the queue (:meth:`reactor_turn`), so a response can only reach the thread that
    waits for it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Guards _held_by_caller: set() may come from another thread (abort, kill).
        self._state = threading.Lock()
        self._held_by_caller = False
        self._reactor_thread: int | None = None
        #: set by install_gate; a caller taking the queue means messages are about to flow
        self.pacer: Pacer | None = None

    # --- the threading.Event interface pynetdicom's send_*/release/abort/kill use ---------

    def clear(self) -> None:
        """Take the DIMSE queue for the calling thread (waits for the reactor's turn to end)."""
        if self._reactor_thread == threading.get_ident():
            # A handler running inside the reactor's turn already excludes the reactor.
            return
        with self._state:
            if self._held_by_caller:
                # Event.clear() on a cleared event is a no-op; keep that meaning.
                return
        if self.pacer is not None:
            self.pacer.touch()
        self._lock.acquire()
        with self._state:
            self._held_by_caller = True

    def set(self) -> None:
        """Give the DIMSE queue back to the reactor; a no-op when no caller holds it."""
        with self._state:
            if not self._held_by_caller:
                return
            self._held_by_caller = False
            self._lock.release()

    def is_set(self) -> bool:
        """True when the reactor may run (no caller holds the queue)."""
        return not self._held_by_caller

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no caller holds the queue (``Event.wait`` meaning)."""
        acquired = self._lock.acquire(timeout=-1 if timeout is None else timeout)
        if acquired:
            self._lock.release()
        return acquired

    # --- used by the reactor loop and by pacsflow's own senders -------------------------

    @contextmanager
    def reactor_turn(self) -> Iterator[None]:
        """Held by the reactor while it looks at the DIMSE queue and serves a request."""
        with self._lock:
            self._reactor_thread = threading.get_ident()
            try:
                yield
            finally:
                self._reactor_thread = None

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Own the DIMSE queue for one request and its response(s)."""
        self.clear()
        try:
            yield
        finally:
            self.set()


def _run_gated_reactor(assoc: Association, gate: DimseGate, pacer: Pacer) -> None:
    """pynetdicom's ``Association._run_reactor`` with the DIMSE queue behind ``gate``."""
    # pynetdicom's send_*() spin until _is_paused is True; the gate already parks the
    # reactor before clear() returns, so the flag stays True.
    assoc._is_paused = True
    while not assoc._kill:
        message = None
        with gate.reactor_turn():
            if assoc._kill:
                return
            context_id, message = assoc.dimse.get_msg(block=False)
            if message is not None:
                pacer.touch()
                assoc._serve_request(message, cast(int, context_id))
                # _serve_request sets _is_paused back to False after a service class ran.
                assoc._is_paused = True

            if assoc.is_established and assoc.acse.is_release_requested():
                assoc.acse.send_release(is_response=True)
                LOGGER.debug("association released by the peer")
                assoc.is_released = True
                assoc.is_established = False
                evt.trigger(assoc, evt.EVT_RELEASED, {})
                assoc.kill()
                return

            if assoc.acse.is_aborted():
                LOGGER.debug("association aborted")
                # Lets EVT_ACSE_RECV fire for the A-ABORT, as pynetdicom's reactor does.
                assoc.dul.receive_pdu(wait=False)
                assoc.is_aborted = True
                assoc.is_established = False
                evt.trigger(assoc, evt.EVT_ABORTED, {})
                assoc.kill()
                return

            if not assoc.dul.is_alive():
                assoc.kill()
                return

            idle_timeout = assoc.dul.idle_timer_expired()

        if idle_timeout:
            # Outside the turn: release() takes the gate like any caller.
            LOGGER.warning("network timeout: closing an idle association")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc.release()
            else:
                assoc.abort()
            assoc.kill()
            return

        if message is None:
            time.sleep(pacer.idle_sleep())


def install_gate(
    assoc: Association,
    poll_interval: float,
    idle_poll_interval: float,
    gate: DimseGate | None = None,
) -> DimseGate:
    """Replace one association's reactor checkpoint and loop with the gated ones.

    Must run before the association's reactor loop starts (an ``EVT_CONN_OPEN`` handler does).
    """
    gate = gate if gate is not None else DimseGate()
    pacer = Pacer(assoc, busy=poll_interval, idle=idle_poll_interval)
    gate.pacer = pacer
    assoc._reactor_checkpoint = gate  # type: ignore[assignment]
    assoc._is_paused = True
    assoc._run_reactor = functools.partial(  # type: ignore[method-assign]
        _run_gated_reactor, assoc, gate, pacer
    )
    return gate


def gate_of(assoc: Association) -> DimseGate | None:
    """The association's gate, or None when it runs pynetdicom's own checkpoint."""
    checkpoint = assoc._reactor_checkpoint
    return checkpoint if isinstance(checkpoint, DimseGate) else None


def prepare_association(assoc: Association, options: NetworkOptions) -> None:
    """Tune one association as soon as its socket is connected, before any PDU is read."""
    set_tcp_nodelay(assoc)
    limit_incoming_pdus(assoc, options.max_pdu)
    install_gate(assoc, options.poll_interval, options.idle_poll_interval)
    for event, handler in _PER_MESSAGE_LOG_HANDLERS:
        assoc.unbind(event, handler)


def connection_open_handler(options: NetworkOptions) -> EventHandlerType:
    """The ``(EVT_CONN_OPEN, handler)`` pair that prepares every association of an AE."""

    def on_connection_open(event: evt.Event) -> None:
        prepare_association(event.assoc, options)

    return (evt.EVT_CONN_OPEN, on_connection_open)


def application_entity(options: NetworkOptions) -> ApplicationEntity:
    """A pynetdicom AE with the options' title, PDU size and timeouts."""
    ae = ApplicationEntity(ae_title=options.ae_title)
    ae.maximum_pdu_size = options.max_pdu
    ae.connection_timeout = options.connect_timeout
    ae.acse_timeout = options.acse_timeout
    ae.dimse_timeout = options.dimse_timeout
    ae.network_timeout = options.network_timeout
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae


def _tls_arguments(node: Node, options: NetworkOptions) -> tuple[Any, str] | None:
    if not node.tls.enabled:
        return None
    return (node_ssl_context(node, options), node.host)


def open_association(
    node: Node,
    contexts: Sequence[PresentationContext],
    options: NetworkOptions,
    *,
    evt_handlers: Sequence[EventHandlerType] = (),
    ext_neg: Sequence[Any] = (),
) -> Association:
    """An established association to ``node``, prepared and gated.

    Raises :class:`RejectedByPeer`, :class:`NoAcceptedContexts` or
    :class:`~pacsflow.errors.AssociationRejected` (no connection, no answer, aborted).
    """
    ae = application_entity(options)
    handlers = [connection_open_handler(options), *evt_handlers]
    assoc = ae.associate(
        node.host,
        node.port,
        contexts=list(contexts),
        ae_title=node.ae_title,
        max_pdu=options.max_pdu,
        ext_neg=list(ext_neg) or None,
        tls_args=_tls_arguments(node, options),
        evt_handlers=handlers,
    )
    if assoc.is_established:
        if gate_of(assoc) is None:
            # pynetdicom logs and swallows handler errors; never run ungated.
            assoc.abort()
            raise AssociationRejected(f"association to {node} could not be prepared (see log)")
        return assoc
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        raise RejectedByPeer(
            str(node),
            int(cast(int, answer.result)),
            int(cast(int, answer.result_source)),
            int(cast(int, answer.diagnostic)),
            answer.reason_str,
        )
    if answer is not None and answer.result == 0x00 and not assoc.accepted_contexts:
        raise NoAcceptedContexts(
            f"{node} accepted none of the {len(contexts)} proposed presentation contexts"
        )
    # No A-ASSOCIATE-AC/RJ came: refused or failed connection, A-ABORT, or ACSE timeout.
    raise AssociationRejected(
        f"no association with {node}: connection refused, closed or not answered in time"
    )
