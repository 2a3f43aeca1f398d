-- When the watcher's file-ready event for a file was confirmed by the bus; NULL: not yet.
-- A restarted watcher announces again only files without it.
ALTER TABLE ledger_files ADD COLUMN announced_at DOUBLE PRECISION;
