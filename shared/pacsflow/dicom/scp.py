"""Storage SCP: receive C-STORE (and answer C-ECHO), hand each instance over as bytes.

This module owns the receiving side of the Storage Service Class (PS3.4 Annex B) and the
association acceptance policy. Each received data set is handed to ``on_store`` as the
encoded bytes the peer sent (no decode, no re-encode), with the UIDs a router needs; writing
it as a Part 10 file only adds a preamble and file meta in front (:mod:`pacsflow.dicom.files`).

Acceptance is decided when the A-ASSOCIATE-RQ arrives (PS3.8 9.3.4 gives the A-ASSOCIATE-RJ
reasons): an address allow-list, a calling-AE allow-list (reason 3), a list of called AE
titles (reason 7; one SCP serves several, which is how the router routes), a maximum number
of associations, then an ``accept`` callback that can reject with any of those reasons.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, cast

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsflow.dicom.association import application_entity, connection_open_handler
from pacsflow.dicom.files import read_dataset_header, scan_identifiers, write_part10
from pacsflow.dicom.options import NetworkOptions
from pacsflow.dicom.status import Status
from pacsflow.dicom.transport import server_ssl_context
from pacsflow.errors import InvalidDicom

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.transport import ThreadedAssociationServer

__all__ = [
    "AcceptCallback",
    "AssociationInfo",
    "ReceivedInstance",
    "RejectReason",
    "StoreCallback",
    "StoreSCP",
    "store_handler",
]

LOGGER = logging.getLogger(__name__)

#: every transfer syntax pydicom knows, compressed ones included: data sets are stored as
#: received, so the SCP never needs to decode them
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(str(uid) for uid in AllTransferSyntaxes)


class RejectReason(StrEnum):
    """Why an association is rejected; each maps to an A-ASSOCIATE-RJ reason (PS3.8 9.3.4)."""

    NO_REASON_GIVEN = "no reason given"
    CALLING_AE_NOT_RECOGNISED = "calling AE title not recognised"
    CALLED_AE_NOT_RECOGNISED = "called AE title not recognised"


# (result, source, reason): rejected-permanent by the service user (PS3.8 Table 9-21).
_REJECT_CODES: dict[str, tuple[int, int, int]] = {
    RejectReason.NO_REASON_GIVEN: (0x01, 0x01, 0x01),
    RejectReason.CALLING_AE_NOT_RECOGNISED: (0x01, 0x01, 0x03),
    RejectReason.CALLED_AE_NOT_RECOGNISED: (0x01, 0x01, 0x07),
}


@dataclass(frozen=True, slots=True)
class AssociationInfo:
    """What is known about an association request when it arrives."""

    calling_ae: str
    called_ae: str
    peer_host: str
    peer_port: int
    tls: bool


@dataclass(eq=False)
class ReceivedInstance:
    """One data set received by C-STORE, as the encoded bytes the peer sent.

    ``calling_ae``/``called_ae`` are the association's: for an SCP, the sender and the title
    it called; for a C-GET, our AE and the peer. ``source_ae`` is always the AE that sent
    the instance.
    """

    calling_ae: str
    called_ae: str
    source_ae: str
    peer_host: str
    peer_port: int
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    transfer_syntax_uid: str
    #: the encoded data set, exactly as received (no file meta)
    dataset: bytes = field(repr=False)
    #: set when the C-STORE is a sub-operation of a C-MOVE (PS3.7 9.1.1.1)
    move_originator_ae: str | None = None

    def write(self, path: str | Path, *, fsync: bool = False) -> Path:
        """Write the instance as a Part 10 file at ``path`` (atomically, bytes unchanged)."""
        return write_part10(
            path,
            self.dataset,
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            transfer_syntax_uid=self.transfer_syntax_uid,
            source_ae_title=self.source_ae,
            fsync=fsync,
        )

    @cached_property
    def header(self) -> Dataset:
        """The data set decoded up to (not including) the pixel data; read on first use."""
        return read_dataset_header(self.dataset, self.transfer_syntax_uid)


StoreCallback = Callable[[ReceivedInstance], int]
AcceptCallback = Callable[[AssociationInfo], "str | None"]


def _title(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return (value or "").strip()


def _received_instance(event: evt.Event) -> ReceivedInstance | int:
    """The instance of a C-STORE event, or the failure status to answer it with."""
    assoc: Association = event.assoc
    request = cast(C_STORE, event.request)
    transfer_syntax = str(event.context.transfer_syntax)
    data = event.encoded_dataset(include_meta=False)
    peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    requested = assoc.requestor.primitive
    calling_ae = _title(requested.calling_ae_title if requested else assoc.requestor.ae_title)
    called_ae = _title(requested.called_ae_title if requested else assoc.acceptor.ae_title)
    source_ae = calling_ae if assoc.is_acceptor else called_ae
    try:
        sop_instance_uid, study_uid, series_uid = scan_identifiers(data, transfer_syntax)
    except InvalidDicom as err:
        LOGGER.warning(
            "refused a C-STORE from %s: the data set cannot be parsed (%s)", source_ae, err.reason
        )
        return Status.CANNOT_UNDERSTAND
    if sop_instance_uid is None:
        LOGGER.warning(
            "refused a C-STORE from %s: the data set has no SOP Instance UID "
            "(request's Affected SOP Instance UID %s)",
            source_ae,
            request.AffectedSOPInstanceUID,
        )
        return Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    if sop_instance_uid != str(request.AffectedSOPInstanceUID):
        # PS3.4 B.2.1.3 leaves this to the SCP; the data set's own UID is what gets stored.
        LOGGER.warning(
            "C-STORE from %s: Affected SOP Instance UID %s differs from the data set's %s",
            source_ae,
            request.AffectedSOPInstanceUID,
            sop_instance_uid,
        )
    originator = request.MoveOriginatorApplicationEntityTitle
    return ReceivedInstance(
        calling_ae=calling_ae,
        called_ae=called_ae,
        source_ae=source_ae,
        peer_host=str(peer.address),
        peer_port=int(peer.port),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        transfer_syntax_uid=transfer_syntax,
        dataset=data,
        move_originator_ae=_title(originator) or None,
    )


def store_handler(on_store: StoreCallback) -> Callable[[evt.Event], int]:
    """An ``EVT_C_STORE`` handler that turns each request into a :class:`ReceivedInstance`.

    An exception in ``on_store`` is logged and answered with 0xC211 (failure); the
    association goes on.
    """

    def handle_store(event: evt.Event) -> int:
        instance = _received_instance(event)
        if isinstance(instance, int):
            return int(instance)
        try:
            status = int(on_store(instance))
        except Exception:
            # Any error in the receiving code is a failed store for this instance only.
            LOGGER.exception(
                "storing SOP instance %s from %s failed",
                instance.sop_instance_uid,
                instance.source_ae,
            )
            return Status.HANDLER_FAILED
        if not 0 <= status <= 0xFFFF:
            LOGGER.error("on_store returned %r, which is not a DIMSE status", status)
            return Status.HANDLER_FAILED
        return status

    return handle_store


def _networks(addresses: Collection[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(address, strict=False) for address in addresses]


class StoreSCP:
    """A C-STORE and C-ECHO SCP on ``host``:``port`` (0: a free port, see :attr:`port`).

    ``on_store`` runs in the association's thread (one per association, so calls for
    different associations overlap) and returns the DIMSE status to answer.

    Association checks, in order (an empty or missing list allows everything):
    ``allowed_addresses`` (IP addresses or networks; reason 1 "no reason given"),
    ``allowed_calling_aes`` (reason 3), ``called_ae_titles`` (reason 7), then ``accept``,
    which returns None to accept, a :class:`RejectReason` for its A-ASSOCIATE-RJ reason, or
    any other text (logged; reason 1). Over ``max_associations`` the association is rejected
    transiently (result 2, source 3, reason 2). ``options.tls`` with ``enabled`` makes it a
    TLS server.
    """

    def __init__(
        self,
        on_store: StoreCallback,
        *,
        ae_title: str = "PACSFLOW",
        host: str = "0.0.0.0",
        port: int = 0,
        options: NetworkOptions | None = None,
        accept: AcceptCallback | None = None,
        called_ae_titles: Collection[str] | None = None,
        allowed_calling_aes: Collection[str] | None = None,
        allowed_addresses: Collection[str] | None = None,
        max_associations: int = 32,
    ) -> None:
        self.on_store = on_store
        self.ae_title = ae_title
        self.host = host
        self.requested_port = port
        self.options = options or NetworkOptions(ae_title=ae_title)
        self.accept = accept
        self.called_ae_titles = (
            frozenset(t.strip() for t in called_ae_titles) if called_ae_titles else None
        )
        self.allowed_calling_aes = (
            frozenset(t.strip() for t in allowed_calling_aes) if allowed_calling_aes else None
        )
        self.allowed_networks = _networks(allowed_addresses) if allowed_addresses else None
        self.max_associations = max_associations
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> StoreSCP:
        """Listen; returns once the socket is bound."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the SCP is already running")
            ae = application_entity(self.options)
            ae.ae_title = self.ae_title
            ae.maximum_associations = self.max_associations
            ae.require_called_aet = False  # the called AE check is ours, with a list
            for context in AllStoragePresentationContexts:
                ae.add_supported_context(
                    str(context.abstract_syntax), list(STORAGE_TRANSFER_SYNTAXES)
                )
            ae.add_supported_context(Verification, list(STORAGE_TRANSFER_SYNTAXES[:4]))
            ssl_context: ssl.SSLContext | None = (
                server_ssl_context(self.options.tls) if self.options.tls.enabled else None
            )
            handlers: list[EventHandlerType] = [
                connection_open_handler(self.options),
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_C_STORE, store_handler(self.on_store)),
            ]
            self._server = ae.start_server(
                (self.host, self.requested_port),
                block=False,
                evt_handlers=handlers,
                ssl_context=ssl_context,
            )
        LOGGER.info("storage SCP %s listening on %s:%d", self.ae_title, self.host, self.port)
        return self

    @property
    def port(self) -> int:
        """The port the SCP listens on (the kernel's pick when created with port 0)."""
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    @property
    def active_associations(self) -> int:
        """How many associations are open right now."""
        server = self._server
        return len(server.active_associations) if server is not None else 0

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening; let open associations finish for ``grace`` seconds, then abort them."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- association policy ----------------------------------------------------------------

    def _rejection(self, info: AssociationInfo) -> str | None:
        if self.allowed_networks is not None:
            try:
                address = ipaddress.ip_address(info.peer_host)
            except ValueError:
                return "peer address is not an IP address"
            if not any(address in network for network in self.allowed_networks):
                return f"address {info.peer_host} is not allowed"
        if self.allowed_calling_aes is not None and info.calling_ae not in self.allowed_calling_aes:
            return RejectReason.CALLING_AE_NOT_RECOGNISED
        if self.called_ae_titles is not None and info.called_ae not in self.called_ae_titles:
            return RejectReason.CALLED_AE_NOT_RECOGNISED
        if self.accept is not None:
            return self.accept(info)
        return None

    def _on_requested(self, event: evt.Event) -> None:
        assoc: Association = event.assoc
        requested = assoc.requestor.primitive
        info = AssociationInfo(
            calling_ae=_title(requested.calling_ae_title if requested else None),
            called_ae=_title(requested.called_ae_title if requested else None),
            peer_host=str(assoc.requestor.address),
            peer_port=int(assoc.requestor.port),
            tls=isinstance(assoc.dul.socket.socket if assoc.dul.socket else None, ssl.SSLSocket),
        )
        try:
            reason = self._rejection(info)
        except Exception:
            # pynetdicom would log this and accept: an association policy must fail closed.
            LOGGER.exception("the accept callback failed; rejecting %s", info)
            reason = RejectReason.NO_REASON_GIVEN
        if reason is None:
            return
        codes = _REJECT_CODES.get(reason, _REJECT_CODES[RejectReason.NO_REASON_GIVEN])
        LOGGER.warning(
            "rejected association from %s@%s:%d calling %s: %s",
            info.calling_ae,
            info.peer_host,
            info.peer_port,
            info.called_ae,
            reason,
        )
        assoc.acse.send_reject(*codes)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        # As pynetdicom's own rejection does: wait until the A-ASSOCIATE-RJ is out.
        assoc.kill()
