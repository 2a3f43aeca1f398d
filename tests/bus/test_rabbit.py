"""The RabbitMQ bus on the real broker: the shared contract, topology, and broker failures."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aio_pika
import aiormq
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from pacsflow.bus import BusOptions, EventBus, RabbitBus, queue_name
from pacsflow.config import BusSettings
from pacsflow.errors import BusError
from pacsflow.events import EVENT_TYPES, Event
from tests.bus.contract import (
    FAST,
    SERVICES,
    WAIT,
    BusContract,
    BusFactory,
    Recorder,
    eventually,
    file_failed,
    file_sent,
)
from tests.bus.proxy import TcpProxy

pytestmark = pytest.mark.rabbit


class _Factory:
    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.exchange = f"{prefix}.events"
        self.buses: list[RabbitBus] = []

    def settings(self, prefetch: int = 4, delivery_limit: int = 3) -> BusSettings:
        return BusSettings(
            backend="rabbitmq",
            url=SecretStr(self.url),
            exchange=self.exchange,
            queue_prefix=self.prefix,
            prefetch=prefetch,
            delivery_limit=delivery_limit,
        )

    async def __call__(
        self,
        *,
        prefetch: int = 4,
        delivery_limit: int = 3,
        options: BusOptions = FAST,
        registry: CollectorRegistry | None = None,
    ) -> EventBus:
        bus = RabbitBus(
            self.settings(prefetch, delivery_limit),
            registry=CollectorRegistry() if registry is None else registry,
            options=options,
        )
        await bus.start()
        self.buses.append(bus)
        return bus

    async def delete_everything(self) -> None:
        """Delete what the tests declared (queue and exchange deletes are idempotent)."""
        connection = await aio_pika.connect(self.url, timeout=10)
        try:
            channel = await connection.channel()
            for service in SERVICES:
                for event_type in EVENT_TYPES:
                    await channel.queue_delete(
                        queue_name(self.prefix, service, event_type), timeout=30
                    )
                await channel.queue_delete(f"{self.prefix}.{service}.dead-letters", timeout=30)
            await channel.exchange_delete(self.exchange, timeout=30)
            await channel.exchange_delete(f"{self.exchange}.dead-letters", timeout=30)
        finally:
            await asyncio.wait_for(connection.close(), 30)


@pytest.fixture
async def rabbit_factory(rabbit_url: str, unique_prefix: str) -> AsyncIterator[_Factory]:
    factory = _Factory(rabbit_url, unique_prefix)
    yield factory
    try:
        for bus in factory.buses:
            # close() bounds each step itself; this makes a hang a failure, not a stall.
            await asyncio.wait_for(bus.close(), 90)
    finally:
        await factory.delete_everything()


def rabbitmqctl(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout


def queues_on_broker(prefix: str) -> dict[str, dict[str, object]]:
    """The broker's own view of our queues (``rabbitmqctl list_queues``)."""
    out = rabbitmqctl(
        "list_queues", "name", "type", "durable", "consumers", "messages", "arguments",
        "--formatter", "json", "--quiet",
    )
    return {q["name"]: q for q in json.loads(out) if q["name"].startswith(f"{prefix}.")}


async def consumer_counts(url: str, names: list[str]) -> dict[str, int | None]:
    """Consumers per queue from a passive declare on a connection of our own (immediate;
    ``rabbitmqctl list_queues`` shows a quorum queue's consumers only after ~5 s of stats)."""
    counts: dict[str, int | None] = {}
    connection = await aio_pika.connect(url, timeout=10)
    try:
        for name in names:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True, timeout=30)
                counts[name] = queue.declaration_result.consumer_count
            except aio_pika.exceptions.ChannelNotFoundEntity:
                counts[name] = None
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()
    return counts


class TestRabbitBus(BusContract):
    @pytest.fixture
    async def make_bus(self, rabbit_factory: _Factory) -> BusFactory:
        return rabbit_factory

    async def inject_raw(self, bus: EventBus, service: str, event_type: str, body: bytes) -> None:
        # Raw bytes to the topic exchange, as a producer that skipped encode_event would send.
        assert isinstance(bus, RabbitBus)
        connection = await aio_pika.connect(bus._settings.url.get_secret_value(), timeout=10)
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(bus._settings.exchange)
            await exchange.publish(aio_pika.Message(body), routing_key=event_type, timeout=30)
        finally:
            await connection.close()


