-- The notifier's state, the same SQL for PostgreSQL and SQLite. Times are epoch seconds.

-- The outbox: one row per message and channel (e-mail, or one webhook), sent exactly once.
-- id is derived from what caused the message (an event id, the first incident of an alert),
-- the channel and the target, so a redelivered event inserts nothing (ON CONFLICT DO NOTHING).
-- status: pending, sent. A pending row is retried until it is sent; it is never dropped.
CREATE TABLE notifier_outbox (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    -- JSON list of e-mail addresses (empty for webhooks)
    recipients TEXT NOT NULL,
    subject TEXT NOT NULL,
    text_body TEXT NOT NULL,
    html_body TEXT,
    -- the exact JSON a webhook receives
    json_body TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    -- a delivery loop's lease on the row, so two processes never send it at the same time
    claimed_by TEXT,
    claimed_until DOUBLE PRECISION,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    sent_at DOUBLE PRECISION
);

-- The delivery loops' "oldest due first" scan, and the pending counts for the metrics.
CREATE INDEX notifier_outbox_due ON notifier_outbox (channel, status, next_attempt_at);
-- Pruning sent rows after the retention time.
CREATE INDEX notifier_outbox_sent ON notifier_outbox (status, sent_at);

-- Incidents reported in aggregated alerts: failed files (kind file-failed) and dead letters
-- (kind dead-letters). incident_key makes recording idempotent (event id and file index, or
-- service and dead-letter id); alert names the alert that reported it, NULL until then.
CREATE TABLE notifier_incidents (
    kind TEXT NOT NULL,
    incident_key TEXT NOT NULL,
    -- what the alert counts by: the destination, or the service and event type
    group_name TEXT NOT NULL,
    error TEXT NOT NULL,
    -- an example to show: the file's path, or the dead letter's id
    item TEXT NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL,
    alert TEXT,
    PRIMARY KEY (kind, incident_key)
);

-- The aggregator's "oldest incident not yet reported" look-up.
CREATE INDEX notifier_incidents_open ON notifier_incidents (kind, seen_at) WHERE alert IS NULL;
-- The summary of one alert.
CREATE INDEX notifier_incidents_alert ON notifier_incidents (alert, group_name);
