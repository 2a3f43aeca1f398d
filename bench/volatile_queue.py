"""The uploader with its deliveries held in memory: what the durable ledger costs.

``python -m bench.volatile_queue uploader -c CONFIG`` runs the ``pacsflow uploader`` service
with one change: the per-file work of its queue (scheduling, claiming, settling, the outbox)
is kept in this process's memory instead of the ledger. Start-up work (taking back claims,
releasing orphans) still goes to the database, and nothing else differs: the same bus, the
same sender pool and associations, the same events.

For the benchmark only (path ``uploader-volatile``): nothing it sends is recorded, so a crash
would forget what was sent and what was not. Against ``uploader-rabbit`` in the same run it
shows how much of the event pipeline's cost is the ledger's durable per-file work.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence

from pacsflow.events import Event, ReadyFile
from pacsflow.store import Database
from pacsflow_uploader.deliveries import Claim, DeliveryQueue, Scheduled, Settlement

__all__ = ["VolatileQueue", "main"]


class VolatileQueue(DeliveryQueue):
    """A :class:`DeliveryQueue` whose deliveries and outbox live in memory."""

    def __init__(
        self, db: Database, *, owner: str, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(db, owner=owner, clock=clock)
        self._file_ids = itertools.count(1)
        self._outbox_ids = itertools.count(1)
        # Per destination: deliveries waiting, in the order they were scheduled.
        self._pending: dict[str, deque[Claim]] = {}
        # (path, destination) of every delivery scheduled: a redelivered event adds none.
        self._scheduled: set[tuple[str, str]] = set()

    async def schedule(
        self, files: Sequence[ReadyFile], destinations: Sequence[str], batch_key: str | None
    ) -> Scheduled:
        now = self._clock()
        ids: list[int] = []
        missing = 0
        for file in files:
            try:
                size = os.stat(file.path).st_size
            except OSError:
                missing += 1
                continue
            file_id = next(self._file_ids)
            ids.append(file_id)
            for destination in destinations:
                if (file.path, destination) in self._scheduled:
                    continue
                self._scheduled.add((file.path, destination))
                self._pending.setdefault(destination, deque()).append(Claim(
                    file_id=file_id, destination=destination, attempts=0, in_doubt=False,
                    queued_at=now, path=file.path, size=size,
                    sop_class_uid=file.sop_class_uid, sop_instance_uid=file.sop_instance_uid,
                    transfer_syntax_uid=file.transfer_syntax_uid,
                    study_instance_uid=file.study_instance_uid,
                    series_instance_uid=file.series_instance_uid, batch_key=batch_key,
                ))  # fmt: skip
        return Scheduled(ids, 0, missing)

    async def claim(self, destination: str, limit: int) -> list[Claim]:
        waiting = self._pending.get(destination)
        if not waiting:
            return []
        return [waiting.popleft() for _ in range(min(limit, len(waiting)))]

    async def settle(self, settlements: Sequence[Settlement], events: Sequence[Event]) -> list[int]:
        for settlement in settlements:
            if settlement.status == "pending":
                # Due again at once here: the benchmark's peers answer every request.
                claim = settlement.claim
                self._pending.setdefault(claim.destination, deque()).appendleft(claim)
        return [next(self._outbox_ids) for _ in events]

    async def published(self, ids: Sequence[int]) -> None:
        return None

    async def unpublished(self, limit: int = 100) -> list[tuple[int, bytes]]:
        return []

    async def renew(self) -> None:
        return None

    async def next_due(self, destination: str) -> float | None:
        return time.time() if self._pending.get(destination) else None

    async def backlog(self) -> dict[str, tuple[int, float]]:
        return {
            name: (len(waiting), waiting[0].queued_at)
            for name, waiting in self._pending.items() if waiting
        }  # fmt: skip

    async def destinations_with_work(self) -> list[str]:
        return sorted(name for name, waiting in self._pending.items() if waiting)


def main() -> int:
    """The ``pacsflow`` command, its uploader on a :class:`VolatileQueue`."""
    import pacsflow_uploader.service
    from pacsflow.cli import main as pacsflow_main

    pacsflow_uploader.service.DeliveryQueue = VolatileQueue  # type: ignore[misc]
    return pacsflow_main()


if __name__ == "__main__":
    sys.exit(main())