class TestRabbitTopology:
    async def test_queues_are_durable_quorum_queues_with_a_delivery_limit(
        self, rabbit_factory: _Factory
    ) -> None:
        bus = await rabbit_factory(delivery_limit=4)
        await bus.subscribe("alpha", ["file-sent", "file-failed"], Recorder())
        queues = await asyncio.to_thread(queues_on_broker, rabbit_factory.prefix)
        name = queue_name(rabbit_factory.prefix, "alpha", "file-sent")
        sent = queues[name]
        assert sent["type"] == "quorum" and sent["durable"] is True
        assert (await consumer_counts(rabbit_factory.url, [name]))[name] == 1
        # The JSON formatter lists arguments as [name, AMQP type, value].
        arguments = {item[0]: item[2] for item in sent["arguments"]}  # type: ignore[attr-defined]
        assert arguments["x-delivery-limit"] == 4
        assert arguments["x-dead-letter-exchange"] == f"{rabbit_factory.exchange}.dead-letters"
        dead_letter_queue = f"{rabbit_factory.prefix}.alpha.dead-letters"
        assert arguments["x-dead-letter-routing-key"] == dead_letter_queue
        assert arguments["x-dead-letter-strategy"] == "at-least-once"
        dead = queues[dead_letter_queue]
        assert dead["durable"] is True and dead["type"] == "classic"

    async def test_start_fails_with_bus_error_when_the_broker_is_unreachable(self) -> None:
        settings = BusSettings(
            backend="rabbitmq", url=SecretStr("amqp://guest:guest@127.0.0.1:1/")
        )
        bus = RabbitBus(settings, registry=CollectorRegistry(), options=FAST)
        with pytest.raises(BusError, match="cannot connect"):
            await bus.start()

    async def test_the_broker_s_own_dead_letters_are_listed_and_replayed(
        self, rabbit_factory: _Factory
    ) -> None:
        """A consumer that dies on a message every time: the broker's x-delivery-limit
        dead-letters it (with x-death, no reason of ours); it can still be listed and replayed."""
        bus = await rabbit_factory(delivery_limit=2)
        await bus.declare("alpha", ["file-sent"])
        event = file_sent(1)
        await bus.publish(event)
        name = queue_name(rabbit_factory.prefix, "alpha", "file-sent")
        connection = await aio_pika.connect(rabbit_factory.url, timeout=10)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(name, ensure=False)
            for _ in range(3):  # delivered, never settled: returned to the queue each time
                message = await queue.get(timeout=5)
                await message.nack(requeue=True)
        finally:
            await connection.close()

        async def dead() -> bool:
            return len(await bus.dead_letters("alpha")) == 1

        await eventually(dead, what="the broker's dead letter")
        [letter] = await bus.dead_letters("alpha")
        assert letter.queue == name
        assert letter.event_type == "file-sent"
        assert "delivery limit" in letter.reason
        assert letter.id == str(event.id)
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        assert await bus.replay_dead_letters("alpha", [letter.id]) == 1
        await got.wait_for(1)
        assert got.ids == {str(event.id)}

    async def test_a_consumer_cancelled_by_the_broker_comes_back(
        self, rabbit_factory: _Factory
    ) -> None:
        """Deleting a consumed queue makes the broker cancel the consumer (aio-pika #334);
        the bus declares the queue again and consumes it."""
        bus = await rabbit_factory()
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        name = queue_name(rabbit_factory.prefix, "alpha", "file-sent")
        connection = await aio_pika.connect(rabbit_factory.url, timeout=10)
        try:
            channel = await connection.channel()
            await channel.queue_delete(name, timeout=30)
        finally:
            await connection.close()

        async def consumed_again() -> bool:
            return (await consumer_counts(rabbit_factory.url, [name]))[name] == 1

        await eventually(consumed_again, what="the consumer to come back")
        assert await bus.ready()
        await bus.publish(file_sent(1))
        await got.wait_for(1)

    async def test_the_watchdog_consumes_again_when_the_consumer_is_gone(
        self, rabbit_factory: _Factory
    ) -> None:
        """The failure of aio-pika #231/#626: the client believes it consumes, the broker
        shows no consumer. Cancelling our consumer behind the bus's back plays that."""
        bus = await rabbit_factory(options=replace(FAST, watchdog_interval=0.3))
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        assert isinstance(bus, RabbitBus)
        [sub] = bus._subscriptions
        [(queue, tag)] = sub.consumers.values()
        assert sub.channel is not None
        underlay = await sub.channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        # Cancel on the wire without telling the bus (no callback, tag kept in its books).
        underlay.on_consumer_cancel_callbacks.clear()
        await underlay.basic_cancel(tag)
        underlay.consumers[tag] = lambda message: None  # type: ignore[assignment, return-value]
        name = queue.name

        assert (await consumer_counts(rabbit_factory.url, [name]))[name] == 0

        async def consumed_again() -> bool:
            return (await consumer_counts(rabbit_factory.url, [name]))[name] == 1 and (
                sub.channel is not None
                and await sub.channel.get_underlay_channel() is not underlay
            )

        await eventually(consumed_again, what="the watchdog to subscribe again")
        await bus.publish(file_sent(1))
        await got.wait_for(1)
        assert await bus.ready()


