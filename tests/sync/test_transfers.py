"""The transfer table on both backends: requests, claims, outcomes, backoff, races."""

from __future__ import annotations

import asyncio
import math

import pytest

from pacsflow.store import Database

from pacsflow_sync.transfers import SeriesRequest, Transfers, backoff_seconds

T0 = 1_700_000_000.0
OWNER = "host:1:aaaa"


def series(number: int = 1, images: int = 3) -> SeriesRequest:
    return SeriesRequest("REMOTE", "LOCAL", "1.2.3", f"1.2.3.{number}", images, "missing-study")


async def request(transfers: Transfers, item: SeriesRequest, now: float = T0, **kw: object):  # type: ignore[no-untyped-def]
    options: dict[str, object] = {
        "run_id": 1, "now": now, "local_checked_at": now, "stale_before": now - 300,
    }  # fmt: skip
    options.update(kw)
    return await transfers.request(item, **options)  # type: ignore[arg-type]


async def finish(transfers: Transfers, transfer, moved: bool, now: float, completed: int = 3):  # type: ignore[no-untyped-def]
    return await transfers.finish(
        transfer, OWNER, moved=moved, completed=completed if moved else 0,
        failed=0 if moved else 3, warning=0, dimse_status=0 if moved else 0xA702,
        error=None if moved else "out of resources", now=now, retry_initial=60,
        retry_max=3600,
    )  # fmt: skip


class TestRequest:
    async def test_a_new_series_is_requested_once(self, db: Database) -> None:
        transfers = Transfers(db)
        decision, row = await request(transfers, series())
        assert decision == "requested" and row.status == "requested" and row.run_id == 1
        decision, again = await request(transfers, series(), T0 + 60, run_id=2)
        assert decision == "in-progress" and again.id == row.id and again.run_id == 1

    async def test_a_series_being_moved_is_not_requested_again(self, db: Database) -> None:
        transfers = Transfers(db)
        await request(transfers, series())
        claimed = await transfers.claim_next(OWNER, T0 + 1)
        assert claimed is not None and claimed.status == "moving" and claimed.attempts == 1
        decision, row = await request(transfers, series(), T0 + 100)
        assert decision == "in-progress" and row.status == "moving"

    async def test_a_failed_series_waits_for_its_backoff(self, db: Database) -> None:
        transfers = Transfers(db)
        await request(transfers, series())
        claimed = await transfers.claim_next(OWNER, T0 + 1)
        failed = await finish(transfers, claimed, moved=False, now=T0 + 2)
        assert failed is not None and failed.status == "failed"
        assert failed.next_attempt_at == T0 + 2 + 60
        decision, _ = await request(transfers, series(), T0 + 61)
        assert decision == "waiting"
        decision, row = await request(transfers, series(), T0 + 62, run_id=7)
        assert decision == "requested" and row.run_id == 7 and row.attempts == 1
        assert row.last_error == "out of resources"

        # The second failure waits twice as long.
        claimed = await transfers.claim_next(OWNER, T0 + 63)
        assert claimed is not None and claimed.attempts == 2
        failed = await finish(transfers, claimed, moved=False, now=T0 + 64)
        assert failed is not None and failed.next_attempt_at == T0 + 64 + 120

    async def test_retry_failed_ignores_the_backoff(self, db: Database) -> None:
        transfers = Transfers(db)
        await request(transfers, series())
        await finish(transfers, await transfers.claim_next(OWNER, T0), moved=False, now=T0)
        decision, _ = await request(transfers, series(), T0 + 1, retry_failed=True)
        assert decision == "requested"

    async def test_a_moved_series_missing_again_is_requested_again(self, db: Database) -> None:
        transfers = Transfers(db)
        await request(transfers, series())
        await finish(transfers, await transfers.claim_next(OWNER, T0), moved=True, now=T0 + 10)
        # The local PACS was asked before the move ended: its view is older than the move.
        decision, row = await request(transfers, series(), T0 + 20, local_checked_at=T0 + 5)
        assert decision == "moved" and row.status == "moved"
        # Asked after the move ended and still missing: the local PACS lost it.
        decision, row = await request(transfers, series(), T0 + 30, local_checked_at=T0 + 25)
        assert decision == "requested" and not row.verify

    async def test_a_stale_claim_is_requested_again_with_verification(self, db: Database) -> None:
        transfers = Transfers(db)
        await request(transfers, series())
        await transfers.claim_next(OWNER, T0)
        decision, _ = await request(transfers, series(), T0 + 200, stale_before=T0 - 1)
        assert decision == "in-progress"
        assert await transfers.renew(1, OWNER, T0 + 250)
        decision, row = await request(transfers, series(), T0 + 600, stale_before=T0 + 300)
        assert decision == "requested" and row.verify and row.claimed_by is None
        assert row.last_error == "the mover stopped renewing its claim"
        # The stopped mover can no longer renew or record its outcome.
        assert not await transfers.renew(row.id, OWNER, T0 + 601)
        assert await finish(transfers, row, moved=True, now=T0 + 602) is None


