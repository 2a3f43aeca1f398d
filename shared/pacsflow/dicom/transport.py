"""Sockets and TLS: TCP_NODELAY on every association socket, and ``ssl.SSLContext``s.

This module owns the transport layer of :mod:`pacsflow.dicom`: socket options, the length
check on incoming PDUs, and TLS contexts. pynetdicom has no socket
option API and never disables Nagle's algorithm; with delayed ACKs every DIMSE exchange then
stalls about 40 ms (perf-notes finding 1). :func:`set_tcp_nodelay` runs as an
``EVT_CONN_OPEN`` handler, which pynetdicom fires on both sides before the first PDU.

TLS follows DICOM Secure Transport (PS3.15 Annex B.1 and the BCP 195 profile): TLS 1.2 or
newer, the peer's certificate checked against a CA file, and an SCP that may require a
client certificate.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import ssl
import struct
import termios
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pacsflow.config import TlsSettings
from pacsflow.errors import ConfigError

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from pacsflow.config import Node
    from pacsflow.dicom.options import NetworkOptions

__all__ = [
    "MAX_CONTROL_PDU",
    "client_ssl_context",
    "node_ssl_context",
    "limit_incoming_pdus",
    "server_ssl_context",
    "skip_written",
    "set_tcp_nodelay",
    "tcp_nodelay_on",
    "unacknowledged_bytes",
]

LOGGER = logging.getLogger(__name__)

#: largest association-control PDU (A-ASSOCIATE-RQ/AC and the like) read from a peer; 128
#: presentation contexts with every transfer syntax stay well below it
MAX_CONTROL_PDU = 4 * 1024 * 1024
_P_DATA_TF = 0x04
_VALID_PDU_TYPES = frozenset(range(0x01, 0x08))
# A PDU type no peer sends: pynetdicom's state machine answers it with an A-ABORT (PS3.8 9.2).
_UNRECOGNISED_PDU_HEADER = struct.pack(">BBL", 0x00, 0x00, 0)


def tcp_nodelay_on(sock: socket.socket) -> None:
    """Disable Nagle's algorithm on a connected TCP socket (plain or TLS)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def unacknowledged_bytes(sock: socket.socket) -> int | None:
    """Bytes written to a TCP socket that the peer has not acknowledged yet; None if unknown.

    Over a slow line the kernel holds megabytes of a request long after the write returned:
    the DIMSE timeouts use this to tell a request still on its way (progress) from a silent
    peer, so that they bound silence, not the length of a transfer.
    """
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # SIOCOUTQ
    except (OSError, ValueError):
        return None
    return int(struct.unpack("i", raw)[0])


def skip_written(views: list[memoryview], index: int, written: int) -> int:
    """After a gathered write (``sendmsg``, ``writev``) from ``views[index]`` on took
    ``written`` bytes: the index of the first buffer with bytes left, that buffer cut to them.

    A socket with a timeout or a regular file may take less than it was given.
    """
    while written and index < len(views):
        length = len(views[index])
        if written >= length:
            written -= length
            index += 1
        else:
            views[index] = views[index][written:]
            written = 0
    while index < len(views) and not len(views[index]):
        index += 1
    return index


def set_tcp_nodelay(assoc: Association) -> None:
    """Set TCP_NODELAY on the socket of a pynetdicom association that has just connected."""
    association_socket = assoc.dul.socket
    raw = association_socket.socket if association_socket is not None else None
    if raw is None:
        # The connection failed or closed before the handler ran: nothing to tune.
        return
    try:
        tcp_nodelay_on(raw)
    except OSError as err:
        # A socket closed between connect and this call; the association fails on its own.
        LOGGER.debug("could not set TCP_NODELAY: %s", err)