class TestRabbitOutage:
    """Outages played by cutting a TCP proxy between the bus and the broker (cheap, and no
    other test on the broker notices)."""

    @pytest.fixture
    async def proxy(self, rabbit_url: str) -> AsyncIterator[TcpProxy]:
        url = urllib.parse.urlsplit(rabbit_url)
        proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 5672)
        await proxy.start()
        yield proxy
        await proxy.close()

    async def _bus_through(
        self, proxy: TcpProxy, factory: _Factory, options: BusOptions
    ) -> RabbitBus:
        url = urllib.parse.urlsplit(factory.url)
        credentials = url.netloc.rpartition("@")[0]
        proxied = url._replace(netloc=f"{credentials}@127.0.0.1:{proxy.port}").geturl()
        settings = factory.settings().model_copy(update={"url": SecretStr(proxied)})
        bus = RabbitBus(settings, registry=CollectorRegistry(), options=options)
        await bus.start()
        factory.buses.append(bus)
        return bus

    async def test_publish_waits_through_an_outage_and_consumers_come_back(
        self, proxy: TcpProxy, rabbit_factory: _Factory
    ) -> None:
        bus = await self._bus_through(proxy, rabbit_factory, FAST)
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        await proxy.cut()
        await eventually(lambda: _not(bus.ready()), what="ready() to turn false")
        event = file_sent(1)
        publishing = asyncio.create_task(bus.publish(event))
        await asyncio.sleep(1.0)
        assert not publishing.done()  # still trying, not failed, not "sent" into nothing
        await proxy.start()
        await asyncio.wait_for(publishing, WAIT)
        await got.wait_for(1)
        assert got.ids == {str(event.id)}
        await eventually(bus.ready, what="ready() to turn true again")

    async def test_publish_gives_up_with_bus_error_after_its_deadline(
        self, proxy: TcpProxy, rabbit_factory: _Factory
    ) -> None:
        bus = await self._bus_through(proxy, rabbit_factory, replace(FAST, publish_timeout=1.0))
        await bus.declare("alpha", ["file-sent"])
        await proxy.cut()
        began = time.monotonic()
        with pytest.raises(BusError, match="did not confirm 2 of 2 event"):
            await bus.publish(file_sent(1), file_sent(2))
        assert 0.9 < time.monotonic() - began < 5.0
        await proxy.start()
        await bus.publish(file_sent(3))  # and it works again once the broker is back


async def _not(check: Awaitable[bool]) -> bool:
    return not await check


