"""Query/Retrieve SCU: C-FIND, C-MOVE and C-GET (PS3.4 Annex C).

This module owns the query/retrieve side of :mod:`pacsflow.dicom`. Each call opens one
association, runs one request and releases it. Peer statuses are read through
:mod:`pacsflow.dicom.status`: C-FIND raises :class:`~pacsflow.errors.DimseFailure` on a
failure; C-MOVE and C-GET return a :class:`MoveResult` for every final status (a failed move
still reports how many sub-operations completed), and raise only when no final response
came.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import StoragePresentationContexts, evt
from pynetdicom.presentation import build_context, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacsflow.config import Node
from pacsflow.dicom.association import open_association
from pacsflow.dicom.options import NetworkOptions
from pacsflow.dicom.scp import StoreCallback, store_handler
from pacsflow.dicom.scu import MAX_PRESENTATION_CONTEXTS
from pacsflow.dicom.status import StatusCategory, category, describe
from pacsflow.errors import DicomError, DimseFailure

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = ["GET_TRANSFER_SYNTAXES", "Level", "Model", "MoveResult", "find", "get", "move"]

LOGGER = logging.getLogger(__name__)

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
Model = Literal["study", "patient"]

_FIND = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}
_MOVE = {
    "study": StudyRootQueryRetrieveInformationModelMove,
    "patient": PatientRootQueryRetrieveInformationModelMove,
}
_GET = {
    "study": StudyRootQueryRetrieveInformationModelGet,
    "patient": PatientRootQueryRetrieveInformationModelGet,
}

#: what a C-GET offers to receive in: the uncompressed syntaxes and the common compressed
#: ones, so the peer can send what it stores without transcoding
GET_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    str(uid)
    for uid in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLosslessSV1,
        JPEGLossless,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        RLELossless,
    )
)


@dataclass(frozen=True, slots=True)
class MoveResult:
    """The final answer to a C-MOVE or C-GET (PS3.4 C.4.2.1.5, C.4.3.1.5)."""

    status: int
    completed: int
    failed: int
    warning: int
    failed_sop_instance_uids: tuple[str, ...] = ()

    @property
    def category(self) -> StatusCategory:
        return category(self.status)

    @property
    def ok(self) -> bool:
        """True when every sub-operation succeeded."""
        return self.category == "success" and self.failed == 0


def _identifier(level: str, query: Mapping[str, Any]) -> Dataset:
    level = level.upper()
    if level not in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
        raise ValueError(f"query level {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in query.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword")
        # An empty value asks the peer to return the attribute (PS3.4 C.2.2.1.3).
        setattr(identifier, keyword, "" if value is None else value)
    return identifier


def _end(assoc: Association) -> None:
    """Release the association; only tidy up when the peer or the network already ended it.

    Releasing an association whose connection is gone would wait the whole ACSE timeout for
    an A-RELEASE-RP that cannot come (the reactor has not seen the abort yet when a request
    returns).
    """
    if assoc.acse.is_aborted() or not assoc.dul.is_alive():
        assoc.kill()
    elif assoc.is_established:
        assoc.release()


def _model(table: Mapping[str, str], model: str) -> str:
    try:
        return table[model]
    except KeyError:
        raise ValueError(f"query model {model!r} is not 'study' or 'patient'") from None


def find(
    node: Node,
    level: str,
    query: Mapping[str, Any],
    options: NetworkOptions,
    model: Model = "study",
) -> list[Dataset]:
    """C-FIND ``query`` (keyword to value; None or "" to return a key) at ``level``.

    Returns the matches. Raises :class:`~pacsflow.errors.DimseFailure` on a failure or cancel
    status, :class:`~pacsflow.errors.DicomError` when no final response came.
    """
    model_uid = _model(_FIND, model)
    identifier = _identifier(level, query)
    assoc = open_association(node, [build_context(model_uid)], options)
    matches: list[Dataset] = []
    try:
        for status, match in assoc.send_c_find(identifier, model_uid):
            if "Status" not in status:
                raise DicomError(f"no C-FIND response from {node} (timeout or abort)")
            code = int(status.Status)
            status_category = category(code)
            if status_category == "pending":
                if match is not None:
                    matches.append(match)
                continue
            if status_category in ("success", "warning"):
                return matches
            comment = status.get("ErrorComment", "")
            raise DimseFailure(
                code, f"{node} answered C-FIND with {describe(code)} {comment}".strip()
            )
        raise DicomError(f"C-FIND to {node} ended without a final status")
    finally:
        _end(assoc)


def _failed_uids(identifier: Dataset | None) -> tuple[str, ...]:
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return ()
    value = identifier.FailedSOPInstanceUIDList
    if isinstance(value, str):
        return tuple(uid for uid in value.split("\\") if uid)
    return tuple(str(uid) for uid in value if uid)


def _count(status: Dataset, keyword: str, fallback: int) -> int:
    value = status.get(keyword)
    return int(value) if value is not None else fallback


def _final_result(
    responses: Iterator[tuple[Dataset, Dataset | None]], node: Node, operation: str
) -> MoveResult:
    # Final responses may omit the counts (PS3.4 C.4.2.3.1): fall back to the last pending.
    completed = failed = warning = 0
    for status, identifier in responses:
        if "Status" not in status:
            raise DicomError(f"no {operation} response from {node} (timeout or abort)")
        code = int(status.Status)
        completed = _count(status, "NumberOfCompletedSuboperations", completed)
        failed = _count(status, "NumberOfFailedSuboperations", failed)
        warning = _count(status, "NumberOfWarningSuboperations", warning)
        if category(code) == "pending":
            continue
        if category(code) != "success":
            LOGGER.warning("%s from %s ended with %s", operation, node, describe(code))
        return MoveResult(code, completed, failed, warning, _failed_uids(identifier))
    raise DicomError(f"{operation} to {node} ended without a final status")


def move(
    node: Node,
    destination_ae: str,
    level: str,
    query: Mapping[str, Any],
    options: NetworkOptions,
    model: Model = "study",
) -> MoveResult:
    """C-MOVE what ``query`` matches at ``node`` to the AE titled ``destination_ae``."""
    model_uid = _model(_MOVE, model)
    identifier = _identifier(level, query)
    assoc = open_association(node, [build_context(model_uid)], options)
    try:
        return _final_result(
            assoc.send_c_move(identifier, destination_ae, model_uid), node, "C-MOVE"
        )
    finally:
        _end(assoc)


def get(
    node: Node,
    level: str,
    query: Mapping[str, Any],
    options: NetworkOptions,
    on_instance: StoreCallback,
    model: Model = "study",
    storage_classes: Sequence[str] | None = None,
) -> MoveResult:
    """C-GET what ``query`` matches; each instance reaches ``on_instance`` as the SCP's do.

    ``storage_classes`` are the SOP classes we offer to receive (SCP role, PS3.7 D.3.3.4);
    by default pynetdicom's 120 most common storage classes, which with the query model fill
    the 128 presentation contexts of one association.
    """
    model_uid = _model(_GET, model)
    identifier = _identifier(level, query)
    classes = list(
        dict.fromkeys(
            storage_classes or [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
        )
    )
    if len(classes) + 1 > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(
            f"at most {MAX_PRESENTATION_CONTEXTS - 1} storage classes fit one C-GET association"
        )
    contexts = [build_context(model_uid)] + [
        build_context(uid, list(GET_TRANSFER_SYNTAXES)) for uid in classes
    ]
    roles = [build_role(uid, scp_role=True) for uid in classes]
    assoc = open_association(
        node,
        contexts,
        options,
        evt_handlers=[(evt.EVT_C_STORE, store_handler(on_instance))],
        ext_neg=roles,
    )
    try:
        return _final_result(assoc.send_c_get(identifier, model_uid), node, "C-GET")
    finally:
        _end(assoc)
