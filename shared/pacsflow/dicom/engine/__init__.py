"""The asyncio DICOM engine for the hot path: C-STORE and C-ECHO, as SCP and as SCU.

pynetdicom spends its time in 1 ms idle sleeps in its reactors, three threads per
association, 4 KiB reads with extra copies and a Dataset built per message. This engine
keeps pynetdicom for what is not the hot path (association PDUs and presentation-context
negotiation, :mod:`.acse`) and does P-DATA itself:

* :mod:`.pdu`    the upper layer PDUs (PS3.8 9.3), shared by every lean DICOM path in
  pacsflow (the router's blocking server, the uploader's and the harvester's sockets)
* :mod:`.dimse`  C-STORE and C-ECHO command sets with pre-encoded parts (PS3.7 9.3, E.1)
* :mod:`.acse`   A-ASSOCIATE on pynetdicom's PDU classes and negotiation
* :mod:`.scp`    :class:`AsyncStoreServer`, an ``asyncio.BufferedProtocol`` per association
* :mod:`.scu`    :class:`AsyncStoreSession`, C-ECHO and C-STORE of files from one event loop

C-FIND, C-MOVE and C-GET stay with pynetdicom (:mod:`pacsflow.dicom.query`).
"""

from __future__ import annotations

from pacsflow.dicom.engine.pdu import PduError
from pacsflow.dicom.engine.scp import (
    AssociationSlots,
    AsyncStoreServer,
    Handler,
    Limits,
    Rejection,
    StoreRequest,
    listen_socket,
)

__all__ = [
    "AssociationSlots",
    "AsyncStoreServer",
    "Handler",
    "Limits",
    "PduError",
    "Rejection",
    "StoreRequest",
    "listen_socket",
]
