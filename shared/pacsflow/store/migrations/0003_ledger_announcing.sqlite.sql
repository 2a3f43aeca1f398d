-- Batches of files the watcher recorded and is announcing, whose file-ready events the bus
-- has not confirmed yet. The watcher sets ledger_files.announced_at when it records a file
-- for announcing and deletes the batch's row here once the bus confirmed: one row per batch
-- instead of one more version of every file's row. A file is announced when announced_at is
-- set and no row here names it.
CREATE TABLE ledger_announcing (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    -- a JSON array of ledger_files ids
    file_ids TEXT NOT NULL,
    created_at REAL NOT NULL
) STRICT;
