"""Association set-up for the asyncio engine, on pynetdicom's PDU classes and negotiation.

Association set-up happens once per association, not per message, so it reuses what
pynetdicom already gets right: ``pynetdicom.pdu.A_ASSOCIATE_RQ/AC`` encode and decode the
PDUs, :func:`pynetdicom.presentation.negotiate_as_acceptor` and ``negotiate_as_requestor``
settle the presentation contexts and SCP/SCU roles. What comes out is plain data the engine
keeps per association: accepted context IDs with their syntaxes and the peer's maximum PDU.
Anything pynetdicom cannot decode is a :class:`~.pdu.PduError`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    PresentationContext,
    negotiate_as_acceptor,
    negotiate_as_requestor,
)
from pydicom.uid import UID

from pacsflow.dicom.engine.pdu import APPLICATION_CONTEXT, PduError

__all__ = [
    "VERIFICATION",
    "Acceptance",
    "Proposal",
    "Request",
    "accept",
    "propose",
    "read_accept",
    "read_request",
]

VERIFICATION = "1.2.840.10008.1.1"
_EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2.2"


@dataclass(slots=True)
class Request:
    """A received A-ASSOCIATE-RQ, decoded by pynetdicom."""

    primitive: Any
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    #: the largest P-DATA-TF the requestor accepts (0: no limit)
    max_pdu: int
    contexts: list[PresentationContext]
    roles: dict[str, tuple[bool | None, bool | None]] = field(default_factory=dict)
    #: the asynchronous operations window proposed (invoked, performed), if one was
    operations: tuple[int, int] | None = None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value or "").strip(" \x00")


def read_request(pdu: bytes) -> Request:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included)."""
    decoded = A_ASSOCIATE_RQ()
    try:
        decoded.decode(pdu)
        primitive = decoded.to_primitive()
        contexts = list(primitive.presentation_context_definition_list)
        max_pdu = 0
        roles: dict[str, tuple[bool | None, bool | None]] = {}
        operations: tuple[int, int] | None = None
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
                roles[str(item.sop_class_uid)] = (item.scu_role, item.scp_role)
            elif isinstance(item, AsynchronousOperationsWindowNegotiation):
                operations = (int(item.maximum_number_operations_invoked or 0),
                              int(item.maximum_number_operations_performed or 0))
        return Request(
            primitive=primitive,
            protocol_version=int(decoded.protocol_version),
            called_ae=_text(primitive.called_ae_title),
            calling_ae=_text(primitive.calling_ae_title),
            application_context=_text(primitive.application_context_name),
            max_pdu=max_pdu,
            contexts=contexts,
            roles=roles,
            operations=operations,
        )
    except PduError:
        raise
    except Exception as err:  # pynetdicom raises whatever its parsers meet
        raise PduError(f"undecodable A-ASSOCIATE-RQ: {err}", reason=6) from err


@dataclass(slots=True)
class Acceptance:
    """The A-ASSOCIATE-AC to send and what it settles."""

    pdu: bytes
    #: accepted context ID -> (abstract syntax, transfer syntax)
    contexts: dict[int, tuple[str, str]]
    #: how many contexts were proposed
    proposed: int


