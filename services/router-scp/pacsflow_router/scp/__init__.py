"""The router's receiving side: a lean DICOM upper layer for C-STORE and C-ECHO.

pynetdicom spends about 1.8 ms of CPU per message in thread hand-offs, per-PDU event
machinery and 1 ms reactor sleeps (perf-notes findings 3 and 6); a router that receives
thousands of small images cannot afford that. This package speaks just the part of the
protocol a storage SCP needs, on one thread per association with blocking sockets:

* :mod:`.pdu`     the upper layer PDUs of PS3.8 9.3 (association, data, release, abort)
* :mod:`.dimse`   C-STORE and C-ECHO command sets of PS3.7 9.3 and 9.1.5
* :mod:`.server`  listening, association policy, limits (PDU size, associations, idle and
  slow peers), TLS, and the association loop

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
