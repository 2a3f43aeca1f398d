"""An asyncio SCP with a recording handler, for the engine's interop tests."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pacsflow.dicom.engine import AssociationSlots, AsyncStoreServer, Limits, Rejection
from pacsflow.dicom.engine import StoreRequest, listen_socket
from pacsflow.dicom.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsflow.dicom.scp import STORAGE_TRANSFER_SYNTAXES, AssociationInfo

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class RecordingHandler:
    """Accepts the called AE ``ENGINE``; keeps a digest of every data set it is given."""

    called_ae: str = "ENGINE"
    status: int = 0x0000
    stored: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    stores: int = 0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: threading.Condition = field(default_factory=threading.Condition)

    def accept(self, info: AssociationInfo) -> Rejection | Any:
        if info.called_ae != self.called_ae:
            return Rejection.called_ae_unknown()
        return info.called_ae

    def store(self, request: StoreRequest) -> int:
        assert request.dataset is not None
        self.stores += 1
        uid = request.command.affected_sop_instance_uid
        self.stored[uid] = hashlib.sha256(request.dataset).hexdigest()
        self.sizes[uid] = request.size
        return self.status

    def association(self, info: AssociationInfo | None, outcome: str, reason: str) -> None:
        with self.ended:
            self.outcomes[(outcome, reason)] += 1
            self.ended.notify_all()

    def wait_outcome(self, outcome: str, reason: str, timeout: float = 10.0) -> bool:
        with self.ended:
            return self.ended.wait_for(lambda: self.outcomes[(outcome, reason)] > 0, timeout)


def make_server(
    handler: RecordingHandler, engine: str = "asyncio", **limits: Any
) -> AsyncStoreServer:
    """The SCP of ``engine`` (dicom.engine: asyncio, or the router's blocking lean server)."""
    from pacsflow_router.scp import StoreServer

    listener = listen_socket("127.0.0.1", 0)
    server_class = AsyncStoreServer if engine == "asyncio" else StoreServer
    return server_class(  # type: ignore[no-any-return]
        handler,
        listener,
        limits=Limits(**limits),
        slots=AssociationSlots(limits.get("max_associations", 32)),
        accepts_sop_class=lambda uid: uid.startswith("1.2.840.10008.5.1.4.1.1."),
        transfer_syntaxes=STORAGE_TRANSFER_SYNTAXES,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=IMPLEMENTATION_VERSION_NAME,
    )


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def servers() -> Iterator[list[AsyncStoreServer]]:
    """Servers a test starts, stopped after it."""
    started: list[AsyncStoreServer] = []
    yield started
    for server in started:
        server.stop(grace=1)
        server.listener.close()


@pytest.fixture(params=["asyncio", "lean"])
def engine_scp(handler: RecordingHandler, request: pytest.FixtureRequest) -> Iterator[AsyncStoreServer]:
    """Each engine's SCP (asyncio on its own loop thread, lean on its threads), on a free port."""
    server = make_server(handler, request.param).start()
    try:
        yield server
    finally:
        server.stop(grace=1)
        server.listener.close()


def digest_of_data_set(path: Any) -> str:
    """The SHA-256 of a Part 10 file's data set (what an SCP receives)."""
    from pacsflow.dicom import read_part10

    part10 = read_part10(path)
    return hashlib.sha256(path.read_bytes()[part10.dataset_offset :]).hexdigest()
