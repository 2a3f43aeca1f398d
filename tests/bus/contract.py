"""The event bus contract (``pacsflow/bus/base.py``), written once for every backend.

Each backend's test module subclasses :class:`BusContract` and provides two things: a
``make_bus`` fixture (an async factory of started buses that share one namespace and are
closed at the end) and :meth:`BusContract.inject_raw`, which puts bytes that are not a valid
event into a service's queue the way a broken producer would.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any, Protocol
from uuid import UUID

import pytest
from prometheus_client import CollectorRegistry

from pacsflow.bus import BusOptions, EventBus, RejectEvent, queue_name
from pacsflow.events import (
    Event,
    FileFailed,
    FileOutcome,
    FileOutcomePayload,
    FileReady,
    FileReadyPayload,
    FileSent,
    ReadyFile,
    Source,
)

#: timings short enough for tests, long enough for a loaded two-core machine
FAST = BusOptions(
    handler_timeout=10.0,
    publish_timeout=20.0,
    retry_delay=0.02,
    retry_delay_max=0.1,
    close_timeout=0.5,
    connect_timeout=10.0,
    reconnect_interval=0.5,
    watchdog_interval=0.5,
    poll_interval=0.1,
    heartbeat_interval=0.5,
)

#: the services the contract tests use (cleanup deletes their queues)
SERVICES = ("alpha", "beta")
WAIT = 15.0


class BusFactory(Protocol):
    """Makes started buses in one namespace (queue prefix) that are closed after the test."""

    prefix: str

    async def __call__(
        self,
        *,
        prefetch: int = 4,
        delivery_limit: int = 3,
        options: BusOptions = FAST,
        registry: CollectorRegistry | None = None,
    ) -> EventBus: ...


# --- events --------------------------------------------------------------------------------

_SOURCE = Source(service="test", instance="test-1")


def file_sent(n: int = 0, correlation_id: str | None = None) -> FileSent:
    return FileSent(
        source=_SOURCE,
        correlation_id=correlation_id,
        payload=FileOutcomePayload(
            files=[
                FileOutcome(
                    path=f"/in/{n}.dcm", sop_instance_uid=f"1.2.3.{n}", destination="pacs",
                    status=0,
                )
            ]
        ),
    )


def file_failed(n: int = 0) -> FileFailed:
    return FileFailed(
        source=_SOURCE,
        payload=FileOutcomePayload(
            files=[
                FileOutcome(
                    path=f"/in/{n}.dcm", sop_instance_uid=f"1.2.3.{n}", destination="pacs",
                    status=0xA700, error="out of resources",
                )
            ]
        ),
    )


def file_ready(n: int = 0) -> FileReady:
    return FileReady(
        source=_SOURCE,
        correlation_id="batch-7",
        payload=FileReadyPayload(
            files=[
                ReadyFile(
                    path=f"/in/{n}.dcm", size=1234, sop_instance_uid=f"1.2.3.{n}",
                    series_instance_uid="1.2.3", study_instance_uid="1.2",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                )
            ],
            destinations=["pacs"],
            batch_key="folder-a",
        ),
    )


# --- helpers -------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = WAIT, what: str = "condition"
) -> None:
    """Wait until ``check()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class Recorder:
    """A handler that records what it got and can fail on purpose."""

    def __init__(
        self,
        fail: Callable[[Event, int], BaseException | None] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.events: list[Event] = []
        self.attempts: dict[str, int] = {}
        self._fail = fail
        self._delay = delay
        self.running = 0
        self.max_running = 0

    async def __call__(self, event: Event) -> None:
        key = str(event.id)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self._delay:
                await asyncio.sleep(self._delay)
            if self._fail is not None:
                error = self._fail(event, self.attempts[key])
                if error is not None:
                    raise error
            self.events.append(event)
        finally:
            self.running -= 1

    @property
    def ids(self) -> set[str]:
        return {str(event.id) for event in self.events}

    async def wait_for(self, count: int, timeout: float = WAIT) -> None:
        await eventually(
            lambda: len(self.events) >= count, timeout, f"{count} handled events"
        )


async def settle(seconds: float = 0.5) -> None:
    """Give a wrong delivery the time to happen before asserting it did not."""
    await asyncio.sleep(seconds)


def ids(events: Iterable[Event]) -> set[str]:
    return {str(event.id) for event in events}


# --- the contract --------------------------------------------------------------------------


class BusContract:
    """Cases every bus backend passes."""

    @pytest.fixture
    async def make_bus(self) -> Any:  # pragma: no cover - each backend provides it
        raise NotImplementedError

    async def inject_raw(self, bus: EventBus, service: str, event_type: str, body: bytes) -> None:
        """Put ``body`` in the service's queue for ``event_type``, bypassing encode_event."""
        raise NotImplementedError

    # delivery

    async def test_handler_receives_an_equal_model(self, make_bus: BusFactory) -> None:
        bus = await make_bus()
        got = Recorder()
        await bus.subscribe("alpha", ["file-ready"], got)
        event = file_ready(1)
        await bus.publish(event)
        await got.wait_for(1)
        assert got.events == [event]
        assert isinstance(got.events[0], FileReady)
        assert await bus.ready()

    async def test_events_reach_only_services_subscribed_to_their_type(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus()
        alpha, beta = Recorder(), Recorder()
        await bus.subscribe("alpha", ["file-sent"], alpha)
        await bus.subscribe("beta", ["file-failed", "file-ready"], beta)
        sent, failed, ready = file_sent(1), file_failed(2), file_ready(3)
        await bus.publish(sent, failed, ready)
        await alpha.wait_for(1)
        await beta.wait_for(2)
        await settle()
        assert alpha.ids == {str(sent.id)}
        assert beta.ids == {str(failed.id), str(ready.id)}
        assert len(alpha.events) == 1 and len(beta.events) == 2

    async def test_each_service_gets_its_own_copy(self, make_bus: BusFactory) -> None:
        bus = await make_bus()
        alpha, beta = Recorder(), Recorder()
        await bus.subscribe("alpha", ["file-sent"], alpha)
        await bus.subscribe("beta", ["file-sent"], beta)
        events = [file_sent(n) for n in range(5)]
        await bus.publish(*events)
        await alpha.wait_for(5)
        await beta.wait_for(5)
        await settle(0.2)
        assert alpha.ids == beta.ids == ids(events)
        assert len(alpha.events) == len(beta.events) == 5

    async def test_events_published_before_the_consumer_starts_are_kept(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus()
        await bus.declare("alpha", ["file-sent"])
        events = [file_sent(n) for n in range(5)]
        await bus.publish(*events)
        depths = await bus.queue_depths()
        prefix = make_bus.prefix
        assert depths[queue_name(prefix, "alpha", "file-sent")] == 5
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        await got.wait_for(5)
        assert got.ids == ids(events)

    async def test_many_events_in_one_publish_are_all_delivered(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus(prefetch=16)
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        events = [file_sent(n) for n in range(200)]
        await bus.publish(*events)
        await got.wait_for(200)
        assert got.ids == ids(events)

    # failures

    async def test_a_failing_handler_is_retried_then_dead_lettered(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus(delivery_limit=3)
        got = Recorder(fail=lambda event, attempt: OSError(f"disk full, attempt {attempt}"))
        await bus.subscribe("alpha", ["file-sent"], got)
        event = file_sent(1)
        await bus.publish(event)
        await eventually(lambda: _has_dead_letters(bus, "alpha", 1), what="a dead letter")
        await settle()
        # Exactly the delivery limit: not lost early, not looping forever.
        assert got.attempts == {str(event.id): 3}
        [letter] = await bus.dead_letters("alpha")
        assert await bus.dead_letter_count("alpha") == 1
        assert await bus.dead_letter_count("beta") == 0  # a service without a queue yet
        assert letter.service == "alpha"
        assert letter.queue == queue_name(make_bus.prefix, "alpha", "file-sent")
        assert letter.event_type == "file-sent"
        assert letter.deliveries == 3
        assert "disk full, attempt 3" in letter.reason
        assert letter.body and str(event.id) in letter.body.decode()
        assert letter.time is not None

    async def test_a_handler_that_recovers_is_acknowledged_once(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus(delivery_limit=5)
        got = Recorder(fail=lambda event, attempt: ValueError("flaky") if attempt < 3 else None)
        await bus.subscribe("alpha", ["file-sent"], got)
        event = file_sent(1)
        await bus.publish(event)
        await got.wait_for(1)
        await settle()
        assert got.attempts == {str(event.id): 3}
        assert len(got.events) == 1
        assert await bus.dead_letters("alpha") == []
        assert await bus.dead_letter_count("alpha") == 0
        depths = await bus.queue_depths()
        assert depths[queue_name(make_bus.prefix, "alpha", "file-sent")] == 0

    async def test_reject_event_dead_letters_at_once(self, make_bus: BusFactory) -> None:
        bus = await make_bus(delivery_limit=5)
        got = Recorder(fail=lambda event, attempt: RejectEvent("destination unknown: XYZ"))
        await bus.subscribe("alpha", ["file-sent"], got)
        event = file_sent(1)
        await bus.publish(event)
        await eventually(lambda: _has_dead_letters(bus, "alpha", 1), what="a dead letter")
        await settle(0.3)
        assert got.attempts == {str(event.id): 1}
        [letter] = await bus.dead_letters("alpha")
        assert "rejected" in letter.reason and "destination unknown: XYZ" in letter.reason
        assert letter.deliveries == 1

    async def test_undecodable_messages_are_dead_lettered_with_a_reason(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus()
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        await self.inject_raw(bus, "alpha", "file-sent", b"{not json")
        future = file_sent(9).model_dump(mode="json") | {"version": 99}
        await self.inject_raw(bus, "alpha", "file-sent", json.dumps(future).encode())
        # A good event behind them is still handled: bad input never blocks the queue.
        good = file_sent(1)
        await bus.publish(good)
        await got.wait_for(1)
        await eventually(lambda: _has_dead_letters(bus, "alpha", 2), what="two dead letters")
        assert got.ids == {str(good.id)}
        letters = await bus.dead_letters("alpha")
        reasons = sorted(letter.reason for letter in letters)
        assert any("not JSON" in reason for reason in reasons), reasons
        assert any("version 99" in reason for reason in reasons), reasons
        assert {letter.body for letter in letters} >= {b"{not json"}
        assert all(letter.deliveries == 1 for letter in letters)

    async def test_an_event_on_another_types_queue_is_dead_lettered(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus()
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        await self.inject_raw(bus, "alpha", "file-sent", file_failed(1).model_dump_json().encode())
        await eventually(lambda: _has_dead_letters(bus, "alpha", 1), what="a dead letter")
        [letter] = await bus.dead_letters("alpha")
        assert "'file-failed' event arrived on the queue for 'file-sent'" in letter.reason
        assert got.events == []

    # dead letters

    async def test_replay_returns_dead_letters_to_that_service_only(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus()
        rejecting = {"on": True}
        alpha = Recorder(
            fail=lambda event, attempt: RejectEvent("not now") if rejecting["on"] else None
        )
        beta = Recorder()
        await bus.subscribe("alpha", ["file-sent"], alpha)
        await bus.subscribe("beta", ["file-sent"], beta)
        events = [file_sent(n) for n in range(3)]
        await bus.publish(*events)
        await beta.wait_for(3)
        await eventually(lambda: _has_dead_letters(bus, "alpha", 3), what="three dead letters")
        assert await bus.dead_letters("beta") == []

        rejecting["on"] = False
        assert await bus.replay_dead_letters("alpha") == 3
        await alpha.wait_for(3)
        await settle()
        assert alpha.ids == ids(events)
        assert len(beta.events) == 3  # beta already had them and gets no second copy
        assert await bus.dead_letters("alpha") == []

    async def test_replay_and_purge_by_id(self, make_bus: BusFactory) -> None:
        bus = await make_bus()
        rejecting = {"on": True}
        got = Recorder(
            fail=lambda event, attempt: RejectEvent("no") if rejecting["on"] else None
        )
        await bus.subscribe("alpha", ["file-sent"], got)
        events = [file_sent(n) for n in range(4)]
        for n, event in enumerate(events, 1):  # one at a time: the dead letters keep this order
            await bus.publish(event)
            await eventually(
                functools.partial(_has_dead_letters, bus, "alpha", n), what="a dead letter"
            )
        letters = await bus.dead_letters("alpha")
        assert [letter.body for letter in letters] == [
            event.model_dump_json().encode() for event in events
        ]
        assert len({letter.id for letter in letters}) == 4
        # Listing leaves them in place.
        assert [letter.id for letter in await bus.dead_letters("alpha")] == [
            letter.id for letter in letters
        ]

        rejecting["on"] = False
        assert await bus.replay_dead_letters("alpha", [letters[1].id]) == 1
        await got.wait_for(1)
        assert got.ids == {str(events[1].id)}
        assert await bus.purge_dead_letters("alpha", [letters[0].id, "no-such-id"]) == 1
        remaining = await bus.dead_letters("alpha")
        assert [letter.id for letter in remaining] == [letters[2].id, letters[3].id]
        assert await bus.purge_dead_letters("alpha") == 2
        assert await bus.dead_letters("alpha") == []
        assert await bus.purge_dead_letters("alpha") == 0
        assert await bus.replay_dead_letters("alpha") == 0
        await settle(0.3)
        assert got.ids == {str(events[1].id)}

    async def test_dead_letters_of_an_unknown_service_are_empty(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus()
        assert await bus.dead_letters("beta") == []
        assert await bus.purge_dead_letters("beta") == 0
        assert await bus.replay_dead_letters("beta") == 0

    async def test_queue_depths_count_waiting_messages_and_dead_letters(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus()
        prefix = make_bus.prefix
        await bus.declare("beta", ["file-sent", "file-failed"])
        got = Recorder(fail=lambda event, attempt: RejectEvent("no"))
        await bus.subscribe("alpha", ["file-sent"], got)
        await bus.publish(file_sent(1), file_sent(2), file_failed(3))
        await eventually(lambda: _has_dead_letters(bus, "alpha", 2), what="two dead letters")
        depths = await bus.queue_depths()
        assert depths[queue_name(prefix, "beta", "file-sent")] == 2
        assert depths[queue_name(prefix, "beta", "file-failed")] == 1
        assert depths[queue_name(prefix, "alpha", "file-sent")] == 0
        assert depths[f"{prefix}.alpha.dead-letters"] == 2
        assert depths[f"{prefix}.beta.dead-letters"] == 0

    # flow control and acknowledgement

    async def test_prefetch_bounds_concurrent_handlers(self, make_bus: BusFactory) -> None:
        bus = await make_bus(prefetch=3)
        got = Recorder(delay=0.1)
        # Two event types: the bound is per subscription, not per queue.
        await bus.subscribe("alpha", ["file-sent", "file-failed"], got)
        await bus.publish(*[file_sent(n) for n in range(6)], *[file_failed(n) for n in range(6)])
        await got.wait_for(12)
        assert got.max_running == 3

    async def test_a_message_in_flight_when_the_bus_closes_is_delivered_again(
        self, make_bus: BusFactory
    ) -> None:
        first = await make_bus(options=replace(FAST, close_timeout=0.3))
        started = asyncio.Event()

        async def never_finishes(event: Event) -> None:
            started.set()
            await asyncio.Event().wait()

        await first.subscribe("alpha", ["file-sent"], never_finishes)
        event = file_sent(1)
        await first.publish(event)
        await asyncio.wait_for(started.wait(), WAIT)
        # The handler has the message but has not returned: it must not be acknowledged.
        await first.close()

        second = await make_bus()
        got = Recorder()
        await second.subscribe("alpha", ["file-sent"], got)
        await got.wait_for(1)
        assert got.ids == {str(event.id)}

    async def test_a_handler_over_its_time_limit_is_cancelled_and_retried(
        self, make_bus: BusFactory
    ) -> None:
        bus = await make_bus(delivery_limit=5, options=replace(FAST, handler_timeout=0.3))
        cancelled: list[UUID] = []

        async def slow_then_fast(event: Event) -> None:
            if not cancelled:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancelled.append(event.id)
                    raise
            got.append(event)

        got: list[Event] = []
        await bus.subscribe("alpha", ["file-sent"], slow_then_fast)
        event = file_sent(1)
        await bus.publish(event)
        await eventually(lambda: len(got) == 1, what="the retried event")
        assert cancelled == [event.id]
        assert await bus.dead_letters("alpha") == []

    async def test_metrics_count_publishes_outcomes_and_dead_letters(
        self, make_bus: BusFactory
    ) -> None:
        registry = CollectorRegistry()
        bus = await make_bus(delivery_limit=3, registry=registry)
        flaky, rejected = file_sent(1), file_sent(2)

        def fail(event: Event, attempt: int) -> BaseException | None:
            if event.id == rejected.id:
                return RejectEvent("never")
            return ValueError("once") if attempt == 1 else None

        got = Recorder(fail=fail)
        await bus.subscribe("alpha", ["file-sent"], got)
        await bus.publish(flaky, rejected)
        await got.wait_for(1)
        await eventually(lambda: _has_dead_letters(bus, "alpha", 1), what="a dead letter")
        await settle(0.2)

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        alpha = {"service": "alpha", "event_type": "file-sent"}
        assert value("pacsflow_bus_events_published_total", service="test",
                     event_type="file-sent") == 2
        assert value("pacsflow_bus_events_handled_total", **alpha, outcome="ack") == 1
        assert value("pacsflow_bus_events_handled_total", **alpha, outcome="retry") == 1
        assert value("pacsflow_bus_events_handled_total", **alpha, outcome="dead-letter") == 1
        assert value("pacsflow_bus_dead_letters_total", **alpha, cause="rejected") == 1
        assert value("pacsflow_bus_handler_duration_seconds_count", **alpha) == 3
        backend = {"backend": bus.backend}  # type: ignore[attr-defined]
        assert value("pacsflow_bus_connected", **backend) == 1
        await bus.close()
        assert value("pacsflow_bus_connected", **backend) == 0

    async def test_ready_is_false_once_closed(self, make_bus: BusFactory) -> None:
        bus = await make_bus()
        await bus.subscribe("alpha", ["file-sent"], Recorder())
        assert await bus.ready()
        await bus.close()
        assert not await bus.ready()


async def _has_dead_letters(bus: EventBus, service: str, count: int) -> bool:
    return len(await bus.dead_letters(service)) >= count
