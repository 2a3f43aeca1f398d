"""The uploader: file-ready events in, C-STORE to every destination, outcomes in the ledger.

How work flows (see :mod:`.deliveries` for the ledger side):

1. ``file-ready`` adds a pending delivery per file and destination, then is acknowledged; the
   event is not held while files are sent. A destination that is idle without an open
   association starts associating at once, so the first chunk finds it open.
2. Each destination has a sender loop. While the load gate is open and the destination's
   breaker is closed, it claims due pending deliveries ahead, in batches (one statement on
   PostgreSQL), into a buffer that holds the free places' chunks plus one chunk per
   association; it claims again once the buffer is down to half. Every association has
   two chunks at a time (one being sent, one waiting); when a chunk ends, the next one goes
   out at once from the buffer, so no association waits for the ledger. The first chunk of
   an association not yet proven is a file or two: its answer opens the next association.
   Claimed work the buffer still holds is given back as pending (no attempt used) when the
   destination rests, the load gate closes or the uploader stops.
3. Results come back per chunk. Each file's outcome is turned into a settlement: sent,
   warning (stored; the warning is recorded), unsupported (the presentation context was
   refused: never retried), failed (after ``max_attempts`` answers that were failures or
   no answer at all), or pending again after an exponential backoff. Files not tried because
   no association could be made use no attempt; they wait while the destination's breaker
   is open.
4. Settlements are recorded in batches (one statement on PostgreSQL), together with the
   ``file-sent`` / ``file-failed`` events that report them (one event per batch and kind, in
   an outbox); a publisher task publishes the events after the commit while the next batch
   is recorded, off the path of the C-STOREs.

Stopping lets the chunks in flight finish (up to a grace period) and records them, so a
restart sends nothing twice; a crash leaves them for :meth:`DeliveryQueue.take_back`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence

from pacsflow.bus import EventBus, RejectEvent
from pacsflow.config import LoggingSettings, Node, UploaderSettings
from pacsflow.dicom.options import NetworkOptions
from pacsflow.errors import BusError, DicomError, StoreError
from pacsflow.events import (
    Event,
    FileFailed,
    FileOutcome,
    FileOutcomePayload,
    FileReady,
    FileSent,
    Source,
    decode_event,
)
from pacsflow.store.ledger import DeliveryStatus
from prometheus_client import CollectorRegistry, Counter

from pacsflow_uploader.backpressure import Breaker, LoadGate, backoff, load_per_core
from pacsflow_uploader.deliveries import Claim, DeliveryQueue, Settlement
from pacsflow_uploader.files import FileJob
from pacsflow_uploader.metrics import UploaderMetrics
from pacsflow_uploader.pool import SenderPool
from pacsflow_uploader.scu import SendResult
from pacsflow_uploader.slots import ChunkResult

__all__ = ["Uploader", "default_associations", "default_processes"]

log = logging.getLogger(__name__)

# Chunks handed to one association at a time: one being sent, one waiting in its queue, so
# the association never idles while the next chunk is handed over.
_CHUNKS_PER_ASSOCIATION = 2
# Claimed ahead per usable association, in chunks, kept in memory: a chunk that ends is
# followed at once from there, never by a claim's round trip; claims come in batches.
_PREFETCH_CHUNKS = 1
# Files in the first chunk of an association not yet proven: its answer opens the next
# association (the ramp), so it comes after a file or two, not after a whole chunk.
_PROBE_FILES = 2
# Chunks of a file-ready batch scheduled on their own first when a destination is idle.
_HEAD_CHUNKS = 2
# How long a destination loop sleeps when nothing is due and nobody wakes it.
_POLL_SECONDS = 5.0
# Outcomes are recorded in batches of at most this many, or after this long.
_SETTLE_BATCH = 500
_SETTLE_DELAY = 0.05
# Files per file-sent / file-failed event.
_EVENT_FILES = 1000
# A peer that refused an extra association is asked again for more after this long.
_LIMIT_RETRY_SECONDS = 600.0
# How long stopping waits for the chunks in flight.
_STOP_GRACE_SECONDS = 30.0


def default_associations() -> int:
    """Associations per destination when not configured: two per core, 2 to 8."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def default_processes(slots: int) -> int:
    """Sender processes when not configured: one per core, at most one per association."""
    return max(1, min(os.cpu_count() or 1, slots))


