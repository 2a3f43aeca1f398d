"""Bad input through the import folder: a corpus of over 1,000 malformed files next to valid
traffic, handled by the watcher and uploader processes sending to DCMTK ``storescp``.

Each file ends in a known place with its reason: quarantined as invalid (a WARNING log line
naming it, the ``invalid`` metric), or sent and archived (a mutation that left a valid
instance), or reported failed by the uploader when the PACS refuses it. The valid series
dropped alongside arrives complete. Neither process exits, and the watcher's memory stays flat
when a second corpus of the same kinds follows.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from pacsflow.dicom import read_part10

from tests.dicom.synthetic import write_ct_series
from tests.reliability.corpus import write_corpus
from tests.reliability.support import ServiceProcess, log_records, wait_until
from tests.uploader.support import Storescp

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow, pytest.mark.timeout(600)]

VALID_FILES = 300
FINAL = ("invalid", "archived", "duplicate", "failed")


def write_config(folder: Path, pacs: Storescp) -> Path:
    path = folder / "pacsflow.yaml"
    path.write_text(f"""
instance: badinput
logging: {{level: INFO, format: json}}
state: {{backend: sqlite, path: {folder}/state.db}}
bus: {{backend: embedded, declare_services: [watcher, uploader]}}
dicom: {{ae_title: PFBAD, connect_timeout: 3, acse_timeout: 10, dimse_timeout: 10}}
nodes:
  pacs: {{ae_title: {pacs.ae_title}, host: 127.0.0.1, port: {pacs.port}}}
watcher:
  import_folders: [{folder}/inbox]
  archive_folder: {folder}/archive
  quarantine_folder: {folder}/quarantine
  debounce_seconds: 0.5
  archive_interval_seconds: 1
uploader:
  destinations: [pacs]
  associations: 2
  processes: 0
  max_attempts: 2
  retry_initial_seconds: 0.1
  retry_max_seconds: 0.5
  max_load_per_core: 100
""")
    return path


def ledger(db: Path) -> dict[str, tuple[str, str | None]]:
    """path -> (status, reason) for every file the watcher recorded."""
    with sqlite3.connect(db, timeout=10) as conn:
        return {path: (status, reason) for path, status, reason in
                conn.execute("SELECT path, status, reason FROM ledger_files")}  # fmt: skip


def deliveries_failed(db: Path) -> dict[str, str | None]:
    """path -> last error of deliveries that failed for good."""
    with sqlite3.connect(db, timeout=10) as conn:
        return dict(conn.execute(
            "SELECT f.path, d.last_error FROM ledger_deliveries d"
            " JOIN ledger_files f ON f.id = d.file_id WHERE d.status = 'failed'"))


async def test_malformed_files_are_each_accounted_for_and_valid_ones_keep_flowing(
    tmp_path: Path,
) -> None:
    staging = tmp_path / "staging"
    rounds = []
    for number in (1, 2):
        corpus = write_corpus(staging / f"#{number}-Corpus", seed=number)
        valid = write_ct_series(staging / f"#{number}0-Valid" / "series", VALID_FILES,
                                rows=16, columns=16)  # fmt: skip
        rounds.append((corpus, valid))
    valid_uids = {read_part10(p).sop_instance_uid for _, valid in rounds for p in valid}
    corpus_count = min(sum(len(paths) for paths in corpus.values()) for corpus, _ in rounds)
    assert corpus_count >= 1000
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    db = tmp_path / "state.db"

    with Storescp(tmp_path / "pacs", fork=True) as pacs:
        config = write_config(tmp_path, pacs)
        uploader = ServiceProcess(config, "uploader").start()
        watcher = ServiceProcess(config, "watcher").start()
        services = (watcher, uploader)
        rss: list[int] = []
        try:
            await wait_until(lambda: watcher.ready() and uploader.ready(), 60,
                             "both services ready", alive=services)  # fmt: skip
            expected_rows = 0
            for number, (corpus, valid) in enumerate(rounds, start=1):
                for name in (f"#{number}-Corpus", f"#{number}0-Valid"):
                    shutil.move(staging / name, inbox / name)
                expected_rows += sum(len(paths) for paths in corpus.values()) + len(valid)

                def settled(count: int = expected_rows) -> bool:
                    rows = ledger(db)
                    return len(rows) >= count and all(s in FINAL for s, _ in rows.values())

                await wait_until(settled, 240, f"round {number} settled", poll=0.5,
                                 alive=services)  # fmt: skip
                rss.append(watcher.rss())
            invalid_metric = watcher.metric("pacsflow_watcher_files_total", outcome="invalid")
            assert watcher.stop() == 0, watcher.tail()
            assert uploader.stop() == 0, uploader.tail()
        finally:
            watcher.stop()
            uploader.stop()
        received = pacs.uids()

    rows = ledger(db)
    # Every valid instance sent alongside arrived and was archived.
    for _corpus, valid in rounds:
        for path in valid:
            status, reason = rows[str(inbox / path.relative_to(staging))]
            assert status == "archived", (path, status, reason)
    assert valid_uids <= set(received)

    # Every malformed file has its outcome and its reason.
    counts: dict[str, int] = {}
    invalid_paths = []
    for corpus, _valid in rounds:
        for kind, paths in corpus.items():
            for path in paths:
                status, reason = rows[str(inbox / path.relative_to(staging))]
                counts[f"{kind}:{status}"] = counts.get(f"{kind}:{status}", 0) + 1
                if status == "invalid":
                    assert reason and "quarantined as" in reason, (path, reason)
                    invalid_paths.append(str(inbox / path.relative_to(staging)))
    failures = deliveries_failed(db)
    assert all(failures.values()), failures  # the PACS's refusal, recorded
    for kind in ("notdicom", "bomb"):
        assert all(key.endswith(":invalid") for key in counts if key.startswith(kind + ":")), counts
    assert not any((inbox / p.relative_to(staging)).exists()
                   for c, _ in rounds for ps in c.values() for p in ps
                   if rows[str(inbox / p.relative_to(staging))][0] != "failed")  # fmt: skip

    # A WARNING naming each invalid file, and the metric counting them.
    messages = [str(r.get("message", "")) for r in log_records(watcher.log)
                if r.get("level") == "WARNING"]  # fmt: skip
    warned = {m.split(":")[0].removeprefix("invalid file ") for m in messages
              if m.startswith("invalid file ")}  # fmt: skip
    assert set(invalid_paths) <= warned
    assert invalid_metric == len(invalid_paths)
    # A second corpus of the same kinds: the watcher's memory does not grow with it.
    growth = rss[1] - rss[0]
    print(f"bad input: {corpus_count} malformed files per round, outcomes {sorted(counts.items())};"
          f" watcher RSS {rss[0] >> 20} MiB after round 1, {rss[1] >> 20} MiB after round 2")
    assert growth < 64 << 20, f"watcher memory grew by {growth >> 20} MiB"
