"""The pynetdicom 3.0.4 ``send_c_store`` race (perf-notes finding 2) and its fix.

pynetdicom parks an association's reactor with an Event and a flag that can still say
"paused" from the previous request; the reactor then takes the next C-STORE-RSP off the DIMSE
queue and the caller waits out the DIMSE timeout. On a fast peer it happens about once in
four runs of 2,000 files. Here the window is widened on purpose and the same way for both
paths, so the unfixed path fails every time and the fixed path must not:

* the reactor is descheduled for ``LAG`` seconds right after it is let go (the GIL does
  this for up to 5 ms in real runs), and
* the caller looks at the DIMSE queue ``PICKUP`` seconds after sending (likewise).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from pacsflow.dicom import NetworkOptions, StoreSession, read_part10
from pacsflow.dicom.association import DimseGate, install_gate
from pacsflow.dicom.transport import set_tcp_nodelay
from tests.dicom.synthetic import write_ct_series
from tests.peers import StoreSCPProcess

pytestmark = pytest.mark.dcmtk

LAG = 0.05
PICKUP = 0.15
DIMSE_TIMEOUT = 1.0


class LaggingCheckpoint(threading.Event):
    """pynetdicom's reactor checkpoint; the reactor sleeps ``lag`` after each wake-up."""

    def __init__(self, lag: float) -> None:
        super().__init__()
        self.set()
        self.lag = lag

    def wait(self, timeout: float | None = None) -> bool:
        parked = not self.is_set()
        woke = super().wait(timeout)
        if parked:
            # Still before pynetdicom's "_is_paused = False": the stale flag stays visible.
            time.sleep(self.lag)
        return woke


class LaggingGate(DimseGate):
    """The fix's gate; the reactor sleeps ``lag`` right after a caller hands the queue back."""

    def __init__(self, lag: float) -> None:
        super().__init__()
        self.lag = lag
        self.handed_back = False

    def set(self) -> None:
        super().set()
        self.handed_back = True

    @contextmanager
    def reactor_turn(self) -> Iterator[None]:
        with super().reactor_turn():
            if self.handed_back:
                self.handed_back = False
                time.sleep(self.lag)
            yield


class SlowPickupQueue(queue.Queue[Any]):
    """The DIMSE message queue; a blocking reader looks ``delay`` seconds late."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            time.sleep(self.delay)
        return super().get(block, timeout)


def _associate(peer: StoreSCPProcess, instrument: Callable[[Association], None]) -> Association:
    ae = AE("PFRACE")
    ae.dimse_timeout = DIMSE_TIMEOUT
    ae.acse_timeout = 10

    def on_connection_open(event: evt.Event) -> None:
        set_tcp_nodelay(event.assoc)
        # Replaced before the reactor loop starts, as the fix itself is installed.
        event.assoc.dimse.msg_queue = SlowPickupQueue(PICKUP)
        instrument(event.assoc)

    assoc = ae.associate(
        "127.0.0.1",
        peer.port,
        contexts=[build_context(CTImageStorage, [ExplicitVRLittleEndian])],
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)],
    )
    assert assoc.is_established
    return assoc


def _send_with_pynetdicom(assoc: Association, paths: list[Path]) -> list[int | None]:
    """pynetdicom's own send_c_store for each file; None where no response came."""
    statuses: list[int | None] = []
    for path in paths:
        if not assoc.is_established:
            statuses.append(None)
            continue
        answer = assoc.send_c_store(pydicom.dcmread(path))
        statuses.append(int(answer.Status) if "Status" in answer else None)
    if assoc.is_established:
        assoc.release()
    return statuses


@pytest.fixture(scope="module")
def four_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("race"), 4)


class TestRaceWindow:
    def test_unfixed_reactor_takes_the_response_and_the_association_is_aborted(
        self, storescp: StoreSCPProcess, four_files: list[Path]
    ) -> None:
        def unfixed(assoc: Association) -> None:
            assoc._reactor_checkpoint = LaggingCheckpoint(LAG)  # type: ignore[assignment]

        assoc = _associate(storescp, unfixed)
        statuses = _send_with_pynetdicom(assoc, four_files)

        assert statuses[0] == 0x0000
        # The second response reached the reactor, not the caller: timeout, then abort.
        assert statuses[1] is None
        assert assoc.is_aborted
        # The peer did store the file whose response was lost.
        assert len(storescp.files()) >= 2

    def test_gated_reactor_leaves_every_response_to_its_caller(
        self, storescp: StoreSCPProcess, four_files: list[Path]
    ) -> None:
        def fixed(assoc: Association) -> None:
            install_gate(assoc, 0.001, 0.001, gate=LaggingGate(LAG))

        assoc = _associate(storescp, fixed)
        statuses = _send_with_pynetdicom(assoc, four_files)

        assert statuses == [0x0000] * 4
        assert not assoc.is_aborted
        assert len(storescp.files()) == 4


@pytest.mark.slow
def test_thousands_of_stores_over_one_association_lose_no_response(
    storescp: StoreSCPProcess, small_series: list[Path], options: NetworkOptions
) -> None:
    """2,000 small files over one association to storescp, three times: no failure.

    Unfixed, it fails often: stock pynetdicom ``send_c_store`` with the same peer, files and
    polling lost responses in 9 of 20 runs here (the gated path: 0 of 20).
    """
    files = [read_part10(path) for path in small_series]
    for run in range(3):
        started = time.perf_counter()
        with StoreSession.for_files(storescp.node, options, files) as session:
            results = [session.send(file) for file in files]
        elapsed = time.perf_counter() - started
        failures = [result for result in results if not result.ok]
        assert failures == [], f"run {run}: {len(failures)} failures, first: {failures[0]}"
        assert len(storescp.files()) == len(files)
        print(f"run {run}: {len(files)} files in {elapsed:.1f} s ({len(files) / elapsed:.0f}/s)")