@pytest.mark.slow
class TestRabbitRestart:
    async def test_a_broker_restart_mid_stream_loses_no_event(
        self, rabbit_factory: _Factory
    ) -> None:
        """1,000 events published at a steady pace while RabbitMQ is stopped and started:
        every one is handled by both services (at least once), publishing rides through the
        outage by retrying, and every consumer is back afterwards."""
        options = replace(FAST, publish_timeout=120.0, watchdog_interval=1.0)
        registry = CollectorRegistry()
        bus = await rabbit_factory(prefetch=16, delivery_limit=5, options=options,
                                   registry=registry)
        handled: dict[str, list[tuple[float, str]]] = {"alpha": [], "beta": []}

        def recorder(service: str) -> Callable[[Event], Awaitable[None]]:
            async def handle(event: Event) -> None:
                await asyncio.sleep(0.002)  # some work, so messages are in flight at the stop
                handled[service].append((time.monotonic(), str(event.id)))

            return handle

        await bus.subscribe("alpha", ["file-sent", "file-failed"], recorder("alpha"))
        await bus.subscribe("beta", ["file-failed", "file-sent"], recorder("beta"))
        total, batch = 1000, 10
        published: list[str] = []
        publish_seconds: list[float] = []
        stop_now = asyncio.Event()

        async def publisher() -> None:
            for n in range(0, total, batch):
                events = [
                    file_sent(i) if i % 2 else file_failed(i) for i in range(n, n + batch)
                ]
                began = time.monotonic()
                await bus.publish(*events)
                publish_seconds.append(time.monotonic() - began)
                published.extend(str(e.id) for e in events)
                if len(published) >= 200:
                    stop_now.set()
                await asyncio.sleep(0.05)  # about 150 events a second: the stream spans the stop

        publishing = asyncio.create_task(publisher())
        stopping = started = False
        try:
            await asyncio.wait_for(stop_now.wait(), 60)
            t_stop = time.monotonic()
            stopping = True
            await asyncio.to_thread(rabbitmqctl, "stop_app")
            published_at_stop = len(published)
            await asyncio.sleep(1.0)  # publishing keeps trying meanwhile
            await asyncio.to_thread(rabbitmqctl, "start_app")
            started = True
            t_up = time.monotonic()
            await asyncio.wait_for(publishing, 120)

            def distinct(service: str) -> set[str]:
                return {event_id for _, event_id in handled[service]}

            await eventually(
                lambda: len(distinct("alpha")) == total and len(distinct("beta")) == total,
                timeout=120, what="every event handled by both services",
            )
            t_done = time.monotonic()
        finally:
            if stopping and not started:
                # Whatever failed, the broker must be running again for everyone else.
                await asyncio.to_thread(
                    subprocess.run, ["rabbitmqctl", "start_app"], timeout=120, check=False
                )
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)

        assert len(set(published)) == total
        assert distinct("alpha") == distinct("beta") == set(published)
        # The outage happened mid-stream, and a publish call waited through it (retrying
        # or waiting for the connection) instead of failing or dropping events.
        assert published_at_stop < total
        assert max(publish_seconds) > 1.0
        assert registry.get_sample_value(
            "pacsflow_bus_reconnects_total", {"backend": "rabbitmq"}
        ) == 1

        names = [
            queue_name(rabbit_factory.prefix, service, event_type)
            for service in ("alpha", "beta")
            for event_type in ("file-sent", "file-failed")
        ]
        assert await consumer_counts(rabbit_factory.url, names) == dict.fromkeys(names, 1)

        async def broker_lists_consumers() -> bool:
            queues = await asyncio.to_thread(queues_on_broker, rabbit_factory.prefix)
            return all(queues[name]["consumers"] == 1 for name in names)

        # rabbitmqctl's view lags by the stats interval (5 s) for quorum queues.
        await eventually(broker_lists_consumers, timeout=30, what="one consumer per queue")
        assert await bus.ready()
        assert await bus.dead_letters("alpha") == [] and await bus.dead_letters("beta") == []

        after_up = [t for s in handled.values() for t, _ in s if t > t_up]
        duplicates = {s: len(h) - len({i for _, i in h}) for s, h in handled.items()}
        print(
            f"\nrestart: {total} events x 2 services; {published_at_stop} published when "
            f"stop_app returned; longest publish call {max(publish_seconds):.1f} s; "
            f"duplicates {duplicates}; stop_app + 1 s + start_app took {t_up - t_stop:.1f} s; "
            f"first event handled {min(after_up) - t_up:.2f} s after start_app returned; "
            f"all handled {t_done - t_up:.1f} s after it"
        )
