-- The harvester's state: the patients, studies and series it found, each with its status,
-- its claim (which harvester process works on it, and until when the claim holds), its
-- attempts and the time it may be tried again. Times are epoch seconds.
--
-- Claims: claimed_by names a harvester process (instance|host|pid|token); lease_until is
-- renewed while it works. A claim past its lease is taken back by any harvester.

-- The patient discovery stage (one row per kind of scan): status pending, running, done,
-- failed. done_at tells when to scan again (harvester.rescan_hours).
CREATE TABLE harvest_scans (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL DEFAULT 'pending',
    claimed_by TEXT,
    lease_until DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    found INTEGER,
    -- A digest of the criteria the last scan used: changed criteria scan again.
    criteria TEXT,
    done_at DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    modified_at DOUBLE PRECISION NOT NULL
);

-- status: pending (its studies are to be listed), listing, listed, failed.
-- version counts the series of the patient that completed; the archive on disk was built
-- for archive_version and announced (patient-complete) for published_version.
CREATE TABLE harvest_patients (
    patient_id TEXT PRIMARY KEY,
    status TEXT NOT NULL DEFAULT 'pending',
    claimed_by TEXT,
    lease_until DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    archive_version INTEGER NOT NULL DEFAULT 0,
    published_version INTEGER NOT NULL DEFAULT 0,
    archive_claimed_by TEXT,
    archive_lease_until DOUBLE PRECISION,
    archive_path TEXT,
    archive_series INTEGER,
    archive_instances INTEGER,
    archive_bytes BIGINT,
    archived_at DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    modified_at DOUBLE PRECISION NOT NULL
);

-- status: pending (its series are to be listed), listing, listed, excluded (criteria), failed.
CREATE TABLE harvest_studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL REFERENCES harvest_patients (patient_id),
    study_date TEXT NOT NULL DEFAULT '',
    study_time TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    modalities TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'pending',
    claimed_by TEXT,
    lease_until DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    modified_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX harvest_studies_patient ON harvest_studies (patient_id);
CREATE INDEX harvest_studies_work ON harvest_studies (status, patient_id, study_uid);

-- status: pending, retrieving, complete, failed, excluded (criteria).
-- expected_instances: the series C-FIND's count; instances / bytes: what is at the
-- destination. move_*: the final status and counts of the last C-MOVE or C-GET.
-- event_pending: a 'moved' event reporting the last outcome is still to be published.
CREATE TABLE harvest_series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES harvest_studies (study_uid),
    patient_id TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    series_number TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    expected_instances INTEGER,
    status TEXT NOT NULL DEFAULT 'pending',
    claimed_by TEXT,
    lease_until DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    instances INTEGER NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    refetched INTEGER NOT NULL DEFAULT 0,
    move_status INTEGER,
    move_completed INTEGER,
    move_failed INTEGER,
    move_warning INTEGER,
    started_at DOUBLE PRECISION,
    duration_seconds DOUBLE PRECISION,
    completed_at DOUBLE PRECISION,
    event_pending INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    modified_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX harvest_series_patient ON harvest_series (patient_id, status);
CREATE INDEX harvest_series_study ON harvest_series (study_uid);
-- Claiming in patient order, so patients complete (and are archived) one after another.
CREATE INDEX harvest_series_work ON harvest_series (status, patient_id, study_uid, series_uid);
CREATE INDEX harvest_series_events ON harvest_series (series_uid) WHERE event_pending = 1;

-- The shared request budget (GCRA): tat is the theoretical arrival time of the next request.
CREATE TABLE harvest_rate (
    name TEXT PRIMARY KEY,
    tat DOUBLE PRECISION NOT NULL
);
