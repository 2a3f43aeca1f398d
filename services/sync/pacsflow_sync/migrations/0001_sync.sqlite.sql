-- The sync service: one row per cycle (its statistics) and one per series it asked to move.
-- Times are epoch seconds. Statuses are checked by pacsflow_sync, not by constraints.
-- STRICT: values keep their declared types, as in PostgreSQL; verify is 0 or 1.

-- status: running, ok, failed, incomplete (moves still running when the cycle stopped waiting)
CREATE TABLE sync_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    source_ae TEXT NOT NULL,
    destination_ae TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'running',
    started_at REAL NOT NULL,
    finished_at REAL,
    remote_studies INTEGER NOT NULL DEFAULT 0,
    local_studies INTEGER NOT NULL DEFAULT 0,
    missing_studies INTEGER NOT NULL DEFAULT 0,
    incomplete_studies INTEGER NOT NULL DEFAULT 0,
    series_chosen INTEGER NOT NULL DEFAULT 0,
    series_requested INTEGER NOT NULL DEFAULT 0,
    series_in_progress INTEGER NOT NULL DEFAULT 0,
    series_waiting INTEGER NOT NULL DEFAULT 0,
    series_moved INTEGER NOT NULL DEFAULT 0,
    series_failed INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    images_transferred INTEGER NOT NULL DEFAULT 0,
    images_failed INTEGER NOT NULL DEFAULT 0,
    error TEXT
) STRICT;

CREATE INDEX sync_runs_started ON sync_runs (started_at, id);

-- status: requested (waiting for a mover), moving (claimed; claimed_at is renewed while the
-- C-MOVE runs), moved, failed (requested again from next_attempt_at on).
CREATE TABLE sync_transfers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_ae TEXT NOT NULL,
    destination_ae TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    expected_images INTEGER,
    -- the cycle that requested it last (NULL: requested by an event alone)
    run_id INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    requested_at REAL NOT NULL,
    -- series-missing published for this request (NULL: still to publish)
    announced_at REAL,
    claimed_by TEXT,
    claimed_at REAL,
    -- the previous mover stopped while moving: ask the local PACS before moving again
    verify INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    warning INTEGER NOT NULL DEFAULT 0,
    dimse_status INTEGER,
    last_error TEXT,
    -- moved published for the last outcome (NULL: still to publish)
    reported_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    -- One row per series and route: what makes "already being moved" and two sync
    -- processes at once safe.
    CONSTRAINT sync_transfers_series UNIQUE (source_ae, destination_ae, series_instance_uid)
) STRICT;

-- Movers claim the oldest requested series; cycles wait on and sum up their run's series.
CREATE INDEX sync_transfers_status ON sync_transfers (status, requested_at, id);
CREATE INDEX sync_transfers_run ON sync_transfers (run_id);
