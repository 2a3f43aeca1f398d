"""The wire format of the uploader's C-STORE path: the shared :mod:`pacsflow.dicom.engine` modules.

Only what a Storage SCU needs (PS3.8 Section 9.3, PS3.7 Section 9.3.1 and Annex E), under
the names the uploader uses: a requestor's :class:`ProposedContext` carries one transfer
syntax, and :func:`parse_command` reads a response.
"""

from __future__ import annotations

from pacsflow.dicom.engine.dimse import C_STORE_RQ, C_STORE_RSP, StoreResponse, c_store_rq
from pacsflow.dicom.engine.dimse import parse_response as parse_command
from pacsflow.dicom.engine.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    APPLICATION_CONTEXT,
    P_DATA_TF,
    AssociateAccept,
    AssociateReject,
    abort_pdu,
    associate_rq,
    data_pdus,
    is_command,
    is_last,
    parse_associate_ac,
    parse_associate_rj,
    pdv_items,
    reject_text,
    release_pdu,
)
from pacsflow.dicom.engine.pdu import OfferedContext as ProposedContext

__all__ = [
    "APPLICATION_CONTEXT",
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "C_STORE_RQ",
    "C_STORE_RSP",
    "P_DATA_TF",
    "AssociateAccept",
    "AssociateReject",
    "ProposedContext",
    "StoreResponse",
    "abort_pdu",
    "associate_rq",
    "c_store_rq",
    "data_pdus",
    "is_command",
    "is_last",
    "parse_associate_ac",
    "parse_associate_rj",
    "parse_command",
    "pdv_items",
    "reject_text",
    "release_pdu",
]