def accept(
    request: Request,
    *,
    accepts_sop_class: Callable[[str], bool],
    transfer_syntaxes: Collection[str],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version: str,
    operations_window: int = 1,
) -> Acceptance:
    """Negotiate ``request``'s contexts as an acceptor and encode the A-ASSOCIATE-AC.

    A requestor that proposes an asynchronous operations window (PS3.7 D.3.3.3) may have up
    to ``operations_window`` requests outstanding (at most what it proposed); this side
    invokes none. At 1 the proposal is not answered, which means one at a time.

    Every abstract syntax the filter takes (and Verification) is supported with the
    requestor's own transfer syntaxes in its order of preference (PS3.8 9.3.2.2), restricted
    to ``transfer_syntaxes``, explicit big endian (retired) last: storescu proposes it before
    implicit little endian, then converts implicit files instead of sending them.
    """
    ours = frozenset(transfer_syntaxes)
    supported: dict[str, list[str]] = {}
    for proposed in request.contexts:
        abstract = str(proposed.abstract_syntax)
        if abstract != VERIFICATION and not accepts_sop_class(abstract):
            continue
        syntaxes = supported.setdefault(abstract, [])
        for syntax in proposed.transfer_syntax:
            if syntax in ours and syntax not in syntaxes:
                syntaxes.append(str(syntax))
    acceptor_contexts = []
    for abstract, syntaxes in supported.items():
        syntaxes.sort(key=lambda ts: ts == _EXPLICIT_BIG_ENDIAN)
        context = PresentationContext()
        context.abstract_syntax = UID(abstract)
        context.transfer_syntax = [UID(ts) for ts in syntaxes]
        # The requestor may keep the SCU role; we never take it ourselves.
        context.scu_role = False
        context.scp_role = True
        acceptor_contexts.append(context)
    results, roles = negotiate_as_acceptor(
        request.contexts, acceptor_contexts, request.roles or None
    )
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT)
    primitive.calling_ae_title = request.primitive.calling_ae_title
    primitive.called_ae_title = request.primitive.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID(implementation_class_uid)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = implementation_version
    primitive.user_information = [maximum, implementation, version, *roles]
    if request.operations is not None and operations_window > 1:
        proposed = request.operations[0]
        window = AsynchronousOperationsWindowNegotiation()
        # 0 proposes no limit: ours applies.
        window.maximum_number_operations_invoked = (
            min(proposed, operations_window) if proposed else operations_window
        )
        window.maximum_number_operations_performed = 1
        primitive.user_information.append(window)
    answer = A_ASSOCIATE_AC()
    answer.from_primitive(primitive)
    accepted = {
        int(context.context_id): (str(context.abstract_syntax), str(context.transfer_syntax[0]))
        for context in results
        if context.result == 0x00
    }
    return Acceptance(bytes(answer.encode()), accepted, len(request.contexts))


# --- requestor ----------------------------------------------------------------------------


@dataclass(slots=True)
class Proposal:
    """An A-ASSOCIATE-RQ to send and the contexts it proposes."""

    pdu: bytes
    contexts: list[PresentationContext]


def propose(
    *,
    called_ae: str,
    calling_ae: str,
    presentations: Sequence[tuple[str, Sequence[str]]],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version: str,
) -> Proposal:
    """An A-ASSOCIATE-RQ proposing one context per (abstract syntax, transfer syntaxes)."""
    if not 0 < len(presentations) <= 128:
        raise ValueError(f"{len(presentations)} presentation contexts: one takes 1 to 128")
    contexts = []
    for index, (abstract, syntaxes) in enumerate(presentations):
        context = PresentationContext()
        context.context_id = 2 * index + 1
        context.abstract_syntax = UID(abstract)
        context.transfer_syntax = [UID(ts) for ts in syntaxes]
        contexts.append(context)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT)
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID(implementation_class_uid)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = implementation_version
    primitive.user_information = [maximum, implementation, version]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return Proposal(bytes(request.encode()), contexts)


def read_accept(pdu: bytes, proposal: Proposal) -> tuple[dict[tuple[str, str], int], int]:
    """(abstract, transfer syntax) -> context ID of the accepted contexts, and the peer's max PDU."""
    decoded = A_ASSOCIATE_AC()
    try:
        decoded.decode(pdu)
        primitive = decoded.to_primitive()
        results = negotiate_as_requestor(
            proposal.contexts, list(primitive.presentation_context_definition_results_list)
        )
        max_pdu = 0
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                max_pdu = int(item.maximum_length_received or 0)
    except Exception as err:  # pynetdicom raises whatever its parsers meet
        raise PduError(f"undecodable A-ASSOCIATE-AC: {err}", reason=6) from err
    accepted = {
        (str(context.abstract_syntax), str(context.transfer_syntax[0])): int(context.context_id)
        for context in results
        if context.result == 0x00 and context.transfer_syntax
    }
    return accepted, max_pdu