class TestClaim:
    async def test_oldest_request_first_and_only_of_the_run_asked_for(self, db: Database) -> None:
        transfers = Transfers(db)
        await request(transfers, series(1), T0 + 2, run_id=1)
        await request(transfers, series(2), T0 + 1, run_id=2)
        await request(transfers, series(3), T0 + 3, run_id=1)
        first = await transfers.claim_next(OWNER, T0 + 10, run_id=1)
        assert first is not None and first.series_instance_uid == "1.2.3.1"
        other = await transfers.claim_next(OWNER, T0 + 10)
        assert other is not None and other.series_instance_uid == "1.2.3.2"
        assert await transfers.has_requested(1) and not await transfers.has_requested(2)
        third = await transfers.claim_next(OWNER, T0 + 10, run_id=1)
        assert third is not None and third.series_instance_uid == "1.2.3.3"
        assert await transfers.claim_next(OWNER, T0 + 10) is None

    async def test_concurrent_claimers_never_share_a_series(
        self, db: Database, second_db: Database
    ) -> None:
        transfers, rival = Transfers(db), Transfers(second_db)
        for number in range(12):
            await request(transfers, series(number), T0 + number)

        async def claim_all(store: Transfers, owner: str) -> list[str]:
            got = []
            while (row := await store.claim_next(owner, T0 + 100)) is not None:
                got.append(row.series_instance_uid)
            return got

        results = await asyncio.gather(
            *(claim_all(store, f"owner{i}") for i, store in enumerate([transfers, rival] * 2))
        )
        claimed = [uid for got in results for uid in got]
        assert sorted(claimed) == sorted(f"1.2.3.{n}" for n in range(12))
        counts = await transfers.count_by_status()
        assert counts == {"requested": 0, "moving": 12, "moved": 0, "failed": 0}

    async def test_concurrent_requests_of_one_series_request_it_once(
        self, db: Database, second_db: Database
    ) -> None:
        results = await asyncio.gather(
            *(request(store, series(), T0, run_id=run)
              for run, store in enumerate([Transfers(db), Transfers(second_db)] * 3))
        )  # fmt: skip
        decisions = sorted(decision for decision, _ in results)
        assert decisions == ["in-progress"] * 5 + ["requested"]


class TestOutbox:
    async def test_unannounced_requests_are_found_until_marked(self, db: Database) -> None:
        transfers = Transfers(db)
        _, first = await request(transfers, series(1), T0)
        _, second = await request(transfers, series(2), T0 + 50)
        assert [t.id for t in await transfers.unannounced(T0 + 40)] == [first.id]
        await transfers.mark_announced([first], T0 + 41)
        assert await transfers.unannounced(T0 + 40) == []
        assert [t.id for t in await transfers.unannounced(T0 + 60)] == [second.id]

    async def test_unreported_outcomes_are_found_until_marked(self, db: Database) -> None:
        transfers = Transfers(db)
        await request(transfers, series())
        done = await finish(transfers, await transfers.claim_next(OWNER, T0), True, T0 + 5)
        assert done is not None
        assert [t.id for t in await transfers.unreported(T0 + 6)] == [done.id]
        await transfers.mark_reported(done, T0 + 7)
        assert await transfers.unreported(T0 + 8) == []

    async def test_run_totals(self, db: Database) -> None:
        transfers = Transfers(db)
        for number in range(4):
            await request(transfers, series(number), T0 + number, run_id=5)
        await finish(transfers, await transfers.claim_next(OWNER, T0), True, T0, completed=3)
        await finish(transfers, await transfers.claim_next(OWNER, T0), False, T0)
        await transfers.claim_next(OWNER, T0 + 10)  # a mover that stops renewing
        totals = await transfers.run_totals(5, stale_before=T0 + 5)
        assert (totals.pending, totals.moved, totals.failed, totals.stale) == (2, 1, 1, 0)
        totals = await transfers.run_totals(5, stale_before=T0 + 11)
        assert (totals.pending, totals.moved, totals.failed, totals.stale) == (1, 1, 1, 1)
        assert (totals.completed, totals.failed_images) == (3, 3)
        assert [t.series_instance_uid for t in await transfers.failed_in_run(5)] == ["1.2.3.1"]


@pytest.mark.parametrize(
    ("attempts", "expected"), [(0, 60), (1, 60), (2, 120), (3, 240), (7, 3600), (500, 3600)]
)
def test_backoff_doubles_up_to_the_maximum(attempts: int, expected: float) -> None:
    assert backoff_seconds(attempts, 60, 3600) == expected
    assert math.isfinite(backoff_seconds(attempts, 60, 3600))
