-- The router's state, the same SQL for PostgreSQL and SQLite. Times are epoch seconds.

-- One row per route (called AE title) and Study Instance UID.
-- status: open (receiving, or quiet but not yet reported), claimed (a router process has
-- claimed the completion and is publishing it), notified (study-complete published).
-- New instances re-open a notified study; its next completion is number completion + 1 and
-- reports the files added since notified_files.
-- claim_id is the id of the study-complete event of the current claim, and claim_event its
-- exact JSON: a claim left behind by a crash is published again with the same id.
CREATE TABLE router_studies (
    route TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    study_description TEXT NOT NULL,
    storage_path TEXT NOT NULL,
    -- instances reported by the receivers (duplicates included); counts in events come
    -- from the files on disk
    instances INTEGER NOT NULL,
    received_bytes BIGINT NOT NULL,
    first_received DOUBLE PRECISION NOT NULL,
    last_received DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    completion INTEGER NOT NULL DEFAULT 0,
    notified_files INTEGER NOT NULL DEFAULT 0,
    notified_at DOUBLE PRECISION,
    claim_id TEXT,
    claimed_by TEXT,
    claimed_at DOUBLE PRECISION,
    claim_last_received DOUBLE PRECISION,
    claim_event TEXT,
    PRIMARY KEY (route, study_uid)
);

-- The sweep: open studies by quietness, claims by age; pruning notified studies.
CREATE INDEX router_studies_due ON router_studies (status, last_received);
CREATE INDEX router_studies_claims ON router_studies (status, claimed_at);

-- The series folders of each study: the files in them are what a completion counts.
CREATE TABLE router_series (
    route TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    folder TEXT NOT NULL,
    PRIMARY KEY (route, study_uid, series_uid, folder)
);
