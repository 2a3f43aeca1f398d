"""Receiving one instance: route by called AE title, file it, answer.

:class:`RouterHandler` is what the SCP server calls, in the association's thread. For each
C-STORE it reads the routing values from the header bytes (:mod:`.header`), builds the
sanitised path (:mod:`.paths`), writes the bytes as received into a temporary file in the
target folder and renames it into place, and only then answers success: an acknowledged
instance is on disk. The same SOP instance received again replaces its file (one file per
SOP Instance UID, never a duplicate). Nothing here waits on the state store or the bus;
what happened is appended to the :class:`~.collector.Collector`.

Failures are answered, logged and counted; the association goes on (PS3.4 B.2.3):

============================  ======  ===========
cause                         status  reason label
============================  ======  ===========
disk or quota full            0xA700  disk-full
data set over the size limit  0xA700  too-large
permission, read-only         0xC211  permission
other I/O errors              0xC211  io-error
header cannot be read         0xC000  invalid
============================  ======  ===========
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Collection

from pacsflow.dicom.files import write_part10
from pacsflow.dicom.scp import STORAGE_TRANSFER_SYNTAXES, AssociationInfo
from pacsflow.dicom.status import Status
from pacsflow.errors import InvalidDicom
from pydicom._uid_dict import UID_dictionary

from pacsflow_router.collector import Collector, Stored
from pacsflow_router.header import scan_header
from pacsflow_router.paths import instance_parts
from pacsflow_router.routes import ActiveRoute, RouteTable
from pacsflow_router.scp import Rejection, StoreRequest

__all__ = ["TRANSFER_SYNTAXES", "RouterHandler", "storage_sop_classes"]

log = logging.getLogger(__name__)

#: every transfer syntax pydicom knows, compressed ones included: data sets are stored as
#: received, and the header scan reads each of them
TRANSFER_SYNTAXES: tuple[str, ...] = STORAGE_TRANSFER_SYNTAXES

# Every SOP class under this root is a storage class (PS3.4 B.5, PS3.6 Annex A).
_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
_NOT_STORAGE = ("Commitment", "Media Storage Directory", "Storage Management")

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def storage_sop_classes(extra: Collection[str] = ()) -> frozenset[str]:
    """The storage SOP classes pydicom names outside the storage root, and ``extra``."""
    named = {
        uid
        for uid, entry in UID_dictionary.items()
        if entry[1] == "SOP Class"
        and "Storage" in entry[0]
        and not any(word in entry[0] for word in _NOT_STORAGE)
    }
    return frozenset(named | set(extra))


class SopClassFilter:
    """Accepts every storage SOP class: the storage root, named ones, configured extras."""

    def __init__(self, extra: Collection[str] = ()) -> None:
        self.named = storage_sop_classes(extra)

    def __call__(self, uid: str) -> bool:
        return uid.startswith(_STORAGE_ROOT) or uid in self.named


class RouterHandler:
    """The application side of the SCP: association policy and storing instances."""

    def __init__(self, table: RouteTable, collector: Collector, *, fsync: bool = False) -> None:
        self.table = table
        self.collector = collector
        self.fsync = fsync
        # Folders known to exist: saves a mkdir per instance (thousands per series).
        self._folders: set[str] = set()
        self._folders_lock = threading.Lock()

    # --- Handler ---------------------------------------------------------------------------

    def accept(self, info: AssociationInfo) -> Rejection | ActiveRoute:
        return self.table.resolve(info)

    def association(self, info: AssociationInfo | None, outcome: str, reason: str) -> None:
        self.collector.count("associations", outcome, reason)

    def store(self, request: StoreRequest) -> int:
        route: ActiveRoute = request.target
        if request.dataset is None:
            log.warning(
                "refused SOP instance %s from %s: %d bytes, over the limit",
                request.command.affected_sop_instance_uid, request.info.calling_ae, request.size,
                extra={"route": route.ae_title, "reason": "too-large"},
            )  # fmt: skip
            self.collector.count("failures", route.ae_title, "too-large")
            return Status.OUT_OF_RESOURCES
        try:
            header = scan_header(request.dataset, request.transfer_syntax_uid)
        except InvalidDicom as err:
            log.warning(
                "refused SOP instance %s from %s: %s",
                request.command.affected_sop_instance_uid, request.info.calling_ae, err.reason,
                extra={"route": route.ae_title, "reason": "invalid"},
            )  # fmt: skip
            self.collector.count("failures", route.ae_title, "invalid")
            return Status.CANNOT_UNDERSTAND
        study_folder, series_folder, file = instance_parts(
            os.fspath(route.root),
            header.patient_id,
            header.study_date,
            header.study_time,
            header.series_instance_uid,
            header.sop_instance_uid,
        )
        sop_class = header.sop_class_uid or request.command.affected_sop_class_uid
        try:
            self._write(series_folder, file, request, sop_class, header.sop_instance_uid)
        except OSError as err:
            return self._failed(route, request, err)
        record = Stored(
            route=route.ae_title,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=request.transfer_syntax_uid,
            patient_id=header.patient_id,
            study_description=header.study_description,
            study_folder=study_folder,
            series_folder=series_folder,
            path=file,
            size=request.size,
            received_at=time.time(),
            forward=route.forward,
        )
        self.collector.stored(record, time.monotonic() - request.started)
        return Status.SUCCESS

    # --- writing ---------------------------------------------------------------------------

    def _write(
        self, folder: str, file: str, request: StoreRequest, sop_class: str, sop_instance: str
    ) -> None:
        key = folder
        for attempt in (1, 2):
            if key not in self._folders:
                os.makedirs(folder, exist_ok=True)
                with self._folders_lock:
                    self._folders.add(key)
            try:
                write_part10(
                    file,
                    request.dataset or b"",
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop_instance,
                    transfer_syntax_uid=request.transfer_syntax_uid,
                    source_ae_title=request.info.calling_ae,
                    fsync=self.fsync,
                )
                return
            except FileNotFoundError:
                # The folder was removed since it was made (an operator cleaned up): again.
                with self._folders_lock:
                    self._folders.discard(key)
                if attempt == 2:
                    raise

    def _failed(self, route: ActiveRoute, request: StoreRequest, err: OSError) -> int:
        if err.errno in _FULL:
            reason, status = "disk-full", Status.OUT_OF_RESOURCES
        elif err.errno in _DENIED:
            reason, status = "permission", Status.HANDLER_FAILED
        else:
            reason, status = "io-error", Status.HANDLER_FAILED
        log.error(
            "could not write SOP instance %s from %s under %s: %s",
            request.command.affected_sop_instance_uid, request.info.calling_ae, route.root,
            err.strerror or err,
            extra={"route": route.ae_title, "reason": reason},
        )  # fmt: skip
        self.collector.count("failures", route.ae_title, reason)
        return int(status)