class _PduLengthGuard:
    """Checks each PDU header pynetdicom's DUL reads before it reads the announced length.

    pynetdicom reads whatever length a peer announces (up to 4 GiB) and never compares a
    P-DATA-TF with the maximum length we negotiated (PS3.8 D.1). The DUL reads a PDU as
    ``recv(6)`` (type and length) then ``recv(length)``; a header over the limit is replaced
    by an unrecognised one, so the state machine aborts the association instead.
    """

    def __init__(self, recv: Callable[[int], bytearray], max_pdu: int, peer: str) -> None:
        self.recv = recv
        self.max_pdu = max_pdu
        self.peer = peer
        self.expect_header = True

    def __call__(self, nr_bytes: int) -> bytearray:
        data = self.recv(nr_bytes)
        if not self.expect_header:
            self.expect_header = True
            return data
        if nr_bytes != 6 or len(data) != 6:
            return data
        pdu_type, _reserved, length = struct.unpack(">BBL", data)
        if pdu_type not in _VALID_PDU_TYPES:
            return data  # pynetdicom rejects it without reading a body
        limit = self.max_pdu if pdu_type == _P_DATA_TF else MAX_CONTROL_PDU
        if limit and length > limit:
            LOGGER.warning(
                "%s sent a PDU of type 0x%02X announcing %d bytes, over the limit of %d: aborting",
                self.peer, pdu_type, length, limit,
            )  # fmt: skip
            return bytearray(_UNRECOGNISED_PDU_HEADER)
        self.expect_header = False
        return data


def limit_incoming_pdus(assoc: Association, max_pdu: int) -> None:
    """Abort an association whose peer sends a PDU longer than we negotiated (0: no limit)."""
    association_socket = assoc.dul.socket
    if association_socket is None:
        return
    try:
        host, port = association_socket.socket.getpeername()[:2]  # type: ignore[union-attr]
        peer = f"{host}:{port}"
    except (OSError, AttributeError):
        peer = "the peer"
    # Per connection: the DUL of this association calls the guard instead of recv.
    association_socket.recv = _PduLengthGuard(  # type: ignore[method-assign]
        association_socket.recv, max_pdu, peer
    )


def _existing_file(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"tls: the {what} {path} does not exist")
    return str(path)


def _load_certificate(context: ssl.SSLContext, settings: TlsSettings) -> None:
    cert_file = _existing_file(settings.cert_file, "certificate file")
    key_file = _existing_file(settings.key_file, "key file")
    if cert_file is None:
        if key_file is not None:
            raise ConfigError("tls: key_file is set but cert_file is not")
        return
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"tls: cannot load the certificate {cert_file}: {err}") from err


def _load_ca(context: ssl.SSLContext, settings: TlsSettings) -> None:
    ca_file = _existing_file(settings.ca_file, "CA file")
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
        else:
            # No CA file: trust the system's CAs, as any TLS client would.
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"tls: cannot load the CA file {ca_file}: {err}") from err


def client_ssl_context(settings: TlsSettings) -> ssl.SSLContext:
    """A TLS client context: checks the SCP's certificate and host name, may present ours."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # PROTOCOL_TLS_CLIENT already sets CERT_REQUIRED and check_hostname.
    _load_ca(context, settings)
    _load_certificate(context, settings)
    return context


def server_ssl_context(settings: TlsSettings) -> ssl.SSLContext:
    """A TLS server context for an SCP; requires client certificates when configured to."""
    if settings.cert_file is None:
        raise ConfigError("tls: an SCP needs cert_file (and key_file) to accept TLS")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_certificate(context, settings)
    if settings.require_client_cert:
        if settings.ca_file is None:
            raise ConfigError("tls: require_client_cert needs ca_file to check client certificates")
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, settings)
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def node_ssl_context(node: Node, options: NetworkOptions) -> ssl.SSLContext:
    """The client context for a TLS node: the node says which CA signs the peer; our own
    certificate (for an SCP that requires client certificates) comes from the node's
    settings or else the local ones."""
    settings = node.tls.model_copy(
        update={
            "cert_file": node.tls.cert_file or options.tls.cert_file,
            "key_file": node.tls.key_file or options.tls.key_file,
            "ca_file": node.tls.ca_file or options.tls.ca_file,
        }
    )
    return client_ssl_context(settings)
