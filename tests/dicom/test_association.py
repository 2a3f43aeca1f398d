"""The association layer: the DIMSE gate, adaptive polling, and opening associations."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from pacsflow.config import Node
from pacsflow.dicom import NetworkOptions, NoAcceptedContexts, ReceivedInstance, StoreSCP
from pacsflow.dicom.association import BUSY_WINDOW, DimseGate, gate_of, open_association


def _ignore(instance: ReceivedInstance) -> int:
    return 0


class TestDimseGate:
    def _in_thread(self, action: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=action, daemon=True)
        thread.start()
        return thread

    def test_caller_waits_for_the_reactor_turn_to_end(self) -> None:
        gate = DimseGate()
        inside = threading.Event()
        leave = threading.Event()

        def reactor() -> None:
            with gate.reactor_turn():
                inside.set()
                leave.wait(5)

        self._in_thread(reactor)
        assert inside.wait(5)
        caller = self._in_thread(gate.clear)
        caller.join(0.2)
        assert caller.is_alive(), "clear() returned while the reactor held its turn"
        leave.set()
        caller.join(5)
        assert not caller.is_alive()
        assert not gate.is_set()
        gate.set()
        assert gate.is_set()

    def test_reactor_waits_while_a_caller_owns_the_queue(self) -> None:
        gate = DimseGate()
        gate.clear()
        turned = threading.Event()

        def reactor() -> None:
            with gate.reactor_turn():
                turned.set()

        self._in_thread(reactor)
        assert not turned.wait(0.2)
        gate.set()
        assert turned.wait(5)

    def test_set_without_clear_does_nothing(self) -> None:
        gate = DimseGate()
        # pynetdicom's abort() and kill() call set() whether or not anyone cleared.
        gate.set()
        gate.set()
        gate.clear()
        assert not gate.is_set()
        gate.set()

    def test_second_clear_by_the_owner_does_not_deadlock(self) -> None:
        gate = DimseGate()
        gate.clear()
        finished = threading.Event()

        def again() -> None:
            gate.clear()
            finished.set()

        self._in_thread(again)
        assert finished.wait(2)
        gate.set()

    def test_clear_inside_the_reactor_turn_does_not_deadlock(self) -> None:
        gate = DimseGate()
        done = threading.Event()

        def reactor() -> None:
            with gate.reactor_turn():
                # A request handler calling a send_*() method from the reactor thread.
                gate.clear()
                gate.set()
            done.set()

        self._in_thread(reactor)
        assert done.wait(2)


class TestPacer:
    def test_polling_is_fast_while_messages_flow_and_slow_when_quiet(self) -> None:
        options = NetworkOptions(poll_interval=0.0001, idle_poll_interval=0.002)
        with StoreSCP(_ignore, ae_title="PFSCP", host="127.0.0.1", options=options) as scp:
            node = Node(ae_title="PFSCP", host="127.0.0.1", port=scp.port)
            assoc = open_association(node, [build_context(Verification)], options)
            try:
                time.sleep(BUSY_WINDOW * 3)
                assert assoc.dul._run_loop_delay == 0.002
                assert assoc.send_c_echo().Status == 0
                # The caller taking the gate switched the DUL to fast polling at once.
                assert assoc.dul._run_loop_delay == 0.0001
                time.sleep(BUSY_WINDOW * 3)
                assert assoc.dul._run_loop_delay == 0.002
            finally:
                assoc.release()


class TestOpenAssociation:
    def test_gate_is_installed_on_every_association(self) -> None:
        with StoreSCP(_ignore, ae_title="PFSCP", host="127.0.0.1") as scp:
            node = Node(ae_title="PFSCP", host="127.0.0.1", port=scp.port)
            assoc = open_association(node, [build_context(Verification)], NetworkOptions())
            try:
                assert gate_of(assoc) is not None
            finally:
                assoc.release()

    def test_no_accepted_context_is_its_own_rejection(self) -> None:
        with StoreSCP(_ignore, ae_title="PFSCP", host="127.0.0.1") as scp:
            node = Node(ae_title="PFSCP", host="127.0.0.1", port=scp.port)
            # A storage SCP does not do C-FIND.
            contexts = [build_context(StudyRootQueryRetrieveInformationModelFind)]
            with pytest.raises(NoAcceptedContexts, match="none of the 1 proposed"):
                open_association(node, contexts, NetworkOptions())
