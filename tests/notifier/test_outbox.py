"""The outbox and the incidents on both state store backends (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pacsflow.store import Database

from pacsflow_notifier.alerts import Incident, Incidents
from pacsflow_notifier.messages import AlertSummary
from pacsflow_notifier.outbox import NewMessage, Outbox, message_id

NOW = 1_790_000_000.0


def new(source: str, channel: str = "email", target: str = "") -> NewMessage:
    return NewMessage(
        channel=channel, target=target, kind="study-complete", source=source,
        recipients=("a@h.example", "b@h.example"), subject=f"subject {source}",
        text="text\n", html="<p>html</p>",
    )


class TestOutbox:
    async def test_enqueue_is_idempotent(self, db: Database) -> None:
        outbox = Outbox(db)
        first = await outbox.enqueue([new("event:1"), new("event:1", "webhook", "teams")], NOW)
        again = await outbox.enqueue([new("event:1"), new("event:1", "webhook", "teams")], NOW + 5)
        assert len(first) == 2 and again == []
        rows = await outbox.rows()
        assert len(rows) == 2
        assert {row["id"] for row in rows} == {
            message_id("event:1", "email", ""), message_id("event:1", "webhook", "teams"),
        }

    async def test_enqueue_joins_the_callers_transaction(self, db: Database) -> None:
        outbox = Outbox(db)
        try:
            async with db.transaction() as tx:
                await outbox.enqueue([new("event:1")], NOW, db=tx)
                raise RuntimeError("the handler failed after the insert")
        except RuntimeError:
            pass
        assert await outbox.rows() == []

    async def test_claim_takes_the_oldest_due_row_and_leases_it(self, db: Database) -> None:
        outbox = Outbox(db)
        await outbox.enqueue([new("event:2")], NOW + 1)
        await outbox.enqueue([new("event:1")], NOW)
        claimed = await outbox.claim("email", "me", NOW + 2, lease=60)
        assert claimed is not None and claimed.source == "event:1"
        assert claimed.recipients == ("a@h.example", "b@h.example")
        assert claimed.html == "<p>html</p>" and claimed.attempts == 0
        second = await outbox.claim("email", "other", NOW + 2, lease=60)
        assert second is not None and second.source == "event:2"
        assert await outbox.claim("email", "other", NOW + 3, lease=60) is None
        assert await outbox.claim("webhook", "other", NOW + 3, lease=60) is None
        # A lease that ran out (its holder died) is taken over.
        taken = await outbox.claim("email", "other", NOW + 63, lease=60)
        assert taken is not None and taken.source == "event:1"

    async def test_concurrent_claims_never_share_a_row(self, db: Database) -> None:
        outbox = Outbox(db)
        await outbox.enqueue([new(f"event:{i}") for i in range(30)], NOW)

        async def claimer(owner: str) -> list[str]:
            got = []
            while (message := await outbox.claim("email", owner, NOW + 1, lease=60)) is not None:
                got.append(message.id)
            return got

        results = await asyncio.gather(*(claimer(f"owner-{i}") for i in range(4)))
        claimed = [id for ids in results for id in ids]
        assert len(claimed) == 30 and len(set(claimed)) == 30

    async def test_failed_attempt_waits_for_its_backoff(self, db: Database) -> None:
        outbox = Outbox(db)
        await outbox.enqueue([new("event:1")], NOW)
        message = await outbox.claim("email", "me", NOW, lease=60)
        assert message is not None
        await outbox.mark_failed(message.id, "me", 1, NOW + 10, "connection refused")
        assert await outbox.claim("email", "me", NOW + 5, lease=60) is None
        assert await outbox.next_due("email") == NOW + 10
        again = await outbox.claim("email", "me", NOW + 10, lease=60)
        assert again is not None and again.attempts == 1
        row = (await outbox.rows())[0]
        assert row["last_error"] == "connection refused" and row["status"] == "pending"

    async def test_failure_of_a_lost_lease_is_not_recorded(self, db: Database) -> None:
        outbox = Outbox(db)
        await outbox.enqueue([new("event:1")], NOW)
        slow = await outbox.claim("email", "slow", NOW, lease=1)
        fast = await outbox.claim("email", "fast", NOW + 2, lease=60)
        assert slow is not None and fast is not None
        await outbox.mark_failed(slow.id, "slow", 1, NOW + 100, "late")
        assert (await outbox.rows())[0]["claimed_by"] == "fast"

    async def test_sent_rows_are_not_claimed_again(self, db: Database) -> None:
        outbox = Outbox(db)
        await outbox.enqueue([new("event:1")], NOW)
        message = await outbox.claim("email", "me", NOW, lease=60)
        assert message is not None
        await outbox.mark_sent(message.id, NOW + 1)
        assert await outbox.claim("email", "me", NOW + 1000, lease=60) is None
        assert await outbox.next_due("email") is None
        row = (await outbox.rows())[0]
        assert row["status"] == "sent" and row["sent_at"] == NOW + 1 and row["claimed_by"] is None

    async def test_next_due_waits_for_a_lease(self, db: Database) -> None:
        outbox = Outbox(db)
        await outbox.enqueue([new("event:1")], NOW)
        assert await outbox.claim("email", "other", NOW, lease=30) is not None
        assert await outbox.next_due("email") == NOW + 30

    async def test_expedite_makes_waiting_rows_due(self, db: Database) -> None:
        outbox = Outbox(db)
        await outbox.enqueue([new("event:1"), new("event:2")], NOW)
        for _ in range(2):
            message = await outbox.claim("email", "me", NOW, lease=60)
            assert message is not None
            await outbox.mark_failed(message.id, "me", 3, NOW + 600, "down")
        assert await outbox.expedite("email", NOW + 1) == 2
        assert await outbox.claim("email", "me", NOW + 1, lease=60) is not None

    async def test_stats_count_pending_and_failing_per_channel(self, db: Database) -> None:
        outbox = Outbox(db)
        await outbox.enqueue([new("event:1"), new("event:2"), new("event:3", "webhook", "t")], NOW)
        message = await outbox.claim("email", "me", NOW, lease=60)
        assert message is not None
        await outbox.mark_failed(message.id, "me", 6, NOW + 600, "down")
        message = await outbox.claim("email", "me", NOW, lease=60)
        assert message is not None
        await outbox.mark_sent(message.id, NOW)
        stats = await outbox.stats(failing_after=6)
        assert stats["email"].pending == 1 and stats["email"].failing == 1
        assert stats["webhook"].pending == 1 and stats["webhook"].failing == 0
        assert stats["email"].oldest_created_at == NOW

    async def test_prune_forgets_only_old_sent_rows(self, db: Database) -> None:
        outbox = Outbox(db)
        await outbox.enqueue([new("event:1"), new("event:2")], NOW)
        message = await outbox.claim("email", "me", NOW, lease=60)
        assert message is not None
        await outbox.mark_sent(message.id, NOW)
        assert await outbox.prune(NOW + 1) == 1
        assert [row["status"] for row in await outbox.rows()] == ["pending"]


def build(summaries: list[AlertSummary]):  # type: ignore[no-untyped-def]
    def make(summary: AlertSummary, source: str) -> Sequence[NewMessage]:
        summaries.append(summary)
        return [new(source)]

    return make


def failures(start: int, count: int, destination: str = "PACS_MAIN") -> list[Incident]:
    return [
        Incident(f"event-{i}:0", destination, "DIMSE status 0xA700", f"/in/{i}.dcm")
        for i in range(start, start + count)
    ]


class TestIncidents:
    async def test_recording_twice_counts_once(self, db: Database) -> None:
        incidents = Incidents(db)
        await incidents.record("file-failed", failures(0, 5), NOW)
        await incidents.record("file-failed", failures(0, 5), NOW + 1)
        summaries: list[AlertSummary] = []
        await incidents.report(
            "file-failed", window=10, now=NOW + 10, outbox=Outbox(db), build=build(summaries)
        )
        assert summaries[0].count == 5

    async def test_alert_waits_for_the_window(self, db: Database) -> None:
        incidents = Incidents(db)
        outbox = Outbox(db)
        await incidents.record("file-failed", failures(0, 3), NOW)
        summaries: list[AlertSummary] = []
        assert await incidents.report(
            "file-failed", window=60, now=NOW + 59, outbox=outbox, build=build(summaries)
        ) is None
        reported = await incidents.report(
            "file-failed", window=60, now=NOW + 60, outbox=outbox, build=build(summaries)
        )
        assert reported is not None and len(reported.queued) == 1
        # Everything is reported: nothing is left for the next window.
        assert await incidents.oldest_open("file-failed") is None
        assert await incidents.report(
            "file-failed", window=60, now=NOW + 1000, outbox=outbox, build=build(summaries)
        ) is None
        assert len(await outbox.rows()) == 1

    async def test_summary_counts_destinations_and_errors(self, db: Database) -> None:
        incidents = Incidents(db)
        await incidents.record("file-failed", failures(0, 480), NOW)
        await incidents.record("file-failed", failures(480, 20, "PACS_BACKUP"), NOW + 1)
        await incidents.record(
            "file-failed",
            [Incident("odd:0", "PACS_BACKUP", "connection refused", "/in/odd.dcm")],
            NOW + 2,
        )
        letter = Incident("x", "uploader file-ready", "bad", "x")
        await incidents.record("dead-letters", [letter], NOW)
        summaries: list[AlertSummary] = []
        await incidents.report(
            "file-failed", window=5, now=NOW + 5, outbox=Outbox(db), build=build(summaries)
        )
        summary = summaries[0]
        assert summary.count == 501
        assert summary.groups == [("PACS_MAIN", 480), ("PACS_BACKUP", 21)]
        assert summary.errors == [("DIMSE status 0xA700", 500), ("connection refused", 1)]
        assert summary.first_seen == NOW and summary.last_seen == NOW + 2
        assert len(summary.examples) == 10 and summary.examples[0][1] == "/in/0.dcm"
        # the other kind waits for its own alert
        assert await incidents.oldest_open("dead-letters") == ("x", NOW)

    async def test_later_incidents_start_a_new_window(self, db: Database) -> None:
        incidents = Incidents(db)
        outbox = Outbox(db)
        summaries: list[AlertSummary] = []
        await incidents.record("file-failed", failures(0, 2), NOW)
        await incidents.report("file-failed", window=10, now=NOW + 10, outbox=outbox,
                               build=build(summaries))
        await incidents.record("file-failed", failures(2, 3), NOW + 11)
        assert await incidents.report("file-failed", window=10, now=NOW + 15, outbox=outbox,
                                      build=build(summaries)) is None
        await incidents.report("file-failed", window=10, now=NOW + 21, outbox=outbox,
                               build=build(summaries))
        assert [s.count for s in summaries] == [2, 3]
        assert len(await outbox.rows()) == 2

    async def test_concurrent_reports_make_one_alert(self, db: Database) -> None:
        incidents = Incidents(db)
        outbox = Outbox(db)
        await incidents.record("file-failed", failures(0, 50), NOW)
        summaries: list[AlertSummary] = []
        results = await asyncio.gather(*(
            incidents.report("file-failed", window=1, now=NOW + 1, outbox=outbox,
                             build=build(summaries))
            for _ in range(4)
        ))
        assert len([r for r in results if r is not None]) == 1
        assert len(await outbox.rows()) == 1
        assert await incidents.oldest_open("file-failed") is None

    async def test_alert_without_recipients_still_closes_the_incidents(self, db: Database) -> None:
        incidents = Incidents(db)
        await incidents.record("file-failed", failures(0, 2), NOW)
        reported = await incidents.report(
            "file-failed", window=1, now=NOW + 1, outbox=Outbox(db), build=lambda s, src: []
        )
        assert reported is not None and reported.summary.count == 2 and reported.queued == []
        assert await incidents.oldest_open("file-failed") is None

    async def test_prune_forgets_reported_incidents(self, db: Database) -> None:
        incidents = Incidents(db)
        await incidents.record("file-failed", failures(0, 2), NOW)
        await incidents.report("file-failed", window=1, now=NOW + 1, outbox=Outbox(db),
                               build=lambda s, src: [])
        await incidents.record("file-failed", failures(2, 1), NOW + 2)
        assert await incidents.prune(NOW + 100) == 2
        assert await incidents.oldest_open("file-failed") == ("event-2:0", NOW + 2)
