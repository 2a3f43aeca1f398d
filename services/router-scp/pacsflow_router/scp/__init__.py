"""The router's receiving side: a lean DICOM upper layer for C-STORE and C-ECHO.

pynetdicom spends about 1.8 ms of CPU per message in thread hand-offs, per-PDU event
machinery and 1 ms reactor sleeps (perf-notes findings 3 and 6); a router that receives
thousands of small images cannot afford that. Two servers speak just the part of the
protocol a storage SCP needs, behind one interface (``dicom.engine`` picks):

* :class:`~pacsflow.dicom.engine.AsyncStoreServer` (asyncio, the default): every
  association on one event loop per process, no thread hand-offs
* :class:`.server.StoreServer` (lean): one thread per association, blocking sockets

Both use the shared wire code of :mod:`pacsflow.dicom.engine`, re-exported here:

* :mod:`.pdu`     the upper layer PDUs of PS3.8 9.3 (association, data, release, abort)
* :mod:`.dimse`   C-STORE and C-ECHO command sets of PS3.7 9.3 and 9.1.5
* :mod:`.server`  the blocking server: listening, policy, limits, TLS, the association loop

Everything that is not a DICOM wire format (where files go, studies, metrics) stays outside:
the server calls an :class:`~.server.Handler`.
"""

from __future__ import annotations

from pacsflow_router.scp.server import (
    AssociationSlots,
    Handler,
    Limits,
    Rejection,
    StoreRequest,
    StoreServer,
)

__all__ = ["AssociationSlots", "Handler", "Limits", "Rejection", "StoreRequest", "StoreServer"]
