"""DICOM networking for every pacsflow service; the only package that imports pynetdicom.

One module per layer:

* :mod:`~pacsflow.dicom.status`      DIMSE status codes and their categories
* :mod:`~pacsflow.dicom.files`       Part 10 files as bytes (read headers, write received data sets)
* :mod:`~pacsflow.dicom.transport`   TCP_NODELAY and TLS contexts
* :mod:`~pacsflow.dicom.options`     :class:`NetworkOptions` from the configuration
* :mod:`~pacsflow.dicom.association` opening and tuning associations; the reactor hand-off
  that fixes pynetdicom 3.0.4's ``send_c_store`` race
* :mod:`~pacsflow.dicom.scu`         C-ECHO, C-STORE of files (:class:`StoreSession`,
  :func:`send_files`)
* :mod:`~pacsflow.dicom.query`       C-FIND, C-MOVE, C-GET
* :mod:`~pacsflow.dicom.scp`         :class:`StoreSCP` and :class:`ReceivedInstance`
* :mod:`~pacsflow.dicom.engine`      the asyncio C-STORE/C-ECHO engine (SCP and SCU) of the hot
  path, and the one wire module (PDUs, command sets) of every lean DICOM path

Apart from the engine, everything here is blocking; asyncio code calls it through ``asyncio.to_thread``. The
functions and :class:`StoreSCP` may be used from many threads, a :class:`StoreSession` from
one at a time. Errors are :mod:`pacsflow.errors` types: ``AssociationRejected``
(with :class:`RejectedByPeer` and :class:`NoAcceptedContexts`), ``DimseFailure``,
``InvalidDicom`` and ``DicomError``.
"""

from __future__ import annotations

from pacsflow.dicom.association import DimseGate, NoAcceptedContexts, RejectedByPeer
from pacsflow.dicom.files import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PartTenFile,
    read_dataset_header,
    read_part10,
    write_part10,
)
from pacsflow.dicom.options import NetworkOptions
from pacsflow.dicom.query import Level, Model, MoveResult, find, get, move
from pacsflow.dicom.scp import (
    AcceptCallback,
    AssociationInfo,
    ReceivedInstance,
    RejectReason,
    StoreCallback,
    StoreSCP,
)
from pacsflow.dicom.scu import (
    MAX_PRESENTATION_CONTEXTS,
    StoreCategory,
    StoreResult,
    StoreSession,
    echo,
    send_files,
)
from pacsflow.dicom.status import Status, StatusCategory, category, describe, is_ok
from pacsflow.dicom.transport import client_ssl_context, server_ssl_context

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "MAX_PRESENTATION_CONTEXTS",
    "AcceptCallback",
    "AssociationInfo",
    "DimseGate",
    "Level",
    "Model",
    "MoveResult",
    "NetworkOptions",
    "NoAcceptedContexts",
    "PartTenFile",
    "ReceivedInstance",
    "RejectReason",
    "RejectedByPeer",
    "Status",
    "StatusCategory",
    "StoreCallback",
    "StoreCategory",
    "StoreResult",
    "StoreSCP",
    "StoreSession",
    "category",
    "client_ssl_context",
    "describe",
    "echo",
    "find",
    "get",
    "is_ok",
    "move",
    "read_dataset_header",
    "read_part10",
    "send_files",
    "server_ssl_context",
    "write_part10",
]
