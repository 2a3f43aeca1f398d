-- The uploader drives sending from the ledger's deliveries (pacsflow_uploader.deliveries).
-- next_attempt_at: a pending delivery is not claimed before this time (epoch seconds; 0: now).
-- claimed_by / claimed_at: the uploader process sending it (status 'sending') and when that
--   process last renewed its claim; a claim that is not renewed is taken back.
-- in_doubt: 1 when an earlier send may have reached the destination without an answer
--   (a crash or a lost association): such a delivery may be checked with C-FIND first.
ALTER TABLE ledger_deliveries ADD COLUMN next_attempt_at REAL NOT NULL DEFAULT 0;
ALTER TABLE ledger_deliveries ADD COLUMN claimed_by TEXT;
ALTER TABLE ledger_deliveries ADD COLUMN claimed_at REAL;
ALTER TABLE ledger_deliveries ADD COLUMN in_doubt INTEGER NOT NULL DEFAULT 0;

-- Claiming: pending deliveries of one destination in arrival order.
CREATE INDEX uploader_deliveries_pending ON ledger_deliveries (destination, file_id)
    WHERE status = 'pending';
-- Renewing and taking back claims.
CREATE INDEX uploader_deliveries_sending ON ledger_deliveries (claimed_by)
    WHERE status = 'sending';

-- file-sent / file-failed events written in the transaction that records the outcomes they
-- report, published after it commits, deleted once the bus confirmed them.
CREATE TABLE uploader_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL,
    created_at REAL NOT NULL
) STRICT;
