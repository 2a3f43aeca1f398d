"""The RabbitMQ event bus (aio-pika): the distributed deployment's backend of ``base.py``.

Topology, all durable and declared by the bus itself:

* one **topic** exchange ``settings.exchange``; the routing key is the event type;
* per consuming service and event type a **quorum** queue ``<prefix>.<service>.<event-type>``
  bound to it, with an explicit ``x-delivery-limit`` (``settings.delivery_limit``) and the
  dead-letter exchange ``<exchange>.dead-letters`` (direct, at-least-once dead-lettering);
* per service a classic queue ``<prefix>.<service>.dead-letters`` bound to that exchange.

Publishing: persistent messages on a channel with publisher confirms; ``publish`` returns only
when the broker confirmed every message. While the broker is away (restart, network) it retries
with a growing pause until ``BusOptions.publish_timeout``, then raises :class:`BusError`. A
confirm lost with the connection means a retry may store an event twice: consumers are
idempotent (delivery is at least once).

Consuming: each subscription has its own channel with ``basic.qos(prefetch)`` per queue and
runs at most ``prefetch`` handlers at once. A message is acknowledged only after its handler
returned; the verdict (``_delivery.py``) decides between ack, requeue after a growing delay
(``basic.nack``; the quorum queue counts the delivery) and dead-lettering. The bus dead-letters
by publishing a copy to the dead-letter exchange (confirmed) and then acknowledging, so the
dead letter carries its reason and origin in headers (``x-pacsflow-reason``,
``x-pacsflow-queue``, ...). The broker's own ``x-delivery-limit`` stays as a backstop for a
message whose deliveries never settle (a consumer that crashes on it); its dead letters carry
the broker's ``x-death`` header instead. Replay publishes a dead letter through the default
exchange to its original queue, so only that service sees it again.

Recovery: the connection is ``aio_pika.connect_robust``, which re-establishes the transport.
The channels are plain channels that this module re-opens itself: aio-pika's robust channels
have a history of consumers that silently do not come back after a broker restart or a
broker-side cancel (aio-pika issues #231, #334, #588, #626), which would leave a queue filling
up while ``/readyz`` says all is well. So on reconnect, on an unexpected channel close and on a
consumer cancel the subscription is consumed again on a new channel (queues and bindings
re-declared), and a watchdog checks every ``watchdog_interval`` seconds that each of our queues
has a consumer on the broker (a passive declare's consumer count) and subscribes again when one
is missing twice in a row. :meth:`RabbitBus.ready` reports the connection and the consumers.

Time limits: RabbitMQ closes the channel of a consumer that holds a message unacknowledged
longer than its consumer timeout (30 minutes by default), which would redeliver every message
in flight on it. Handlers therefore run under ``BusOptions.handler_timeout`` (10 minutes by
default); a handler still running then is cancelled and its message retried. Long work (a
C-MOVE of a whole study, an archive) belongs in the state store: the handler records the job
and returns, and the job reports its result with a new event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
    ExchangeType,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from prometheus_client import CollectorRegistry

from pacsflow.bus._delivery import (
    BusOptions,
    Dispatcher,
    Verdict,
    dead_letter_queue_name,
    drain_handlers,
    queue_name,
)
from pacsflow.bus.base import DeadLetter, Handler
from pacsflow.bus.metrics import BusMetrics
from pacsflow.config import SERVICES, BusSettings
from pacsflow.errors import BusError
from pacsflow.events import EVENT_TYPES, Event, encode_event

__all__ = ["RabbitBus"]

# Headers a dead letter carries (besides the original message's own).
H_DEAD_LETTER_ID = "x-pacsflow-dead-letter-id"
H_QUEUE = "x-pacsflow-queue"
H_SERVICE = "x-pacsflow-service"
H_EVENT_TYPE = "x-pacsflow-event-type"
H_REASON = "x-pacsflow-reason"
H_DELIVERIES = "x-pacsflow-deliveries"
H_DEAD_LETTERED_AT = "x-pacsflow-dead-lettered-at"
#: how many times a message was replayed from the dead letters
H_REPLAYS = "x-pacsflow-replays"

# Headers that describe a past life of the message and must not follow it back to its queue.
_DEAD_LETTER_HEADERS = frozenset(
    {
        H_DEAD_LETTER_ID,
        H_QUEUE,
        H_SERVICE,
        H_EVENT_TYPE,
        H_REASON,
        H_DELIVERIES,
        H_DEAD_LETTERED_AT,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
    }
)

_REASON_MAX = 2000
# One attempt of an operation on the broker; the publish deadline bounds the retries.
_ATTEMPT_TIMEOUT = 15.0
_RETRYABLE = (*CONNECTION_EXCEPTIONS, TimeoutError)


@dataclass(eq=False)
class _Subscription:
    service: str
    event_types: tuple[str, ...]
    dispatcher: Dispatcher
    slots: asyncio.Semaphore
    channel: AbstractChannel | None = None
    # event type -> (queue, consumer tag); strong references keep the queue objects alive
    consumers: dict[str, tuple[AbstractQueue, str]] = field(default_factory=dict)
    running: set[asyncio.Task[None]] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    restoring: asyncio.Task[None] | None = None
    # Consecutive watchdog checks that found no consumer on the broker.
    missing: int = 0


class RabbitBus:
    """The event bus on RabbitMQ; see the module docstring for topology and semantics."""

    backend = "rabbitmq"

    def __init__(
        self,
        settings: BusSettings,
        *,
        registry: CollectorRegistry,
        logger: logging.Logger | None = None,
        options: BusOptions | None = None,
    ) -> None:
        self._settings = settings
        self._options = options or BusOptions.from_settings(settings)
        self._logger = logger or logging.getLogger("pacsflow.bus")
        self._metrics = BusMetrics(registry, self.backend)
        self._dlx_name = f"{settings.exchange}.dead-letters"
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._publish_exchanges: tuple[AbstractExchange, AbstractExchange] | None = None
        self._publish_lock = asyncio.Lock()
        self._subscriptions: list[_Subscription] = []
        # service -> event types whose queues this bus declared (for queue_depths)
        self._declared: dict[str, set[str]] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False
        # Set by close(): cuts retry delays short so their messages go back at once.
        self._stopping = asyncio.Event()
        self._up = False

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, declare the exchanges, start the watchdog; BusError when unreachable."""
        if self._connection is not None:
            return
        self._closing = False
        self._stopping.clear()
        try:
            # The first attempt fails fast (BusError); later losses are retried for ever.
            connection = await aio_pika.connect_robust(
                self._settings.url.get_secret_value(),
                timeout=self._options.connect_timeout,
                reconnect_interval=self._options.reconnect_interval,
                client_properties={"connection_name": "pacsflow bus"},
            )
        except _RETRYABLE as err:
            raise BusError(f"cannot connect to RabbitMQ: {_describe(err)}") from err
        self._connection = connection
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        try:
            async with self._channel() as channel:
                await self._declare_exchanges(channel)
        except _RETRYABLE as err:
            await self.close()
            raise BusError(f"cannot declare the exchanges on RabbitMQ: {err}") from err
        self._up = True
        self._metrics.set_connected(True)
        self._watchdog = asyncio.create_task(self._watch(), name="pacsflow-bus-watchdog")

    async def close(self) -> None:
        """Stop consuming, wait for running handlers (up to close_timeout), disconnect."""
        connection = self._connection
        if connection is None:
            return
        self._closing = True
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        restoring = [s.restoring for s in self._subscriptions if s.restoring is not None]
        for task in restoring:
            task.cancel()
        await asyncio.gather(*restoring, return_exceptions=True)
        for sub in self._subscriptions:
            await self._cancel_consumers(sub)
        await drain_handlers(
            [task for sub in self._subscriptions for task in sub.running],
            self._options.close_timeout,
            self._logger,
        )
        for sub in self._subscriptions:
            await self._close_channel(sub.channel)
        await self._close_channel(self._publish_channel)
        self._publish_channel = self._publish_exchanges = None
        self._subscriptions.clear()
        self._connection = None
        connection.close_callbacks.discard(self._on_connection_lost)
        with contextlib.suppress(*_RETRYABLE):
            async with asyncio.timeout(self._options.connect_timeout):
                await connection.close()
        self._metrics.set_connected(False)

    async def ready(self) -> bool:
        """True when connected and every subscription has its consumers."""
        if not self._connected() or self._closing:
            return False
        for sub in self._subscriptions:
            if sub.missing or not await self._consuming_locally(sub):
                return False
        return True

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, *events: Event) -> None:
        """Publish persistent messages; return once the broker confirmed every one."""
        if not events:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.publish_timeout
        pending = [(event, self._event_message(event)) for event in events]
        pause = 0.1
        attempt = 0
        last_error: BaseException | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BusError(
                    f"RabbitMQ did not confirm {len(pending)} of {len(events)} event(s) within "
                    f"{self._options.publish_timeout:g} s: {_describe(last_error)}"
                )
            timeout = min(remaining, _ATTEMPT_TIMEOUT)
            try:
                async with asyncio.timeout(timeout):
                    exchange, _ = await self._publisher()
            except _RETRYABLE as err:
                results: list[BaseException | None] = [err] * len(pending)
            else:
                results = await asyncio.gather(
                    *(self._publish_one(exchange, m, e.type, timeout) for e, m in pending),
                    return_exceptions=True,
                )
            failed = []
            for (event, message), result in zip(pending, results, strict=True):
                if result is None:
                    self._metrics.published.labels(event.source.service, event.type).inc()
                elif isinstance(result, _RETRYABLE):
                    failed.append((event, message))
                    last_error = result
                else:
                    raise result
            if not failed:
                return
            pending = failed
            attempt += 1
            self._metrics.publish_retries.inc()
            log = self._logger.warning if attempt == 1 else self._logger.debug
            log(
                "publishing %d event(s) failed (%s); retrying until confirmed",
                len(pending),
                _describe(last_error),
            )
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
            pause = min(pause * 2, 2.0)

    async def _publish_one(
        self, exchange: AbstractExchange, message: aio_pika.Message, key: str, timeout: float
    ) -> None:
        async with asyncio.timeout(timeout):
            await exchange.publish(message, routing_key=key, mandatory=False)

    async def _publisher(self) -> tuple[AbstractExchange, AbstractExchange]:
        """The event and dead-letter exchanges on an open confirming channel; the channel is
        opened again (and the exchanges declared again) after a broker restart."""
        async with self._publish_lock:
            channel = self._publish_channel
            if channel is None or channel.is_closed or self._publish_exchanges is None:
                connection = await self._wait_connected()
                channel = aio_pika.Channel(connection, publisher_confirms=True)
                await channel.initialize()
                try:
                    self._publish_exchanges = await self._declare_exchanges(channel)
                except BaseException:
                    await self._close_channel(channel)
                    raise
                self._publish_channel = channel
            assert self._publish_exchanges is not None
            return self._publish_exchanges

    @staticmethod
    def _event_message(event: Event) -> aio_pika.Message:
        return aio_pika.Message(
            encode_event(event),
            content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=str(event.id),
            correlation_id=event.correlation_id,
            type=event.type,
            timestamp=event.time,
            app_id=event.source.service,
        )

    # --- queues ----------------------------------------------------------------------------

    def _queue_arguments(self, service: str) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self._settings.delivery_limit,
            "x-dead-letter-exchange": self._dlx_name,
            "x-dead-letter-routing-key": self._dl_queue(service),
            # Dead letters survive a broker restart too (needs reject-publish on overflow).
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def _dl_queue(self, service: str) -> str:
        return dead_letter_queue_name(self._settings.queue_prefix, service)

    async def _declare_exchanges(
        self, channel: AbstractChannel
    ) -> tuple[AbstractExchange, AbstractExchange]:
        events = await channel.declare_exchange(
            self._settings.exchange, ExchangeType.TOPIC, durable=True, timeout=_ATTEMPT_TIMEOUT
        )
        dead = await channel.declare_exchange(
            self._dlx_name, ExchangeType.DIRECT, durable=True, timeout=_ATTEMPT_TIMEOUT
        )
        return events, dead

    async def _declare_queues(
        self, channel: AbstractChannel, service: str, event_types: Sequence[str]
    ) -> dict[str, AbstractQueue]:
        """Declare (again) the service's queues and bindings; event type -> queue."""
        await self._declare_exchanges(channel)
        dead = await channel.declare_queue(
            self._dl_queue(service),
            durable=True,
            arguments={"x-queue-type": "classic"},
            timeout=_ATTEMPT_TIMEOUT,
        )
        await dead.bind(self._dlx_name, self._dl_queue(service), timeout=_ATTEMPT_TIMEOUT)
        queues = {}
        for event_type in event_types:
            name = queue_name(self._settings.queue_prefix, service, event_type)
            try:
                queue = await channel.declare_queue(
                    name,
                    durable=True,
                    arguments=self._queue_arguments(service),
                    timeout=_ATTEMPT_TIMEOUT,
                )
            except aiormq.exceptions.ChannelPreconditionFailed as err:
                wanted = self._queue_arguments(service)
                raise BusError(
                    f"queue {name} exists with other arguments than {wanted} (a changed "
                    f"delivery_limit?); drain and delete it to re-create it: {err}"
                ) from err
            await queue.bind(self._settings.exchange, event_type, timeout=_ATTEMPT_TIMEOUT)
            queues[event_type] = queue
        self._declared.setdefault(service, set()).update(event_types)
        return queues

    async def declare(self, service: str, event_types: Sequence[str]) -> None:
        """Create the service's durable queues so events are kept before it consumes."""
        try:
            async with self._channel() as channel:
                await self._declare_queues(channel, service, event_types)
        except _RETRYABLE as err:
            raise BusError(f"cannot declare the queues of {service}: {err}") from err

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready per queue, dead-letter queues included: the queues of the services
        this bus declared or subscribed; a bus that declared none (the command line) looks
        for every known service's queues."""
        prefix = self._settings.queue_prefix
        names: dict[str, None] = {}
        # Probing a queue that does not exist costs a channel and an error in the broker's
        # log, so a service's bus only looks at its own queues.
        if self._declared:
            wanted = {service: set(types) for service, types in self._declared.items()}
        else:
            wanted = {service: set(EVENT_TYPES) for service in SERVICES}
        for service, types in wanted.items():
            for event_type in sorted(types):
                names[queue_name(prefix, service, event_type)] = None
            names[self._dl_queue(service)] = None
        depths = {}
        for name in names:
            declared = await self._passive(name)
            if declared is not None:
                depths[name] = declared.message_count or 0
        return depths

    async def _passive(self, name: str) -> aiormq.spec.Queue.DeclareOk | None:
        """The queue's counters, or None when it does not exist."""
        try:
            async with self._channel() as channel:
                queue = await channel.declare_queue(name, passive=True, timeout=_ATTEMPT_TIMEOUT)
                return queue.declaration_result
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except _RETRYABLE as err:
            raise BusError(f"cannot inspect queue {name}: {err}") from err

    # --- consuming -------------------------------------------------------------------------

    async def subscribe(self, service: str, event_types: Sequence[str], handler: Handler) -> None:
        """Declare the service's queues and consume them, at most ``prefetch`` at a time."""
        types = tuple(dict.fromkeys(event_types))
        sub = _Subscription(
            service=service,
            event_types=types,
            dispatcher=Dispatcher(
                service,
                handler,
                delivery_limit=self._settings.delivery_limit,
                options=self._options,
                metrics=self._metrics,
                logger=self._logger,
            ),
            slots=asyncio.Semaphore(self._settings.prefetch),
        )
        try:
            await self._consume(sub)
        except _RETRYABLE as err:
            raise BusError(f"cannot consume the queues of {service}: {err}") from err
        self._subscriptions.append(sub)

    async def _consume(self, sub: _Subscription) -> None:
        """Consume the subscription's queues on a new channel (closing the old one)."""
        async with sub.lock:
            old, sub.channel = sub.channel, None
            await self._close_channel(old)
            connection = await self._wait_connected()
            channel = aio_pika.Channel(connection, publisher_confirms=False)
            async with asyncio.timeout(_ATTEMPT_TIMEOUT * 2):
                await channel.initialize()
                try:
                    # Per consumer: quorum queues do not support a channel-wide (global) QoS.
                    await channel.set_qos(prefetch_count=self._settings.prefetch)
                    queues = await self._declare_queues(channel, sub.service, sub.event_types)
                    consumers = {}
                    for event_type, queue in queues.items():
                        callback = functools.partial(self._on_message, sub, queue.name, event_type)
                        tag = await queue.consume(callback, timeout=_ATTEMPT_TIMEOUT)
                        consumers[event_type] = (queue, tag)
                except BaseException:
                    await self._close_channel(channel)
                    raise
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(
                functools.partial(self._on_consumer_cancelled, sub, channel)
            )
            channel.close_callbacks.add(functools.partial(self._on_channel_closed, sub))
            sub.channel, sub.consumers, sub.missing = channel, consumers, 0

    async def _on_message(
        self, sub: _Subscription, queue: str, event_type: str, message: AbstractIncomingMessage
    ) -> None:
        # Run the handler in a task of our own: aiormq cancels its delivery tasks when the
        # channel closes, and a handler half-way through a commit should finish instead.
        task = asyncio.create_task(self._process(sub, queue, event_type, message))
        sub.running.add(task)
        task.add_done_callback(sub.running.discard)

    async def _process(
        self, sub: _Subscription, queue: str, event_type: str, message: AbstractIncomingMessage
    ) -> None:
        async with sub.slots:
            if self._closing or message.channel.is_closed:
                # The broker gives it back when the channel closes; handling it now would
                # only produce a result nobody can acknowledge.
                return
            deliveries = _delivery_count(message.headers) + 1
            verdict = await sub.dispatcher.handle(
                message.body, queue=queue, event_type=event_type, deliveries=deliveries
            )
        try:
            await self._settle(sub, message, queue, event_type, deliveries, verdict)
        except _RETRYABLE as err:
            self._logger.warning(
                "could not %s a message of %s (%s); the broker will deliver it again",
                verdict.action, queue, _describe(err),
            )

    async def _settle(
        self,
        sub: _Subscription,
        message: AbstractIncomingMessage,
        queue: str,
        event_type: str,
        deliveries: int,
        verdict: Verdict,
    ) -> None:
        if verdict.action == "ack":
            await message.ack()
        elif verdict.action == "retry":
            # Hold the message (not a handler slot) for the delay so a failing handler
            # does not spin; the nack makes the quorum queue count the delivery.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(verdict.delay):
                    await self._stopping.wait()
            await message.nack(requeue=True)
        else:
            try:
                await self._dead_letter(
                    sub.service, message, queue, event_type, deliveries, verdict.reason
                )
            except _RETRYABLE:
                if not message.channel.is_closed:
                    await asyncio.sleep(self._options.retry_delay_for(deliveries))
                    await message.nack(requeue=True)
                raise
            await message.ack()

    async def _dead_letter(
        self,
        service: str,
        message: AbstractIncomingMessage,
        queue: str,
        event_type: str,
        deliveries: int,
        reason: str,
    ) -> None:
        """Publish a copy with the reason to the service's dead-letter queue (confirmed)."""
        headers = {
            k: v for k, v in (message.headers or {}).items() if k not in _DEAD_LETTER_HEADERS
        }
        headers.update(
            {
                H_DEAD_LETTER_ID: uuid.uuid4().hex,
                H_QUEUE: queue,
                H_SERVICE: service,
                H_EVENT_TYPE: event_type,
                H_REASON: reason[:_REASON_MAX],
                H_DELIVERIES: deliveries,
                H_DEAD_LETTERED_AT: datetime.now(UTC).isoformat(),
            }
        )
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            type=message.type,
            timestamp=message.timestamp,
            app_id=message.app_id,
        )
        async with asyncio.timeout(_ATTEMPT_TIMEOUT):
            _, dlx = await self._publisher()
            await dlx.publish(copy, routing_key=self._dl_queue(service), mandatory=False)

    async def _cancel_consumers(self, sub: _Subscription) -> None:
        channel = sub.channel
        if channel is None or channel.is_closed:
            return
        for queue, tag in sub.consumers.values():
            with contextlib.suppress(*_RETRYABLE):
                await queue.cancel(tag, timeout=_ATTEMPT_TIMEOUT)

    # --- recovery --------------------------------------------------------------------------

    def _on_connection_lost(self, *_: Any) -> None:
        # Called again for every failed reconnect attempt: log the loss only once.
        if self._up and not self._closing:
            self._logger.warning("lost the connection to RabbitMQ; reconnecting")
        self._up = False
        self._metrics.set_connected(False)

    def _on_reconnected(self, *_: Any) -> None:
        self._up = True
        self._metrics.set_connected(True)
        self._metrics.reconnected()
        self._logger.info(
            "reconnected to RabbitMQ; consuming again on %d subscription(s)",
            len(self._subscriptions),
        )
        for sub in self._subscriptions:
            self._restore_soon(sub, "reconnected")

    def _on_channel_closed(self, sub: _Subscription, channel: Any, *_: Any) -> None:
        # Our own closes (resubscribe, close()) replace sub.channel first.
        if sub.channel is channel and not self._closing:
            self._restore_soon(sub, "its channel closed")

    def _on_consumer_cancelled(self, sub: _Subscription, channel: AbstractChannel, *_: Any) -> None:
        if sub.channel is channel and not self._closing:
            self._restore_soon(sub, "the broker cancelled its consumer")

    def _restore_soon(self, sub: _Subscription, why: str) -> None:
        if self._closing or (sub.restoring is not None and not sub.restoring.done()):
            return
        sub.restoring = asyncio.create_task(self._restore(sub, why))

    async def _restore(self, sub: _Subscription, why: str) -> None:
        """Consume the subscription again, retrying while the broker is coming back."""
        pause = 0.2
        while not self._closing:
            try:
                await self._consume(sub)
            except (*_RETRYABLE, BusError) as err:
                # While the broker is away failing is expected; with a connection it is news.
                log = self._logger.warning if self._connected() else self._logger.debug
                log("consuming %s again failed, retrying: %s", sub.service, _describe(err))
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            self._metrics.consumer_restores.labels(sub.service).inc()
            self._logger.info("consuming again for %s (%s)", sub.service, why)
            return

    async def _watch(self) -> None:
        """Every watchdog_interval: does each subscription have its consumers on the broker?"""
        # The loop ends on ``_closing`` as well as on cancellation: a cancel that lands inside a
        # broker call can come back as a channel error, which the check below swallows.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._options.watchdog_interval):
                    await self._stopping.wait()
            if self._closing:
                return
            if not self._connected():
                continue  # the reconnect callback restores the subscriptions
            for sub in list(self._subscriptions):
                if sub.restoring is not None and not sub.restoring.done():
                    continue
                try:
                    healthy = await self._consuming_on_broker(sub)
                except (*_RETRYABLE, BusError) as err:
                    self._logger.debug("watchdog could not check %s: %s", sub.service, err)
                    continue
                sub.missing = 0 if healthy else sub.missing + 1
                if sub.missing >= 2:
                    self._logger.warning(
                        "watchdog: %s has no consumer on RabbitMQ; subscribing again",
                        sub.service,
                    )
                    self._restore_soon(sub, "the watchdog found no consumer")

    async def _consuming_locally(self, sub: _Subscription) -> bool:
        channel = sub.channel
        if channel is None or channel.is_closed:
            return False
        underlay = await channel.get_underlay_channel()
        if not isinstance(underlay, aiormq.Channel) or underlay.is_closed:
            return False
        return all(tag in underlay.consumers for _, tag in sub.consumers.values())

    async def _consuming_on_broker(self, sub: _Subscription) -> bool:
        if not await self._consuming_locally(sub):
            return False
        for queue, _ in sub.consumers.values():
            declared = await self._passive(queue.name)
            if declared is None or not declared.consumer_count:
                return False
        return True

    # --- dead letters ----------------------------------------------------------------------

    async def dead_letter_count(self, service: str) -> int:
        """Messages in the service's dead-letter queue (0 when it does not exist yet)."""
        try:
            declared = await self._passive(self._dl_queue(service))
        except _RETRYABLE as err:
            raise BusError(f"cannot count the dead letters of {service}: {err}") from err
        return 0 if declared is None else declared.message_count or 0

    async def dead_letters(self, service: str) -> list[DeadLetter]:
        """The service's dead letters, oldest first (read without removing them)."""
        letters: list[DeadLetter] = []
        try:
            async with self._dead_letter_messages(service) as messages:
                async for message in messages:
                    letters.append(self._dead_letter_of(service, message))
        except _RETRYABLE as err:
            raise BusError(f"cannot read the dead letters of {service}: {err}") from err
        return letters

    async def replay_dead_letters(self, service: str, ids: Sequence[str] | None = None) -> int:
        """Send dead letters back to the queue they came from (through the default exchange)."""
        wanted = None if ids is None else set(ids)
        count = 0
        try:
            async with self._dead_letter_messages(service, confirms=True) as messages:
                async for message in messages:
                    letter = self._dead_letter_of(service, message)
                    if wanted is not None and letter.id not in wanted:
                        continue
                    if not letter.queue:
                        self._logger.warning(
                            "dead letter %s of %s names no queue; left in place", letter.id, service
                        )
                        continue
                    headers = {
                        k: v for k, v in (message.headers or {}).items()
                        if k not in _DEAD_LETTER_HEADERS
                    }
                    replays = headers.get(H_REPLAYS)
                    headers[H_REPLAYS] = (replays if isinstance(replays, int) else 0) + 1
                    replay = aio_pika.Message(
                        message.body,
                        headers=headers,
                        content_type=message.content_type,
                        delivery_mode=DeliveryMode.PERSISTENT,
                        message_id=message.message_id,
                        correlation_id=message.correlation_id,
                        type=message.type,
                        timestamp=message.timestamp,
                        app_id=message.app_id,
                    )
                    channel = messages.channel
                    try:
                        async with asyncio.timeout(_ATTEMPT_TIMEOUT):
                            # mandatory: a queue deleted since would drop it silently
                            await channel.default_exchange.publish(
                                replay, routing_key=letter.queue, mandatory=True
                            )
                    except aio_pika.exceptions.PublishError:
                        self._logger.warning(
                            "dead letter %s of %s: queue %s is gone; left in place",
                            letter.id, service, letter.queue,
                        )
                        continue
                    await message.ack()
                    count += 1
        except _RETRYABLE as err:
            raise BusError(f"cannot replay the dead letters of {service}: {err}") from err
        if count:
            self._logger.info("replayed %d dead letter(s) of %s", count, service)
        return count

    async def purge_dead_letters(self, service: str, ids: Sequence[str] | None = None) -> int:
        """Delete dead letters (all, or those ids); returns how many."""
        count = 0
        try:
            if ids is None:
                async with self._channel() as channel:
                    try:
                        queue = await channel.declare_queue(
                            self._dl_queue(service), passive=True, timeout=_ATTEMPT_TIMEOUT
                        )
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        return 0
                    result = await queue.purge(timeout=_ATTEMPT_TIMEOUT)
                    count = result.message_count or 0
            else:
                wanted = set(ids)
                async with self._dead_letter_messages(service) as messages:
                    async for message in messages:
                        if self._dead_letter_of(service, message).id in wanted:
                            await message.ack()
                            count += 1
        except _RETRYABLE as err:
            raise BusError(f"cannot purge the dead letters of {service}: {err}") from err
        if count:
            self._logger.info("purged %d dead letter(s) of %s", count, service)
        return count

    @contextlib.asynccontextmanager
    async def _dead_letter_messages(
        self, service: str, *, confirms: bool = False
    ) -> AsyncIterator[_DeadLetterReader]:
        """The dead-letter queue's messages, taken without ack: whatever the caller does not
        acknowledge returns to the queue, in its place, when the channel closes."""
        async with self._channel(confirms=confirms) as channel:
            try:
                queue = await channel.declare_queue(
                    self._dl_queue(service), passive=True, timeout=_ATTEMPT_TIMEOUT
                )
            except aiormq.exceptions.ChannelNotFoundEntity:
                yield _DeadLetterReader(channel, None, 0)
                return
            # Only what is there now: letters arriving meanwhile wait for the next call.
            total = queue.declaration_result.message_count or 0
            yield _DeadLetterReader(channel, queue, total)

    def _dead_letter_of(self, service: str, message: AbstractIncomingMessage) -> DeadLetter:
        headers = message.headers or {}
        deaths = headers.get("x-death")
        death = deaths[0] if isinstance(deaths, list) and deaths else {}
        if not isinstance(death, dict):
            death = {}
        queue = _text(headers.get(H_QUEUE)) or _text(headers.get("x-first-death-queue"))
        queue = queue or _text(death.get("queue"))
        reason = _text(headers.get(H_REASON))
        if not reason:
            broker_reason = _text(headers.get("x-first-death-reason")) or _text(death.get("reason"))
            reason = {
                "delivery_limit": "the broker's delivery limit was reached (the deliveries "
                "never settled: a consumer crashed or lost its connection each time)",
                "rejected": "rejected by a consumer",
                "expired": "expired in its queue",
                "maxlen": "dropped for the queue's length limit",
            }.get(broker_reason or "", broker_reason or "unknown")
        event_type = _text(headers.get(H_EVENT_TYPE)) or message.type
        if not event_type:
            keys = death.get("routing-keys")
            event_type = _text(keys[0]) if isinstance(keys, list) and keys else None
        deliveries = headers.get(H_DELIVERIES)
        if not isinstance(deliveries, int):
            deliveries = (
                self._settings.delivery_limit + 1
                if _text(headers.get("x-first-death-reason")) == "delivery_limit"
                else 0
            )
        when = _time(headers.get(H_DEAD_LETTERED_AT)) or _time(death.get("time"))
        letter_id = (
            _text(headers.get(H_DEAD_LETTER_ID))
            or message.message_id
            or hashlib.sha256(message.body).hexdigest()[:32]
        )
        return DeadLetter(
            id=letter_id,
            service=_text(headers.get(H_SERVICE)) or service,
            queue=queue or "",
            event_type=event_type,
            body=message.body,
            reason=reason,
            deliveries=deliveries,
            time=when,
        )

    # --- helpers ---------------------------------------------------------------------------

    def _connected(self) -> bool:
        connection = self._connection
        return (
            connection is not None
            and not connection.is_closed
            and connection.connected.is_set()
            and connection.transport is not None
        )

    async def _wait_connected(self) -> AbstractRobustConnection:
        """The connection once its transport is up (the caller bounds the wait)."""
        while True:
            connection = self._connection
            if connection is None or self._closing:
                raise BusError("the bus is closed")
            if self._connected():
                return connection
            await connection.connected.wait()

    @contextlib.asynccontextmanager
    async def _channel(self, *, confirms: bool = False) -> AsyncIterator[AbstractChannel]:
        """A short-lived plain channel (a passive declare of a missing queue closes it)."""
        async with asyncio.timeout(_ATTEMPT_TIMEOUT):
            connection = await self._wait_connected()
        channel = aio_pika.Channel(
            connection, publisher_confirms=confirms, on_return_raises=confirms
        )
        async with asyncio.timeout(_ATTEMPT_TIMEOUT):
            await channel.initialize()
        try:
            yield channel
        finally:
            await self._close_channel(channel)

    async def _close_channel(self, channel: AbstractChannel | None) -> None:
        if channel is None or channel.is_closed:
            return
        with contextlib.suppress(*_RETRYABLE):
            async with asyncio.timeout(_ATTEMPT_TIMEOUT):
                await channel.close()


class _DeadLetterReader:
    """Iterates over a dead-letter queue with basic.get, at most the messages present."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue | None, total: int) -> None:
        self.channel = channel
        self._queue = queue
        self._left = total

    def __aiter__(self) -> _DeadLetterReader:
        return self

    async def __anext__(self) -> AbstractIncomingMessage:
        if self._queue is None or self._left <= 0:
            raise StopAsyncIteration
        self._left -= 1
        message = await self._queue.get(no_ack=False, fail=False, timeout=_ATTEMPT_TIMEOUT)
        if message is None:
            raise StopAsyncIteration
        return message


def _describe(err: BaseException | None) -> str:
    """An error for a log line; some AMQP errors have an empty message."""
    if err is None:
        return "no error"
    return str(err) or type(err).__name__


def _delivery_count(headers: Any) -> int:
    """Earlier deliveries of a message, from the quorum queue's x-delivery-count header."""
    if not headers:
        return 0
    value = headers.get("x-delivery-count")
    return value if isinstance(value, int) and value >= 0 else 0


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return None


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = _text(value)
    if text:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(text)
    return None
