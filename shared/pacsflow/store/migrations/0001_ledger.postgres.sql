-- The file ledger: every file the watcher has seen, and its delivery to each destination.
-- Times are epoch seconds. Statuses are checked by pacsflow.store.ledger, not by constraints,
-- so that adding one needs no table rebuild in SQLite.

-- status: ready, sending, sent, failed, invalid, duplicate, archived
CREATE TABLE ledger_files (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
    mtime DOUBLE PRECISION NOT NULL,
    sha256 TEXT,
    sop_instance_uid TEXT,
    series_instance_uid TEXT,
    study_instance_uid TEXT,
    sop_class_uid TEXT,
    transfer_syntax_uid TEXT,
    batch_key TEXT,
    status TEXT NOT NULL DEFAULT 'ready',
    reason TEXT,
    archive_path TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    -- A re-scan finds the same row; a file rewritten in place is a new one.
    CONSTRAINT ledger_files_seen UNIQUE (path, size, mtime)
);

-- Listing and counting by status and time, and the "sent, not archived" scan.
CREATE INDEX ledger_files_status ON ledger_files (status, updated_at, id);
-- Listing everything changed since a time.
CREATE INDEX ledger_files_updated ON ledger_files (updated_at, id);
-- Duplicate detection by SOP Instance UID.
CREATE INDEX ledger_files_sop_instance ON ledger_files (sop_instance_uid)
    WHERE sop_instance_uid IS NOT NULL;

-- status: pending, sending, sent, warning, failed, unsupported
CREATE TABLE ledger_deliveries (
    file_id BIGINT NOT NULL REFERENCES ledger_files (id) ON DELETE CASCADE,
    destination TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    dimse_status INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (file_id, destination)
);
