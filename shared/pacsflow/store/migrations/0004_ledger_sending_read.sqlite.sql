-- A file being sent is no longer stored as 'sending': a ready file reads as sending while one
-- of its deliveries is being sent (pacsflow.store.ledger), so claiming work rewrites no file
-- row. Rows stored as sending by an earlier version are ready.
UPDATE ledger_files SET status = 'ready' WHERE status = 'sending';