class _Destination:
    """One destination's sender loop, associations and breaker."""

    def __init__(self, uploader: Uploader, name: str, node: Node) -> None:
        self.up = uploader
        self.name = name
        self.node = node
        settings = uploader.settings
        self.slots = uploader.associations
        self.breaker = Breaker(
            settings.retry_initial_seconds, settings.retry_max_seconds,
            uploader.metrics.destination_paused.labels(destination=name),
        )  # fmt: skip
        self.outstanding = [0] * self.slots
        self.open = [False] * self.slots
        # When each slot last came back from a chunk: its association is released after
        # idle_release_seconds without work, in the sender process.
        self.last_used = [0.0] * self.slots
        # Associations are added one at a time, each once the previous one worked, so a
        # PACS that serves one at a time answers the first (ramp: how many may be used).
        self.ramp = 1
        # Associations the peer takes, once it refused one more (None: as configured).
        self.limit: int | None = None
        self.limit_until = 0.0
        self.in_flight = 0
        # Claimed, not yet handed to an association (status ``sending``, renewed with the
        # rest; given back as pending when the destination rests or the uploader stops).
        self.buffer: deque[Claim] = deque()
        # Slots whose association answered since the ramp (re)started.
        self.proven: set[int] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._associating = False
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        # This destination's metric series, looked up once: labels() costs more than the
        # update, and every file updates several.
        metrics = uploader.metrics
        self._store_seconds = metrics.store_seconds.labels(destination=name)
        self._delivery_seconds = metrics.delivery_seconds.labels(destination=name)
        self._counted: dict[str, tuple[Counter, Counter]] = {}

    @property
    def idle(self) -> bool:
        """Nothing claimed, nothing being sent."""
        return not self.buffer and not self.in_flight

    def associate_ahead(self, presentations: Sequence[tuple[str, str]]) -> None:
        """Open the first association while new work is scheduled and claimed, when the
        destination is idle without one: its first chunk then starts sending at once."""
        recent = time.monotonic() - self.last_used[0] < self.up.settings.idle_release_seconds
        if not self.idle or (self.open[0] and recent) or self._associating or not self._may_send():
            return
        self._associating = True
        task = asyncio.create_task(self._associate(presentations), name=f"associate-{self.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(self.up._send_ended)

    async def _associate(self, presentations: Sequence[tuple[str, str]]) -> None:
        try:
            result = await self.up.pool.associate((self.name, 0), self.node, presentations)
        finally:
            self._associating = False
        if result.association_error is not None:
            # The first chunk tries again, and reports and counts what goes wrong.
            log.debug("%s: association ahead of work: %s", self.name, result.association_error)
        elif result.association_open and not self.outstanding[0]:
            self.open[0] = True
            self.last_used[0] = time.monotonic()
            self.count_open()

    def wake(self) -> None:
        self._wake.set()
        self._changed.set()

    def _usable_slots(self) -> int:
        if self.limit is not None and time.monotonic() >= self.limit_until:
            log.info("%s: trying %d associations again", self.name, self.slots)
            self.limit = None
        usable = self.slots if self.limit is None else min(self.slots, self.limit)
        return min(usable, self.ramp)

    def count_open(self) -> None:
        """Update the associations-open gauge (idle ones count as released)."""
        idle_after = self.up.settings.idle_release_seconds + 5.0
        now = time.monotonic()
        for slot in range(self.slots):
            idle = not self.outstanding[slot] and now - self.last_used[slot] > idle_after
            if self.open[slot] and idle:
                self.open[slot] = False
        self.up.metrics.associations_open.labels(destination=self.name).set(sum(self.open))

    def _free_places(self) -> list[int]:
        """Slot numbers with room for a chunk, idle associations first."""
        usable = range(self._usable_slots())
        places = []
        for depth in range(_CHUNKS_PER_ASSOCIATION):
            places += [slot for slot in usable if self.outstanding[slot] <= depth]
        return places

    def stop(self) -> None:
        """Let the loop end at its next safe point (never inside a claim)."""
        self._wake.set()
        self._changed.set()

    def _prefetch_limit(self) -> int:
        """Claims to hold: the free places' chunks plus one chunk ahead per association."""
        chunk = self.up.settings.chunk_size
        return (len(self._free_places()) + _PREFETCH_CHUNKS * self._usable_slots()) * chunk

    def _may_send(self) -> bool:
        up = self.up
        return not (up.stopping.is_set() or up.load_gate.paused or self.breaker.remaining() > 0)

    def _dispatch(self) -> None:
        """Hand claimed work to every free place (idle associations first), now."""
        if not self.buffer or not self._may_send():
            return
        places = self._free_places()
        if not places:
            return
        chunk = self.up.settings.chunk_size
        # Few claims left: spread them, so no association idles while another has two chunks.
        size = max(1, min(chunk, math.ceil(len(self.buffer) / len(places))))
        for slot in places:
            if not self.buffer:
                break
            take = size
            if self.slots > 1 and slot not in self.proven and self.outstanding[slot] == 0:
                take = min(size, _PROBE_FILES)
            claims = [self.buffer.popleft() for _ in range(min(take, len(self.buffer)))]
            self._start(slot, claims)

    def release_buffer(self, next_attempt_at: float = 0.0) -> None:
        """Give claimed but unsent work back as pending (no attempt used)."""
        if not self.buffer:
            return
        claims, self.buffer = list(self.buffer), deque()
        self.up.recorder.add([
            Settlement(c, "pending", c.dimse_status, c.last_error, c.attempts,
                       next_attempt_at=next_attempt_at, in_doubt=c.in_doubt)
            for c in claims
        ])  # fmt: skip

    async def run(self) -> None:
        up = self.up
        while not up.stopping.is_set():
            if up.load_gate.paused:
                # Paused for a while: what was claimed ahead waits as pending meanwhile.
                self.release_buffer()
            await up.load_gate.wait(up.stopping)
            rest = self.breaker.remaining()
            if up.stopping.is_set():
                break
            if rest > 0:
                self.release_buffer(up.clock() + rest)
                await self._wait(self._wake, rest)
                continue
            self._dispatch()
            limit = self._prefetch_limit()
            # Claim when the buffer is down to half: fewer, larger claims.
            if len(self.buffer) * 2 > limit:
                self._changed.clear()
                await self._changed.wait()
                continue
            want = limit - len(self.buffer)
            self._wake.clear()
            self._changed.clear()
            try:
                claims = await up.queue.claim(self.name, want)
            except StoreError as err:
                log.warning("%s: cannot claim work: %s", self.name, err)
                await up.pause(1.0)
                continue
            got = len(claims)
            if claims and up.settings.verify_in_doubt and any(c.in_doubt for c in claims):
                claims = await up.verifier(self, claims)
            self.buffer.extend(claims)
            self._dispatch()
            if got >= want:
                continue
            # Nothing more is due now: wait for new work, a chunk's end or the next due time.
            if not self.buffer and not self.in_flight:
                await self._idle()
            elif not self._changed.is_set():
                await self._wait(self._changed, _POLL_SECONDS)

    async def _idle(self) -> None:
        try:
            due = await self.up.queue.next_due(self.name)
        except StoreError as err:
            # The database restarting is no reason to stop: poll again after the usual wait.
            log.warning("%s: cannot read the next due time: %s", self.name, err)
            due = None
        timeout = _POLL_SECONDS
        if due is not None:
            timeout = min(_POLL_SECONDS, max(0.05, due - self.up.clock()))
        await self._wait(self._wake, timeout)

    @staticmethod
    async def _wait(event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()

    def _start(self, slot: int, claims: list[Claim]) -> None:
        self.outstanding[slot] += 1
        self.in_flight += len(claims)
        self.up.metrics.in_flight.labels(destination=self.name).set(self.in_flight)
        task = asyncio.create_task(self._send(slot, claims), name=f"send-{self.name}-{slot}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        # A bug in handling results must not leave deliveries claimed unnoticed.
        task.add_done_callback(self.up._send_ended)

    async def _send(self, slot: int, claims: list[Claim]) -> None:
        jobs = [
            FileJob(c.file_id, c.path, c.sop_class_uid, c.sop_instance_uid, c.transfer_syntax_uid)
            for c in claims
        ]
        try:
            result = await self.up.pool.run((self.name, slot), self.node, jobs)
        finally:
            self.outstanding[slot] -= 1
            self.in_flight -= len(claims)
            self.up.metrics.in_flight.labels(destination=self.name).set(self.in_flight)
            self._changed.set()
        self._handle(slot, claims, result)
        # The next chunk goes out now, from what was claimed ahead.
        self._dispatch()

    def _handle(self, slot: int, claims: list[Claim], chunk: ChunkResult) -> None:
        up = self.up
        if chunk.associations_opened:
            log.debug("%s: association %d opened", self.name, slot)
        self.open[slot] = chunk.association_open
        self.last_used[slot] = time.monotonic()
        self.count_open()
        resume_at = 0.0
        if chunk.association_error is not None:
            up.metrics.association_failures.labels(destination=self.name).inc()
            others = sum(1 for s, is_open in enumerate(self.open) if is_open and s != slot)
            if others:
                # The peer serves fewer associations than we open (storescp without --fork
                # serves one at a time): go on with those it took.
                self.limit, self.limit_until = others, time.monotonic() + _LIMIT_RETRY_SECONDS
                log.warning("%s takes no more than %d association(s) now (%s); using %d",
                            self.name, others, chunk.association_error, others)
            else:
                self.ramp = 1
                self.proven.clear()
                delay = self.breaker.failure()
                resume_at = up.clock() + delay
                # Resting: what was claimed ahead waits as pending, for any uploader.
                self.release_buffer(resume_at)
                log.warning("%s: %s; trying again in %.0f s (failure %d)", self.name,
                            chunk.association_error, delay, self.breaker.failures)
        by_key = {r.key: r for r in chunk.results}
        settlements = []
        answered = False
        for claim in claims:
            result = by_key.get(claim.file_id) or SendResult(
                claim.file_id, "error", error="the sender returned no result", transmitted=True
            )
            answered = answered or result.category in ("success", "warning", "failure", "refused")
            settlements.append(self._settle(claim, result, resume_at))
        if answered:
            self.breaker.success()
            self.proven.add(slot)
            if slot + 1 >= self.ramp:
                self.ramp = min(self.slots, slot + 2)
                self._changed.set()
        up.recorder.add(settlements)

    def _settle(self, claim: Claim, result: SendResult, resume_at: float) -> Settlement:
        up = self.up
        metrics = up.metrics
        name = self.name
        attempts = claim.attempts + 1
        if result.seconds and result.category != "invalid":
            self._store_seconds.observe(result.seconds)

        def count(status: str) -> None:
            series = self._counted.get(status)
            if series is None:
                series = self._counted[status] = (
                    metrics.files.labels(destination=name, status=status),
                    metrics.bytes.labels(destination=name, status=status),
                )
            series[0].inc()
            series[1].inc(result.size)

        if result.ok:
            count("sent" if result.category == "success" else "warning")
            self._delivery_seconds.observe(max(0.0, up.clock() - claim.queued_at))
            status: DeliveryStatus = "sent" if result.category == "success" else "warning"
            return Settlement(claim, status, result.status, result.error, attempts)
        if result.category == "refused":
            count("unsupported")
            return Settlement(claim, "unsupported", None, result.error, attempts)
        if result.category == "invalid":
            count("invalid")
            return Settlement(claim, "failed", None, result.error, attempts)
        if not result.attempted:
            # Never sent: no attempt used; it waits while the destination rests.
            metrics.retries.labels(destination=name, reason="not-sent").inc()
            return Settlement(
                claim, "pending", None, result.error, claim.attempts,
                next_attempt_at=resume_at, in_doubt=claim.in_doubt,
            )  # fmt: skip
        # A failure status, or no answer to a request that was (perhaps) received.
        in_doubt = claim.in_doubt or (result.category == "error" and result.transmitted)
        if attempts >= up.settings.max_attempts:
            count("failed")
            return Settlement(claim, "failed", result.status, result.error, attempts,
                              in_doubt=in_doubt)
        reason = "failure-status" if result.category == "failure" else "no-response"
        metrics.retries.labels(destination=name, reason=reason).inc()
        count("retry")
        delay = backoff(attempts, up.settings.retry_initial_seconds, up.settings.retry_max_seconds)
        return Settlement(
            claim, "pending", result.status, result.error, attempts,
            next_attempt_at=up.clock() + delay, in_doubt=in_doubt,
        )  # fmt: skip


class _Recorder:
    """Records settlements in batches, with their events; a second task publishes the events.

    Recording and publishing overlap: the next batch is recorded while the bus confirms the
    events of the one before, so neither the senders nor the next settlement wait for a
    publisher confirm.
    """

    def __init__(self, uploader: Uploader) -> None:
        self.up = uploader
        self._pending: list[Settlement] = []
        self._has_work = asyncio.Event()
        # Recorded batches whose events are not yet confirmed by the bus: (outbox ids, events).
        self._outgoing: deque[tuple[list[int], list[Event]]] = deque()
        self._has_outgoing = asyncio.Event()
        self._recording_done = False
        # Held while recording (settle_lock) and publishing (publish_lock), and both by the
        # outbox task, which skips what is queued here: an event is never published by both.
        self.settle_lock = asyncio.Lock()
        self.publish_lock = asyncio.Lock()
        self._closing = False

    def add(self, settlements: Sequence[Settlement]) -> None:
        self._pending.extend(settlements)
        self._has_work.set()

    def queued_ids(self) -> set[int]:
        """Outbox ids recorded here and waiting for (or in) their publish."""
        return {i for ids, _ in self._outgoing for i in ids}

    async def run(self) -> None:
        publisher = asyncio.create_task(self._publish_loop(), name="uploader-publisher")
        try:
            while True:
                await self._has_work.wait()
                if not self._closing and len(self._pending) < _SETTLE_BATCH:
                    await asyncio.sleep(_SETTLE_DELAY)
                await self.flush(give_up=self._closing)
                if self._closing:
                    break
        finally:
            self._recording_done = True
            self._has_outgoing.set()
            try:
                await asyncio.shield(publisher)
            except asyncio.CancelledError:
                publisher.cancel()
                raise

    def close(self) -> None:
        """Record what is left, publish its events, then end :meth:`run`."""
        self._closing = True
        self._has_work.set()

    async def flush(self, give_up: bool = False) -> None:
        """Record everything waiting now; its events go to the publisher.

        A failing store is retried every second; with ``give_up`` (stopping) it is not, and
        the outcomes are lost: their deliveries stay claimed and are taken back in doubt.
        """
        async with self.settle_lock:
            while self._pending:
                batch = self._pending[:_SETTLE_BATCH]
                events = self._events(batch)
                try:
                    ids = await self.up.queue.settle(batch, events)
                except StoreError as err:
                    log.error("recording %d outcome(s) failed: %s", len(batch), err)
                    if give_up:
                        return
                    await asyncio.sleep(1.0)
                    continue
                del self._pending[: len(batch)]
                if events:
                    self._outgoing.append((ids, events))
                    self._has_outgoing.set()
            self._has_work.clear()

    async def _publish_loop(self) -> None:
        while True:
            await self._has_outgoing.wait()
            async with self.publish_lock:
                while self._outgoing:
                    ids, events = self._outgoing[0]
                    await self._publish(ids, events)
                    self._outgoing.popleft()
                self._has_outgoing.clear()
            if self._recording_done and not self._outgoing:
                return

    async def _publish(self, ids: list[int], events: list[Event]) -> None:
        if not events:
            return
        try:
            await self.up.bus.publish(*events)
        except BusError as err:
            log.warning("publishing %d event(s) failed; kept in the outbox: %s", len(events), err)
            return
        for event in events:
            self.up.metrics.events.labels(type=event.type).inc()
        try:
            await self.up.queue.published(ids)
        except StoreError as err:
            # Published twice at worst: consumers are idempotent.
            log.warning("could not clear published events from the outbox: %s", err)

    def _events(self, batch: Sequence[Settlement]) -> list[Event]:
        groups: dict[tuple[str, str | None], list[FileOutcome]] = defaultdict(list)
        for s in batch:
            if s.status == "pending":
                continue
            kind = "file-sent" if s.status in ("sent", "warning") else "file-failed"
            groups[(kind, s.claim.batch_key)].append(
                FileOutcome(
                    path=s.claim.path, sop_instance_uid=s.claim.sop_instance_uid or "",
                    destination=s.claim.destination, status=s.dimse_status,
                    attempts=s.attempts, error=s.error,
                )
            )  # fmt: skip
        events: list[Event] = []
        for (kind, batch_key), outcomes in groups.items():
            for start in range(0, len(outcomes), _EVENT_FILES):
                payload = FileOutcomePayload(files=outcomes[start : start + _EVENT_FILES])
                cls = FileSent if kind == "file-sent" else FileFailed
                events.append(cls(source=self.up.source, correlation_id=batch_key, payload=payload))
        return events


class Uploader:
    """The uploader service's work; built with its dependencies, run until cancelled."""

    def __init__(
        self,
        settings: UploaderSettings,
        nodes: Mapping[str, Node],
        options: NetworkOptions,
        *,
        queue: DeliveryQueue,
        bus: EventBus,
        source: Source,
        registry: CollectorRegistry,
        pool: SenderPool | None = None,
        clock: Callable[[], float] = time.time,
        load: Callable[[], float] = load_per_core,
        load_check_seconds: float = 5.0,
        logs: LoggingSettings | None = None,
    ) -> None:
        self.settings = settings
        self.nodes = dict(nodes)
        self.options = options
        self.queue = queue
        self.bus = bus
        self.source = source
        self.clock = clock
        self.metrics = UploaderMetrics(registry)
        self.associations = settings.associations or default_associations()
        if pool is None:
            processes = settings.processes
            if processes is None:
                processes = default_processes(self.associations * max(1, len(settings.destinations)))
            pool = SenderPool(
                options, processes=processes, engine=settings.engine,
                idle_release=settings.idle_release_seconds, logs=logs,
            )  # fmt: skip
        self.pool = pool
        self.load_gate = LoadGate(
            settings.max_load_per_core, self.metrics.paused, load=load,
            check_interval=load_check_seconds,
        )  # fmt: skip
        self.recorder = _Recorder(self)
        # Set when stopping: every loop ends at its next safe point, never cancelled inside
        # a transaction.
        self.stopping = asyncio.Event()
        self.destinations: dict[str, _Destination] = {}
        # file-ready events are scheduled one after the other: several at once (the bus hands
        # over up to its prefetch) share the database, so the first batch would be claimable
        # only when all of them were; one by one, sending starts after the first.
        self._scheduling = asyncio.Lock()
        self._warned_unknown: set[str] = set()
        self._background: list[asyncio.Task[None]] = []
        # Set when a destination's loop fails unexpectedly: the service stops with the error.
        self._failed: asyncio.Future[None] | None = None

    def _count_taken_back(self, taken: Mapping[str, int]) -> None:
        for name, count in taken.items():
            log.warning("%s: took back %d delivery(ies) left in flight by a stopped uploader;"
                        " they are in doubt", name, count)
            self.metrics.retries.labels(destination=name, reason="interrupted").inc(count)

    async def on_file_ready(self, event: Event) -> None:
        """Add pending deliveries for the event's files; the senders take it from there."""
        if not isinstance(event, FileReady):
            return
        names = list(event.payload.destinations) or list(self.settings.destinations)
        unknown = [name for name in names if name not in self.nodes]
        if unknown:
            raise RejectEvent(
                f"file-ready names destination(s) not in nodes: {', '.join(unknown)}"
                f" (known: {', '.join(self.nodes) or 'none'})"
            )
        if not names or not event.payload.files:
            return
        files = event.payload.files
        presentations = [(f.sop_class_uid, f.transfer_syntax_uid) for f in files]
        for name in names:
            self._destination(name).associate_ahead(presentations)
        scheduled = skipped = missing = 0
        async with self._scheduling:
            # An idle destination gets the head of the batch first: sending starts after a
            # short statement, while the rest is scheduled.
            head = self.settings.chunk_size * _HEAD_CHUNKS
            idle = any(self._destination(name).idle for name in names)
            parts = [files[:head], files[head:]] if idle and len(files) > 2 * head else [files]
            for part in parts:
                done = await self.queue.schedule(part, names, event.payload.batch_key)
                scheduled += len(done.file_ids)
                skipped += done.skipped
                missing += done.missing
                for name in names:
                    self._destination(name).wake()
        # The batch key is a folder name, which may name a patient: not logged here.
        log.info(
            "%d file(s) to %s%s", scheduled, ", ".join(names),
            f" ({skipped} already handled, {missing} missing)" if skipped or missing else "",
        )  # fmt: skip

    async def pause(self, seconds: float) -> None:
        """Sleep for ``seconds``, or less when the uploader stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()

    def _destination(self, name: str) -> _Destination:
        destination = self.destinations.get(name)
        if destination is None:
            destination = self.destinations[name] = _Destination(self, name, self.nodes[name])
            destination.task = asyncio.create_task(destination.run(), name=f"uploader-{name}")
            destination.task.add_done_callback(self._loop_ended)
        return destination

    def _send_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._loop_ended(task)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._failed is None or self._failed.done():
            return
        if self.stopping.is_set() and task.exception() is None:
            return  # asked to end
        error = task.exception()
        self._failed.set_exception(
            error if error is not None else RuntimeError(f"{task.get_name()} returned")
        )

    async def verifier(self, destination: _Destination, claims: list[Claim]) -> list[Claim]:
        """Settle in-doubt claims the destination already holds (C-FIND); the rest to send."""
        doubtful = [
            c for c in claims
            if c.in_doubt and c.sop_instance_uid and c.study_instance_uid
            and c.series_instance_uid
        ]  # fmt: skip
        if not doubtful:
            return claims
        held = await asyncio.to_thread(self._instances_at, destination.node, doubtful)
        confirmed = [c for c in doubtful if c.sop_instance_uid in held]
        if not confirmed:
            return claims
        log.info("%s already holds %d file(s) whose send was interrupted: not sent again",
                 destination.name, len(confirmed))
        self.metrics.files.labels(destination=destination.name, status="verified").inc(
            len(confirmed)
        )
        self.recorder.add([
            Settlement(c, "sent", 0x0000, "found at the destination by C-FIND after an"
                       " interrupted send", c.attempts)
            for c in confirmed
        ])  # fmt: skip
        done = {c.file_id for c in confirmed}
        return [c for c in claims if c.file_id not in done]

    def _instances_at(self, node: Node, claims: Sequence[Claim]) -> set[str]:
        from pacsflow.dicom import find

        held: set[str] = set()
        series = {(c.study_instance_uid, c.series_instance_uid) for c in claims}
        for study_uid, series_uid in series:
            try:
                matches = find(
                    node, "IMAGE",
                    {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
                     "SOPInstanceUID": ""},
                    self.options,
                )  # fmt: skip
            except DicomError as err:
                # No C-FIND there (or it failed): send again, as without the check.
                log.warning("cannot check %s with C-FIND, sending again: %s", node, err)
                return held
            held.update(str(m.SOPInstanceUID) for m in matches if "SOPInstanceUID" in m)
        return held

    # --- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """Take back abandoned claims, start the senders, consume file-ready; until cancelled."""
        # Events published while the senders start are kept for us.
        await self.bus.declare("uploader", ["file-ready"])
        self._count_taken_back(await self.queue.take_back(self.settings.claim_timeout_seconds))
        await self.pool.start()
        self._failed = asyncio.get_running_loop().create_future()
        try:
            self._background = [
                asyncio.create_task(self.recorder.run(), name="uploader-recorder"),
                asyncio.create_task(self._outbox(), name="uploader-outbox"),
                asyncio.create_task(self._housekeeping(), name="uploader-housekeeping"),
            ]
            for name in dict.fromkeys(
                [*self.settings.destinations, *await self.queue.destinations_with_work()]
            ):
                if name in self.nodes:
                    self._destination(name)
                elif name not in self._warned_unknown:
                    self._warned_unknown.add(name)
                    log.error("deliveries to %r wait, but no node of that name is configured",
                              name)
            await self.bus.subscribe("uploader", ["file-ready"], self.on_file_ready)
            # asyncio.wait, not gather: cancelling this task must not cancel the recorder
            # half-way; _stop ends the background tasks in order.
            done, _ = await asyncio.wait(
                [*self._background, self._failed], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()  # a failed loop stops the service with its error
            raise RuntimeError("an uploader task ended on its own")
        finally:
            await asyncio.shield(self._stop())

    async def _stop(self) -> None:
        """Stop taking work, let the chunks in flight finish and record them, then close."""
        self.stopping.set()
        for destination in self.destinations.values():
            destination.stop()
        loops = [d.task for d in self.destinations.values() if d.task is not None]
        await _finish(loops, _STOP_GRACE_SECONDS, "sender loops")
        sending = [t for d in self.destinations.values() for t in d.tasks]
        if sending:
            log.info("waiting for %d chunk(s) in flight", len(sending))
        await _finish(sending, _STOP_GRACE_SECONDS, "chunks in flight")
        for destination in self.destinations.values():
            destination.release_buffer()
        self.recorder.close()
        await _finish(self._background, _STOP_GRACE_SECONDS, "recording outcomes")
        if self._failed is not None and not self._failed.done():
            self._failed.cancel()
        await self.pool.close()

    async def _outbox(self) -> None:
        """Publish events a crash or a bus outage left in the outbox."""
        while not self.stopping.is_set():
            try:
                async with self.recorder.settle_lock, self.recorder.publish_lock:
                    # What the recorder is about to publish is not ours to publish.
                    queued = self.recorder.queued_ids()
                    fetched = await self.queue.unpublished(200)
                    rows = [(i, body) for i, body in fetched if i not in queued]
                    if rows:
                        await self.bus.publish(*[decode_event(body) for _, body in rows])
                        await self.queue.published([i for i, _ in rows])
                        log.info("published %d event(s) from the outbox", len(rows))
                if rows and len(fetched) == 200:
                    continue
            except (BusError, StoreError) as err:
                log.warning("outbox: %s", err)
            await self.pause(_POLL_SECONDS)

    async def _housekeeping(self) -> None:
        """Renew claims, take back others' abandoned ones, refresh the backlog gauges."""
        timeout = self.settings.claim_timeout_seconds
        interval = max(1.0, min(10.0, timeout / 4))
        while not self.stopping.is_set():
            await self.pause(interval)
            if self.stopping.is_set():
                return
            try:
                await self.queue.renew()
                orphans = await self.queue.release_orphans()
                if orphans:
                    log.warning(
                        "gave back %d delivery(ies) claimed in this uploader's name whose claim"
                        " answer was lost (never sent)", orphans,
                    )  # fmt: skip
                    for destination in self.destinations.values():
                        destination.wake()
                taken = await self.queue.take_back(timeout)
                if taken:
                    self._count_taken_back(taken)
                    for destination in self.destinations.values():
                        destination.wake()
                backlog = await self.queue.backlog()
            except StoreError as err:
                log.warning("housekeeping: %s", err)
                continue
            now = self.clock()
            for destination in self.destinations.values():
                destination.count_open()
            for name in set(backlog) | set(self.destinations):
                count, oldest = backlog.get(name, (0, now))
                self.metrics.pending.labels(destination=name).set(count)
                self.metrics.queue_lag.labels(destination=name).set(max(0.0, now - oldest))


async def _finish(tasks: Sequence[asyncio.Task[None]], timeout: float, what: str) -> None:
    """Wait for tasks that were asked to end; cancel those still running after ``timeout``."""
    if not tasks:
        return
    _done, late = await asyncio.wait(tasks, timeout=timeout)
    if late:
        log.warning("stopping: %d task(s) of %s did not end in %.0f s; cancelled",
                    len(late), what, timeout)
        for task in late:
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
